"""Accuracy matched to the task loss, as Keras' ``compile(metrics=["accuracy"])`` picks it."""

import functools

import keras
import tensorflow as tf

from warpkeras._losses import loss_settings


def loss_is_classification(loss):
    name = getattr(loss, "name", None) or getattr(loss, "__name__", "")
    return "categorical" in str(name) or "crossentropy" in str(name)


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
        loss: the task loss (Keras loss object, function or name-resolved function).
        y_true: labels (a tensor with a static rank).
        y_pred: predictions (a tensor with a static rank).

    Returns:
        ``fn(y_true, y_pred) -> matches`` (per example or per element, Keras floatx).
    """
    from keras.src.trainers.compile_utils import is_binary_or_sparse_categorical

    name, from_logits = loss_settings(loss)
    if "binary" in name:
        return functools.partial(keras.metrics.binary_accuracy,
                                 threshold=0.0 if from_logits else 0.5)
    if "sparse_categorical" in name:
        return keras.metrics.sparse_categorical_accuracy
    if "categorical" in name:
        return keras.metrics.categorical_accuracy
    is_binary, is_sparse = is_binary_or_sparse_categorical(y_true, y_pred)
    if is_binary:
        return keras.metrics.binary_accuracy
    return (keras.metrics.sparse_categorical_accuracy if is_sparse
            else keras.metrics.categorical_accuracy)


def batch_accuracy(y_true, y_pred, loss=None):
    """Mean accuracy (float32 scalar) of a batch, with the Keras metric matched to `loss`
    (see `accuracy_function`); the mean over the outputs of a multi-output model. Stateless
    and traceable (runs inside the compiled step functions)."""
    trues, preds = tf.nest.flatten(y_true), tf.nest.flatten(y_pred)
    if len(trues) != len(preds):
        raise ValueError(
            f"Accuracy needs one label per model output: the labels have {len(trues)} "
            f"part(s), the outputs {len(preds)}; pass accuracy=False to the trainer to turn "
            "it off."
        )
    values = []
    for t, p in zip(trues, preds):
        p = tf.convert_to_tensor(p)
        if p.dtype in (tf.float16, tf.bfloat16):
            p = tf.cast(p, tf.float32)
        t = tf.convert_to_tensor(t)
        matches = accuracy_function(loss, t, p)(t, p)
        values.append(tf.reduce_mean(tf.cast(matches, tf.float32)))
    return tf.add_n(values) / float(len(values))
