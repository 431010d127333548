"""MAML's inner loop as one `tf.while_loop`: the same meta-gradient as the unrolled
steps (second and first order, heavy-ball momentum, Meta-SGD's learned rates, batch
norm, several support batches), second order against central finite differences, a
traced graph that does not grow with K, and ``recompute=True`` (each step's activations
recomputed in the backward pass) giving the same gradient."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras import objectives as obj
from warpkeras import rules


def _mse(y, p):
    return tf.reduce_mean(tf.square(y - p))


def _model(batch_norm=False, dtype="float32", seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((3,), dtype=dtype), keras.layers.Dense(5, activation="tanh", dtype=dtype)]
    if batch_norm:
        layers.append(warpkeras.layers.ExactBatchNormalization(dtype=dtype))
    return keras.Sequential(layers + [keras.layers.Dense(1, dtype=dtype)])


def _batches(dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=s).astype(dtype)) for s in [(6, 3), (6, 1), (5, 3), (5, 1)]]


VARIANTS = {
    "unrolled": dict(unroll=True),
    "symbolic": dict(unroll=False),
    "recompute": dict(recompute=True),
}


def _meta_gradients(
    partition, rule, first_order, steps=4, support=None, dtype="float32", loss=_mse
):
    """{variant: [query loss, ∇θ0..., ∇(rule variables)...]} for every variant, traced
    once per variant in a `tf.function` as the trainers run it."""
    sx, sy, qx, qy = _batches(dtype)
    support = support or (sx, sy)
    out = {}
    for name, kwargs in VARIANTS.items():

        @tf.function
        def meta_gradient(qx, qy, kwargs=kwargs, loss_fn=loss):
            theta0 = partition.initial_task_values()
            with tf.GradientTape() as tape:
                tape.watch(theta0)
                loss, _ = obj.maml_objective(
                    partition,
                    loss_fn,
                    theta0,
                    partition.warp_values(),
                    support,
                    (qx, qy),
                    0.1,
                    steps,
                    first_order=first_order,
                    rule=rule,
                    **kwargs,
                )
            sources = theta0 + [v.value for v in rule.variables]
            return [loss] + tape.gradient(
                loss, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )

        out[name] = [t.numpy() for t in meta_gradient(qx, qy)]
    return out


def _rule(kind, partition):
    if kind == "sgd":
        return rules.SGD(0.1)
    if kind == "momentum":
        return rules.SGD(0.1, momentum=0.9)
    rule = rules.MetaSGD(keras.initializers.RandomUniform(0.02, 0.1, seed=1))
    rule.build(partition)
    return rule


@pytest.mark.parametrize("batch_norm", [False, True], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize("kind", ["sgd", "momentum", "metasgd"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_symbolic_loop_and_recompute_equal_unrolled(batch_norm, kind, first_order):
    partition = warpkeras.partition(_model(batch_norm))
    rule = _rule(kind, partition)
    got = _meta_gradients(partition, rule, first_order)
    expected = got.pop("unrolled")
    assert all(np.any(g != 0) for g in expected[1:])  # every gradient is there to compare
    for name, values in got.items():
        for a, b in zip(values, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_several_support_batches_cycle_in_the_loop():
    partition = warpkeras.partition(_model())
    sx, sy, _, _ = _batches(seed=1)
    support = [(sx, sy), (sx[:4] * 2.0, sy[:4] - 1.0), (sx[2:], sy[2:] + 0.5)]
    got = _meta_gradients(partition, rules.SGD(0.1, momentum=0.5), False, steps=5, support=support)
    expected = got.pop("unrolled")
    # the batches differ: a loop on the first batch alone gives another gradient
    alone = _meta_gradients(
        partition, rules.SGD(0.1, momentum=0.5), False, steps=5, support=[support[0]]
    )["unrolled"]
    assert not np.allclose(alone[1], expected[1])
    for name, values in got.items():
        for a, b in zip(values, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture
def floatx64():
    """Keras's floatx float64: the loss is computed, as Keras computes it, in floatx."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(previous)


@pytest.mark.parametrize("variant", ["symbolic", "recompute"])
def test_second_order_matches_central_finite_differences_float64(variant, floatx64):
    partition = warpkeras.partition(_model(dtype="float64"))
    sx, sy, qx, qy = _batches("float64", seed=2)
    theta0 = [tf.cast(t, tf.float64) for t in partition.initial_task_values()]
    rule = rules.SGD(0.3, momentum=0.5)
    kwargs = VARIANTS[variant]

    @tf.function
    def loss_and_grad(theta):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss, _ = obj.maml_objective(
                partition, _mse, theta, [], (sx, sy), (qx, qy), 0.3, 3, rule=rule, **kwargs
            )
        return loss, tape.gradient(loss, theta)

    _, grads = loss_and_grad(theta0)
    eps = 1e-6
    for i, t in enumerate(theta0):
        flat = t.numpy().ravel()
        numeric = np.zeros_like(flat)
        for j in range(flat.size):
            values = []
            for sign in (1, -1):
                moved = flat.copy()
                moved[j] += sign * eps
                theta = list(theta0)
                theta[i] = tf.constant(moved.reshape(t.shape))
                values.append(float(loss_and_grad(theta)[0]))
            numeric[j] = (values[0] - values[1]) / (2 * eps)
        np.testing.assert_allclose(grads[i].numpy().ravel(), numeric, rtol=1e-6, atol=1e-8)


def _op_count(concrete):
    """Nodes of a concrete function's graph and of every function it calls (loop bodies,
    gradients)."""
    graph_def = concrete.graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def _traced_meta_gradient(steps, **kwargs):
    partition = warpkeras.partition(_model())
    sx, sy, qx, qy = _batches()

    @tf.function
    def meta_gradient(sx, sy, qx, qy):
        return obj.maml_meta_gradient(
            partition,
            _mse,
            partition.initial_task_values(),
            [],
            (sx, sy),
            (qx, qy),
            0.1,
            steps,
            rule=rules.SGD(0.1, momentum=0.9),
            **kwargs,
        )[1]

    return meta_gradient.get_concrete_function(sx, sy, qx, qy)


@pytest.mark.parametrize("variant", ["symbolic", "recompute", "unrolled"])
def test_traced_graph_does_not_grow_with_k(variant):
    small, large = (_op_count(_traced_meta_gradient(k, **VARIANTS[variant])) for k in (2, 20))
    if variant == "unrolled":
        assert large > 5 * small  # the Python loop writes every step into the graph
    else:
        assert large == small


def test_default_unrolls_a_few_steps_and_loops_beyond():
    limit = obj.MAML_UNROLL_MAX_STEPS
    for k in (2, limit, limit + 1, 20):
        default = _op_count(_traced_meta_gradient(k))
        expected = _op_count(_traced_meta_gradient(k, unroll=k <= limit))
        assert default == expected, k


def test_steps_as_a_tensor():
    partition = warpkeras.partition(_model())
    sx, sy, qx, qy = _batches()
    theta0 = partition.initial_task_values()
    loss, theta_k = obj.maml_objective(
        partition, _mse, theta0, [], (sx, sy), (qx, qy), 0.1, tf.constant(3), unroll=None
    )
    expected, expected_k = obj.maml_objective(
        partition, _mse, theta0, [], (sx, sy), (qx, qy), 0.1, 3, unroll=True
    )
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-6)
    for a, b in zip(theta_k, expected_k):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="unroll=True needs a Python int"):
        obj.maml_objective(
            partition, _mse, theta0, [], (sx, sy), (qx, qy), 0.1, tf.constant(3), unroll=True
        )
    with pytest.raises(ValueError, match="recompute=True"):
        obj.maml_objective(
            partition, _mse, theta0, [], (sx, sy), (qx, qy), 0.1, 3, unroll=True, recompute=True
        )


def _tasks():
    rng = np.random.default_rng(0)
    tasks = []
    for i in range(4):
        w = rng.normal(size=(3, 1))
        x = rng.normal(size=(24, 3)).astype("float32")
        tasks.append(
            warpkeras.Task(train=(x, (x @ w).astype("float32")), batch_size=8, name=f"t{i}")
        )
    return tasks


@pytest.mark.parametrize("parallel", ["sequential", "unrolled", "vectorized"])
def test_trainer_variants_train_alike_under_each_executor(parallel):
    """MAMLTrainer's loop (default), ``unroll=True`` and ``recompute=True`` make the same
    meta-updates, with batch norm and momentum, under each executor."""
    weights = {}
    for name, kwargs in VARIANTS.items():
        trainer = warpkeras.MAMLTrainer(
            _model(batch_norm=True),
            "mse",
            inner_steps=3,
            meta_batch_size=2,
            inner_learning_rate=0.05,
            inner_momentum=0.5,
            seed=3,
            parallel=parallel,
            meta_optimizer=keras.optimizers.SGD(0.1),
            **kwargs,
        )
        assert trainer.get_config()["objectives"][0]["unroll"] == kwargs.get("unroll")
        trainer.fit(_tasks(), epochs=2, verbose=0)
        weights[name] = trainer.model.get_weights()
    start = _model(batch_norm=True).get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(start, weights["unrolled"]))
    for name in ("symbolic", "recompute"):
        for a, b in zip(weights[name], weights["unrolled"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="unroll=True"):
        warpkeras.meta.MAML(unroll=True, recompute=True)
    with pytest.raises(TypeError, match="recompute"):
        warpkeras.meta.MAML(recompute="yes")
    with pytest.raises(TypeError, match="unroll"):
        warpkeras.MAMLTrainer(_model(), "mse", unroll=1)
    with pytest.raises(warpkeras.meta.MetaTrainingError, match="maml_recompute"):
        warpkeras.trainers.MetaTrainer(_model(), "mse", init_objective="leap", maml_recompute=True)
    with pytest.raises(warpkeras.meta.MetaTrainingError, match="maml_unroll"):
        warpkeras.MAMLTrainer(_model(), "mse", unroll=True, recompute=True)


def test_a_new_inner_steps_is_used_after_a_fit():
    """K is read when MAML's steps are traced: setting ``trainer.inner_steps`` between two
    fits traces the steps for the new K (the first trace's K would be silently kept)."""
    traces = []
    for second_k in (2, 4):
        trainer = warpkeras.MAMLTrainer(
            _model(),
            "mse",
            inner_steps=2,
            meta_batch_size=2,
            inner_learning_rate=0.05,
            seed=3,
            parallel="sequential",
            meta_optimizer=keras.optimizers.SGD(0.1),
        )
        trainer.fit(_tasks(), epochs=1, verbose=0)
        trainer.inner_steps = second_k
        trainer.fit(_tasks(), epochs=2, verbose=0)  # one more epoch
        traces.append(trainer.trace_counts["group_maml"])
    assert traces == [1, 2]


def test_warp_maml_variants_train_alike():
    """Warp-MAML (MAML's close after the warp objective's adaptation, φ in the loop):
    the loop, the unrolled steps and recomputation make the same meta-updates."""

    def warp_model():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(5, activation="tanh"),
                warpkeras.layers.WarpDense(),
                keras.layers.Dense(1),
            ]
        )

    weights = {}
    for name, kwargs in VARIANTS.items():
        trainer = warpkeras.WarpTrainer(
            warp_model(),
            "mse",
            mode="online",
            init_objective="maml",
            inner_steps=3,
            meta_batch_size=2,
            inner_learning_rate=0.05,
            seed=3,
            parallel="sequential",
            meta_optimizer=keras.optimizers.SGD(0.1),
            **{f"maml_{k}": v for k, v in kwargs.items()},
        )
        trainer.fit(_tasks(), epochs=2, verbose=0)
        weights[name] = trainer.model.get_weights()
    for name in ("symbolic", "recompute"):
        for a, b in zip(weights[name], weights["unrolled"]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_resuming_with_other_loop_settings_is_a_changed_setting():
    """``unroll`` and ``recompute`` change how MAML computes its steps, not the run: a
    checkpoint written without them (or with other values) resumes, the new values
    winning."""
    from warpkeras.trainers.checkpoints import compare_settings

    def settings(**kwargs):
        trainer = warpkeras.MAMLTrainer(_model(), "mse", inner_steps=3, seed=3, **kwargs)
        return {"config": trainer.get_config()}

    old = settings()
    for objective in old["config"]["objectives"]:
        objective.pop("unroll"), objective.pop("recompute")
    refused, identity, changed = compare_settings(old, settings(recompute=True))
    assert not refused and not identity
    assert any("recompute" in c for c in changed)
    refused, identity, _ = compare_settings(settings(unroll=True), settings(unroll=False))
    assert not refused and not identity


def test_weighted_support_batches_in_the_loop():
    """``(x, y, sample_weight)`` support batches (the loss as `model.fit` weighs it) run
    through the loop and its recomputation as through the unrolled steps."""
    partition = warpkeras.partition(_model())
    sx, sy, _, _ = _batches(seed=3)
    weights = tf.constant(np.linspace(0.0, 2.0, 6).astype("float32"))
    got = _meta_gradients(
        partition, rules.SGD(0.1), False, steps=3, support=(sx, sy, weights), loss="mse"
    )
    expected = got.pop("unrolled")
    unweighted = _meta_gradients(
        partition, rules.SGD(0.1), False, steps=3, support=(sx, sy), loss="mse"
    )["unrolled"]
    assert not np.allclose(unweighted[1], expected[1])
    for name, values in got.items():
        for a, b in zip(values, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
