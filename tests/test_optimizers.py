"""Tests of `warpkeras.optimizers.WarpGrad` (WarpGrad Algorithm 3 inside `model.fit`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras.optimizers import WarpGrad

N_STEPS, BATCH, ETA = 7, 8, 3
INNER_LR, META_LR = 0.1, 0.05


def _data(n=N_STEPS * BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = np.sin(x @ np.array([[1.0], [-2.0], [0.5]])) + 0.1 * rng.normal(size=(n, 1))
    return x, y.astype("float32")


def _sequential():
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh", name="t1"),
            warpkeras.warp(keras.layers.Dense(5, activation="tanh", name="w1")),
            keras.layers.Dense(1, name="t2"),
        ],
        name="seq_model",
    )


def _functional():
    inp = keras.Input((3,))
    h = keras.layers.Dense(5, activation="tanh", name="t1")(inp)
    h = warpkeras.warp(keras.layers.Dense(5, activation="tanh", name="w1"))(h)
    return keras.Model(inp, keras.layers.Dense(1, name="t2")(h), name="func_model")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub_model")
        self.t1 = keras.layers.Dense(5, activation="tanh")
        self.w1 = warpkeras.warp(keras.layers.Dense(5, activation="tanh"))
        self.t2 = keras.layers.Dense(1)

    def call(self, x):
        return self.t2(self.w1(self.t1(x)))


def _subclassed():
    model = _Subclassed()
    model(np.zeros((1, 3), "float32"))
    return model


BUILDERS = {"sequential": _sequential, "functional": _functional, "subclassed": _subclassed}


def _compile(model, inner=None, meta=None, eta=ETA, **kwargs):
    opt = WarpGrad(
        inner_optimizer=inner or keras.optimizers.SGD(INNER_LR),
        meta_optimizer=meta or keras.optimizers.SGD(META_LR),
        meta_interval=eta,
        model=model,
    )
    model.compile(optimizer=opt, loss="mse", **kwargs)
    return opt


class _Recorder(keras.callbacks.Callback):
    """Weights after every training batch."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([np.array(v.numpy()) for v in self.model.trainable_variables])


def _hand_loop(model, x, y, steps, eta):
    """WarpGrad Algorithm 3 (approximate objective) written out with a GradientTape."""
    part = warpkeras.partition(model)
    variables = model.trainable_variables
    warp_ids = {id(v) for v in part.warp_variables}
    acc = [tf.zeros_like(v) for v in part.warp_variables]
    pending = 0
    loss_fn = keras.losses.MeanSquaredError()
    history = []
    for k in range(steps):
        xb, yb = x[k * BATCH : (k + 1) * BATCH], y[k * BATCH : (k + 1) * BATCH]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = dict(zip([id(v) for v in variables], tape.gradient(loss, variables)))
        for v in part.task_variables:
            v.assign_sub(INNER_LR * grads[id(v)])
        acc = [a + grads[id(v)] for a, v in zip(acc, part.warp_variables)]
        pending += 1
        if pending == eta:
            for a, v in zip(acc, part.warp_variables):
                v.assign_sub(META_LR * a / eta)
            acc = [tf.zeros_like(a) for a in acc]
            pending = 0
        history.append([np.array(v.numpy()) for v in variables])
    assert len(warp_ids) == len(part.warp_variables)
    return history


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_fit_equals_hand_written_algorithm(kind):
    x, y = _data()
    model = BUILDERS[kind]()
    initial = model.get_weights()
    _compile(model)
    rec = _Recorder()
    model.fit(x, y, batch_size=BATCH, shuffle=False, epochs=1, verbose=0, callbacks=[rec])

    reference = BUILDERS[kind]()
    reference.set_weights(initial)
    expected = _hand_loop(reference, x, y, N_STEPS, ETA)

    assert len(rec.weights) == N_STEPS
    for step, (got, want) in enumerate(zip(rec.weights, expected)):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
    opt = model.optimizer
    assert opt.pending_steps == N_STEPS % ETA
    assert int(opt.iterations.numpy()) == N_STEPS
    assert int(opt.meta_optimizer.iterations.numpy()) == N_STEPS // ETA
    assert int(opt.inner_optimizer.iterations.numpy()) == N_STEPS


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_warp_moves_only_every_eta_steps(kind):
    x, y = _data()
    model = BUILDERS[kind]()
    opt = _compile(model)
    rec = _Recorder()
    before = [np.array(v.numpy()) for v in model.trainable_variables]
    model.fit(x, y, batch_size=BATCH, shuffle=False, epochs=1, verbose=0, callbacks=[rec])
    part = warpkeras.partition(model)
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    warp_idx = [index[id(v)] for v in part.warp_variables]
    task_idx = [index[id(v)] for v in part.task_variables]
    assert [index[id(v)] for v in opt.warp_variables] == warp_idx
    previous = before
    for step, now in enumerate(rec.weights):
        warp_moved = any(not np.array_equal(now[i], previous[i]) for i in warp_idx)
        assert warp_moved == ((step + 1) % ETA == 0), f"step {step}"
        assert all(not np.array_equal(now[i], previous[i]) for i in task_idx)
        previous = now


def test_task_variables_never_get_meta_updates():
    # With a zero inner learning rate, task variables must not move at all, including on
    # the steps where the meta optimizer runs.
    x, y = _data()
    model = _sequential()
    opt = _compile(model, inner=keras.optimizers.SGD(0.0), eta=2)
    part = warpkeras.partition(model)
    task_before = [np.array(v.numpy()) for v in part.task_variables]
    warp_before = [np.array(v.numpy()) for v in part.warp_variables]
    model.fit(x, y, batch_size=BATCH, shuffle=False, epochs=1, verbose=0)
    for a, v in zip(task_before, part.task_variables):
        np.testing.assert_array_equal(a, v.numpy())
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(warp_before, part.warp_variables))
    meta_vars = {id(v) for v in opt.meta_optimizer._trainable_variables}
    assert meta_vars == {id(v) for v in part.warp_variables}
    inner_vars = {id(v) for v in opt.inner_optimizer._trainable_variables}
    assert inner_vars == {id(v) for v in part.task_variables}


def _train_and_weights(mode, x, y):
    keras.utils.set_random_seed(7)
    model = _sequential()
    _compile(
        model,
        inner=keras.optimizers.SGD(INNER_LR, momentum=0.9),
        meta=keras.optimizers.Adam(1e-2),
        **mode,
    )
    model.fit(x, y, batch_size=BATCH, shuffle=False, epochs=2, verbose=0)
    return model.get_weights(), [np.array(v.numpy()) for v in model.optimizer.variables]


def test_steps_per_execution_and_xla_match_plain_fit():
    x, y = _data()
    plain_w, plain_s = _train_and_weights({}, x, y)
    for mode in ({"steps_per_execution": 2}, {"jit_compile": True}, {"run_eagerly": True}):
        w, s = _train_and_weights(mode, x, y)
        for a, b in zip(plain_w, w):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(mode))
        assert len(s) == len(plain_s)
        for a, b in zip(plain_s, s):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(mode))


def test_save_load_keeps_optimizer_state(tmp_path):
    x, y = _data(n=200)
    model = _sequential()
    _compile(
        model,
        inner=keras.optimizers.SGD(INNER_LR, momentum=0.9),
        meta=keras.optimizers.Adam(1e-2),
    )
    model.fit(x[:32], y[:32], batch_size=BATCH, shuffle=False, epochs=1, verbose=0)
    assert model.optimizer.pending_steps == 4 % ETA
    path = str(tmp_path / "warp.keras")
    model.save(path)
    loaded = keras.models.load_model(path)

    assert isinstance(loaded.optimizer, WarpGrad)
    assert loaded.optimizer.pending_steps == model.optimizer.pending_steps
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for m in (model, loaded):
        m.fit(x[32:], y[32:], batch_size=BATCH, shuffle=False, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)


def test_config_round_trip():
    model = _sequential()
    opt = WarpGrad(
        inner_optimizer=keras.optimizers.SGD(0.3, momentum=0.5),
        meta_optimizer=keras.optimizers.Adam(2e-3),
        meta_interval=4,
        model=model,
    )
    opt.build(model.trainable_variables)
    config = opt.get_config()
    assert config["variable_roles"] == ["task", "task", "warp", "warp", "task", "task"]
    assert config["inner_optimizer"]["class_name"] == "SGD"
    clone = WarpGrad.from_config(config)
    assert clone.get_config() == config
    assert clone.inner_optimizer.momentum == 0.5
    assert float(clone.meta_optimizer.learning_rate.numpy()) == pytest.approx(2e-3)
    # Roles from the config resolve the variables without binding.
    clone.build(model.trainable_variables)
    assert [id(v) for v in clone.warp_variables] == [id(v) for v in opt.warp_variables]
    serialized = keras.optimizers.serialize(opt)
    assert isinstance(keras.optimizers.deserialize(serialized), WarpGrad)


def test_flush_reset_and_learning_rate():
    x, y = _data()
    model = _sequential()
    opt = _compile(model, eta=100)
    model.fit(x[:16], y[:16], batch_size=BATCH, shuffle=False, verbose=0)
    assert opt.pending_steps == 2
    mean = [np.array(g) for g in opt.accumulated_warp_gradient()]
    before = [np.array(v.numpy()) for v in opt.warp_variables]
    opt.flush()
    assert opt.pending_steps == 0
    for b, g, v in zip(before, mean, opt.warp_variables):
        np.testing.assert_allclose(v.numpy(), b - META_LR * g, rtol=1e-6, atol=1e-7)
    opt.flush()  # nothing pending: no-op
    for b, g, v in zip(before, mean, opt.warp_variables):
        np.testing.assert_allclose(v.numpy(), b - META_LR * g, rtol=1e-6, atol=1e-7)
    model.fit(x[:8], y[:8], batch_size=BATCH, shuffle=False, verbose=0)
    opt.reset_accumulator()
    assert opt.pending_steps == 0
    opt.learning_rate = 0.25
    assert float(opt.inner_optimizer.learning_rate.numpy()) == pytest.approx(0.25)


def test_error_without_warp_variables():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)], name="plain_net"
    )
    model.compile(optimizer=WarpGrad(model=model), loss="mse")
    x, y = _data(16)
    with pytest.raises(warpkeras.RoleError, match="plain_net.*no warp variables"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_error_without_task_variables():
    model = keras.Sequential(
        [keras.Input((3,)), warpkeras.warp(keras.layers.Dense(1))], name="all_warp"
    )
    opt = WarpGrad(model=model)
    with pytest.raises(warpkeras.RoleError, match="all_warp.*no task variables"):
        opt.build(model.trainable_variables)


def test_error_when_model_unknown():
    model = _sequential()
    model.compile(optimizer=WarpGrad(), loss="mse")
    x, y = _data(16)
    with pytest.raises(ValueError, match="bind"):
        model.fit(x, y, batch_size=8, verbose=0)


def test_error_on_foreign_variables_and_bad_arguments():
    model, other = _sequential(), _sequential()
    opt = WarpGrad(model=model)
    with pytest.raises(ValueError, match="not a trainable variable of model"):
        opt.build(other.trainable_variables)
    with pytest.raises(ValueError, match="meta_interval"):
        WarpGrad(meta_interval=0)
    sgd = keras.optimizers.SGD(0.1)
    with pytest.raises(ValueError, match="two optimizer instances"):
        WarpGrad(inner_optimizer=sgd, meta_optimizer=sgd)
    with pytest.raises(ValueError, match="either `learning_rate`"):
        WarpGrad(inner_optimizer=sgd, learning_rate=0.1)
    with pytest.raises(ValueError, match="does not take `clipnorm`"):
        WarpGrad(clipnorm=1.0)


def test_bind_after_compile_and_default_optimizers():
    x, y = _data()
    model = _sequential()
    opt = WarpGrad(learning_rate=0.05, meta_interval=2)
    model.compile(optimizer=opt, loss="mse")
    opt.bind(model)
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    assert isinstance(opt.inner_optimizer, keras.optimizers.SGD)
    assert isinstance(opt.meta_optimizer, keras.optimizers.Adam)
    assert int(opt.meta_optimizer.iterations.numpy()) == N_STEPS // 2
    # Re-binding a built optimizer to a model with other roles is refused.
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5), keras.layers.Dense(1)])
    with pytest.raises((warpkeras.RoleError, ValueError)):
        opt.bind(other)
