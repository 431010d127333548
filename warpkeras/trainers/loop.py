"""The meta-training loop: `fit`, Keras callbacks, History, progress output and checkpoints.

`TrainingLoop` is a mixin of `warpkeras.trainers.MetaTrainer` with no knowledge of the
meta-learning algorithms: it calls ``train_step(tasks, rng)`` once per meta step and
``evaluate`` for validation, and drives everything around them the way ``keras.Model.fit``
drives its epochs.

**One meta step is one Keras epoch.** For every stock callback in `keras.callbacks`:

* ``on_epoch_begin(s)`` / ``on_epoch_end(s, logs)`` run around meta step ``s`` (0-based);
* the batch hooks (``on_train_batch_begin/end``, ``on_batch_begin/end``) fire **once per
  meta step** with batch index 0 (``params["steps"] == 1``): one meta step is one batch of
  tasks, and its logs are the step's logs (so `TerminateOnNaN` sees a diverged step at once);
* ``self.model`` is a `FitModel`: it forwards to the trainer's Keras model (weights, layers,
  ``save``...) and adds what `model.fit` would provide: ``optimizer`` (the meta
  optimiser(s), see `FitModel`), ``stop_training`` and whole-trainer ``save_weights`` /
  ``load_weights`` for `BackupAndRestore`.

Checkpoints are `tf.train.Checkpoint`s of everything a resumed run needs (θ0, φ, optimiser
slots, the meta step, the inner learning rate and momentum, counters). Resuming reads the
newest checkpoint that can be read: a damaged ``checkpoint`` state file or a damaged
``.index`` / ``.data`` file makes it fall back to an older intact checkpoint with a warning
that names the file, and intact checkpoints are never deleted or overwritten because of it.
"""

import math
import os
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from warpkeras.tasks import as_task_source
from warpkeras.trainers.checkpoints import (_CHECKPOINT_NAME, _STATE_FILE,
                                            CheckpointError, CheckpointWarning,
                                            _checkpoint_files, _first_line,
                                            _state_file_problem, _unreadable_file,
                                            remove_checkpoint_leftovers)
from warpkeras.trainers.fitmodel import (FitModel, MetaHistory, MetaProgbarLogger,
                                         _MetaOptimizers, _NamedOptimizer)

__all__ = ["TrainingLoop", "FitModel", "CheckpointWarning", "CheckpointError"]

def _resolve_epochs(epochs, meta_steps):
    if epochs is not None and meta_steps is not None and epochs != meta_steps:
        raise TypeError(
            f"fit got epochs={epochs!r} and meta_steps={meta_steps!r}: they are the same "
            "argument (the meta step to train up to); pass one of them.")
    value = epochs if epochs is not None else meta_steps
    if value is None:
        raise TypeError("fit needs epochs= (or its alias meta_steps=): the meta step to train "
                        "up to, e.g. fit(tasks, epochs=100).")
    return _count("epochs" if epochs is not None else "meta_steps", value)


def _count(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"fit: {name} must be an integer, got {value!r} "
                        f"({type(value).__name__}); e.g. {name}=10.")
    if value < minimum:
        raise ValueError(f"fit: {name} must be >= {minimum}, got {value}.")
    return int(value)


def _flat_variables(item):
    """The variables of a checkpoint item: an optimiser's (its slots and counters), those
    of a list / tuple / dict of items, a module's ``variables``, or the item itself."""
    if isinstance(item, keras.optimizers.Optimizer):
        return list(item.variables)
    if isinstance(item, (list, tuple)):
        return [v for i in item for v in _flat_variables(i)]
    if isinstance(item, dict):
        return [v for k in sorted(item) for v in _flat_variables(item[k])]
    if isinstance(item, (tf.Variable, keras.Variable)):
        return [item]
    if hasattr(item, "variables"):
        return list(item.variables)
    return [item]


class TrainingLoop:
    """The `fit` / `restore` half of `MetaTrainer` (see the module docstring).

    Needs from the class it is mixed into: ``model``, ``step`` (an int64 `tf.Variable`, the
    meta step reached), ``seed``, ``meta_batch_size``, ``accuracy``, ``buffer``,
    ``train_step(tasks, rng) -> logs``, ``evaluate(tasks, steps, verbose) -> report``,
    ``_checkpoint_items() -> dict`` of the trackables a checkpoint holds, ``objectives``
    (each with ``optimizer_name``, ``optimizer``, ``variables(trainer)``),
    ``meta_optimizer`` and ``_reports_accuracy()``.
    """

    # ------------------------------------------------------------------------------------
    # state
    def _checkpoint(self):
        """A `tf.train.Checkpoint` of everything a resumed run needs."""
        return tf.train.Checkpoint(**self._checkpoint_items())

    def _trainer_state_variables(self):
        """The trainer's variables outside the model (optimiser slots, counters), in a fixed
        order (`FitModel.save_weights`)."""
        items = self._checkpoint_items()
        out, seen = [], set()
        for key in sorted(items):
            if key == "model":
                continue
            for v in _flat_variables(items[key]):
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
        return out

    def _callback_optimizer(self):
        """What Keras callbacks see as ``model.optimizer`` (see `FitModel`)."""
        members = []
        for name, optimizer, _ in self._meta_optimizer_variables():
            if all(o is not optimizer for _, o in members):
                members.append((name, optimizer))
        if not members:
            return self.meta_optimizer
        if len(members) == 1:
            return members[0][1]
        return _MetaOptimizers([_NamedOptimizer(n, o) for n, o in members], self.step)

    def _find_readable_checkpoint(self, directory):
        """The prefix of the newest readable checkpoint in `directory` (None if it holds
        none), warning about every damaged file passed over; repairs the state file when it
        was damaged or named a damaged checkpoint."""
        if not os.path.isdir(directory):
            return None
        problem = _state_file_problem(directory)
        state_path = os.path.join(directory, _STATE_FILE)
        if problem is not None:
            warnings.warn(
                f"Checkpoint state file '{state_path}' cannot be used ({problem}); resuming "
                "from the newest readable checkpoint in the folder instead.",
                CheckpointWarning, stacklevel=3)
        files = _checkpoint_files(directory)
        chosen, readable, damaged = None, [], []
        for number in sorted(files, reverse=True):
            bad = _unreadable_file(directory, number, files[number])
            if bad is None:
                readable.append(number)
                chosen = chosen if chosen is not None else number
            else:
                damaged.append((number, bad))
        for number, (path, why) in damaged:
            newer_ok = chosen is not None and chosen > number
            if newer_ok:
                warnings.warn(
                    f"Checkpoint file '{path}' cannot be read ({why}); a newer checkpoint "
                    "is used, so this one is ignored.", CheckpointWarning, stacklevel=3)
            elif chosen is not None:
                warnings.warn(
                    f"Checkpoint file '{path}' cannot be read ({why}); falling back to the "
                    f"older checkpoint '{_CHECKPOINT_NAME}-{chosen}'.",
                    CheckpointWarning, stacklevel=3)
        if chosen is None:
            if damaged:
                listing = "; ".join(f"'{p}': {w}" for _, (p, w) in damaged)
                raise CheckpointError(
                    f"No checkpoint in '{directory}' can be read ({listing}). Nothing was "
                    "overwritten: move the folder away to start afresh, or repair it.")
            return None
        state = None if problem is not None else tf.train.get_checkpoint_state(directory)
        named = os.path.basename(state.model_checkpoint_path) if state else None
        if problem is not None or damaged or named != f"{_CHECKPOINT_NAME}-{chosen}":
            # the CheckpointManager rotates what the state file lists: list exactly the
            # readable checkpoints, so that none of them is lost by rotation (also when a
            # run was killed after writing a checkpoint, before recording it)
            tf.compat.v1.train.update_checkpoint_state(
                directory, f"{_CHECKPOINT_NAME}-{chosen}",
                all_model_checkpoint_paths=[f"{_CHECKPOINT_NAME}-{n}" for n in sorted(readable)])
        return os.path.join(directory, f"{_CHECKPOINT_NAME}-{chosen}")

    def restore(self, checkpoint_dir):
        """Restores the newest readable checkpoint in `checkpoint_dir`.

        A damaged ``checkpoint`` state file, or a missing, empty, truncated or corrupt
        ``.index`` / ``.data`` file, makes it use the newest intact checkpoint instead, with a
        `CheckpointWarning` naming the file (nothing is deleted).

        Args:
            checkpoint_dir: a folder written by ``fit(checkpoint_dir=...)``.

        Returns:
            The meta step reached (an int; 0 when the folder holds no checkpoint).

        Raises:
            CheckpointError: checkpoints exist but none can be read, or the newest readable
                one was written for another model or trainer configuration.
        """
        self._restore_newest(checkpoint_dir)
        return int(self.step.numpy())

    def _restore_newest(self, checkpoint_dir):
        """`restore`; returns the prefix restored, or None."""
        prefix = self._find_readable_checkpoint(checkpoint_dir)
        if prefix is None:
            return None
        try:
            status = self._checkpoint().restore(prefix)
            status.assert_existing_objects_matched()
            status.expect_partial()  # e.g. the manager's save counter, not ours to restore
        except (AssertionError, ValueError) as e:
            raise CheckpointError(
                f"Checkpoint '{prefix}' does not match this trainer and model (written by "
                f"another configuration?): {_first_line(e)}") from e
        return prefix

    # ------------------------------------------------------------------------------------
    # the loop
    def fit(
        self,
        tasks,
        epochs=None,
        callbacks=None,
        verbose=1,
        log_dir=None,
        checkpoint_dir=None,
        checkpoint_every=1,
        max_checkpoints=3,
        validation_tasks=None,
        validation_freq=10,
        validation_steps=None,
        *,
        meta_steps=None,
        initial_epoch=None,
        validation_data=None,
    ):
        """Meta-trains up to meta step `epochs`, the way ``keras.Model.fit`` trains epochs.

        One meta step (a meta-batch of tasks adapted and one meta-update) is one Keras epoch
        and one batch: every callback in `keras.callbacks` works as in ``model.fit`` (see
        `warpkeras.trainers.loop`; README section "`fit` and Keras" maps the arguments).

        Args:
            tasks: a task source (list of `warpkeras.Task`, a `warpkeras.TaskSampler`, a
                callable ``rng -> Task`` or an iterator of tasks).
            epochs: int, the meta step to train up to (as Keras's ``epochs``: a total, so a
                resumed or repeated call continues up to it). Alias: ``meta_steps``.
            callbacks: Keras callbacks (`keras.callbacks.*` or your own).
            verbose: ``0`` silent, ``1`` (or ``"auto"``) Keras's progress bar, ``2`` one
                line per meta step, in Keras's formats.
            log_dir: shorthand for ``callbacks=[keras.callbacks.TensorBoard(log_dir)]``
                (tags ``epoch_loss``, ``epoch_learning_rate``, ... under ``train/`` and
                ``validation/``, step = meta step index).
            checkpoint_dir: keep `tf.train.Checkpoint`s (θ0, φ, optimiser slots, meta step)
                here and resume from the newest readable one.
            checkpoint_every: meta steps between checkpoints (and one at the end).
            max_checkpoints: checkpoints kept.
            validation_tasks: held-out tasks to `evaluate` every `validation_freq` meta
                steps and at the last one; adds ``val_loss``, ``val_accuracy``, ``val_auc``.
                Alias: ``validation_data``.
            validation_freq: int, meta steps between validations.
            validation_steps: adaptation steps per validation task (default
                `inner_steps`).
            meta_steps: the former name of `epochs`.
            initial_epoch: int, the meta step to start at (default: the trainer's current
                meta step, i.e. where the last `fit` or the newest checkpoint ended; a
                checkpoint found in `checkpoint_dir` or by `BackupAndRestore` takes
                precedence, as in Keras).
            validation_data: Keras's name of `validation_tasks`.

        Returns:
            A `keras.callbacks.History`: ``history.history[key]`` has one value per meta
            step run (NaN where a key has no value, e.g. ``loss`` of a step whose tasks all
            diverged, ``val_*`` between validations); ``history.params`` is Keras's
            ``{"verbose", "epochs", "steps"}``.

        Raises:
            TypeError: `epochs` and `meta_steps` (or `validation_data` and
                `validation_tasks`) disagree, or an argument has the wrong type.
            ValueError: a negative count.
            CheckpointError: see `restore`.
        """
        epochs = _resolve_epochs(epochs, meta_steps)
        if validation_data is not None and validation_tasks is not None \
                and validation_data is not validation_tasks:
            raise TypeError("fit got validation_data and validation_tasks: they are the same "
                            "argument (held-out tasks); pass one of them.")
        validation = validation_data if validation_data is not None else validation_tasks
        if verbose == "auto":
            verbose = 1
        if verbose not in (0, 1, 2):
            raise ValueError(f"fit: verbose must be 0, 1, 2 or 'auto', got {verbose!r}.")
        validation_freq = _count("validation_freq", validation_freq, 1)
        checkpoint_every = _count("checkpoint_every", checkpoint_every, 1)
        max_checkpoints = _count("max_checkpoints", max_checkpoints, 1)
        if initial_epoch is not None:
            initial_epoch = _count("initial_epoch", initial_epoch)
        if validation_steps is not None:
            validation_steps = _count("validation_steps", validation_steps, 1)
        source = as_task_source(tasks)

        if self.buffer is not None and hasattr(self.buffer, "remove_stale_spills"):
            self.buffer.remove_stale_spills()
        manager = None
        if initial_epoch is not None:
            self.step.assign(initial_epoch)
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
            remove_checkpoint_leftovers(checkpoint_dir)
            restored = self._restore_newest(checkpoint_dir)
            manager = tf.train.CheckpointManager(
                self._checkpoint(), checkpoint_dir, max_to_keep=max_checkpoints,
                checkpoint_name=_CHECKPOINT_NAME)
            if restored is not None and verbose:
                keras.utils.io_utils.print_msg(
                    f"Resumed from {restored} at meta step {int(self.step.numpy())}.")

        fit_model = FitModel(self)
        callbacks = list(callbacks or [])
        if log_dir is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir))
        if not any(isinstance(c, keras.callbacks.History) for c in callbacks):
            callbacks.append(MetaHistory())
        if verbose and not any(isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks):
            callbacks.append(MetaProgbarLogger())
        cb = keras.callbacks.CallbackList(
            callbacks, add_history=False, add_progbar=False, model=fit_model,
            verbose=verbose, epochs=epochs, steps=1)
        history = cb._history

        self.stop_training = False
        cb.on_train_begin()
        if fit_model._initial_epoch is not None and not fit_model._state_loaded:
            # BackupAndRestore of weights only; with the trainer's state, its meta step is
            # exact (also for a backup taken at a batch, i.e. after a whole meta step)
            self.step.assign(int(fit_model._initial_epoch))
        start = int(self.step.numpy())
        expected = set(self._expected_log_keys())
        progbars = [c for c in cb.callbacks if isinstance(c, MetaProgbarLogger)]
        epoch_logs = None
        for s in range(start, epochs):
            cb.on_epoch_begin(s)
            rng = np.random.default_rng([self.seed, s])
            try:
                batch = source.sample(rng, self.meta_batch_size)
            except StopIteration:
                break
            cb.on_train_batch_begin(0)
            step_start = time.time()
            logs = dict(self.train_step(batch, rng))
            logs["seconds"] = time.time() - step_start
            # a key with no value this step (no finite task) is NaN, never left out or stale
            expected.update(k for k in logs)
            for bar in progbars:
                bar.hidden.update(k for k, v in logs.items()
                                  if isinstance(v, (int, np.integer)) and not isinstance(v, bool))
            for key in expected:
                logs.setdefault(key, math.nan)
            self.step.assign(s + 1)
            cb.on_train_batch_end(0, dict(logs))
            epoch_logs = dict(logs)
            if validation is not None and ((s + 1) % validation_freq == 0 or s + 1 == epochs):
                epoch_logs.update(self._validate(cb, validation, validation_steps))
            if manager is not None and ((s + 1) % checkpoint_every == 0 or s + 1 == epochs):
                manager.save(checkpoint_number=s + 1)
            cb.on_epoch_end(s, epoch_logs)
            if fit_model.stop_training or self.stop_training:
                break
        # as `model.fit`: optimisers with `use_ema=True` leave their moving averages
        if epoch_logs is not None:
            for _, optimizer, variables in self._meta_optimizer_variables():
                optimizer.finalize_variable_values(variables)
        cb.on_train_end(logs=epoch_logs)
        self.history = history
        return history

    def _validate(self, cb, validation, steps):
        """Evaluates on the validation tasks inside the test hooks (one test batch), as
        ``model.fit`` does; returns the ``val_*`` logs."""
        cb.on_test_begin()
        cb.on_test_batch_begin(0)
        report = self.evaluate(validation, steps=steps, verbose=0)
        logs = {"loss": report["final_test_loss"]["mean"]}
        if self.accuracy:
            logs["accuracy"] = report["final_test_accuracy"]["mean"]
        logs["auc"] = report["auc"]["mean"]
        cb.on_test_batch_end(0, dict(logs))
        cb.on_test_end(dict(logs))
        return {f"val_{k}": v for k, v in logs.items()}

    def _meta_optimizer_variables(self):
        """``(name, optimizer, variables)`` of the objectives' optimisers."""
        return [(o.optimizer_name, o.optimizer, o.variables(self)) for o in self.objectives
                if o.optimizer is not None and o.variables(self)]

    def _expected_log_keys(self):
        """Keys every meta step's logs carry (NaN when a step has no value for one)."""
        keys = ["loss"]
        if self._reports_accuracy():
            keys.append("accuracy")
        return keys
