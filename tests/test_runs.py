"""Runs that survive what production does to them: resume at every verbosity, the settings
recorded with every checkpoint (what a resumed run may change, what it may not), one writer
per checkpoint folder, checkpoints on SIGTERM / SIGINT, task sources and batch streams that
end, Keras's ``steps_per_epoch``, and cache temporaries of killed processes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import REPO

import warpkeras
from warpkeras.data import _cache
from warpkeras.trainers import (
    CheckpointError,
    CheckpointLockError,
    CheckpointWarning,
    TaskDataExhaustedError,
    TasksExhaustedError,
)


def regression_task(rng, n=40):
    w = (np.array([[2.0], [-1.5], [1.0], [0.5]]) + 0.1 * rng.normal(size=(4, 1))).astype("float32")
    x = rng.normal(size=(n, 4)).astype("float32")
    return warpkeras.Task(train=(x[:30], x[:30] @ w), test=(x[30:], x[30:] @ w), batch_size=10)


def make_model(seed=0, warps=1):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((4,))]
    for i in range(warps):
        layers.append(
            warpkeras.warp(
                keras.layers.Dense(
                    4, use_bias=False, kernel_initializer="identity", name=f"warp{i}"
                )
            )
        )
    layers.append(keras.layers.Dense(1, name="task"))
    return keras.Sequential(layers)


def make_trainer(seed=0, inner_learning_rate=0.1, meta_optimizer=None, model=None, **kw):
    return warpkeras.WarpTrainer(
        model or make_model(seed),
        "mse",
        mode="online",
        init_objective="leap",
        inner_steps=1,
        meta_batch_size=1,
        inner_learning_rate=inner_learning_rate,
        meta_optimizer=meta_optimizer or keras.optimizers.Adam(0.01),
        seed=seed,
        **kw,
    )


def weights(trainer):
    return [np.asarray(w) for w in trainer.model.get_weights()]


def assert_bit_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def slots(optimizer):
    return [np.asarray(v.numpy()) for v in optimizer.variables]


@pytest.fixture(scope="module")
def reference():
    """Weights and meta-optimiser slots of an uninterrupted 4-step run."""
    trainer = make_trainer()
    trainer.fit(regression_task, epochs=4, verbose=0)
    return weights(trainer), slots(trainer.meta_optimizer)


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """A checkpoint folder after 2 of those 4 steps."""
    folder = str(tmp_path_factory.mktemp("half") / "ckpt")
    make_trainer().fit(regression_task, epochs=2, verbose=0, checkpoint_dir=folder)
    return folder


def copy_of(folder, tmp_path):
    target = str(tmp_path / "ckpt")
    shutil.copytree(folder, target)
    return target


# ----------------------------------------------------------------------------------------
# resume at every verbosity, with and without callbacks
@pytest.mark.parametrize("with_callbacks", [False, True])
@pytest.mark.parametrize("verbose", [0, 1, 2, "auto"])
def test_resume_at_every_verbosity(half_run, reference, tmp_path, capsys, verbose, with_callbacks):
    folder = copy_of(half_run, tmp_path)
    callbacks = (
        [keras.callbacks.CSVLogger(str(tmp_path / "log.csv")), keras.callbacks.History()]
        if with_callbacks
        else None
    )
    trainer = make_trainer()
    history = trainer.fit(
        regression_task, epochs=4, verbose=verbose, checkpoint_dir=folder, callbacks=callbacks
    )
    out = capsys.readouterr().out
    assert history.epoch == [2, 3]
    assert ("Resumed from" in out and "at meta step 2." in out) == (verbose != 0)
    assert_bit_equal(weights(trainer), reference[0])
    assert_bit_equal(slots(trainer.meta_optimizer), reference[1])


class Interrupt(keras.callbacks.Callback):
    """Raises ``RuntimeError("interrupted")`` as epoch `epoch` or meta step `step` begins
    (a run that dies there)."""

    def __init__(self, epoch=None, step=None):
        super().__init__()
        self.epoch, self.step = epoch, step

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")

    def on_train_batch_begin(self, batch, logs=None):
        if self.step is not None and self.model.trainer.step.numpy() == self.step:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("verbose", [1, 2])
def test_backup_and_restore_resumes_with_progress_output(reference, tmp_path, capsys, verbose):
    backup = str(tmp_path / "backup")

    with pytest.raises(RuntimeError, match="interrupted"):
        make_trainer().fit(
            regression_task,
            epochs=4,
            verbose=verbose,
            callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt(epoch=2)],
        )
    resumed = make_trainer(seed=0, model=make_model(seed=5))  # other weights until restored
    history = resumed.fit(
        regression_task,
        epochs=4,
        verbose=verbose,
        callbacks=[keras.callbacks.BackupAndRestore(backup)],
    )
    assert history.epoch == [2, 3] and "Epoch 4/4" in capsys.readouterr().out
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in weights(resumed)]),
        np.concatenate([w.ravel() for w in reference[0]]),
        rtol=1e-6,
        atol=1e-7,
    )


def test_no_private_keras_attribute_in_the_loop_and_examples():
    """The fault class of ``keras.utils.io_utils``: loop, callback and checkpoint code
    (and the examples and benchmarks) use Keras's public API only; the one exception is
    the metric direction `FitModel.metrics` reads, guarded for a Keras without it."""
    pattern = (
        "keras.utils.io_utils",
        "cb._history",
        "keras.src",
        "._history",
        "._loss_tracker",
        "._get_variable_index",
    )
    files = [
        os.path.join(REPO, "warpkeras", "trainers", n)
        for n in ("loop.py", "checkpoints.py", "fitmodel.py")
    ]
    files.append(os.path.join(REPO, "warpkeras", "callbacks.py"))
    for folder in ("examples", "bench"):
        for root, _, names in os.walk(os.path.join(REPO, folder)):
            files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines, 1):
            if any(p in line for p in pattern) and "MetricsList" not in line:
                found.append(f"{path}:{number}: {line.strip()}")
    assert not found, found


def test_backup_of_another_trainer_configuration_is_a_checkpoint_error(tmp_path):
    backup = str(tmp_path / "backup")

    with pytest.raises(RuntimeError, match="interrupted"):
        make_trainer().fit(
            regression_task,
            epochs=2,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt(epoch=1)],
        )
    other = warpkeras.WarpTrainer(
        make_model(), "mse", mode="online", init_objective=None, inner_steps=1, meta_batch_size=1
    )
    with pytest.raises(CheckpointError, match="differently configured trainer"):
        other.fit(
            regression_task,
            epochs=2,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup)],
        )


# ----------------------------------------------------------------------------------------
# settings on resume
def test_changed_hyperparameters_win_with_one_warning(half_run, tmp_path):
    # the same run, continued in-process with the new values from step 2 on
    expected = make_trainer()
    expected.fit(regression_task, epochs=2, verbose=0)
    expected.inner_lr.assign(0.05)
    for objective in expected.objectives:  # φ's and θ0's (a copy of meta_optimizer)
        if objective.optimizer is not None:
            objective.optimizer.learning_rate = 0.001
    expected.fit(regression_task, epochs=4, verbose=0)

    folder = copy_of(half_run, tmp_path)
    trainer = make_trainer(inner_learning_rate=0.05, meta_optimizer=keras.optimizers.Adam(0.001))
    with pytest.warns(CheckpointWarning) as caught:
        trainer.fit(regression_task, epochs=4, verbose=0, checkpoint_dir=folder)
    changes = [str(w.message) for w in caught if "changed settings" in str(w.message)]
    assert len(changes) == 1, changes
    assert "inner_learning_rate: 0.1" in changes[0] and "-> 0.05" in changes[0]
    assert "meta_optimizer.learning_rate: 0.0099" in changes[0] and "-> 0.001" in changes[0]
    assert "init_optimizer.learning_rate: 0.0099" in changes[0]
    assert float(trainer.inner_lr.numpy()) == pytest.approx(0.05)
    assert float(trainer.meta_optimizer.learning_rate.numpy()) == pytest.approx(0.001)
    assert_bit_equal(weights(trainer), weights(expected))


def test_values_changed_by_training_go_on_without_a_warning(tmp_path, recwarn):
    folder = str(tmp_path / "ckpt")
    trainer = make_trainer()
    halve = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr / 2)
    trainer.fit(regression_task, epochs=2, verbose=0, checkpoint_dir=folder, callbacks=[halve])
    resumed = make_trainer()  # built with Adam(0.01), as the first run
    resumed.fit(regression_task, epochs=2, verbose=0, checkpoint_dir=folder)
    assert not [w for w in recwarn if "changed settings" in str(w.message)]
    assert float(resumed.meta_optimizer.learning_rate.numpy()) == pytest.approx(0.0025)


@pytest.mark.parametrize("change", ["optimizer", "model", "objectives"])
def test_what_cannot_continue_is_refused_by_name_before_anything_is_written(
    half_run, tmp_path, change
):
    folder = copy_of(half_run, tmp_path)
    before = {n: read_bytes(os.path.join(folder, n)) for n in os.listdir(folder)}
    if change == "optimizer":  # same slot count and shapes as Adam: positions would fit
        trainer, match = (
            make_trainer(meta_optimizer=keras.optimizers.Adamax(0.01)),
            "meta_optimizer class Adam -> Adamax",
        )
    elif change == "model":
        trainer, match = make_trainer(model=make_model(warps=2)), "model variable"
    else:
        trainer = warpkeras.WarpTrainer(
            make_model(),
            "mse",
            mode="online",
            init_objective=None,
            inner_steps=1,
            meta_batch_size=1,
            meta_optimizer=keras.optimizers.Adam(0.01),
        )
        match = "objectives"
    with pytest.raises(CheckpointError, match=match):
        trainer.fit(regression_task, epochs=4, verbose=0, checkpoint_dir=folder)
    after = {n: read_bytes(os.path.join(folder, n)) for n in os.listdir(folder)}
    assert after == before  # nothing written, the lock released


def test_optimizer_slots_are_matched_by_variable_not_position(tmp_path):
    """Two warp layers of one shape: an optimiser whose slots come in the other order
    restores each slot to its own variable (by position, they would be swapped)."""
    folder = str(tmp_path / "ckpt")
    first = make_trainer(model=make_model(warps=2))
    first.fit(regression_task, epochs=2, verbose=0, checkpoint_dir=folder)
    first.fit(regression_task, epochs=4, verbose=0)  # the uninterrupted continuation

    model = make_model(warps=2)
    optimizer = keras.optimizers.Adam(0.01)
    warp = [
        v
        for layer in model.layers
        if layer.name.startswith("warp")
        for v in layer.trainable_variables
    ]
    optimizer.build(warp[::-1])  # slots in the reverse order of the first run's
    resumed = make_trainer(model=model, meta_optimizer=optimizer)
    assert (
        [v.path for v in resumed.meta_optimizer.variables][2]
        .split("/")[1]
        .startswith(model.name + "_warp1")
    )
    resumed.fit(regression_task, epochs=4, verbose=0, checkpoint_dir=folder)
    assert_bit_equal(weights(resumed), weights(first))


def test_backup_and_restore_matches_optimizer_slots_by_variable(tmp_path):
    backup = str(tmp_path / "backup")

    with pytest.raises(RuntimeError, match="interrupted"):
        make_trainer(model=make_model(warps=2)).fit(
            regression_task,
            epochs=4,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt(epoch=2)],
        )
    uninterrupted = make_trainer(model=make_model(warps=2))
    uninterrupted.fit(regression_task, epochs=4, verbose=0)

    model = make_model(warps=2)
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(
        [
            v
            for layer in model.layers
            if layer.name.startswith("warp")
            for v in layer.trainable_variables
        ][::-1]
    )
    resumed = make_trainer(model=model, meta_optimizer=optimizer)
    resumed.fit(
        regression_task, epochs=4, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)]
    )
    assert_bit_equal(weights(resumed), weights(uninterrupted))


# ----------------------------------------------------------------------------------------
# one writer per folder
def write_lock(folder, host, pid):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "writer.lock"), "w") as f:
        json.dump({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00"}, f)


def dead_pid():
    return int(
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


HOLDER = textwrap.dedent("""
    import sys, time
    from warpkeras.trainers.checkpoints import FolderLock
    FolderLock({folder!r}).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_running_writer_is_refused_by_name(tmp_path):
    folder = str(tmp_path / "ckpt")
    os.makedirs(folder)
    other = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(folder=folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(
            CheckpointLockError,
            match=rf"in use by another run \(host '{socket.gethostname()}', "
            rf"pid {other.pid}, started ",
        ):
            make_trainer().fit(regression_task, epochs=1, verbose=0, checkpoint_dir=folder)
        assert sorted(os.listdir(folder)) == ["writer.lock"]  # nothing written
    finally:
        other.kill()
        other.wait()
        other.stdout.close()
    # a lock file of another machine is refused even when no process here holds it
    write_lock(folder, "another-host", 12345)
    with pytest.raises(CheckpointLockError, match="another machine.*'another-host'"):
        make_trainer().fit(regression_task, epochs=1, verbose=0, checkpoint_dir=folder)


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(tmp_path):
    folder = str(tmp_path / "ckpt")
    pid = dead_pid()
    write_lock(folder, socket.gethostname(), pid)
    with pytest.warns(CheckpointWarning, match=rf"taking over the lock .*pid {pid}"):
        make_trainer().fit(regression_task, epochs=1, verbose=0, checkpoint_dir=folder)
    assert not os.path.exists(os.path.join(folder, "writer.lock"))
    assert os.path.exists(os.path.join(folder, "ckpt-1.index"))


def test_lock_is_held_while_training(tmp_path):
    folder = str(tmp_path / "ckpt")
    seen = []
    probe = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: seen.append(
            json.loads(read_bytes(os.path.join(folder, "writer.lock")))
        )
    )
    make_trainer().fit(
        regression_task, epochs=1, verbose=0, checkpoint_dir=folder, callbacks=[probe]
    )
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert set(seen[0]) == {"host", "pid", "started"}


def test_another_seed_is_refused_unless_told_to_take_the_folder_over(half_run, tmp_path):
    folder = copy_of(half_run, tmp_path)
    before = sorted(os.listdir(folder))
    with pytest.raises(
        CheckpointError, match=r"another run: seed 0 -> 1.*take_over_checkpoint_dir"
    ):
        make_trainer(seed=1).fit(regression_task, epochs=4, verbose=0, checkpoint_dir=folder)
    assert sorted(os.listdir(folder)) == before

    fresh = make_trainer(seed=1)
    fresh.fit(regression_task, epochs=2, verbose=0)
    taker = make_trainer(seed=1)
    with pytest.warns(CheckpointWarning, match="moved to"):
        taker.fit(
            regression_task,
            epochs=2,
            verbose=0,
            checkpoint_dir=folder,
            take_over_checkpoint_dir=True,
        )
    assert_bit_equal(weights(taker), weights(fresh))  # a fresh run, not the old one resumed
    aside = [n for n in os.listdir(folder) if n.startswith("superseded-")]
    assert len(aside) == 1  # the first run's checkpoints are kept, byte for byte
    for name in before:
        assert read_bytes(os.path.join(folder, aside[0], name)) == read_bytes(
            os.path.join(half_run, name)
        )


# ----------------------------------------------------------------------------------------
# SIGTERM and SIGINT
PREEMPTED = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import keras
    from test_runs import make_trainer, regression_task

    class Mark(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if self.model.trainer.step.numpy() == 2:
                open({marker!r}, "w").close()
                time.sleep(3)  # the signal arrives during this meta step

    make_trainer().fit(regression_task, epochs=6, verbose=0, checkpoint_dir={folder!r},
                       checkpoint_every=100, callbacks=[Mark()])
    print("not reached")
""")


def test_sigterm_writes_a_checkpoint_and_resume_is_exact(tmp_path):
    folder, marker = str(tmp_path / "ckpt"), str(tmp_path / "marker")
    script = PREEMPTED.format(tests=os.path.join(REPO, "tests"), marker=marker, folder=folder)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not os.path.exists(marker) and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), child.communicate()
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGTERM, err[-2000:]  # the usual status
    assert "not reached" not in out
    # the interrupted meta step (2) finished and was checkpointed; no lock is left
    assert sorted(n for n in os.listdir(folder) if n.endswith(".index")) == ["ckpt-3.index"]
    assert not os.path.exists(os.path.join(folder, "writer.lock"))
    resumed = make_trainer()
    assert resumed.fit(regression_task, epochs=6, verbose=0, checkpoint_dir=folder).epoch == [
        3,
        4,
        5,
    ]
    uninterrupted = make_trainer()
    uninterrupted.fit(regression_task, epochs=6, verbose=0)
    assert_bit_equal(weights(resumed), weights(uninterrupted))


def test_sigint_finishes_the_step_writes_a_checkpoint_then_interrupts(tmp_path):
    folder = str(tmp_path / "ckpt")
    handler = signal.getsignal(signal.SIGINT)
    ctrl_c = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: (
            signal.raise_signal(signal.SIGINT) if trainer.step.numpy() == 1 else None
        )
    )
    trainer = make_trainer()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(
            regression_task,
            epochs=4,
            verbose=0,
            checkpoint_dir=folder,
            checkpoint_every=100,
            callbacks=[ctrl_c],
        )
    assert int(trainer.step.numpy()) == 2  # the step that was running finished
    assert os.path.exists(os.path.join(folder, "ckpt-2.index"))
    assert signal.getsignal(signal.SIGINT) is handler  # handlers put back
    assert not os.path.exists(os.path.join(folder, "writer.lock"))
    resumed = make_trainer()
    resumed.fit(regression_task, epochs=4, verbose=0, checkpoint_dir=folder)
    uninterrupted = make_trainer()
    uninterrupted.fit(regression_task, epochs=4, verbose=0)
    assert_bit_equal(weights(resumed), weights(uninterrupted))


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import keras
    import tensorflow as tf
    from test_runs import make_trainer, regression_task

    where = {where!r}
    if where == "saving":  # fault injection: killed after ckpt-3's files, before the state
        manager = tf.train.CheckpointManager
        record = manager._record_state

        def killed(self):
            if self.latest_checkpoint and self.latest_checkpoint.endswith("ckpt-3"):
                os.kill(os.getpid(), signal.SIGKILL)
            record(self)
        manager._record_state = killed

    class Kill(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if where == "stepping" and self.model.trainer.step.numpy() == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    make_trainer().fit(regression_task, epochs=6, verbose=0, checkpoint_dir={folder!r},
                       callbacks=[Kill()])
""")


@pytest.mark.parametrize("where", ["stepping", "saving"])
def test_sigkill_loses_no_saved_step_and_resume_is_exact(tmp_path, where):
    folder = str(tmp_path / "ckpt")
    script = KILLED.format(tests=os.path.join(REPO, "tests"), where=where, folder=folder)
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert os.path.exists(os.path.join(folder, "ckpt-3.index"))
    assert os.path.exists(os.path.join(folder, "writer.lock"))  # left by the killed run
    resumed = make_trainer()
    with pytest.warns(CheckpointWarning, match="taking over the lock of a run that has ended"):
        history = resumed.fit(regression_task, epochs=6, verbose=0, checkpoint_dir=folder)
    assert history.epoch == [3, 4, 5]  # nothing saved was lost: it resumes at step 3
    uninterrupted = make_trainer()
    uninterrupted.fit(regression_task, epochs=6, verbose=0)
    assert_bit_equal(weights(resumed), weights(uninterrupted))


def test_disk_full_while_checkpointing_is_an_error_and_earlier_checkpoints_stay(
    tmp_path, monkeypatch
):
    folder = str(tmp_path / "ckpt")
    save = warpkeras.trainers.loop.tf.train.CheckpointManager.save

    def full(self, checkpoint_number=None, **kw):
        if checkpoint_number == 3:
            os.makedirs(os.path.join(folder, "ckpt-3_temp"))  # what a failed write leaves
            raise OSError(28, "No space left on device")
        return save(self, checkpoint_number=checkpoint_number, **kw)

    monkeypatch.setattr(warpkeras.trainers.loop.tf.train.CheckpointManager, "save", full)
    with pytest.raises(OSError, match="No space left on device"):
        make_trainer().fit(regression_task, epochs=6, verbose=0, checkpoint_dir=folder)
    monkeypatch.undo()
    intact = {
        n: read_bytes(os.path.join(folder, n))
        for n in os.listdir(folder)
        if n.startswith("ckpt-") and not n.endswith("_temp")
    }
    assert sorted(n for n in intact if n.endswith(".index")) == ["ckpt-1.index", "ckpt-2.index"]
    assert not os.path.exists(os.path.join(folder, "writer.lock"))  # released on the error
    resumed = make_trainer()
    assert resumed.fit(
        regression_task, epochs=6, verbose=0, checkpoint_dir=folder, max_checkpoints=10
    ).epoch == [2, 3, 4, 5]
    assert not os.path.exists(os.path.join(folder, "ckpt-3_temp"))
    for name, data in intact.items():  # the earlier checkpoints, byte for byte
        assert read_bytes(os.path.join(folder, name)) == data
    uninterrupted = make_trainer()
    uninterrupted.fit(regression_task, epochs=6, verbose=0)
    assert_bit_equal(weights(resumed), weights(uninterrupted))


def test_a_signal_between_meta_steps_starts_no_other_step(tmp_path):
    folder = str(tmp_path / "ckpt")
    at_epoch_end = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: signal.raise_signal(signal.SIGINT) if e == 1 else None
    )
    trainer = make_trainer()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(
            regression_task,
            epochs=4,
            verbose=0,
            checkpoint_dir=folder,
            checkpoint_every=100,
            callbacks=[at_epoch_end],
        )
    assert int(trainer.step.numpy()) == 2
    assert sorted(n for n in os.listdir(folder) if n.endswith(".index")) == ["ckpt-2.index"]


def test_a_second_signal_abandons_the_step_at_once(tmp_path):
    folder = str(tmp_path / "ckpt")

    def twice(batch, logs):
        if trainer.step.numpy() == 1:
            signal.raise_signal(signal.SIGINT)  # finish the step...
            signal.raise_signal(signal.SIGINT)  # ...no: stop now

    trainer = make_trainer()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(
            regression_task,
            epochs=4,
            verbose=0,
            checkpoint_dir=folder,
            callbacks=[keras.callbacks.LambdaCallback(on_train_batch_begin=twice)],
        )
    assert int(trainer.step.numpy()) == 1  # the step was abandoned before it ran
    assert sorted(n for n in os.listdir(folder) if n.endswith(".index")) == ["ckpt-1.index"]
    assert not os.path.exists(os.path.join(folder, "writer.lock"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------------------
# streams that end, folders that are not what they should be
def test_a_generator_task_that_runs_out_names_the_task():
    def three_batches(rng):
        for _ in range(3):
            x = rng.normal(size=(10, 4)).astype("float32")
            yield x, x[:, :1]

    task = warpkeras.Task(
        train=three_batches, test=regression_task(np.random.default_rng(0)).test, name="short"
    )
    trainer = make_trainer()
    trainer.inner_steps = 5
    with pytest.raises(
        TaskDataExhaustedError,
        match=r"Task 'short': its train batches ran "
        r"out after 3 batch",
    ):
        trainer.fit([task], epochs=1, verbose=0)


def test_a_generator_task_that_runs_out_during_offline_warp_updates_names_the_task():
    """Offline warp updates read more batches after adaptation (one per stored point)."""

    def two_batches(rng):  # enough for 2 adaptation steps, not for 3 stored points
        for _ in range(2):
            x = rng.normal(size=(10, 4)).astype("float32")
            yield x, x[:, :1]

    task = warpkeras.Task(
        train=two_batches, test=regression_task(np.random.default_rng(0)).test, name="short"
    )
    trainer = warpkeras.WarpTrainer(
        make_model(),
        "mse",
        mode="offline",
        init_objective=None,
        inner_steps=2,
        meta_batch_size=1,
        meta_interval=1,
    )
    with pytest.raises(TaskDataExhaustedError, match="Task 'short': its (train|meta) batches"):
        trainer.fit([task], epochs=1, verbose=0)


def test_an_iterator_source_that_runs_dry_raises_or_warns_with_the_step():
    tasks = [regression_task(np.random.default_rng(i)) for i in range(3)]
    with pytest.raises(TasksExhaustedError, match="at meta step 3 of 10"):
        make_trainer().fit(iter(tasks), epochs=10, verbose=0)
    with pytest.warns(RuntimeWarning, match="at meta step 3 of 10"):
        history = make_trainer().fit(iter(tasks), epochs=10, verbose=0, stop_when_tasks_end=True)
    assert history.epoch == [0, 1, 2]


def test_every_listed_checkpoint_missing_is_named_and_a_fresh_start_needs_consent(
    half_run, tmp_path
):
    folder = copy_of(half_run, tmp_path)
    for name in os.listdir(folder):
        if name.startswith("ckpt-"):
            os.remove(os.path.join(folder, name))
    with pytest.warns(CheckpointWarning, match=r"lists .*ckpt-1'.*ckpt-2'"):
        with pytest.raises(CheckpointError, match="Every checkpoint listed"):
            make_trainer().fit(regression_task, epochs=4, verbose=0, checkpoint_dir=folder)
    assert sorted(os.listdir(folder)) == ["checkpoint"]
    trainer = make_trainer()
    with pytest.warns(CheckpointWarning) as caught:
        history = trainer.fit(
            regression_task,
            epochs=1,
            verbose=0,
            checkpoint_dir=folder,
            take_over_checkpoint_dir=True,
        )
    messages = [str(w.message) for w in caught]
    assert any("none of them is in the folder" in m for m in messages)
    assert any("Starting afresh" in m for m in messages)
    assert history.epoch == [0]
    aside = [n for n in os.listdir(folder) if n.startswith("superseded-")]
    assert os.listdir(os.path.join(folder, aside[0])) == ["checkpoint"]


def test_checkpoint_dir_naming_a_file_is_a_named_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="checkpoint_dir=.*notes.txt' is a file"):
        make_trainer().fit(regression_task, epochs=1, verbose=0, checkpoint_dir=str(path))
    with pytest.raises(NotADirectoryError, match="log_dir=.*notes.txt' is a file"):
        make_trainer().fit(regression_task, epochs=1, verbose=0, log_dir=path)
    assert path.read_text() == "keep me"


def test_cache_temporaries_of_killed_writers_are_removed(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    host = _cache._host()
    killed = folder / f".data.npz.{host}-{dead_pid()}-abc123.tmp"
    running = folder / f".data.npz.{host}-{os.getppid()}-def456.tmp"
    elsewhere = folder / f".data.npz.otherhost-{dead_pid()}-ghi789.tmp"
    legacy_old, legacy_new = folder / "tmpabc.npz.tmp", folder / "tmpdef.npz.tmp"
    for path in (killed, running, elsewhere, legacy_old, legacy_new):
        path.write_bytes(b"partial")
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    assert _cache.write_cache(folder / "data.npz", {"x": np.arange(3)})
    assert sorted(os.listdir(folder)) == sorted(
        [running.name, elsewhere.name, legacy_new.name, "data.npz"]
    )
    np.testing.assert_array_equal(
        _cache.read_cache(folder / "data.npz", lambda p: np.load(p)["x"]), np.arange(3)
    )


# ----------------------------------------------------------------------------------------
# steps_per_epoch
def test_steps_per_epoch_runs_epochs_times_steps_as_keras():
    events = []
    cb = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs: events.append(("epoch", e)),
        on_train_batch_end=lambda b, logs: events.append(("batch", b, logs["loss"])),
        on_epoch_end=lambda e, logs: events.append(("end", e, logs["loss"])),
    )
    trainer = make_trainer()
    history = trainer.fit(
        regression_task,
        epochs=2,
        steps_per_epoch=3,
        verbose=0,
        callbacks=[cb],
        validation_data=[regression_task(np.random.default_rng(9))],
        validation_freq=1,
    )
    assert int(trainer.step.numpy()) == 6
    assert history.params == {"verbose": 0, "epochs": 2, "steps": 3}
    assert history.epoch == [0, 1] and len(history.history["val_loss"]) == 2
    assert [e[:2] for e in events] == [
        ("epoch", 0),
        ("batch", 0),
        ("batch", 1),
        ("batch", 2),
        ("end", 0),
        ("epoch", 1),
        ("batch", 0),
        ("batch", 1),
        ("batch", 2),
        ("end", 1),
    ]
    per_step = make_trainer().fit(regression_task, epochs=6, verbose=0).history["loss"]
    # batch logs are running means since the epoch began; the epoch's is their last
    np.testing.assert_allclose(
        [e[2] for e in events if e[0] == "batch"],
        [
            per_step[0],
            np.mean(per_step[:2]),
            np.mean(per_step[:3]),
            per_step[3],
            np.mean(per_step[3:5]),
            np.mean(per_step[3:]),
        ],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        history.history["loss"], [np.mean(per_step[:3]), np.mean(per_step[3:])], rtol=1e-6
    )
    assert history.history["nan_tasks"] == [0, 0]
    # every meta step's own logs are kept as well
    assert history.steps == list(range(6)) and history.step_history["loss"] == per_step
    # the same meta steps as epochs=6 without steps_per_epoch
    same = make_trainer()
    same.fit(regression_task, epochs=6, verbose=0)
    assert_bit_equal(weights(trainer), weights(same))


def test_steps_per_epoch_prints_one_bar_per_epoch(capsys):
    make_trainer().fit(regression_task, epochs=2, steps_per_epoch=3, verbose=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0] == "Epoch 1/2" and lines[2] == "Epoch 2/2" and len(lines) == 4
    assert lines[1].startswith("3/3 - ") and "loss: " in lines[1]
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        make_trainer().fit(regression_task, epochs=2, steps_per_epoch=0)


def test_steps_per_epoch_resumes_mid_epoch_exactly(tmp_path):
    folder = str(tmp_path / "ckpt")

    with pytest.raises(RuntimeError, match="interrupted"):
        make_trainer().fit(
            regression_task,
            epochs=3,
            steps_per_epoch=3,
            verbose=0,
            checkpoint_dir=folder,
            callbacks=[Interrupt(step=4)],
        )
    batches = []
    resumed = make_trainer()
    history = resumed.fit(
        regression_task,
        epochs=3,
        steps_per_epoch=3,
        verbose=0,
        checkpoint_dir=folder,
        callbacks=[
            keras.callbacks.LambdaCallback(on_train_batch_begin=lambda b, logs: batches.append(b))
        ],
    )
    assert history.epoch == [1, 2] and batches == [1, 2, 0, 1, 2]
    uninterrupted = make_trainer()
    uninterrupted.fit(regression_task, epochs=3, steps_per_epoch=3, verbose=0)
    assert_bit_equal(weights(resumed), weights(uninterrupted))


def test_steps_per_epoch_tensorboard_writes_epochs_and_checkpoints_count_meta_steps(tmp_path):
    from test_fit_loop import _events

    folder = str(tmp_path / "ckpt")
    history = make_trainer().fit(
        regression_task,
        epochs=2,
        steps_per_epoch=3,
        verbose=0,
        log_dir=str(tmp_path / "tb"),
        checkpoint_dir=folder,
        checkpoint_every=2,
        max_checkpoints=10,
    )
    train = _events(str(tmp_path / "tb" / "train"))
    assert [s for s, _ in train["epoch_loss"]] == [0, 1]
    np.testing.assert_allclose(
        [v for _, v in train["epoch_loss"]], history.history["loss"], rtol=1e-6
    )
    assert sorted(n for n in os.listdir(folder) if n.endswith(".index")) == [
        "ckpt-2.index",
        "ckpt-4.index",
        "ckpt-6.index",
    ]


def test_backup_and_restore_with_save_freq_resumes_mid_epoch_exactly(tmp_path):
    backup = str(tmp_path / "backup")

    with pytest.raises(RuntimeError, match="interrupted"):
        make_trainer().fit(
            regression_task,
            epochs=3,
            steps_per_epoch=3,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=1), Interrupt(step=4)],
        )
    resumed = make_trainer(model=make_model(seed=5))  # other weights until restored
    history = resumed.fit(
        regression_task,
        epochs=3,
        steps_per_epoch=3,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup, save_freq=1)],
    )
    assert history.epoch == [1, 2] and history.steps == [4, 5, 6, 7, 8]
    uninterrupted = make_trainer()
    uninterrupted.fit(regression_task, epochs=3, steps_per_epoch=3, verbose=0)
    assert_bit_equal(weights(resumed), weights(uninterrupted))
