"""Batch normalisation with exact second-order gradients.

WarpGrad's exact meta-objective (Eq. 3) and second-order MAML differentiate through a
task-gradient step, so they need second derivatives of the model. TensorFlow's
`tf.nn.moments`, which Keras' TensorFlow backend uses for the batch statistics of
`keras.layers.BatchNormalization`, `LayerNormalization` and `GroupNormalization`, stops the
gradient through the mean inside the variance: first derivatives are exact (that term is
zero) but second derivatives are not (meta-gradients come out 1-8 % off). Every model call
made through a `warpkeras.Partition` (all trainers, objectives and exports) therefore runs
under `warpkeras.partition.exact_moments`, which computes the same statistics with every
derivative kept, so the stock layers are exact there.

`ExactBatchNormalization` is exact by construction, also when the model is called outside
warpkeras (e.g. your own `tf.GradientTape` code around ``model(x, training=True)``). On
4-D channels-last inputs it runs TensorFlow's fused kernel (``FusedBatchNormV3``), whose
registered gradient of the gradient (``FusedBatchNormGradV3``'s) is built from
differentiable operations and gives the second derivatives of batch norm (they agree with
the decomposed formula to float32 rounding, `tests/test_fused_batch_norm.py`); that is the
order every warpkeras objective needs. ``fused=False`` computes the formula itself,
exactly differentiable to any order.
"""

import keras
from keras import ops

from warpkeras.layers import _common

# dtypes TensorFlow's fused kernel takes (float64 has none)
_FUSED_DTYPES = ("float16", "bfloat16", "float32")


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class ExactBatchNormalization(keras.layers.Layer):
    """Batch normalisation whose batch statistics are exactly differentiable (to second
    order on the fused kernel, to any order with ``fused=False``).

    Computes ``gamma * (x - mean) / sqrt(var + epsilon) + beta`` per channel, with the batch
    mean and (biased) variance in training mode and the moving statistics otherwise — the
    same function, variables (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``) and
    moving-average update as `keras.layers.BatchNormalization` (without masking, renorm or
    cross-replica statistics). Inside warpkeras the stock Keras layer is exact as well (see
    the module documentation); this layer is exact in any code that differentiates twice.

    The layer has no role of its own: inside a warp block (e.g. `ResidualWarpBlock`, which
    uses it) its ``gamma`` and ``beta`` are warp variables, in a task layer stack they are
    task variables. Moving statistics are non-trainable state. As with the Keras layer, a
    layer with ``trainable=False`` uses its moving statistics even in training mode.

    Example:

    ```python
    import numpy as np
    from warpkeras.layers import ExactBatchNormalization

    bn = ExactBatchNormalization(momentum=0.9)
    x = np.random.randn(8, 5, 5, 3).astype("float32")
    y = bn(x, training=True)
    np.testing.assert_allclose(np.mean(y, axis=(0, 1, 2)), 0, atol=1e-5)
    assert bn.moving_mean.shape == (3,)
    ```

    Args:
        axis: the channel axis (default -1).
        momentum: momentum of the moving averages (default 0.99).
        epsilon: added to the variance (default 1e-3).
        center: whether to learn the offset ``beta`` (default True).
        scale: whether to learn the scale ``gamma`` (default True).
        beta_initializer: initializer of ``beta`` (default ``"zeros"``).
        gamma_initializer: initializer of ``gamma`` (default ``"ones"``).
        moving_mean_initializer: default ``"zeros"``.
        moving_variance_initializer: default ``"ones"``.
        fused: `None` (default): in training mode, use TensorFlow's fused batch-norm kernel
            where it applies (TensorFlow backend, 4-D input with the channels last,
            float16/bfloat16/float32 compute dtype; about 0.9x the time of the decomposed
            formula in a step of the papers' Omniglot network, `bench/README.md`), the
            decomposed formula elsewhere; `False`: always the decomposed formula. Values,
            moving statistics and derivatives of first and second order are the same to
            float rounding; third derivatives are exact only with `False` (TensorFlow's
            second derivative of the kernel stops the gradient through the mean inside
            the variance).
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).

    Raises:
        ValueError: `axis` is not an int, `momentum` is outside [0, 1], or `fused` is
            neither None nor False.
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        fused=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if fused not in (None, False):
            raise ValueError(
                f"ExactBatchNormalization: `fused` must be None (automatic: the fused "
                f"kernel wherever it applies) or False (the formula), got {fused!r}."
            )
        self.fused = fused
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"ExactBatchNormalization: `axis` must be an int, got {axis!r}.")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(
                f"ExactBatchNormalization: `momentum` must be in [0, 1], got {momentum!r}."
            )
        self.axis = axis
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)

    def build(self, input_shape):
        channels, self._broadcast = _common.channel_broadcast(self, input_shape, self.axis)
        rank = len(input_shape)
        channel_axis = self.axis % rank
        self._reduction_axes = tuple(i for i in range(rank) if i != channel_axis)
        self.gamma = self.beta = None
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma", shape=(channels,), initializer=self.gamma_initializer
            )
        if self.center:
            self.beta = self.add_weight(
                name="beta", shape=(channels,), initializer=self.beta_initializer
            )
        self.moving_mean = self.add_weight(
            name="moving_mean",
            shape=(channels,),
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            name="moving_variance",
            shape=(channels,),
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )

    def call(self, inputs, training=None):
        compute_dtype = inputs.dtype
        low_precision = keras.backend.standardize_dtype(compute_dtype) in (
            "float16",
            "bfloat16",
        )
        if training and self.trainable and self._fused_applies(inputs):
            # float16/bfloat16 inputs go in as they are: the kernel keeps its statistics
            # and scale/offset in float32
            return self._fused_training_call(inputs)
        x = ops.cast(inputs, "float32") if low_precision else inputs
        if training and self.trainable:
            mean = ops.mean(x, axis=self._reduction_axes, keepdims=True)
            # E[(x - mean)^2] with the gradient through the mean kept: its first-order
            # contribution is zero, but it is needed for exact second derivatives.
            variance = ops.mean(ops.square(x - mean), axis=self._reduction_axes, keepdims=True)
            self._update_moving_statistics(ops.reshape(mean, (-1,)), ops.reshape(variance, (-1,)))
        else:
            mean = ops.reshape(ops.cast(self.moving_mean, x.dtype), self._broadcast)
            variance = ops.reshape(ops.cast(self.moving_variance, x.dtype), self._broadcast)
        outputs = (x - mean) * ops.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            outputs = outputs * ops.reshape(ops.cast(self.gamma, x.dtype), self._broadcast)
        if self.beta is not None:
            outputs = outputs + ops.reshape(ops.cast(self.beta, x.dtype), self._broadcast)
        return ops.cast(outputs, compute_dtype)

    def _fused_applies(self, x):
        return (
            self.fused is None
            and keras.backend.backend() == "tensorflow"
            and len(x.shape) == 4
            and self.axis % 4 == 3
            and keras.backend.standardize_dtype(x.dtype) in _FUSED_DTYPES
        )

    def _fused_training_call(self, x):
        """Training mode on TensorFlow's ``FusedBatchNormV3`` (NHWC)."""
        import tensorflow as tf

        channels = x.shape[-1]
        # the kernel takes scale and offset in float32 for every input dtype it accepts
        gamma = (
            ops.cast(self.gamma, "float32")
            if self.gamma is not None
            else tf.ones([channels], tf.float32)
        )
        beta = (
            ops.cast(self.beta, "float32")
            if self.beta is not None
            else tf.zeros([channels], tf.float32)
        )
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, is_training=True
        )
        # The kernel returns the Bessel-corrected variance; the moving average takes the
        # biased one, as the decomposed formula and keras.layers.BatchNormalization do.
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), variance.dtype)
        self._update_moving_statistics(mean, variance * (n - 1.0) / tf.maximum(n, 1.0))
        return outputs

    def _update_moving_statistics(self, mean, variance):
        """Moving averages with this batch's per-channel mean and biased variance."""
        m = self.momentum
        self.moving_mean.assign(
            self.moving_mean * m + ops.cast(mean, self.moving_mean.dtype) * (1 - m)
        )
        self.moving_variance.assign(
            self.moving_variance * m + ops.cast(variance, self.moving_variance.dtype) * (1 - m)
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            center=self.center,
            scale=self.scale,
            beta_initializer=keras.initializers.serialize(self.beta_initializer),
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
            moving_mean_initializer=keras.initializers.serialize(self.moving_mean_initializer),
            moving_variance_initializer=keras.initializers.serialize(
                self.moving_variance_initializer
            ),
            fused=self.fused,
        )
        return config
