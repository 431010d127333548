"""warpkeras: meta-learned optimisers by gradient warping (WarpGrad) and meta-learned
initialisations (Leap, MAML, Reptile) for TensorFlow / Keras 3.

Start with `warpkeras.warp` / `warpkeras.task` to tag layers, `warpkeras.partition` to see a
model as a function of task and warp parameters, and `warpkeras.objectives` for the papers'
meta-objectives as pure functions.
"""

__version__ = "0.1.0"

import os as _os
import platform as _platform
import sys as _sys

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _prefer_onednn():
    """Turn on TensorFlow's oneDNN kernels on x86 CPUs unless the user decided otherwise.

    TensorFlow enables them by default only on CPUs with AVX-512. On AVX2 CPUs they run the
    convolutions of the papers' models about 1.4x faster (``bench/inner_step.py --onednn``).
    The switch is read when TensorFlow loads, so this only acts when warpkeras is imported
    before TensorFlow; an explicit ``TF_ENABLE_ONEDNN_OPTS`` (``0`` or ``1``) always wins.

    The variable is inherited by child processes; ``WARPKERAS_SET_ONEDNN=1`` is set beside
    it so that a warpkeras imported there knows the choice was warpkeras's, not the user's.

    Returns:
        True when warpkeras (here or in a parent process) set the variable, so that the
        notice TensorFlow prints about it is warpkeras's doing.
    """
    if "tensorflow" in _sys.modules:
        return False
    if "TF_ENABLE_ONEDNN_OPTS" in _os.environ:
        return (
            _os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
            and _os.environ.get("WARPKERAS_SET_ONEDNN") == "1"
        )
    if _platform.machine().lower() in ("x86_64", "amd64"):
        _os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
        _os.environ["WARPKERAS_SET_ONEDNN"] = "1"
        return True
    return False


# The lines TensorFlow writes when oneDNN is on: absl's pre-initialisation banner, then the
# notice itself (from `tensorflow/core/util/port.cc`).
_ABSL_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called"
_ONEDNN_NOTICE = b"oneDNN custom operations are on"


def _drop_onednn_notice(text):
    """`text` (bytes written to stderr) without the oneDNN notice lines and their banner."""
    lines = text.splitlines(keepends=True)
    kept = []
    for i, line in enumerate(lines):
        if _ONEDNN_NOTICE in line:
            continue
        following = lines[i + 1] if i + 1 < len(lines) else b""
        if _ABSL_BANNER in line and (not following or _ONEDNN_NOTICE in following):
            continue
        kept.append(line)
    return b"".join(kept)


def _import_keras(quiet_onednn):
    """Imports Keras (and with it TensorFlow), dropping the oneDNN notice warpkeras causes.

    When `_prefer_onednn` turned oneDNN on, TensorFlow prints "oneDNN custom operations are
    on ..." at load time, twice: `port.cc` is compiled into both
    ``libtensorflow_framework.so.2`` and the profiler plugin ``_pywrap_profiler_plugin.so``,
    each with its own print-once flag. It is written before absl logging is initialised, so
    ``TF_CPP_MIN_LOG_LEVEL`` does not silence it. Since the notice only reports a choice
    warpkeras made (and documents), the import runs with file descriptor 2 redirected to a
    temporary file, and everything written there is then copied back to stderr except those
    notice lines. Warnings and errors are therefore kept, in order; only a crash of the
    process inside ``import tensorflow`` would lose them (set ``TF_ENABLE_ONEDNN_OPTS``
    yourself, to ``1`` or ``0``, and warpkeras neither sets it nor touches stderr).
    ``TF_CPP_MIN_LOG_LEVEL`` is left alone: raising it would also hide the user's own
    TensorFlow warnings.
    """
    if not quiet_onednn:
        import keras

        return keras
    import tempfile

    try:
        _sys.stderr.flush()
        saved = _os.dup(2)
    except (OSError, ValueError, AttributeError):
        import keras

        return keras
    with tempfile.TemporaryFile() as captured:
        _os.dup2(captured.fileno(), 2)
        try:
            import keras
        finally:
            try:
                _sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass
            _os.dup2(saved, 2)
            _os.close(saved)
            captured.seek(0)
            text = _drop_onednn_notice(captured.read())
            if text:
                _os.write(2, text)
    return keras


_keras = _import_keras(quiet_onednn=_prefer_onednn())

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "warpkeras needs the TensorFlow backend of Keras 3 (KERAS_BACKEND=tensorflow); "
        f"the active backend is {_keras.backend.backend()!r}."
    )

from warpkeras import (  # noqa: E402  # noqa: E402
    callbacks,
    data,  # noqa: E402
    export,
    layers,  # noqa: E402
    meta,  # noqa: E402
    objectives,
    optimizers,
    rules,
)
from warpkeras.buffer import ReplayBuffer  # noqa: E402
from warpkeras.callbacks import LeapCallback  # noqa: E402
from warpkeras.export import adapt, export_adaptive, task_parameter_names  # noqa: E402
from warpkeras.kfac import KFAC  # noqa: E402
from warpkeras.meta import MetaObjective  # noqa: E402
from warpkeras.optimizers import WarpGrad  # noqa: E402
from warpkeras.partition import Partition, partition  # noqa: E402
from warpkeras.roles import RoleError, role_of, tag, task, untag, warp  # noqa: E402
from warpkeras.tasks import Task, TaskSampler, as_task  # noqa: E402
from warpkeras.trainers import (  # noqa: E402
    FineTuneTrainer,
    LeapTrainer,
    MAMLTrainer,
    MetaTrainer,
    MetaTrainingError,
    NoMetaTrainer,
    ReptileTrainer,
    WarpTrainer,
)

__all__ = [
    "FineTuneTrainer",
    "KFAC",
    "LeapCallback",
    "LeapTrainer",
    "MAMLTrainer",
    "MetaObjective",
    "MetaTrainer",
    "MetaTrainingError",
    "NoMetaTrainer",
    "Partition",
    "ReplayBuffer",
    "ReptileTrainer",
    "RoleError",
    "Task",
    "TaskSampler",
    "WarpGrad",
    "WarpTrainer",
    "adapt",
    "as_task",
    "callbacks",
    "data",
    "export",
    "export_adaptive",
    "layers",
    "meta",
    "objectives",
    "optimizers",
    "partition",
    "role_of",
    "rules",
    "tag",
    "task",
    "task_parameter_names",
    "untag",
    "warp",
]


def __getattr__(name):
    """Loads `warpkeras.envs` on first use, so that ``import warpkeras`` does not import
    gymnasium (``pip install "warpkeras[rl]"``)."""
    if name == "envs":
        import importlib

        return importlib.import_module("warpkeras.envs")
    raise AttributeError(f"module 'warpkeras' has no attribute {name!r}")
