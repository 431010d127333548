"""`MetaTrainer.fit` as a Keras user expects it: every stock callback in `keras.callbacks`
does what it does in `model.fit` (one meta step = one epoch = one batch), Keras-shaped
History and arguments, Keras's progress formats."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_lists_close, linear_warp_model, plain_model

import warpkeras
from warpkeras.trainers.loop import FitModel


def regression_task(rng, n=40):
    w = (np.array([[2.0], [-1.5], [1.0], [0.5]]) + 0.1 * rng.normal(size=(4, 1))).astype("float32")
    x = rng.normal(size=(n, 4)).astype("float32")
    y = x @ w
    return warpkeras.Task(train=(x[:30], y[:30]), test=(x[30:], y[30:]), batch_size=10)


def diverging_task(rng):
    task = regression_task(rng)
    task.train = (task.train[0], np.full_like(task.train[1], np.nan))
    task.name = "diverging"
    return task


def diverging_from(step):
    """A task source whose every task diverges from meta step `step` (0-based) on."""
    calls = []

    def source(rng):
        calls.append(1)
        return diverging_task(rng) if len(calls) > step else regression_task(rng)

    return source


def warp_leap(model=None, **kw):
    """Both φ (meta_optimizer) and θ0 (init_optimizer) are meta-learned."""
    kw.setdefault("meta_optimizer", keras.optimizers.SGD(0.1))
    return warpkeras.WarpTrainer(
        model or linear_warp_model(),
        "mse",
        mode="online",
        init_objective="leap",
        inner_steps=1,
        meta_batch_size=1,
        inner_learning_rate=0.1,
        **kw,
    )


def leap(model=None, **kw):
    """Only θ0 (init_optimizer) is meta-learned."""
    return warpkeras.LeapTrainer(
        model or plain_model(),
        "mse",
        inner_steps=1,
        meta_batch_size=1,
        inner_learning_rate=0.1,
        meta_optimizer=keras.optimizers.SGD(0.1),
        **kw,
    )


VALIDATION = [regression_task(np.random.default_rng(100))]


# ----------------------------------------------------------------------------------------
# History, logs, arguments
def test_history_has_one_entry_per_meta_step_for_every_key_and_keras_params():
    trainer = leap()
    with pytest.warns(RuntimeWarning, match="diverging"):
        history = trainer.fit(
            diverging_from(1), epochs=3, verbose=0, validation_data=VALIDATION, validation_freq=2
        )
    h = history.history
    assert history.params == {"verbose": 0, "epochs": 3, "steps": 1}
    assert history.epoch == [0, 1, 2]
    assert {"loss", "val_loss", "val_auc", "nan_tasks", "seconds"} <= set(h)
    assert all(len(v) == 3 for v in h.values()), {k: len(v) for k, v in h.items()}
    # step 0 trained; steps 1 and 2 had no finite task: loss is NaN, not left out
    assert np.isfinite(h["loss"][0]) and np.isnan(h["loss"][1]) and np.isnan(h["loss"][2])
    # validated at meta steps 2 (validation_freq) and 3 (the last): NaN before
    assert np.isnan(h["val_loss"][0]) and np.isfinite(h["val_loss"][1])
    assert h["nan_tasks"] == [0, 1, 2]


def test_keras_argument_spellings():
    trainer = leap()
    history = trainer.fit(regression_task, epochs=3, initial_epoch=1, verbose="auto")
    assert history.epoch == [1, 2] and int(trainer.step.numpy()) == 3
    # epochs is a total, as meta_steps always was: a second call continues up to it
    assert trainer.fit(regression_task, meta_steps=4, verbose=0).epoch == [3]
    assert trainer.fit(regression_task, 5, verbose=0).epoch == [4]  # positional epochs
    with pytest.raises(TypeError, match="epochs=6 and meta_steps=7"):
        trainer.fit(regression_task, epochs=6, meta_steps=7)
    with pytest.raises(TypeError, match="fit needs epochs="):
        trainer.fit(regression_task)
    with pytest.raises(TypeError, match="epochs must be an integer"):
        trainer.fit(regression_task, epochs="10")
    with pytest.raises(TypeError, match="validation_data and validation_tasks"):
        trainer.fit(
            regression_task, epochs=6, validation_data=VALIDATION, validation_tasks=list(VALIDATION)
        )
    with pytest.raises(ValueError, match="verbose"):
        trainer.fit(regression_task, epochs=6, verbose=3)


def test_verbose_2_prints_keras_lines_and_a_diverged_step_shows_nan(capsys):
    trainer = leap()
    with pytest.warns(RuntimeWarning):
        trainer.fit(diverging_from(1), epochs=2, verbose=2)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0] == "Epoch 1/2" and lines[2] == "Epoch 2/2"
    # Keras's verbose=2 line: "1/1 - <time> - <time>/step - loss: ..."
    assert lines[1].startswith("1/1 - ") and "/step - loss: " in lines[1]
    assert "loss: nan" in lines[3]  # never the previous step's value
    assert "seconds" not in out and "nan_tasks" not in out


def test_verbose_1_uses_the_keras_progress_bar(capsys):
    leap().fit(regression_task, epochs=2, verbose=1)
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "1/1" in out and "loss:" in out


# ----------------------------------------------------------------------------------------
# each stock callback
def test_batch_hooks_fire_once_per_meta_step_with_its_logs():
    events = []
    cb = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: events.append(("begin", b)),
        on_train_batch_end=lambda b, logs: events.append(("end", b, logs["loss"])),
    )
    history = leap().fit(regression_task, epochs=2, verbose=0, callbacks=[cb])
    assert events == [
        ("begin", 0),
        ("end", 0, history.history["loss"][0]),
        ("begin", 0),
        ("end", 0, history.history["loss"][1]),
    ]


def test_terminate_on_nan_stops_a_diverged_run():
    trainer = leap()
    with pytest.warns(RuntimeWarning):
        history = trainer.fit(
            diverging_from(1), epochs=4, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()]
        )
    assert len(history.history["loss"]) == 2 and int(trainer.step.numpy()) == 2


def test_learning_rate_scheduler_sets_both_meta_optimizers():
    model = linear_warp_model()
    trainer = warp_leap(model)
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1))
    history = trainer.fit(regression_task, epochs=3, verbose=0, callbacks=[schedule])
    for opt in (trainer.meta_optimizer, trainer.init_optimizer):
        np.testing.assert_allclose(float(opt.learning_rate.numpy()), 0.1 / 3, rtol=1e-6)
    np.testing.assert_allclose(
        history.history["learning_rate_init_optimizer"], [0.1, 0.05, 0.1 / 3], rtol=1e-6
    )
    assert getattr(model, "optimizer", None) is None  # the user's model is left alone


def test_learning_rate_scheduler_rate_is_the_one_used():
    model = plain_model()
    before = [w.copy() for w in model.get_weights()]
    trainer = leap(model)
    history = trainer.fit(
        regression_task,
        epochs=2,
        verbose=0,
        callbacks=[keras.callbacks.LearningRateScheduler(lambda e: 0.0)],
    )
    assert history.history["learning_rate"] == [0.0, 0.0]
    assert_lists_close(model.get_weights(), before, rtol=0, atol=0)  # θ0 did not move


def test_reduce_lr_on_plateau_acts_on_the_meta_optimizers():
    trainer = warp_leap()
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=1, min_delta=1e9
    )
    history = trainer.fit(regression_task, epochs=3, verbose=0, callbacks=[plateau])
    for opt in (trainer.meta_optimizer, trainer.init_optimizer):
        np.testing.assert_allclose(float(opt.learning_rate.numpy()), 0.025, rtol=1e-6)
    # logged before the reduction of the same epoch, as in Keras
    assert history.history["learning_rate_meta_optimizer"] == pytest.approx([0.1, 0.1, 0.05])


def test_early_stopping_stops_and_restores_best_weights():
    model = plain_model()
    after = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: after.append([w.copy() for w in model.get_weights()])
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="loss", min_delta=1e9, patience=1, restore_best_weights=True
    )
    trainer = leap(model)
    history = trainer.fit(regression_task, epochs=5, verbose=0, callbacks=[record, stop])
    assert len(history.history["loss"]) == 2 and int(trainer.step.numpy()) == 2
    assert_lists_close(model.get_weights(), after[0], rtol=0, atol=0)


def test_early_stopping_auto_mode_knows_accuracy_goes_up():
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy")
    stop.set_model(FitModel(leap()))  # what fit hands to its callbacks
    stop._set_monitor_op()
    assert stop.monitor_op is keras.ops.greater


def test_model_checkpoint_and_csv_logger(tmp_path):
    model = plain_model()
    path = str(tmp_path / "best.weights.h5")
    csv = str(tmp_path / "log.csv")
    leap(model).fit(
        regression_task,
        epochs=2,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(path, monitor="loss", save_weights_only=True),
            keras.callbacks.CSVLogger(csv),
        ],
    )
    fresh = plain_model()
    fresh.load_weights(path)
    assert_lists_close(fresh.get_weights(), model.get_weights(), rtol=0, atol=0)
    rows = open(csv).read().splitlines()
    assert rows[0].startswith("epoch,") and "loss" in rows[0] and len(rows) == 3


def test_backup_and_restore_resumes_exactly(tmp_path):
    backup = str(tmp_path / "backup")

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    def trainer(seed):
        keras.utils.set_random_seed(seed)
        return warp_leap(meta_optimizer=keras.optimizers.Adam(0.01))

    reference = trainer(1)
    reference.fit(regression_task, epochs=3, verbose=0)
    first = trainer(1)
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(
            regression_task,
            epochs=3,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()],
        )
    resumed = trainer(2)  # other initial weights until restored
    history = resumed.fit(
        regression_task, epochs=3, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(backup)]
    )
    assert history.epoch == [2] and int(resumed.step.numpy()) == 3
    assert_lists_close(
        resumed.model.get_weights(), reference.model.get_weights(), rtol=1e-6, atol=1e-7
    )
    assert_lists_close(
        [v.numpy() for v in resumed.meta_optimizer.variables],
        [v.numpy() for v in reference.meta_optimizer.variables],
        rtol=1e-6,
        atol=1e-7,
    )
    assert not os.path.exists(backup)  # deleted after a completed run, as in Keras


def _events(folder):
    out = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
    return out


def test_tensorboard_writes_keras_tags_and_the_learning_rate(tmp_path):
    history = leap().fit(
        regression_task,
        epochs=2,
        verbose=0,
        validation_data=VALIDATION,
        validation_freq=1,
        log_dir=str(tmp_path / "tb"),
    )
    train = _events(str(tmp_path / "tb" / "train"))
    val = _events(str(tmp_path / "tb" / "validation"))
    assert [s for s, _ in train["epoch_loss"]] == [0, 1]
    np.testing.assert_allclose(
        [v for _, v in train["epoch_loss"]], history.history["loss"], rtol=1e-6
    )
    assert [v for _, v in train["epoch_learning_rate"]] == pytest.approx([0.1, 0.1])
    np.testing.assert_allclose(
        [v for _, v in val["epoch_loss"]], history.history["val_loss"], rtol=1e-6
    )


def test_remote_monitor_posts_each_meta_step(monkeypatch):
    import requests

    posts = []
    monkeypatch.setattr(requests, "post", lambda url, *a, **kw: posts.append((url, kw)))
    history = leap().fit(
        regression_task,
        epochs=2,
        verbose=0,
        callbacks=[keras.callbacks.RemoteMonitor(send_as_json=True)],
    )
    assert [p[1]["json"]["epoch"] for p in posts] == [0, 1]
    assert [p[1]["json"]["loss"] for p in posts] == history.history["loss"]


def test_swap_ema_weights_and_ema_optimizers_end_with_the_average():
    model = linear_warp_model()
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        mode="online",
        init_objective=None,
        inner_steps=1,
        meta_batch_size=1,
        meta_optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5),
    )
    trainer.fit(
        regression_task,
        epochs=2,
        verbose=0,
        callbacks=[keras.callbacks.SwapEMAWeights(swap_on_epoch=True)],
    )
    average = trainer.meta_optimizer._model_variables_moving_average
    warp = model.get_layer("warp").kernel
    np.testing.assert_allclose(warp.numpy(), average[0].numpy(), rtol=1e-6)
    assert not np.allclose(warp.numpy(), np.eye(4))  # φ moved


def test_orbax_checkpoint_is_the_only_callback_not_covered():
    covered = {
        "BackupAndRestore",
        "CSVLogger",
        "Callback",
        "CallbackList",
        "EarlyStopping",
        "History",
        "LambdaCallback",
        "LearningRateScheduler",
        "ModelCheckpoint",
        "ProgbarLogger",
        "ReduceLROnPlateau",
        "RemoteMonitor",
        "SwapEMAWeights",
        "TensorBoard",
        "TerminateOnNaN",
        "OrbaxCheckpoint",
    }
    stock = {n for n in dir(keras.callbacks) if not n.startswith("_")}
    assert stock <= covered, stock - covered
