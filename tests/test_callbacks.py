"""Tests of `warpkeras.callbacks.LeapCallback` (Leap's pull-forward during `model.fit`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras import objectives
from warpkeras.callbacks import LeapCallback
from warpkeras.optimizers import WarpGrad

W_TRUE = np.array([[1.0], [-1.0], [0.5]])


def _task(rng, n=48):
    w = W_TRUE + 0.1 * rng.normal(size=(3, 1))
    x = rng.normal(size=(n, 3))
    y = x @ w + 0.5 + 0.05 * rng.normal(size=(n, 1))
    dtype = keras.config.floatx()
    return x.astype(dtype), y.astype(dtype)


def _mlp():
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )


def _reference_path(model, x, y, batch, epochs, lr, momentum, nesterov):
    """The same training written out with a tape: θ_k, L_k and ∇L(θ_k) of every batch."""
    variables = model.trainable_variables
    loss_fn = keras.losses.MeanSquaredError()
    # SGD.update_step casts its Python constants to the variable's dtype through a float32
    # tensor, so the momentum it actually applies is float32(μ).
    mu = float(np.float32(momentum))
    velocity = [np.zeros(v.shape) for v in variables]
    thetas, losses, grads = [], [], []
    for _ in range(epochs):
        for start in range(0, len(x), batch):
            xb, yb = x[start : start + batch], y[start : start + batch]
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            g = [gi.numpy() for gi in tape.gradient(loss, variables)]
            thetas.append([v.numpy().copy() for v in variables])
            losses.append(loss)
            grads.append(g)
            for i, v in enumerate(variables):
                velocity[i] = mu * velocity[i] - lr * g[i]
                if nesterov:
                    v.assign(v.numpy() + mu * velocity[i] - lr * g[i])
                elif momentum:
                    v.assign(v.numpy() + velocity[i])
                else:
                    v.assign(v.numpy() - lr * g[i])
    return thetas, losses, grads


@pytest.mark.parametrize(
    "momentum,nesterov,norm",
    [
        (0.0, False, "energy"),
        (0.0, False, "length"),
        (0.9, False, "energy"),
        (0.5, True, "length"),
    ],
)
def test_accumulated_gradient_equals_sum_over_path(float64, momentum, nesterov, norm):
    rng = np.random.default_rng(0)
    x, y = _task(rng)
    model = _mlp()
    initial = model.get_weights()
    lr, batch, epochs = 0.05, 8, 2
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=momentum, nesterov=nesterov), loss="mse"
    )
    leap = LeapCallback(norm=norm, update_on_train_end=False)
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[leap])

    reference = _mlp()
    reference.set_weights(initial)
    thetas, losses, grads = _reference_path(reference, x, y, batch, epochs, lr, momentum, nesterov)
    expected = [np.zeros_like(w) for w in initial]
    length = 0.0
    for k in range(1, len(thetas)):
        segment = objectives.leap_meta_gradient(
            thetas[k - 1], thetas[k], losses[k - 1], losses[k], grads[k - 1], norm=norm
        )
        expected = [e + s.numpy() for e, s in zip(expected, segment)]
        length += float(
            objectives.leap_path_length(thetas[k - 1 : k + 1], losses[k - 1 : k + 1], norm=norm)
        )
    for got, want in zip(leap.task_gradient, expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-7, atol=1e-9)
    assert np.abs(expected[0]).max() > 1e-3  # a non-trivial gradient

    # Closing the task records the path and applies the meta step θ0 ← θ0 − β Σ g.
    leap.next_task()
    assert leap.num_tasks == 1
    assert leap.path_lengths[0] == pytest.approx(length, rel=1e-8)
    for w0, g, t0, v in zip(initial, expected, leap.theta0, model.trainable_variables):
        np.testing.assert_allclose(t0.numpy(), w0 - 0.1 * g, rtol=1e-7, atol=1e-9)
        np.testing.assert_array_equal(v.numpy(), t0.numpy())  # the model restarts at θ0
    if momentum:
        for m in model.optimizer.momentums:
            assert not np.any(m.numpy())  # the inner state was reset


@pytest.mark.parametrize("norm,meta_lr", [("energy", 0.05), ("length", 0.05)])
def test_path_length_shrinks_over_tasks(norm, meta_lr):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.set_weights([np.zeros((3, 1)), np.zeros(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    leap = LeapCallback(meta_optimizer=keras.optimizers.SGD(meta_lr), norm=norm)
    rng = np.random.default_rng(0)
    for _ in range(6):
        x, y = _task(rng, n=32)
        # Ten full-batch steps (the batch repeated), so that the loss coordinate of the
        # path measures progress and not the noise between mini-batches.
        model.fit(
            np.tile(x, (10, 1)),
            np.tile(y, (10, 1)),
            batch_size=32,
            shuffle=False,
            verbose=0,
            callbacks=[leap],
        )
    lengths = leap.path_lengths
    assert len(lengths) == 6 and leap.num_tasks == 6
    assert np.mean(lengths[-3:]) < 0.5 * lengths[0], lengths
    # θ0 moved towards the tasks' common solution.
    theta0 = leap.initial_values()
    before = np.linalg.norm(W_TRUE)
    after = np.linalg.norm(theta0[0] - W_TRUE)
    assert after < before


def test_tasks_per_update_averages_tasks(float64):
    rng = np.random.default_rng(1)
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    leap = LeapCallback(meta_optimizer=keras.optimizers.SGD(0.1), tasks_per_update=2)
    start = [w.copy() for w in model.get_weights()]
    task_grads = []
    for i in range(2):
        x, y = _task(rng, n=32)
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[leap])
        task_grads.append(leap.last_task_gradient)
        # The task variables restart from θ0 after every task.
        for v, t0 in zip(model.trainable_variables, leap.theta0):
            np.testing.assert_array_equal(v.numpy(), t0.numpy())
        if i == 0:
            for w, t0 in zip(start, leap.theta0):
                np.testing.assert_array_equal(t0.numpy(), w)  # no update after one task
    for w, g1, g2, t0 in zip(start, *task_grads, leap.theta0):
        np.testing.assert_allclose(t0.numpy(), w - 0.1 * (g1 + g2) / 2, rtol=1e-9, atol=1e-12)


def test_with_warpgrad_leaves_warp_variables_to_the_optimizer(float64):
    rng = np.random.default_rng(2)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh"),
            warpkeras.warp(keras.layers.Dense(4, activation="tanh")),
            keras.layers.Dense(1),
        ]
    )
    part = warpkeras.partition(model)
    x, y = _task(rng, n=16)
    # The expected single path segment θ0 → θ1 (two batches of 8; φ is meta-updated only
    # after the second batch, so both losses are at the initial φ).
    loss_fn = keras.losses.MeanSquaredError()
    theta0, phi = part.initial_task_values(), part.warp_values()
    l0, g0, _ = objectives.task_gradient(part, loss_fn, theta0, phi, (x[:8], y[:8]))
    theta1 = [t - 0.05 * g for t, g in zip(theta0, g0)]
    l1, _ = objectives.task_loss(part, loss_fn, theta1, phi, (x[8:], y[8:]))
    expected = objectives.leap_meta_gradient(theta0, theta1, l0, l1, g0)

    opt = WarpGrad(
        keras.optimizers.SGD(0.05, momentum=0.5),
        keras.optimizers.SGD(0.01),
        meta_interval=2,
        model=model,
    )
    model.compile(optimizer=opt, loss="mse")
    leap = LeapCallback(update_on_train_end=False)
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[leap])
    assert len(leap.theta0) == len(part.task_variables)
    for got, want in zip(leap.task_gradient, expected):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-7, atol=1e-10)

    warp_after_fit = [v.numpy().copy() for v in part.warp_variables]
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(warp_after_fit, phi))
    leap.next_task()
    for v, w in zip(part.warp_variables, warp_after_fit):
        np.testing.assert_array_equal(v.numpy(), w)  # Leap does not touch φ
    for v, t0 in zip(part.task_variables, leap.theta0):
        np.testing.assert_array_equal(v.numpy(), t0.numpy())


def test_rejects_unsupported_optimisers_and_settings():
    x, y = _task(np.random.default_rng(3), n=16)
    model = _mlp()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    with pytest.raises(ValueError, match="keras.optimizers.SGD"):
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[LeapCallback()])
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.01, clipnorm=1.0), loss="mse")
    with pytest.raises(ValueError, match="clipnorm"):
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[LeapCallback()])
    model = _mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[LeapCallback()])
    with pytest.raises(ValueError, match="norm"):
        LeapCallback(norm="area")
    with pytest.raises(ValueError, match="has not seen any training"):
        LeapCallback().next_task()
