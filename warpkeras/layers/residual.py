"""Residual warp blocks: non-linear warps that start as the identity.

A residual warp computes ``y = x + f(x)`` with a small network ``f`` (one or more linear
maps, optionally batch-normalised, with activations between them). Non-linear warps go
beyond the block-diagonal preconditioning of linear warps; in WarpGrad's Omniglot ablation
(Appendix G) "3×3 conv + BN + Res + ReLU" and a two-layer version (128 then 64 filters) are
the strongest warps, and the continual-learning experiment (Appendix K) follows each hidden
layer of the task learner with a two-layer tanh feed-forward residual warp of 100 units.

The last linear map of ``f`` (or, with batch normalisation, the last batch-norm scale)
starts at zero, so ``f(x) = 0`` and an untrained block is the identity (ahead of its
optional output activation, which is the identity on inputs it fixes, e.g. ReLU on
non-negative inputs). Every trainable variable of a block, batch-norm scales and offsets
included, is a warp variable; batch-norm moving statistics are non-trainable state. Batch
normalisation is `ExactBatchNormalization`, so meta-gradients through task-gradient steps
are exact in training mode too.
"""

import keras

from warpkeras.layers import _common
from warpkeras.layers.linear import WarpConv2D, WarpDense
from warpkeras.layers.normalization import ExactBatchNormalization


class _ResidualWarpBase(keras.layers.Layer):
    """The shared structure of the residual warp blocks (not public).

    Hidden layer i: linear → [batch norm] → [modulation] → activation.
    Last layer: linear → [batch norm].
    Output: ``x + branch`` (or ``branch`` when ``residual=False``), then the activation if
    ``activate_output``.
    """

    warpkeras_role = "warp"
    _hidden_name = "hidden"

    def __init__(
        self,
        num_layers,
        hidden,
        batch_norm,
        activation,
        residual,
        activate_output,
        kernel_initializer,
        momentum,
        epsilon,
        **kwargs,
    ):
        super().__init__(**kwargs)
        cls = type(self)
        self.num_layers = _common.check_positive_int(cls, "num_layers", num_layers)
        self._hidden = _common.check_positive_int(cls, self._hidden_name, hidden, allow_none=True)
        if self._hidden is not None and self.num_layers == 1:
            raise ValueError(
                f"{cls.__name__}: `{self._hidden_name}={hidden}` has no effect with "
                "num_layers=1 (a one-layer block has no hidden layer); use num_layers >= 2 "
                f"or leave `{self._hidden_name}` as None."
            )
        self.batch_norm = bool(batch_norm)
        self.activation = keras.activations.get(activation)
        self.residual = bool(residual)
        self.activate_output = bool(activate_output)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)

    # -- hooks of the concrete blocks ------------------------------------------------------
    def _channel_axis_index(self):
        return -1

    def _check_input(self, input_shape):
        raise NotImplementedError

    def _make_linear(self, units, initializer, use_bias, name):
        raise NotImplementedError

    def _make_modulation(self, index):
        """A layer applied after hidden layer `index`'s normalisation, or None."""
        return None

    # -- structure -------------------------------------------------------------------------
    def build(self, input_shape):
        shape = self._check_input(input_shape)
        axis = self._channel_axis_index()
        channels = _common.known_dim(self, shape, axis, "input channels")
        hidden = self._hidden if self._hidden is not None else channels
        self.linears, self.norms, self.modulations = [], [], []
        self._modulation_of = {}  # hidden layer index -> position in self.modulations
        current = shape
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            units = channels if last else hidden
            if not self.residual:
                initializer = None  # identity: an untrained block maps x to x
            elif last and not self.batch_norm:
                initializer = "zeros"  # zero residual
            else:
                initializer = self.kernel_initializer
            linear = self._make_linear(
                units, initializer, use_bias=not self.batch_norm, name=f"linear_{i}"
            )
            linear.build(current)
            current = linear.compute_output_shape(current)
            self.linears.append(linear)
            if self.batch_norm:
                norm = ExactBatchNormalization(
                    axis=axis,
                    momentum=self.momentum,
                    epsilon=self.epsilon,
                    gamma_initializer="zeros" if (self.residual and last) else "ones",
                    dtype=self.dtype_policy,
                    name=f"batch_norm_{i}",
                )
                norm.build(current)
                self.norms.append(norm)
            if not last:
                modulation = self._make_modulation(i)
                if modulation is not None:
                    modulation.build(current)
                    self._modulation_of[i] = len(self.modulations)
                    self.modulations.append(modulation)

    def call(self, inputs, training=None):
        h = inputs
        for i, linear in enumerate(self.linears):
            h = linear(h)
            if self.batch_norm:
                h = self.norms[i](h, training=training)
            if i < self.num_layers - 1:
                if i in self._modulation_of:
                    h = self.modulations[self._modulation_of[i]](h)
                if self.activation is not None:
                    h = self.activation(h)
        outputs = inputs + h if self.residual else h
        if self.activate_output and self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return tuple(self._check_input(input_shape))

    def get_config(self):
        config = super().get_config()
        config.update(
            num_layers=self.num_layers,
            batch_norm=self.batch_norm,
            activation=keras.activations.serialize(self.activation),
            residual=self.residual,
            activate_output=self.activate_output,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            momentum=self.momentum,
            epsilon=self.epsilon,
        )
        config[self._hidden_name] = self._hidden
        return config


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class ResidualWarpBlock(_ResidualWarpBase):
    """A convolutional residual warp: stacked "same" convolutions with batch norm, a
    residual connection and ReLU, initialised to the identity.

    With ``num_layers=1`` it is WarpGrad's "3×3 conv + BN + Res + ReLU" warp,
    ``y = relu(x + BN(conv(x)))``; with ``num_layers=2, hidden_filters=128`` on 64-channel
    features it is the "2-layer 3×3 conv + BN + Res" warp of the Omniglot ablation
    (Appendix G), ``y = relu(x + BN(conv(relu(BN(conv(x))))))``. The output has as many
    channels as the input.

    Initialisation: with ``residual=True`` the last batch norm's scale starts at zero (the
    last convolution's kernel when ``batch_norm=False``), so the residual branch is zero and
    ``y = activation(x)``: the identity after a ReLU block, whose outputs are non-negative
    (set ``activate_output=False`` for an exact identity on any input). With
    ``residual=False`` every convolution starts at the identity, so without batch norm and
    activation the block is the identity too.

    The block is a warp layer: its convolutions and batch-norm scales/offsets are warp
    variables φ; the batch-norm moving statistics are non-trainable state, updated when the
    model runs with ``training=True``.

    Example:

    ```python
    import numpy as np
    from warpkeras.layers import ResidualWarpBlock

    block = ResidualWarpBlock(num_layers=2, hidden_filters=32)
    x = np.random.rand(2, 7, 7, 16).astype("float32")      # non-negative, as after a ReLU
    np.testing.assert_allclose(block(x), x, atol=1e-6)       # identity at initialisation
    assert block(x, training=True).shape == (2, 7, 7, 16)
    ```

    Args:
        num_layers: number of stacked convolutions (1 or more; default 1).
        kernel_size: odd spatial size of the convolutions (default 3).
        hidden_filters: output channels of the hidden convolutions (``num_layers >= 2``);
            `None` uses the number of input channels.
        batch_norm: whether to batch-normalise after each convolution (default True;
            convolutions then have no bias).
        activation: activation between layers and, if ``activate_output``, after the
            residual sum (default ``"relu"``; `None` for none).
        residual: whether to add the input to the branch (default True).
        activate_output: whether to apply ``activation`` after the residual sum (default
            True, as in "conv + BN + Res + ReLU").
        kernel_initializer: initializer of the convolutions that are not identity- or
            zero-initialised (default ``"he_normal"``).
        momentum: batch-norm momentum of the moving statistics (default 0.99).
        epsilon: batch-norm epsilon (default 1e-3).
        data_format: ``"channels_last"`` or ``"channels_first"``; `None` uses
            `keras.config.image_data_format()`.
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    _hidden_name = "hidden_filters"

    def __init__(
        self,
        num_layers=1,
        kernel_size=3,
        hidden_filters=None,
        batch_norm=True,
        activation="relu",
        residual=True,
        activate_output=True,
        kernel_initializer="he_normal",
        momentum=0.99,
        epsilon=1e-3,
        data_format=None,
        **kwargs,
    ):
        super().__init__(
            num_layers=num_layers,
            hidden=hidden_filters,
            batch_norm=batch_norm,
            activation=activation,
            residual=residual,
            activate_output=activate_output,
            kernel_initializer=kernel_initializer,
            momentum=momentum,
            epsilon=epsilon,
            **kwargs,
        )
        self.kernel_size = _common.odd_kernel_size(type(self), kernel_size)
        self.data_format, self._axis = _common.channel_axis_of(data_format)

    @property
    def hidden_filters(self):
        return self._hidden

    def _channel_axis_index(self):
        return self._axis

    def _check_input(self, input_shape):
        layout = (
            "batch, height, width, channels"
            if self.data_format == "channels_last"
            else "batch, channels, height, width"
        )
        return _common.check_rank(self, input_shape, rank=4, what=f"inputs ({layout})")

    def _make_linear(self, units, initializer, use_bias, name):
        return WarpConv2D(
            filters=units,
            kernel_size=self.kernel_size,
            use_bias=use_bias,
            data_format=self.data_format,
            kernel_initializer=initializer,
            dtype=self.dtype_policy,
            name=name,
        )

    def get_config(self):
        config = super().get_config()
        config.update(kernel_size=self.kernel_size, data_format=self.data_format)
        return config


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class ResidualWarpDense(_ResidualWarpBase):
    """A feed-forward residual warp for vector features, initialised to the identity.

    With the defaults it is ``y = x + W2 tanh(W1 x + b1) + b2``: the two-layer tanh warp
    with 100 hidden units that follows each hidden layer of the task learner in WarpGrad's
    continual sine-regression experiment (Appendix K) when ``hidden_units=100``. Features
    are on the last axis and the output has as many features as the input.

    Initialisation: with ``residual=True`` the last dense map (or, with ``batch_norm``, the
    last batch-norm scale) starts at zero, so the block is the identity. With
    ``residual=False`` every dense map starts at the identity (exactly the identity when
    there is no activation and ``hidden_units`` is at least the number of features).

    The block is a warp layer: all its trainable variables are warp variables φ.

    Example:

    ```python
    import numpy as np
    from warpkeras.layers import ResidualWarpDense

    warp = ResidualWarpDense(hidden_units=100)
    x = np.random.randn(5, 40).astype("float32")
    np.testing.assert_allclose(warp(x), x, atol=1e-6)   # identity at initialisation
    ```

    Args:
        hidden_units: width of the hidden layers (``num_layers >= 2``); `None` uses the
            number of input features.
        num_layers: number of dense maps (1 or more; default 2).
        activation: activation between layers and, if ``activate_output``, after the
            residual sum (default ``"tanh"``).
        residual: whether to add the input to the branch (default True).
        activate_output: whether to apply ``activation`` after the residual sum (default
            False: a plain feed-forward branch).
        batch_norm: whether to batch-normalise after each dense map (default False).
        kernel_initializer: initializer of the dense maps that are not identity- or
            zero-initialised (default ``"glorot_uniform"``).
        momentum: batch-norm momentum (used when ``batch_norm``; default 0.99).
        epsilon: batch-norm epsilon (used when ``batch_norm``; default 1e-3).
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    _hidden_name = "hidden_units"

    def __init__(
        self,
        hidden_units=None,
        num_layers=2,
        activation="tanh",
        residual=True,
        activate_output=False,
        batch_norm=False,
        kernel_initializer="glorot_uniform",
        momentum=0.99,
        epsilon=1e-3,
        **kwargs,
    ):
        super().__init__(
            num_layers=num_layers,
            hidden=hidden_units,
            batch_norm=batch_norm,
            activation=activation,
            residual=residual,
            activate_output=activate_output,
            kernel_initializer=kernel_initializer,
            momentum=momentum,
            epsilon=epsilon,
            **kwargs,
        )

    @property
    def hidden_units(self):
        return self._hidden

    def _check_input(self, input_shape):
        return _common.check_rank(self, input_shape, min_rank=2)

    def _make_linear(self, units, initializer, use_bias, name):
        return WarpDense(
            units=units,
            use_bias=use_bias,
            kernel_initializer=initializer,
            dtype=self.dtype_policy,
            name=name,
        )
