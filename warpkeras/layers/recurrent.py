"""Recurrent warps: a meta-LSTM hypernetwork that modulates a task RNN (Warp-RNN), a
linear T-Nets-style RNN warp, and the plain task RNN they both warp.

All three are Keras RNN cells, used through `keras.layers.RNN`. They share the task RNN's
parameterisation — input kernel W, recurrent kernel V and bias b, held by a task-tagged
sub-layer — so the same task variables θ can be run with or without a warp:

* `TaskRNNCell`: ``h_t = tanh(h_{t-1} V + x_t W + b)`` (the baseline learner);
* `LinearWarpRNNCell`: ``h_t = tanh((h_{t-1} V) T_h + (x_t W) T_x + b)`` with meta-learned
  ``T_h``, ``T_x`` (WarpGrad Appendix J's T-Nets-RNN);
* `WarpRNNCell`: WarpGrad Eq. 15, where a meta-LSTM emits diagonal modulations of W, V
  and b at every step.

Keras uses row vectors (``x @ W``); the equations in the docstrings are written that way.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import ops

from warpkeras.layers import _common


class _TaskRNNParams(keras.layers.Layer):
    """The task RNN's W (``kernel``), V (``recurrent_kernel``) and b (``bias``); a task
    layer, so these variables are θ wherever the cell sits (not public)."""

    warpkeras_role = "task"

    def __init__(
        self, units, kernel_initializer, recurrent_initializer, bias_initializer, **kwargs
    ):
        super().__init__(**kwargs)
        self.units = units
        self.kernel_initializer = kernel_initializer
        self.recurrent_initializer = recurrent_initializer
        self.bias_initializer = bias_initializer

    def build(self, input_shape):
        features = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel", shape=(features, self.units), initializer=self.kernel_initializer
        )
        self.recurrent_kernel = self.add_weight(
            name="recurrent_kernel",
            shape=(self.units, self.units),
            initializer=self.recurrent_initializer,
        )
        self.bias = self.add_weight(
            name="bias", shape=(self.units,), initializer=self.bias_initializer
        )


class _MetaLSTM(keras.layers.Layer):
    """The weights and step of the meta-LSTM of `WarpRNNCell` (not public). It has no role
    of its own and inherits the cell's warp role."""

    def __init__(self, units, kernel_initializer, recurrent_initializer, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.kernel_initializer = kernel_initializer
        self.recurrent_initializer = recurrent_initializer

    def build(self, input_shape):
        features = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel",
            shape=(features, 4 * self.units),
            initializer=self.kernel_initializer,
        )
        self.recurrent_kernel = self.add_weight(
            name="recurrent_kernel",
            shape=(self.units, 4 * self.units),
            initializer=self.recurrent_initializer,
        )

        units = self.units

        def unit_forget_bias(shape, dtype=None):
            zeros = ops.zeros((units,), dtype=dtype)
            ones = ops.ones((units,), dtype=dtype)
            return ops.concatenate([zeros, ones, zeros, zeros])

        self.bias = self.add_weight(
            name="bias", shape=(4 * self.units,), initializer=unit_forget_bias
        )

    def step(self, inputs, z, c):
        gates = ops.matmul(inputs, self.kernel) + ops.matmul(z, self.recurrent_kernel) + self.bias
        i, f, g, o = ops.split(gates, 4, axis=-1)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        z = ops.sigmoid(o) * ops.tanh(c)
        return z, c


class _RNNCellBase(keras.layers.Layer):
    """Common parts of the three cells (not public)."""

    def __init__(
        self,
        units: int,
        activation: str | Callable | None = "tanh",
        kernel_initializer: str | keras.initializers.Initializer | None = "glorot_uniform",
        recurrent_initializer: str | keras.initializers.Initializer = "orthogonal",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.units = _common.check_positive_int(type(self), "units", units)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.output_size = self.units
        self.task_params = _TaskRNNParams(
            self.units,
            self.kernel_initializer,
            self.recurrent_initializer,
            self.bias_initializer,
            dtype=self.dtype_policy,
            name="task_params",
        )

    def _check_step_shape(self, input_shape):
        shape = _common.check_rank(
            self,
            input_shape,
            rank=2,
            what="step inputs (batch, features); wrap the cell in keras.layers.RNN to "
            "run it over sequences (batch, time, features)",
        )
        _common.known_dim(self, shape, -1, "input features")
        return shape

    @property
    def kernel(self):
        """The task input kernel W, shape ``(features, units)``."""
        return self.task_params.kernel

    @property
    def recurrent_kernel(self):
        """The task recurrent kernel V, shape ``(units, units)``."""
        return self.task_params.recurrent_kernel

    @property
    def bias(self):
        """The task bias b, shape ``(units,)``."""
        return self.task_params.bias

    def get_initial_state(self, batch_size=None):
        return [ops.zeros((batch_size, d), dtype=self.compute_dtype) for d in self.state_size]

    def compute_output_shape(self, input_shape, states_shape=None):
        return (input_shape[0], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units,
            activation=keras.activations.serialize(self.activation),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class TaskRNNCell(_RNNCellBase):
    """The plain task RNN, ``h_t = tanh(h_{t-1} V + x_t W + b)``, without a warp.

    The basic RNN learner of WarpGrad's maze experiment (Appendix J), with the same
    variables as the task part of `WarpRNNCell` and `LinearWarpRNNCell`: W (``kernel``), V
    (``recurrent_kernel``) and b (``bias``) live in a task-tagged sub-layer, so they are
    task variables θ. Use it as the baseline, or to run adapted task parameters without
    the warp.

    Example:

    ```python
    import keras, numpy as np
    from warpkeras.layers import TaskRNNCell

    rnn = keras.layers.RNN(TaskRNNCell(16), return_sequences=True)
    y = rnn(np.random.rand(2, 5, 3).astype("float32"))
    assert y.shape == (2, 5, 16)
    ```

    Args:
        units: size of the hidden state.
        activation: the RNN's non-linearity (default ``"tanh"``).
        kernel_initializer: initializer of W (default ``"glorot_uniform"``).
        recurrent_initializer: initializer of V (default ``"orthogonal"``).
        bias_initializer: initializer of b (default ``"zeros"``).
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    def __init__(
        self,
        units: int,
        activation: str | Callable | None = "tanh",
        kernel_initializer: str | keras.initializers.Initializer | None = "glorot_uniform",
        recurrent_initializer: str | keras.initializers.Initializer = "orthogonal",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(
            units,
            activation=activation,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )
        self.state_size = self.units

    def get_initial_state(self, batch_size=None):
        return [ops.zeros((batch_size, self.units), dtype=self.compute_dtype)]

    def build(self, input_shape):
        shape = self._check_step_shape(input_shape)
        self.task_params.build(shape)

    def call(self, inputs, states, training=None):
        h = states[0] if isinstance(states, (list, tuple)) else states
        p = self.task_params
        h = ops.matmul(h, p.recurrent_kernel) + ops.matmul(inputs, p.kernel) + p.bias
        if self.activation is not None:
            h = self.activation(h)
        return h, [h]


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class LinearWarpRNNCell(_RNNCellBase):
    """A task RNN preconditioned by linear warps (T-Nets-RNN, WarpGrad Appendix J):
    ``h_t = tanh((h_{t-1} V) T_h + (x_t W) T_x + b)``.

    W, V and b are task variables θ (the same as `TaskRNNCell`'s); ``T_h`` and ``T_x`` are
    ``units × units`` warp variables φ, initialised to the identity, so an untrained warp
    leaves the task RNN unchanged. The paper's equation has no transform of the bias, and
    neither does this cell (a linear map of a free bias is just another bias).

    Example:

    ```python
    import keras, numpy as np
    from warpkeras.layers import LinearWarpRNNCell

    cell = LinearWarpRNNCell(16)
    y = keras.layers.RNN(cell)(np.random.rand(2, 5, 3).astype("float32"))
    assert y.shape == (2, 16)
    np.testing.assert_allclose(cell.transform_h.numpy(), np.eye(16))
    ```

    Args:
        units: size of the hidden state.
        activation: the RNN's non-linearity (default ``"tanh"``).
        kernel_initializer: initializer of W (default ``"glorot_uniform"``).
        recurrent_initializer: initializer of V (default ``"orthogonal"``).
        bias_initializer: initializer of b (default ``"zeros"``).
        transform_initializer: initializer of ``T_h`` and ``T_x``; `None` (default) for
            the identity.
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    warpkeras_role = "warp"

    def __init__(
        self,
        units: int,
        activation: str | Callable | None = "tanh",
        kernel_initializer: str | keras.initializers.Initializer | None = "glorot_uniform",
        recurrent_initializer: str | keras.initializers.Initializer = "orthogonal",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        transform_initializer: str | keras.initializers.Initializer | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            units,
            activation=activation,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )
        self.state_size = self.units
        self.transform_initializer = _common.get_kernel_initializer(transform_initializer)

    def get_initial_state(self, batch_size=None):
        return [ops.zeros((batch_size, self.units), dtype=self.compute_dtype)]

    def build(self, input_shape):
        shape = self._check_step_shape(input_shape)
        self.task_params.build(shape)
        self.transform_h = self.add_weight(
            name="transform_h",
            shape=(self.units, self.units),
            initializer=self.transform_initializer,
        )
        self.transform_x = self.add_weight(
            name="transform_x",
            shape=(self.units, self.units),
            initializer=self.transform_initializer,
        )

    def call(self, inputs, states, training=None):
        h = states[0] if isinstance(states, (list, tuple)) else states
        p = self.task_params
        h = (
            ops.matmul(ops.matmul(h, p.recurrent_kernel), self.transform_h)
            + ops.matmul(ops.matmul(inputs, p.kernel), self.transform_x)
            + p.bias
        )
        if self.activation is not None:
            h = self.activation(h)
        return h, [h]

    def get_config(self):
        config = super().get_config()
        config.update(
            transform_initializer=_common.serialize_kernel_initializer(self.transform_initializer)
        )
        return config


@keras.saving.register_keras_serializable(package=_common.PACKAGE)
class WarpRNNCell(_RNNCellBase):
    """Warp-RNN: a task RNN whose weights are modulated at every step by a meta-LSTM
    (WarpGrad Eq. 15, Appendix J).

    At step t, with input ``x_t`` and previous task state ``h_{t-1}``::

        z_t, c_t = MetaLSTM([x_t, h_{t-1}], (z_{t-1}, c_{t-1}))
        [u_x1, u_x2, u_h1, u_h2, u_b] = 1 + tanh(z_t P)          # split by columns
        h_t = tanh(u_h2 * ((u_h1 * h_{t-1}) V) + u_x2 * ((u_x1 * x_t) W) + u_b * b)

    i.e. ``U^i_{j,t} = diag(u_j^i)`` are diagonal warp matrices, applied as elementwise
    products. W (``kernel``), V (``recurrent_kernel``) and b (``bias``) are task variables
    θ, held by a task-tagged sub-layer; the meta-LSTM's weights and the projection P
    (``projection``, shape ``(meta_units, features + 4 * units)``, columns in the order
    ``u_x1, u_x2, u_h1, u_h2, u_b``) are warp variables φ.

    Initialisation (a deliberate difference from the paper's ``U = diag(tanh(P z))``): the
    modulations are ``1 + tanh(P z)`` with P initialised at zero, so every ``U`` starts as
    the identity and an untrained Warp-RNN computes exactly `TaskRNNCell` with the same W,
    V, b. (With the paper's form a zero P would give ``U = 0`` and cut every signal, and a
    random P would scale each weight by a random factor in (-1, 1).) Meta-learning moves the
    modulations within (0, 2). At the start, gradients reach P but not the meta-LSTM
    (they pass through P, which is zero); once P moves off zero, both are learned.

    The state is ``[h, z, c]`` (task hidden state, meta-LSTM hidden and cell states), of
    sizes ``[units, meta_units, meta_units]``; the output is ``h``.

    Example:

    ```python
    import keras, numpy as np, warpkeras
    from warpkeras.layers import WarpRNNCell

    model = keras.Sequential([
        keras.Input((5, 3)),
        keras.layers.RNN(WarpRNNCell(16, meta_units=8), return_sequences=True),
        keras.layers.Dense(2),
    ])
    assert model(np.random.rand(4, 5, 3).astype("float32")).shape == (4, 5, 2)
    p = warpkeras.partition(model)   # task: W, V, b and the Dense; warp: LSTM and P
    ```

    Args:
        units: size of the task RNN's hidden state.
        meta_units: size of the meta-LSTM's state; `None` (default) uses ``units``.
        activation: the task RNN's non-linearity (default ``"tanh"``).
        kernel_initializer: initializer of W (default ``"glorot_uniform"``).
        recurrent_initializer: initializer of V (default ``"orthogonal"``).
        bias_initializer: initializer of b (default ``"zeros"``).
        meta_kernel_initializer: initializer of the meta-LSTM's input kernel (default
            ``"glorot_uniform"``).
        meta_recurrent_initializer: initializer of the meta-LSTM's recurrent kernel
            (default ``"orthogonal"``); its bias starts at zero except the forget gate's,
            at one.
        projection_initializer: initializer of P (default ``"zeros"``: identity
            modulations).
        **kwargs: standard `keras.layers.Layer` arguments (``name``, ``dtype``, ...).
    """

    warpkeras_role = "warp"

    def __init__(
        self,
        units: int,
        meta_units: int | None = None,
        activation: str | Callable | None = "tanh",
        kernel_initializer: str | keras.initializers.Initializer | None = "glorot_uniform",
        recurrent_initializer: str | keras.initializers.Initializer = "orthogonal",
        bias_initializer: str | keras.initializers.Initializer = "zeros",
        meta_kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
        meta_recurrent_initializer: str | keras.initializers.Initializer = "orthogonal",
        projection_initializer: str | keras.initializers.Initializer = "zeros",
        **kwargs,
    ) -> None:
        super().__init__(
            units,
            activation=activation,
            kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer,
            **kwargs,
        )
        self.meta_units = _common.check_positive_int(
            type(self), "meta_units", meta_units, allow_none=True
        )
        self._meta = self.meta_units if self.meta_units is not None else self.units
        self.meta_kernel_initializer = keras.initializers.get(meta_kernel_initializer)
        self.meta_recurrent_initializer = keras.initializers.get(meta_recurrent_initializer)
        self.projection_initializer = keras.initializers.get(projection_initializer)
        self.state_size = [self.units, self._meta, self._meta]
        self.meta_lstm = _MetaLSTM(
            self._meta,
            self.meta_kernel_initializer,
            self.meta_recurrent_initializer,
            dtype=self.dtype_policy,
            name="meta_lstm",
        )

    def build(self, input_shape):
        shape = self._check_step_shape(input_shape)
        features = int(shape[-1])
        self._features = features
        self.task_params.build(shape)
        self.meta_lstm.build((shape[0], features + self.units))
        self.projection = self.add_weight(
            name="projection",
            shape=(self._meta, features + 4 * self.units),
            initializer=self.projection_initializer,
        )

    def modulations(self, z):
        """The diagonal modulations ``[u_x1, u_x2, u_h1, u_h2, u_b]`` for meta-LSTM state
        ``z`` (each ``1 + tanh`` of a slice of ``z P``)."""
        u = 1 + ops.tanh(ops.matmul(z, self.projection))
        d, n = self._features, self.units
        return ops.split(u, [d, d + n, d + 2 * n, d + 3 * n], axis=-1)

    def call(self, inputs, states, training=None):
        h, z, c = states
        z, c = self.meta_lstm.step(ops.concatenate([inputs, h], axis=-1), z, c)
        u_x1, u_x2, u_h1, u_h2, u_b = self.modulations(z)
        p = self.task_params
        h = (
            u_h2 * ops.matmul(u_h1 * h, p.recurrent_kernel)
            + u_x2 * ops.matmul(u_x1 * inputs, p.kernel)
            + u_b * p.bias
        )
        if self.activation is not None:
            h = self.activation(h)
        return h, [h, z, c]

    def get_config(self):
        config = super().get_config()
        config.update(
            meta_units=self.meta_units,
            meta_kernel_initializer=keras.initializers.serialize(self.meta_kernel_initializer),
            meta_recurrent_initializer=keras.initializers.serialize(
                self.meta_recurrent_initializer
            ),
            projection_initializer=keras.initializers.serialize(self.projection_initializer),
        )
        return config
