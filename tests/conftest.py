import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")
# The tests run in several processes (pytest.ini: -n auto); on a GPU each takes only the
# memory it uses instead of all of it.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import warpkeras  # noqa: E402,F401  (first, as in user programs: it picks the CPU kernels)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The start of every serving-process script: a SavedModel must be served by TensorFlow
# alone, so the process refuses to import warpkeras even where it is installed.
NO_WARPKERAS = """\
import importlib.abc
import sys


class _NoWarpkeras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "warpkeras" or name.startswith("warpkeras."):
            raise ImportError("warpkeras is not available in this process")
        return None


sys.meta_path.insert(0, _NoWarpkeras())
"""
SHARED_OMNIGLOT = os.path.join(os.path.dirname(REPO), "shared", "data", "omniglot")


MAX_WORKERS = 8  # beyond this, the longest module (one process each) bounds the time


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pytest.ini): one test process per usable CPU, at most `MAX_WORKERS`.

    Each module runs in one process (``--dist loadfile``), so a run of one module (``pytest
    tests/test_x.py -k name``) gains nothing from more: it runs in this process (0 workers)
    and does not pay for starting others. ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still sets the
    number, as in pytest-xdist.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # pytest-xdist's own hook reads it
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    modules = set()
    for arg in config.args:
        path = config.invocation_params.dir / arg.split("::", 1)[0]
        if path.is_dir():
            modules = None  # a folder: as many modules as there are processes
            break
        modules.add(path)
    workers = min(cpus or 1, MAX_WORKERS, len(modules) if modules is not None else MAX_WORKERS)
    return workers if workers > 1 else 0


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


@pytest.fixture
def float64():
    # Keras caches the global dtype policy the first time a layer asks for it, so the
    # policy is switched along with floatx (and both are restored).
    old_floatx, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(old_floatx)
    keras.config.set_dtype_policy(old_policy)


def linear_warp_model():
    """x (4 features) -> linear warp (identity at init, φ) -> linear head (zeros, θ)."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            warpkeras.warp(
                keras.layers.Dense(4, use_bias=False, kernel_initializer="identity", name="warp")
            ),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", name="task"),
        ]
    )


def plain_model():
    """x (4 features) -> a linear head with bias (θ); no warp layers."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="task")])


def tanh_regression_task(rng, n=40):
    """A 3 → 2 regression task y = tanh(x W), `n` points, batches of 8."""
    w = rng.normal(size=(3, 2)).astype("float32")
    x = rng.normal(size=(n, 3)).astype("float32")
    return warpkeras.Task(train=(x, np.tanh(x @ w)), batch_size=8)


def small_warp_model(hidden=6):
    """Dense(hidden, tanh) → WarpDense(tanh) → Dense(2) on 3 inputs, seeded."""
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(hidden, activation="tanh"),
            warpkeras.layers.WarpDense(activation="tanh"),
            keras.layers.Dense(2),
        ]
    )


def assert_lists_close(a, b, rtol=1e-6, atol=1e-8):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
