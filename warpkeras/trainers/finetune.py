"""Baselines without a meta-objective: multi-task fine-tuning and no meta-training."""

import math
import warnings

import keras
import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras.trainers.base import MetaTrainer, MetaTrainingError, _check_head_layers


class FineTuneTrainer(MetaTrainer):
    """Pre-training on the meta-training tasks, then fine-tuning on new tasks.

    Each meta step trains the shared parameters on the sampled tasks one after another,
    K SGD steps each, carrying the parameters from task to task (no meta-gradient). With
    ``multi_headed=True`` every task has its own head (the `head_layers`' values, kept per
    task name and started from the head's initial values); at evaluation the head is reset
    to those initial values and the rest starts from the pre-trained parameters
    (the "multi-headed fine-tuning" baseline of the Leap and WarpGrad papers). With
    ``multi_headed=False`` the head is shared like the rest (single-headed).

    Example:

    ```python
    trainer = warpkeras.FineTuneTrainer(model, "sparse_categorical_crossentropy",
                                        head_layers=[model.layers[-1]],
                                        inner_learning_rate=0.01, inner_steps=100)
    ```

    Args:
        model: a built `keras.Model`.
        loss: the task loss.
        head_layers: the layers forming the head (required with `multi_headed`).
        multi_headed: one head per task.
        **kwargs: see `warpkeras.trainers.MetaTrainer`. Tasks are trained one after
            another, so ``parallel="auto"`` (the default) resolves to ``"sequential"``.
    """

    _adapts_one_task_at_a_time = True  # parallel="auto" → "sequential"

    def __init__(self, model, loss, head_layers=None, multi_headed=True, **kwargs):
        multi_headed = _v.check_bool(multi_headed, "multi_headed", where=type(self).__name__)
        head_layers = _check_head_layers(head_layers, type(self).__name__)
        if multi_headed and not head_layers:
            raise MetaTrainingError(
                f"{type(self).__name__}: multi-headed fine-tuning needs the head's layers: "
                "pass head_layers=[...] (e.g. head_layers=[model.layers[-1]]) or "
                "multi_headed=False."
            )
        super().__init__(
            model,
            loss,
            warp_mode=None,
            init_objective=None,
            head_layers=head_layers if multi_headed else None,
            **kwargs,
        )
        self.multi_headed = multi_headed
        self._heads = {}

    def train_step(self, tasks, rng):
        packer = self._theta_packer
        losses, metrics, dropped, diverged, firsts = [], [], 0, [], []
        body = [tf.convert_to_tensor(v.value) for v in self.partition.task_variables]
        for task, task_rng in zip(tasks, rng.spawn(len(tasks))):
            theta, velocity, state = self._start_values(task, head=self._heads.get(task.name))
            values = packer.unpack(theta)
            for i, t in enumerate(body):
                if i not in self.head_indices:
                    values[i] = t
            theta = packer.pack(values)
            batches = self._checked(task, task.batches("train", task_rng), "train")
            ok_all = True
            first = None  # the first batch's inputs, for the moving statistics
            for _ in range(self.inner_steps):
                x, y = next(batches)
                first = x if first is None else first
                theta, velocity, state, loss, metric, _, ok = self._plain_step(
                    theta, velocity, state, x, y
                )
                if not bool(ok):
                    ok_all = False
                    break
            if not ok_all:
                dropped += 1
                diverged.append(str(task.name))
                warnings.warn(
                    f"Meta step {int(self.step.numpy())}: task '{task.name}' produced a "
                    "non-finite loss or gradient; it is skipped.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            losses.append(float(loss))
            metrics.append(float(metric))
            body = packer.unpack(theta)
            if self.multi_headed:
                self._heads[task.name] = [body[i] for i in self.head_indices]
            self.partition.assign_state(self._state_packer.unpack(state))
            firsts.append(first)
        values = list(body)
        for i, h in zip(self.head_indices, self._initial_head):
            values[i] = h
        self.partition.assign_task(values)
        self._write_moving_statistics(firsts)  # batch-norm statistics at the new θ0
        self.nan_tasks.assign_add(dropped)
        self._record_diverged(diverged)
        logs = {
            "loss": float(np.mean(losses)) if losses else math.nan,
            "diverged_tasks": dropped,
            "nan_tasks": int(self.nan_tasks.numpy()),
        }
        if self.accuracy:
            logs["accuracy"] = float(np.mean(metrics)) if metrics else math.nan
        return logs


class NoMetaTrainer(MetaTrainer):
    """No meta-training: every task adapts from the model's (random) initialisation.

    `fit` does nothing but record that there was nothing to learn; `evaluate` and `adapt`
    work as for every trainer, making this the "no pre-training" / SGD baseline.

    Args:
        model: a built `keras.Model`.
        loss: the task loss.
        **kwargs: see `warpkeras.trainers.MetaTrainer`.
    """

    _adapts_one_task_at_a_time = True  # no meta step: parallel="auto" → "sequential"

    def __init__(self, model, loss, **kwargs):
        super().__init__(model, loss, warp_mode=None, init_objective=None, **kwargs)

    def train_step(self, tasks, rng):
        return {}

    def fit(self, tasks=None, meta_steps=0, **kwargs):
        self.history = keras.callbacks.History()
        self.history.history = {}
        return self.history
