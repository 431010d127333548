"""examples/continual_sine_gradients.py: the warp meta-gradient of Eq. 3 (g_warp) and the
gradient of Eq. 18 along the whole adaptation (g_traj), against central finite differences
in float64 and against the meta-gradient `WarpTrainer` applies; and the example's smoke run.
"""

import importlib
import json
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO / "examples") not in sys.path:
    sys.path.insert(0, str(REPO / "examples"))

T, N, ALPHA = 2, 2, 0.3


def half_mse64(y_true, y_pred):
    return 0.5 * tf.reduce_mean(tf.square(y_pred - y_true))


def _setup():
    module = importlib.import_module("continual_sine_gradients")
    cs = module.cs
    import warpkeras

    model = cs.build_model(4, 3, 1, seed=0)
    cs.randomise_warps(model, seed=1)
    partition = warpkeras.partition(model)
    rng = np.random.default_rng(5)
    xs = rng.uniform(-5, 5, (T * N, 3, 1))
    ys = np.sin(xs)
    xv = np.stack([rng.uniform(-5 + 5 * i, 5 * i, (4, 1)) for i in range(T)])
    yv = np.sin(xv)
    data = tuple(tf.constant(a, tf.float64) for a in (xs, ys, xv, yv))
    meta_loss = cs.make_meta_loss(T, N)
    return module, cs, model, partition, meta_loss, data


def _trajectory_total(cs, partition, meta_loss, phi, data, points=None):
    """Σ_k L_meta(θ_{k+1}; φ) along the adaptation, forward only; with `points`, one step
    from each given θ_k instead (Eq. 3's sum at fixed points). Returns the sum and the
    points stepped from."""
    from warpkeras import objectives as obj

    xs, ys, xv, yv = data
    theta = partition.initial_task_values()
    total, visited = 0.0, []
    for k in range(T * N):
        start = points[k] if points is not None else theta
        visited.append(start)
        theta = obj.task_step(partition, half_mse64, start, phi, (xs[k], ys[k]), ALPHA).theta
        t = tf.constant(k // N + 1, tf.int32)
        total += float(meta_loss(partition, half_mse64, theta, phi, (xv, yv, t), None))
    return total, visited


def _directional_fd(fn, phi, direction, eps=1e-6):
    up = [p + eps * d for p, d in zip(phi, direction)]
    down = [p - eps * d for p, d in zip(phi, direction)]
    return (fn(up) - fn(down)) / (2 * eps)


def _dot(grads, direction):
    return sum(float(np.sum(np.asarray(g) * d)) for g, d in zip(grads, direction))


def test_both_gradients_match_finite_differences(float64):
    module, cs, _, partition, meta_loss, data = _setup()
    phi = partition.warp_values()
    gradients = module.trajectory_gradients(partition, half_mse64, meta_loss, ALPHA, T, N)
    g_warp, g_traj, eq18 = gradients(phi, *data)
    total, points = _trajectory_total(cs, partition, meta_loss, phi, data)
    np.testing.assert_allclose(float(eq18), total / (T * N), rtol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(2):
        direction = [rng.normal(size=p.shape) for p in phi]
        traj = _directional_fd(
            lambda f: _trajectory_total(cs, partition, meta_loss, f, data)[0], phi, direction
        )
        warp = _directional_fd(
            lambda f: _trajectory_total(cs, partition, meta_loss, f, data, points)[0],
            phi,
            direction,
        )
        np.testing.assert_allclose(_dot(g_traj, direction), traj, rtol=1e-6)
        np.testing.assert_allclose(_dot(g_warp, direction), warp, rtol=1e-6)
    # the two are different gradients here: θ_k's dependence on φ matters
    assert (
        abs(module.compare(g_warp, g_traj)[1] - 1.0) > 1e-4
        or module.compare(g_warp, g_traj)[0] < 1 - 1e-6
    )


def test_warp_gradient_is_what_the_trainer_applies(float64):
    """One online meta step (meta-batch 1, SGD at rate 1, sum reduction) moves φ by −g_warp."""
    module, cs, model, partition, meta_loss, data = _setup()
    import warpkeras

    phi = partition.warp_values()
    g_warp, _, _ = module.trajectory_gradients(partition, half_mse64, meta_loss, ALPHA, T, N)(
        phi, *data
    )
    xs, ys, xv, yv = data

    def train(rng):
        return iter(zip(xs, ys))

    def meta(rng):
        for k in range(T * N):
            yield xv, yv, tf.constant(k // N + 1, tf.int32)

    trainer = warpkeras.WarpTrainer(
        model,
        loss=half_mse64,
        mode="online",
        objective="exact",
        init_objective=None,
        inner_learning_rate=ALPHA,
        inner_steps=T * N,
        meta_batch_size=1,
        meta_optimizer=keras.optimizers.SGD(1.0),
        meta_loss=meta_loss,
        warp_gradient_reduction="sum",
        seed=0,
    )
    trainer.train_step([warpkeras.Task(train=train, meta=meta)], np.random.default_rng(0))
    for before, after, g in zip(phi, partition.warp_values(), g_warp):
        np.testing.assert_allclose(
            np.asarray(before) - np.asarray(after), np.asarray(g), rtol=1e-9, atol=1e-12
        )


def test_compare_cosine_and_norm_ratio():
    module = importlib.import_module("continual_sine_gradients")
    cosine, ratio = module.compare([np.array([3.0, 0.0])], [np.array([[1.0], [1.0]])])
    np.testing.assert_allclose([cosine, ratio], [1 / np.sqrt(2), 3 / np.sqrt(2)])
    assert np.isnan(module.compare([np.zeros(2)], [np.ones(2)])[0])


def test_continual_sine_gradients_smoke(tmp_path):
    module = importlib.import_module("continual_sine_gradients")
    out = tmp_path / "results"
    returned = module.main(
        ["--smoke", "--verbose", "0", "--output-dir", str(out), "--check-every", "1"]
    )
    data = json.loads((out / "continual_sine_gradients.json").read_text())
    assert data["example"] == returned["example"] == "continual_sine_gradients"
    assert [r["seed"] for r in data["per_seed"]] == data["config"]["seeds"] == [0]
    checks = data["per_seed"][0]["checks"]
    assert [c["meta_step"] for c in checks] == list(range(data["config"]["meta_steps"] + 1))
    for c in checks:
        assert -1 <= c["cosine_of_sums"] <= 1
        assert len(c["cosine_per_sequence"]["values"]) == data["config"]["check_sequences"]
        assert np.isfinite(c["eq18_along_trajectory"]["mean"])
    png = (out / "continual_sine_gradients.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["config"]["select_every"] == 0
    for flags, message in (
        (["--check-every", "0"], "--check-every must be >= 1"),
        (["--check-sequences", "0"], "--check-sequences must be >= 1"),
        (["--select-every", "5"], "--select-every has no effect"),
    ):
        with pytest.raises(SystemExit, match=message):
            module.main(["--smoke", "--output-dir", str(out), *flags])
