"""The meta-training loop: `fit`, Keras callbacks, History, progress output and checkpoints.

`TrainingLoop` is a mixin of `warpkeras.trainers.MetaTrainer` with no knowledge of the
meta-learning algorithms: it calls ``train_step(tasks, rng)`` once per meta step and
``evaluate`` for validation, and drives everything around them the way ``keras.Model.fit``
drives its epochs.

**One meta step is one Keras batch; an epoch is ``steps_per_epoch`` of them** (default one,
so that without it a meta step is an epoch). For every stock callback in `keras.callbacks`:

* ``on_epoch_begin(e)`` / ``on_epoch_end(e, logs)`` run around epoch ``e`` (0-based), meta
  steps ``e * S`` to ``e * S + S - 1``; the epoch's logs are the means of its meta steps'
  logs (integer counters: their sum), and validation runs every ``validation_freq`` epochs;
* the batch hooks (``on_train_batch_begin/end``, ``on_batch_begin/end``) fire **once per
  meta step** with its index in the epoch (``params["steps"] == S``), with Keras's batch
  logs: running means since the epoch began (without ``steps_per_epoch``, the step's own
  logs, so `TerminateOnNaN` sees a diverged step at once; a NaN also makes the running
  mean NaN); `MetaHistory.step_history` keeps each meta step's own logs;
* ``self.model`` is a `FitModel`: it forwards to the trainer's Keras model (weights, layers,
  ``save``...) and adds what `model.fit` would provide: ``optimizer`` (the meta
  optimiser(s), see `FitModel`), ``stop_training`` (checked after every meta step) and
  whole-trainer ``save_weights`` / ``load_weights`` for `BackupAndRestore`.

Checkpoints are `tf.train.Checkpoint`s of everything a resumed run needs (θ0, φ, optimiser
slots, the meta step, the inner learning rate and momentum, counters), written every
``checkpoint_every`` meta steps (whatever the epoch length), after the last one and when
SIGTERM or SIGINT asks the process to stop. Resuming reads the newest checkpoint that can
be read: a damaged ``checkpoint`` state file or a damaged ``.index`` / ``.data`` file makes
it fall back to an older intact checkpoint with a warning that names the file, and intact
checkpoints are never deleted or overwritten because of it.

**Runs and their folders.** One process writes a checkpoint folder at a time (the lock file
``writer.lock`` names it; `checkpoints.FolderLock`). Every checkpoint records the run's
settings (`get_config`, the model's variables, each optimiser's class, config and slots);
a resumed run is compared with them before anything is restored or written:

* another trainer class, other objectives, other model variables, another optimiser class
  or other slots cannot continue: `CheckpointError`, naming each difference;
* another seed or configuration is another run: refused unless
  ``take_over_checkpoint_dir=True``, which moves the folder's checkpoints aside;
* changed hyperparameters (learning rates, steps, batch sizes, ``parallel``): the values
  of the resumed run win, with one `CheckpointWarning` listing each change. Values that
  training itself changed (a `LearningRateScheduler`, `ReduceLROnPlateau`) go on as
  saved when the resumed run was built as the first one.

Optimiser slots are restored by the model variable they belong to (a slot's checkpoint
key names the variable's index and the slot kind), not by their position in the
optimiser.
"""

import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from warpkeras.tasks import as_task_source
from warpkeras.trainers.checkpoints import (
    _CHECKPOINT_NAME,
    _SETTINGS_KEY,
    _STATE_FILE,
    CheckpointError,
    CheckpointLockError,
    CheckpointWarning,
    FolderLock,
    _checkpoint_files,
    _first_line,
    _state_file_problem,
    _unreadable_file,
    compare_settings,
    listed_checkpoints,
    move_aside,
    read_settings,
    remove_checkpoint_leftovers,
)
from warpkeras.trainers.fitmodel import (
    FitModel,
    MetaHistory,
    MetaProgbarLogger,
    _MetaOptimizers,
    _NamedOptimizer,
)

__all__ = [
    "TrainingLoop",
    "FitModel",
    "CheckpointWarning",
    "CheckpointError",
    "CheckpointLockError",
    "TasksExhaustedError",
]


class TasksExhaustedError(RuntimeError):
    """The task source of `fit` ran out of tasks before `epochs` was reached."""


def _print(message):
    """Prints a line the way Keras's progress output does (to stdout, or to the absl log
    when `keras.config.disable_interactive_logging()` is in effect)."""
    if keras.config.is_interactive_logging_enabled():
        sys.stdout.write(message + "\n")
        sys.stdout.flush()
    else:
        import absl.logging

        absl.logging.info(message)


def _is_count(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class _RunningLogs:
    """Running values of an epoch's logs: floats averaged over its meta steps (NaN
    propagates, as Keras's metrics), integer counters summed (``nan_tasks``, a running
    total, keeps its last value)."""

    def __init__(self):
        self.count, self.sums, self.last = 0, {}, {}

    def add(self, logs):
        self.count += 1
        for key, value in logs.items():
            self.last[key] = value
            self.sums[key] = self.sums.get(key, 0) + value

    def value(self):
        out = {}
        for key, value in self.last.items():
            if (
                key == "nan_tasks"
                or not isinstance(value, (int, float, np.number))
                or isinstance(value, bool)
            ):
                out[key] = value
            elif _is_count(value):
                out[key] = int(self.sums[key])
            else:
                out[key] = float(self.sums[key]) / self.count
        return out


class _Preempted(Exception):
    """Raised inside `fit` after the checkpoint of a signalled run is written."""


class _StopSignals:
    """SIGTERM and SIGINT during `fit` with a `checkpoint_dir`: the first one lets the
    current meta step finish, `fit` writes its checkpoint and then the signal takes its
    usual course (`deliver`: the previous handler, by default the end of the process with
    the signal's status; SIGINT: `KeyboardInterrupt`). A second signal abandons the step
    at once (nothing is written mid-step). Outside the main thread nothing is installed.

    TensorFlow's `tf.distribute.experimental.PreemptionCheckpointHandler` does this for
    multi-worker clusters (it needs a cluster resolver, watches SIGTERM only and exits
    with its own code); a trainer runs in one process, so this keeps the standard
    `signal` handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.received is not None:  # a second signal: abandon the step
            self.restore()
            self.received = None
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.received = signum

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def deliver(self):
        signum, self.received = self.received, None
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if signum is not None:
            signal.raise_signal(signum)


def _resolve_epochs(epochs, meta_steps):
    if epochs is not None and meta_steps is not None and epochs != meta_steps:
        raise TypeError(
            f"fit got epochs={epochs!r} and meta_steps={meta_steps!r}: they are the same "
            "argument (the meta step to train up to); pass one of them."
        )
    value = epochs if epochs is not None else meta_steps
    if value is None:
        raise TypeError(
            "fit needs epochs= (or its alias meta_steps=): the meta step to train "
            "up to, e.g. fit(tasks, epochs=100)."
        )
    return _count("epochs" if epochs is not None else "meta_steps", value)


def _count(name, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"fit: {name} must be an integer, got {value!r} "
            f"({type(value).__name__}); e.g. {name}=10."
        )
    if value < minimum:
        raise ValueError(f"fit: {name} must be >= {minimum}, got {value}.")
    return int(value)


def _variable_key(path):
    """A model variable's path without the numbers Keras appends to automatic names
    (``sequential_3/dense_7/kernel`` -> ``sequential/dense/kernel``): the same for two
    instances of one architecture."""
    return "/".join(re.sub(r"_\d+$", "", part) for part in path.split("/"))


def _slot_keys(optimizer, model):
    """Names of an optimiser's variables that two instances of one trainer share: a slot
    is named by the index of the model variable it belongs to and its kind
    (``variable_3:momentum``), other variables by their name (``iteration``)."""
    prefix = optimizer.name + "/"
    refs = {}
    for i, v in enumerate(model.variables):
        refs.setdefault(v.path.replace("/", "_"), i)
    keys = []
    for v in optimizer.variables:
        rest = v.path[len(prefix) :] if v.path.startswith(prefix) else v.path
        cut = rest.rfind("_")
        while cut > 0:  # the longest variable path the slot name starts with
            if rest[:cut] in refs:
                rest = f"variable_{refs[rest[:cut]]}:{rest[cut + 1 :]}"
                break
            cut = rest.rfind("_", 0, cut)
        keys.append(rest.replace("/", "|"))
    return keys


def _by_variable(optimizer, model):
    """An optimiser's variables keyed by `_slot_keys` (None when two share a key)."""
    keyed = dict(zip(_slot_keys(optimizer, model), optimizer.variables))
    return keyed if len(keyed) == len(optimizer.variables) else None


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
    def _checkpoint(self, for_saving=False, by_variable=False):
        """A `tf.train.Checkpoint` of everything a resumed run needs.

        For saving, it also holds the run's settings (`_run_settings`, a string) and each
        optimiser's variables a second time, keyed by their paths (``<item>_by_variable``),
        so that a resumed run matches slots to variables by name. `by_variable`: restore
        the optimisers through those keys instead of by position."""
        items = dict(self._checkpoint_items())
        optimizers = {k: v for k, v in items.items() if isinstance(v, keras.optimizers.Optimizer)}
        keyed = {k: _by_variable(o, self.model) for k, o in optimizers.items()}
        if for_saving:
            if not hasattr(self, "_settings_variable"):
                with tf.init_scope():
                    self._settings_variable = tf.Variable("", dtype=tf.string, trainable=False)
            items[_SETTINGS_KEY] = self._settings_variable
            items.update({f"{k}_by_variable": d for k, d in keyed.items() if d is not None})
        elif by_variable:
            for k, d in keyed.items():
                if d is not None:
                    del items[k]
                    items[f"{k}_by_variable"] = d
        return tf.train.Checkpoint(**items)

    def _run_settings(self):
        """What a checkpoint records of the run that wrote it: ``config`` (`get_config`),
        ``variables`` (the model's variable paths and shapes) and ``optimizers`` (per
        checkpoint item: class, config, variable paths and shapes)."""
        optimizers = {}
        for key, item in self._checkpoint_items().items():
            if isinstance(item, keras.optimizers.Optimizer):
                optimizers[key] = {
                    "class": type(item).__name__,
                    "config": item.get_config(),
                    "variables": [
                        [k, list(v.shape)]
                        for k, v in zip(_slot_keys(item, self.model), item.variables)
                    ],
                }
        settings = {
            "format": 1,
            "config": self.get_config(),
            "variables": [
                [f"{i}:{_variable_key(v.path)}", list(v.shape)]
                for i, v in enumerate(self.model.variables)
            ],
            "optimizers": optimizers,
        }
        return json.loads(json.dumps(settings, default=repr))

    def _trainer_state_variables(self):
        """The trainer's variables outside the model (optimiser slots, counters), in a fixed
        order (`FitModel.save_weights`)."""
        return [v for _, v in self._trainer_state_named()]

    def _trainer_state_named(self):
        """``[(key, variable)]`` of `_trainer_state_variables`: an optimiser's variables
        keyed ``<item>/<slot key>`` (`_slot_keys`: by the model variable a slot belongs
        to), the others ``<item>/<index>``."""
        items = self._checkpoint_items()
        out, seen = [], set()
        for key in sorted(items):
            if key == "model":
                continue
            item = items[key]
            keyed = (
                _by_variable(item, self.model)
                if isinstance(item, keras.optimizers.Optimizer)
                else None
            )
            pairs = (
                list(keyed.items()) if keyed is not None else list(enumerate(_flat_variables(item)))
            )
            for name, v in pairs:
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append((f"{key}/{name}", v))
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

    def _find_readable_checkpoint(self, directory, stacklevel=3):
        """The prefix of the newest readable checkpoint in `directory` (None if it holds
        none), warning about every damaged file passed over; repairs the state file when it
        was damaged or named a damaged checkpoint."""
        if not os.path.isdir(directory):
            return None
        problem = _state_file_problem(directory)
        state_path = os.path.join(directory, _STATE_FILE)
        files = _checkpoint_files(directory)
        if problem is not None and files:
            warnings.warn(
                f"Checkpoint state file '{state_path}' cannot be used ({problem}); resuming "
                "from the newest readable checkpoint in the folder instead.",
                CheckpointWarning,
                stacklevel=stacklevel,
            )
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
                    "is used, so this one is ignored.",
                    CheckpointWarning,
                    stacklevel=stacklevel,
                )
            elif chosen is not None:
                warnings.warn(
                    f"Checkpoint file '{path}' cannot be read ({why}); falling back to the "
                    f"older checkpoint '{_CHECKPOINT_NAME}-{chosen}'.",
                    CheckpointWarning,
                    stacklevel=stacklevel,
                )
        if chosen is None:
            if damaged:
                listing = "; ".join(f"'{p}': {w}" for _, (p, w) in damaged)
                raise CheckpointError(
                    f"No checkpoint in '{directory}' can be read ({listing}). Nothing was "
                    "overwritten: move the folder away to start afresh, or repair it."
                )
            return None
        state = None if problem is not None else tf.train.get_checkpoint_state(directory)
        named = os.path.basename(state.model_checkpoint_path) if state else None
        if problem is not None or damaged or named != f"{_CHECKPOINT_NAME}-{chosen}":
            # the CheckpointManager rotates what the state file lists: list exactly the
            # readable checkpoints, so that none of them is lost by rotation (also when a
            # run was killed after writing a checkpoint, before recording it)
            tf.compat.v1.train.update_checkpoint_state(
                directory,
                f"{_CHECKPOINT_NAME}-{chosen}",
                all_model_checkpoint_paths=[f"{_CHECKPOINT_NAME}-{n}" for n in sorted(readable)],
            )
        return os.path.join(directory, f"{_CHECKPOINT_NAME}-{chosen}")

    def restore(self, checkpoint_dir):
        """Restores the newest readable checkpoint in `checkpoint_dir`.

        A damaged ``checkpoint`` state file, or a missing, empty, truncated or corrupt
        ``.index`` / ``.data`` file, makes it use the newest intact checkpoint instead, with a
        `CheckpointWarning` naming the file (nothing is deleted). Values are restored as
        saved (the settings of `fit`'s resume do not apply).

        Args:
            checkpoint_dir: a folder written by ``fit(checkpoint_dir=...)``.

        Returns:
            The meta step reached (an int; 0 when the folder holds no checkpoint).

        Raises:
            CheckpointError: checkpoints exist but none can be read, or the newest readable
                one was written for another model, trainer class, objectives or optimiser
                class (named in the message).
        """
        prefix = self._find_readable_checkpoint(checkpoint_dir)
        if prefix is not None:
            recorded = read_settings(prefix)
            if recorded is not None:
                refused, _, _ = compare_settings(recorded, self._run_settings())
                self._refuse(prefix, refused)
            self._restore_prefix(prefix, recorded)
        return int(self.step.numpy())

    @staticmethod
    def _refuse(prefix, refused):
        if refused:
            raise CheckpointError(
                f"Checkpoint '{prefix}' cannot be continued by this trainer: "
                f"{'; '.join(refused)}. Nothing was written: use another checkpoint_dir for "
                "this configuration."
            )

    def _restore_prefix(self, prefix, recorded):
        by_variable = recorded is not None and all(
            o.get("by_variable", True) for o in recorded.get("optimizers", {}).values()
        )
        try:
            status = self._checkpoint(by_variable=by_variable).restore(prefix)
            status.assert_existing_objects_matched()
            status.expect_partial()  # e.g. the manager's save counter, not ours to restore
        except (AssertionError, ValueError) as e:
            raise CheckpointError(
                f"Checkpoint '{prefix}' does not match this trainer and model (written by "
                f"another configuration?): {_first_line(e)}"
            ) from e

    def _resume(self, directory, take_over):
        """`fit`'s resume from `directory` (locked by this run): refuses what cannot
        continue, refuses another run's folder unless `take_over` (then moves its
        checkpoints aside), restores, and lets this run's hyperparameters win with one
        warning. Returns the prefix restored, or None."""
        passed = self._passed_settings = self._run_settings()
        prefix = self._find_readable_checkpoint(directory, stacklevel=4)
        if prefix is None:
            listed = listed_checkpoints(directory)
            if listed:
                where = ", ".join(f"'{os.path.join(directory, n)}'" for n in listed)
                warnings.warn(
                    f"Checkpoint state file '{os.path.join(directory, _STATE_FILE)}' lists "
                    f"{where}, but none of them is in the folder.",
                    CheckpointWarning,
                    stacklevel=3,
                )
                if not take_over:
                    raise CheckpointError(
                        f"Every checkpoint listed in '{directory}' is missing ({where}): "
                        "resuming is impossible. Restore the files, or pass "
                        "take_over_checkpoint_dir=True to start afresh in this folder "
                        "(the state file is moved aside, nothing is deleted)."
                    )
                aside = move_aside(directory)
                warnings.warn(
                    f"Starting afresh in '{directory}'; its state file was moved to '{aside}'.",
                    CheckpointWarning,
                    stacklevel=3,
                )
            return None
        recorded = read_settings(prefix)
        if recorded is None:  # written before settings were recorded
            self._restore_prefix(prefix, None)
            return prefix
        refused, identity, changed = compare_settings(recorded, passed)
        self._refuse(prefix, refused)
        if identity:
            if not take_over:
                raise CheckpointError(
                    f"Checkpoint folder '{directory}' belongs to another run: "
                    f"{'; '.join(identity)}. Nothing was written. Use another "
                    "checkpoint_dir, build the trainer as that run was, or pass "
                    "take_over_checkpoint_dir=True to move its checkpoints aside "
                    "(nothing is deleted) and start this run afresh there."
                )
            aside = move_aside(directory)
            warnings.warn(
                f"Checkpoint folder '{directory}' belonged to another run "
                f"({'; '.join(identity)}); its checkpoints were moved to '{aside}' and this "
                "run starts afresh (take_over_checkpoint_dir=True).",
                CheckpointWarning,
                stacklevel=3,
            )
            return None
        # a value the user passed wins where it differs from what the earlier run was
        # given (values that training itself changed, e.g. by ReduceLROnPlateau, go on)
        given = recorded.get("passed")
        if given is not None:
            _, _, by_user = compare_settings(given, passed)
            keys = {c.split(":")[0] for c in by_user}
            changed = [c for c in changed if c.split(":")[0] in keys]
        values = self._hyperparameter_values()
        self._restore_prefix(prefix, recorded)
        if changed:
            for key in {c.split(":")[0] for c in changed}:
                if key in values:
                    values[key]()
            warnings.warn(
                f"Resuming '{prefix}' with changed settings; the values of this run are "
                f"used: {'; '.join(changed)}.",
                CheckpointWarning,
                stacklevel=3,
            )
        return prefix

    def _save_checkpoint(self, manager, number):
        """Writes checkpoint `number` with this run's settings."""
        settings = dict(self._run_settings(), passed=getattr(self, "_passed_settings", None))
        self._settings_variable.assign(json.dumps(settings, default=repr))
        manager.save(checkpoint_number=number)

    def _hyperparameter_values(self):
        """``{settings key: setter}`` putting this run's restorable hyperparameters (the
        inner learning rate and momentum, the optimisers' learning rates) back after a
        restore."""
        setters = {}
        lr, mu = float(self.inner_lr.numpy()), float(self.inner_mu.numpy())
        setters["inner_learning_rate"] = lambda: self.inner_lr.assign(lr)
        setters["inner_momentum"] = lambda: self.inner_mu.assign(mu)
        for key, item in self._checkpoint_items().items():
            if isinstance(item, keras.optimizers.Optimizer):
                rate = item.get_config().get("learning_rate")
                if isinstance(rate, (int, float)):
                    setters[f"{key}.learning_rate"] = lambda o=item, r=rate: setattr(
                        o, "learning_rate", r
                    )
        return setters

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
        steps_per_epoch=None,
        meta_steps=None,
        initial_epoch=None,
        validation_data=None,
        take_over_checkpoint_dir=False,
        stop_when_tasks_end=False,
    ):
        """Meta-trains for `epochs` epochs, the way ``keras.Model.fit`` trains epochs.

        One meta step (a meta-batch of tasks adapted and one meta-update) is one Keras
        batch. An epoch is `steps_per_epoch` meta steps; by default (`None`) one, so that
        `epochs` counts meta steps. Every callback in `keras.callbacks` works as in
        ``model.fit`` (see `warpkeras.trainers.loop`; README section "`fit` and Keras" maps
        the arguments).

        Args:
            tasks: a task source (list of `warpkeras.Task`, a `warpkeras.TaskSampler`, a
                callable ``rng -> Task`` or an iterator of tasks).
            epochs: int, the epoch to train up to (as Keras's ``epochs``: a total, so a
                resumed or repeated call continues up to it): ``epochs * steps_per_epoch``
                meta steps in all. Alias: ``meta_steps``.
            callbacks: Keras callbacks (`keras.callbacks.*` or your own).
            verbose: ``0`` silent, ``1`` (or ``"auto"``) Keras's progress bar (one per
                epoch), ``2`` one line per epoch, in Keras's formats.
            log_dir: shorthand for ``callbacks=[keras.callbacks.TensorBoard(log_dir)]``
                (tags ``epoch_loss``, ``epoch_learning_rate``, ... under ``train/`` and
                ``validation/``, step = epoch index, i.e. the meta step index without
                `steps_per_epoch`).
            checkpoint_dir: keep `tf.train.Checkpoint`s (θ0, φ, optimiser slots, meta
                step, and the run's settings) here and resume from the newest readable
                one. One run at a time writes a folder (a lock file names it).
            checkpoint_every: meta steps between checkpoints (and one at the end, and one
                when the process is asked to stop by SIGTERM or SIGINT).
            max_checkpoints: checkpoints kept.
            validation_tasks: held-out tasks to `evaluate` every `validation_freq` epochs
                and at the last one; adds ``val_loss``, ``val_accuracy``, ``val_auc``.
                Alias: ``validation_data``.
            validation_freq: int, epochs between validations.
            validation_steps: adaptation steps per validation task (default
                `inner_steps`).
            steps_per_epoch: int, meta steps per epoch (default `None`: one). Each epoch
                has one progress bar of this many steps, its epoch hooks and one `History`
                entry; the batch hooks run at every meta step.
            meta_steps: the former name of `epochs`.
            initial_epoch: int, the epoch to start at (default: where the trainer's meta
                step is, i.e. where the last `fit` or the newest checkpoint ended; a
                checkpoint found in `checkpoint_dir` or by `BackupAndRestore` takes
                precedence, as in Keras).
            validation_data: Keras's name of `validation_tasks`.
            take_over_checkpoint_dir: bool. A `checkpoint_dir` whose checkpoints were
                written by another run (another seed or configuration), or whose state
                file lists checkpoints that are all missing, is refused by default; with
                `True` its checkpoints are moved into a ``superseded-<UTC time>`` folder
                inside it (nothing is deleted) and this run starts afresh there.
            stop_when_tasks_end: bool. An iterator task source that runs dry before
                `epochs` is reached raises `TasksExhaustedError` (default); with `True`
                `fit` ends there with a `RuntimeWarning` naming the meta step reached.

        Returns:
            A `keras.callbacks.History`: ``history.history[key]`` has one value per epoch
            run (NaN where a key has no value, e.g. ``loss`` of a step whose tasks all
            diverged, ``val_*`` between validations); ``history.params`` is Keras's
            ``{"verbose", "epochs", "steps"}``. With `steps_per_epoch`, an epoch's value
            of a float log is its mean over the epoch's meta steps (as the logs that the
            batch hooks receive: running means since the epoch began), of an integer
            counter its sum (``nan_tasks``, a running total: its last value). The default
            History also keeps each meta step's own logs: ``history.step_history[key]``,
            one value per meta step run (`MetaHistory`).

        Raises:
            TypeError: `epochs` and `meta_steps` (or `validation_data` and
                `validation_tasks`) disagree, or an argument has the wrong type.
            ValueError: a negative count.
            NotADirectoryError: `checkpoint_dir` or `log_dir` names a file.
            CheckpointError: see `restore`; also: the checkpoints were written for another
                model, trainer class, objectives or optimiser class (named), or by another
                run (seed or configuration, named) without `take_over_checkpoint_dir`; the
                state file lists checkpoints that are all missing.
            CheckpointLockError: another running process writes `checkpoint_dir`.
            TasksExhaustedError: the task source ran dry (see `stop_when_tasks_end`).
        """
        epochs = _resolve_epochs(epochs, meta_steps)
        if (
            validation_data is not None
            and validation_tasks is not None
            and validation_data is not validation_tasks
        ):
            raise TypeError(
                "fit got validation_data and validation_tasks: they are the same "
                "argument (held-out tasks); pass one of them."
            )
        validation = validation_data if validation_data is not None else validation_tasks
        if verbose == "auto":
            verbose = 1
        if isinstance(verbose, bool) or verbose not in (0, 1, 2):
            raise ValueError(f"fit: verbose must be 0, 1, 2 or 'auto', got {verbose!r}.")
        validation_freq = _count("validation_freq", validation_freq, 1)
        checkpoint_every = _count("checkpoint_every", checkpoint_every, 1)
        max_checkpoints = _count("max_checkpoints", max_checkpoints, 1)
        per_epoch = 1 if steps_per_epoch is None else _count("steps_per_epoch", steps_per_epoch, 1)
        for name, flag in (
            ("take_over_checkpoint_dir", take_over_checkpoint_dir),
            ("stop_when_tasks_end", stop_when_tasks_end),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"fit: {name} must be True or False, got {flag!r}.")
        if initial_epoch is not None:
            initial_epoch = _count("initial_epoch", initial_epoch)
        if validation_steps is not None:
            validation_steps = _count("validation_steps", validation_steps, 1)
        for name, folder in (("checkpoint_dir", checkpoint_dir), ("log_dir", log_dir)):
            if folder is not None and os.path.exists(folder) and not os.path.isdir(folder):
                raise NotADirectoryError(
                    f"fit: {name}='{os.fspath(folder)}' is a file, not a folder: give a "
                    "folder path (it is created if missing)."
                )
        if checkpoint_dir is not None:
            checkpoint_dir = os.fspath(checkpoint_dir)
        source = as_task_source(tasks)
        total = epochs * per_epoch

        if self.buffer is not None and hasattr(self.buffer, "remove_stale_spills"):
            self.buffer.remove_stale_spills()
        if initial_epoch is not None:
            self.step.assign(initial_epoch * per_epoch)
        lock, manager, signals = None, None, None
        try:
            if checkpoint_dir is not None:
                os.makedirs(checkpoint_dir, exist_ok=True)
                lock = FolderLock(checkpoint_dir).acquire()
                remove_checkpoint_leftovers(checkpoint_dir)
                restored = self._resume(checkpoint_dir, take_over_checkpoint_dir)
                manager = tf.train.CheckpointManager(
                    self._checkpoint(for_saving=True),
                    checkpoint_dir,
                    max_to_keep=max_checkpoints,
                    checkpoint_name=_CHECKPOINT_NAME,
                )
                if restored is not None and verbose:
                    _print(f"Resumed from {restored} at meta step {int(self.step.numpy())}.")
                signals = _StopSignals()
            return self._fit_loop(
                source,
                epochs,
                per_epoch,
                total,
                callbacks,
                verbose,
                log_dir,
                manager,
                checkpoint_every,
                validation,
                validation_freq,
                validation_steps,
                signals,
                stop_when_tasks_end,
            )
        except _Preempted:
            pass  # the checkpoint of the step reached is written; the signal goes on below
        finally:
            if signals is not None:
                signals.restore()
            if lock is not None:
                lock.release()
        signals.deliver()  # as if fit had not caught it: SIGTERM ends the process
        return self.history

    def _fit_loop(
        self,
        source,
        epochs,
        per_epoch,
        total,
        callbacks,
        verbose,
        log_dir,
        manager,
        checkpoint_every,
        validation,
        validation_freq,
        validation_steps,
        signals,
        stop_when_tasks_end,
    ):
        fit_model = FitModel(self)
        callbacks = list(callbacks or [])
        if log_dir is not None:
            callbacks.append(keras.callbacks.TensorBoard(log_dir))
        history = next((c for c in callbacks if isinstance(c, keras.callbacks.History)), None)
        if history is None:
            history = MetaHistory()
            callbacks.append(history)
        if verbose and not any(isinstance(c, keras.callbacks.ProgbarLogger) for c in callbacks):
            callbacks.append(MetaProgbarLogger())
        cb = keras.callbacks.CallbackList(
            callbacks,
            add_history=False,
            add_progbar=False,
            model=fit_model,
            verbose=verbose,
            epochs=epochs,
            steps=per_epoch,
        )

        self.stop_training = False
        cb.on_train_begin()
        if fit_model._initial_epoch is not None and not fit_model._state_loaded:
            # BackupAndRestore of weights only; with the trainer's state, its meta step is
            # exact (also for a backup taken at a batch, i.e. after a whole meta step)
            self.step.assign(int(fit_model._initial_epoch) * per_epoch)
        start = int(self.step.numpy())
        expected = set(self._expected_log_keys())
        progbars = [c for c in cb.callbacks if isinstance(c, MetaProgbarLogger)]
        epoch_logs, saved, stop = None, start, False
        for epoch in range(start // per_epoch, epochs):
            first = start - epoch * per_epoch if epoch == start // per_epoch else 0
            if signals is not None and signals.received is not None:
                # asked to stop between meta steps (validation, callbacks): stop here
                if saved != epoch * per_epoch + first:
                    self._save_checkpoint(manager, epoch * per_epoch + first)
                self.history = history
                raise _Preempted()
            cb.on_epoch_begin(epoch)
            running = _RunningLogs()
            for batch in range(first, per_epoch):
                s = epoch * per_epoch + batch
                if signals is not None and signals.received is not None:
                    # asked to stop just after the previous step was checked
                    if saved != s:
                        self._save_checkpoint(manager, s)
                    self.history = history
                    raise _Preempted()
                rng = np.random.default_rng([self.seed, s])
                try:
                    tasks = source.sample(rng, self.meta_batch_size)
                except StopIteration:
                    message = (
                        f"The task source ran out of tasks at meta step {s} of "
                        f"{total} (epoch {epoch}, step {batch} of {per_epoch})"
                    )
                    if not stop_when_tasks_end:
                        raise TasksExhaustedError(
                            f"{message}. Give a task source that lasts {total} meta steps "
                            "(a list or callable of tasks never runs dry), fewer epochs, "
                            "or fit(..., stop_when_tasks_end=True) to end there."
                        ) from None
                    warnings.warn(
                        f"{message}; fit ends there (stop_when_tasks_end=True).",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    stop = True
                    break
                cb.on_train_batch_begin(batch)
                step_start = time.time()
                logs = dict(self.train_step(tasks, rng))
                logs["seconds"] = time.time() - step_start
                # a key with no value this step (no finite task) is NaN, never left out
                expected.update(k for k in logs)
                for bar in progbars:
                    bar.hidden.update(k for k, v in logs.items() if _is_count(v))
                for key in expected:
                    logs.setdefault(key, math.nan)
                self.step.assign(s + 1)
                if isinstance(history, MetaHistory):
                    history.record_step(s, logs)
                running.add(logs)
                cb.on_train_batch_end(batch, running.value())
                last = s + 1 == total
                if manager is not None and (
                    (s + 1) % checkpoint_every == 0 or last or signals.received is not None
                ):
                    self._save_checkpoint(manager, s + 1)
                    saved = s + 1
                if signals is not None and signals.received is not None:
                    self.history = history
                    raise _Preempted()
                if fit_model.stop_training or self.stop_training:
                    stop = True
                    break
            if running.count == 0:
                break
            epoch_logs = running.value()
            if validation is not None and (
                (epoch + 1) % validation_freq == 0 or epoch + 1 == epochs
            ):
                epoch_logs.update(self._validate(cb, validation, validation_steps))
            cb.on_epoch_end(epoch, epoch_logs)
            if stop or fit_model.stop_training or self.stop_training:
                break
        if manager is not None and saved != int(self.step.numpy()):
            self._save_checkpoint(manager, int(self.step.numpy()))  # a run that stopped early
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
        return [
            (o.optimizer_name, o.optimizer, o.variables(self))
            for o in self.objectives
            if o.optimizer is not None and o.variables(self)
        ]

    def _expected_log_keys(self):
        """Keys every meta step's logs carry (NaN when a step has no value for one)."""
        keys = ["loss"]
        if self._reports_accuracy():
            keys.append("accuracy")
        return keys
