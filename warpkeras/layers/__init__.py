"""Ready-made warp layers (and the task layers that go with them).

Every layer here declares its role (see `warpkeras.roles`), is identity-initialised where
that makes sense — inserting an untrained warp does not change the model's function — and
saves with the model (`model.save("m.keras")` / `keras.models.load_model`).

Linear warps (`linear`):
    `WarpDense`, `WarpConv2D` — identity-initialised dense / convolutional maps (T-Nets
    style preconditioning; a 3×3 `WarpConv2D` is WarpGrad's Omniglot warp).
Channel-wise scaling (`scaling`):
    `ChannelScaling` — meta-learned per-channel ``gamma * x + beta``.
Residual warps (`residual`):
    `ResidualWarpBlock` — conv + BN (+ ReLU) blocks with a residual connection;
    `ResidualWarpDense` — the feed-forward version for vector features.
FiLM task embeddings (`film`):
    `FiLM` — a *task* layer ``(1 + gamma) * x + beta`` adapted from zero on each task;
    `FiLMWarpBlock` — the two-layer residual warp block with FiLM between its convolutions.
Normalisation (`normalization`):
    `ExactBatchNormalization` — batch norm with exact second-order gradients in training
    mode (used by the residual warp blocks; a drop-in for task layers too).
Recurrent warps (`recurrent`):
    `WarpRNNCell` — meta-LSTM hypernetwork modulating a task RNN (WarpGrad Eq. 15);
    `LinearWarpRNNCell` — T-Nets-style linear RNN warp;
    `TaskRNNCell` — the plain task RNN they warp.
"""

from warpkeras.layers.film import FiLM, FiLMWarpBlock
from warpkeras.layers.linear import WarpConv2D, WarpDense
from warpkeras.layers.normalization import ExactBatchNormalization
from warpkeras.layers.recurrent import LinearWarpRNNCell, TaskRNNCell, WarpRNNCell
from warpkeras.layers.residual import ResidualWarpBlock, ResidualWarpDense
from warpkeras.layers.scaling import ChannelScaling

__all__ = [
    "ChannelScaling",
    "ExactBatchNormalization",
    "FiLM",
    "FiLMWarpBlock",
    "LinearWarpRNNCell",
    "ResidualWarpBlock",
    "ResidualWarpDense",
    "TaskRNNCell",
    "WarpConv2D",
    "WarpDense",
    "WarpRNNCell",
]
