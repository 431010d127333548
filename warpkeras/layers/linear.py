"""Linear warp layers: an identity-initialised dense map and an identity-initialised
convolution.

A linear warp ω(x) = T x inserted after a task layer h(x) = W x preconditions the task
gradient by T Tᵀ (T-Nets; WarpGrad Sec. 2, Eq. 2). Both layers start as the identity, so
inserting them into a model does not change its function until the warp is meta-learned.
WarpGrad's default Omniglot warp is a 3×3 `WarpConv2D` after each convolutional block
(Appendix F).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from warpkeras.layers import _common


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class WarpDense(keras.layers.Layer):
    """A linear warp on the last axis, ``y = activation(x @ kernel + bias)``, initialised to
    the identity.

    The kernel starts as the identity matrix (``units`` defaults to the number of input
    features, giving a square map) and the bias at zero, so an untrained `WarpDense` passes
    its input through unchanged. The layer is a warp layer: `warpkeras.partition` puts its
    variables in φ.

    In Keras's row-vector layout a task layer ``x @ W`` followed by this warp computes
    ``x @ W @ T``; a gradient step on ``W`` then moves the effective map ``M = W @ T`` by
    ``-lr * ∇_M L @ (Tᵀ T)``: the warp preconditions task gradients (WarpGrad Eq. 2).

    Example:

    ```python
    import keras, numpy as np
    from warpkeras.layers import WarpDense

    x = np.random.rand(2, 4).astype("float32")
    np.testing.assert_allclose(WarpDense()(x), x, atol=1e-6)  # identity at initialisation

    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu"),  # task layer
        WarpDense(),                                # warp layer
        keras.layers.Dense(1),                      # task layer
    ])
    assert model(x).shape == (2, 1)
    ```

    Args:
        units: output features; `None` (default) uses the number of input features.
        activation: activation applied to the output; `None` (default) keeps the warp
            linear.
        use_bias: whether to add a bias (initialised at zero).
        kernel_initializer: `None` (default) for the identity, or any Keras initializer.
        bias_initializer: initializer of the bias (default ``"zeros"``).
        kernel_regularizer: optional regulariser of the kernel.
        bias_regularizer: optional regulariser of the bias.
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    warpkeras_role = "warp"

    def __init__(
        self,
        units: int | None = None,
        activation: str | Callable | None = None,
        use_bias: bool = True,
        kernel_initializer: str | keras.initializers.Initializer | None = None,
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        kernel_regularizer: str | keras.regularizers.Regularizer | None = None,
        bias_regularizer: str | keras.regularizers.Regularizer | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.units = _common.check_positive_int(type(self), "units", units, allow_none=True)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = _common.get_kernel_initializer(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

    def _output_units(self, input_shape):
        return self.units if self.units is not None else input_shape[-1]

    def build(self, input_shape):
        shape = _common.check_rank(self, input_shape, min_rank=2)
        features = _common.known_dim(self, shape, -1, "input features")
        units = self._output_units(shape)
        _common.add_kernel_and_bias(self, (features, units), units)
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: features})

    def call(self, inputs):
        outputs = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        shape = _common.check_rank(self, input_shape, min_rank=2)
        return shape[:-1] + (self._output_units(shape),)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
            kernel_initializer=_common.serialize_kernel_initializer(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        )
        return config


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class WarpConv2D(keras.layers.Layer):
    """A 2-D convolutional warp (stride 1, "same" padding), initialised to the identity.

    The kernel's centre tap starts as the identity matrix and every other tap at zero, so an
    untrained `WarpConv2D` copies its input (``filters`` defaults to the number of input
    channels). A 1×1 kernel is a per-pixel linear map of the channels; a 3×3 kernel (the
    default) is WarpGrad's Omniglot warp, inserted after each convolutional block
    (Appendix F). The layer is a warp layer: `warpkeras.partition` puts its variables in φ.

    Example:

    ```python
    import keras, numpy as np
    from warpkeras.layers import WarpConv2D

    warp = WarpConv2D(kernel_size=3)
    x = np.random.rand(2, 7, 7, 16).astype("float32")
    np.testing.assert_allclose(warp(x), x, atol=1e-6)   # identity at initialisation
    assert warp.kernel.shape == (3, 3, 16, 16)
    ```

    Args:
        filters: output channels; `None` (default) uses the number of input channels.
        kernel_size: odd int (or a pair of odd ints) giving the spatial size of the kernel;
            default 3.
        activation: activation applied to the output; `None` (default) keeps the warp
            linear.
        use_bias: whether to add a per-channel bias (initialised at zero).
        data_format: ``"channels_last"`` (inputs ``(batch, height, width, channels)``) or
            ``"channels_first"``; `None` uses `keras.config.image_data_format()`.
        kernel_initializer: `None` (default) for the identity, or any Keras initializer.
        bias_initializer: initializer of the bias (default ``"zeros"``).
        kernel_regularizer: optional regulariser of the kernel.
        bias_regularizer: optional regulariser of the bias.
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).

    Raises:
        ValueError: if ``kernel_size`` is even or not positive, or the input is not 4-D.
    """

    warpkeras_role = "warp"

    def __init__(
        self,
        filters: int | None = None,
        kernel_size: int | tuple[int, int] = 3,
        activation: str | Callable | None = None,
        use_bias: bool = True,
        data_format: str | None = None,
        kernel_initializer: str | keras.initializers.Initializer | None = None,
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        kernel_regularizer: str | keras.regularizers.Regularizer | None = None,
        bias_regularizer: str | keras.regularizers.Regularizer | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = _common.check_positive_int(type(self), "filters", filters, allow_none=True)
        self.kernel_size = _common.odd_kernel_size(type(self), kernel_size)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.data_format, self._channel_axis = _common.channel_axis_of(data_format)
        self.kernel_initializer = _common.get_kernel_initializer(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

    def _output_filters(self, input_shape):
        return self.filters if self.filters is not None else input_shape[self._channel_axis]

    def build(self, input_shape):
        shape = _common.check_rank(
            self, input_shape, rank=4, what=f"inputs ({_layout(self.data_format)})"
        )
        channels = _common.known_dim(self, shape, self._channel_axis, "input channels")
        filters = self._output_filters(shape)
        _common.add_kernel_and_bias(self, self.kernel_size + (channels, filters), filters)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={self._channel_axis: channels})

    def call(self, inputs):
        channels_first = self.data_format == "channels_first"
        if channels_first:
            # Convolve in NHWC, which every TensorFlow device supports (CPU kernels do not
            # implement NCHW).
            inputs = ops.transpose(inputs, (0, 2, 3, 1))
        outputs = ops.conv(
            inputs, self.kernel, strides=1, padding="same", data_format="channels_last"
        )
        if self.bias is not None:
            outputs = outputs + self.bias
        if self.activation is not None:
            outputs = self.activation(outputs)
        if channels_first:
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        return outputs

    def compute_output_shape(self, input_shape):
        shape = list(
            _common.check_rank(
                self, input_shape, rank=4, what=f"inputs ({_layout(self.data_format)})"
            )
        )
        shape[self._channel_axis] = self._output_filters(shape)
        return tuple(shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            activation=keras.activations.serialize(self.activation),
            use_bias=self.use_bias,
            data_format=self.data_format,
            kernel_initializer=_common.serialize_kernel_initializer(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer),
        )
        return config


def _layout(data_format):
    if data_format == "channels_last":
        return "batch, height, width, channels"
    return "batch, channels, height, width"
