"""Offline warp updates (WarpGrad Algorithm 2, lines 12–23) computed in chunks of stored
points, one compiled loop per chunk, equal the per-point path (one compiled call per point,
accumulation and updates on the host): same φ, θ0, learned α / μ, logs and non-finite point
counts, for Warp-Leap, the exact objective with a learned learning rate, inner momentum with
a learned μ, η = 3 with a cap on the updates, random model state (dropout), and points made
non-finite on purpose.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras.meta import WarpObjective
from warpkeras.meta.offline import offline_updates

SCALES = np.array([1.0, 3.0, 0.3, 2.0], "float32")


def _task(rng, n=60):
    w = (rng.normal(size=(4, 1)) / SCALES[:, None]).astype(keras.config.floatx())
    x = (rng.normal(size=(n, 4)) * SCALES).astype(keras.config.floatx())
    return warpkeras.Task(train=(x, x @ w), batch_size=10)


def _model(dropout=False):
    layers = [keras.Input((4,)),
              warpkeras.warp(keras.layers.Dense(4, use_bias=False, name="warp"))]
    if dropout:
        layers.append(keras.layers.Dropout(0.2))
    layers.append(keras.layers.Dense(1, name="task"))
    return keras.Sequential(layers)


def _nan_half(partition, loss_fn, theta, phi, meta_batch, state):
    """The meta loss, made NaN on meta batches whose mean target is positive."""
    loss, _ = warpkeras.objectives.task_loss(partition, loss_fn, theta, phi, meta_batch,
                                             state)
    bad = tf.reduce_mean(tf.cast(meta_batch[1], loss.dtype)) > 0
    return loss + tf.where(bad, tf.constant(np.nan, loss.dtype), tf.zeros([], loss.dtype))


def _run(chunk, dropout=False, meta_steps=2, **kwargs):
    keras.utils.set_random_seed(5)
    model = _model(dropout)
    options = dict(mode="offline", objective="exact", init_objective="leap", inner_steps=4,
                   inner_learning_rate=0.05, meta_batch_size=2,
                   meta_optimizer=keras.optimizers.Adam(0.01), seed=3)
    options.update(kwargs)
    trainer = warpkeras.WarpTrainer(model, "mse", **options)
    trainer._warp.chunk_size = chunk
    history = trainer.fit(_task, meta_steps=meta_steps, verbose=0)
    return trainer, history.history


CASES = {
    "warp_leap_dropout": dict(dropout=True),
    "learned_lr": dict(init_objective=None, learn_inner_learning_rate=True),
    "momentum_learned_mu": dict(inner_momentum=0.5, learn_inner_momentum=True),
    "interval_3_capped": dict(meta_interval=3, max_warp_updates=2, objective="approx"),
    "nan_points": dict(meta_loss=_nan_half, warp_gradient_reduction="sum"),
}


def _compare(a, b, rtol, atol):
    (ta, ha), (tb, hb) = a, b
    for va, vb in zip(ta.partition.warp_values() + ta.partition.initial_task_values(),
                      tb.partition.warp_values() + tb.partition.initial_task_values()):
        np.testing.assert_allclose(np.asarray(va), np.asarray(vb), rtol=rtol, atol=atol)
    np.testing.assert_allclose(ta.inner_lr.numpy(), tb.inner_lr.numpy(), rtol=rtol)
    np.testing.assert_allclose(ta.inner_mu.numpy(), tb.inner_mu.numpy(), rtol=rtol)
    assert sorted(ha) == sorted(hb)
    for key in set(ha) - {"seconds"}:
        va, vb = np.asarray(ha[key], float), np.asarray(hb[key], float)
        np.testing.assert_allclose(va, vb, rtol=rtol, atol=atol, err_msg=key)
    assert ta.nan_points == tb.nan_points


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunks_equal_the_per_point_path(case):
    kwargs = dict(CASES[case])
    try:
        per_point = _run(1, **kwargs)
    except TypeError as e:  # an option this trainer does not have
        pytest.skip(str(e))
    chunked = _run(4, **kwargs)
    _compare(chunked, per_point, rtol=2e-6, atol=1e-7)
    trainer, history = chunked
    assert trainer.trace_counts.get("warp_chunk", 0) >= 1  # the chunked path ran
    assert "warp_point" not in trainer.trace_counts or case == "interval_3_capped"
    if case == "nan_points":
        assert trainer.nan_points > 0 and history["meta_loss"]
    if case == "interval_3_capped":
        assert history["warp_updates"] == [2, 2]


def test_chunks_equal_the_per_point_path_float64(float64):
    per_point = _run(1, learn_inner_learning_rate=True, meta_interval=2)
    chunked = _run(3, learn_inner_learning_rate=True, meta_interval=2)
    _compare(chunked, per_point, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("objective,chunked", [("approx", True), ("exact", False)])
def test_default_chunking_follows_the_objective(objective, chunked):
    trainer, history = _run(None, meta_steps=1, objective=objective)
    assert ("warp_chunk" in trainer.trace_counts) == chunked
    assert ("warp_point" in trainer.trace_counts) != chunked
    assert history["warp_updates"] == [10.0]  # 2 tasks x (K + 1) points, η = 1


def test_chunk_size_checks():
    with pytest.raises(ValueError, match="chunk_size"):
        WarpObjective(chunk_size=0)
    trainer, _ = _run(2, meta_steps=1)
    with pytest.raises(ValueError, match="chunk_size"):
        offline_updates(trainer._warp, trainer, [], np.random.default_rng(0), chunk_size=0)
