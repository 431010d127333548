"""Meta-training: WarpGrad, Leap, MAML, Reptile and baselines, as one composable engine."""

from warpkeras.trainers.base import MetaTrainer, MetaTrainingError, summarize
from warpkeras.trainers.finetune import FineTuneTrainer, NoMetaTrainer
from warpkeras.trainers.leap import LeapTrainer
from warpkeras.trainers.loop import CheckpointError, CheckpointWarning
from warpkeras.trainers.maml import MAMLTrainer
from warpkeras.trainers.reptile import ReptileTrainer
from warpkeras.trainers.warp import WarpTrainer

__all__ = [
    "MetaTrainer",
    "MetaTrainingError",
    "WarpTrainer",
    "LeapTrainer",
    "MAMLTrainer",
    "ReptileTrainer",
    "FineTuneTrainer",
    "NoMetaTrainer",
    "summarize",
    "CheckpointError",
    "CheckpointWarning",
]
