"""Reporting: accuracy is Keras's metric matched to the loss, diverged tasks are counted and
named, and tasks of different sizes share a meta-batch."""

import functools
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras.trainers.base import _accuracy

RNG = np.random.default_rng(0)
N = 12
LOGITS_1 = RNG.normal(size=(N, 1)).astype("float32")
LOGITS_3 = RNG.normal(size=(N, 3)).astype("float32")
LOGITS_4 = RNG.normal(size=(N, 4)).astype("float32")
LABELS_01 = RNG.integers(0, 2, size=(N, 1))
LABELS_4 = RNG.integers(0, 4, size=(N,))
MULTI = RNG.integers(0, 2, size=(N, 3)).astype("float32")
SIGMOID = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
SOFTMAX = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)  # noqa: E731


def _keras(metric, y, p):
    m = metric()
    m.update_state(y, p)
    return float(m.result())


# (loss, labels, outputs, Keras's value computed directly on probabilities)
CASES = {
    "bce-logits-column-labels": (
        keras.losses.BinaryCrossentropy(from_logits=True), LABELS_01.astype("float32"),
        LOGITS_1, _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1))),
    "bce-logits-flat-int-labels": (
        keras.losses.BinaryCrossentropy(from_logits=True), LABELS_01[:, 0], LOGITS_1,
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1))),
    "bce-probabilities": (
        "binary_crossentropy", LABELS_01, SIGMOID(LOGITS_1),
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1))),
    "bce-partial-logits": (
        functools.partial(keras.losses.binary_crossentropy, from_logits=True),
        LABELS_01.astype("float32"), LOGITS_1,
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1))),
    "bce-multi-label-logits": (
        keras.losses.BinaryCrossentropy(from_logits=True), MULTI, LOGITS_3,
        _keras(keras.metrics.BinaryAccuracy, MULTI, SIGMOID(LOGITS_3))),
    "binary-focal-logits": (
        keras.losses.BinaryFocalCrossentropy(from_logits=True), LABELS_01.astype("float32"),
        LOGITS_1, _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1))),
    "sparse-flat-labels": (
        "sparse_categorical_crossentropy", LABELS_4, SOFTMAX(LOGITS_4),
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4, SOFTMAX(LOGITS_4))),
    "sparse-column-labels-logits": (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), LABELS_4[:, None],
        LOGITS_4,
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4[:, None], SOFTMAX(LOGITS_4))),
    "categorical-one-hot": (
        "categorical_crossentropy", np.eye(4)[LABELS_4].astype("float32"), SOFTMAX(LOGITS_4),
        _keras(keras.metrics.CategoricalAccuracy, np.eye(4)[LABELS_4], SOFTMAX(LOGITS_4))),
    "categorical-one-hot-logits": (
        keras.losses.CategoricalCrossentropy(from_logits=True),
        np.eye(4)[LABELS_4].astype("float32"), LOGITS_4,
        _keras(keras.metrics.CategoricalAccuracy, np.eye(4)[LABELS_4], SOFTMAX(LOGITS_4))),
    # a custom loss: the metric Keras's compile(metrics=["accuracy"]) picks from the shapes
    "custom-loss-sparse-layout": (
        lambda y, p: tf.reduce_mean(tf.square(p)), LABELS_4, SOFTMAX(LOGITS_4),
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4, SOFTMAX(LOGITS_4))),
    "custom-loss-binary-layout": (
        lambda y, p: tf.reduce_mean(tf.square(p)), LABELS_01, SIGMOID(LOGITS_1),
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1))),
    "sequence-sparse-labels": (
        "sparse_categorical_crossentropy", LABELS_4.reshape(3, 4), SOFTMAX(LOGITS_4).reshape(3, 4, 4),
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4, SOFTMAX(LOGITS_4))),
    "half-precision-logits": (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), LABELS_4,
        LOGITS_4.astype("float16"),
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4, SOFTMAX(LOGITS_4))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_accuracy_is_keras_metric_matched_to_the_loss(case):
    loss, y, p, expected = CASES[case]
    loss = keras.losses.get(loss) if isinstance(loss, str) else loss
    assert 0.0 < expected < 1.0 or case.startswith("custom")
    compiled = tf.function(lambda y, p: _accuracy(y, p, loss))  # traceable, stateless
    assert float(compiled(tf.constant(y), tf.constant(p))) == pytest.approx(expected, abs=1e-6)


def test_logit_model_with_binary_crossentropy_reports_accuracy_one():
    # every logit 0.3 (probability 0.57), every label 1: all predictions are right
    model = keras.Sequential([
        keras.Input((2,)),
        keras.layers.Dense(1, kernel_initializer="zeros",
                           bias_initializer=keras.initializers.Constant(0.3)),
    ])
    x = np.ones((8, 2), "float32")
    y = np.ones((8, 1), "float32")
    task = warpkeras.Task(train=(x, y), test=(x, y), batch_size=8, name="ones")
    trainer = warpkeras.NoMetaTrainer(model, keras.losses.BinaryCrossentropy(from_logits=True),
                                      inner_steps=1, inner_learning_rate=1e-9)
    report = trainer.evaluate([task], verbose=0)
    assert report["final_test_accuracy"]["mean"] == 1.0
    assert report["curves"][0]["train_accuracy"] == [1.0]
