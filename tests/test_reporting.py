"""Reporting: accuracy is Keras's metric matched to the loss, diverged tasks are counted and
named, and tasks of different sizes share a meta-batch."""

import functools
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras.trainers.metrics import batch_accuracy as _accuracy

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
        keras.losses.BinaryCrossentropy(from_logits=True),
        LABELS_01.astype("float32"),
        LOGITS_1,
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1)),
    ),
    "bce-logits-flat-int-labels": (
        keras.losses.BinaryCrossentropy(from_logits=True),
        LABELS_01[:, 0],
        LOGITS_1,
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1)),
    ),
    "bce-probabilities": (
        "binary_crossentropy",
        LABELS_01,
        SIGMOID(LOGITS_1),
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1)),
    ),
    "bce-partial-logits": (
        functools.partial(keras.losses.binary_crossentropy, from_logits=True),
        LABELS_01.astype("float32"),
        LOGITS_1,
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1)),
    ),
    "bce-multi-label-logits": (
        keras.losses.BinaryCrossentropy(from_logits=True),
        MULTI,
        LOGITS_3,
        _keras(keras.metrics.BinaryAccuracy, MULTI, SIGMOID(LOGITS_3)),
    ),
    "binary-focal-logits": (
        keras.losses.BinaryFocalCrossentropy(from_logits=True),
        LABELS_01.astype("float32"),
        LOGITS_1,
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1)),
    ),
    "sparse-flat-labels": (
        "sparse_categorical_crossentropy",
        LABELS_4,
        SOFTMAX(LOGITS_4),
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4, SOFTMAX(LOGITS_4)),
    ),
    "sparse-column-labels-logits": (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        LABELS_4[:, None],
        LOGITS_4,
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4[:, None], SOFTMAX(LOGITS_4)),
    ),
    "categorical-one-hot": (
        "categorical_crossentropy",
        np.eye(4)[LABELS_4].astype("float32"),
        SOFTMAX(LOGITS_4),
        _keras(keras.metrics.CategoricalAccuracy, np.eye(4)[LABELS_4], SOFTMAX(LOGITS_4)),
    ),
    "categorical-one-hot-logits": (
        keras.losses.CategoricalCrossentropy(from_logits=True),
        np.eye(4)[LABELS_4].astype("float32"),
        LOGITS_4,
        _keras(keras.metrics.CategoricalAccuracy, np.eye(4)[LABELS_4], SOFTMAX(LOGITS_4)),
    ),
    # a custom loss: the metric Keras's compile(metrics=["accuracy"]) picks from the shapes
    "custom-loss-sparse-layout": (
        lambda y, p: tf.reduce_mean(tf.square(p)),
        LABELS_4,
        SOFTMAX(LOGITS_4),
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4, SOFTMAX(LOGITS_4)),
    ),
    "custom-loss-binary-layout": (
        lambda y, p: tf.reduce_mean(tf.square(p)),
        LABELS_01,
        SIGMOID(LOGITS_1),
        _keras(keras.metrics.BinaryAccuracy, LABELS_01, SIGMOID(LOGITS_1)),
    ),
    "sequence-sparse-labels": (
        "sparse_categorical_crossentropy",
        LABELS_4.reshape(3, 4),
        SOFTMAX(LOGITS_4).reshape(3, 4, 4),
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4, SOFTMAX(LOGITS_4)),
    ),
    "half-precision-logits": (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        LABELS_4,
        LOGITS_4.astype("float16"),
        _keras(keras.metrics.SparseCategoricalAccuracy, LABELS_4, SOFTMAX(LOGITS_4)),
    ),
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
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(
                1, kernel_initializer="zeros", bias_initializer=keras.initializers.Constant(0.3)
            ),
        ]
    )
    x = np.ones((8, 2), "float32")
    y = np.ones((8, 1), "float32")
    task = warpkeras.Task(train=(x, y), test=(x, y), batch_size=8, name="ones")
    trainer = warpkeras.NoMetaTrainer(
        model,
        keras.losses.BinaryCrossentropy(from_logits=True),
        inner_steps=1,
        inner_learning_rate=1e-9,
    )
    report = trainer.evaluate([task], verbose=0)
    assert report["final_test_accuracy"]["mean"] == 1.0
    assert report["curves"][0]["train_accuracy"] == [1.0]


# ----------------------------------------------------------------------------------------
# divergence
def _regression_task(name, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (scale * rng.normal(size=(24, 2))).astype("float32")
    y = x @ np.array([[1.0], [-1.0]], "float32")
    return warpkeras.Task(train=(x[:16], y[:16]), test=(x[16:], y[16:]), batch_size=8, name=name)


def _warp_model():
    return keras.Sequential(
        [
            keras.Input((2,)),
            warpkeras.warp(keras.layers.Dense(2, use_bias=False, kernel_initializer="identity")),
            keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros"),
        ]
    )


GOOD, BAD = _regression_task("good"), _regression_task("exploding", scale=1e5)


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_diverged_tasks_are_counted_and_named_per_meta_step(mode):
    trainer = warpkeras.WarpTrainer(
        _warp_model(),
        "mse",
        mode=mode,
        init_objective=None,
        inner_steps=4,
        meta_batch_size=2,
        inner_learning_rate=0.1,
        seed=0,
    )
    with pytest.warns(RuntimeWarning, match="exploding"):
        logs = trainer.train_step([GOOD, BAD], np.random.default_rng(0))
    assert logs["diverged_tasks"] == 1
    assert trainer.diverged == {0: ["exploding"]}
    assert np.isfinite(logs["loss"])
    # the running total counts tasks, never replay-buffer points
    assert logs["nan_tasks"] == 1 and int(trainer.nan_tasks.numpy()) == 1
    if mode == "offline":
        assert logs["nan_points"] >= 1  # the exploding task's stored points were skipped
    trainer.step.assign(1)
    with pytest.warns(RuntimeWarning):
        logs = trainer.train_step([BAD], np.random.default_rng(1))
    assert np.isnan(logs["loss"]) and logs["diverged_tasks"] == 1 and logs["nan_tasks"] == 2
    assert trainer.diverged[1] == ["exploding"]


def test_evaluate_names_diverged_tasks_and_does_not_average_only_survivors():
    trainer = warpkeras.NoMetaTrainer(_warp_model(), "mse", inner_steps=4, inner_learning_rate=0.1)
    with pytest.warns(RuntimeWarning, match="1 of 2 evaluation tasks diverged .*: exploding"):
        report = trainer.evaluate([GOOD, BAD], verbose=0)
    assert report["diverged"] == {"count": 1, "tasks": ["exploding"]}
    loss = report["final_test_loss"]
    assert len(loss["values"]) == 2 and np.isfinite(loss["values"][0])
    assert np.isnan(loss["values"][1]) and np.isnan(loss["mean"]) and loss["diverged"] == 1
    assert loss["mean_of_finite"] == pytest.approx(loss["values"][0])
    assert np.isnan(report["auc"]["mean"]) and report["auc"]["diverged"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = trainer.evaluate([GOOD], verbose=0)
    assert clean["diverged"]["count"] == 0 and clean["final_test_loss"]["mean"] == pytest.approx(
        loss["values"][0]
    )


# ----------------------------------------------------------------------------------------
# tasks of different sizes in one meta-batch
def _sized_task(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 4, 2)).astype("float32")
    y = x @ np.array([[0.5], [2.0]], "float32")
    return warpkeras.Task(
        train=(x[:n], y[:n]), test=(x[n:], y[n:]), batch_size=32, name=f"{n}-examples"
    )


SIZED = [_sized_task(10, 1), _sized_task(6, 2), _sized_task(10, 3)]


def _run_sized(parallel, make):
    keras.utils.set_random_seed(7)
    model = _warp_model()
    trainer = make(model, parallel)
    logs = trainer.train_step(SIZED, np.random.default_rng(0))
    return logs, [np.array(v) for v in model.weights], trainer


@pytest.mark.parametrize(
    "make",
    [
        lambda m, p: warpkeras.WarpTrainer(
            m,
            "mse",
            mode="online",
            init_objective="leap",
            inner_steps=2,
            meta_batch_size=3,
            parallel=p,
        ),
        lambda m, p: warpkeras.MAMLTrainer(m, "mse", inner_steps=2, meta_batch_size=3, parallel=p),
    ],
    ids=["warp-leap-online", "maml"],
)
def test_tasks_of_different_sizes_share_an_unrolled_or_vectorized_meta_batch(make):
    ref_logs, ref_weights, _ = _run_sized("sequential", make)
    for parallel in ("unrolled", "vectorized"):
        logs, weights, trainer = _run_sized(parallel, make)
        assert logs["loss"] == pytest.approx(ref_logs["loss"], rel=1e-5), parallel
        for a, b in zip(weights, ref_weights):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # the 10-example tasks ran together, the 6-example task alone: two group sizes
        trainer.train_step(SIZED, np.random.default_rng(1))
        assert max(trainer.trace_counts.values()) <= 2, trainer.trace_counts


def test_tasks_of_different_sizes_under_a_strategy_are_refused_by_name_and_shape():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    trainer = warpkeras.WarpTrainer(
        _warp_model(),
        "mse",
        mode="online",
        init_objective=None,
        inner_steps=1,
        meta_batch_size=2,
        strategy=strategy,
    )
    with pytest.raises(
        ValueError,
        match=r"'10-examples': \[10, 2\].*'6-examples': \[6, 2\]"
        r".*same batch_size",
    ):
        trainer.train_step(SIZED[:2], np.random.default_rng(0))
