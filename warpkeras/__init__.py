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
    """
    if "tensorflow" in _sys.modules or "TF_ENABLE_ONEDNN_OPTS" in _os.environ:
        return
    if _platform.machine().lower() in ("x86_64", "amd64"):
        _os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"


_prefer_onednn()

import keras as _keras  # noqa: E402

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "warpkeras needs the TensorFlow backend of Keras 3 (KERAS_BACKEND=tensorflow); "
        f"the active backend is {_keras.backend.backend()!r}."
    )

from warpkeras.roles import RoleError, role_of, tag, task, untag, warp  # noqa: E402
from warpkeras.partition import Partition, partition  # noqa: E402
from warpkeras import objectives  # noqa: E402
from warpkeras import layers  # noqa: E402
from warpkeras.tasks import Task, TaskSampler, as_task  # noqa: E402
from warpkeras import data  # noqa: E402
from warpkeras import envs  # noqa: E402
from warpkeras.buffer import ReplayBuffer  # noqa: E402
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
from warpkeras import callbacks, export, optimizers  # noqa: E402
from warpkeras.callbacks import LeapCallback  # noqa: E402
from warpkeras.export import export_adaptive  # noqa: E402
from warpkeras.optimizers import WarpGrad  # noqa: E402
