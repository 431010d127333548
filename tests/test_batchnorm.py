"""Batch-norm statistics: one semantics for training, evaluation and serving.

Set-up: Dense → BatchNormalization → ReLU → Dense on 3-way tasks whose inputs have mean 5
and standard deviation 3, meta-trained with Leap for 10 meta steps. Without statistics
estimated from data, the moving mean and variance stay 0 and 1 and inference-mode accuracy
is far below the batch-statistics accuracy (0.54 against 0.83).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras

D, N, N_TEST, K, META_STEPS = 5, 30, 30, 10, 10
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _task(rng, i):
    w = rng.normal(size=(D, 3))

    def sample(n):
        x = (5.0 + 3.0 * rng.normal(size=(n, D))).astype("float32")
        return x, np.argmax((x - 5.0) @ w, axis=1).astype("int64")

    # One batch is the whole training set, as in the served `adapt` (full-batch steps).
    return warpkeras.Task(sample(N), test=sample(N_TEST), batch_size=N, name=f"task{i}")


def _trainer(model, eval_training_mode=True):
    return warpkeras.LeapTrainer(
        model,
        LOSS,
        inner_steps=K,
        meta_batch_size=4,
        inner_learning_rate=0.1,
        meta_optimizer=keras.optimizers.SGD(0.1),
        eval_training_mode=eval_training_mode,
    )


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    train = [_task(rng, i) for i in range(12)]
    test = [_task(rng, 100 + i) for i in range(8)]
    model = keras.Sequential(
        [
            keras.Input((D,)),
            keras.layers.Dense(16, name="dense"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.Dense(3, name="head"),
        ]
    )
    trainer = _trainer(model)
    trainer.fit(train, META_STEPS, verbose=0)
    return dict(model=model, trainer=trainer, test=test, rng=rng)


def test_moving_statistics_come_from_data(trained):
    model = trained["model"]
    bn = model.get_layer("bn")
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    assert np.abs(mean).max() > 1.0 and np.abs(var - 1.0).max() > 0.1  # not 0 and 1
    # They are the statistics of the data at θ0 (up to the sampling of the last
    # meta-batch's 4 × 30 examples and the last meta-update of θ0).
    x = (5.0 + 3.0 * np.random.default_rng(1).normal(size=(4000, D))).astype("float32")
    h = model.get_layer("dense")(x).numpy()
    std = np.sqrt(h.var(axis=0))
    np.testing.assert_array_less(np.abs(mean - h.mean(axis=0)), 0.35 * std)
    np.testing.assert_array_less(np.abs(np.log(var / h.var(axis=0))), np.log(1.6))


def test_inference_accuracy_close_to_batch_statistics(trained):
    batch = trained["trainer"].evaluate(trained["test"], verbose=0)
    inference = _trainer(trained["model"], eval_training_mode=False).evaluate(
        trained["test"], verbose=0
    )
    acc_batch = batch["final_test_accuracy"]["mean"]
    acc_inference = inference["final_test_accuracy"]["mean"]
    assert acc_batch > 0.7, acc_batch  # the set-up learns
    assert abs(acc_inference - acc_batch) <= 0.05, (acc_inference, acc_batch)
    assert abs(inference["final_test_loss"]["mean"] - batch["final_test_loss"]["mean"]) < 0.1


@pytest.mark.parametrize("eval_training_mode", [True, False])
def test_served_prediction_equals_evaluate(trained, tmp_path, eval_training_mode):
    model, task = trained["model"], trained["test"][0]
    trainer = _trainer(model, eval_training_mode)
    report = trainer.evaluate([task], verbose=0)
    path = trainer.export(str(tmp_path / "served"), dtype_tolerant=False)
    served = tf.saved_model.load(path)
    meta = served.metadata()
    assert int(meta["training"]) == 1
    assert int(meta["predict_training"]) == int(eval_training_mode)
    (x, y), (xq, yq) = task.train, task.test_data()
    out = served.signatures["adapt_and_predict"](
        x=tf.constant(x), y=tf.constant(y), steps=tf.constant(K), queries=tf.constant(xq)
    )
    logits = out["predictions"].numpy()
    served_loss = float(LOSS(yq, logits))
    served_acc = float(np.mean(np.argmax(logits, axis=1) == yq))
    np.testing.assert_allclose(served_loss, report["final_test_loss"]["mean"], rtol=1e-4, atol=1e-5)
    assert served_acc == pytest.approx(report["final_test_accuracy"]["mean"], abs=1e-6)
    if eval_training_mode:
        # Batch statistics of a single example would normalise it to a constant.
        with pytest.raises(tf.errors.InvalidArgumentError, match="at least 2 examples"):
            served.signatures["serving_default"](x=tf.constant(xq[:1]))
    else:
        # At θ0 (no adaptation) the inference-mode model uses the saved statistics.
        np.testing.assert_allclose(
            served.signatures["serving_default"](x=tf.constant(xq))["predictions"].numpy(),
            model(xq, training=False).numpy(),
            rtol=1e-5,
            atol=1e-5,
        )
        # `adapt` returns the adapted statistics with the task parameters, the same as
        # the in-process adapted copy's.
        names = [f"{model.name}_bn_moving_mean", f"{model.name}_bn_moving_variance"]
        assert served.metadata()["state_parameters"].numpy().decode() == ",".join(names)
        out = served.signatures["adapt"](x=tf.constant(x), y=tf.constant(y), steps=tf.constant(K))
        adapted = warpkeras.adapt(model, x, y, K, loss=LOSS, learning_rate=0.1, training=True)
        bn = adapted.get_layer("bn")
        for name, want in zip(names, (bn.moving_mean, bn.moving_variance)):
            np.testing.assert_allclose(out[name].numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_adapted_copy_uses_the_support_statistics(trained):
    model, task = trained["model"], trained["test"][1]
    (x, y), _ = task.train, task.test_data()
    kwargs = dict(loss=LOSS, learning_rate=0.1, training=True)
    adapted = warpkeras.adapt(model, x, y, K, **kwargs)
    # The adapted copy's statistics are the support set's at the adapted parameters.
    h = adapted.get_layer("dense")(x).numpy()
    np.testing.assert_allclose(
        adapted.get_layer("bn").moving_mean.numpy(), h.mean(axis=0), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        adapted.get_layer("bn").moving_variance.numpy(), h.var(axis=0), rtol=1e-3, atol=1e-4
    )
    # ... and the model itself is unchanged.
    assert not np.allclose(model.get_layer("bn").moving_mean.numpy(), h.mean(axis=0))


TRAINERS = {
    "leap": lambda m, kw: warpkeras.LeapTrainer(m, LOSS, **kw),
    "reptile": lambda m, kw: warpkeras.ReptileTrainer(m, LOSS, **kw),
    "maml": lambda m, kw: warpkeras.MAMLTrainer(m, LOSS, **kw),
    "warp_online_maml": lambda m, kw: warpkeras.WarpTrainer(
        m, LOSS, mode="online", objective="approx", init_objective="maml", **kw
    ),
    "warp_offline_leap": lambda m, kw: warpkeras.WarpTrainer(m, LOSS, mode="offline", **kw),
    "warp_continual": lambda m, kw: warpkeras.WarpTrainer(
        m, LOSS, mode="continual", init_objective=None, **kw
    ),
    "finetune": lambda m, kw: warpkeras.FineTuneTrainer(
        m, LOSS, head_layers=[m.get_layer("head")], **kw
    ),
}


# Second-order objectives need `ExactBatchNormalization` (the stock layer is refused there).
@pytest.mark.parametrize(
    "name,exact",
    [
        ("leap", False),
        ("leap", True),
        ("reptile", False),
        ("maml", True),
        ("warp_online_maml", True),
        ("warp_offline_leap", True),
        ("warp_continual", True),
        ("finetune", False),
    ],
)
def test_every_trainer_saves_the_statistics_at_theta0(name, exact):
    # Every task has the same inputs (one full batch), so the saved statistics must be
    # exactly that batch's statistics at the final θ0, whatever the layers' momentum.
    rng = np.random.default_rng(2)
    x = (5.0 + 3.0 * rng.normal(size=(12, 4))).astype("float32")
    tasks = [
        warpkeras.Task((x, rng.integers(0, 2, size=12)), batch_size=12, name=f"t{i}")
        for i in range(3)
    ]
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, name="dense"),
            (
                warpkeras.layers.ExactBatchNormalization(name="bn")
                if exact
                else keras.layers.BatchNormalization(name="bn")
            ),
            keras.layers.ReLU(),
            warpkeras.warp(keras.layers.Dense(6, name="warp")),
            keras.layers.Dense(2, name="head"),
        ]
    )
    trainer = TRAINERS[name](
        model, dict(inner_steps=2, meta_batch_size=2, inner_learning_rate=0.05)
    )
    trainer.fit(tasks, 2, verbose=0)
    h = model.get_layer("dense")(x).numpy()
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(axis=0), rtol=1e-3, atol=1e-4)
