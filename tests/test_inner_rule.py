"""The inner update rule as a value (`warpkeras.rules`): each built-in rule against a
hand-stepped value; the one step in every path (meta-training, `adapt`, the exported
SavedModel, `warpkeras.adapt`); constraints after every inner step."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras  # noqa: F401  (first: it picks TensorFlow's CPU kernels)
from warpkeras import objectives, rules
from warpkeras.meta import MAML, MetaTrainingError

RNG = np.random.default_rng(7)
X = RNG.normal(size=(12, 3)).astype("float32")
Y = RNG.normal(size=(12, 2)).astype("float32")
XQ = RNG.normal(size=(12, 3)).astype("float32")
YQ = RNG.normal(size=(12, 2)).astype("float32")


def make_model(constraint=None, seed=0):
    """x (3) → warp Dense(4, tanh) (φ) → Dense(2) (θ, optionally constrained)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((3,)),
            warpkeras.warp(keras.layers.Dense(4, activation="tanh", name="warp")),
            keras.layers.Dense(2, name="head", kernel_constraint=constraint),
        ]
    )


def task():
    """One full batch of support data, one of query data."""
    return warpkeras.Task(train=(X, Y), meta=(XQ, YQ), test=(XQ, YQ), batch_size=12)


def mse(model, values, x, y):
    """Keras's mean squared error of `model` at trainable `values` (stateless)."""
    out, _ = model.stateless_call(
        values, [v.value for v in model.non_trainable_variables], x, training=True
    )
    return tf.reduce_mean(keras.losses.mean_squared_error(y, out))


def hand_steps(model, theta, steps, update, state=None):
    """`steps` full-batch steps on (X, Y) of ``update(theta, grads, state)``, the
    gradients from Keras's own loss on the model's stateless call."""
    phi = [v.value for v in model.trainable_variables[:2]]
    for _ in range(steps):
        theta = [tf.convert_to_tensor(t) for t in theta]
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = mse(model, phi + theta, X, Y)
        theta, state = update(theta, tape.gradient(loss, theta), state)
    return [np.asarray(t) for t in theta]


def served(trainer, tmp_path, steps):
    """The exported SavedModel's adapted task values (loaded with TensorFlow alone)."""
    path = trainer.export(os.path.join(str(tmp_path), "served"))
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["adapt"](x=tf.constant(X), y=tf.constant(Y), steps=tf.constant(steps))
    names = warpkeras.task_parameter_names(trainer.model)
    return [out[n].numpy() for n in names], loaded


def close(a, b, rtol=1e-5, atol=1e-6):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------
# the rules against hand-stepped values
def test_sgd_rule_heavy_ball_by_hand():
    rule = rules.SGD(0.1, momentum=0.9)
    theta = [tf.constant([1.0, -2.0])]
    state = rule.init(theta)
    g1, g2 = tf.constant([0.5, 0.5]), tf.constant([1.0, -1.0])
    theta, state = rule.update([g1], state, theta)
    theta, state = rule.update([g2], state, theta)
    v1 = np.array([0.5, 0.5])
    v2 = 0.9 * v1 + np.array([1.0, -1.0])
    np.testing.assert_allclose(
        theta[0].numpy(), np.array([1.0, -2.0]) - 0.1 * v1 - 0.1 * v2, rtol=1e-6
    )
    np.testing.assert_allclose(state[0].numpy(), v2, rtol=1e-6)
    assert rules.SGD(0.1).init(theta) == ()


def test_sgd_rule_is_objectives_sgd_update_bit_for_bit():
    theta = [tf.constant(RNG.normal(size=(3, 2)), tf.float32)]
    grads = [tf.constant(RNG.normal(size=(3, 2)), tf.float32)]
    velocity = [tf.constant(RNG.normal(size=(3, 2)), tf.float32)]
    a, va = objectives.sgd_update(theta, grads, 0.3, 0.9, velocity)
    b, vb = rules.SGD(0.3, 0.9).update(grads, velocity, theta)
    assert np.array_equal(a[0].numpy(), b[0].numpy())
    assert np.array_equal(va[0].numpy(), vb[0].numpy())


def test_meta_sgd_rule_by_hand():
    model = make_model()
    rule = rules.MetaSGD(keras.initializers.RandomUniform(0.01, 0.1, seed=3))
    rule.build(warpkeras.partition(model))
    alpha = [a.numpy() for a in rule.alpha]
    assert [a.shape for a in alpha] == [(4, 2), (2,)]
    theta = [v.value for v in model.trainable_variables[2:]]
    grads = [tf.ones_like(t) for t in theta]
    new, state = rule.update(grads, rule.init(theta), theta)
    close(new, [t.numpy() - a for t, a in zip(theta, alpha)], rtol=1e-7, atol=0)
    assert state == ()


def test_kfac_rule_step_is_the_plan_step():
    model = make_model()
    p = warpkeras.partition(model)
    kfac = warpkeras.KFAC(learning_rate=0.5, fisher="exact", damping=1e-2)
    kfac.build(p, "mse")
    theta = [tf.convert_to_tensor(v.value) for v in p.task_variables]
    phi = [v.value for v in p.warp_variables]
    state = kfac.init(theta)

    def loss_fn(values, batch):
        loss, new_state, out = objectives.task_loss(
            p, keras.losses.get("mse"), values, phi, batch, None, True, return_outputs=True
        )
        return loss, (new_state, out)

    for _ in range(2):
        ref = kfac.plan.step(theta, phi, (X, Y), state, training=True)
        _, _, _, theta, state = rules.inner_step(kfac, loss_fn, theta, state, (X, Y))
        close(theta, ref.theta, rtol=1e-6, atol=1e-7)
    assert int(state["step"]) == 2 and len(state["A"]) == 1


def test_inner_step_applies_constraints_after_the_update():
    constraint = keras.constraints.NonNeg()
    theta = [tf.constant([0.5, 0.1, -0.2])]
    grads = [tf.constant([1.0, -1.0, 1.0])]

    def loss_fn(values, batch):
        return tf.reduce_sum(values[0] * grads[0]), None

    _, _, _, new, _ = rules.inner_step(
        rules.SGD(0.3), loss_fn, theta, (), None, constraints=[constraint]
    )
    np.testing.assert_allclose(new[0].numpy(), [0.2, 0.4, 0.0], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# trainer: adapt = served adapt = hand-stepped rule; meta-training used the same rule
def test_momentum_adapt_equals_served_and_hand(tmp_path):
    model = make_model()
    trainer = warpkeras.MetaTrainer(
        model,
        "mse",
        objectives=[MAML(first_order=True)],
        inner_learning_rate=0.2,
        inner_momentum=0.9,
        inner_steps=3,
        meta_batch_size=1,
    )
    theta0 = [v.numpy() for v in trainer.partition.task_variables]

    def heavy_ball(theta, grads, v):
        v = [0.9 * a + g for a, g in zip(v, grads)] if v else list(grads)
        return [t - 0.2 * a for t, a in zip(theta, v)], v

    want = hand_steps(model, theta0, 3, heavy_ball)
    got, _ = trainer.adapt(task(), steps=3)
    close(got, want)
    close(served(trainer, tmp_path, 3)[0], want)


def test_maml_unrolled_steps_honour_momentum():
    def run(momentum):
        model = make_model()
        trainer = warpkeras.MAMLTrainer(
            model,
            "mse",
            inner_learning_rate=0.2,
            inner_momentum=momentum,
            inner_steps=2,
            meta_batch_size=1,
            meta_optimizer=keras.optimizers.SGD(0.5),
        )
        theta0 = [tf.convert_to_tensor(v.numpy()) for v in trainer.partition.task_variables]
        phi = [v.value for v in model.trainable_variables[:2]]
        trainer.fit([task()], epochs=1, verbose=0)
        with tf.GradientTape() as tape:
            tape.watch(theta0)
            theta, v = theta0, None
            for _ in range(2):
                with tf.GradientTape() as inner:
                    inner.watch(theta)
                    loss = mse(model, phi + theta, X, Y)
                g = inner.gradient(loss, theta)
                if momentum is None:
                    v = g
                else:
                    v = [momentum * a + b for a, b in zip(v, g)] if v else g
                theta = [t - 0.2 * a for t, a in zip(theta, v)]
            query = mse(model, phi + theta, XQ, YQ)
        grads = tape.gradient(query, theta0)
        want = [t.numpy() - 0.5 * g.numpy() for t, g in zip(theta0, grads)]
        return [v.numpy() for v in trainer.partition.task_variables], want

    got, want = run(0.9)
    close(got, want)
    plain, _ = run(None)
    assert not np.allclose(plain[0], got[0], rtol=1e-4)  # the momentum makes a difference


def test_meta_sgd_meta_training_adapt_and_served(tmp_path):
    model = make_model()
    rule = rules.MetaSGD(keras.initializers.RandomUniform(0.02, 0.1, seed=1))
    trainer = warpkeras.MetaTrainer(
        model,
        "mse",
        objectives=[MAML(optimizer=keras.optimizers.SGD(0.5))],
        inner_rule=rule,
        inner_steps=2,
        meta_batch_size=1,
    )
    assert trainer.inner_rule is rule
    alpha0 = [tf.convert_to_tensor(a.numpy()) for a in rule.alpha]
    theta0 = [tf.convert_to_tensor(v.numpy()) for v in trainer.partition.task_variables]
    phi = [v.value for v in model.trainable_variables[:2]]
    trainer.fit([task()], epochs=1, verbose=0)
    # meta-training: θ0 and α by one SGD step on the query loss through 2 Meta-SGD steps
    with tf.GradientTape() as tape:
        tape.watch(theta0 + alpha0)
        theta = theta0
        for _ in range(2):
            with tf.GradientTape() as inner:
                inner.watch(theta)
                loss = mse(model, phi + theta, X, Y)
            theta = [t - a * g for t, a, g in zip(theta, alpha0, inner.gradient(loss, theta))]
        query = mse(model, phi + theta, XQ, YQ)
    grads = tape.gradient(query, theta0 + alpha0)
    want = [v.numpy() - 0.5 * g.numpy() for v, g in zip(theta0 + alpha0, grads)]
    close(
        [v.numpy() for v in trainer.partition.task_variables] + [a.numpy() for a in rule.alpha],
        want,
    )
    # adapt = served = hand with the learned α
    alpha = [a.numpy() for a in rule.alpha]
    theta1 = [v.numpy() for v in trainer.partition.task_variables]
    hand = hand_steps(
        model, theta1, 3, lambda t, g, s: ([a - al * b for a, al, b in zip(t, alpha, g)], s)
    )
    close(trainer.adapt(task(), steps=3)[0], hand)
    values, loaded = served(trainer, tmp_path, 3)
    close(values, hand)
    assert '"MetaSGD"' in loaded.metadata()["inner_rule"].numpy().decode()
    in_process = warpkeras.export.adapt_task_values(
        model, X, Y, 3, loss="mse", rule=rule, training=True
    )
    close([in_process[n] for n in warpkeras.task_parameter_names(model)], hand)


def test_kfac_rule_adapt_equals_served_and_plan(tmp_path):
    model = make_model()
    kfac = warpkeras.KFAC(learning_rate=0.3, fisher="exact", damping=1e-2)
    trainer = warpkeras.MetaTrainer(
        model,
        "mse",
        objectives=[MAML(first_order=True)],
        inner_rule=kfac,
        inner_steps=2,
        meta_batch_size=1,
    )
    trainer.fit([task()], epochs=1, verbose=0)
    plan = warpkeras.KFAC(learning_rate=0.3, fisher="exact", damping=1e-2).bind(
        trainer.partition, "mse"
    )
    theta = [v.value for v in trainer.partition.task_variables]
    phi = [v.value for v in trainer.partition.warp_variables]
    opt = plan.init(theta, seed=0)
    for _ in range(3):
        step = plan.step(theta, phi, (X, Y), opt, training=True)
        theta, opt = step.theta, step.opt_state
    got, _ = trainer.adapt(task(), steps=3)
    close(got, theta, rtol=1e-4, atol=1e-6)
    close(served(trainer, tmp_path, 3)[0], got, rtol=1e-4, atol=1e-6)
    # and the same rule given to one evaluation of another trainer
    other = warpkeras.NoMetaTrainer(model, "mse", inner_steps=3)
    close(other.adapt(task(), steps=3, inner_optimizer=kfac)[0], got, rtol=1e-4, atol=1e-6)


_LOAD_WITHOUT_WARPKERAS = """
import json, sys
import numpy as np, tensorflow as tf
x = np.asarray(json.loads(sys.argv[2]), "float32")
y = np.asarray(json.loads(sys.argv[3]), "float32")
out = tf.saved_model.load(sys.argv[1]).signatures["adapt"](x=x, y=y, steps=tf.constant(3))
assert "warpkeras" not in sys.modules
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


def test_served_rules_adapt_in_a_process_without_warpkeras(tmp_path):
    """Meta-SGD's α and K-FAC's factored step are in the SavedModel's graph."""
    for name, rule in (
        ("meta_sgd", rules.MetaSGD(keras.initializers.RandomUniform(0.02, 0.1, seed=5))),
        ("kfac", warpkeras.KFAC(learning_rate=0.3, fisher="exact", damping=1e-2)),
    ):
        model = make_model()
        trainer = warpkeras.MetaTrainer(
            model,
            "mse",
            objectives=[MAML(first_order=True)],
            inner_rule=rule,
            inner_steps=3,
            meta_batch_size=1,
        )
        path = trainer.export(os.path.join(str(tmp_path), name), dtype_tolerant=False)
        env = dict(os.environ, PYTHONPATH="")
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _LOAD_WITHOUT_WARPKERAS,
                path,
                json.dumps(X.tolist()),
                json.dumps(Y.tolist()),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        names = warpkeras.task_parameter_names(model)
        close(
            [np.asarray(out[n]) for n in names],
            trainer.adapt(task(), steps=3)[0],
            rtol=1e-4,
            atol=1e-6,
        )


def test_rules_refused_where_they_cannot_work(tmp_path):
    with pytest.raises(MetaTrainingError, match="not differentiable"):
        warpkeras.MAMLTrainer(make_model(), "mse", inner_rule=warpkeras.KFAC())
    with pytest.raises(MetaTrainingError, match="inner_momentum"):
        warpkeras.MAMLTrainer(make_model(), "mse", inner_rule=rules.MetaSGD(), inner_momentum=0.9)
    with pytest.raises(TypeError, match="inner_rule"):
        warpkeras.MAMLTrainer(make_model(), "mse", inner_rule="sgd")
    with pytest.raises(MetaTrainingError, match="not differentiable"):
        warpkeras.MetaTrainer(
            make_model(),
            "mse",
            inner_rule=warpkeras.KFAC(),
            objectives=[warpkeras.meta.WarpObjective("online", exact=True)],
        )
    warpkeras.MetaTrainer(
        make_model(),
        "mse",
        inner_rule=warpkeras.KFAC(),
        objectives=[warpkeras.meta.WarpObjective("online", exact=False)],
    )
    with pytest.raises(MetaTrainingError, match="learn_inner_learning_rate"):
        warpkeras.MetaTrainer(
            make_model(),
            "mse",
            inner_rule=rules.MetaSGD(),
            objectives=[warpkeras.meta.WarpObjective("online", learn_learning_rate=True)],
        )
    with pytest.raises(TypeError, match="learning_rate='0.1'"):
        rules.SGD("0.1")
    with pytest.raises(ValueError, match="momentum=1.5"):
        rules.SGD(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="not built"):
        rules.MetaSGD().update([tf.ones([2])], (), [tf.ones([2])])

    class HookSGD(MAML):
        def inner_update(self, engine, theta, grads, velocity):
            return [t - 0.1 * g for t, g in zip(theta, grads)], velocity

    trainer = warpkeras.MetaTrainer(make_model(), "mse", objectives=[HookSGD()], inner_steps=1)
    with pytest.raises(ValueError, match="inner_update"):
        trainer.export(os.path.join(str(tmp_path), "hook"))


# ------------------------------------------------------------------------------------------
# constraints after every inner step, in every path
def _negative_pull_task():
    """A task whose gradient steps drive the head's kernel below zero."""
    return warpkeras.Task(
        train=(X, -10.0 - np.abs(Y)), meta=(XQ, -10.0 - np.abs(YQ)), test=(XQ, YQ), batch_size=12
    )


def test_constraints_hold_in_adapt_evaluate_served_and_warpkeras_adapt(tmp_path):
    model = make_model(keras.constraints.NonNeg())
    trainer = warpkeras.MetaTrainer(
        model,
        "mse",
        objectives=[MAML(first_order=True)],
        inner_learning_rate=0.5,
        inner_momentum=0.5,
        inner_steps=3,
        meta_batch_size=1,
    )
    t = _negative_pull_task()
    theta, _ = trainer.adapt(t, steps=3)
    kernel = theta[0]
    assert float(np.min(kernel)) >= 0.0
    # the unconstrained rule would have gone negative: the test can fail
    free = make_model()
    free_trainer = warpkeras.MetaTrainer(
        free,
        "mse",
        objectives=[MAML(first_order=True)],
        inner_learning_rate=0.5,
        inner_momentum=0.5,
        inner_steps=3,
        meta_batch_size=1,
    )
    assert float(np.min(free_trainer.adapt(t, steps=3)[0][0])) < 0.0
    # served adapt and warpkeras.adapt: the same constrained values
    path = trainer.export(os.path.join(str(tmp_path), "nonneg"))
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["adapt"](
        x=tf.constant(X), y=tf.constant(t.train[1]), steps=tf.constant(3)
    )
    names = warpkeras.task_parameter_names(model)
    close([out[n].numpy() for n in names], theta)
    adapted = warpkeras.adapt(
        model, X, t.train[1], 3, loss="mse", learning_rate=0.5, momentum=0.5, training=True
    )
    assert float(np.min(adapted.get_layer("head").kernel.numpy())) >= 0.0
    close([adapted.get_layer("head").kernel.numpy()], [kernel])
    # evaluate and fine-tuning step with the same plain step
    report = trainer.evaluate([t], steps=3, verbose=0)
    assert np.isfinite(report["final_test_loss"]["mean"])


def test_constraints_hold_in_meta_training_paths():
    t = _negative_pull_task()
    for make in (
        lambda m: warpkeras.WarpTrainer(
            m,
            "mse",
            mode="continual",
            init_objective=None,
            inner_learning_rate=0.5,
            inner_steps=3,
            meta_batch_size=2,
        ),
        lambda m: warpkeras.FineTuneTrainer(
            m, "mse", multi_headed=False, inner_learning_rate=0.5, inner_steps=3, meta_batch_size=1
        ),
    ):
        model = make_model(keras.constraints.NonNeg())
        trainer = make(model)
        trainer.fit([t], epochs=1, verbose=0)
        assert float(np.min(model.get_layer("head").kernel.numpy())) >= 0.0
    # MAML's unrolled steps: θ_K of maml_objective is constrained
    model = make_model(keras.constraints.NonNeg())
    p = warpkeras.partition(model)
    theta0 = [v.value for v in p.task_variables]
    phi = [v.value for v in p.warp_variables]
    _, theta_k = objectives.maml_objective(
        p, keras.losses.get("mse"), theta0, phi, (X, t.train[1]), (XQ, t.meta[1]), 0.5, 3
    )
    assert float(np.min(theta_k[0].numpy())) >= 0.0


def test_warpgrad_optimizer_keeps_constraints():
    model = make_model(keras.constraints.NonNeg())
    model.compile(optimizer=warpkeras.WarpGrad(learning_rate=0.5, model=model), loss="mse")
    model.fit(X, _negative_pull_task().train[1], batch_size=12, epochs=3, verbose=0)
    assert float(np.min(model.get_layer("head").kernel.numpy())) >= 0.0


def test_rule_variables_are_checkpointed(tmp_path):
    """Meta-SGD's α are saved and restored with the trainer, learned or not (Leap does
    not learn them)."""

    def make(seed):
        rule = rules.MetaSGD(keras.initializers.RandomUniform(0.01, 0.1, seed=seed))
        return rule, warpkeras.LeapTrainer(
            make_model(), "mse", inner_rule=rule, inner_steps=2, meta_batch_size=1
        )

    rule, trainer = make(1)
    trainer.fit([task()], epochs=1, verbose=0, checkpoint_dir=str(tmp_path / "ckpt"))
    other_rule, other = make(2)
    assert not np.allclose(other_rule.alpha[0].numpy(), rule.alpha[0].numpy())
    assert other.restore(str(tmp_path / "ckpt")) == 1
    close([a.numpy() for a in other_rule.alpha], [a.numpy() for a in rule.alpha], rtol=0, atol=0)
    assert trainer.get_config()["inner_rule"]["class"] == "MetaSGD"


def test_meta_sgd_keeps_float64(float64, tmp_path):
    model = make_model()
    rule = rules.MetaSGD(0.05)
    trainer = warpkeras.MetaTrainer(
        model,
        "mse",
        objectives=[MAML(first_order=True)],
        inner_rule=rule,
        inner_steps=2,
        meta_batch_size=1,
    )
    assert all(a.dtype == "float64" for a in rule.alpha)
    theta0 = [v.numpy() for v in trainer.partition.task_variables]
    x64, y64 = X.astype("float64"), Y.astype("float64")
    t = warpkeras.Task(train=(x64, y64), batch_size=12)
    got, _ = trainer.adapt(t, steps=2)
    assert all(np.asarray(g).dtype == np.float64 for g in got)
    phi = [v.value for v in model.trainable_variables[:2]]
    theta = [tf.constant(v) for v in theta0]
    for _ in range(2):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = mse(model, phi + theta, x64, y64)
        theta = [a - 0.05 * g for a, g in zip(theta, tape.gradient(loss, theta))]
    close(got, theta, rtol=1e-12, atol=1e-14)
