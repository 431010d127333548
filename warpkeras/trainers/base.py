"""`MetaTrainer`: meta-training as a composition of meta-objectives.

A trainer adapts the tasks of each meta-batch for K inner steps (the engine,
`warpkeras.trainers.engine`) and hands every step to its **objectives**
(`warpkeras.meta`): the warp objective L(φ) of WarpGrad (online, offline or continual;
exact or approximate), an initialisation objective C(θ0) (Leap, MAML, Reptile), or one of
your own. WarpGrad App. D, Eq. 8 (J = L(φ) + λC(θ0)) is the composition
``objectives=[WarpObjective(...), Leap(weight=λ)]``. The public front-ends (`WarpTrainer`,
`LeapTrainer`, `MAMLTrainer`, ...) are presets that choose the objectives from their
keyword arguments (`warpkeras.trainers.presets`).

Everything per step runs in `tf.function`s compiled once per trainer (one compiled call per
inner step of a group of tasks). Randomness is derived from ``(seed, meta_step)``, so a run
resumed from a checkpoint replays exactly the tasks and batches the uninterrupted run
would have seen.
"""

import contextlib
import functools
import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras import rules
from warpkeras.meta import MetaTrainingError
from warpkeras.partition import UNTAGGED_POLICIES, Partition
from warpkeras.trainers.checks import (
    InputChecks,
    _check_head_layers,
    _check_objectives,
    _resolve_loss,
)
from warpkeras.trainers.engine import AdaptationEngine
from warpkeras.trainers.evaluation import Evaluation
from warpkeras.trainers.loop import TrainingLoop
from warpkeras.trainers.metrics import loss_is_classification
from warpkeras.trainers.parallel import PARALLEL_MODES, make_executor
from warpkeras.trainers.presets import OBJECTIVE_OPTIONS, KeywordViews, objectives_from_options

ENGINE_OPTIONS = {
    "loss_weights": None,
    "accuracy": None,
    "head_layers": None,
    "untagged": "task",
    "eval_training_mode": True,
    "jit_compile": False,
    "strategy": None,
    "group_size": None,
    "inner_rule": None,
}


def _owning_strategy(strategy, partition):
    """`strategy` when the model's variables were created in its scope, else None."""
    if strategy is None:
        return None
    variables = partition.task_variables + partition.warp_variables + partition.state_variables
    if any(strategy.extended.variable_created_in_scope(getattr(v, "value", v)) for v in variables):
        return strategy
    return None


class MetaTrainer(KeywordViews, TrainingLoop, Evaluation, InputChecks, AdaptationEngine):
    """Meta-trains a tagged Keras model with a list of meta-objectives.

    Example (Warp-Leap: WarpGrad Algorithm 2 and Leap's initialisation):

    ```python
    trainer = MetaTrainer(model, "mse", objectives=[
        warpkeras.meta.WarpObjective("offline", exact=True), warpkeras.meta.Leap()])
    ```

    The front-ends (`WarpTrainer`, `LeapTrainer`, `MAMLTrainer`, `ReptileTrainer`,
    `FineTuneTrainer`, `NoMetaTrainer`) choose the objectives from keyword arguments;
    ``MetaTrainer`` takes those too when `objectives` is not given (``warp_mode=``,
    ``init_objective=``, ``leap_norm=``, ...: see
    `warpkeras.trainers.presets.objectives_from_options`). See
    `warpkeras.trainers.evaluation.Evaluation` for the batch-norm statistics rule.

    Args:
        model: a built `keras.Model` with layers tagged by `warpkeras.warp` /
            `warpkeras.task` (see `warpkeras.partition`).
        loss: the task loss, as `keras.Model.compile` takes it (a Keras loss name or
            object, ``fn(y_true, y_pred)``, or a dict / list of them per output) and
            computed as `keras.Model.fit` computes it (masks of the outputs, sample
            weights of ``(x, y, sample_weight)`` batches, regularisation losses; see
            `warpkeras._losses.TaskLoss`); also the meta loss unless an objective's
            `meta_loss` is given.
        objectives: a list of `warpkeras.meta.MetaObjective` (or one); `None`: chosen from
            the keyword arguments (no objective at all when none names one).
        inner_learning_rate: α of the inner SGD.
        inner_momentum: μ of heavy-ball momentum in the inner loop, or `None`.
        inner_steps: K, adaptation steps per task during meta-training.
        meta_batch_size: tasks per meta step.
        meta_optimizer: Keras optimizer of objectives given without one (default
            SGD(0.1); the warp objective uses it, θ0 objectives a copy).
        parallel: how the tasks of a meta-batch are adapted: ``"auto"`` (default),
            ``"sequential"`` (one after another), ``"unrolled"`` (all in one graph, one
            copy of the step per task, run concurrently on TensorFlow's inter-op threads)
            or ``"vectorized"`` (`tf.vectorized_map`: one batched kernel per layer for the
            whole group); see `warpkeras.trainers.parallel`. ``"auto"`` is resolved once,
            here: with a `strategy`, each replica runs its tasks unrolled; with an
            objective that continues one stream of task parameters
            (``WarpObjective("continual")``), or in `FineTuneTrainer` / `NoMetaTrainer`,
            ``"sequential"``; otherwise ``"unrolled"`` in groups of at most 8 tasks, with
            as few distinct group sizes as possible, each traced once
            (`warpkeras.trainers.parallel.balanced_group_sizes`: meta-batch 5 → one group
            of 5, 9 → 5 + 4, 20 → four groups of 5). An explicit `group_size` wins.
            Unrolled was the fastest on a 2-core CPU (per-task step 0.45–0.68x the
            sequential one at meta-batches 5 and 20; vectorised was slower than
            sequential); its cost is a longer trace of the first meta step (about 2x at 5
            tasks), which the group bound keeps in check. On GPUs try ``"vectorized"``
            (``bench/gpu.py`` measures it). The resolved mode is ``trainer.parallel``
            (and ``get_config()["parallel"]``; with a strategy, how each replica runs its
            tasks). Results match ``"sequential"`` to float32 rounding.
        seed: seed of task sampling, batches and random layers: the draws of `Dropout`
            and other layers with a `keras.random.SeedGenerator` derive from (seed,
            meta step, task), and go on from forward pass to forward pass.
        **options: engine options, and the objective keyword arguments above:
            loss_weights: per-output loss weights, as in `keras.Model.compile`.
            accuracy: report accuracy (`None`: when the loss is a cross-entropy).
            head_layers: layers forming the task head; for multi-headed evaluation their
                values are re-initialised for every evaluation task (see `FineTuneTrainer`).
            untagged: role of untagged trainable layers (`warpkeras.partition`).
            eval_training_mode: evaluation's test passes run every layer in inference
                mode, as `keras.Model.evaluate` does (no dropout); with True (the default,
                the papers' transductive convention) batch-norm layers normalise with the
                evaluated batch's own statistics, with False with their moving statistics.
                See "Batch-norm statistics" in `warpkeras.trainers.evaluation.Evaluation`.
            jit_compile: compile the step functions with XLA.
            group_size: with ``parallel="unrolled"`` / ``"vectorized"`` / ``"auto"``, the
                number of tasks adapted together in one call (a positive int): groups of
                that size, the last one possibly smaller. `None` (default): the whole
                meta-batch (``"auto"``: groups of at most 8, as above). Smaller groups
                bound the memory and tracing time of large meta-batches.
            strategy: a `tf.distribute.Strategy` to split each meta-batch across replicas
                (`meta_batch_size` must be a multiple of the replica count).
            inner_rule: the inner update rule, a `warpkeras.rules.InnerRule`
                (`warpkeras.rules.SGD`, `warpkeras.rules.MetaSGD`, `warpkeras.KFAC` or
                one of your own). `None` (default): SGD with `inner_learning_rate` and
                `inner_momentum`. The one rule steps every adaptation: meta-training (MAML's
                unrolled steps included), `adapt`, `evaluate`, fine-tuning and the exported
                SavedModel (``trainer.inner_rule``). Exclusive with `inner_momentum`.

    Raises:
        TypeError: an argument of the wrong type (``inner_steps="five"``,
            ``seed="abc"``, ``jit_compile=1``, an optimizer class instead of an instance,
            a `model` that is not a `keras.Model`, ...). The message names the trainer,
            the argument, the value and what to pass instead.
        MetaTrainingError: (a `ValueError`) a value out of range or an unknown choice
            (``inner_learning_rate`` <= 0, NaN or infinite; ``inner_momentum`` outside
            [0, 1); ``inner_steps < 1``; an unknown optimizer name or mode; a
            `buffer_spill_dir` naming a file; ...) or a combination that cannot work.
        ValueError: during training and evaluation with a sparse categorical loss, a
            batch whose class ids lie outside [0, C) of the model's C-unit output (the
            message names the task and the range).

    Optimizers (`meta_optimizer`, `init_optimizer`) are given in any form
    `keras.optimizers.get` accepts: an instance, a name (``"adam"``) or a serialised
    config.
    """

    # Subclasses whose meta step carries parameters from task to task set this:
    # ``parallel="auto"`` then resolves to "sequential".
    _adapts_one_task_at_a_time = False

    def __init__(
        self,
        model,
        loss,
        objectives=None,
        *,
        inner_learning_rate=0.1,
        inner_momentum=None,
        inner_steps=100,
        meta_batch_size=5,
        meta_optimizer=None,
        parallel="auto",
        seed=0,
        **options,
    ):
        where = type(self).__name__
        objectives = _check_objectives(objectives, where)
        unknown = sorted(set(options) - set(ENGINE_OPTIONS) - set(OBJECTIVE_OPTIONS))
        if unknown:
            raise TypeError(f"{where}.__init__() got an unexpected keyword argument '{unknown[0]}'")
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"{where}: model={_v.describe(model)} is not valid: expected a "
                "built keras.Model (tag layers with warpkeras.warp / warpkeras.task)."
            )
        e = dict(ENGINE_OPTIONS, **{k: v for k, v in options.items() if k in ENGINE_OPTIONS})
        untagged = _v.check_choice(
            e["untagged"], "untagged", UNTAGGED_POLICIES, where=where, error=MetaTrainingError
        )
        parallel = _v.check_choice(
            parallel, "parallel", PARALLEL_MODES, where=where, error=MetaTrainingError
        )
        flag = functools.partial(_v.check_bool, where=where)
        accuracy = flag(e["accuracy"], "accuracy", allow_none=True)
        eval_training_mode = flag(e["eval_training_mode"], "eval_training_mode")
        jit_compile = flag(e["jit_compile"], "jit_compile")
        integer = functools.partial(_v.check_int, where=where, error=MetaTrainingError)
        inner_steps = integer(inner_steps, "inner_steps", minimum=1, example=5)
        meta_batch_size = integer(meta_batch_size, "meta_batch_size", minimum=1, example=5)
        group_size = integer(e["group_size"], "group_size", minimum=1, allow_none=True, example=4)
        seed = _v.check_seed(seed, "seed", where=where, error=MetaTrainingError)
        number = functools.partial(_v.check_float, where=where, error=MetaTrainingError)
        inner_learning_rate = number(
            inner_learning_rate,
            "inner_learning_rate",
            minimum=0.0,
            min_inclusive=False,
            example=0.1,
        )
        inner_momentum = number(
            inner_momentum,
            "inner_momentum",
            minimum=0.0,
            maximum=1.0,
            max_inclusive=False,
            allow_none=True,
            example=0.9,
        )
        meta_optimizer = _v.get_optimizer(meta_optimizer, "meta_optimizer", where=where)
        inner_rule = rules.get(e["inner_rule"], where=f"{where}: inner_rule")
        if inner_rule is not None and inner_momentum is not None:
            raise MetaTrainingError(
                f"{where}: inner_momentum={inner_momentum:g} sets the momentum of the default "
                f"SGD rule, but inner_rule={inner_rule!r} is given: set it on the rule "
                "(e.g. warpkeras.rules.SGD(0.1, momentum=0.9)) and drop inner_momentum."
            )
        self._given_rule = inner_rule
        legacy = {k: v for k, v in options.items() if k in OBJECTIVE_OPTIONS}
        if objectives is None:
            objectives = objectives_from_options(
                where, legacy, meta_optimizer, inner_momentum, seed
            )
        elif legacy:
            raise MetaTrainingError(
                f"{where}: {', '.join(sorted(legacy))} choose objectives, but objectives= "
                "is given: set these options on the objectives instead."
            )
        head_layers = _check_head_layers(e["head_layers"], where)
        strategy = e["strategy"]
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(
                f"{where}: strategy={_v.describe(strategy)} is not valid: expected a "
                "tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy()) or None."
            )

        self.model = model
        self.objectives = objectives
        self.partition = Partition(
            model, untagged=untagged, require_warp=any(o.requires_warp for o in objectives)
        )
        self.loss = _resolve_loss(loss, where, model=model, loss_weights=e["loss_weights"])
        self.inner_steps = int(inner_steps)
        self.meta_batch_size = int(meta_batch_size)
        self.accuracy = loss_is_classification(self.loss) if accuracy is None else accuracy
        self.eval_training_mode = bool(eval_training_mode)
        self.jit_compile = bool(jit_compile)
        self.seed = int(seed)
        try:
            one_stream = self._adapts_one_task_at_a_time or any(
                o.continues_stream for o in objectives
            )
            self.executor = make_executor(
                parallel,
                strategy,
                jit_compile=self.jit_compile,
                group_size=group_size,
                continues_stream=one_stream,
            )
            # How tasks are run (with a strategy: within each replica).
            self.parallel = self.executor.inner if strategy is not None else self.executor.name
        except ValueError as err:
            raise MetaTrainingError(f"{where}: {err}") from None
        if strategy is not None:
            self.executor.group_size(self.meta_batch_size)
        self.meta_optimizer = (
            meta_optimizer if meta_optimizer is not None else keras.optimizers.SGD(0.1)
        )
        # Trainer variables and optimiser slots live where the model's variables live: a
        # model built under `strategy.scope()` gets mirrored slots (and vice versa).
        self._variables_strategy = _owning_strategy(strategy, self.partition)
        with (
            self._variables_strategy.scope()
            if self._variables_strategy
            else contextlib.nullcontext()
        ):
            dtype = self.partition.task_variables[0].dtype
            self.inner_lr = tf.Variable(
                float(inner_learning_rate), dtype=dtype, trainable=False, name="inner_learning_rate"
            )
            self.use_momentum = inner_momentum is not None
            self.inner_mu = tf.Variable(
                float(inner_momentum or 0.0), dtype=dtype, trainable=False, name="inner_momentum"
            )
            # Heads (multi-headed evaluation): indices into the task list.
            self.head_indices = []
            if head_layers:
                head_ids = {id(v) for layer in head_layers for v in layer.trainable_variables}
                self.head_indices = [
                    i for i, v in enumerate(self.partition.task_variables) if id(v) in head_ids
                ]
                if not self.head_indices:
                    raise MetaTrainingError("head_layers hold no task variables of the model.")
            self._initial_head = [
                tf.identity(self.partition.task_variables[i].value) for i in self.head_indices
            ]
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="meta_step")
            self.nan_tasks = tf.Variable(0, dtype=tf.int64, trainable=False, name="nan_tasks")
            # Checkpoints of every trainer hold a `stream_count` (the continual warp
            # objective's counter, which replaces this one): checkpoints written by any
            # trainer keep the same layout, and older ones restore unchanged.
            self._stream_count = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="stream_count"
            )
            self.nan_points = 0
            self.history = None
            self.stop_training = False
            self._build_engine()

    def _reports_accuracy(self):
        return self.accuracy and all(o.reports_accuracy for o in self.objectives)

    # ------------------------------------------------------------------ one meta step
    def _record_diverged(self, names):
        """Keeps the names of the tasks dropped at this meta step in ``self.diverged``."""
        if not hasattr(self, "diverged"):
            self.diverged = {}
        if names:
            self.diverged[int(self.step.numpy())] = list(names)

    def train_step(self, tasks, rng):
        """One meta step on a list of tasks.

        A task whose loss or gradients become non-finite is dropped from the meta-update
        (with a `RuntimeWarning` naming it); ``self.diverged`` maps the (0-based) meta step
        to the names of the tasks dropped there.

        Args:
            tasks: the meta-batch, a list of `warpkeras.Task`.
            rng: the step's `numpy.random.Generator`.

        Returns:
            A dict of logs: ``loss`` (and ``accuracy``): the mean over the tasks that stayed
            finite of the last adaptation step's value, NaN when none did;
            ``diverged_tasks``: tasks dropped at this step; ``nan_tasks``: tasks dropped so
            far (a running total); ``meta_loss``; and the objectives' logs (offline /
            continual warp: ``nan_points``, replay-buffer points / stream steps whose warp
            gradient was non-finite and skipped; offline: ``warp_updates``; meta-learned
            α / μ: ``inner_learning_rate`` / ``inner_momentum``).
        """
        for o in self.objectives:
            o.begin_meta_step(self)
        sizes = [1] * len(tasks) if self._stream else self.executor.group_sizes(len(tasks))
        starts = np.cumsum([0] + sizes[:-1]).tolist()
        rngs = rng.spawn(len(tasks))
        sums, counts = {}, {}
        losses, metrics, metas, dropped = [], [], [], 0
        diverged = []  # names of this step's dropped tasks
        self.nan_points = 0
        stream = self._start_values() if self._stream else None
        moving = []  # batch inputs, for the moving statistics at θ0
        for lo, size in zip(starts, sizes):
            group = tasks[lo : lo + size]
            ids = list(range(lo, lo + len(group)))
            res = self._adapt_group(group, ids, rngs[lo : lo + len(group)], start=stream)
            finite = res["finite"]
            for g in np.flatnonzero(~finite):
                dropped += 1
                name = str(getattr(group[g], "name", ids[g]))
                diverged.append(name)
                warnings.warn(
                    f"Meta step {int(self.step.numpy())}: task '{name}' (number {ids[g]} "
                    "of the meta-batch) produced a non-finite loss or gradient; it is "
                    "dropped from this meta-update (see the logs' `diverged_tasks` and "
                    "`trainer.diverged`).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if stream is not None and finite.all():
                c = res["carry"]
                stream = (
                    tuple(t[0] for t in c["theta"]),
                    tuple(v[0] for v in c.get("velocity", ())),
                    tuple(s[0] for s in c["state"]),
                )
            if not finite.any():
                continue
            moving.extend(self._statistics_batches(res, finite))
            losses.extend(res["losses"][finite, -1].tolist())
            metrics.extend(res["metrics"][finite, -1].tolist())
            if res["metas"] is not None:
                metas.extend(res["metas"][finite].ravel().tolist())
            for i, grads in res["grads"].items():
                part = self.executor.masked_sum(list(grads), finite)
                sums[i] = part if i not in sums else [a + b for a, b in zip(sums[i], part)]
                counts[i] = counts.get(i, 0) + int(finite.sum())
        self.nan_tasks.assign_add(dropped)
        if stream is not None:
            self.partition.assign_task(self._theta_packer.unpack(stream[0]))
        for i, o in enumerate(self.objectives):
            if i in sums:
                o.apply(self, tuple(sums[i]), counts[i])
        logs = {}
        for o in self.objectives:
            logs.update(o.end_meta_step(self, tasks, rng))
        if metas and "meta_loss" not in logs:
            logs["meta_loss"] = float(np.mean(metas))
        # Means over the tasks that stayed finite; `diverged_tasks` says how many did not
        # (and the loss is NaN when none did).
        logs["loss"] = float(np.mean(losses)) if losses else math.nan
        if self._reports_accuracy():
            logs["accuracy"] = float(np.mean(metrics)) if metrics else math.nan
        logs["diverged_tasks"] = dropped
        logs["nan_tasks"] = int(self.nan_tasks.numpy())
        self._write_moving_statistics(moving)  # at the updated θ0 and φ
        self._record_diverged(diverged)
        for o in self.objectives:
            logs.update(o.logs(self))
        return logs

    def get_config(self):
        """The trainer's hyper-parameters (for logs and results files), with the resolved
        ``parallel`` mode (what ``"auto"`` stood for) and ``group_size`` (the largest
        group of a meta-batch of `meta_batch_size` tasks)."""
        config = super().get_config()
        config["inner_rule"] = self.inner_rule.get_config()
        config["parallel"] = self.parallel
        config["group_size"] = self.executor.group_size(self.meta_batch_size)
        return config

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_items(self):
        """The trackables a checkpoint holds (`warpkeras.trainers.loop`)."""
        items = {
            "model": self.model,
            "step": self.step,
            "nan_tasks": self.nan_tasks,
            "inner_lr": self.inner_lr,
            "inner_mu": self.inner_mu,
            "stream_count": self._stream_count,
        }
        for o in self.objectives:
            items.update(o.checkpoint_items(self))
        if self.inner_rule.variables:  # e.g. Meta-SGD's α, learned or not
            items["inner_rule_variables"] = list(self.inner_rule.variables)
        return items
