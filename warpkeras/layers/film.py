"""FiLM task embeddings, and the two-layer residual warp block that carries them.

A FiLM layer modulates features per channel, ``y = (1 + gamma) * x + beta``. Unlike the warp
layers, its ``gamma`` and ``beta`` are *task* variables: they adapt during task learning,
from zero, and act as task embeddings that condition the warp on the task at hand
(WarpGrad Appendix G, "TA"). Placed inside a warp block they show how roles nest: the
block's convolutions and batch norms are warp variables φ, the FiLM variables inside it are
task variables θ, because the innermost role wins (see `warpkeras.roles`).

The FiLM variables are ordinary task variables whose initial values are zero: the trainers
start every task from θ0, and θ0 for them is their initial value 0, so each task's
embedding starts at 0 (no modulation). When an initialisation objective (Leap, MAML,
Reptile) meta-learns θ0, it covers these variables like any other task variable.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from warpkeras.layers import _common
from warpkeras.layers.residual import ResidualWarpBlock


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class FiLM(keras.layers.Layer):
    """Task-adapted per-channel modulation ``y = (1 + gamma) * x + beta``, with ``gamma``
    and ``beta`` initialised at zero.

    At initialisation the layer is the identity. It is a **task** layer (class role
    ``"task"``): `warpkeras.partition` puts ``gamma`` and ``beta`` in θ even when the layer
    sits inside a warp layer such as `FiLMWarpBlock`. Trainers start each task from θ0,
    which for these variables is their initial value 0, so every task learns its own
    embedding from zero.

    Example:

    ```python
    import keras, numpy as np, warpkeras
    from warpkeras.layers import FiLM

    film = FiLM(name="film")
    x = np.random.rand(2, 4, 4, 8).astype("float32")
    np.testing.assert_allclose(film(x), x)      # identity at initialisation
    assert warpkeras.role_of(film) == "task"
    ```

    Args:
        axis: the channel axis (default -1, the last axis).
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    warpkeras_role = "task"

    def __init__(self, axis: int = -1, **kwargs) -> None:
        super().__init__(**_common.default_name(kwargs, "film"))
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"FiLM: `axis` must be an int, got {axis!r}.")
        self.axis = axis

    def build(self, input_shape):
        channels, self._broadcast = _common.channel_broadcast(self, input_shape, self.axis)
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="zeros")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")

    def call(self, inputs):
        gamma = ops.reshape(self.gamma, self._broadcast)
        beta = ops.reshape(self.beta, self._broadcast)
        return inputs * (1 + gamma) + beta

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(axis=self.axis)
        return config


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class FiLMWarpBlock(ResidualWarpBlock):
    """The two-layer residual convolutional warp with FiLM task embeddings between its two
    convolutions (WarpGrad Appendix G, "2-layer 3×3 conv + BN + Res + TA").

    ``y = relu(x + BN2(conv2(relu(FiLM(BN1(conv1(x)))))))``. The convolutions and batch
    norms are warp variables φ (meta-learned, frozen during task adaptation); the FiLM
    ``gamma``/``beta`` are task variables θ (adapted on each task from their initial value
    0, which is their θ0). At initialisation the block is the identity (after its output
    ReLU; see `ResidualWarpBlock`).

    Example:

    ```python
    import keras, numpy as np, warpkeras
    from warpkeras.layers import FiLMWarpBlock

    model = keras.Sequential([
        keras.Input((7, 7, 16)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        FiLMWarpBlock(hidden_filters=32),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5),
    ])
    p = warpkeras.partition(model)
    film = [v for v in p.task_variables if "film" in v.path]
    assert len(film) == 2                                  # gamma and beta adapt per task
    ```

    Args:
        kernel_size: odd spatial size of the convolutions (default 3).
        hidden_filters: output channels of the first convolution (the FiLM width); `None`
            uses the number of input channels.
        batch_norm: whether to batch-normalise after each convolution (default True).
        activation: activation between the convolutions and, if ``activate_output``, after
            the residual sum (default ``"relu"``).
        residual: whether to add the input to the branch (default True).
        activate_output: whether to apply ``activation`` after the residual sum (default
            True).
        kernel_initializer: initializer of the first convolution (default ``"he_normal"``).
        momentum: batch-norm momentum (default 0.99).
        epsilon: batch-norm epsilon (default 1e-3).
        data_format: ``"channels_last"`` or ``"channels_first"``; `None` uses
            `keras.config.image_data_format()`.
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int] = 3,
        hidden_filters: int | None = None,
        batch_norm: bool = True,
        activation: str | Callable | None = "relu",
        residual: bool = True,
        activate_output: bool = True,
        kernel_initializer: str | keras.initializers.Initializer | None = "he_normal",
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        data_format: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            num_layers=2,
            kernel_size=kernel_size,
            hidden_filters=hidden_filters,
            batch_norm=batch_norm,
            activation=activation,
            residual=residual,
            activate_output=activate_output,
            kernel_initializer=kernel_initializer,
            momentum=momentum,
            epsilon=epsilon,
            data_format=data_format,
            **_common.default_name(kwargs, "film_warp_block"),
        )

    def _make_modulation(self, index):
        return FiLM(axis=self._axis, dtype=self.dtype_policy, name="film")

    @property
    def film(self):
        """The FiLM task-embedding layer (available once the block is built)."""
        return self.modulations[0]

    def get_config(self):
        config = super().get_config()
        config.pop("num_layers")
        return config
