"""What Keras callbacks see during `fit`: the `FitModel` standing in for ``self.model``,
the meta optimisers under their names, History and the progress bar."""

import math
import os

import keras
import numpy as np

from warpkeras.trainers.checkpoints import CheckpointError


# ----------------------------------------------------------------------------------------
# what Keras callbacks see as `self.model`
class _NamedOptimizer:
    """One meta optimiser under the name its learning rate is logged with
    (``learning_rate_<name>``); reads and writes go to the optimiser itself."""

    def __init__(self, name, optimizer):
        self.name = name
        self._optimizer = optimizer

    @property
    def learning_rate(self):
        return self._optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self._optimizer.learning_rate = value

    def __getattr__(self, name):
        return getattr(self.__dict__["_optimizer"], name)


class _MetaOptimizers:
    """Several meta optimisers as one, the way Keras callbacks handle a multi-optimiser
    (an ``optimizers`` list); ``iterations`` counts meta steps."""

    def __init__(self, members, iterations):
        self.optimizers = members
        self.iterations = iterations
        self.built = True
        self.name = "meta_optimizers"

    def build(self, variables):  # noqa: ARG002 - built with the trainer
        return None


class FitModel:
    """The object Keras callbacks get as ``self.model`` in `MetaTrainer.fit`.

    Attribute reads that it does not define go to the trainer's Keras model (``layers``,
    ``get_weights``, ``set_weights``, ``save``, ``built``, ...), so `EarlyStopping`
    (``restore_best_weights``), `ModelCheckpoint` and `TensorBoard` histograms act on the
    meta-learned model. It adds:

    * ``optimizer``: the meta optimiser(s) the learning-rate callbacks act on. With one
      active meta optimiser (φ's ``meta_optimizer`` for warp-only trainers, θ0's
      ``init_optimizer`` for Leap / MAML / Reptile) it is that optimiser, and its rate is
      logged as ``learning_rate``; when both φ and θ0 are meta-learned it holds both, named
      ``meta_optimizer`` and ``init_optimizer`` (logged as ``learning_rate_meta_optimizer``
      and ``learning_rate_init_optimizer``), and `ReduceLROnPlateau` /
      `LearningRateScheduler` change both;
    * ``stop_training``: set it to end `fit` after the current meta step;
    * ``save_weights(path)`` / ``load_weights(path)``: the model's weights (a Keras
      ``.weights.h5`` file that ``model.load_weights`` reads as usual) plus the trainer's
      own state (optimiser slots, meta step, inner learning rate and momentum, counters) in
      ``path + ".trainer.npz"``, so `BackupAndRestore` resumes a run exactly.
    """

    def __init__(self, trainer):
        self.__dict__["_trainer"] = trainer
        self.__dict__["_model"] = trainer.model
        self.stop_training = False
        self.history = None
        self._initial_epoch = None
        self._state_loaded = False
        self.optimizer = trainer._callback_optimizer()

    def __getattr__(self, name):
        return getattr(self.__dict__["_model"], name)

    @property
    def metrics(self):
        """Which way each logged value improves, for ``mode="auto"`` of `EarlyStopping`,
        `ModelCheckpoint` and `ReduceLROnPlateau`: ``loss``, ``meta_loss`` and ``auc`` (the
        area under the training-error curve) down, ``accuracy`` up."""
        try:
            # Keras reads the direction of ``mode="auto"`` from these private pieces and
            # has no public way to declare it; without them (another Keras), Keras asks
            # for mode="min" / "max" by name instead of guessing.
            from keras.src.trainers.compile_utils import MetricsList
        except ImportError:
            return []
        tracked = []
        for name, direction in (
            ("loss", "down"),
            ("meta_loss", "down"),
            ("auc", "down"),
            ("accuracy", "up"),
        ):
            metric = keras.metrics.Mean(name=name)
            metric._direction = direction
            tracked.append(metric)
        return [MetricsList(tracked)]

    @property
    def model(self):
        """The trainer's Keras model."""
        return self._model

    @property
    def trainer(self):
        """The `MetaTrainer` being fitted."""
        return self._trainer

    def save_weights(self, filepath, overwrite=True, **kwargs):
        self._model.save_weights(filepath, overwrite=overwrite, **kwargs)
        values = {
            f"v{i}": np.asarray(v.numpy())
            for i, (_, v) in enumerate(self._trainer._trainer_state_named())
        }
        values["keys"] = np.asarray([k for k, _ in self._trainer._trainer_state_named()])
        tmp = f"{filepath}.trainer.tmp.npz"
        np.savez(tmp, **values)
        os.replace(tmp, f"{filepath}.trainer.npz")

    def load_weights(self, filepath, **kwargs):
        self._model.load_weights(filepath, **kwargs)
        extra = f"{filepath}.trainer.npz"
        if not os.path.exists(extra):
            return
        named = self._trainer._trainer_state_named()
        with np.load(extra) as data:
            if "keys" in data.files:  # values matched by name (optimiser slots: by variable)
                stored = {str(k): data[f"v{i}"] for i, k in enumerate(data["keys"])}
                missing = sorted({k for k, _ in named} ^ set(stored))
                if missing:
                    raise CheckpointError(
                        f"'{extra}' was written by a differently configured trainer: "
                        f"{', '.join(missing[:5])} {'are' if len(missing) > 1 else 'is'} in "
                        "one of them only."
                    )
                values = [stored[k] for k, _ in named]
            else:  # written before values were named: by position
                values = [data[f"v{i}"] for i in range(len(data.files))]
                if len(values) != len(named):
                    raise CheckpointError(
                        f"'{extra}' holds {len(values)} trainer values, this trainer has "
                        f"{len(named)}: it was written by a differently configured trainer."
                    )
            for (key, v), value in zip(named, values):
                if tuple(v.shape) != tuple(np.shape(value)):
                    raise CheckpointError(
                        f"'{extra}': '{key}' has shape {np.shape(value)}, this trainer's "
                        f"{tuple(v.shape)}: written by a differently configured trainer."
                    )
                v.assign(value)
        self._state_loaded = True


# ----------------------------------------------------------------------------------------
# History and progress output
def _append(table, n, logs):
    """Appends `logs` as row `n` of ``{key: [values]}``, NaN where a key has no value."""
    for key, value in logs.items():
        if key not in table:
            table[key] = [math.nan] * n
        table[key].append(value)
    for values in table.values():
        if len(values) == n:
            values.append(math.nan)


class MetaHistory(keras.callbacks.History):
    """`keras.callbacks.History` with one entry per epoch for every key: a value missing
    at an epoch (a key that appears later, or validation between validations) is NaN.

    It also keeps every meta step's own logs (not the epoch's running means), whatever
    ``steps_per_epoch`` is: ``step_history[key]`` has one value per meta step run (NaN
    where a step has none) and ``steps`` lists those meta steps (0-based). Without
    ``steps_per_epoch`` they equal ``history`` and ``epoch`` but for the ``val_*`` keys.

    Attributes:
        step_history: dict of lists, ``{key: [value per meta step]}``.
        steps: list of int, the meta steps run.
    """

    def __init__(self):
        super().__init__()
        self.step_history, self.steps = {}, []

    def on_epoch_end(self, epoch, logs=None):
        _append(self.history, len(self.epoch), dict(logs or {}))
        self.epoch.append(epoch)

    def record_step(self, step, logs):
        """Records meta step `step`'s own logs (called by `fit`)."""
        _append(self.step_history, len(self.steps), dict(logs))
        self.steps.append(step)


class MetaProgbarLogger(keras.callbacks.ProgbarLogger):
    """Keras's `ProgbarLogger` (``verbose=1`` bar, ``verbose=2`` one line per epoch, in
    Keras's formats), showing the step's own values (never earlier ones: a meta step with
    no finite task shows ``nan``), without ``seconds`` and the integer counters
    (``nan_tasks``, ``diverged_tasks``, ``warp_updates``, ...), which stay in History."""

    def __init__(self):
        super().__init__()
        self.hidden = {"seconds"}  # `fit` adds the keys of integer counters

    def _shown(self, logs):
        return {k: v for k, v in (logs or {}).items() if k not in self.hidden}

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, self._shown(logs))

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, self._shown(logs))
