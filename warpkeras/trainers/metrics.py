"""Accuracy matched to the task loss, as Keras' ``compile(metrics=["accuracy"])`` picks it."""

import functools

import keras
import tensorflow as tf

from warpkeras._losses import LossKind, as_task_loss, loss_kind, split_targets


def loss_is_classification(loss):
    """Whether `loss` (a `warpkeras._losses.TaskLoss` or anything `compile` takes) is a
    Keras cross-entropy for every output (see `warpkeras._losses.LossKind`)."""
    return as_task_loss(loss).classification


def accuracy_function(loss, y_true, y_pred):
    """The Keras accuracy function matched to `loss` for these labels and predictions.

    Binary cross-entropies (``binary_crossentropy``, ``binary_focal_crossentropy``) use
    `keras.metrics.binary_accuracy`, thresholding probabilities at 0.5 or, with
    ``from_logits=True``, logits at 0 (the same decision); categorical and sparse
    categorical cross-entropies use `keras.metrics.categorical_accuracy` /
    `keras.metrics.sparse_categorical_accuracy`. Any other loss gets the metric that Keras's
    ``compile(metrics=["accuracy"])`` picks from the label and prediction shapes
    (`keras.src.trainers.compile_utils.is_binary_or_sparse_categorical`).

    Args:
        loss: one output's resolved Keras loss, or its `warpkeras._losses.LossKind`.
        y_true: labels (a tensor with a static rank).
        y_pred: predictions (a tensor with a static rank).

    Returns:
        ``fn(y_true, y_pred) -> matches`` (per example or per element, Keras floatx).
    """
    from keras.src.trainers.compile_utils import is_binary_or_sparse_categorical

    kind = loss if isinstance(loss, LossKind) else loss_kind(loss)
    if kind.category == "binary":
        return functools.partial(
            keras.metrics.binary_accuracy, threshold=0.0 if kind.from_logits else 0.5
        )
    if kind.category == "sparse_categorical":
        return keras.metrics.sparse_categorical_accuracy
    if kind.category == "categorical":
        return keras.metrics.categorical_accuracy
    is_binary, is_sparse = is_binary_or_sparse_categorical(y_true, y_pred)
    if is_binary:
        return keras.metrics.binary_accuracy
    return (
        keras.metrics.sparse_categorical_accuracy
        if is_sparse
        else keras.metrics.categorical_accuracy
    )


class _MaskedMean(keras.losses.Loss):
    """The mean of per-element matches as Keras's compiled ``"accuracy"`` metric takes it:
    a mask that the model attached to its output leaves masked elements out (Keras's
    `Loss.__call__` reads the mask and weighs it in; public API, no mask attribute read
    here)."""

    def __init__(self, fn):
        super().__init__(name="accuracy", reduction="sum_over_batch_size", dtype="float32")
        self._matches = fn

    def call(self, y_true, y_pred):
        return tf.cast(self._matches(y_true, y_pred), self.dtype)


def batch_accuracy(y_true, y_pred, loss=None):
    """Mean accuracy (float32 scalar) of a batch, with the Keras metric matched to each
    output's loss (see `accuracy_function`); the mean over the outputs of a multi-output
    model. As Keras's ``compile(metrics=["accuracy"])`` (not ``weighted_metrics``), sample
    weights are not used, and masks the model attaches to its outputs leave masked steps
    out. Stateless and traceable (runs inside the compiled step functions)."""
    y_true, _ = split_targets(y_true)
    task_loss = as_task_loss(loss) if loss is not None else None
    trues, preds = tf.nest.flatten(y_true), tf.nest.flatten(y_pred)
    if len(trues) != len(preds):
        raise ValueError(
            f"Accuracy needs one label per model output: the labels have {len(trues)} "
            f"part(s), the outputs {len(preds)}; pass accuracy=False to the trainer to turn "
            "it off."
        )
    kinds = None
    if task_loss is not None:
        resolved = task_loss.resolved(y_true, y_pred)
        if len(resolved) == len(preds):
            kinds = [loss_kind(r[1]) for r in resolved]
        elif len(resolved) == 1:
            kinds = [loss_kind(resolved[0][1])] * len(preds)
    values = []
    for i, (t, p) in enumerate(zip(trues, preds)):
        t = tf.convert_to_tensor(t)
        kind = kinds[i] if kinds is not None else LossKind(None, False, False, "")
        # The metric is picked from float32 views; the prediction itself (which carries the
        # output's mask) goes to the masked mean, which casts it to float32.
        view = tf.cast(p, tf.float32) if p.dtype in (tf.float16, tf.bfloat16) else p
        values.append(_MaskedMean(accuracy_function(kind, t, view))(t, p))
    return tf.add_n(values) / float(len(values))
