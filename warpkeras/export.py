"""Export of meta-learned models as self-contained TensorFlow SavedModels.

Two things can be exported:

* a **meta-learned model** (initialisation θ0 and warp φ) with `export_adaptive`: the
  SavedModel can adapt itself to a new task. Its signatures run the warped inner loop
  inside the graph, so serving needs TensorFlow only (no warpkeras, no Keras, no Python
  model code):

  - ``serving_default(x)``: predictions at (θ0, φ);
  - ``adapt(x, y, steps)``: K = ``steps`` warped SGD steps on the support set (x, y) from
    θ0, returning the adapted task parameters by name (and, after training-mode steps,
    the adapted moving statistics);
  - ``adapt_and_predict(x, y, steps, queries)``: the same adaptation, then predictions of
    the adapted model on ``queries``.

* an **adapted model** (θ after adaptation, φ): `adapt` returns an adapted copy of the model
  (or adapts it in place), which exports like any Keras model with
  ``model.export(path)``.

**Models with several inputs.** A SavedModel signature takes flat, named tensors, so a
model with several inputs (a list, tuple or dict of ``keras.Input``, as `model.fit`
takes them) gets one signature argument per input: ``x_<name>`` (``serving_default``,
``adapt``, ``adapt_and_predict``) and ``queries_<name>`` (``adapt_and_predict``), where
``<name>`` is the input's dict key for dict inputs, else its ``keras.Input`` layer name,
with every character other than letters, digits and "_" replaced by "_". The graph
rebuilds the model's input structure from them before calling the model. For example, a
model ``keras.Model([keras.Input((28, 28, 1), name="image"), keras.Input((4,),
name="meta")], ...)`` serves ``adapt_and_predict(x_image, x_meta, y, steps,
queries_image, queries_meta)``. A model with a single input keeps the arguments ``x`` and
``queries``. The Python-client functions of the loaded object (``predict``, ``adapt``,
``adapt_and_predict``) take ``x`` and ``queries`` in the model's own structure instead
(a list or tuple, or a dict with the model's keys), as in `model.fit`; so do the
in-process `adapt` and `adapt_task_values`. The metadata records the inputs
(``input_structure``: "tensor", "list", "tuple" or "dict"; ``inputs``: a JSON list of
``{"name", "x", "queries", "shape", "dtype"}`` per input).

Inputs are validated inside the graph: a request with the wrong rank or feature size,
x and y of different lengths (with several inputs: any two of the ``x_<name>`` inputs and
``y``, or two ``queries_<name>`` inputs), an empty support set, labels out of range, NaN
or inf in ``x``, ``queries`` or regression targets ``y``, a negative step count, or more
work than the export's budget (``max_steps``; ``max_elements`` numbers per request and
``max_element_steps`` numbers × steps, over all inputs; optionally ``max_rows`` and
``max_row_steps`` on the row count that all inputs share) fails with an
``InvalidArgumentError`` carrying a readable message that names the input or the limit,
and the server keeps running.

**Input dtypes.** A SavedModel signature is one concrete function, so each signature key
accepts exactly one dtype per input (recorded in ``metadata()``: ``input_dtype``,
``label_dtype``, ``steps_dtype``). TensorFlow converts numpy arrays, lists and JSON
numbers to those dtypes on the way in (so integer images sent as arrays are cast); a
``tf.Tensor`` of another dtype is refused by TensorFlow itself before the graph runs.
For Python clients, the loaded object also has (unless exported with
``dtype_tolerant=False``) dtype-tolerant functions ``predict(x)``,
``adapt(x, y, steps)`` and ``adapt_and_predict(x, y, steps, queries)``, traced for several
dtypes each: integer (uint8, int32, int64) and float32 / float64 images are cast to the
model's input dtype (``queries`` must then have the dtype of ``x``), int32 / int64 class
ids to the label dtype, int64 step counts to int32. Float class ids and float step counts
are refused with an ``InvalidArgumentError`` naming the argument and the expected dtype;
other dtypes (bool, strings, ...) get TensorFlow's "no matching concrete function"
message, which lists the dtypes accepted per argument. With several model inputs each
input is cast on its own; traced are every combination of accepted input dtypes while
there are at most 16, else any one input in another accepted dtype with the rest at
their declared dtypes, or all inputs of one declared dtype in the same other dtype (cast
other mixes before sending). In-process `adapt` and `adapt_task_values` cast and refuse
the same way (refusals raise `TypeError`).

**Files.** An export is written to a staging folder beside the path and replaces the
path as a whole (an atomic exchange on Linux), so a reader, or TF Serving polling the
folder, finds the old or the new model at every instant; a process killed part-way
leaves a complete model, and the next export, `load` or `recover` finishes or undoes the
interrupted one (see `recover`). Folders and files get the modes that Keras's
`model.export` gives them under the process umask. Besides ``metadata()`` (tensors), the
metadata is written as JSON with Python values to ``assets.extra/warpkeras_metadata.json``
(`read_metadata`).

**Batch-norm statistics.** Adaptation steps run the model in mode ``training`` (True:
batch statistics of the support set, dropout on); predictions (``serving_default``,
``adapt_and_predict``) run every layer in inference mode, as `keras.Model.predict` does
(no dropout), with batch norm per ``predict_training`` (default: the same as
``training``): True normalises with the statistics of the predicted batch, False with the
moving statistics: the saved ones (estimated at θ0 by the trainer) for
``serving_default``, ``steps=0`` or ``training=False``, else those of the support set at
the adapted parameters (`batch_statistics`). A model exported by `MetaTrainer.export`
adapts in training mode, as the trainers do, and predicts in the trainer's
``eval_training_mode``, so its predictions equal `MetaTrainer.evaluate`'s (see
"Batch-norm statistics" in `warpkeras.trainers.MetaTrainer`).
"""

import collections
import contextlib
import ctypes
import functools
import inspect
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import warnings

import keras
import tensorflow as tf

from warpkeras import _validation, objectives, roles, rules
from warpkeras._losses import TaskLoss
from warpkeras.partition import UNTAGGED_POLICIES
from warpkeras.partition import partition as _partition

__all__ = [
    "export_adaptive",
    "adapt",
    "adapt_task_values",
    "task_parameter_names",
    "batch_statistics",
    "load",
    "read_metadata",
    "recover",
]

SIGNATURES = ("serving_default", "adapt", "adapt_and_predict")
# The metadata as JSON (Python values) in the SavedModel's ``assets.extra/`` folder.
METADATA_FILE = "warpkeras_metadata.json"


# --- losses ----------------------------------------------------------------------------
def _resolve_loss(loss, from_logits, model):
    """Returns ``(loss_fn, sparse_labels, description)`` for a loss given as in `compile`:
    `loss_fn` is the `warpkeras._losses.TaskLoss` that training uses too (masks, Keras's
    reduction), and `sparse_labels` comes from its `LossKind`."""
    if isinstance(loss, TaskLoss):
        if from_logits is not None:
            kinds = loss.kinds()
            if any(k.category is None or k.from_logits != bool(from_logits) for k in kinds):
                raise ValueError(
                    f"from_logits={from_logits!r} does not describe the loss {loss.name}: it "
                    "only applies to cross-entropies given by name. Leave it out (the loss "
                    "object's own setting is used) or set it on the trainer's loss."
                )
        return loss, _sparse_labels(loss), loss.name
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
    task_loss = TaskLoss(fn, model=model, where="export_adaptive")
    return task_loss, _sparse_labels(task_loss), name


def _sparse_labels(task_loss):
    """Whether the (one-output) loss takes class ids (a sparse categorical cross-entropy)."""
    kinds = task_loss.kinds()
    return len(kinds) == 1 and kinds[0].category == "sparse_categorical"


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


class _Inputs:
    """The model's inputs as the signatures see them: one flat, named tensor per input.

    `specs` are the per-input batch specs (leading dimension `None`) in the order of
    ``keras.tree.flatten`` of the model's input structure (``model.inputs``; dict keys
    sorted), `names` the inputs' names (Keras input-layer names, or dict keys for dict
    inputs), sanitised to letters, digits and "_". `structure` is the template that
    ``keras.tree.pack_sequence_as`` rebuilds the model's input from (a list, tuple or
    dict), or `None` for a single input tensor, which keeps the plain argument names
    ``x`` and ``queries``.
    """

    def __init__(self, specs, names, structure):
        self.specs = list(specs)
        self.names = list(names)
        self.structure = structure

    @property
    def single(self):
        return self.structure is None

    def argument(self, role, i):
        """The signature argument of input `i` for `role` ("x" or "queries"): ``x`` /
        ``queries`` for a single input, else ``x_<name>`` / ``queries_<name>``."""
        return role if self.single else f"{role}_{self.names[i]}"

    def arguments(self, role):
        return [self.argument(role, i) for i in range(len(self.specs))]

    def pack(self, flat):
        """The model's input structure holding the flat tensors `flat`."""
        flat = list(flat)
        if self.single:
            return flat[0]
        return keras.tree.pack_sequence_as(self.structure, flat)

    def flatten(self, value, arg, where):
        """The flat list of tensors of `value` given in the model's structure (a list or
        tuple for list/tuple inputs, a dict with the model's keys for dict inputs)."""
        if self.single:
            return [value]
        if isinstance(self.structure, dict):
            if not isinstance(value, dict) or set(value) != set(self.structure):
                raise TypeError(
                    f"{where}: `{arg}` must be a dict with keys {sorted(self.structure)} "
                    f"(the model's inputs); got {_validation.describe(value)}."
                )
            flat = keras.tree.flatten(dict(value))
        else:
            flat = keras.tree.flatten(value) if isinstance(value, (list, tuple)) else None
            if flat is None or len(flat) != len(self.specs):
                raise TypeError(
                    f"{where}: `{arg}` must be a list or tuple of {len(self.specs)} arrays "
                    f"(the model's inputs {', '.join(self.names)}, in this order); got "
                    f"{_validation.describe(value)}."
                )
        return flat

    def describe(self):
        """``[{"name", "x", "queries", "shape", "dtype"}]`` per input, for the metadata."""
        return [
            {
                "name": n,
                "x": self.argument("x", i),
                "queries": self.argument("queries", i),
                "shape": s.shape.as_list(),
                "dtype": s.dtype.name,
            }
            for i, (n, s) in enumerate(zip(self.names, self.specs))
        ]


def _sanitise(name):
    name = re.sub(r"[^A-Za-z0-9_]", "_", str(name))
    return name or "input"


def _unique_names(names, where):
    """`names` sanitised to signature keys; a clash is refused."""
    names = [_sanitise(n) for n in names]
    clash = sorted(n for n, c in collections.Counter(names).items() if c > 1)
    if clash:
        raise ValueError(
            f"{where}: several model inputs map to the signature name(s) {clash} (input "
            "names with characters other than letters, digits and '_' are sanitised); give "
            "the keras.Input layers distinct names."
        )
    return names


def _leaf_name(path, tensor, i):
    """A model input's name: its dict key (path joined by "_" when nested), else its
    Keras input layer's name."""
    if any(isinstance(p, str) for p in path):
        return "_".join(str(p) for p in path)
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "operation", None) if history is not None else None
    return getattr(layer, "name", None) or getattr(tensor, "name", None) or f"input_{i}"


def _describe_structure(structure):
    if isinstance(structure, dict):
        return f"a dict with keys {sorted(structure)}"
    if isinstance(structure, (list, tuple)):
        return f"a {type(structure).__name__} of {len(structure)}"
    return type(structure).__name__


def _is_spec_structure(spec):
    if isinstance(spec, dict):
        return True
    return (
        isinstance(spec, (list, tuple))
        and bool(spec)
        and all(isinstance(s, (tf.TensorSpec, list, tuple)) for s in spec)
    )


def _model_inputs(model, input_spec, where):
    """The `_Inputs` of `model`: from `input_spec` where given, else the model's
    ``keras.Input`` tensors and input structure."""
    try:
        inputs = list(model.inputs) if model.inputs else None
    except (AttributeError, ValueError):
        inputs = None
    # A functional model's input structure (a Sequential model has one input tensor).
    struct = getattr(model, "_inputs_struct", None) if inputs else None
    if struct is None or len(keras.tree.flatten(struct)) != len(inputs or []):
        struct = inputs
    default = keras.config.floatx()
    if input_spec is not None and _is_spec_structure(input_spec):
        # One level: a dict of specs (keys sorted, as Keras flattens dicts) or a list or
        # tuple of specs; each spec is a tf.TensorSpec or a tuple of dimensions.
        leaves = (
            ([(k,), input_spec[k]] for k in sorted(input_spec))
            if isinstance(input_spec, dict)
            else (((i,), s) for i, s in enumerate(input_spec))
        )
        leaves = list(leaves)
        specs = [_as_spec(s, f"input_spec[{p[0]!r}]", default) for p, s in leaves]
        if inputs is not None and len(inputs) != len(specs):
            raise ValueError(
                f"{where}: input_spec describes {len(specs)} inputs but model "
                f"'{model.name}' has {len(inputs)}; give one spec per model input."
            )
        if len(specs) == 1:
            return _Inputs(specs, ["x"], None)
        if inputs is not None:  # the model's own structure and names, these specs
            if isinstance(input_spec, dict) != isinstance(struct, dict) or (
                isinstance(struct, dict) and set(struct) != set(input_spec)
            ):
                raise ValueError(
                    f"{where}: input_spec must have the structure of model "
                    f"'{model.name}''s inputs ({_describe_structure(struct)}); got "
                    f"{_describe_structure(input_spec)}."
                )
            leaves = keras.tree.flatten_with_path(struct)
            names = [_leaf_name(p, t, i) for i, (p, t) in enumerate(leaves)]
            structure = keras.tree.map_structure(lambda _: 0, struct)
            return _Inputs(specs, _unique_names(names, where), structure)
        if isinstance(input_spec, dict):
            names, structure = [p[0] for p, _ in leaves], {k: 0 for k in input_spec}
        else:
            names = [
                s.name
                if isinstance(s, tf.TensorSpec) and s.name
                else (_leaf_name((), inputs[i], i) if inputs is not None else f"input_{i}")
                for i, (_, s) in enumerate(leaves)
            ]
            structure = type(input_spec)([0] * len(specs))
        return _Inputs(specs, _unique_names(names, where), structure)
    if input_spec is not None:
        spec = _as_spec(input_spec, "input_spec", default)
        if inputs is not None and len(inputs) > 1:
            raise ValueError(
                f"{where}: model '{model.name}' has {len(inputs)} inputs; give input_spec "
                "as a list, tuple or dict of specs, one per input (or leave it out)."
            )
        return _Inputs([spec], ["x"], None)
    if not inputs:
        raise ValueError(
            f"{where}: cannot infer the input shape of model '{model.name}' (a subclassed "
            "model without keras.Input); pass input_spec=(features...) or a tf.TensorSpec "
            "(a list, tuple or dict of them for several inputs)."
        )
    specs = [tf.TensorSpec([None] + list(t.shape)[1:], tf.as_dtype(t.dtype)) for t in inputs]
    if len(inputs) == 1:
        return _Inputs(specs, ["x"], None)
    leaves = keras.tree.flatten_with_path(struct)
    names = [_leaf_name(p, t, i) for i, (p, t) in enumerate(leaves)]
    structure = keras.tree.map_structure(lambda _: 0, struct)
    return _Inputs(specs, _unique_names(names, where), structure)


def _output_spec(part, inputs):
    """The output's batch spec, traced from the input specs (unknown dimensions of the
    inputs stay unknown in the output, e.g. the time axis of a sequence output)."""
    theta, phi = part.initial_task_values(), part.warp_values()

    def call(*xs):
        return part.call(theta, phi, inputs.pack(list(xs)), training=False)[0]

    specs = [tf.TensorSpec([None] + s.shape.as_list()[1:], s.dtype) for s in inputs.specs]
    y = tf.function(call).get_concrete_function(*specs).structured_outputs
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
        out = tf.cond(ok, lambda: tf.identity(t), lambda: tf.zeros(stand_in, t.dtype))
        out.set_shape(shape)
        return out


# Default work limits (see `export_adaptive`): per request, the input numbers of
# `_DEFAULT_ROWS` examples, and input numbers × steps of `_DEFAULT_ROW_STEPS` example-steps,
# or of `_DEFAULT_VARIABLE_ROW_STEPS` when an example's size is not fixed by the input
# spec (a sequence, an image of any size), its unknown dimensions counted as 1.
_DEFAULT_ROWS = 10_000
_DEFAULT_ROW_STEPS = 1_000_000
_DEFAULT_VARIABLE_ROW_STEPS = 10_000
_ELEMENTS_MAX = 2**62


def _example_elements(specs):
    """``(numbers in one example of all inputs, whether some dimension is unknown)`` for
    the batch specs of the model's inputs (unknown dimensions counted as 1)."""
    total, variable = 0, False
    for spec in specs:
        n = 1
        for d in spec.shape.as_list()[1:]:
            variable = variable or d is None
            n *= 1 if d is None else d
        total += n
    return max(total, 1), variable


def _elements(xs):
    """The numbers held by the tensors `xs` together (int64; never fails)."""
    return tf.add_n([tf.size(t, out_type=tf.int64) for t in xs])


def _leading_dim(t):
    """The size of the first dimension, or 1 for a scalar (never fails)."""
    return tf.reduce_prod(tf.shape(t)[:1])


# --- the adaptation program --------------------------------------------------------------
_INT32_MAX = 2**31 - 1
# Dtypes cast to an argument's declared dtype by the dtype-tolerant functions (see the
# module docstring): same kind, or integer to float. Everything else is refused by name.
_FLOAT_CASTS = (tf.float32, tf.float64)
_INT_CASTS = (tf.uint8, tf.int32, tf.int64)


def _castable(dtype, name):
    """The dtypes that the dtype-tolerant functions cast to `dtype` for argument `name`:
    images (x, queries) of any of `_FLOAT_CASTS` and `_INT_CASTS` for a float input;
    labels and step counts of the same kind (float or integer)."""
    dtype = tf.as_dtype(dtype)
    if name == "steps":
        return [tf.int32, tf.int64]
    if dtype.is_floating:
        pool = _FLOAT_CASTS + (_INT_CASTS if name in ("x", "queries") else ())
    elif dtype.is_integer:
        pool = _INT_CASTS if name in ("x", "queries") else (tf.int32, tf.int64)
    else:
        pool = ()
    return [dtype] + [d for d in pool if d != dtype]


def _refused(dtype, name):
    """Dtypes refused by name (a mistake more likely than others): float class ids and
    float step counts."""
    dtype = tf.as_dtype(dtype)
    if name in ("y", "steps") and dtype.is_integer:
        return [tf.float32, tf.float64]
    return []


def _dtype_text(dtype):
    dtype = tf.as_dtype(dtype)
    if dtype.is_floating:
        return f"{dtype.name} (integer and other float dtypes are cast)"
    if dtype.is_integer:
        return f"{dtype.name} (other integer dtypes are cast)"
    return dtype.name


def _batch_norm_layers(model):
    from warpkeras.layers.normalization import ExactBatchNormalization

    kinds = (keras.layers.BatchNormalization, ExactBatchNormalization)
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, kinds) and layer.trainable
    ]


def _has_batch_norm(model):
    return bool(_batch_norm_layers(model))


@contextlib.contextmanager
def _momentum_zero(model):
    """Batch-norm layers of `model` with momentum 0 while the block runs (or is traced):
    a training-mode call then sets the moving statistics to the batch's."""
    layers = _batch_norm_layers(model)
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        yield
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def batch_statistics(partition, theta, phi, x, state):
    """The model's state with its moving statistics replaced by those of batch `x` at (θ, φ).

    This is how warpkeras estimates the statistics that inference-mode predictions of an
    *adapted* model use (see "Batch-norm statistics" in `warpkeras.trainers.MetaTrainer`):
    one training-mode forward pass on the task's support data at the adapted parameters,
    with every batch-norm layer's momentum set to 0 for the pass, so that the moving mean
    and variance become the batch's mean and (biased) variance per channel. Only floating
    state changes; random-generator states are returned as given.

    Args:
        partition: a `warpkeras.Partition`.
        theta: task values (list of tensors).
        phi: warp values (list of tensors).
        x: a batch of inputs (any structure the model takes).
        state: the model's non-trainable values (list of tensors).

    Returns:
        A list of tensors matching `state`.
    """
    with _momentum_zero(partition.model):
        _, new_state = partition.call(theta, phi, x, state=list(state), training=True)
    return [
        tf.cast(n, tf.convert_to_tensor(s).dtype) if tf.as_dtype(s.dtype).is_floating else s
        for n, s in zip(new_state, state)
    ]


def _served_rule(rule, learning_rate, momentum, where):
    """The inner rule the program traces: `rule`, or SGD with α and μ (plain SGD for
    μ None or 0); a rule that cannot be served is refused by name."""
    if rule is None:
        use_momentum = momentum is not None and momentum > 0
        return rules.SGD(learning_rate, momentum if use_momentum else None)
    rule = rules.get(rule, where=f"{where}: rule")
    if not rule.exportable:
        raise ValueError(
            f"{where}: the inner rule {rule!r} cannot be traced into a SavedModel "
            "(exportable = False; an objective's inner_update hook reads the trainer): "
            "write it as a warpkeras.rules.InnerRule (e.g. warpkeras.rules.MetaSGD for "
            "per-parameter learning rates) and give it to the trainer as inner_rule=."
        )
    if not getattr(rule, "built", False):
        raise ValueError(
            f"{where}: the inner rule {rule!r} is not built: give it to a "
            "trainer (inner_rule=...) or call rule.build(partition, loss)."
        )
    return rule


class _Program:
    """The pure adaptation/prediction maths for one model, with input validation."""

    def __init__(
        self,
        model,
        loss,
        from_logits,
        learning_rate,
        momentum,
        training,
        input_spec,
        label_spec,
        untagged,
        max_steps,
        predict_training=None,
        max_rows=None,
        max_row_steps=None,
        max_elements=None,
        max_element_steps=None,
        where="export_adaptive",
        rule=None,
    ):
        v = _validation
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"{where}: model must be a keras.Model; got {type(model).__name__} (wrap "
                "layers in keras.Sequential([...]) or keras.Model(inputs, outputs))."
            )
        if not model.built:
            raise ValueError(
                f"{where}: model '{model.name}' is not built: give it a keras.Input or call "
                "it once on a batch."
            )
        lr = v.check_float(
            learning_rate,
            "learning_rate",
            minimum=0.0,
            min_inclusive=False,
            where=where,
            example=0.01,
        )
        momentum = v.check_float(
            momentum,
            "momentum",
            minimum=0.0,
            maximum=1.0,
            max_inclusive=False,
            allow_none=True,
            where=where,
            example=0.9,
        )
        from_logits = v.check_bool(from_logits, "from_logits", allow_none=True, where=where)
        training = v.check_bool(training, "training", where=where)
        predict_training = v.check_bool(
            predict_training, "predict_training", allow_none=True, where=where
        )
        max_steps = v.check_int(
            max_steps, "max_steps", minimum=0, maximum=_INT32_MAX, where=where, example=10000
        )
        max_rows = v.check_int(
            max_rows,
            "max_rows",
            minimum=1,
            maximum=_INT32_MAX,
            allow_none=True,
            where=where,
            example=10000,
        )
        max_row_steps = v.check_int(
            max_row_steps,
            "max_row_steps",
            minimum=1,
            maximum=2**62,
            allow_none=True,
            where=where,
            example=10**6,
        )
        max_elements = v.check_int(
            max_elements,
            "max_elements",
            minimum=1,
            maximum=_ELEMENTS_MAX,
            allow_none=True,
            where=where,
            example=10**6,
        )
        max_element_steps = v.check_int(
            max_element_steps,
            "max_element_steps",
            minimum=1,
            maximum=_ELEMENTS_MAX,
            allow_none=True,
            where=where,
            example=10**7,
        )
        v.check_choice(untagged, "untagged", UNTAGGED_POLICIES, where=where)
        self.model = model
        self.partition = _partition(model, untagged=untagged, require_task=True)
        self.loss_fn, self.sparse, self.loss_name = _resolve_loss(loss, from_logits, model)
        self.learning_rate = lr
        self.momentum = momentum
        self.rule = _served_rule(rule, lr, momentum, where)
        self.training = training
        self.predict_training = training if predict_training is None else predict_training
        self.max_steps = max_steps
        self.max_rows = _INT32_MAX if max_rows is None else max_rows
        self.max_row_steps = 2**62 if max_row_steps is None else max_row_steps
        # Batch statistics of a single example normalise it to beta whatever it is.
        self.min_query_rows = 2 if self.predict_training and _has_batch_norm(model) else 0
        self.inputs = _model_inputs(model, input_spec, where)
        self.example_elements, self.variable_size = _example_elements(self.inputs.specs)
        rows, row_steps = (
            (_DEFAULT_ROWS, _DEFAULT_VARIABLE_ROW_STEPS)
            if self.variable_size
            else (_DEFAULT_ROWS, _DEFAULT_ROW_STEPS)
        )
        self.max_elements = (
            min(rows * self.example_elements, _ELEMENTS_MAX)
            if max_elements is None
            else max_elements
        )
        self.max_element_steps = (
            min(row_steps * self.example_elements, _ELEMENTS_MAX)
            if max_element_steps is None
            else max_element_steps
        )
        self.out_spec = _output_spec(self.partition, self.inputs)
        y_spec = _as_spec(label_spec, "label_spec", self.out_spec.dtype)
        self.y_spec = (
            y_spec if y_spec is not None else _default_label_spec(self.out_spec, self.sparse)
        )
        self.num_classes = self.out_spec.shape[-1] if self.sparse else None
        self.names = _names(self.partition.task_variables)
        # With training-mode adaptation the `adapt` signature also returns the adapted
        # moving statistics (the model's floating state), which predictions need.
        self.state_indices = [
            i
            for i, v in enumerate(self.partition.state_variables)
            if self.training and tf.as_dtype(v.dtype).is_floating
        ]
        self.state_names = _names([self.partition.state_variables[i] for i in self.state_indices])
        clash = set(self.names) & set(self.state_names)
        if clash:
            raise ValueError(
                f"{where}: task and state variables map to the same output names "
                f"{sorted(clash)}; rename a layer."
            )

    # -- values of the live model (read inside the traced functions, so captured) ---------
    def _theta0(self):
        return [tf.convert_to_tensor(v.value) for v in self.partition.task_variables]

    def _phi(self):
        return [tf.convert_to_tensor(v.value) for v in self.partition.warp_variables]

    def _state(self):
        return [tf.convert_to_tensor(v.value) for v in self.partition.state_variables]

    # -- validation ---------------------------------------------------------------------
    def _check_batch(self, checks, t, spec, arg, fn, min_rows=1):
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
        rows = _leading_dim(t)
        if min_rows == 1:
            checks.require(
                rows > 0,
                f"{fn}: `{arg}` must hold at least one example; got shape",
                shape,
            )
        elif min_rows > 1:
            checks.require(
                rows >= min_rows,
                f"{fn}: `{arg}` must hold at least {min_rows} examples: predictions use "
                "batch statistics (predict_training=True), which normalise a single example "
                "to a constant; send the query set in one request. Got shape",
                shape,
            )
        checks.require(
            rows <= self.max_rows,
            f"{fn}: `{arg}` holds more examples than max_rows={self.max_rows} of the export; "
            "send at most that many per request. Got",
            rows,
        )

    def _check_finite(self, checks, t, arg, fn):
        if t.dtype.is_floating:
            checks.require(
                tf.reduce_all(tf.math.is_finite(t)),
                f"{fn}: `{arg}` must be finite; it holds NaN or inf.",
            )

    def _check_inputs(self, checks, xs, role, fn, min_rows=1):
        """Shape, row-count and row-limit checks of each input tensor in `xs` (one per
        model input, named by the signature argument of `role`), and that they all hold
        the same number of rows."""
        args = self.inputs.arguments(role)
        for t, spec, arg in zip(xs, self.inputs.specs, args):
            self._check_batch(checks, t, spec, arg, fn, min_rows=min_rows)
        if len(xs) > 1:
            rows = [_leading_dim(t) for t in xs]
            checks.require(
                tf.reduce_all(tf.equal(tf.stack(rows), rows[0])),
                f"{fn}: the inputs {_listing(args)} must hold the same number of examples; got",
                *_interleave(rows, args),
            )
        what = f"`{args[0]}`" if len(args) == 1 else _listing(args) + " together"
        checks.require(
            tf.less_equal(_elements(xs), self.max_elements),
            f"{fn}: {what} must hold at most max_elements={self.max_elements} numbers "
            "(the export's limit per request); send smaller or fewer examples. Got",
            _elements(xs),
        )

    def _support_checks(self, xs, y, steps, fn):
        checks = _Checks()
        self._check_inputs(checks, xs, "x", fn)
        self._check_batch(checks, y, self.y_spec, "y", fn)
        x = xs[0]
        if self.inputs.single:
            checks.require(
                tf.equal(_leading_dim(x), _leading_dim(y)),
                f"{fn}: `x` and `y` must hold the same number of examples; got",
                _leading_dim(x),
                "and",
                _leading_dim(y),
            )
        else:
            args = self.inputs.arguments("x")
            checks.require(
                tf.equal(_leading_dim(x), _leading_dim(y)),
                f"{fn}: {_listing(args + ['y'])} must hold the same number of examples; got",
                _leading_dim(x),
                f"in `{args[0]}` and",
                _leading_dim(y),
                "in `y`",
            )
        checks.require(tf.greater_equal(steps, 0), f"{fn}: `steps` must be >= 0; got", steps)
        checks.require(
            tf.less_equal(steps, self.max_steps),
            f"{fn}: `steps` must be <= {self.max_steps} (max_steps of the export); got",
            steps,
        )
        work = tf.cast(_leading_dim(x), tf.int64) * tf.cast(steps, tf.int64)
        rows_of = "`x`" if self.inputs.single else "the support set"
        checks.require(
            tf.less_equal(work, self.max_row_steps),
            f"{fn}: rows of {rows_of} × `steps` must be <= max_row_steps="
            f"{self.max_row_steps} of the export (the work of one request); use fewer steps "
            "or fewer examples. Got",
            _leading_dim(x),
            "×",
            steps,
        )
        support = "`x`" if self.inputs.single else "the support set"
        checks.require(
            tf.less_equal(
                _elements(xs), self.max_element_steps // tf.maximum(tf.cast(steps, tf.int64), 1)
            ),
            f"{fn}: the numbers in {support} × `steps` must be <= max_element_steps="
            f"{self.max_element_steps} of the export (the work of one request); use fewer "
            "steps or a smaller support set. Got",
            _elements(xs),
            "×",
            steps,
        )
        for t, arg in zip(xs, self.inputs.arguments("x")):
            self._check_finite(checks, t, arg, fn)
        self._check_finite(checks, y, "y", fn)
        if self.sparse and self.num_classes is not None:
            n = tf.cast(self.num_classes, y.dtype)
            checks.require(
                tf.reduce_all((y >= 0) & (y < n)),
                f"{fn}: class labels in `y` must lie in [0, {self.num_classes}); got min/max",
                tf.reduce_min(y),
                tf.reduce_max(y),
            )
        return checks

    # -- maths ----------------------------------------------------------------------------
    def _forward(self, theta, x, state):
        """Predictions as `MetaTrainer.evaluate` makes them: every layer in inference mode
        (no dropout), batch norm with the query batch's own statistics when
        `predict_training` (the transductive convention), else with `state`'s."""
        phi = self._phi()
        if self.predict_training and _has_batch_norm(self.model):
            state = batch_statistics(self.partition, theta, phi, x, state)
        y, _ = self.partition.call(theta, phi, x, state=state, training=False)
        return y

    def _loop(self, x, y, steps):
        """K full-batch steps of the inner rule from θ0 on (x, y), inside a tf.while_loop:
        each `warpkeras.objectives.task_step` (the rule's update, then the task
        variables' constraints), the rule's state from ``rule.init(θ0)``."""
        phi = self._phi()
        theta0 = self._theta0()
        state0 = self._state()
        rule = self.rule
        velocity0 = rule.init(theta0)

        def body(i, theta, velocity, state):
            step = objectives.task_step(
                self.partition,
                self.loss_fn,
                theta,
                phi,
                (x, y),
                None,
                velocity=velocity,
                state=state,
                training=self.training,
                rule=rule,
            )
            if self.training:
                state = [tf.cast(s, s0.dtype) for s, s0 in zip(step.state, state)]
            new_velocity = tf.nest.map_structure(
                lambda v, v0: tf.cast(v, v0.dtype), step.velocity, velocity
            )
            return i + 1, step.theta, new_velocity, state

        _, theta, _, state = tf.while_loop(
            lambda i, *_: i < steps,
            body,
            (tf.constant(0, steps.dtype), theta0, velocity0, state0),
        )
        if self.training and self.partition.state_variables:
            # The adapted model's moving statistics: the support set's at θ_K (after at
            # least one step; with none, the saved statistics of θ0 stay).
            state = tf.cond(
                steps > 0,
                lambda: batch_statistics(self.partition, theta, phi, x, state),
                lambda: [tf.identity(s) for s in state],
            )
        return theta, state

    # -- the three entry points (graph functions; inputs already typed) --------------------
    def _batch_shape(self, spec):
        return [None] + spec.shape.as_list()[1:]

    def _split(self, values, fn):
        """The flat entry-point arguments `values` of `fn` as ``(xs, y, steps, queries)``
        (lists of one tensor per model input for ``xs`` and ``queries``)."""
        k = len(self.inputs.specs)
        values = list(values)
        if fn == "predict":
            return values[:k], None, None, None
        xs, y, steps = values[:k], values[k], values[k + 1]
        return xs, y, steps, (values[k + 2 :] if fn == "adapt_and_predict" else None)

    def _guard_inputs(self, checks, xs):
        return [checks.guard(t, self._batch_shape(s)) for t, s in zip(xs, self.inputs.specs)]

    def _check_queries(self, checks, qs, role, fn):
        self._check_inputs(checks, qs, role, fn, min_rows=self.min_query_rows)
        for t, arg in zip(qs, self.inputs.arguments(role)):
            self._check_finite(checks, t, arg, fn)

    def predict(self, *values):
        xs, _, _, _ = self._split(values, "predict")
        checks = _Checks()
        self._check_queries(checks, xs, "x", "serving_default")
        x = self.inputs.pack(self._guard_inputs(checks, xs))
        return {"predictions": self._forward(self._theta0(), x, self._state())}

    def _guard_support(self, checks, xs, y, steps):
        x = self.inputs.pack(self._guard_inputs(checks, xs))
        y = checks.guard(y, self._batch_shape(self.y_spec))
        return x, y, checks.guard(steps, [])

    def adapt_with_state(self, *values):
        xs, y, steps, _ = self._split(values, "adapt")
        checks = self._support_checks(xs, y, steps, "adapt")
        x, y, steps = self._guard_support(checks, xs, y, steps)
        return self._loop(x, y, steps)

    def adapt_outputs(self, theta, state):
        """The ``adapt`` signature's outputs: task parameters, then (training-mode
        adaptation) the adapted moving statistics."""
        out = dict(zip(self.names, theta))
        out.update(zip(self.state_names, [state[i] for i in self.state_indices]))
        return out

    def adapt(self, *values):
        return self.adapt_outputs(*self.adapt_with_state(*values))

    def adapt_and_predict(self, *values):
        fn = "adapt_and_predict"
        xs, y, steps, qs = self._split(values, fn)
        checks = self._support_checks(xs, y, steps, fn)
        self._check_queries(checks, qs, "queries", fn)
        x, y, steps = self._guard_support(checks, xs, y, steps)
        queries = self.inputs.pack(self._guard_inputs(checks, qs))
        theta, state = self._loop(x, y, steps)
        return {"predictions": self._forward(theta, queries, state)}

    # -- specs for tf.function (unknown shapes, validated in the graph) -------------------
    def loose(self, spec, name=None):
        return tf.TensorSpec(None, spec.dtype, name=name)

    def arguments(self, fn):
        """``[(name, declared dtype, role)]`` of entry point `fn`'s flat (signature)
        arguments, in call order; `role` is "x", "y", "steps" or "queries" (one "x" and
        one "queries" argument per model input, see `_Inputs.argument`)."""

        def inputs(role):
            return [
                (self.inputs.argument(role, i), s.dtype, role)
                for i, s in enumerate(self.inputs.specs)
            ]

        args = inputs("x")
        if fn != "predict":
            args += [("y", self.y_spec.dtype, "y"), ("steps", tf.int32, "steps")]
        if fn == "adapt_and_predict":
            args += inputs("queries")
        return args

    def signature_function(self, fn):
        """`fn` ("predict", "adapt" or "adapt_and_predict") as a `tf.function` over its
        flat, named arguments (`arguments`), each declared with unknown shape."""
        args = self.arguments(fn)
        body = {
            "predict": self.predict,
            "adapt": self.adapt,
            "adapt_and_predict": self.adapt_and_predict,
        }[fn]
        return tf.function(
            _named(body, [n for n, _, _ in args]),
            input_signature=[tf.TensorSpec(None, d, name=n) for n, d, _ in args],
        )

    def _structure_name(self):
        """How the model takes its inputs: "tensor", "list", "tuple" or "dict"."""
        if self.inputs.single:
            return "tensor"
        return {dict: "dict", list: "list", tuple: "tuple"}.get(
            type(self.inputs.structure), type(self.inputs.structure).__name__
        )

    def metadata(self):
        return {
            "loss": self.loss_name,
            "learning_rate": self.learning_rate,
            "momentum": 0.0 if self.momentum is None else self.momentum,
            "inner_rule": json.dumps(self.rule.get_config()),
            "training": self.training,
            "predict_training": self.predict_training,
            "max_steps": self.max_steps,
            "max_rows": self.max_rows,
            "max_row_steps": self.max_row_steps,
            "max_elements": self.max_elements,
            "max_element_steps": self.max_element_steps,
            "example_elements": self.example_elements,
            "input_shape": (
                str(self.inputs.specs[0].shape.as_list())
                if self.inputs.single
                else json.dumps(
                    {n: s.shape.as_list() for n, s in zip(self.inputs.names, self.inputs.specs)}
                )
            ),
            "input_dtype": (
                self.inputs.specs[0].dtype.name
                if self.inputs.single
                else json.dumps(
                    {n: s.dtype.name for n, s in zip(self.inputs.names, self.inputs.specs)}
                )
            ),
            "input_structure": self._structure_name(),
            "inputs": json.dumps(self.inputs.describe()),
            "label_shape": str(self.y_spec.shape.as_list()),
            "label_dtype": self.y_spec.dtype.name,
            "steps_dtype": "int32",
            "task_parameters": ",".join(self.names),
            "state_parameters": ",".join(self.state_names),
        }


def _adapt_function(program):
    specs = [program.loose(s) for s in program.inputs.specs]
    return tf.function(
        program.adapt_with_state,
        input_signature=specs + [program.loose(program.y_spec), tf.TensorSpec([], tf.int32)],
    )


def _listing(names):
    """```a`, `b` and `c``` for argument names."""
    names = [f"`{n}`" for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _interleave(values, names):
    """``[v0, "in `n0`,", v1, "in `n1`", ...]`` for an assertion message."""
    out = []
    for i, (v, n) in enumerate(zip(values, names)):
        out += [v, f"in `{n}`" + ("," if i < len(values) - 1 else "")]
    return out


def _named(function, names):
    """`function(*values)` as a function whose parameters are called `names` (so that
    `tf.function` and the loaded SavedModel accept them as keywords)."""

    def call(*values):
        return function(*values)

    call.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    call.__name__ = getattr(function, "__name__", "call")
    return call


_PARAMETERS = {
    "predict": ["x"],
    "adapt": ["x", "y", "steps"],
    "adapt_and_predict": ["x", "y", "steps", "queries"],
}
# The most dtype combinations of the model's inputs traced for the dtype-tolerant
# functions of a model with several inputs (each combination is a concrete function).
_MAX_INPUT_COMBINATIONS = 16


def _input_dtype_combinations(program):
    """Dtype combinations of the model's inputs traced by the dtype-tolerant functions:
    every combination of `_castable` dtypes while there are at most
    `_MAX_INPUT_COMBINATIONS`; beyond that, one dtype for every input with the same
    declared dtype, with each input also alone at its declared dtype."""
    declared = [s.dtype for s in program.inputs.specs]
    options = [_castable(d, "x") for d in declared]
    full = 1
    for o in options:
        full *= len(o)
    if full <= _MAX_INPUT_COMBINATIONS:
        combos = [[]]
        for o in options:
            combos = [c + [d] for c in combos for d in o]
        return combos
    combos = []
    for d in options[0]:
        combo = []
        for dtype, o in zip(declared, options):
            combo.append(d if d in o and dtype == declared[0] else dtype)
        combos.append(combo)
    for i, o in enumerate(options):
        for d in o[1:]:
            combos.append(declared[:i] + [d] + declared[i + 1 :])
    unique = []
    for c in combos:
        if c not in unique:
            unique.append(c)
    return unique


def _tolerant(program, fn, typed, tolerant=True):
    """The Python-client function of entry point `fn`: a `tf.function` over ``x``, ``y``,
    ``steps`` and ``queries`` (``x`` and ``queries`` in the model's input structure: a
    tensor, or a list / tuple / dict of tensors) that checks the dtypes, casts and calls
    `typed` (the signature function, over flat arguments).

    With `tolerant`, concrete functions are traced for every combination of accepted
    dtypes of `_castable` (each query input shares the dtype of its ``x`` input; several
    model inputs: see `_input_dtype_combinations`) and for the dtypes of `_refused`, one
    argument off at a time, which fail with a message naming the argument and the dtype it
    must have. Without it (several inputs only), only the declared dtypes are traced.
    A model with list or tuple inputs accepts both lists and tuples."""
    args = program.arguments(fn)
    inputs = program.inputs
    params = _PARAMETERS[fn]
    display = "serving_default" if fn == "predict" else fn
    accepted = [_castable(dtype, role) for _, dtype, role in args]

    def flat_values(values):
        flat = []
        for p, v in zip(params, values):
            flat += keras.tree.flatten(v) if p in ("x", "queries") else [v]
        return flat

    def call(*values):
        values = flat_values(values)
        for (name, dtype, _), ok, value in zip(args, accepted, values):
            if value.dtype not in ok:
                message = (
                    f"{display}: `{name}` must be {_dtype_text(dtype)}; got "
                    f"{value.dtype.name}. Cast it before sending."
                )
                with tf.control_dependencies([tf.debugging.Assert(tf.constant(False), [message])]):
                    if fn == "adapt":
                        return program.adapt_outputs(program._theta0(), program._state())
                    out = program.out_spec.shape.as_list()[1:]
                    return {"predictions": tf.zeros([0] + out, program.out_spec.dtype)}
        cast = []
        for (_, dtype, role), value in zip(args, values):
            if value.dtype != dtype:
                if role == "steps":  # saturate, so the range checks still see the excess
                    value = tf.clip_by_value(value, -_INT32_MAX - 1, _INT32_MAX)
                value = tf.cast(value, dtype)
            cast.append(value)
        return typed(*cast)

    function = tf.function(_named(call, params))
    k = len(inputs.specs)
    others = [i for i, (_, _, role) in enumerate(args) if role in ("y", "steps")]
    if tolerant:
        x_combos = _input_dtype_combinations(program) if k > 1 else [[d] for d in accepted[0]]
        combos = [[]]
        for i in others:
            combos = [c + [d] for c in combos for d in accepted[i]]
        combos = [
            x + c + (x if fn == "adapt_and_predict" else []) for x in x_combos for c in combos
        ]
        for i, (_, dtype, role) in enumerate(args):
            for got in _refused(dtype, role):
                combo = [d for _, d, _ in args]
                combo[i] = got
                combos.append(combo)
    else:
        combos = [[d for _, d, _ in args]]
    for combo in combos:
        specs = [tf.TensorSpec(None, d, name=n) for (n, _, _), d in zip(args, combo)]
        for structured in _structures(inputs, fn, specs):
            function.get_concrete_function(*structured)
    return function


def _structures(inputs, fn, specs):
    """The Python-client argument structures for the flat `specs` of `fn`: ``x`` and
    ``queries`` packed into the model's input structure (and, for list/tuple inputs, also
    the other sequence type)."""
    k = len(inputs.specs)
    if inputs.single:
        return [specs]
    xs, rest = specs[:k], specs[k:]
    qs = rest[2:] if fn == "adapt_and_predict" else None
    variants = [inputs.pack]
    if not isinstance(inputs.structure, dict):
        variants.append(lambda flat: _swap_sequences(inputs.pack(flat)))
    out = []
    for pack in variants:
        args = [pack(xs)] + rest[:2]
        if qs is not None:
            args.append(pack(qs))
        out.append(args)
    return out


def _swap_sequences(structure):
    """`structure` with its outer list as a tuple or its outer tuple as a list."""
    return tuple(structure) if isinstance(structure, list) else list(structure)


# --- export -------------------------------------------------------------------------------
def _is_url(path):
    return "://" in path  # gs://, s3://, hdfs://: TensorFlow's file systems


def _check_path(path, overwrite, where):
    """Validates the export folder (local, or a URL TensorFlow's file systems handle),
    after recovering a model that a killed export left beside it (`recover`)."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(
            f"{where}: path must be a folder path (str or os.PathLike); got "
            f"{_validation.describe(path)}."
        )
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{where}: path is empty; give the SavedModel folder to write.")
    fs = tf.io.gfile
    if fs.exists(path) and not fs.isdir(path):
        raise FileExistsError(
            f"{where}: path {path!r} is a file; choose a folder for the SavedModel."
        )
    recover(path, where=where, _stacklevel=4)  # the warning points at the caller
    if fs.exists(path) and fs.listdir(path):
        if not overwrite:
            raise FileExistsError(
                f"{where}: {path!r} already exists and is not empty; pass "
                "overwrite=True to replace it, or choose another folder."
            )
        if not _is_saved_model(path):
            names = set(n.rstrip("/") for n in fs.listdir(path))
            hint = ""
            if names and names <= {"variables", "fingerprint.pb", "assets", "assets.extra"}:
                hint = (
                    " It holds what a SavedModel holds except saved_model.pb, as a "
                    "replacement cut short by an earlier warpkeras version leaves it; "
                    "that version's staging folder (.export-*) beside it may hold the "
                    "complete new model."
                )
            raise FileExistsError(
                f"{where}: {path!r} exists and is not a SavedModel; refusing to replace "
                "it even with overwrite=True. Remove it yourself or choose another "
                "folder." + hint
            )
    if _is_url(path):
        return path
    return _validation.check_directory(path, "path", allow_none=False, where=where)


# --- atomic replacement of an export folder -----------------------------------------------
# An export is written to a staging folder beside `path`, renamed to a "ready" folder once
# complete, and then swapped with `path` (one atomic exchange of the two names where the
# system has one, else: old model aside, new model in); the old model is deleted last.
# Every name is `.<folder name>.warpkeras-<kind>-<host>-<pid>-<token>`, so the next export
# or `load` can tell a killed process's leftovers from a running export's folders.
_STAGING, _READY, _OLD = "staging", "ready", "old"
_MARK = ".warpkeras-"


def _export_step(step):
    """Called at each step of replacing an export folder ("ready", "aside", "moved_in",
    "swapped", "removing_old"); a no-op (fault-injection tests replace it)."""


def _is_saved_model(path):
    return tf.io.gfile.exists(_join(path, "saved_model.pb"))


def _join(parent, name):
    return parent.rstrip("/") + "/" + name if _is_url(parent) else os.path.join(parent, name)


def _split_path(path):
    path = path.rstrip("/") or path
    if _is_url(path):
        parent, _, base = path.rpartition("/")
        return parent, base
    path = os.path.abspath(path)
    return os.path.dirname(path), os.path.basename(path)


def _sibling(path, kind):
    parent, base = _split_path(path)
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
    token = secrets.token_hex(4)
    return _join(parent, f".{base}{_MARK}{kind}-{host}-{os.getpid()}-{token}")


def _leftovers(path):
    """``[(folder, kind, live)]``: the staging, ready and old folders of exports to `path`
    (``live``: made by a running process on this host, or on another host)."""
    parent, base = _split_path(path)
    prefix = f".{base}{_MARK}"
    fs = tf.io.gfile
    if not fs.isdir(parent):
        return []
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
    out = []
    for name in fs.listdir(parent):
        name = name.rstrip("/")
        if not name.startswith(prefix):
            continue
        m = re.fullmatch(r"(staging|ready|old)-(.+)-(\d+)-([0-9a-f]+)", name[len(prefix) :])
        if m is None:
            continue
        kind, owner, pid = m.group(1), m.group(2), int(m.group(3))
        out.append((_join(parent, name), kind, owner != host or _alive(pid)))
    return out


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _rmtree(path):
    if tf.io.gfile.exists(path):
        if _is_url(path):
            try:
                tf.io.gfile.rmtree(path)
            except tf.errors.NotFoundError:  # a listing artefact of a flat object store
                for folder, _, files in list(tf.io.gfile.walk(path, topdown=False)):
                    for name in files + [""]:
                        with contextlib.suppress(tf.errors.OpError):
                            target = _join(folder, name) if name else folder
                            if tf.io.gfile.isdir(target):
                                tf.io.gfile.rmtree(target)
                            else:
                                tf.io.gfile.remove(target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _mtime(path):
    try:
        return tf.io.gfile.stat(path).mtime_nsec
    except tf.errors.OpError:
        return 0


def recover(path, where="recover", *, _stacklevel=2):
    """Completes or undoes an export to `path` that was killed part-way.

    An export writes the new SavedModel into a staging folder beside `path` and then
    replaces `path` in one step (see `export_adaptive`), so a killed export leaves `path`
    holding the old or the new model, and at most a folder beside it. On systems without an
    atomic exchange of two folders there is an instant in which `path` does not exist; if
    the process is killed then, this function moves the new model (or, if it was not
    complete, the old one) back to `path`. On a URL (``gs://``, ...; object stores rename
    file by file) `path` is a SavedModel only once copied in full; a copy cut short is
    done again from the complete staging folder. Leftovers of processes that have ended
    (on this host) are then removed. Each action gives a `UserWarning` naming the folders.
    `export_adaptive`, `MetaTrainer.export` and `load` call it first; folders of running
    exports and of other hosts are left alone.

    Args:
        path: the SavedModel folder (str or `os.PathLike`).
        where: the function named in warnings.

    Returns:
        The path (a str).
    """
    stacklevel = _stacklevel
    path = os.fspath(path)
    if not _is_url(path) and os.path.islink(path.rstrip("/")):
        path = os.path.realpath(path)
    stale = [(f, kind) for f, kind, live in _leftovers(path) if not live]
    if not stale:
        return path
    fs = tf.io.gfile
    if _is_url(path):
        done = [f for f, k in stale if k == _STAGING and fs.exists(_join(f, _COMPLETE))]
        if done and not _is_saved_model(path):
            newest = max(done, key=_mtime)
            _replace_url(newest, path)
            stale = [(f, k) for f, k in stale if f != newest]
            warnings.warn(
                f"{where}: {path!r} was incomplete after an export was interrupted; "
                f"copied the new model from {newest!r}.",
                stacklevel=stacklevel,
            )
    elif not fs.exists(path):
        for kind in (_READY, _OLD):
            candidates = sorted((f for f, k in stale if k == kind), key=_mtime, reverse=True)
            candidates = [f for f in candidates if _is_saved_model(f)]
            if candidates:
                fs.rename(candidates[0], path)
                stale = [(f, k) for f, k in stale if f != candidates[0]]
                what = "new" if kind == _READY else "previous"
                warnings.warn(
                    f"{where}: {path!r} was missing after an export was interrupted; "
                    f"restored the {what} model from {candidates[0]!r}.",
                    stacklevel=stacklevel,
                )
                break
    if not stale:
        return path
    for f, _ in stale:
        _rmtree(f)
    warnings.warn(
        f"{where}: removed what an interrupted export to {path!r} left behind: "
        + ", ".join(repr(os.path.basename(f)) for f, _ in stale)
        + ".",
        stacklevel=stacklevel,
    )
    return path


def _exchange(a, b):
    """Atomically swaps the names of folders `a` and `b` (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or file system does not support it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD
        return True
    return False


def _find_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _find_renameat2()


def _save(module, path, signatures, metadata):
    """Saves `module` at `path`, replacing what is there (already checked).

    The SavedModel (and ``assets.extra/warpkeras_metadata.json``) is written to a staging
    folder beside `path`, created by TensorFlow's file system as Keras's `model.export`
    creates its folder (so the modes follow the process umask alike). Once complete, on a
    local file system it is renamed "ready" and then replaces `path` in one atomic exchange
    (Linux), or else the old model is moved aside and the new one in; the old one is
    deleted last. On a URL (object stores rename file by file), see `_replace_url`.
    """
    fs = tf.io.gfile
    if not _is_url(path) and os.path.islink(path.rstrip("/")):
        path = os.path.realpath(path)  # replace the folder a link points to, not the link
    parent, _ = _split_path(path)
    fs.makedirs(parent)
    staging = _sibling(path, _STAGING)
    try:
        fs.makedirs(staging)  # TensorFlow's modes and the umask, as Keras's export
        tf.saved_model.save(module, staging, signatures=signatures)
        extra = _join(staging, "assets.extra")
        fs.makedirs(extra)
        with fs.GFile(_join(extra, METADATA_FILE), "w") as f:
            f.write(json.dumps(metadata, indent=1, sort_keys=True) + "\n")
        if _is_url(path):
            with fs.GFile(_join(staging, _COMPLETE), "w") as f:
                f.write("")
        else:
            ready = _sibling(path, _READY)
            fs.rename(staging, ready)
    except BaseException:
        _rmtree(staging)
        raise
    if _is_url(path):
        _replace_url(staging, path)
        return
    _export_step("ready")
    if fs.exists(path):
        if _exchange(ready, path):
            old = ready
            _export_step("swapped")
        else:
            old = _sibling(path, _OLD)
            fs.rename(path, old)
            _export_step("aside")
            fs.rename(ready, path)
            _export_step("moved_in")
        _export_step("removing_old")
        _rmtree(old)
    else:
        fs.rename(ready, path)
        _export_step("moved_in")


# Written last into a complete staging folder on a URL.
_COMPLETE = ".warpkeras-complete"


def _replace_url(staging, path):
    """Replaces the SavedModel at URL `path` by the complete one in `staging`: the old
    ``saved_model.pb`` is deleted first and the new one copied last, so `path` is a
    SavedModel only when complete, and `recover` copies `staging` again after a crash."""
    fs = tf.io.gfile
    if fs.exists(path):
        if _is_saved_model(path):
            fs.remove(_join(path, "saved_model.pb"))
        _rmtree(path)
    last = None
    for folder, _, files in fs.walk(staging):
        rel = folder[len(staging) :].lstrip("/")
        target = _join(path, rel) if rel else path
        fs.makedirs(target)
        for name in files:
            if not fs.exists(_join(folder, name)):
                continue  # a listing artefact of a flat object store
            if rel == "" and name == "saved_model.pb":
                last = (_join(folder, name), _join(target, name))
            elif not (rel == "" and name == _COMPLETE):
                fs.copy(_join(folder, name), _join(target, name), overwrite=True)
    fs.copy(*last, overwrite=True)
    _rmtree(staging)


def load(path):
    """Loads a SavedModel written by `export_adaptive`, after `recover`.

    Equivalent to ``tf.saved_model.load(path)`` once an interrupted export to `path` (if
    any) is completed or undone.

    Args:
        path: the SavedModel folder (str or `os.PathLike`).

    Returns:
        The loaded object (signatures, ``metadata()``, ``predict``, ``adapt``, ...).

    Raises:
        FileNotFoundError: there is no SavedModel at `path`.
    """
    path = recover(path, where="load", _stacklevel=3)
    if not _is_saved_model(path):
        raise FileNotFoundError(f"load: no SavedModel at {path!r} (no saved_model.pb).")
    return tf.saved_model.load(path)


def read_metadata(path):
    """The metadata of a SavedModel written by `export_adaptive`, as Python values.

    Reads ``assets.extra/warpkeras_metadata.json`` in the SavedModel folder (no TensorFlow
    needed): strings are `str`, flags `bool`, counts `int`, rates `float`, and ``inputs`` a
    list of dicts. The loaded object's ``metadata()`` holds the same values as tensors
    (strings as ``tf.string``, whose ``.numpy()`` is `bytes`; flags as int32).

    Args:
        path: the SavedModel folder (str or `os.PathLike`).

    Returns:
        A dict.
    """
    with tf.io.gfile.GFile(_join(os.fspath(path), "assets.extra/" + METADATA_FILE)) as f:
        return json.load(f)


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
    predict_training=None,
    max_elements=None,
    max_element_steps=None,
    max_rows=None,
    max_row_steps=None,
    overwrite=False,
    dtype_tolerant=True,
    rule=None,
):
    """Exports a meta-learned model as a SavedModel that adapts itself to new tasks.

    The SavedModel holds copies of θ0 (task variables), φ (warp variables), frozen variables
    and the model's non-trainable state, and three signatures (run by TensorFlow alone, e.g.
    in TF Serving):

    * ``serving_default``: input ``x``; output ``predictions`` at (θ0, φ).
    * ``adapt``: inputs ``x``, ``y`` (the support set) and ``steps`` (int32 scalar); runs
      ``steps`` full-batch inner steps θ ← θ − α ∇L(θ; φ) (heavy-ball with `momentum`,
      or the steps of `rule`; each `warpkeras.objectives.task_step`, constraints of the
      task variables applied after every step) in a ``tf.while_loop`` from θ0;
      outputs one tensor per task variable, named by `task_parameter_names`, and with
      ``training=True`` also the adapted moving statistics (one tensor per floating
      state variable, e.g. ``model_bn_moving_mean``; listed in the metadata's
      ``state_parameters``).
    * ``adapt_and_predict``: inputs ``x``, ``y``, ``steps``, ``queries``; output
      ``predictions`` of the adapted model on ``queries``.

    A model with several inputs takes one argument per input in place of ``x`` and of
    ``queries``: ``x_<name>`` and ``queries_<name>``, named by the inputs' dict keys or
    ``keras.Input`` layer names (see the module docstring and the second example).

    The loaded object also has ``metadata()`` (loss, learning rate, default ``steps``,
    budgets, modes, dtypes, the inputs' names and specs, ...) and dtype-tolerant functions
    ``predict``, ``adapt`` and ``adapt_and_predict`` for Python clients, which take ``x``
    and ``queries`` in the model's input structure (see the module docstring).
    Inputs are declared with unknown shapes and checked in the graph, so bad requests
    raise ``InvalidArgumentError`` with a message such as ``adapt: `x` must have shape
    [batch, 4]; got shape [5 3]``.

    **Work per request** is bounded in numbers (tensor elements), not rows, since one row
    of a sequence or image model of unknown size can be any size. The limits, recorded
    in the metadata: ``steps`` ≤ `max_steps`; ``x`` (all inputs together) and ``queries``
    each hold at most `max_elements` numbers; and the numbers in ``x`` × ``steps`` ≤
    `max_element_steps` (an adaptation costs about that many forward-backward passes of
    one number). The defaults follow from the model's input spec, with E the numbers in
    one example of all inputs (``example_elements`` in the metadata; unknown dimensions
    counted as 1): `max_elements` = 10 000 × E; `max_element_steps` = 1 000 000 × E when
    E is fixed by the spec (10 000 examples, 10⁶ example-steps), but 10 000 × E when a
    dimension is unknown (an LSTM(32) over ``keras.Input((None, 8))``: 80 000 numbers ×
    steps, e.g. one sequence of 1 000 time steps adapted for 10 steps, which took 1.9 s on
    a shared 2-core Xeon).
    Over-budget requests fail with an ``InvalidArgumentError`` naming the limit and the
    request's size before any work is done. The row limits `max_rows` and
    `max_row_steps` of earlier versions still apply where given.

    **Modes (batch normalisation, dropout).** Adaptation steps run the model in mode
    `training`: with True, batch-norm layers normalise with the statistics of the support
    set; with False they use the saved moving statistics. Predictions run in mode
    `predict_training` (default: `training`): True normalises with the statistics of the
    predicted batch (``x`` or ``queries``: send the whole query set in one request; a
    batch-norm model then needs at least 2 examples), False with moving statistics: after
    ``steps`` ≥ 1 training-mode steps, the support set's statistics at the adapted
    parameters (`batch_statistics`), else the saved ones. `MetaTrainer.export` passes
    ``training=True`` and ``predict_training=eval_training_mode``, so the served
    predictions equal `MetaTrainer.evaluate`'s.

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
                              from_logits=True, learning_rate=0.1, steps=5, overwrite=True)
    served = tf.saved_model.load("saved_models/demo")
    out = served.signatures["adapt_and_predict"](
        x=tf.random.normal((10, 4)), y=tf.constant(np.arange(10) % 3),
        steps=tf.constant(5), queries=tf.random.normal((2, 4)))
    print(out["predictions"].shape)  # (2, 3)
    ```

    A model with two inputs, given as a dict:

    ```python
    image, meta = keras.Input((8, 8, 1), name="image"), keras.Input((4,), name="meta")
    h = keras.layers.Concatenate()([keras.layers.Flatten()(image), meta])
    h = warpkeras.warp(keras.layers.Dense(8, activation="tanh"))(h)
    model = keras.Model({"image": image, "meta": meta}, keras.layers.Dense(3)(h))
    warpkeras.export_adaptive(model, "saved_models/two", loss="sparse_categorical_crossentropy",
                              from_logits=True, learning_rate=0.1, overwrite=True)
    served = tf.saved_model.load("saved_models/two")
    x = {"image": tf.random.normal((10, 8, 8, 1)), "meta": tf.random.normal((10, 4))}
    q = {"image": tf.random.normal((2, 8, 8, 1)), "meta": tf.random.normal((2, 4))}
    y, steps = tf.constant(np.arange(10) % 3), tf.constant(5)
    out = served.signatures["adapt_and_predict"](     # flat, named arguments
        x_image=x["image"], x_meta=x["meta"], y=y, steps=steps,
        queries_image=q["image"], queries_meta=q["meta"])
    same = served.adapt_and_predict(x=x, y=y, steps=steps, queries=q)  # the model's structure
    ```

    Args:
        model: a built, meta-learned `keras.Model` with a single output tensor and one
            input tensor or several (a list, tuple or dict of inputs).
        path: the SavedModel directory to write (str or `os.PathLike`).
        loss: the inner-loop loss: a Keras loss object, a name (``"mse"``,
            ``"sparse_categorical_crossentropy"``, ...) or a traceable function
            ``loss(y_true, y_pred)``; `None` uses the model's compiled loss.
        learning_rate: α of the inner steps (a finite number > 0).
        momentum: μ in [0, 1) of heavy-ball inner steps, or `None` for plain SGD.
        steps: the default number of inner steps, recorded in the metadata (the signatures
            take the step count as an input); an integer in [0, `max_steps`].
        from_logits: for losses given by name: whether predictions are logits (bool or
            `None`).
        input_spec: the input batch as a `tf.TensorSpec` (leading dimension `None`) or a
            tuple of per-example dimensions; for several inputs a list, tuple or dict of
            those (one level; a dict's keys, or the specs' names, name the inputs, and
            the model is called with that structure); default: from the model's
            `keras.Input` tensors.
        label_spec: the label batch, same forms; default: int64 class ids of shape
            ``[batch]`` for sparse cross-entropies, else the model output's shape and dtype.
        untagged: role of untagged layers (see `warpkeras.partition`).
        training: run the model in training mode during adaptation (bool; see "Modes").
        max_steps: largest accepted ``steps`` input (an integer in [0, 2³¹ − 1]).
        predict_training: batch norm in predictions normalises with the predicted batch's
            statistics (bool; `None`: `training`); every other layer predicts in
            inference mode.
        max_elements: most numbers (tensor elements) in ``x`` (all inputs together) and in
            ``queries`` per request (an integer ≥ 1; `None`: 10 000 examples' worth, see
            "Work per request").
        max_element_steps: most numbers in ``x`` × ``steps`` per adaptation request (an
            integer ≥ 1; `None`: the default of "Work per request").
        max_rows: optionally, most examples in ``x`` and in ``queries`` per request too (an
            integer ≥ 1, or `None` for no row limit).
        max_row_steps: optionally, most rows × steps per adaptation request too (an
            integer ≥ 1, or `None` for no such limit).
        overwrite: replace an existing SavedModel at `path` (bool). Without it an existing,
            non-empty folder is refused; a folder that is not a SavedModel is never
            replaced. The new model replaces the old one as a whole, once complete (see
            "Files" in the module docstring).
        dtype_tolerant: make the loaded object's functions ``predict``, ``adapt`` and
            ``adapt_and_predict`` (for Python clients) accept several dtypes (bool; this
            about doubles the export time, and with several inputs about triples it). With
            False they take the signatures' dtypes only (with several inputs, still in the
            model's input structure); the signatures are the same either way.
        rule: the inner rule the adaptation steps with, a built `warpkeras.rules.InnerRule`
            (e.g. ``trainer.inner_rule``: `warpkeras.rules.MetaSGD` with its learned α, or
            `warpkeras.KFAC`), traced into the SavedModel with its variables; then
            `learning_rate` and `momentum` are not used. `None` (default): SGD with
            `learning_rate` and `momentum`. The metadata's ``inner_rule`` holds the
            rule's configuration (JSON).

    Returns:
        The path written (a str).

    Raises:
        TypeError, ValueError: a bad argument (the message names it and the fix).
        FileExistsError: `path` exists (see `overwrite`) or is a file.
    """
    where = "export_adaptive"
    overwrite = _validation.check_bool(overwrite, "overwrite", where=where)
    dtype_tolerant = _validation.check_bool(dtype_tolerant, "dtype_tolerant", where=where)
    path = _check_path(path, overwrite, where)
    max_steps_ok = _validation.check_int(
        max_steps, "max_steps", minimum=0, maximum=_INT32_MAX, where=where, example=10000
    )
    steps = _validation.check_int(
        steps, "steps", minimum=0, maximum=max_steps_ok, where=where, example=min(5, max_steps_ok)
    )
    program = _Program(
        model,
        loss,
        from_logits,
        learning_rate,
        momentum,
        training,
        input_spec,
        label_spec,
        untagged,
        max_steps,
        predict_training,
        max_rows,
        max_row_steps,
        max_elements,
        max_element_steps,
        where=where,
        rule=rule,
    )
    module = tf.Module(name="warpkeras_adaptive")
    # Track the model's variables (the underlying tf.Variables) so the saved graphs can
    # capture them: θ0, φ, frozen variables and the non-trainable state.
    module.model_variables = [v.value for v in model.variables]
    # and the inner rule's (Meta-SGD's α), which the adaptation loop reads
    module.rule_variables = [getattr(v, "value", v) for v in program.rule.variables]
    # And the resources of its layers that are not variables (the lookup tables of
    # StringLookup, IntegerLookup, TextVectorization, ...), which Keras's `model.export`
    # saves by tracking the whole model; tracking only these keeps the optimiser's slots
    # of a compiled model out of the SavedModel.
    module.model_resources = _resources(model)
    module.serve = program.signature_function("predict")
    module.signature_adapt = program.signature_function("adapt")
    module.signature_adapt_and_predict = program.signature_function("adapt_and_predict")
    typed = {
        "predict": module.serve,
        "adapt": module.signature_adapt,
        "adapt_and_predict": module.signature_adapt_and_predict,
    }
    for fn, target in typed.items():
        if dtype_tolerant or not program.inputs.single:
            target = _tolerant(program, fn, target, tolerant=dtype_tolerant)
        setattr(module, fn, target)  # single input without dtype_tolerant: the signature
    meta = dict(program.metadata(), default_steps=steps)
    constants = {k: tf.constant(v if not isinstance(v, bool) else int(v)) for k, v in meta.items()}
    module.metadata = tf.function(lambda: dict(constants), input_signature=[])
    signatures = {
        "serving_default": module.serve.get_concrete_function(),
        "adapt": module.signature_adapt.get_concrete_function(),
        "adapt_and_predict": module.signature_adapt_and_predict.get_concrete_function(),
    }
    _save(module, path, signatures, _json_metadata(meta))
    return path


def _resources(model):
    """The `tf.saved_model.experimental.TrackableResource` objects (lookup tables, ...)
    reachable from `model`, in TensorFlow's tracking order."""
    return [
        r
        for r in tf.train.TrackableView(model).descendants()
        if isinstance(r, tf.saved_model.experimental.TrackableResource)
    ]


def _json_metadata(meta):
    """`meta` with the JSON-encoded values decoded (for `METADATA_FILE`)."""
    out = {}
    for k, v in meta.items():
        if k == "inputs" or (k in ("input_shape", "input_dtype") and v.startswith("{")):
            v = json.loads(v)
        out[k] = v
    return out


# --- in-process adaptation ------------------------------------------------------------------
def _run_adapt(
    model,
    x,
    y,
    steps,
    loss,
    learning_rate,
    momentum,
    from_logits,
    training,
    untagged,
    input_spec,
    label_spec,
    where,
    rule=None,
):
    steps = _validation.check_int(
        steps, "steps", minimum=0, maximum=_INT32_MAX, where=where, example=5
    )
    program = _Program(
        model,
        loss,
        from_logits,
        learning_rate,
        momentum,
        training,
        input_spec,
        label_spec,
        untagged,
        max_steps=steps,
        max_elements=_ELEMENTS_MAX,
        max_element_steps=_ELEMENTS_MAX,
        where=where,
        rule=rule,
    )
    fn = _adapt_function(program)
    inputs = program.inputs
    xs = [
        _typed_input(v, name, s.dtype, where, role="x")
        for v, name, s in zip(inputs.flatten(x, "x", where), inputs.arguments("x"), inputs.specs)
    ]
    y = _typed_input(y, "y", program.y_spec.dtype, where)
    theta, state = fn(*xs, y, tf.constant(steps, tf.int32))
    return program, theta, state


def _typed_input(value, name, dtype, where, role=None):
    """`value` as a tensor of `dtype`, cast from the dtypes `_castable` lists for `role`
    (default: `name`); others are refused with a message naming the argument."""
    try:
        t = tf.convert_to_tensor(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{where}: `{name}` must be an array or tensor of {_dtype_text(dtype)}; could "
            f"not convert {_validation.describe(value)}: {err}"
        ) from None
    if t.dtype == dtype:
        return t
    if t.dtype not in _castable(dtype, role or name):
        raise TypeError(
            f"{where}: `{name}` must be {_dtype_text(dtype)}; got {t.dtype.name}. Cast it first."
        )
    return tf.cast(t, dtype)


def adapt_task_values(
    model,
    x,
    y,
    steps,
    loss=None,
    learning_rate=0.01,
    momentum=None,
    from_logits=None,
    training=False,
    untagged="task",
    input_spec=None,
    label_spec=None,
    rule=None,
):
    """Adapted task parameters after `steps` warped SGD steps on (x, y), by name.

    The same computation as the ``adapt`` signature of `export_adaptive` (same names, same
    rule), run in this process; the model is not changed.

    Example:

    ```python
    values = warpkeras.adapt_task_values(model, x, y, steps=5, loss="mse",
                                         learning_rate=0.1)
    ```

    Args:
        model: as in `export_adaptive`.
        loss: as in `export_adaptive`.
        learning_rate: as in `export_adaptive`.
        momentum: as in `export_adaptive`.
        from_logits: as in `export_adaptive`.
        training: as in `export_adaptive`.
        untagged: as in `export_adaptive`.
        input_spec: as in `export_adaptive`.
        label_spec: as in `export_adaptive`.
        rule: as in `export_adaptive`.
        x: the support inputs (an array or tensor in the model's input structure: an
            array, or a list / tuple / dict of arrays for a model with several inputs).
        y: the support labels (an array or tensor).
        steps: the number of inner steps.

    Returns:
        A dict from `task_parameter_names` to tensors.
    """
    program, theta, _ = _run_adapt(
        model,
        x,
        y,
        steps,
        loss,
        learning_rate,
        momentum,
        from_logits,
        training,
        untagged,
        input_spec,
        label_spec,
        "adapt_task_values",
        rule=rule,
    )
    return dict(zip(program.names, theta))


def _layers(model):
    """Every layer of `model`, nested models' layers included, in order."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out += _layers(layer)
    return out


def _copy_assets(source, target):
    """Copies what layers keep outside variables and config (the vocabulary that
    `TextVectorization`, `StringLookup` or `IntegerLookup` learnt by ``adapt``) from the
    layers of `source` to those of its clone `target`, through Keras's saving hooks
    ``save_assets`` / ``load_assets``."""
    for a, b in zip(_layers(source), _layers(target)):
        if hasattr(a, "save_assets") and hasattr(b, "load_assets"):
            with tempfile.TemporaryDirectory() as folder:
                a.save_assets(folder)
                b.load_assets(folder)


def _copy_roles(source, target):
    src = list(source._flatten_layers(include_self=True, recursive=True))
    dst = list(target._flatten_layers(include_self=True, recursive=True))
    if len(src) != len(dst):
        return
    for a, b in zip(src, dst):
        role = roles.role_of(a)
        if role is not None and roles.role_of(b) is None:
            roles.tag(b, role)


def adapt(
    model,
    x,
    y,
    steps,
    loss=None,
    learning_rate=0.01,
    momentum=None,
    from_logits=None,
    training=False,
    untagged="task",
    copy=True,
    input_spec=None,
    label_spec=None,
    rule=None,
):
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
        x: the support inputs, in the model's input structure (an array, or a list /
            tuple / dict of arrays for a model with several inputs).
        y: the support labels.
        steps: the number of full-batch inner steps.
        loss: as in `export_adaptive`.
        learning_rate: as in `export_adaptive`.
        momentum: as in `export_adaptive`.
        from_logits: as in `export_adaptive`.
        training: as in `export_adaptive`.
        untagged: as in `export_adaptive`.
        input_spec: as in `export_adaptive`.
        label_spec: as in `export_adaptive`.
        rule: as in `export_adaptive`.
        copy: return a clone (made with `keras.models.clone_model`, tags copied) and leave
            `model` unchanged; with ``copy=False`` the task variables of `model` itself are
            assigned the adapted values. With ``training=True`` the adapted model also gets
            the non-trainable state (batch-norm moving statistics) as updated by the
            adaptation steps, as ``adapt_and_predict`` of `export_adaptive` uses it.

    Returns:
        The adapted model.
    """
    copy = _validation.check_bool(copy, "copy", where="adapt")
    program, theta, state = _run_adapt(
        model,
        x,
        y,
        steps,
        loss,
        learning_rate,
        momentum,
        from_logits,
        training,
        untagged,
        input_spec,
        label_spec,
        "adapt",
        rule=rule,
    )
    if not copy:
        program.partition.assign_task(theta)
        if program.training:
            program.partition.assign_state(state)
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
    _copy_assets(model, clone)
    _copy_roles(model, clone)
    trainable = clone.trainable_variables
    for i, t in zip(program.partition.task_indices, theta):
        trainable[i].assign(t)
    if program.training:
        for v, t in zip(clone.non_trainable_variables, state):
            v.assign(t)
    return clone
