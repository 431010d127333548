"""The task loss, computed as `keras.Model.compile` / `fit` / `evaluate` compute it.

Every loss of warpkeras (the inner loop's task loss, the meta loss, evaluation's test loss,
the exported program's adaptation loss, KFAC's likelihood) goes through one `TaskLoss`:

* the loss configuration is Keras's own: a name (``"mse"``, ``"crossentropy"``), a
  `keras.losses.Loss`, a function ``fn(y_true, y_pred)``, or a dict / list of them per
  output, with ``loss_weights``, resolved by the same code as ``model.compile(loss=...)``;
* the loss of each output is reduced by a Keras `Loss` object, so masks that layers attach
  to the outputs (`Masking`, `Embedding(mask_zero=True)`) and per-example sample weights
  count exactly as in ``model.fit``;
* the kind of each output's loss (binary, categorical or sparse categorical
  cross-entropy, from logits or not) is decided here once, by identity with Keras's loss
  functions (never by guessing from names), for accuracy, label checks and likelihoods.

Labels that come with sample weights travel through the trainers as one `Targets` value
(``(x, Targets(y, sample_weight))`` batches), so every step function keeps its
``(x, y)`` signature.
"""

import copy
import functools
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

__all__ = ["Targets", "TaskLoss", "LossKind", "as_task_loss", "split_targets", "keras_compile_loss"]


class Targets(NamedTuple):
    """Labels with per-example weights, as the ``(x, y, sample_weight)`` of `model.fit`.

    A `tf.nest` structure: batches ``(x, Targets(y, w))`` stack, trace and vectorise like
    ``(x, y)``.
    """

    y: object
    """The labels (one array, or a dict / list per output)."""
    sample_weight: object
    """Per-example weights: one array of shape ``[batch]`` (or ``[batch, steps]`` for
    per-time-step weights) for every output, or a structure matching `y`."""


def split_targets(y):
    """``(labels, sample_weight)`` of `y` (a `Targets` or plain labels; weight `None`)."""
    if isinstance(y, Targets):
        return y.y, y.sample_weight
    return y, None


def split_batch(batch):
    """``(x, y, sample_weight)`` of a batch ``(x, y)``, ``(x, y, sample_weight)`` or
    ``(x, Targets(y, sample_weight))`` (`sample_weight` `None` when absent).

    Raises:
        ValueError: a batch that is not a 2- or 3-tuple.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            f"A batch must be (x, y) or (x, y, sample_weight), as in keras.Model.fit; got "
            f"{type(batch).__name__}"
            + (f" of {len(batch)} elements" if isinstance(batch, (tuple, list)) else "")
            + "."
        )
    if len(batch) == 3:
        x, y, w = batch
        return x, y, w
    x, y = batch
    y, w = split_targets(y)
    return x, y, w


def join_batch(batch):
    """A batch as ``(x, y)`` or ``(x, Targets(y, sample_weight))`` (the form the trainers'
    step functions take)."""
    x, y, w = split_batch(batch)
    return (x, y) if w is None else (x, Targets(y, w))


def keras_compile_loss(loss, loss_weights=None, output_names=None):
    """Keras's own `compile` loss (`keras.src.trainers.compile_utils.CompileLoss`) with its
    per-output loss trackers turned off.

    This is the one place where warpkeras uses Keras internals for the loss: Keras 3 has no
    public function that resolves a `compile` loss configuration (names, the
    ``"crossentropy"`` shorthand, dicts and lists per output, ``loss_weights``, functions
    wrapped so that masks and sample weights apply). `tests/test_keras_parity.py` checks
    that it still exists and behaves as `model.compile` does, so a Keras change fails
    loudly there.

    Args:
        loss: the loss as `keras.Model.compile` takes it.
        loss_weights: as `keras.Model.compile` takes them, or `None`.
        output_names: the model's output names (`model.output_names`), or `None`.

    Returns:
        A callable ``loss(y_true, y_pred, sample_weight=None) -> scalar`` (Keras floatx).
    """
    from keras.src.trainers.compile_utils import CompileLoss  # noqa: PLC0415

    class _Loss(CompileLoss):
        def build(self, y_true, y_pred):
            super().build(y_true, y_pred)
            # The per-output `Mean` trackers are Keras variables updated inside the loss:
            # warpkeras computes losses inside vectorised, differentiated step functions,
            # where no variable may change. `None` entries keep the loop over the outputs.
            self._metrics[:] = [None] * len(self._metrics)
            self._flat_losses = [
                entry._replace(loss=_WholeTaskLoss(entry.loss)) for entry in self._flat_losses
            ]

    return _Loss(loss, loss_weights=loss_weights, output_names=output_names)


_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


class _WholeTaskLoss:
    """One output's Keras `Loss`, without Keras's scaling for distribution.

    Inside a `tf.distribute.Strategy` replica, a Keras `Loss` with a mean reduction divides
    its value by the number of replicas (each replica holds a shard of one global batch,
    and `fit` sums the replicas' gradients). A warpkeras task loss is the whole loss of a
    task (tasks, not examples, are split across replicas), so the division is undone.
    """

    def __init__(self, loss):
        self.wrapped = loss

    def __call__(self, y_true, y_pred, sample_weight=None):
        value = self.wrapped(y_true, y_pred, sample_weight)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1 and self._scaled(y_true, y_pred):
            value = value * tf.cast(replicas, value.dtype)
        return value

    def _scaled(self, y_true, y_pred):
        """Whether Keras's reduction scaled the value (`keras.losses.Loss.__call__`: mean
        reductions of non-scalar per-example values)."""
        loss = self.wrapped
        if getattr(loss, "reduction", None) not in _MEAN_REDUCTIONS:
            return False
        cast = lambda t: tf.cast(t, loss.dtype)  # noqa: E731  (as `Loss.__call__` does)
        # Only the static shape is read: in a traced function the extra ops are pruned.
        values = loss.call(tf.nest.map_structure(cast, y_true), tf.nest.map_structure(cast, y_pred))
        return tuple(values.shape) not in ((), (0,))


_BINARY = ("binary_crossentropy", "binary_focal_crossentropy")
_CATEGORICAL = ("categorical_crossentropy", "categorical_focal_crossentropy")
_SPARSE = ("sparse_categorical_crossentropy",)
# Keras's loss functions that compare y_true and y_pred element by element (their shapes
# must agree; broadcasting one against the other is refused).
_ELEMENTWISE = (
    _BINARY
    + _CATEGORICAL
    + (
        "mean_squared_error",
        "mean_absolute_error",
        "mean_absolute_percentage_error",
        "mean_squared_logarithmic_error",
        "huber",
        "log_cosh",
        "kl_divergence",
        "poisson",
        "hinge",
        "squared_hinge",
        "categorical_hinge",
        "cosine_similarity",
    )
)


class LossKind(NamedTuple):
    """What one output's loss is (the single place that decides it).

    Attributes:
        category: ``"binary"``, ``"categorical"`` or ``"sparse_categorical"`` for Keras's
            cross-entropies (focal variants included), ``None`` for any other loss.
        from_logits: whether the cross-entropy takes logits.
        elementwise: a Keras loss that compares labels and predictions element by element
            (their shapes must agree).
        name: the loss's name (for messages).
        function: the name of the Keras loss function it computes
            (``"mean_squared_error"``, ``"sparse_categorical_crossentropy"``, ...), `None`
            for a loss of the user's own.
    """

    category: object
    from_logits: bool
    elementwise: bool
    name: str
    function: object = None


def _keras_function(fn):
    """The name of `fn` when it is one of Keras's built-in loss functions, else `None`."""
    for name in _ELEMENTWISE + _SPARSE:
        if fn is getattr(keras.losses, name, None):
            return name
    return None


def loss_kind(loss):
    """The `LossKind` of one resolved Keras loss (a `keras.losses.Loss`, a Keras loss
    function, or a `functools.partial` of one)."""
    fn, kwargs = loss, {}
    while True:
        if isinstance(fn, functools.partial):
            kwargs = {**fn.keywords, **kwargs}
            fn = fn.func
        elif isinstance(fn, keras.losses.Loss) and callable(getattr(fn, "fn", None)):
            # Keras's loss classes wrap their function (`LossFunctionWrapper`).
            kwargs = {**(getattr(fn, "_fn_kwargs", None) or {}), **kwargs}
            fn = fn.fn
        else:
            break
    builtin = _keras_function(fn)
    category = (
        "binary"
        if builtin in _BINARY
        else "categorical"
        if builtin in _CATEGORICAL
        else "sparse_categorical"
        if builtin in _SPARSE
        else None
    )
    from_logits = bool(kwargs.get("from_logits", getattr(loss, "from_logits", False)))
    name = str(getattr(loss, "name", None) or getattr(fn, "__name__", None) or type(loss).__name__)
    return LossKind(category, from_logits, builtin in _ELEMENTWISE, name, builtin)


def _is_loss_config(loss):
    if isinstance(loss, (str, keras.losses.Loss)) or callable(loss):
        return True
    if isinstance(loss, dict):
        return all(v is None or _is_loss_config(v) for v in loss.values())
    if isinstance(loss, (list, tuple)):
        return all(v is None or _is_loss_config(v) for v in loss)
    return False


class TaskLoss:
    """The loss of a model's outputs, as ``model.compile(loss, loss_weights)`` then
    ``model.fit`` / ``model.evaluate`` compute it.

    ``TaskLoss(loss)(y_true, y_pred, sample_weight)`` equals the compiled loss of
    `keras.Model.compute_loss` without the layers' regularisation losses (which
    `warpkeras.objectives.task_loss` adds, from the values the model ran with): each
    output's loss reduced by a Keras `Loss` (masks of the outputs and sample weights
    applied, ``"sum_over_batch_size"`` unless the loss object says otherwise), times its
    loss weight, summed, in Keras's floatx.

    Args:
        loss: a Keras loss name (``"mse"``, ``"sparse_categorical_crossentropy"``,
            ``"crossentropy"``), a `keras.losses.Loss`, a function
            ``fn(y_true, y_pred)``, a serialised Keras loss (dict with ``class_name``),
            or a dict (keyed by output name) / list (in output order) of these, one per
            output (`None` for an output without a loss).
        loss_weights: as in `keras.Model.compile`: a float, or a dict / list per output.
        model: the model whose outputs the loss compares (for the output names of dict
            configurations); optional.
        where: the caller, for messages.

    Raises:
        TypeError: a loss or loss weights of an unsupported kind.
        ValueError: a name or serialised loss that Keras cannot read.
    """

    def __init__(self, loss, loss_weights=None, model=None, where="loss"):
        if isinstance(loss, TaskLoss):
            loss_weights = loss.loss_weights if loss_weights is None else loss_weights
            loss = loss.config
        expected = (
            "a Keras loss name (e.g. loss='sparse_categorical_crossentropy' or "
            "loss='mse'), a keras.losses.Loss, a serialised Keras loss, a callable "
            "fn(y_true, y_pred), or a dict / list of these per output"
        )
        if loss is None:
            raise ValueError(f"{where}: a loss is required: {expected}.")
        if isinstance(loss, dict) and "class_name" in loss:
            try:  # Keras' deserialisation edits the dict it is given: hand it a copy.
                loss = keras.losses.deserialize(copy.deepcopy(loss))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(
                    f"{where}: loss={loss!r} is not valid: expected {expected} "
                    f"(Keras could not read it: {e})."
                ) from None
        if not _is_loss_config(loss):
            raise TypeError(f"{where}: loss={loss!r} is not valid: expected {expected}.")
        for name in [v for v in tf.nest.flatten(loss) if isinstance(v, str)]:
            if name.lower() in ("crossentropy", "ce"):
                continue
            try:
                resolved = keras.losses.get(name)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(
                    f"{where}: loss={name!r} is not valid: expected {expected} "
                    f"(Keras could not read it: {e})."
                ) from None
            if resolved is None or not callable(resolved):
                raise ValueError(f"{where}: loss={name!r} is not valid: expected {expected}.")
        if loss_weights is not None and not isinstance(
            loss_weights, (int, float, list, tuple, dict)
        ):
            raise TypeError(
                f"{where}: loss_weights={loss_weights!r} is not valid: expected "
                "a float, or a dict / list with one weight per output."
            )
        if isinstance(loss_weights, int) and not isinstance(loss_weights, bool):
            loss_weights = float(loss_weights)
        self.config = loss
        self.loss_weights = loss_weights
        names = None
        if model is not None:
            try:
                names = list(model.output_names)
            except (AttributeError, TypeError, ValueError):
                names = None
        self.output_names = names
        self._compiled = keras_compile_loss(loss, loss_weights, names)
        self.where = where

    @property
    def name(self):
        """A short name: the loss's own for one loss, else ``"compile_loss"``."""
        if isinstance(self.config, str):
            return self.config
        if not isinstance(self.config, (dict, list, tuple)):
            return loss_kind(self.config).name
        return "compile_loss"

    def __repr__(self):
        return f"<TaskLoss {self.config!r}>"

    # ----------------------------------------------------------------------------- kinds
    def resolved(self, y_true=None, y_pred=None):
        """The Keras `Loss` objects of the outputs (``[(path, loss, weight)]``), resolving
        the configuration (with `y_true` / `y_pred` for shape-dependent names such as
        ``"crossentropy"``; without them from the model's outputs)."""
        if not self._compiled.built:
            if y_pred is None:
                return [((), loss, None) for loss in self._static_losses()]
            self._compiled.build(*self._align(y_true, y_pred))
        return [
            (path, getattr(loss, "wrapped", loss), weight)
            for path, loss, weight, _ in self._compiled._flat_losses
        ]

    def _static_losses(self):
        """The losses of the configuration resolved without data (names by
        `keras.losses.get`; ``"crossentropy"`` stays unresolved: kind unknown)."""
        out = []
        for v in tf.nest.flatten(self.config):
            if v is None:
                continue
            if isinstance(v, str):
                out.append(None if v.lower() in ("crossentropy", "ce") else keras.losses.get(v))
            else:
                out.append(v)
        return out

    def kinds(self):
        """The `LossKind` of every output's loss (configuration order; one for a single
        loss shared by all outputs). An unresolved ``"crossentropy"`` shorthand has
        category `None` until the loss has seen data."""
        if self._compiled.built:
            return [loss_kind(loss) for _, loss, _ in self.resolved()]
        return [
            LossKind(None, False, False, "crossentropy") if loss is None else loss_kind(loss)
            for loss in self._static_losses()
        ]

    @property
    def classification(self):
        """Whether every output's loss is a Keras cross-entropy (accuracy is then
        meaningful)."""
        kinds = self.kinds()
        shorthand = any(
            isinstance(v, str) and v.lower() in ("crossentropy", "ce")
            for v in tf.nest.flatten(self.config)
        )
        return bool(kinds) and (shorthand or all(k.category is not None for k in kinds))

    # ----------------------------------------------------------------------------- value
    def _align(self, y_true, y_pred):
        """`y_true` in the structure of `y_pred` where Keras's `CompileLoss` would
        reconcile them (a tuple of labels for list outputs, a dict for a one-output
        dict)."""
        if (
            isinstance(y_pred, (list, tuple))
            and isinstance(y_true, (list, tuple))
            and len(y_pred) == len(y_true)
        ):
            y_true = type(y_pred)(y_true) if isinstance(y_pred, tuple) else list(y_true)
        return y_true, y_pred

    def check_shapes(self, y_true, y_pred, where=None):
        """Refuses labels whose shape would broadcast against the predictions in a Keras
        element-wise loss (e.g. 3-wide targets on a 1-unit output with ``"mse"``).

        Args:
            y_true: labels (arrays or tensors, in the structure of the outputs).
            y_pred: predictions, or the model's symbolic outputs (`model.output`); unknown
                dimensions are not compared.
            where: the caller, for the message (default: this loss's).

        Raises:
            ValueError: naming the output and both shapes.
        """
        y_true, y_pred = self._align(y_true, y_pred)
        if not self._compiled.built:
            try:
                self._compiled.build(y_true, y_pred)
            except (ValueError, KeyError, TypeError):
                return
        self._check_shapes(y_true, y_pred, where)

    def _check_shapes(self, y_true, y_pred, where=None):
        if not self._compiled.built:
            return
        caller = where or self.where
        for path, loss, _ in self.resolved():
            kind = loss_kind(loss)
            if not kind.elementwise:
                continue
            try:
                yt, yp = y_true, y_pred
                for key in path:
                    yt, yp = yt[key], yp[key]
            except (KeyError, IndexError, TypeError):
                continue
            if tf.nest.is_nested(yt) or tf.nest.is_nested(yp):
                continue
            ts, ps = list(np.shape(yt) if not hasattr(yt, "shape") else yt.shape), list(yp.shape)
            # Keras squeezes or expands a trailing axis of size 1 to match ranks.
            if len(ts) == len(ps) + 1 and ts[-1] == 1:
                ts = ts[:-1]
            elif len(ps) == len(ts) + 1 and ps[-1] == 1:
                ps = ps[:-1]
            if len(ts) != len(ps) or any(
                a is not None and b is not None and a != b for a, b in zip(ts, ps)
            ):
                output = "/".join(str(k) for k in path) or "the output"
                raise ValueError(
                    f"{caller}: the labels of {output} have shape {tuple(ts)} but the "
                    f"predictions have shape {tuple(ps)}; the loss '{kind.name}' compares "
                    "them element by element and would broadcast one against the other. "
                    "Give labels of the predictions' shape (or a model output of the "
                    "labels' width)."
                )

    def __call__(self, y_true, y_pred, sample_weight=None):
        """The compiled loss (a scalar in Keras's floatx).

        Args:
            y_true: labels (a tensor, or a dict / list per output); a `Targets` carries
                its own sample weights.
            y_pred: the model's outputs (masks attached by layers are used).
            sample_weight: per-example weights (`None`: all 1), one array for all outputs
                or a structure per output, as in `keras.Model.fit`.

        Returns:
            A scalar tensor.

        Raises:
            ValueError: labels that would broadcast against the predictions of an
                element-wise Keras loss, naming both shapes; labels and outputs whose
                structures differ.
        """
        if isinstance(y_true, Targets):
            if sample_weight is not None:
                raise ValueError(f"{self.where}: sample weights were given twice.")
            y_true, sample_weight = y_true
        y_true, y_pred = self._align(y_true, y_pred)
        if not self._compiled.built:
            try:
                self._compiled.build(y_true, y_pred)
            except (ValueError, KeyError, TypeError):
                pass  # `CompileLoss.call` reconciles the structures and builds itself.
        self._check_shapes(y_true, y_pred)
        if sample_weight is not None:
            sample_weight = tf.nest.map_structure(
                lambda w: w if w is None else tf.convert_to_tensor(w), sample_weight
            )
        try:
            value = self._compiled(y_true, y_pred, sample_weight)
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"{self.where}: the labels do not match the model's outputs or the loss "
                f"configuration: {e}"
            ) from None
        if value is None:
            raise ValueError(f"{self.where}: no output of the model has a loss.")
        return value


def as_task_loss(loss, model=None, where="loss"):
    """`loss` as a `TaskLoss` (returned as is when it already is one)."""
    if isinstance(loss, TaskLoss):
        return loss
    return TaskLoss(loss, model=model, where=where)
