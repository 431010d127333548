"""The meta-objectives against independent references: finite differences, autodiff of the
frozen-baseline objective, and hand-derived values."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_lists_close

import warpkeras
from warpkeras import objectives as obj


def mse(y, p):
    return 0.5 * tf.reduce_mean(tf.reduce_sum(tf.square(y - p), axis=-1))


def _nonlinear_warp_model():
    """task tanh layer -> non-linear warp (tanh) -> task linear head, float64."""
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", name="t1"),
            warpkeras.warp(keras.layers.Dense(4, activation="tanh", name="w1")),
            keras.layers.Dense(2, name="head"),
        ]
    )


def _batches(rng, n=6):
    x1, y1 = rng.randn(n, 3), rng.randn(n, 2)
    x2, y2 = rng.randn(n, 3), rng.randn(n, 2)
    return (x1, y1), (x2, y2)


def _flat(ts):
    return np.concatenate([np.ravel(np.asarray(t)) for t in ts])


def _unflat(vec, like):
    out, i = [], 0
    for t in like:
        n = int(np.prod(t.shape))
        out.append(tf.constant(vec[i : i + n].reshape(t.shape), dtype=t.dtype))
        i += n
    return out


def _central_fd(fn, params, eps=1e-6):
    base = _flat(params)
    grad = np.zeros_like(base)
    for i in range(base.size):
        up, down = base.copy(), base.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (float(fn(_unflat(up, params))) - float(fn(_unflat(down, params)))) / (2 * eps)
    return grad


def test_exact_warp_gradient_matches_finite_differences(float64):
    model = _nonlinear_warp_model()
    p = warpkeras.partition(model, require_warp=True)
    rng = np.random.RandomState(0)
    task_b, meta_b = _batches(rng)
    # a sampled task parameterisation, not the initialisation
    theta = [t + 0.3 * rng.randn(*t.shape) for t in p.initial_task_values()]
    phi = p.warp_values()
    lr = 0.7

    _, g_exact, _ = obj.warp_meta_gradient(p, mse, theta, phi, task_b, meta_b, lr, exact=True)
    fd = _central_fd(lambda f: obj.warp_objective(p, mse, theta, f, task_b, meta_b, lr), phi)
    # float64 central differences with eps=1e-6: truncation ~1e-12, rounding ~1e-10.
    np.testing.assert_allclose(_flat(g_exact), fd, rtol=1e-6, atol=1e-8)


def test_approximate_warp_gradient_stops_inner_gradient_and_differs(float64):
    model = _nonlinear_warp_model()
    p = warpkeras.partition(model, require_warp=True)
    rng = np.random.RandomState(1)
    task_b, meta_b = _batches(rng)
    theta = [t + 0.3 * rng.randn(*t.shape) for t in p.initial_task_values()]
    phi = p.warp_values()
    lr = 0.7

    _, g_approx, _ = obj.warp_meta_gradient(p, mse, theta, phi, task_b, meta_b, lr, exact=False)
    # reference: step with the gradient computed at the *current* phi held constant, then
    # differentiate the meta loss at that stepped point by finite differences in phi.
    _, grads, _ = obj.task_gradient(p, mse, theta, phi, task_b)
    stepped = [t - lr * g for t, g in zip(theta, grads)]
    fd = _central_fd(lambda f: obj.task_loss(p, mse, stepped, f, meta_b)[0], phi)
    np.testing.assert_allclose(_flat(g_approx), fd, rtol=1e-6, atol=1e-8)

    _, g_exact, _ = obj.warp_meta_gradient(p, mse, theta, phi, task_b, meta_b, lr, exact=True)
    diff = np.abs(_flat(g_exact) - _flat(g_approx)).max()
    assert diff > 1e-3 * np.abs(_flat(g_exact)).max()


def test_learning_rate_and_momentum_meta_gradients_match_fd(float64):
    model = _nonlinear_warp_model()
    p = warpkeras.partition(model, require_warp=True)
    rng = np.random.RandomState(2)
    task_b, meta_b = _batches(rng)
    theta = p.initial_task_values()
    phi = p.warp_values()
    velocity = [0.1 * rng.randn(*t.shape) for t in theta]
    lr = tf.constant(0.3, tf.float64)
    mu = tf.constant(0.9, tf.float64)
    _, _, (g_lr, g_mu) = obj.warp_meta_gradient(
        p,
        mse,
        theta,
        phi,
        task_b,
        meta_b,
        lr,
        momentum=mu,
        velocity=velocity,
        extra_sources=[lr, mu],
    )

    def f(a, m):
        return float(
            obj.warp_objective(p, mse, theta, phi, task_b, meta_b, a, momentum=m, velocity=velocity)
        )

    # These derivatives are ~1e-2 against a loss of ~1: rounding in the forward pass
    # (~1e-12) dominates central differences below eps ~ 1e-4, and truncation is ~1e-8 at
    # eps = 1e-3, where estimates are stable to ~2e-5 relative. Tolerance: 1e-4 relative.
    eps = 1e-3
    fd_lr = (f(0.3 + eps, 0.9) - f(0.3 - eps, 0.9)) / (2 * eps)
    fd_mu = (f(0.3, 0.9 + eps) - f(0.3, 0.9 - eps)) / (2 * eps)
    np.testing.assert_allclose(float(g_lr), fd_lr, rtol=1e-4)
    np.testing.assert_allclose(float(g_mu), fd_mu, rtol=1e-4)


def test_momentum_step_is_heavy_ball(float64):
    model = _nonlinear_warp_model()
    p = warpkeras.partition(model)
    rng = np.random.RandomState(3)
    batch, _ = _batches(rng)
    theta, phi = p.initial_task_values(), p.warp_values()
    v0 = [rng.randn(*t.shape) for t in theta]
    step = obj.task_step(p, mse, theta, phi, batch, 0.1, momentum=0.5, velocity=v0)
    _, g, _ = obj.task_gradient(p, mse, theta, phi, batch)
    v1 = [0.5 * v + gi for v, gi in zip(v0, g)]
    assert_lists_close(step.velocity, v1)
    assert_lists_close(step.theta, [t - 0.1 * v for t, v in zip(theta, v1)])


# --- Leap ---------------------------------------------------------------------------------


def _quadratic_tasks(rng, n_tasks=3, dim=4):
    a = np.diag(np.linspace(0.5, 3.0, dim))
    centres = [rng.randn(dim) * 2 for _ in range(n_tasks)]
    return a, centres


def _sgd_path(theta0, a, c, lr, steps):
    thetas, losses, grads = [theta0], [], []
    th = theta0
    for _ in range(steps):
        d = th - c
        losses.append(0.5 * d @ a @ d)
        grads.append(a @ d)
        th = th - lr * (a @ d)
        thetas.append(th)
    d = th - c
    losses.append(0.5 * d @ a @ d)
    return thetas, losses, grads


@pytest.mark.parametrize("norm", ["energy", "length"])
def test_leap_gradient_equals_autodiff_of_frozen_baseline(norm):
    rng = np.random.RandomState(0)
    a, centres = _quadratic_tasks(rng)
    theta0 = rng.randn(4)
    lr, steps = 0.1, 8
    ours = np.zeros(4)
    reference = np.zeros(4)
    a_t = tf.constant(a)
    for c in centres:
        thetas, losses, grads = _sgd_path(theta0, a, c, lr, steps)
        for k in range(1, steps + 1):
            g = obj.leap_meta_gradient(
                [thetas[k - 1]],
                [thetas[k]],
                losses[k - 1],
                losses[k],
                [grads[k - 1]],
                norm=norm,
                sign_correction=False,
            )
            ours += np.asarray(g[0])
        # autodiff: theta_{k-1} = theta0 + const (Jacobian = I), targets frozen
        t0 = tf.Variable(theta0)
        with tf.GradientTape() as tape:
            total = 0.0
            for k in range(1, steps + 1):
                prev = t0 + tf.constant(thetas[k - 1] - theta0)
                d = prev - c
                loss_prev = 0.5 * tf.tensordot(d, tf.linalg.matvec(a_t, d), 1)
                sq = tf.reduce_sum(tf.square(tf.constant(thetas[k]) - prev)) + tf.square(
                    tf.constant(losses[k]) - loss_prev
                )
                total += sq if norm == "energy" else tf.sqrt(sq)
        reference += tape.gradient(total, t0).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-12)


def test_leap_sign_correction_by_hand():
    # a step on which the loss went up by 2: corrected gradient is 2(|dL| g - dtheta)
    theta_prev, theta_next = np.array([1.0, 0.0]), np.array([0.5, 1.0])
    g_prev = np.array([3.0, -1.0])
    corrected = obj.leap_meta_gradient([theta_prev], [theta_next], 1.0, 3.0, [g_prev])
    np.testing.assert_allclose(corrected[0], 2 * (2.0 * g_prev - (theta_next - theta_prev)))
    plain = obj.leap_meta_gradient(
        [theta_prev], [theta_next], 1.0, 3.0, [g_prev], sign_correction=False
    )
    np.testing.assert_allclose(plain[0], -2 * (2.0 * g_prev + (theta_next - theta_prev)))
    # when the loss goes down the correction changes nothing
    down = obj.leap_meta_gradient([theta_prev], [theta_next], 3.0, 1.0, [g_prev])
    np.testing.assert_allclose(down[0], -2 * (-2.0 * g_prev + (theta_next - theta_prev)))


@pytest.mark.parametrize("norm", ["energy", "length"])
def test_leap_updates_shorten_paths(norm):
    rng = np.random.RandomState(1)
    a, centres = _quadratic_tasks(rng, n_tasks=4)
    theta0 = rng.randn(4) * 3 + 5
    lr, steps = 0.1, 10
    beta = 1e-3 if norm == "energy" else 0.1

    def mean_length(t0):
        total = 0.0
        for c in centres:
            th, lo, _ = _sgd_path(t0, a, c, lr, steps)
            total += float(obj.leap_path_length([[t] for t in th], lo, norm=norm))
        return total / len(centres)

    before = mean_length(theta0)
    for _ in range(5):
        g = np.zeros(4)
        for c in centres:
            th, lo, gr = _sgd_path(theta0, a, c, lr, steps)
            for k in range(1, steps + 1):
                g += np.asarray(
                    obj.leap_meta_gradient(
                        [th[k - 1]], [th[k]], lo[k - 1], lo[k], [gr[k - 1]], norm=norm
                    )[0]
                )
        theta0 = theta0 - beta * g / len(centres)
    after = mean_length(theta0)
    assert after < 0.7 * before, (before, after)


# --- MAML and Reptile ------------------------------------------------------------------------


def test_maml_second_order_matches_fd_and_first_order_is_gradient_at_theta_k(float64):
    model = _nonlinear_warp_model()
    p = warpkeras.partition(model)
    rng = np.random.RandomState(4)
    support, query = _batches(rng)
    theta0, phi = p.initial_task_values(), p.warp_values()
    lr, steps = 0.5, 2
    _, g2, theta_k = obj.maml_meta_gradient(p, mse, theta0, phi, support, query, lr, steps)
    fd = _central_fd(
        lambda t: obj.maml_objective(p, mse, t, phi, support, query, lr, steps)[0], theta0
    )
    np.testing.assert_allclose(_flat(g2), fd, rtol=1e-6, atol=1e-8)

    _, g1, theta_k1 = obj.maml_meta_gradient(
        p, mse, theta0, phi, support, query, lr, steps, first_order=True
    )
    assert_lists_close(theta_k1, theta_k)
    _, at_k, _ = obj.task_gradient(p, mse, theta_k, phi, query)
    assert_lists_close(g1, at_k, rtol=1e-9, atol=1e-12)
    assert np.abs(_flat(g1) - _flat(g2)).max() > 1e-4


def test_reptile_direction():
    d = obj.reptile_direction([np.array([1.0, 2.0])], [np.array([0.5, 3.0])])
    np.testing.assert_allclose(d[0], [0.5, -1.0])


# --- continual ---------------------------------------------------------------------------


def test_continual_weights_give_every_subtask_equal_total_weight():
    T, n = 5, 20
    w = obj.continual_weights(T, n)
    appearances = [n * (T - i + 1) for i in range(1, T + 1)]
    np.testing.assert_allclose([wi * a for wi, a in zip(w, appearances)], np.ones(T))


def test_printed_continual_weights_share_the_current_subtasks_weight():
    # Eq. 18 as printed: w = 1 / (n (T - t + 1)) for every active sub-task
    assert obj.continual_weights(4, 5, "printed", current_subtask=1) == [1 / 20] * 4
    assert obj.continual_weights(4, 5, "printed", current_subtask=4) == [1 / 5] * 4
    as_tensor = obj.continual_weights(4, 5, "printed", current_subtask=tf.constant(3))
    np.testing.assert_allclose([float(w) for w in as_tensor], [1 / 10] * 4)
    with pytest.raises(ValueError, match="current_subtask"):
        obj.continual_weights(4, 5, "printed")
    with pytest.raises(ValueError, match="current_subtask"):
        obj.continual_weights(4, 5, "average")
    assert obj.continual_weights(4, 5, "average", current_subtask=4) == [1 / 4] * 4
    with pytest.raises(ValueError, match="weighting"):
        obj.continual_weights(4, 5, "uniform")


def test_continual_objective_sums_current_and_earlier_subtasks(float64):
    model = _nonlinear_warp_model()
    p = warpkeras.partition(model)
    rng = np.random.RandomState(5)
    vals = [(rng.randn(4, 3), rng.randn(4, 2)) for _ in range(3)]
    theta, phi = p.initial_task_values(), p.warp_values()
    losses = [float(obj.task_loss(p, mse, theta, phi, b)[0]) for b in vals]
    w = obj.continual_weights(3, 2)
    got = obj.continual_objective(p, mse, theta, phi, vals, 2, 3, 2)
    np.testing.assert_allclose(float(got), w[0] * losses[0] + w[1] * losses[1])
    printed = obj.continual_objective(
        p, mse, theta, phi, vals, tf.constant(2), 3, 2, weighting="printed"
    )
    np.testing.assert_allclose(float(printed), (losses[0] + losses[1]) / (2 * (3 - 2 + 1)))
    # App. D: the average of the current and earlier sub-tasks' losses
    for t in (1, 2, 3):
        average = obj.continual_objective(
            p, mse, theta, phi, vals, tf.constant(t), 3, 2, weighting="average"
        )
        np.testing.assert_allclose(float(average), np.mean(losses[:t]), rtol=1e-6)
    # usable as the meta-loss of the warp objective
    task_b = vals[1]
    m = obj.warp_objective(
        p,
        mse,
        theta,
        phi,
        task_b,
        None,
        0.1,
        meta_loss=lambda th, ph, st: obj.continual_objective(p, mse, th, ph, vals, 3, 3, 2),
    )
    stepped = obj.task_step(p, mse, theta, phi, task_b, 0.1).theta
    ref = obj.continual_objective(p, mse, stepped, phi, vals, 3, 3, 2)
    np.testing.assert_allclose(float(m), float(ref))
