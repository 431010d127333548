"""Channel-wise scaling warp: a meta-learned per-channel affine map."""

from __future__ import annotations

import keras
from keras import ops

from warpkeras.layers import _common


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class ChannelScaling(keras.layers.Layer):
    """A per-channel affine warp ``y = gamma * x + beta``, initialised to the identity.

    ``gamma`` starts at 1 and ``beta`` at 0, so an untrained `ChannelScaling` passes its
    input through unchanged. This is the "Scaling" warp of WarpGrad's Omniglot ablation
    (Appendix G), a FiLM-like modulation whose parameters are meta-learned and shared by all
    tasks: its Jacobian is ``diag(gamma)``, so it preconditions the preceding task layer's
    gradients by ``diag(gamma)**2``. The layer is a warp layer: `warpkeras.partition` puts
    its variables in φ. (For a task-adapted modulation see `warpkeras.layers.FiLM`.)

    Example:

    ```python
    import numpy as np
    from warpkeras.layers import ChannelScaling

    warp = ChannelScaling()
    x = np.random.rand(2, 5, 5, 8).astype("float32")
    np.testing.assert_allclose(warp(x), x)          # identity at initialisation
    assert warp.gamma.shape == (8,) and warp.beta.shape == (8,)
    ```

    Args:
        axis: the channel axis (default -1, the last axis).
        use_bias: whether to learn the offset ``beta`` (default True).
        gamma_initializer: initializer of the scale (default ``"ones"``).
        beta_initializer: initializer of the offset (default ``"zeros"``).
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    warpkeras_role = "warp"

    def __init__(
        self,
        axis: int = -1,
        use_bias: bool = True,
        gamma_initializer: str | keras.initializers.Initializer = "ones",
        beta_initializer: str | keras.initializers.Initializer = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"ChannelScaling: `axis` must be an int, got {axis!r}.")
        self.axis = axis
        self.use_bias = bool(use_bias)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)

    def build(self, input_shape):
        channels, self._broadcast = _common.channel_broadcast(self, input_shape, self.axis)
        self.gamma = self.add_weight(
            name="gamma", shape=(channels,), initializer=self.gamma_initializer
        )
        if self.use_bias:
            self.beta = self.add_weight(
                name="beta", shape=(channels,), initializer=self.beta_initializer
            )
        else:
            self.beta = None

    def call(self, inputs):
        outputs = inputs * ops.reshape(self.gamma, self._broadcast)
        if self.beta is not None:
            outputs = outputs + ops.reshape(self.beta, self._broadcast)
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            axis=self.axis,
            use_bias=self.use_bias,
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
            beta_initializer=keras.initializers.serialize(self.beta_initializer),
        )
        return config
