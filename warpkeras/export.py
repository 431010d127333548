"""Export of meta-learned models as self-contained TensorFlow SavedModels.

Two things can be exported:

* a **meta-learned model** (initialisation θ0 and warp φ) with `export_adaptive`: the
  SavedModel can adapt itself to a new task. Its signatures run the warped inner loop
  inside the graph, so serving needs TensorFlow only (no warpkeras, no Keras, no Python
  model code):

  - ``serving_default(x)``: predictions at (θ0, φ);
  - ``adapt(x, y, steps)``: K = ``steps`` warped SGD steps on the support set (x, y) from
    θ0, returning the adapted task parameters by name;
  - ``adapt_and_predict(x, y, steps, queries)``: the same adaptation, then predictions of
    the adapted model on ``queries``.

* an **adapted model** (θ after adaptation, φ): `adapt` returns an adapted copy of the model
  (or adapts it in place), which exports like any Keras model with
  ``model.export(path)``.

Inputs are validated inside the graph: a request with the wrong rank or feature size,
x and y of different lengths, an empty support set, labels out of range, or a negative (or
too large) step count fails with an ``InvalidArgumentError`` carrying a readable message,
and the server keeps running.
"""

import functools
import inspect
import os
import re

import keras
import numpy as np
import tensorflow as tf

from warpkeras import objectives, roles
from warpkeras.partition import partition as _partition

__all__ = ["export_adaptive", "adapt", "adapt_task_values", "task_parameter_names"]

SIGNATURES = ("serving_default", "adapt", "adapt_and_predict")


# --- losses ----------------------------------------------------------------------------
def _resolve_loss(loss, from_logits, model):
    """Returns ``(loss_fn, sparse_labels, description)`` for a loss given as in `compile`."""
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                f"No loss for adapting model '{model.name}': pass loss=... (a Keras loss "
                "object or a name such as 'mse' or 'sparse_categorical_crossentropy'), or "
                "compile the model with a single loss."
            )
        if isinstance(loss, (list, tuple, dict)):
            raise ValueError(
                "The model was compiled with several losses; pass the adaptation loss "
                "explicitly with loss=..."
            )
    if isinstance(loss, str):
        try:
            fn = keras.losses.get(loss)
        except ValueError as err:
            raise ValueError(f"Unknown loss {loss!r}: {err}") from None
        if fn is None:
            raise ValueError(f"Unknown loss {loss!r}.")
        name = loss
        if from_logits is not None:
            if isinstance(fn, keras.losses.Loss):
                if not hasattr(fn, "from_logits"):
                    raise ValueError(f"Loss {loss!r} does not take from_logits.")
                config = fn.get_config()
                config["from_logits"] = bool(from_logits)
                fn = type(fn).from_config(config)
            else:
                if "from_logits" not in inspect.signature(fn).parameters:
                    raise ValueError(f"Loss {loss!r} does not take from_logits.")
                fn = functools.partial(fn, from_logits=bool(from_logits))
            name = f"{loss}(from_logits={bool(from_logits)})"
    elif isinstance(loss, keras.losses.Loss):
        if from_logits is not None and bool(getattr(loss, "from_logits", False)) != bool(
            from_logits
        ):
            raise ValueError(
                f"from_logits={from_logits} conflicts with the loss object "
                f"{type(loss).__name__}; set from_logits on the loss object itself."
            )
        fn, name = loss, type(loss).__name__
    elif callable(loss):
        if from_logits is not None:
            raise ValueError(
                "from_logits only applies to losses given by name; a custom loss function "
                "must handle logits itself."
            )
        fn, name = loss, getattr(loss, "__name__", type(loss).__name__)
    else:
        raise TypeError(
            f"loss must be a Keras loss object, a loss name or a function; got "
            f"{type(loss).__name__}."
        )
    base = fn.func if isinstance(fn, functools.partial) else fn
    base_name = getattr(base, "__name__", type(base).__name__)
    sparse = "sparse" in base_name.lower() and "crossentropy" in base_name.lower()
    return fn, sparse, name


# --- specs ------------------------------------------------------------------------------
def _as_spec(spec, what, default_dtype):
    if spec is None:
        return None
    if isinstance(spec, tf.TensorSpec):
        if spec.shape.rank is None or spec.shape.rank < 1:
            raise ValueError(
                f"{what} must have a known rank with a leading batch dimension; got {spec}."
            )
        return tf.TensorSpec([None] + spec.shape.as_list()[1:], spec.dtype)
    if isinstance(spec, (tuple, list)):
        dims = [None if d is None else int(d) for d in spec]
        return tf.TensorSpec([None] + dims, tf.as_dtype(default_dtype))
    raise TypeError(
        f"{what} must be a tf.TensorSpec (leading batch dimension) or a tuple of per-example "
        f"dimensions; got {type(spec).__name__}."
    )


def _model_input_spec(model):
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(
            f"Cannot infer the input shape of model '{model.name}' (a subclassed model "
            "without keras.Input); pass input_spec=(features...) or a tf.TensorSpec."
        )
    if len(inputs) != 1:
        raise ValueError(
            f"Model '{model.name}' has {len(inputs)} inputs; export_adaptive supports models "
            "with a single input tensor."
        )
    shape = list(inputs[0].shape)
    return tf.TensorSpec([None] + shape[1:], tf.as_dtype(inputs[0].dtype))


def _output_spec(part, x_spec):
    dims = [1 if d is None else d for d in x_spec.shape.as_list()[1:]]
    y, _ = part.call(
        part.initial_task_values(), part.warp_values(), tf.zeros([1] + dims, x_spec.dtype),
        training=False,
    )
    if not hasattr(y, "shape") or not hasattr(y, "dtype"):
        raise ValueError(
            f"Model '{part.model.name}' returns {type(y).__name__}; export_adaptive "
            "supports models with a single output tensor."
        )
    y = tf.convert_to_tensor(y)
    return tf.TensorSpec([None] + y.shape.as_list()[1:], y.dtype)


def _default_label_spec(out_spec, sparse):
    if sparse:
        return tf.TensorSpec([None] + out_spec.shape.as_list()[1:-1], tf.int64)
    return tf.TensorSpec(out_spec.shape, out_spec.dtype)


def _names(variables):
    names = [re.sub(r"[^A-Za-z0-9_.\-]", "_", v.path.replace("/", "_")) for v in variables]
    seen = {}
    for n, v in zip(names, variables):
        if n in seen:
            raise ValueError(
                f"Variables '{seen[n]}' and '{v.path}' map to the same output name '{n}'; "
                "rename a layer."
            )
        seen[n] = v.path
    return names


def task_parameter_names(model, untagged="task"):
    """The names under which `adapt` signatures return the task parameters.

    Each is the variable's path with "/" (and any character other than letters, digits,
    "_", "." and "-") replaced by "_", e.g. ``"sequential/dense/kernel"`` →
    ``"sequential_dense_kernel"``.

    Args:
        model: a built `keras.Model`.
        untagged: role of untagged layers (see `warpkeras.partition`).

    Returns:
        A list of strings in task-variable order.
    """
    return _names(_partition(model, untagged=untagged).task_variables)


class _Checks:
    """In-graph input checks that report only the first failure, in order.

    Each assertion passes trivially once an earlier one has failed, so the message names
    the first problem whatever order the graph runs the assertions in, and no check can
    itself fail on malformed input. `guard` hands the computation well-shaped stand-ins
    when a check failed, so nothing downstream can fail with a less readable error before
    the assertion is reported.
    """

    def __init__(self):
        self.ok = tf.constant(True)
        self.ops = []

    def require(self, cond, *message):
        self.ops.append(
            tf.debugging.Assert(
                tf.logical_or(tf.logical_not(self.ok), cond), list(message), summarize=8
            )
        )
        self.ok = tf.logical_and(self.ok, cond)

    def guard(self, t, shape):
        """`t` once the checks passed (with static `shape`), a zero stand-in otherwise."""
        with tf.control_dependencies(self.ops):
            ok = tf.identity(self.ok)
        stand_in = [0 if i == 0 else (1 if d is None else d) for i, d in enumerate(shape)]
        out = tf.cond(
            ok, lambda: tf.identity(t), lambda: tf.zeros(stand_in, t.dtype)
        )
        out.set_shape(shape)
        return out


def _leading_dim(t):
    """The size of the first dimension, or 1 for a scalar (never fails)."""
    return tf.reduce_prod(tf.shape(t)[:1])


# --- the adaptation program --------------------------------------------------------------
class _Program:
    """The pure adaptation/prediction maths for one model, with input validation."""

    def __init__(self, model, loss, from_logits, learning_rate, momentum, training,
                 input_spec, label_spec, untagged, max_steps):
        if not isinstance(model, keras.Model):
            raise TypeError(f"Expected a keras.Model, got {type(model).__name__}.")
        if not model.built:
            raise ValueError(
                f"Model '{model.name}' is not built: give it a keras.Input or call it once."
            )
        lr = float(learning_rate)
        if not np.isfinite(lr) or lr <= 0:
            raise ValueError(f"learning_rate must be a positive number; got {learning_rate!r}.")
        if momentum is not None:
            momentum = float(momentum)
            if not 0.0 <= momentum < 1.0:
                raise ValueError(f"momentum must be in [0, 1); got {momentum!r}.")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be an integer >= 0; got {max_steps!r}.")
        self.model = model
        self.partition = _partition(model, untagged=untagged, require_task=True)
        self.loss_fn, self.sparse, self.loss_name = _resolve_loss(loss, from_logits, model)
        self.learning_rate = lr
        self.momentum = momentum
        self.training = bool(training)
        self.max_steps = max_steps
        x_spec = _as_spec(input_spec, "input_spec", keras.config.floatx())
        self.x_spec = x_spec if x_spec is not None else _model_input_spec(model)
        self.out_spec = _output_spec(self.partition, self.x_spec)
        y_spec = _as_spec(label_spec, "label_spec", self.out_spec.dtype)
        self.y_spec = y_spec if y_spec is not None else _default_label_spec(
            self.out_spec, self.sparse
        )
        self.num_classes = self.out_spec.shape[-1] if self.sparse else None
        self.names = _names(self.partition.task_variables)

    # -- values of the live model (read inside the traced functions, so captured) ---------
    def _theta0(self):
        return [tf.convert_to_tensor(v.value) for v in self.partition.task_variables]

    def _phi(self):
        return [tf.convert_to_tensor(v.value) for v in self.partition.warp_variables]

    def _state(self):
        return [tf.convert_to_tensor(v.value) for v in self.partition.state_variables]

    # -- validation ---------------------------------------------------------------------
    def _check_batch(self, checks, t, spec, arg, fn, allow_empty=False):
        rank = spec.shape.rank
        dims = spec.shape.as_list()[1:]
        expected = "[" + ", ".join(["batch"] + ["?" if d is None else str(d) for d in dims])
        expected += f"] (rank {rank})"
        shape = tf.shape(t)
        ok = tf.equal(tf.rank(t), rank)
        known = [i + 1 for i, d in enumerate(dims) if d is not None]
        if known:
            want = tf.constant([dims[i - 1] for i in known], dtype=shape.dtype)
            # Padding makes the gather valid whatever the actual rank is.
            padded = tf.concat([shape, tf.zeros([rank], shape.dtype)], axis=0)
            ok = tf.logical_and(ok, tf.reduce_all(tf.equal(tf.gather(padded, known), want)))
        checks.require(ok, f"{fn}: `{arg}` must have shape {expected}; got shape", shape)
        if not allow_empty:
            checks.require(
                _leading_dim(t) > 0,
                f"{fn}: `{arg}` must hold at least one example; got shape", shape,
            )

    def _support_checks(self, x, y, steps, fn):
        checks = _Checks()
        self._check_batch(checks, x, self.x_spec, "x", fn)
        self._check_batch(checks, y, self.y_spec, "y", fn)
        checks.require(
            tf.equal(_leading_dim(x), _leading_dim(y)),
            f"{fn}: `x` and `y` must hold the same number of examples; got",
            _leading_dim(x), "and", _leading_dim(y),
        )
        checks.require(tf.greater_equal(steps, 0), f"{fn}: `steps` must be >= 0; got", steps)
        checks.require(
            tf.less_equal(steps, self.max_steps),
            f"{fn}: `steps` must be <= {self.max_steps} (max_steps of the export); got", steps,
        )
        if self.sparse and self.num_classes is not None:
            n = tf.cast(self.num_classes, y.dtype)
            checks.require(
                tf.reduce_all((y >= 0) & (y < n)),
                f"{fn}: class labels in `y` must lie in [0, {self.num_classes}); got min/max",
                tf.reduce_min(y), tf.reduce_max(y),
            )
        return checks

    # -- maths ----------------------------------------------------------------------------
    def _forward(self, theta, x, state):
        y, _ = self.partition.call(theta, self._phi(), x, state=state, training=False)
        return y

    def _loop(self, x, y, steps):
        """K warped SGD steps from θ0 on (x, y), inside a tf.while_loop."""
        phi = self._phi()
        theta0 = self._theta0()
        state0 = self._state()
        use_momentum = self.momentum is not None and self.momentum > 0
        velocity0 = [tf.zeros_like(t) for t in theta0] if use_momentum else []

        def body(i, theta, velocity, state):
            _, grads, new_state = objectives.task_gradient(
                self.partition, self.loss_fn, theta, phi, (x, y), state=state,
                training=self.training,
            )
            theta, new_velocity = objectives.sgd_update(
                theta, grads, self.learning_rate,
                momentum=self.momentum if use_momentum else None,
                velocity=velocity if use_momentum else None,
            )
            if self.training:
                state = [tf.cast(s, s0.dtype) for s, s0 in zip(new_state, state)]
            return i + 1, theta, (new_velocity if use_momentum else velocity), state

        _, theta, _, state = tf.while_loop(
            lambda i, *_: i < steps,
            body,
            (tf.constant(0, steps.dtype), theta0, velocity0, state0),
        )
        return theta, state

    # -- the three entry points (graph functions; inputs already typed) --------------------
    def _batch_shape(self, spec):
        return [None] + spec.shape.as_list()[1:]

    def predict(self, x):
        checks = _Checks()
        self._check_batch(checks, x, self.x_spec, "x", "serving_default", allow_empty=True)
        x = checks.guard(x, self._batch_shape(self.x_spec))
        return {"predictions": self._forward(self._theta0(), x, self._state())}

    def _guard_support(self, checks, x, y, steps):
        x = checks.guard(x, self._batch_shape(self.x_spec))
        y = checks.guard(y, self._batch_shape(self.y_spec))
        return x, y, checks.guard(steps, [])

    def adapt(self, x, y, steps):
        checks = self._support_checks(x, y, steps, "adapt")
        x, y, steps = self._guard_support(checks, x, y, steps)
        theta, _ = self._loop(x, y, steps)
        return dict(zip(self.names, theta))

    def adapt_and_predict(self, x, y, steps, queries):
        checks = self._support_checks(x, y, steps, "adapt_and_predict")
        self._check_batch(
            checks, queries, self.x_spec, "queries", "adapt_and_predict", allow_empty=True
        )
        x, y, steps = self._guard_support(checks, x, y, steps)
        queries = checks.guard(queries, self._batch_shape(self.x_spec))
        theta, state = self._loop(x, y, steps)
        return {"predictions": self._forward(theta, queries, state)}

    # -- specs for tf.function (unknown shapes, validated in the graph) -------------------
    def loose(self, spec):
        return tf.TensorSpec(None, spec.dtype)

    def metadata(self):
        return {
            "loss": self.loss_name,
            "learning_rate": self.learning_rate,
            "momentum": 0.0 if self.momentum is None else self.momentum,
            "training": self.training,
            "max_steps": self.max_steps,
            "input_shape": str(self.x_spec.shape.as_list()),
            "input_dtype": self.x_spec.dtype.name,
            "label_shape": str(self.y_spec.shape.as_list()),
            "label_dtype": self.y_spec.dtype.name,
            "task_parameters": ",".join(self.names),
        }


def _adapt_function(program):
    x = program.loose(program.x_spec)
    y = program.loose(program.y_spec)
    return tf.function(
        program.adapt,
        input_signature=[x, y, tf.TensorSpec([], tf.int32)],
    )


# --- export -------------------------------------------------------------------------------
def export_adaptive(
    model,
    path,
    loss=None,
    learning_rate=0.01,
    momentum=None,
    steps=5,
    from_logits=None,
    input_spec=None,
    label_spec=None,
    untagged="task",
    training=False,
    max_steps=10000,
):
    """Exports a meta-learned model as a SavedModel that adapts itself to new tasks.

    The SavedModel holds copies of θ0 (task variables), φ (warp variables), frozen variables
    and the model's non-trainable state, and three signatures (run by TensorFlow alone, e.g.
    in TF Serving):

    * ``serving_default``: input ``x``; output ``predictions`` at (θ0, φ).
    * ``adapt``: inputs ``x``, ``y`` (the support set) and ``steps`` (int32 scalar); runs
      ``steps`` full-batch inner steps θ ← θ − α ∇L(θ; φ) (heavy-ball with `momentum`,
      the rule of `warpkeras.objectives.task_step`) in a ``tf.while_loop`` from θ0;
      outputs one tensor per task variable, named by `task_parameter_names`.
    * ``adapt_and_predict``: inputs ``x``, ``y``, ``steps``, ``queries``; output
      ``predictions`` of the adapted model on ``queries``.

    The loaded object also has ``metadata()`` (loss, learning rate, default ``steps``, ...).
    Inputs are declared with unknown shapes and checked in the graph, so bad requests
    raise ``InvalidArgumentError`` with a message such as ``adapt: `x` must have shape
    [batch, 4]; got shape [5 3]``.

    Example:

    ```python
    import keras, numpy as np, tensorflow as tf, warpkeras
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        warpkeras.warp(keras.layers.Dense(8)),
        keras.layers.Dense(3),
    ])
    warpkeras.export_adaptive(model, "saved_models/demo", loss="sparse_categorical_crossentropy",
                              from_logits=True, learning_rate=0.1, steps=5)
    served = tf.saved_model.load("saved_models/demo")
    out = served.signatures["adapt_and_predict"](
        x=tf.random.normal((10, 4)), y=tf.constant(np.arange(10) % 3),
        steps=tf.constant(5), queries=tf.random.normal((2, 4)))
    print(out["predictions"].shape)  # (2, 3)
    ```

    Args:
        model: a built, meta-learned `keras.Model` with a single input and output tensor.
        path: the SavedModel directory to write.
        loss: the inner-loop loss: a Keras loss object, a name (``"mse"``,
            ``"sparse_categorical_crossentropy"``, ...) or a traceable function
            ``loss(y_true, y_pred)``; `None` uses the model's compiled loss.
        learning_rate: α of the inner steps.
        momentum: μ of heavy-ball inner steps, or `None` for plain SGD.
        steps: the default number of inner steps, recorded in the metadata (the signatures
            take the step count as an input).
        from_logits: for losses given by name: whether predictions are logits.
        input_spec: the input batch as a `tf.TensorSpec` (leading dimension `None`) or a
            tuple of per-example dimensions; default: from the model's `keras.Input`.
        label_spec: the label batch, same forms; default: int64 class ids of shape
            ``[batch]`` for sparse cross-entropies, else the model output's shape and dtype.
        untagged: role of untagged layers (see `warpkeras.partition`).
        training: run the model in training mode during adaptation (dropout, batch-norm
            batch statistics; the updated state is used for the predictions).
        max_steps: largest accepted ``steps`` input, so that a request cannot occupy the
            server indefinitely.

    Returns:
        The path written.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}.")
    if isinstance(max_steps, np.integer):
        max_steps = int(max_steps)
    steps = int(steps)
    if isinstance(max_steps, int) and steps > max_steps:
        raise ValueError(f"steps={steps} exceeds max_steps={max_steps}.")
    program = _Program(model, loss, from_logits, learning_rate, momentum, training,
                       input_spec, label_spec, untagged, max_steps)
    module = tf.Module(name="warpkeras_adaptive")
    # Track the model's variables (the underlying tf.Variables) so the saved graphs can
    # capture them: θ0, φ, frozen variables and the non-trainable state.
    module.model_variables = [v.value for v in model.variables]
    xs, ys = program.loose(program.x_spec), program.loose(program.y_spec)
    steps_spec = tf.TensorSpec([], tf.int32)
    module.serve = tf.function(program.predict, input_signature=[xs])
    module.adapt = tf.function(program.adapt, input_signature=[xs, ys, steps_spec])
    module.adapt_and_predict = tf.function(
        program.adapt_and_predict, input_signature=[xs, ys, steps_spec, xs]
    )
    meta = dict(program.metadata(), default_steps=steps)
    constants = {
        k: tf.constant(v if not isinstance(v, bool) else int(v)) for k, v in meta.items()
    }
    module.metadata = tf.function(lambda: dict(constants), input_signature=[])
    signatures = {
        "serving_default": module.serve.get_concrete_function(),
        "adapt": module.adapt.get_concrete_function(),
        "adapt_and_predict": module.adapt_and_predict.get_concrete_function(),
    }
    path = os.fspath(path)
    tf.saved_model.save(module, path, signatures=signatures)
    return path


# --- in-process adaptation ------------------------------------------------------------------
def _run_adapt(model, x, y, steps, loss, learning_rate, momentum, from_logits, training,
               untagged, input_spec, label_spec):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}.")
    program = _Program(model, loss, from_logits, learning_rate, momentum, training,
                       input_spec, label_spec, untagged, max_steps=max(int(steps), 0))
    fn = _adapt_function(program)
    x = tf.convert_to_tensor(x, dtype=program.x_spec.dtype)
    y = tf.convert_to_tensor(y, dtype=program.y_spec.dtype)
    values = fn(x, y, tf.constant(int(steps), tf.int32))
    return program, [values[n] for n in program.names]


def adapt_task_values(model, x, y, steps, loss=None, learning_rate=0.01, momentum=None,
                      from_logits=None, training=False, untagged="task", input_spec=None,
                      label_spec=None):
    """Adapted task parameters after `steps` warped SGD steps on (x, y), by name.

    The same computation as the ``adapt`` signature of `export_adaptive` (same names, same
    rule), run in this process; the model is not changed.

    Example:

    ```python
    values = warpkeras.adapt_task_values(model, x, y, steps=5, loss="mse",
                                         learning_rate=0.1)
    ```

    Args:
        model, loss, learning_rate, momentum, from_logits, training, untagged, input_spec,
            label_spec: as in `export_adaptive`.
        x, y: the support set (arrays or tensors).
        steps: the number of inner steps.

    Returns:
        A dict from `task_parameter_names` to tensors.
    """
    program, theta = _run_adapt(model, x, y, steps, loss, learning_rate, momentum,
                                from_logits, training, untagged, input_spec, label_spec)
    return dict(zip(program.names, theta))


def _copy_roles(source, target):
    src = list(source._flatten_layers(include_self=True, recursive=True))
    dst = list(target._flatten_layers(include_self=True, recursive=True))
    if len(src) != len(dst):
        return
    for a, b in zip(src, dst):
        role = roles.role_of(a)
        if role is not None and roles.role_of(b) is None:
            roles.tag(b, role)


def adapt(model, x, y, steps, loss=None, learning_rate=0.01, momentum=None, from_logits=None,
          training=False, untagged="task", copy=True, input_spec=None, label_spec=None):
    """Adapts a meta-learned model to one task: `steps` warped SGD steps on (x, y) from θ0.

    Returns an adapted copy (default) or adapts `model` in place. The result is an ordinary
    Keras model holding the adapted θ and the meta-learned φ, so it exports like any Keras
    model: ``adapted.export(path)`` (a SavedModel with a ``serve`` endpoint) or
    ``adapted.save("adapted.keras")``.

    Example:

    ```python
    adapted = warpkeras.adapt(model, x_support, y_support, steps=10, loss="mse",
                              learning_rate=0.1)
    adapted.export("saved_models/adapted")
    ```

    Args:
        model: a built meta-learned `keras.Model`.
        x, y: the support set.
        steps: the number of full-batch inner steps.
        loss, learning_rate, momentum, from_logits, training, untagged, input_spec,
            label_spec: as in `export_adaptive`.
        copy: return a clone (made with `keras.models.clone_model`, tags copied) and leave
            `model` unchanged; with ``copy=False`` the task variables of `model` itself are
            assigned the adapted values.

    Returns:
        The adapted model.
    """
    program, theta = _run_adapt(model, x, y, steps, loss, learning_rate, momentum,
                                from_logits, training, untagged, input_spec, label_spec)
    if not copy:
        program.partition.assign_task(theta)
        return model
    try:
        clone = keras.models.clone_model(model)
    except Exception as err:  # clone_model needs get_config for subclassed models
        raise ValueError(
            f"Could not copy model '{model.name}' with keras.models.clone_model ({err}). "
            "Adapt it in place with copy=False instead."
        ) from err
    if len(clone.variables) != len(model.variables):
        raise ValueError(
            f"The clone of model '{model.name}' has different variables; adapt it in place "
            "with copy=False instead."
        )
    clone.set_weights(model.get_weights())
    _copy_roles(model, clone)
    trainable = clone.trainable_variables
    for i, t in zip(program.partition.task_indices, theta):
        trainable[i].assign(t)
    return clone
