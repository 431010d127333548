"""Checkpoints never lose saved work: each checkpoint file is damaged in turn (garbage,
truncated, empty) and the trainer resumes from the newest intact checkpoint, with a warning
naming the file, without deleting or overwriting an intact checkpoint; leftovers of killed
runs are cleaned up."""

import os
import shutil
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import assert_lists_close

import warpkeras
from warpkeras.buffer import remove_stale_spill_dirs
from warpkeras.trainers.loop import CheckpointError, CheckpointWarning


def regression_task(rng, n=40):
    w = (np.array([[2.0], [-1.5], [1.0], [0.5]]) + 0.1 * rng.normal(size=(4, 1))).astype("float32")
    x = rng.normal(size=(n, 4)).astype("float32")
    return warpkeras.Task(train=(x[:30], x[:30] @ w), test=(x[30:], x[30:] @ w), batch_size=10)


def make_trainer(seed=0, **kw):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            warpkeras.warp(
                keras.layers.Dense(4, use_bias=False, kernel_initializer="identity", name="warp")
            ),
            keras.layers.Dense(1, name="task"),
        ]
    )
    return warpkeras.WarpTrainer(
        model,
        "mse",
        mode="online",
        init_objective="leap",
        inner_steps=1,
        meta_batch_size=1,
        inner_learning_rate=0.1,
        meta_optimizer=keras.optimizers.Adam(0.01),
        **kw,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder with ckpt-1, ckpt-2, ckpt-3 and the weights after each meta step."""
    folder = str(tmp_path_factory.mktemp("run") / "ckpt")
    trainer = make_trainer()
    weights = {}
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: weights.update({e + 1: trainer.model.get_weights()})
    )
    trainer.fit(
        regression_task,
        epochs=3,
        verbose=0,
        checkpoint_dir=folder,
        max_checkpoints=5,
        callbacks=[record],
    )
    assert sorted(f for f in os.listdir(folder) if f.endswith(".index")) == [
        "ckpt-1.index",
        "ckpt-2.index",
        "ckpt-3.index",
    ]
    return folder, weights


def damage(path, how):
    data = open(path, "rb").read()
    if how == "garbage":
        data = bytes(np.random.default_rng(0).integers(0, 256, max(len(data), 64), np.uint8))
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:
        data = b""
    with open(path, "wb") as f:
        f.write(data)


def snapshot(folder, names):
    return {n: open(os.path.join(folder, n), "rb").read() for n in names}


FILES = {"state": "checkpoint", "index": "ckpt-3.index", "data": "ckpt-3.data-00000-of-00001"}
HOWS = ("garbage", "truncated", "empty")


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("which", sorted(FILES))
def test_resume_from_newest_intact_checkpoint(saved, tmp_path, which, how):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], folder)
    damage(os.path.join(folder, FILES[which]), how)
    trainer = make_trainer(seed=7)  # other weights until restored
    with pytest.warns(CheckpointWarning, match=FILES[which]):
        step = trainer.restore(folder)
    expected = 3 if which == "state" else 2  # a damaged ckpt-3 falls back to ckpt-2
    assert step == expected
    assert_lists_close(trainer.model.get_weights(), saved[1][expected], rtol=0, atol=0)


@pytest.mark.parametrize("which,how", [("state", "garbage"), ("data", "truncated")])
def test_training_continues_without_touching_intact_checkpoints(saved, tmp_path, which, how):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], folder)
    damage(os.path.join(folder, FILES[which]), how)
    intact = [f for f in os.listdir(folder) if f.startswith(("ckpt-1.", "ckpt-2."))]
    before = snapshot(folder, intact)
    trainer = make_trainer(seed=7)
    with pytest.warns(CheckpointWarning, match=FILES[which]):
        history = trainer.fit(
            regression_task, epochs=4, verbose=0, checkpoint_dir=folder, max_checkpoints=5
        )
    assert history.epoch == ([3] if which == "state" else [2, 3])
    assert snapshot(folder, intact) == before  # neither deleted nor overwritten
    reference = make_trainer()
    reference.fit(regression_task, epochs=4, verbose=0)
    assert_lists_close(
        trainer.model.get_weights(), reference.model.get_weights(), rtol=1e-6, atol=1e-7
    )
    # the state file again lists the checkpoints, and the next resume needs no fallback
    assert make_trainer(seed=7).restore(folder) == 4


def test_no_readable_checkpoint_is_an_error_that_names_the_files(saved, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], folder)
    for n in (1, 2, 3):
        damage(os.path.join(folder, f"ckpt-{n}.index"), "empty")
    names = sorted(os.listdir(folder))
    with pytest.raises(CheckpointError, match=r"ckpt-1\.index.*empty"):
        make_trainer().fit(regression_task, epochs=4, verbose=0, checkpoint_dir=folder)
    assert sorted(os.listdir(folder)) == names  # nothing deleted or written


def test_checkpoint_of_another_model_is_refused_by_name(saved):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="task")])
    other = warpkeras.LeapTrainer(model, "mse", inner_steps=1, meta_batch_size=1)
    with pytest.raises(CheckpointError, match="ckpt-3"):
        other.restore(saved[0])


def test_leftover_temp_folders_are_removed(saved, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], folder)
    os.makedirs(os.path.join(folder, "ckpt-4_temp", "part-00000-of-00001"))
    os.makedirs(os.path.join(folder, "notes"))
    make_trainer().fit(regression_task, epochs=3, verbose=0, checkpoint_dir=folder)
    assert not os.path.exists(os.path.join(folder, "ckpt-4_temp"))
    assert os.path.isdir(os.path.join(folder, "notes"))


def test_spill_folders_of_killed_runs_are_removed(tmp_path):
    root = str(tmp_path / "spill")
    os.makedirs(root)
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    killed = os.path.join(root, f"warpkeras-buffer-{host}-{dead}-abc123")
    running = os.path.join(root, f"warpkeras-buffer-{host}-{os.getppid()}-def456")
    elsewhere = os.path.join(root, f"warpkeras-buffer-otherhost-{dead}-ghi789")
    unrelated = os.path.join(root, "warpkeras-buffer-old")
    for d in (killed, running, elsewhere, unrelated):
        os.makedirs(d)
    assert remove_stale_spill_dirs(root) == [killed]
    assert all(os.path.isdir(d) for d in (running, elsewhere, unrelated))
    # an offline trainer that spills cleans up the same way when it starts
    os.makedirs(killed)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), warpkeras.warp(keras.layers.Dense(4)), keras.layers.Dense(1)]
    )
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        mode="offline",
        init_objective=None,
        inner_steps=2,
        meta_batch_size=1,
        buffer_capacity=1,
        buffer_overflow="spill",
        buffer_spill_dir=root,
    )
    trainer.fit(regression_task, epochs=1, verbose=0)
    assert not os.path.exists(killed) and os.path.isdir(running)
