"""Adaptation from θ0 on held-out tasks (`adapt`, `evaluate`), batch-norm statistics,
export, and the summary over tasks (`summarize`)."""

import copy as _copy
import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras import rules
from warpkeras._losses import join_batch, split_targets
from warpkeras.tasks import Task, as_task


class Evaluation:
    """`adapt` / `evaluate` / `export` of `MetaTrainer` (needs the engine's compiled
    plain step and the input checks).

    **Batch-norm statistics.** One rule for every batch-norm layer (Keras'
    `BatchNormalization` and `warpkeras.layers.ExactBatchNormalization`, in task, warp or
    frozen layers; a layer with ``trainable=False`` always uses its moving statistics and
    keeps them): *the moving statistics are the training data's statistics at the
    parameters they are used with.*

    * *Adaptation* (the inner loop of `fit`, `adapt`, `evaluate`) always runs in training
      mode: each step normalises with its own batch's statistics.
    * *Saved statistics (θ0)*: after every meta step the moving mean and variance are set
      to the batch statistics at θ0 of each task's first training batch, averaged over the
      meta-batch's tasks (tasks dropped as non-finite excluded). They come from data from
      the first meta step on, whatever the layers' momentum (`FineTuneTrainer`: at the
      pre-trained parameters; MAML: at θ0 on the support batches). `NoMetaTrainer`
      does not train and leaves them unchanged.
    * *Adapted parameters (θ_k, k ≥ 1)*: the statistics of the task's latest adaptation
      batch at θ_k (one training-mode pass with momentum 0,
      `warpkeras.export.batch_statistics`).
    * *Evaluation* (`evaluate`'s test losses) runs every layer in inference mode, as
      `keras.Model.evaluate` does (no dropout or noise). With `eval_training_mode` True
      (the default, the papers' reference code and MAML's transductive setting) batch-norm
      layers normalise with the evaluated batch's own statistics (a momentum-0 pass
      replaces the moving statistics by the batch's before the inference pass); False
      uses the moving statistics above, as a model deployed one example at a time must,
      and equals `keras.Model.evaluate` at the same weights and statistics.
    * *Export*: `export` adapts in training mode and predicts as evaluation does (every
      layer in inference mode, batch norm with the query batch's statistics when
      `eval_training_mode`), so the served predictions equal `evaluate`'s (see
      `warpkeras.export_adaptive`).
    """

    def _has_statistics(self):
        """Whether the model has floating state (batch-norm moving statistics)."""
        return any(tf.as_dtype(v.dtype).is_floating for v in self.partition.state_variables)

    def _statistics(self, theta, state, x):
        """Packed `state` with its moving statistics set to those of batch `x` at packed
        `theta` (see "Batch-norm statistics" and `warpkeras.export.batch_statistics`)."""
        if not self._has_statistics():
            return state
        if getattr(self, "_statistics_fn", None) is None:
            from warpkeras.export import batch_statistics

            sp, tp = self._state_packer, self._theta_packer

            def statistics(theta, state, x):
                return sp.pack(
                    batch_statistics(
                        self.partition, tp.unpack(theta), self._phi(), x, sp.unpack(state)
                    )
                )

            self._statistics_fn = tf.function(statistics, reduce_retracing=True)
        return self._statistics_fn(theta, state, x)

    def _statistics_batches(self, res, finite):
        """The inputs of the first training batch of each finite task of a group (for the
        moving statistics)."""
        batches = res.get("first_batch")
        if batches is None or not self._has_statistics():
            return []
        return [batches[g][0] for g in np.flatnonzero(finite)]

    def _write_moving_statistics(self, inputs):
        """Sets the model's moving statistics to the mean over `inputs` (one batch per
        task of the meta-batch) of the batch statistics at the current θ0 and φ (see
        "Batch-norm statistics" in `Evaluation`). Only floating state is written
        (batch-norm moving mean / variance); random-number generator states are left to
        the seed handling."""
        if not inputs or not self._has_statistics():
            return
        theta, _, state = self._start_values()
        sums = None
        for x in inputs:
            part = [
                np.asarray(t, dtype=np.float64) if d.is_floating else None
                for t, d in zip(self._statistics(theta, state, x), self._state_packer.groups)
            ]
            sums = (
                part if sums is None else [None if a is None else a + b for a, b in zip(sums, part)]
            )
        values = self._state_packer.unpack(
            [
                c if s is None else tf.convert_to_tensor(s / len(inputs), dtype=c.dtype)
                for s, c in zip(sums, state)
            ]
        )
        for v, value in zip(self.partition.state_variables, values):
            if tf.as_dtype(v.dtype).is_floating:
                v.assign(value)

    # ------------------------------------------------------------------------------------
    # export
    def export(self, path, steps=None, overwrite=False, **kwargs):
        """Exports the meta-learned model as an adaptive SavedModel (see
        `warpkeras.export_adaptive`) with this trainer's loss, inner learning rate and
        momentum, or its inner rule (``trainer.inner_rule``, traced with its variables, e.g.
        Meta-SGD's α): `serving_default` predicts with θ0 and φ, `adapt` and
        `adapt_and_predict` run `steps` steps of that rule on a support set inside the
        graph, so that the served adaptation equals `adapt`'s.

        Args:
            path: the SavedModel folder.
            steps: default adaptation steps recorded in the metadata (default
                `inner_steps`).
            overwrite: replace an existing SavedModel at `path` (without it an existing,
                non-empty folder is refused).
            **kwargs: forwarded to `warpkeras.export_adaptive` (e.g. ``from_logits``,
                ``input_spec``, ``max_elements``, ``max_element_steps``, ``max_steps``).

        The served model adapts in training mode, as the trainers' inner loop does, and
        predicts as `evaluate` does (``training=True``,
        ``predict_training=eval_training_mode``; see "Batch-norm statistics" above), so
        ``adapt_and_predict`` on a task's training set (full batches) and test inputs
        gives `evaluate`'s test predictions.

        Returns:
            The path written.

        Raises:
            ValueError: the trainer's inner rule cannot be served (an objective's
                `inner_update` hook, or a rule with ``exportable = False``): the message
                names it.
        """
        from warpkeras.export import export_adaptive

        kwargs.setdefault("training", True)
        kwargs.setdefault("predict_training", self.eval_training_mode)
        kwargs.setdefault("untagged", self.partition.untagged)
        if self.custom_update:
            kwargs.setdefault("rule", self.inner_rule)
        return export_adaptive(
            self.model,
            path,
            loss=self.loss,
            learning_rate=float(self.inner_lr.numpy()),
            momentum=float(self.inner_mu.numpy()) if self.use_momentum else None,
            steps=self.inner_steps if steps is None else steps,
            overwrite=overwrite,
            **kwargs,
        )

    def _rule_step(self, rule):
        """The compiled plain step of an `adapt` / `evaluate` rule other than the trainer's
        (one bound copy per rule given, so that one rule value serves several trainers)."""
        if not isinstance(rule, rules.InnerRule):
            raise TypeError(
                f"adapt: inner_optimizer={_v.describe(rule)} is not valid: expected an inner "
                "rule such as warpkeras.KFAC(...) or warpkeras.rules.SGD(0.1, momentum=0.9) "
                "(a warpkeras.rules.InnerRule), or None."
            )
        if rule is self.inner_rule:
            return self._plain_step
        bound = self.__dict__.setdefault("_bound_rules", {})
        key = (id(rule), tuple(sorted(str(kv) for kv in rule.get_config().items())))
        if key not in bound:
            copy = _copy.copy(rule)
            copy.build(self.partition, self.loss)
            bound[key] = (rule, copy)
        return self.plain_step(bound[key][1])

    # ------------------------------------------------------------------------------------
    # evaluation
    def adapt(self, task, steps=None, seed=0, eval_every=None, record=True, inner_optimizer=None):
        """Adapts θ from θ0 on `task` for `steps` SGD steps with φ frozen.

        Args:
            task: a `warpkeras.Task`.
            steps: number of steps (default `inner_steps`).
            seed: seed of the task's batches.
            eval_every: evaluate held-out test data every this many steps (and at 0 and
                the end); `None`: only at 0 and at the end.
            record: keep per-step curves.
            inner_optimizer: `None` (the trainer's inner rule, ``trainer.inner_rule``), or
                another inner rule (a `warpkeras.rules.InnerRule` such as `warpkeras.KFAC`),
                which then makes every step with its own settings (its state starts from
                ``rule.init(θ0, seed)`` for each adaptation); φ stays frozen. Constraints
                of the task variables hold after every step either way.

        Returns:
            ``(theta, curves)``: the adapted task values (a list matching
            `partition.task_variables`) and a dict of per-step ``train_loss`` /
            ``train_accuracy``, ``test_steps`` / ``test_loss`` / ``test_accuracy`` and the
            ``path_length`` in (θ, L(θ)) (WarpGrad Eq. 9).
        """
        steps = self.inner_steps if steps is None else int(steps)
        task = as_task(task)
        rng = np.random.default_rng([self.seed, 104729, seed])
        batches = self._checked(task, task.batches("train", rng), "train")
        theta, velocity, state = self._start_values(task)
        state = self._reseed(state, 104729, seed)
        step_fn = self._plain_step
        if inner_optimizer is not None:
            step_fn = self._rule_step(inner_optimizer)
            velocity = step_fn.start(theta, seed)
        test = task.test_data()
        if test is not None:
            test = join_batch(test)
            labels, _ = split_targets(test[1])
            self._check_inputs(task, test[0], "test")
            self._check_label_layout(task, labels, "test")
            self._check_labels(task, labels, "test")
        curves = {
            "train_loss": [],
            "train_accuracy": [],
            "test_steps": [],
            "test_loss": [],
            "test_accuracy": [],
            "path_length": 0.0,
        }

        last = None  # the latest adaptation batch's inputs

        def run_test(k):
            if test is None:
                return
            # Inference mode: the statistics of the latest support batch at θ_k (θ0: the
            # saved ones); see "Batch-norm statistics" above.
            at = (
                state
                if self.eval_training_mode or last is None
                else self._statistics(theta, state, last)
            )
            loss, metric = self._evaluate_point(theta, at, test[0], test[1])
            curves["test_steps"].append(k)
            curves["test_loss"].append(float(loss))
            curves["test_accuracy"].append(float(metric))

        run_test(0)
        losses, metrics, sqs = [], [], []
        for k in range(steps):
            x, y = next(batches)
            theta, velocity, state, loss, metric, sq, _ = step_fn(theta, velocity, state, x, y)
            last = x
            losses.append(loss)
            metrics.append(metric)
            sqs.append(sq)
            if eval_every and (k + 1) % eval_every == 0 and k + 1 < steps:
                run_test(k + 1)
        run_test(steps)
        losses = [float(v) for v in losses]
        sqs = [float(v) for v in sqs]
        # segments θ_{k-1} -> θ_k with the losses measured on the steps' batches
        curves["path_length"] = float(
            sum(math.sqrt(sqs[k - 1] + (losses[k] - losses[k - 1]) ** 2) for k in range(1, steps))
        )
        if record:
            curves["train_loss"] = losses
            curves["train_accuracy"] = [float(v) for v in metrics]
        return self._theta_packer.unpack(theta), curves

    def evaluate(self, tasks, steps=None, eval_every=None, seed=0, verbose=1, inner_optimizer=None):
        """Adapts from θ0 (φ frozen) on each task and summarises (mean and std over tasks).

        The report holds per-task learning curves, the final test loss / accuracy, and the
        area under the training-error curve (Leap's AUC: the mean over the adaptation steps
        of 1 − accuracy for classification, of the loss otherwise).

        Args:
            tasks: a list of `warpkeras.Task` (held-out tasks), a `TaskSampler`, or one
                `Task`.
            steps: adaptation steps (default `inner_steps`).
            eval_every: test-set evaluation interval (see `adapt`).
            seed: seed of the batches.
            verbose: 1 shows a progress bar over tasks.
            inner_optimizer: the adaptation's optimiser (see `adapt`); `None`: warped SGD.

        Returns:
            A dict with ``final_test_loss``, ``final_test_accuracy``, ``auc``,
            ``final_train_loss``, ``path_length`` (each ``{"mean", "std", "values",
            "diverged", "mean_of_finite"}``), ``diverged`` (``{"count", "tasks"}``, the
            names of the tasks whose loss became non-finite: their values are NaN, and so
            is every mean over tasks they are part of), ``curves`` (per task, with its
            name under ``"task"``) and ``mean_curves``; see `summarize`.

        Warns:
            RuntimeWarning: naming the tasks that diverged.
        """
        if isinstance(tasks, Task):
            tasks = [tasks]
        tasks = [as_task(t) for t in (tasks.tasks if hasattr(tasks, "sample") else tasks)]
        steps = self.inner_steps if steps is None else int(steps)
        bar = keras.utils.Progbar(len(tasks), unit_name="task") if verbose else None
        per_task = []
        for i, task in enumerate(tasks):
            _, curves = self.adapt(
                task, steps, seed=seed + i, eval_every=eval_every, inner_optimizer=inner_optimizer
            )
            curves["task"] = str(task.name)
            per_task.append(curves)
            if bar is not None:
                bar.update(i + 1)
        report = summarize(per_task, self.accuracy)
        if report["diverged"]["count"]:
            warnings.warn(
                f"{report['diverged']['count']} of {len(tasks)} evaluation tasks diverged "
                f"(non-finite loss while adapting or testing): "
                f"{', '.join(report['diverged']['tasks'])}. Their values are NaN and so are "
                "the means (see each statistic's `mean_of_finite`).",
                RuntimeWarning,
                stacklevel=2,
            )
        return report


def _finite(value):
    return value is not None and math.isfinite(float(value))


def _stats(values, diverged=None):
    """Mean and std over tasks that never silently drop a diverged task.

    Args:
        values: one value per task, `None` where the task has no such value (e.g. no test
            data): those tasks are left out.
        diverged: per task, whether it diverged (its value then counts as NaN).

    Returns:
        ``{"mean", "std", "values", "diverged", "mean_of_finite"}``: ``values`` holds the
        measured tasks' values in task order (NaN for diverged tasks); ``mean`` / ``std``
        are over all of them, so NaN when any diverged; ``diverged`` counts those;
        ``mean_of_finite`` is the mean over the others (NaN when there are none).
    """
    diverged = diverged if diverged is not None else [False] * len(values)
    measured = [
        math.nan if d or not _finite(v) else float(v)
        for v, d in zip(values, diverged)
        if v is not None
    ]
    finite = [v for v in measured if not math.isnan(v)]
    bad = len(measured) - len(finite)
    mean = math.nan if bad or not measured else float(np.mean(finite))
    std = math.nan if bad or not measured else float(np.std(finite))
    return {
        "mean": mean,
        "std": std,
        "values": measured,
        "diverged": bad,
        "mean_of_finite": float(np.mean(finite)) if finite else math.nan,
    }


def summarize(per_task, accuracy):
    """Summary statistics of `adapt` curves over tasks (see `MetaTrainer.evaluate`).

    A task *diverged* when a training or test loss or its path length is not finite; its
    values are NaN in every statistic (its accuracy, computed on non-finite predictions,
    would mean nothing), so means over tasks are NaN rather than means over the survivors.

    Args:
        per_task: `adapt` curves per task; an optional ``"task"`` entry names the task.
        accuracy: whether accuracies were recorded (the AUC then uses 1 − accuracy).

    Returns:
        A dict: ``tasks``; ``final_test_loss``, ``final_test_accuracy``,
        ``final_train_loss``, ``auc``, ``path_length`` (each as `_stats` returns:
        ``mean``, ``std``, ``values``, ``diverged``, ``mean_of_finite``); ``diverged``
        (``{"count", "tasks"}``: the names of the diverged tasks); ``curves`` and, when
        curves were recorded, ``mean_curves``.
    """
    names = [str(c.get("task", f"task {i}")) for i, c in enumerate(per_task)]
    diverged = [
        not all(_finite(v) for v in list(c["train_loss"]) + list(c["test_loss"]))
        or not _finite(c.get("path_length", 0.0))
        for c in per_task
    ]
    auc = []
    for c in per_task:
        curve = [1.0 - a for a in c["train_accuracy"]] if accuracy else c["train_loss"]
        auc.append(float(np.mean(curve)) if len(curve) else None)
    report = {
        "tasks": len(per_task),
        "final_test_loss": _stats(
            [c["test_loss"][-1] if c["test_loss"] else None for c in per_task], diverged
        ),
        "final_test_accuracy": _stats(
            [c["test_accuracy"][-1] if c["test_accuracy"] and accuracy else None for c in per_task],
            diverged,
        ),
        "final_train_loss": _stats(
            [c["train_loss"][-1] if c["train_loss"] else None for c in per_task], diverged
        ),
        "auc": _stats(auc, diverged),
        "path_length": _stats([c.get("path_length") for c in per_task], diverged),
        "diverged": {
            "count": int(sum(diverged)),
            "tasks": [n for n, d in zip(names, diverged) if d],
        },
        "curves": per_task,
    }
    if per_task and per_task[0]["train_loss"]:
        report["mean_curves"] = {
            key: np.mean([c[key] for c in per_task], axis=0).tolist()
            for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
            if per_task[0][key] and all(len(c[key]) == len(per_task[0][key]) for c in per_task)
        }
        report["mean_curves"]["test_steps"] = per_task[0]["test_steps"]
    return report
