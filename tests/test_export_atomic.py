"""Re-export replaces a SavedModel atomically, survives SIGKILL at every step, and writes
folders and files as Keras's own `model.export` does.

Each kill test runs one export in a subprocess that SIGKILLs itself at one step of
replacing the folder (`warpkeras.export._export_step`, or inside `tf.saved_model.save`),
then checks that the path holds a complete model, old or new as the step implies (or, in
the one window of systems without an atomic exchange, that `load` and the next export
recover the new model), and that the next export cleans up and succeeds.
"""

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras import export as wexport

KILL = textwrap.dedent(
    """
    import os, signal, sys
    import keras
    import tensorflow as tf
    import warpkeras
    from warpkeras import export as wexport

    path, step, exchange = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                              warpkeras.warp(keras.layers.Dense(3)), keras.layers.Dense(1)])

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if not exchange:
        wexport._RENAMEAT2 = None
    if step == "saving":  # the SavedModel written in full, the process killed before rename
        save = tf.saved_model.save
        def killed_save(*args, **kwargs):
            save(*args, **kwargs)
            die()
        tf.saved_model.save = killed_save
    else:
        wexport._export_step = lambda s: die() if s == step else None
    wexport.export_adaptive(model, path, loss="mse", steps=2, overwrite=True,
                            dtype_tolerant=False)
    print("NOT KILLED")
    """
)


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3),
            warpkeras.warp(keras.layers.Dense(3)),
            keras.layers.Dense(1),
        ]
    )


def _steps(path):
    """The default steps recorded in the SavedModel at `path` (loads it in full)."""
    served = tf.saved_model.load(str(path))
    x = tf.zeros((2, 4))
    assert served.signatures["serving_default"](x=x)["predictions"].shape == (2, 1)
    return int(served.metadata()["default_steps"])


@pytest.fixture(scope="module")
def first_export(tmp_path_factory):
    """An export with ``steps=1`` (the "old" model of every kill test)."""
    path = tmp_path_factory.mktemp("first") / "model"
    wexport.export_adaptive(_model(), str(path), loss="mse", steps=1, dtype_tolerant=False)
    return path


# (step killed at, atomic exchange available, default steps at `path` right after the
# kill: 1 = the old model, 2 = the new one, None = no folder there yet).
KILL_POINTS = [
    ("saving", True, 1),
    ("ready", True, 1),
    ("swapped", True, 2),
    ("removing_old", True, 2),
    ("aside", False, None),
    ("moved_in", False, 2),
]


@pytest.mark.parametrize(
    "step,exchange,after",
    KILL_POINTS,
    ids=[f"{s}-{'exchange' if e else 'rename'}" for s, e, _ in KILL_POINTS],
)
def test_sigkill_at_every_step_leaves_a_complete_model(
    tmp_path, first_export, step, exchange, after
):
    path = tmp_path / "model"
    shutil.copytree(first_export, path)
    proc = subprocess.run(
        [sys.executable, "-c", KILL, str(path), step, str(int(exchange))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "model")
    assert leftovers and all(n.startswith(".model.warpkeras-") for n in leftovers), leftovers
    if after is None:
        # Without an atomic exchange, the kill landed between moving the old model aside
        # and the new one in: `load` puts the (complete) new model back.
        assert not path.exists()
        with (
            pytest.warns(UserWarning, match="removed what an interrupted export"),
            pytest.warns(UserWarning, match="restored the new model"),
        ):
            served = wexport.load(str(path))
        assert int(served.metadata()["default_steps"]) == 2
        after = 2
    assert _steps(path) == after  # a complete SavedModel, old or new
    # The next export removes the leftovers (with a warning) and replaces the model.
    remaining = [p.name for p in tmp_path.iterdir() if p.name != "model"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wexport.export_adaptive(
            _model(), str(path), loss="mse", steps=3, overwrite=True, dtype_tolerant=False
        )
    told = [str(w.message) for w in caught if "interrupted export" in str(w.message)]
    assert len(told) == (1 if remaining else 0), told
    assert all(name in told[0] for name in remaining)
    assert _steps(path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_reader_always_sees_a_complete_model(tmp_path):
    """While one export replaces another, the path holds a SavedModel at every step."""
    path = tmp_path / "model"
    wexport.export_adaptive(_model(), str(path), loss="mse", steps=1, dtype_tolerant=False)
    seen = []
    original = wexport._export_step
    wexport._export_step = lambda step: seen.append(
        (step, (path / "saved_model.pb").exists(), (path / "variables").is_dir())
    )
    try:
        wexport.export_adaptive(
            _model(), str(path), loss="mse", steps=2, overwrite=True, dtype_tolerant=False
        )
    finally:
        wexport._export_step = original
    assert [s for s, _, _ in seen] == ["ready", "swapped", "removing_old"]
    assert all(pb and var for _, pb, var in seen), seen
    assert _steps(path) == 2


def test_recover_restores_the_previous_model_when_the_new_one_is_incomplete(tmp_path):
    path = tmp_path / "model"
    wexport.export_adaptive(_model(), str(path), loss="mse", steps=1, dtype_tolerant=False)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
    old = tmp_path / f".model.warpkeras-old-{host}-{dead}-00aa"
    path.rename(old)
    staging = tmp_path / f".model.warpkeras-staging-{host}-{dead}-00bb"
    (staging / "variables").mkdir(parents=True)  # killed while writing
    live = tmp_path / f".model.warpkeras-staging-{host}-{os.getpid()}-00cc"
    live.mkdir()  # a running export's folder is left alone
    with (
        pytest.warns(UserWarning, match="removed what an interrupted export"),
        pytest.warns(UserWarning, match="restored the previous model"),
    ):
        wexport.recover(str(path))
    assert _steps(path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name])


def test_load_without_a_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SavedModel"):
        wexport.load(str(tmp_path / "nothing"))


# Folders as tf.saved_model.save creates them (mode 0755 before the umask), files 0666.
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_modes_follow_the_umask_as_in_keras_export(tmp_path, umask):
    model = _model()
    old = os.umask(umask)
    try:
        model.export(str(tmp_path / "keras"), verbose=False)
        wexport.export_adaptive(model, str(tmp_path / "ours"), loss="mse", dtype_tolerant=False)
        wexport.export_adaptive(
            model, str(tmp_path / "ours"), loss="mse", overwrite=True, dtype_tolerant=False
        )
    finally:
        os.umask(old)

    def modes(root):
        out = {}
        for folder, _, files in os.walk(root):
            for p in [folder] + [os.path.join(folder, f) for f in files]:
                out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
        return out

    keras_modes, ours = modes(tmp_path / "keras"), modes(tmp_path / "ours")
    for name, mode in keras_modes.items():
        assert ours[name] == mode, (name, oct(ours[name]), oct(mode))
    assert ours["."] == 0o755 & ~umask
    assert ours["saved_model.pb"] == 0o666 & ~umask
    assert ours["assets.extra"] == ours["."]
    assert ours[os.path.join("assets.extra", wexport.METADATA_FILE)] == 0o666 & ~umask


def test_metadata_reads_back_as_python_values(tmp_path):
    path = tmp_path / "model"
    wexport.export_adaptive(
        _model(), str(path), loss="mse", steps=4, learning_rate=0.05, dtype_tolerant=False
    )
    meta = wexport.read_metadata(str(path))
    served = tf.saved_model.load(str(path)).metadata()
    assert set(meta) == set(served)
    assert meta["loss"] == "mse" and isinstance(meta["loss"], str)
    assert meta["default_steps"] == 4 and isinstance(meta["default_steps"], int)
    assert meta["learning_rate"] == pytest.approx(0.05)
    assert meta["training"] is False
    assert meta["inputs"][0]["shape"] == [None, 4]
    for key, tensor in served.items():
        value = tensor.numpy()
        if isinstance(value, bytes):
            value = value.decode()
            assert (value if isinstance(meta[key], str) else json.loads(value)) == meta[key]
        elif isinstance(meta[key], bool):
            assert value == int(meta[key]), key
        else:
            assert np.isclose(value, meta[key]), key


def test_url_export_is_complete_or_recovered(monkeypatch):
    """On a URL file system (here TensorFlow's ``ram://``), where folders are not renamed
    as a whole, the new model is copied in with ``saved_model.pb`` last; a copy cut short
    is redone from the complete staging folder."""
    fs = tf.io.gfile
    path = "ram://atomic/model"
    wexport.export_adaptive(_model(), path, loss="mse", steps=1, dtype_tolerant=False)
    wexport.export_adaptive(
        _model(), path, loss="mse", steps=2, dtype_tolerant=False, overwrite=True
    )
    assert _steps(path) == 2 and fs.listdir("ram://atomic") == ["model"]
    copy, copied = fs.copy, []

    def dies(src, dst, overwrite=False):
        if len(copied) == 2:
            raise SystemExit("killed")
        copied.append(dst)
        copy(src, dst, overwrite=overwrite)

    monkeypatch.setattr(tf.io.gfile, "copy", dies)
    with pytest.raises(SystemExit):
        wexport.export_adaptive(
            _model(), path, loss="mse", steps=3, dtype_tolerant=False, overwrite=True
        )
    monkeypatch.setattr(tf.io.gfile, "copy", copy)
    assert not fs.exists(path + "/saved_model.pb")  # not a SavedModel until complete
    assert len([n for n in fs.listdir("ram://atomic") if ".model.warpkeras-staging-" in n]) == 1
    monkeypatch.setattr(wexport, "_alive", lambda pid: False)  # as if the process had died
    with pytest.warns(UserWarning, match="copied the new model"):
        served = wexport.load(path)
    assert int(served.metadata()["default_steps"]) == 3
    assert fs.listdir("ram://atomic") == ["model"]


# --- the examples' result files and plots are replaced whole too --------------------------
def _examples_common():
    import importlib
    import pathlib

    folder = str(pathlib.Path(__file__).resolve().parent.parent / "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("_common")


def test_results_and_plots_replace_files_whole(tmp_path):
    common = _examples_common()
    path = tmp_path / "out" / "results.json"
    common.write_json(path, {"loss": 1.5})
    old = os.umask(0o027)
    try:

        def dies(f):
            f.write('{"loss": ')
            raise KeyboardInterrupt  # killed part-way through writing

        with pytest.raises(KeyboardInterrupt):
            common.replace_file(path, dies)
        assert json.loads(path.read_text()) == {"loss": 1.5}  # the earlier file, intact
        assert os.listdir(path.parent) == ["results.json"]
        common.write_json(path, {"loss": np.float32(0.5), "bad": float("nan")})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # 0o666 less the umask
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"loss": 0.5, "bad": None}
    plt = common.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = common.save_figure(fig, tmp_path / "out" / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(path.parent)) == ["plot.png", "results.json"]


def test_a_linked_export_folder_is_replaced_where_it_points(tmp_path):
    wexport.export_adaptive(
        _model(), str(tmp_path / "v1"), loss="mse", steps=1, dtype_tolerant=False
    )
    (tmp_path / "current").symlink_to("v1")
    wexport.export_adaptive(
        _model(),
        str(tmp_path / "current"),
        loss="mse",
        steps=2,
        overwrite=True,
        dtype_tolerant=False,
    )
    assert (tmp_path / "current").is_symlink()
    assert _steps(tmp_path / "v1") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]


def test_a_half_replaced_folder_is_refused_with_the_reason(tmp_path):
    """What the earlier remove-then-move re-export could leave: no saved_model.pb."""
    path = tmp_path / "model"
    (path / "variables").mkdir(parents=True)
    (path / "fingerprint.pb").write_bytes(b"\0")
    with pytest.raises(FileExistsError, match="except saved_model.pb") as info:
        wexport.export_adaptive(_model(), str(path), loss="mse", overwrite=True)
    assert "not a SavedModel" in str(info.value)
    assert sorted(p.name for p in path.iterdir()) == ["fingerprint.pb", "variables"]
