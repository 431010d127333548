"""Meta-objectives: each meta-learning algorithm as a small composable object.

A trainer adapts tasks and calls its objectives' hooks (see `MetaObjective`); combine
them in `warpkeras.trainers.MetaTrainer`, e.g. Warp-Leap::

    MetaTrainer(model, "mse", objectives=[WarpObjective("offline"), Leap()])

| objective         | paper                                                      |
|-------------------|------------------------------------------------------------|
| `WarpObjective`   | WarpGrad Eq. 3, Algorithms 1 (online), 2 (offline), 3 (continual) |
| `Leap`            | Leap Eq. 8 / WarpGrad Eq. 12 (pull-forward)                |
| `MAML`            | WarpGrad Eq. 1 (MAML, second or first order)               |
| `Reptile`         | Reptile (Nichol et al., 2018)                              |
"""

from warpkeras.meta.base import MetaObjective, MetaTrainingError, all_finite
from warpkeras.meta.leap import InitObjective, Leap
from warpkeras.meta.maml import MAML
from warpkeras.meta.reptile import Reptile
from warpkeras.meta.warp import WarpObjective

__all__ = [
    "MetaObjective",
    "MetaTrainingError",
    "InitObjective",
    "WarpObjective",
    "Leap",
    "MAML",
    "Reptile",
    "all_finite",
]
