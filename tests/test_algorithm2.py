"""WarpGrad Algorithm 2 (offline meta-training) and the sum / mean warp-gradient reduction,
against values derived by hand (numpy) on a linear model with a linear warp.

Model: ŷ = x W Φ with task parameters θ = W (3×2) and warp parameters φ = Φ (2×1); task and
meta losses are the mean squared error on one fixed batch each. Inner step:
W ← W − α ∇_W L_task(W, Φ), ∇_W = 2/n xᵀ (x W Φ − y) Φᵀ. The warp gradient of Eq. 3 at a
point W is ∇_Φ L_meta(W − α ∇_W L_task(W, Φ), Φ): with ``objective="approx"`` the inner
gradient is a constant, ∇_Φ = 2/n (x_m W')ᵀ (x_m W' Φ − y_m); with ``"exact"`` it is taken
by central differences of that function of Φ.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras

ALPHA, BETA, K = 0.3, 0.5, 2
RNG = np.random.default_rng(17)
X, Y = RNG.normal(size=(6, 3)), RNG.normal(size=(6, 1))  # task batch
XM, YM = RNG.normal(size=(6, 3)), RNG.normal(size=(6, 1))  # meta batch
W0 = RNG.normal(size=(3, 2)) * 0.5
PHI0 = RNG.normal(size=(2, 1))


def mse(y, p):
    return tf.reduce_mean(tf.square(y - p))


def _grad_w(w, phi, x, y):
    return 2.0 / y.size * x.T @ (x @ w @ phi - y) @ phi.T


def _meta_after_step(w, phi, w_step_phi):
    """L_meta at W − α ∇_W L_task(W, Φ'), evaluated with warp Φ (Φ' = Φ unless detached)."""
    stepped = w - ALPHA * _grad_w(w, w_step_phi, X, Y)
    return np.mean((XM @ stepped @ phi - YM) ** 2)


def _warp_gradient(w, objective):
    if objective == "approx":
        stepped = w - ALPHA * _grad_w(w, PHI0, X, Y)
        return 2.0 / YM.size * (XM @ stepped).T @ (XM @ stepped @ PHI0 - YM)
    g, eps = np.zeros_like(PHI0), 1e-6
    for i in np.ndindex(PHI0.shape):
        up, down = PHI0.copy(), PHI0.copy()
        up[i] += eps
        down[i] -= eps
        g[i] = (_meta_after_step(w, up, up) - _meta_after_step(w, down, down)) / (2 * eps)
    return g


def _trajectory():
    """θ_0 … θ_K of the adaptation with φ fixed."""
    points = [W0]
    for _ in range(K):
        points.append(points[-1] - ALPHA * _grad_w(points[-1], PHI0, X, Y))
    return points


def _task():
    def forever(batch):
        def make(rng):
            while True:
                yield batch

        return make

    return warpkeras.Task(train=forever((X, Y)), meta=forever((XM, YM)))


def _model():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(2, use_bias=False, name="task"),
            warpkeras.warp(keras.layers.Dense(1, use_bias=False, name="warp")),
        ]
    )
    model.get_layer("task").set_weights([W0])
    model.get_layer("warp").set_weights([PHI0])
    return model


def _meta_step(**kwargs):
    """Φ's change after one meta step, divided by −β: the warp gradient that was applied."""
    model = _model()
    kwargs = dict(dict(mode="offline", objective="approx", meta_interval=K + 1), **kwargs)
    trainer = warpkeras.WarpTrainer(
        model,
        mse,
        init_objective=None,
        inner_steps=K,
        inner_learning_rate=ALPHA,
        meta_batch_size=1,
        meta_optimizer=keras.optimizers.SGD(BETA),
        **kwargs,
    )
    logs = trainer.train_step([_task()], np.random.default_rng(0))
    return (PHI0 - model.get_layer("warp").get_weights()[0]) / BETA, logs


@pytest.mark.parametrize("objective", ["approx", "exact"])
def test_offline_warp_gradient_includes_final_point(float64, objective):
    applied, logs = _meta_step(objective=objective)
    by_point = [_warp_gradient(w, objective) for w in _trajectory()]
    # one warp update on the K + 1 points θ_0, θ_1, θ_2 (Algorithm 2, lines 4 and 9)
    assert logs["warp_updates"] == 1
    np.testing.assert_allclose(applied, np.mean(by_point, axis=0), rtol=1e-7, atol=1e-10)
    # without θ_K: the mean over θ_0, θ_1 only, which is a different update
    old, _ = _meta_step(objective=objective, buffer_final_point=False, meta_interval=K)
    np.testing.assert_allclose(old, np.mean(by_point[:K], axis=0), rtol=1e-7, atol=1e-10)
    assert np.max(np.abs(applied - old)) > 1e-2, (applied, old)


def test_every_stored_point_is_used_once(float64):
    # η = 1: one warp update per stored point, K + 1 per task (K without θ_K)
    assert _meta_step(meta_interval=1)[1]["warp_updates"] == K + 1
    assert _meta_step(meta_interval=1, buffer_final_point=False)[1]["warp_updates"] == K


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_sum_reduction_is_number_of_terms_times_mean(float64, mode):
    extra = {} if mode == "offline" else {"meta_interval": None}
    mean, _ = _meta_step(mode=mode, **extra)
    total, _ = _meta_step(mode=mode, warp_gradient_reduction="sum", **extra)
    # offline: the K + 1 points of one mini-batch; online: the K steps of the one task
    terms = K + 1 if mode == "offline" else K
    np.testing.assert_allclose(total, terms * mean, rtol=1e-9, atol=1e-12)
    by_point = [_warp_gradient(w, "approx") for w in _trajectory()]
    hand = np.sum(by_point if mode == "offline" else by_point[:K], axis=0)
    np.testing.assert_allclose(total, hand, rtol=1e-7, atol=1e-10)


def _approx_gradient_at(w, phi):
    stepped = w - ALPHA * _grad_w(w, phi, X, Y)
    return 2.0 / YM.size * (XM @ stepped).T @ (XM @ stepped @ phi - YM)


def _trainer_phi(fused, tasks, optimizer=None, **kwargs):
    model = _model()
    trainer = warpkeras.WarpTrainer(
        model,
        mse,
        init_objective=None,
        inner_steps=K,
        inner_learning_rate=ALPHA,
        meta_batch_size=len(tasks),
        meta_optimizer=optimizer or keras.optimizers.SGD(BETA),
        mode="offline",
        objective="approx",
        meta_interval=1,
        seed=3,
        **kwargs,
    )
    if not fused:
        trainer._warp.warp_point_update = None  # the general path: gradient, then update
    logs = trainer.train_step(tasks, np.random.default_rng(0))
    return model.get_layer("warp").get_weights()[0], logs


def test_one_point_updates_run_in_one_call_and_follow_algorithm_2(float64):
    # η = 1: Algorithm 2 lines 14–20 with a mini-batch of one point: φ ← φ − β ∇φ at each
    # drawn point in turn, each gradient at the φ left by the update before it.
    phi, logs = _trainer_phi(True, [_task()])
    assert logs["warp_updates"] == K + 1
    points = _trajectory()
    by_order = []
    for order in itertools.permutations(range(K + 1)):
        p = PHI0.copy()
        for k in order:
            p = p - BETA * _approx_gradient_at(points[k], p)
        by_order.append(p)
    assert min(np.max(np.abs(phi - p)) for p in by_order) < 1e-10
    # the orders give different φ, so the match above is not a coincidence of the order
    assert np.max(np.abs(by_order[0] - by_order[-1])) > 1e-6
    general, general_logs = _trainer_phi(False, [_task()])
    np.testing.assert_allclose(phi, general, rtol=1e-12, atol=1e-14)
    assert general_logs["warp_updates"] == logs["warp_updates"]
    np.testing.assert_allclose(logs["meta_loss"], general_logs["meta_loss"], rtol=1e-12)


def test_one_point_updates_skip_non_finite_points_like_the_general_path(float64):
    def exploding():
        def forever(rng):
            while True:
                yield X * 1e200, Y

        return warpkeras.Task(train=forever, meta=_task().meta, name="exploding")

    results = []
    for fused in (True, False):
        with pytest.warns(RuntimeWarning, match="exploding"):
            results.append(_trainer_phi(fused, [_task(), exploding()]))
    (phi, logs), (general, general_logs) = results
    assert logs["nan_points"] == general_logs["nan_points"] >= 1
    assert logs["warp_updates"] == general_logs["warp_updates"] == K + 1
    assert np.all(np.isfinite(phi))
    np.testing.assert_allclose(phi, general, rtol=1e-12, atol=1e-14)


def test_one_point_updates_with_adam_equal_the_general_path(float64):
    # the optimiser's own state (Adam's moments and step count) is updated inside the call
    fused, logs = _trainer_phi(True, [_task()], keras.optimizers.Adam(0.1))
    general, _ = _trainer_phi(False, [_task()], keras.optimizers.Adam(0.1))
    assert logs["warp_updates"] == K + 1
    np.testing.assert_allclose(fused, general, rtol=1e-12, atol=1e-14)
    assert np.max(np.abs(fused - PHI0)) > 1e-3


def test_one_point_updates_compile_with_xla(float64):
    # jit_compile=True: the update (and its skip branch) inside the one XLA-compiled call
    fused, _ = _trainer_phi(True, [_task()], keras.optimizers.Adam(0.1), jit_compile=True)
    general, _ = _trainer_phi(False, [_task()], keras.optimizers.Adam(0.1))
    np.testing.assert_allclose(fused, general, rtol=1e-10, atol=1e-12)
