"""Meta-training: each algorithm against a hand-written reference and on a task family
where the thing it meta-learns is learnable."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_lists_close, linear_warp_model, plain_model

import warpkeras
from warpkeras import objectives as obj

SCALES = np.array([2.0, 1.0, 0.5, 0.25], "float32")


def ill_conditioned_task(rng, n=120):
    """Linear regression whose inputs share a badly scaled covariance: learnable by a warp."""
    # every input direction carries the same share of the target's variance
    w = (rng.normal(size=(4, 1)) / SCALES[:, None]).astype("float32")
    x = (rng.normal(size=(n, 4)) * SCALES).astype("float32")
    y = x @ w
    return warpkeras.Task(train=(x[:100], y[:100]), test=(x[100:], y[100:]), batch_size=20)


def shared_solution_task(rng, n=120):
    """Regression tasks whose solutions cluster around a common point: learnable by θ0."""
    w = (np.array([[2.0], [-1.5], [1.0], [0.5]]) + 0.1 * rng.normal(size=(4, 1))).astype("float32")
    x = rng.normal(size=(n, 4)).astype("float32")
    y = x @ w
    return warpkeras.Task(train=(x[:100], y[:100]), test=(x[100:], y[100:]), batch_size=20)


HELD_OUT = [ill_conditioned_task(np.random.default_rng(1000 + i)) for i in range(4)]


def _baseline_loss(tasks, steps=10, lr=0.1, model=None):
    model = model or linear_warp_model()
    return warpkeras.NoMetaTrainer(
        model, "mse", inner_steps=steps, inner_learning_rate=lr
    ).evaluate(tasks, verbose=0)


@pytest.fixture(scope="module")
def base_loss():
    """`HELD_OUT`'s final test loss without meta-training (identity warp, zero head),
    evaluated once for the module."""
    keras.utils.set_random_seed(0)
    return _baseline_loss(HELD_OUT)["final_test_loss"]["mean"]


@pytest.mark.parametrize(
    "mode,objective",
    [
        ("online", "exact"),
        ("online", "approx"),
        ("offline", "exact"),
        ("offline", "approx"),
    ],
)
def test_warp_modes_beat_no_meta_training(mode, objective, base_loss):
    model = linear_warp_model()
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        mode=mode,
        objective=objective,
        init_objective=None,
        inner_steps=10,
        inner_learning_rate=0.1,
        meta_batch_size=4,
        meta_interval=5,
        meta_optimizer=keras.optimizers.Adam(0.1 if mode == "online" else 0.03),
        seed=0,
    )
    trainer.fit(ill_conditioned_task, meta_steps=15, verbose=0)
    warped = trainer.evaluate(HELD_OUT, verbose=0)["final_test_loss"]["mean"]
    assert warped < 0.2 * base_loss, (warped, base_loss)


def test_continual_mode_learns_a_warp_that_helps_fresh_learners(base_loss):
    model = linear_warp_model()
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        mode="continual",
        init_objective=None,
        inner_steps=10,
        inner_learning_rate=0.1,
        meta_batch_size=4,
        meta_interval=5,
        meta_optimizer=keras.optimizers.Adam(0.03),
    )
    warp_before = model.get_layer("warp").get_weights()[0].copy()
    trainer.fit(ill_conditioned_task, meta_steps=15, verbose=0)
    fresh = linear_warp_model()
    fresh.get_layer("warp").set_weights(model.get_layer("warp").get_weights())
    warped = _baseline_loss(HELD_OUT, model=fresh)["final_test_loss"]["mean"]
    assert not np.allclose(warp_before, model.get_layer("warp").get_weights()[0])
    assert warped < 0.3 * base_loss, (warped, base_loss)


def test_leap_shortens_held_out_paths():
    held = [shared_solution_task(np.random.default_rng(2000 + i)) for i in range(4)]
    model = plain_model()
    trainer = warpkeras.LeapTrainer(
        model,
        "mse",
        inner_steps=15,
        inner_learning_rate=0.05,
        meta_batch_size=4,
        meta_optimizer=keras.optimizers.SGD(0.1),
    )
    before = trainer.evaluate(held, verbose=0)
    trainer.fit(shared_solution_task, meta_steps=15, verbose=0)
    after = trainer.evaluate(held, verbose=0)
    assert after["path_length"]["mean"] < 0.5 * before["path_length"]["mean"]
    assert after["final_test_loss"]["mean"] < 0.5 * before["final_test_loss"]["mean"]


@pytest.mark.parametrize(
    "make",
    [
        lambda m: warpkeras.MAMLTrainer(
            m,
            "mse",
            inner_steps=2,
            inner_learning_rate=0.05,
            meta_batch_size=4,
            meta_optimizer=keras.optimizers.Adam(0.1),
        ),
        lambda m: warpkeras.MAMLTrainer(
            m,
            "mse",
            first_order=True,
            inner_steps=2,
            inner_learning_rate=0.05,
            meta_batch_size=4,
            meta_optimizer=keras.optimizers.Adam(0.1),
        ),
        lambda m: warpkeras.ReptileTrainer(
            m,
            "mse",
            inner_steps=5,
            inner_learning_rate=0.05,
            meta_batch_size=4,
            meta_optimizer=keras.optimizers.SGD(0.5),
        ),
    ],
    ids=["maml", "fomaml", "reptile"],
)
def test_maml_and_reptile_improve_post_adaptation_loss(make):
    held = [shared_solution_task(np.random.default_rng(3000 + i)) for i in range(4)]
    trainer = make(plain_model())
    before = trainer.evaluate(held, steps=2, verbose=0)["final_test_loss"]["mean"]
    trainer.fit(shared_solution_task, meta_steps=25, verbose=0)
    after = trainer.evaluate(held, steps=2, verbose=0)["final_test_loss"]["mean"]
    assert after < 0.3 * before, (before, after)


# --- one meta step against a hand-written reference ---------------------------------------


def _tiny_model():
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", name="t1"),
            warpkeras.warp(keras.layers.Dense(4, activation="tanh", name="w1")),
            keras.layers.Dense(2, name="head"),
        ]
    )


def _fixed_task():
    rng = np.random.default_rng(5)
    batch = (rng.normal(size=(6, 3)).astype("float32"), rng.normal(size=(6, 2)).astype("float32"))
    meta = (rng.normal(size=(6, 3)).astype("float32"), rng.normal(size=(6, 2)).astype("float32"))

    def forever(b):
        def make(rng):
            while True:
                yield b

        return make

    return warpkeras.Task(train=forever(batch), meta=forever(meta)), batch, meta


def mse(y, p):
    return tf.reduce_mean(tf.square(y - p))


@pytest.mark.parametrize(
    "make, reads_meta",
    [
        (lambda m: warpkeras.LeapTrainer(m, mse, inner_steps=2, meta_batch_size=2), False),
        (lambda m: warpkeras.ReptileTrainer(m, mse, inner_steps=2, meta_batch_size=2), False),
        (
            lambda m: warpkeras.WarpTrainer(
                m,
                mse,
                mode="offline",
                objective="approx",
                init_objective="leap",
                inner_steps=2,
                meta_batch_size=2,
            ),
            True,
        ),
    ],
    ids=["leap", "reptile", "warp_leap"],
)
def test_only_the_warp_objective_reads_the_meta_objective_batches(make, reads_meta):
    """A task's `meta` stream (WarpGrad's L_meta batches) feeds the warp objective only:
    Leap and Reptile never draw from it, so augmenting it (the Omniglot example's default
    protocol) leaves their results as they are."""
    _, batch, meta = _fixed_task()
    drawn = []

    def meta_stream(rng):
        while True:
            drawn.append(1)
            yield meta

    def train_stream(rng):
        while True:
            yield batch

    task = warpkeras.Task(train=train_stream, meta=meta_stream)
    make(_tiny_model()).fit([task], meta_steps=2, verbose=0)
    assert bool(drawn) == reads_meta, len(drawn)


def test_online_meta_step_equals_algorithm_1_by_hand():
    task, batch, meta = _fixed_task()
    model = _tiny_model()
    p = warpkeras.partition(model)
    theta0, phi0 = p.initial_task_values(), p.warp_values()
    alpha, beta, K = 0.3, 0.2, 3
    trainer = warpkeras.WarpTrainer(
        model,
        mse,
        mode="online",
        objective="exact",
        init_objective="leap",
        inner_steps=K,
        inner_learning_rate=alpha,
        meta_batch_size=1,
        meta_optimizer=keras.optimizers.SGD(beta),
    )
    trainer.fit([task], meta_steps=1, verbose=0)

    # Algorithm 1 by hand, with explicit tapes
    theta, g_phi, leap = (
        theta0,
        [tf.zeros_like(f) for f in phi0],
        [tf.zeros_like(t) for t in theta0],
    )
    path = []
    for _ in range(K):
        with tf.GradientTape() as outer:
            outer.watch(phi0)
            with tf.GradientTape() as inner:
                inner.watch(theta)
                y_pred, _ = p.call(theta, phi0, batch[0], training=True)
                loss = mse(batch[1], y_pred)
            grads = inner.gradient(loss, theta)
            stepped = [t - alpha * g for t, g in zip(theta, grads)]
            m_pred, _ = p.call(stepped, phi0, meta[0], training=True)
            meta_loss = mse(meta[1], m_pred)
        g_phi = [a + g for a, g in zip(g_phi, outer.gradient(meta_loss, phi0))]
        path.append((theta, loss, grads))
        theta = stepped
    final = mse(batch[1], p.call(theta, phi0, batch[0], training=True)[0])
    path.append((theta, final, None))
    for k in range(1, K + 1):
        inc = obj.leap_meta_gradient(
            path[k - 1][0], path[k][0], path[k - 1][1], path[k][1], path[k - 1][2], norm="length"
        )
        leap = [a + i for a, i in zip(leap, inc)]
    expected_phi = [f - beta * g / K for f, g in zip(phi0, g_phi)]
    expected_theta0 = [t - beta * g for t, g in zip(theta0, leap)]
    assert_lists_close(p.warp_values(), expected_phi, rtol=1e-5, atol=1e-6)
    assert_lists_close(p.initial_task_values(), expected_theta0, rtol=1e-5, atol=1e-6)


def test_offline_meta_step_equals_algorithm_2_by_hand():
    task, batch, meta = _fixed_task()
    model = _tiny_model()
    p = warpkeras.partition(model)
    theta0, phi0 = p.initial_task_values(), p.warp_values()
    alpha, beta, K = 0.3, 0.2, 2
    trainer = warpkeras.WarpTrainer(
        model,
        mse,
        mode="offline",
        objective="approx",
        init_objective=None,
        inner_steps=K,
        inner_learning_rate=alpha,
        meta_batch_size=1,
        meta_interval=K + 1,
        meta_optimizer=keras.optimizers.SGD(beta),
    )
    trainer.fit([task], meta_steps=1, verbose=0)
    # adaptation with φ fixed: the buffer holds θ_0, θ_1 and θ_2 = θ_K (lines 4 and 9)
    points, theta = [], theta0
    for _ in range(K):
        points.append(theta)
        _, g, _ = obj.task_gradient(p, mse, theta, phi0, batch)
        theta = [t - alpha * gi for t, gi in zip(theta, g)]
    points.append(theta)
    # one warp update on the mean approximate meta-gradient of the K + 1 points
    total = None
    for th in points:
        _, g, _ = obj.task_gradient(p, mse, th, phi0, batch)
        stepped = [t - alpha * gi for t, gi in zip(th, g)]
        with tf.GradientTape() as tape:
            tape.watch(phi0)
            m = mse(meta[1], p.call(stepped, phi0, meta[0], training=True)[0])
        gp = tape.gradient(m, phi0)
        total = gp if total is None else [a + b for a, b in zip(total, gp)]
    expected = [f - beta * g / (K + 1) for f, g in zip(phi0, total)]
    assert_lists_close(p.warp_values(), expected, rtol=1e-5, atol=1e-6)
    assert_lists_close(p.initial_task_values(), theta0)  # no init objective: θ0 unchanged


# --- resumable, faults, tracing, progress ---------------------------------------------------


def _warp_leap(model, **kw):
    return warpkeras.WarpTrainer(
        model,
        "mse",
        mode="offline",
        init_objective="leap",
        inner_steps=4,
        inner_learning_rate=0.1,
        meta_batch_size=2,
        meta_interval=2,
        inner_momentum=0.5,
        meta_optimizer=keras.optimizers.Adam(0.01),
        seed=3,
        **kw,
    )


def test_resume_equals_uninterrupted_run(tmp_path):
    keras.utils.set_random_seed(11)
    a = linear_warp_model()
    keras.utils.set_random_seed(11)
    b = linear_warp_model()
    uninterrupted = _warp_leap(a)
    uninterrupted.fit(ill_conditioned_task, meta_steps=4, verbose=0)
    ckpt = str(tmp_path / "ckpt")
    _warp_leap(b).fit(ill_conditioned_task, meta_steps=2, verbose=0, checkpoint_dir=ckpt)
    keras.utils.set_random_seed(99)  # as in a fresh process: other weights until restored
    c = linear_warp_model()
    resumed = _warp_leap(c)
    resumed.fit(ill_conditioned_task, meta_steps=4, verbose=0, checkpoint_dir=ckpt)
    assert int(resumed.step.numpy()) == 4
    assert_lists_close(c.get_weights(), a.get_weights(), rtol=1e-5, atol=1e-7)
    # the optimisers' slots (Adam moments, iteration counts) match as well
    for opt_a, opt_c in (
        (uninterrupted.meta_optimizer, resumed.meta_optimizer),
        (uninterrupted.init_optimizer, resumed.init_optimizer),
    ):
        assert_lists_close(
            [v.numpy() for v in opt_c.variables],
            [v.numpy() for v in opt_a.variables],
            rtol=1e-5,
            atol=1e-7,
        )


def test_nan_task_is_dropped_with_warning_and_parameters_stay_finite():
    rng = np.random.default_rng(0)
    bad = ill_conditioned_task(rng)
    bad.train = (bad.train[0], np.full_like(bad.train[1], np.nan))
    bad.name = "broken"
    good = ill_conditioned_task(rng)
    model = linear_warp_model()
    trainer = _warp_leap(model)
    with pytest.warns(RuntimeWarning, match="broken"):
        history = trainer.fit([bad, good], meta_steps=3, verbose=0)
    assert history.history["nan_tasks"][-1] >= 1
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_no_retracing_across_steps_and_tasks():
    model = linear_warp_model()
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        mode="online",
        init_objective="leap",
        inner_steps=5,
        meta_batch_size=3,
        inner_learning_rate=0.1,
    )
    trainer.fit(ill_conditioned_task, meta_steps=3, verbose=0)
    trainer.evaluate(HELD_OUT[:2], verbose=0)
    # meta-training (one task at a time) and evaluation each compiled their steps once
    assert trainer.trace_counts["group_step"] == 1
    assert trainer.trace_counts["group_leap_close"] == 1
    assert trainer.trace_counts["plain_step"] == 1
    assert trainer.trace_counts["evaluate_point"] == 1


def test_progress_output_follows_verbose(capsys):
    trainer = warpkeras.LeapTrainer(plain_model(), "mse", inner_steps=2, meta_batch_size=1)
    trainer.fit(shared_solution_task, meta_steps=2, verbose=0)
    assert capsys.readouterr().out == ""
    trainer.fit(shared_solution_task, meta_steps=4, verbose=1)
    out = capsys.readouterr().out
    assert "4/4" in out and "loss" in out


def test_history_callbacks_and_tensorboard(tmp_path):
    seen = []
    cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda s, logs: seen.append(s))
    trainer = warpkeras.LeapTrainer(plain_model(), "mse", inner_steps=2, meta_batch_size=1)
    history = trainer.fit(
        shared_solution_task, meta_steps=3, verbose=0, callbacks=[cb], log_dir=str(tmp_path / "tb")
    )
    assert seen == [0, 1, 2]
    assert len(history.history["loss"]) == 3
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb" / "train"))


def test_misconfiguration_fails_at_construction():
    with pytest.raises(warpkeras.MetaTrainingError, match="continual"):
        warpkeras.WarpTrainer(linear_warp_model(), "mse", mode="continual", init_objective="maml")
    with pytest.raises(warpkeras.MetaTrainingError, match="buffer"):
        warpkeras.WarpTrainer(
            linear_warp_model(), "mse", mode="offline", meta_interval=50, buffer_capacity=10
        )
    with pytest.raises(warpkeras.RoleError, match="no warp variables"):
        warpkeras.WarpTrainer(plain_model(), "mse")
    with pytest.raises(warpkeras.MetaTrainingError, match="approximate"):
        warpkeras.WarpTrainer(
            linear_warp_model(), "mse", objective="approx", learn_inner_learning_rate=True
        )


def test_learned_inner_learning_rate_moves():
    model = linear_warp_model()
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        mode="online",
        init_objective=None,
        inner_steps=5,
        inner_learning_rate=0.02,
        learn_inner_learning_rate=True,
        hyper_learning_rate=1.0,
        hyper_clip=0.01,
        meta_batch_size=2,
    )
    trainer.fit(ill_conditioned_task, meta_steps=3, verbose=0)
    lr = float(trainer.inner_lr.numpy())
    # too-small step: the meta-gradient says "larger"; each update is clipped to 0.01
    assert 0.02 < lr <= 0.02 + 3 * 0.01 + 1e-6


def test_multi_headed_finetuning_resets_head_for_evaluation():
    model = plain_model()
    trainer = warpkeras.FineTuneTrainer(
        model, "mse", head_layers=[model.get_layer("task")], inner_steps=3, meta_batch_size=2
    )
    head0 = [w.copy() for w in model.get_layer("task").get_weights()]
    trainer.fit(shared_solution_task, meta_steps=2, verbose=0)
    assert_lists_close(model.get_layer("task").get_weights(), head0)
    with pytest.raises(warpkeras.MetaTrainingError, match="head_layers"):
        warpkeras.FineTuneTrainer(plain_model(), "mse")


def test_trainer_exports_an_adaptive_savedmodel(tmp_path):
    model = linear_warp_model()
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        mode="online",
        init_objective="leap",
        inner_steps=2,
        meta_batch_size=2,
        inner_momentum=0.5,
    )
    trainer.fit(ill_conditioned_task, meta_steps=1, verbose=0)
    trainer.export(str(tmp_path / "sm"))
    served = tf.saved_model.load(str(tmp_path / "sm"))
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(
        served.signatures["serving_default"](x=tf.constant(x))["predictions"],
        model(x),
        rtol=1e-5,
        atol=1e-6,
    )
    # the adapt signature runs the trainer's inner rule (heavy-ball, α, μ) in the graph
    y = x @ np.ones((4, 1), "float32")
    adapted = served.signatures["adapt"](x=tf.constant(x), y=tf.constant(y), steps=tf.constant(2))
    p = trainer.partition
    theta, v = p.initial_task_values(), None
    for _ in range(2):
        step = obj.task_step(
            p,
            keras.losses.get("mse"),
            theta,
            p.warp_values(),
            (x, y),
            0.1,
            momentum=0.5,
            velocity=v,
        )
        theta, v = step.theta, step.velocity
    np.testing.assert_allclose(list(adapted.values())[0], theta[0], rtol=1e-5, atol=1e-6)
