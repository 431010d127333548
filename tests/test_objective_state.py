"""What the trainer does for objectives written against `warpkeras.meta`: their own
variables are checkpointed, checkpoints of the earlier layout restore, an inner rule that
ignores momentum is refused, MAML subclasses may create meta-variables in any order, the
meta-gradient unpacks per variable, and plain-function losses run in float32 under mixed
precision."""

import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras.meta import MAML, MetaObjective, MetaTrainingError
from warpkeras.trainers import MetaTrainer

COMMON = dict(inner_steps=2, meta_batch_size=2, inner_learning_rate=0.05, seed=1)


def _model(seed=0, warp=False):
    keras.utils.set_random_seed(seed)
    first = keras.layers.Dense(4, activation="tanh")
    return keras.Sequential(
        [keras.Input((3,)), warpkeras.warp(first) if warp else first, keras.layers.Dense(1)]
    )


def _tasks():
    rng = np.random.default_rng(0)
    tasks = []
    for i in range(2):
        x = rng.normal(size=(8, 3)).astype("float32")
        y = (x @ rng.normal(size=(3, 1))).astype("float32")
        tasks.append(warpkeras.Task(train=(x, y), meta=(x, y), batch_size=8, name=f"t{i}"))
    return tasks


class ScaledReptile(MetaObjective):
    """Reptile with its own variable (`scale`, no model variable) that every meta step
    changes, and no `checkpoint_items` override."""

    optimizer_name = "init_optimizer"

    def __init__(self):
        self.optimizer = keras.optimizers.SGD(0.5)

    def build(self, engine):
        self.scale = keras.Variable(1.0, name="scale")
        self.optimizer.build(engine.partition.task_variables)

    def variables(self, engine):
        return list(engine.partition.task_variables) + [self.scale]

    def close(self, engine, group):
        return {"grads": tuple(a - b for a, b in zip(group.theta_start, group.carry["theta"]))}

    def apply(self, engine, grads, count):
        self.scale.assign(self.scale * 1.5)
        self.optimizer.apply(
            engine.theta_packer.unpack([g / count for g in grads]), engine.partition.task_variables
        )


def _scaled():
    objective = ScaledReptile()
    return MetaTrainer(_model(), "mse", objectives=[objective], **COMMON), objective


def test_own_variables_are_checkpointed_by_default(tmp_path):
    def backup():
        return keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)

    first, objective = _scaled()
    first.fit(
        _tasks(), epochs=2, verbose=0, callbacks=[backup()], checkpoint_dir=str(tmp_path / "ckpt")
    )
    assert float(objective.scale.numpy()) == 2.25
    # tf.train.Checkpoint (restore / checkpoint_dir)
    resumed, fresh = _scaled()
    assert resumed.restore(str(tmp_path / "ckpt")) == 2
    assert float(fresh.scale.numpy()) == 2.25
    # Keras's BackupAndRestore (the weights files of the fit model)
    resumed, fresh = _scaled()
    resumed.fit(_tasks(), epochs=2, verbose=0, callbacks=[backup()])  # nothing left to do
    assert int(resumed.step.numpy()) == 2
    assert float(fresh.scale.numpy()) == 2.25


def test_checkpoint_items_may_be_lists_of_variables(tmp_path):
    class Listed(ScaledReptile):
        def checkpoint_items(self, engine):
            return {"init_optimizer": self.optimizer, "listed": [self.scale, self.extra]}

        def build(self, engine):
            super().build(engine)
            self.extra = tf.Variable([1.0, 2.0])

    objective = Listed()
    trainer = MetaTrainer(_model(), "mse", objectives=[objective], **COMMON)
    state = trainer._trainer_state_variables()
    assert any(v is objective.scale for v in state)
    assert any(v is objective.extra for v in state)
    objective.extra.assign([3.0, 4.0])
    trainer._checkpoint().write(str(tmp_path / "c"))
    again = Listed()
    restored = MetaTrainer(_model(), "mse", objectives=[again], **COMMON)
    restored._checkpoint().read(str(tmp_path / "c")).assert_existing_objects_matched()
    np.testing.assert_array_equal(again.extra.numpy(), [3.0, 4.0])


# Checkpoint keys of the earlier trainers (one trainer class holding every counter).
EARLIER_KEYS = {
    "leap": ["init_optimizer", "inner_lr", "inner_mu", "nan_tasks", "step", "stream_count"],
    "maml": ["init_optimizer", "inner_lr", "inner_mu", "nan_tasks", "step", "stream_count"],
    "reptile": ["init_optimizer", "inner_lr", "inner_mu", "nan_tasks", "step", "stream_count"],
    "warp_leap": [
        "init_optimizer",
        "inner_lr",
        "inner_mu",
        "meta_optimizer",
        "nan_tasks",
        "step",
        "stream_count",
    ],
}


def _preset(name):
    kw = dict(COMMON)
    if name == "leap":
        return warpkeras.LeapTrainer(_model(), "mse", **kw)
    if name == "maml":
        return warpkeras.MAMLTrainer(_model(), "mse", **kw)
    if name == "reptile":
        return warpkeras.ReptileTrainer(_model(), "mse", **kw)
    return warpkeras.WarpTrainer(
        _model(warp=True), "mse", mode="offline", init_objective="leap", **kw
    )


@pytest.mark.parametrize("name", sorted(EARLIER_KEYS))
def test_checkpoints_of_the_earlier_layout_restore(name, tmp_path):
    trainer = _preset(name)
    assert sorted(k for k in trainer._checkpoint_items() if k != "model") == EARLIER_KEYS[name]
    # A checkpoint as the earlier trainers wrote it: every trainer held `stream_count`.
    items = dict(trainer._checkpoint_items())
    items["step"] = tf.Variable(5, dtype=tf.int64)
    items["stream_count"] = tf.Variable(0, dtype=tf.int64)
    tf.train.CheckpointManager(
        tf.train.Checkpoint(**items), str(tmp_path), max_to_keep=1, checkpoint_name="ckpt"
    ).save(5)
    fresh = _preset(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.restore(str(tmp_path)) == 5
    assert os.path.exists(tmp_path / "ckpt-5.index")


# ---------------------------------------------------------------------- inner rule and μ
class HalfStep(MAML):
    """An inner rule that ignores momentum: θ − α/2 ∇L."""

    def inner_update(self, engine, theta, grads, velocity):
        return [t - 0.5 * engine.inner_lr * g for t, g in zip(theta, grads)], velocity


def test_inner_rule_without_momentum_is_refused_with_inner_momentum():
    with pytest.raises(
        MetaTrainingError,
        match=r"^HalfStep: .*inner_momentum=0\.9.*"
        r"inner_momentum=None",
    ):
        MetaTrainer(_model(), "mse", objectives=[HalfStep()], inner_momentum=0.9, **COMMON)
    MetaTrainer(_model(), "mse", objectives=[HalfStep()], **COMMON)  # without μ: fine


def test_inner_rule_that_supports_momentum_is_accepted():
    class HeavyBall(HalfStep):
        supports_momentum = True

        def inner_update(self, engine, theta, grads, velocity):
            velocity = [engine.inner_mu * v + g for v, g in zip(velocity, grads)]
            return [t - engine.inner_lr * v for t, v in zip(theta, velocity)], velocity

    trainer = MetaTrainer(_model(), "mse", objectives=[HeavyBall()], inner_momentum=0.9, **COMMON)
    theta, _ = trainer.adapt(_tasks()[0], steps=2)
    # Two heavy-ball steps on the task's one batch, by hand.
    model, (x, y) = _model(), _tasks()[0].train
    w, v = [tf.Variable(a) for a in model.get_weights()], None
    for _ in range(2):
        with tf.GradientTape() as tape:
            h = tf.tanh(x @ w[0] + w[1])
            loss = tf.reduce_mean(tf.square(h @ w[2] + w[3] - y))
        g = tape.gradient(loss, w)
        v = g if v is None else [0.9 * a + b for a, b in zip(v, g)]
        for a, b in zip(w, v):
            a.assign_sub(0.05 * b)
    for got, want in zip(theta, w):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- MAML subclasses
class RatesBefore(MAML):
    """Meta-SGD-like: per-parameter rates created before ``super().build``."""

    def build(self, engine):
        self.make_rates(engine)
        super().build(engine)

    def make_rates(self, engine):
        self.alpha = [
            keras.Variable(np.full(v.shape, 0.05, "float32"), name="alpha")
            for v in engine.partition.task_variables
        ]

    def meta_variables(self, engine):
        return self.alpha

    def inner_update(self, engine, theta, grads, velocity):
        return [t - a * g for t, a, g in zip(theta, self.alpha, grads)], velocity


class RatesAfter(RatesBefore):
    """The same, with the rates created after ``super().build``."""

    def build(self, engine):
        MAML.build(self, engine)
        self.make_rates(engine)


def _fit_maml(objective, steps=2):
    trainer = MetaTrainer(_model(), "mse", objectives=[objective], **COMMON)
    trainer.fit(_tasks(), epochs=steps, verbose=0)
    return trainer


def test_maml_meta_variables_may_be_created_after_super_build():
    before, after = RatesBefore(optimizer="sgd"), RatesAfter(optimizer="sgd")
    a, b = _fit_maml(before), _fit_maml(after)
    assert not np.allclose(after.alpha[0].numpy(), 0.05)  # the rates did train
    for x, y in zip(
        a.model.get_weights() + [v.numpy() for v in before.alpha],
        b.model.get_weights() + [v.numpy() for v in after.alpha],
    ):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)
    assert len(after.optimizer.variables) == len(before.optimizer.variables)


def test_maml_meta_variables_that_change_after_build_are_refused():
    class Changing(RatesBefore):
        def meta_variables(self, engine):
            return self.alpha[:1] if getattr(self, "late", False) else self.alpha

    objective = Changing(optimizer="sgd")
    trainer = MetaTrainer(_model(), "mse", objectives=[objective], **COMMON)
    objective.late = True
    with pytest.raises(MetaTrainingError, match="Changing: meta_variables"):
        trainer.fit(_tasks(), epochs=1, verbose=0)


def test_unpack_gradients_gives_one_gradient_per_variable():
    seen = {}

    def recording(cls):
        class Recording(cls):
            def apply(self, engine, grads, count):
                seen[cls] = [np.asarray(g) / count for g in self.unpack_gradients(engine, grads)]
                seen[cls, "shapes"] = [tuple(v.shape) for v in self.variables(engine)]
                super().apply(engine, grads, count)

        return Recording(optimizer="sgd")

    _fit_maml(recording(MAML), steps=1)
    _fit_maml(recording(RatesBefore), steps=1)
    plain, rates = seen[MAML], seen[RatesBefore]
    assert [g.shape for g in plain] == seen[MAML, "shapes"] == [(3, 4), (4,), (4, 1), (1,)]
    assert (
        [g.shape for g in rates] == seen[RatesBefore, "shapes"] == [(3, 4), (4,), (4, 1), (1,)] * 2
    )
    # With every rate equal to α, Meta-SGD's θ0 gradient is MAML's; the rates get theirs.
    for a, b in zip(plain, rates[:4]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert all(np.abs(g).max() > 0 for g in rates[4:])
    # pack / unpack round trip of mixed dtypes and shapes
    engine = _fit_maml(MAML(optimizer="sgd"), steps=0)
    values = [tf.ones((2, 3)), tf.zeros((4,), tf.float64), tf.fill((1,), 7.0)]
    packer = engine.packer(values)
    assert len(packer.pack(values)) == 2
    for a, b in zip(packer.unpack(packer.pack(values)), values):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---------------------------------------------------------------------- mixed precision
def _bf16_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(8, activation="tanh", dtype="mixed_bfloat16"),
            keras.layers.Dense(1, dtype="mixed_bfloat16"),
        ]
    )


def plain_mse(y_true, y_pred):
    return tf.reduce_mean(tf.square(y_true - y_pred))


def test_plain_function_loss_is_float32_under_mixed_bfloat16():
    model = _bf16_model()
    assert model.layers[0].compute_dtype == "bfloat16"
    part = warpkeras.partition(model)
    x, y = _tasks()[0].train
    theta = [v.value for v in part.task_variables]
    plain, _, outputs = warpkeras.objectives.task_loss(
        part, plain_mse, theta, [], (x, y), return_outputs=True
    )
    keras_loss, _ = warpkeras.objectives.task_loss(
        part, keras.losses.MeanSquaredError(), theta, [], (x, y)
    )
    assert outputs.dtype == tf.bfloat16  # the model did compute in bfloat16
    assert plain.dtype == tf.float32
    np.testing.assert_allclose(plain.numpy(), keras_loss.numpy(), rtol=1e-6)
    # ... and in bfloat16 it would have lost digits
    low = plain_mse(tf.cast(y, tf.bfloat16), outputs)
    assert abs(float(low) - float(keras_loss)) > 1e-5 * abs(float(keras_loss))

    # Meta-training with the plain function equals meta-training with the Keras loss.
    def fitted(loss):
        trainer = warpkeras.ReptileTrainer(_bf16_model(), loss, **COMMON)
        history = trainer.fit(_tasks(), epochs=1, verbose=0)
        return history.history["loss"][0], trainer.model.get_weights()

    (a, wa), (b, wb) = fitted(plain_mse), fitted(keras.losses.MeanSquaredError())
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for p, q in zip(wa, wb):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-7)
