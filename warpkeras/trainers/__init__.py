"""Meta-training: WarpGrad, Leap, MAML, Reptile and baselines, as compositions of
meta-objectives (`warpkeras.meta`) run by one adaptation engine.

Modules, in import order: `warpkeras.meta` (the objectives) → `engine` (packing, the
compiled step, `parallel` executors) → `loop` (`fit`, callbacks, checkpoints) → `base`
(`MetaTrainer`) → the front-ends (`warp`, `leap`, `maml`, `reptile`, `finetune`).
"""

from warpkeras.meta import MAML, Leap, MetaObjective, Reptile, WarpObjective
from warpkeras.trainers.base import MetaTrainer, MetaTrainingError
from warpkeras.trainers.checks import TaskDataExhaustedError
from warpkeras.trainers.evaluation import summarize
from warpkeras.trainers.finetune import FineTuneTrainer, NoMetaTrainer
from warpkeras.trainers.leap import LeapTrainer
from warpkeras.trainers.loop import (
    CheckpointError,
    CheckpointLockError,
    CheckpointWarning,
    TasksExhaustedError,
)
from warpkeras.trainers.maml import MAMLTrainer
from warpkeras.trainers.reptile import ReptileTrainer
from warpkeras.trainers.warp import WarpTrainer

__all__ = [
    "MetaTrainer",
    "MetaTrainingError",
    "MetaObjective",
    "WarpObjective",
    "Leap",
    "MAML",
    "Reptile",
    "WarpTrainer",
    "LeapTrainer",
    "MAMLTrainer",
    "ReptileTrainer",
    "FineTuneTrainer",
    "NoMetaTrainer",
    "summarize",
    "CheckpointError",
    "CheckpointWarning",
    "CheckpointLockError",
    "TasksExhaustedError",
    "TaskDataExhaustedError",
]
