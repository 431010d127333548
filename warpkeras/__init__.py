"""warpkeras: meta-learned optimisers by gradient warping (WarpGrad) and meta-learned
initialisations (Leap, MAML, Reptile) for TensorFlow / Keras 3.

Start with `warpkeras.warp` / `warpkeras.task` to tag layers, `warpkeras.partition` to see a
model as a function of task and warp parameters, and `warpkeras.objectives` for the papers'
meta-objectives as pure functions.
"""

__version__ = "0.1.0"

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

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
