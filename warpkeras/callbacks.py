"""`LeapCallback`: Leap's pull-forward meta-learning of θ0 during ordinary ``model.fit``.

Leap (Flennerhag et al., 2019) learns the initialisation θ0 from which tasks are adapted by
shortening the length (or energy) of the learning path in (θ, L(θ)) (WarpGrad Eq. 9). The
meta-gradient of one step only needs quantities that training computes anyway: the
parameters before and after the step, the losses there, and the gradient of the step. The
callback observes them around each training batch of ``fit`` and, between tasks, moves θ0
with a meta-optimiser and restarts the task variables from it.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras import objectives
from warpkeras.optimizers import WarpGrad
from warpkeras.partition import UNTAGGED_POLICIES, partition

__all__ = ["LeapCallback"]


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _loss_mean(model):
    """The model's running mean of the training loss (the `keras.metrics.Mean` named
    ``"loss"`` among ``model.metrics``, with its ``total`` and ``count``), or None."""
    for metric in getattr(model, "metrics", None) or []:
        if metric.name == "loss" and hasattr(metric, "total") and hasattr(metric, "count"):
            return metric
    return None


def _momentum_of(rule, variable):
    """The momentum slot of `variable` in the built SGD optimizer `rule` (Keras names it
    ``<variable path with / as _>_momentum``)."""
    name = variable.path.replace("/", "_") + "_momentum"
    found = [m for m in rule.momentums if m.path.split("/")[-1] == name]
    if len(found) != 1:
        raise ValueError(
            f"LeapCallback: cannot find the momentum of '{variable.path}' in "
            f"optimizer '{rule.name}' ({len(found)} slots named '{name}')."
        )
    return found[0]


class LeapCallback(keras.callbacks.Callback):
    """Meta-learns the initialisation θ0 of the task variables with Leap during ``fit``.

    Train one task per ``fit`` call (or call `next_task` yourself) with the callback; it
    accumulates Leap's pull-forward meta-gradient (Leap Eq. 8, WarpGrad Eq. 12) over the
    task's learning path and, at the end of the task, updates θ0 with the meta-optimiser and
    resets the task variables to the new θ0. Warp variables are not touched (compile with
    `warpkeras.WarpGrad` for Warp-Leap: the warp is meta-learned by the optimiser, the
    initialisation by this callback).

    **What is computed, exactly.** Number the training batches of a task k = 0, 1, ... and
    let θ_k be the task variables when batch k starts (read at ``on_train_batch_begin``).
    For each batch the callback records

    * L_k = L(θ_k; B_k), the loss ``fit`` computed for batch k at θ_k (read from the model's
      loss tracker as the batch's increment of its weighted total, so it includes
      regularisation losses);
    * g_k = ∇L(θ_k; B_k), recovered *exactly* from the optimiser step θ_k → θ_{k+1} (see
      below), so no gradient is recomputed.

    When batch k ≥ 1 ends, the step ϑ_{k−1} → ϑ_k of the path ϑ_k = (θ_k, L_k) contributes
    ``objectives.leap_meta_gradient(θ_{k−1}, θ_k, L_{k−1}, L_k, g_{k−1}, norm,
    sign_correction, loss_in_path)``. As in Leap's own algorithm, consecutive losses are
    measured on consecutive batches. The last step of a task (θ_{K−1} → θ_K) contributes
    nothing, because L(θ_K) is never evaluated by ``fit``. The path continues across epochs
    and across ``fit`` calls until `next_task`.

    The gradient g_k is recovered from the step of Keras' ``SGD`` (the model's optimiser, or
    the inner optimiser of `warpkeras.WarpGrad`) with learning rate α (read before the step,
    so schedules are honoured) and momentum buffer m (read before the step):

    * no momentum: θ_{k+1} = θ_k − α g, so g = (θ_k − θ_{k+1}) / α;
    * momentum μ: m' = μ m − α g, θ_{k+1} = θ_k + m', so g = (μ m − Δθ) / α;
    * Nesterov: θ_{k+1} = θ_k + μ m' − α g, so g = (μ² m − Δθ) / (α (1 + μ)).

    This is exact arithmetic; in floating point the recovered gradient carries an absolute
    error of about ε·|θ|/α (ε the machine epsilon). Other optimisers, weight decay, gradient
    clipping, EMA, gradient accumulation, loss scaling, variable constraints and
    ``steps_per_execution > 1`` make the step non-invertible or unobservable and are
    rejected with an error.

    **Between tasks** (`next_task`, called at ``on_train_end`` unless
    ``update_on_train_end=False``): the task's summed meta-gradient is added to the
    meta-batch; after ``tasks_per_update`` tasks the meta-optimiser is applied to θ0 with
    their mean; then the task variables are reset to θ0 and, with ``reset_inner_state``,
    the SGD momentum buffers of the task variables are zeroed.

    Example:

    ```python
    import keras, numpy as np, warpkeras
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    leap = warpkeras.LeapCallback(meta_optimizer=keras.optimizers.SGD(0.05))
    rng = np.random.default_rng(0)
    for task in range(6):
        w = np.array([[1.0], [-1.0], [0.5]]) + 0.1 * rng.normal(size=(3, 1))
        x = rng.normal(size=(32, 3)).astype("float32")
        model.fit(x, (x @ w + 0.5).astype("float32"), batch_size=32, epochs=10,
                  verbose=0, callbacks=[leap])
    print(leap.path_lengths)   # shrinks as θ0 moves towards the tasks' solutions
    ```

    Full batches (or large ones) keep the loss coordinate of the path free of the noise
    between mini-batches, which otherwise dominates the energy; scale the meta learning
    rate to the norm (the length's per-step terms are normalised, the energy's are not).

    Args:
        meta_optimizer: optimiser for θ0 (a Keras optimizer or its name). Default
            ``SGD(0.1)``.
        norm: ``"energy"`` (squared chord lengths, Leap Eq. 7/8; the default) or
            ``"length"`` (chord lengths, WarpGrad Eq. 9/12).
        sign_correction: replace ΔL by −|ΔL| (Leap App. C), so that steps on which the loss
            rose do not pull θ0 uphill.
        loss_in_path: include the loss as a coordinate of the path.
        tasks_per_update: number of tasks whose meta-gradients are averaged per θ0 update.
        update_on_train_end: call `next_task` at the end of every ``fit``.
        reset_inner_state: zero the SGD momentum buffers of task variables between tasks.
        untagged: role of untagged layers (see `warpkeras.partition`); `None` uses the
            policy of a `warpkeras.WarpGrad` optimiser, else ``"task"``.

    Raises:
        TypeError: an argument of the wrong type (a non-bool flag, a non-integer
            `tasks_per_update`, something that is not an optimizer or its identifier).
        ValueError: an unknown `norm`, `untagged` or optimizer name, or
            ``tasks_per_update < 1``.
    """

    def __init__(
        self,
        meta_optimizer: keras.optimizers.Optimizer | str | None = None,
        norm: str = "energy",
        sign_correction: bool = True,
        loss_in_path: bool = True,
        tasks_per_update: int = 1,
        update_on_train_end: bool = True,
        reset_inner_state: bool = True,
        untagged: str | None = None,
    ) -> None:
        super().__init__()
        where = "LeapCallback"
        norm = _v.check_choice(norm, "norm", ("energy", "length"), where=where)
        tasks_per_update = _v.check_int(
            tasks_per_update, "tasks_per_update", minimum=1, where=where, example=1
        )
        untagged = _v.check_choice(
            untagged, "untagged", (None,) + tuple(UNTAGGED_POLICIES), where=where
        )
        sign_correction = _v.check_bool(sign_correction, "sign_correction", where=where)
        loss_in_path = _v.check_bool(loss_in_path, "loss_in_path", where=where)
        update_on_train_end = _v.check_bool(update_on_train_end, "update_on_train_end", where=where)
        reset_inner_state = _v.check_bool(reset_inner_state, "reset_inner_state", where=where)
        meta_optimizer = _v.get_optimizer(meta_optimizer, "meta_optimizer", where=where)
        if meta_optimizer is None:
            meta_optimizer = keras.optimizers.SGD(0.1)
        self.meta_optimizer = meta_optimizer
        self.norm = norm
        self.sign_correction = sign_correction
        self.loss_in_path = loss_in_path
        self.tasks_per_update = tasks_per_update
        self.update_on_train_end = update_on_train_end
        self.reset_inner_state = reset_inner_state
        self.untagged = untagged

        # θ0: one `keras.Variable` per task variable (created at the first `fit`).
        self.theta0 = None
        # The meta-gradient accumulated over the current task's path so far.
        self.task_gradient = None
        # The summed meta-gradient of the last finished task (numpy arrays).
        self.last_task_gradient = None
        # Per finished task: the path's energy (norm="energy") or length ("length").
        self.path_lengths: list[float] = []
        # Number of finished tasks.
        self.num_tasks = 0

        self._task_variables = None
        self._meta_sum = None
        self._tasks_in_batch = 0
        self._current_length = 0.0
        self._steps_in_task = 0
        self._previous = None  # (theta, loss, grad) of the last completed batch
        self._before = None  # snapshot at on_train_batch_begin

    # -- set-up ------------------------------------------------------------------------------
    def _inner_rule(self):
        opt = self.model.optimizer
        if isinstance(opt, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "LeapCallback cannot recover gradients through a LossScaleOptimizer (mixed "
                "precision): it skips and rescales steps. Train in float32 or float64."
            )
        if isinstance(opt, WarpGrad):
            return opt.inner_optimizer, opt.untagged
        return opt, "task"

    def _check_rule(self, rule):
        if not isinstance(rule, keras.optimizers.SGD):
            raise ValueError(
                "LeapCallback recovers each step's gradient from the parameter update, which "
                "needs keras.optimizers.SGD (with or without momentum) as the model's "
                "optimizer or as WarpGrad's inner optimizer; got "
                f"{type(rule).__name__}."
            )
        for attr, ok in (
            ("weight_decay", None),
            ("clipnorm", None),
            ("clipvalue", None),
            ("global_clipnorm", None),
            ("gradient_accumulation_steps", None),
            ("loss_scale_factor", None),
        ):
            if getattr(rule, attr, None) not in (ok, 0, 0.0):
                raise ValueError(
                    f"LeapCallback cannot recover gradients from an SGD step with "
                    f"{attr}={getattr(rule, attr)!r}: the step is no longer α·g."
                )
        if getattr(rule, "use_ema", False):
            raise ValueError("LeapCallback cannot recover gradients with use_ema=True.")

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "optimizer", None) is None:
            raise ValueError("LeapCallback needs a compiled model (call model.compile first).")
        if int(getattr(model, "steps_per_execution", 1) or 1) != 1:
            raise ValueError(
                "LeapCallback observes every training step, so it needs "
                f"steps_per_execution=1 (model '{model.name}' has "
                f"{model.steps_per_execution})."
            )
        rule, policy = self._inner_rule()
        self._check_rule(rule)
        part = partition(model, untagged=self.untagged or policy, require_task=True)
        variables = part.task_variables
        for v in variables:
            if v.constraint is not None:
                raise ValueError(
                    f"Task variable '{v.path}' has a constraint, which changes the SGD step; "
                    "LeapCallback cannot recover its gradient."
                )
        if self._task_variables is not None:
            old = [id(v) for v in self._task_variables]
            if old != [id(v) for v in variables]:
                raise ValueError(
                    "LeapCallback is already attached to another model (or the model's task "
                    "variables changed); use one callback per model."
                )
        self._task_variables = variables
        self._rule = rule
        if _loss_mean(model) is None:
            raise ValueError(
                "LeapCallback reads each batch's loss from the model's loss tracker, which "
                f"model '{model.name}' does not have (compile it with a loss)."
            )
        if self.theta0 is None:
            self.theta0 = [
                keras.Variable(
                    _numpy(v.value),
                    dtype=v.dtype,
                    trainable=False,
                    name=v.path.replace("/", "_") + "_theta0",
                )
                for v in variables
            ]
            self.meta_optimizer.build(self.theta0)
            self._zero_accumulators()
            self._meta_sum = [np.zeros(v.shape, v.dtype) for v in self.theta0]

    def _zero_accumulators(self):
        self.task_gradient = [tf.zeros(v.shape, v.dtype) for v in self.theta0]
        self._current_length = 0.0
        self._steps_in_task = 0
        self._previous = None

    # -- observing the path ---------------------------------------------------------------
    def _momentum_buffers(self):
        rule = self._rule
        if rule.momentum == 0:
            return None
        if not rule.built:
            return [tf.zeros(v.shape, v.dtype) for v in self._task_variables]
        return [tf.convert_to_tensor(_momentum_of(rule, v).value) for v in self._task_variables]

    def _loss_totals(self):
        tracker = _loss_mean(self.model)
        return float(_numpy(tracker.total)), float(_numpy(tracker.count))

    def on_train_batch_begin(self, batch, logs=None):
        theta = [tf.identity(v.value) for v in self._task_variables]
        lr = self._rule.learning_rate
        if float(_numpy(lr)) == 0:
            raise ValueError("LeapCallback cannot recover gradients with learning rate 0.")
        # The constants exactly as SGD.update_step casts them to each variable's dtype.
        lr = [keras.ops.cast(lr, t.dtype) for t in theta]
        self._before = (theta, self._loss_totals(), lr, self._momentum_buffers())

    def _recover_gradient(self, theta, theta_next, lr, buffers):
        grads = []
        for i, (a, b) in enumerate(zip(theta, theta_next)):
            step = b - a
            if buffers is None:
                g = -step / lr[i]
            else:
                mu = keras.ops.cast(self._rule.momentum, a.dtype)
                if self._rule.nesterov:
                    g = (mu * mu * buffers[i] - step) / (lr[i] * (1.0 + mu))
                else:
                    g = (mu * buffers[i] - step) / lr[i]
            grads.append(g)
        return grads

    def on_train_batch_end(self, batch, logs=None):
        if self._before is None:
            return
        theta, (total0, count0), lr, buffers = self._before
        self._before = None
        total1, count1 = self._loss_totals()
        if count1 <= count0:
            raise ValueError(
                "LeapCallback could not read the batch loss: the model's loss tracker did not "
                "advance during the train step (a custom train_step must update it)."
            )
        loss = tf.constant((total1 - total0) / (count1 - count0), dtype=theta[0].dtype)
        theta_next = [tf.identity(v.value) for v in self._task_variables]
        grad = self._recover_gradient(theta, theta_next, lr, buffers)
        if self._previous is not None:
            theta_prev, loss_prev, grad_prev = self._previous
            segment = objectives.leap_meta_gradient(
                theta_prev,
                theta,
                loss_prev,
                loss,
                grad_prev,
                norm=self.norm,
                sign_correction=self.sign_correction,
                loss_in_path=self.loss_in_path,
            )
            self.task_gradient = [a + s for a, s in zip(self.task_gradient, segment)]
            self._current_length += float(
                objectives.leap_path_length(
                    [theta_prev, theta],
                    [loss_prev, loss],
                    norm=self.norm,
                    loss_in_path=self.loss_in_path,
                )
            )
        self._previous = (theta, loss, grad)
        self._steps_in_task += 1

    def on_train_end(self, logs=None):
        if self.update_on_train_end:
            self.next_task()

    # -- between tasks ----------------------------------------------------------------------
    def next_task(self) -> None:
        """Closes the current task: folds its meta-gradient into the meta-batch, updates θ0
        after every ``tasks_per_update`` tasks, and resets the task variables to θ0.

        Call it yourself between tasks when ``update_on_train_end=False`` (e.g. when one
        task is trained with several ``fit`` calls).
        """
        if self.theta0 is None:
            raise ValueError("LeapCallback has not seen any training yet (use it in fit first).")
        self.last_task_gradient = [_numpy(g) for g in self.task_gradient]
        self.path_lengths.append(self._current_length)
        self.num_tasks += 1
        self._meta_sum = [s + g for s, g in zip(self._meta_sum, self.last_task_gradient)]
        self._tasks_in_batch += 1
        if self._tasks_in_batch >= self.tasks_per_update:
            grads = [
                tf.constant(s / self._tasks_in_batch, dtype=v.dtype)
                for s, v in zip(self._meta_sum, self.theta0)
            ]
            self.meta_optimizer.apply(grads, self.theta0)
            self._meta_sum = [np.zeros_like(s) for s in self._meta_sum]
            self._tasks_in_batch = 0
        for v, t in zip(self._task_variables, self.theta0):
            v.assign(t.value)
        if self.reset_inner_state and self._rule.momentum != 0 and self._rule.built:
            for v in self._task_variables:
                m = _momentum_of(self._rule, v)
                m.assign(tf.zeros(m.shape, m.dtype))
        self._zero_accumulators()

    def initial_values(self) -> list[np.ndarray]:
        """θ0 as a list of numpy arrays (in task-variable order)."""
        if self.theta0 is None:
            raise ValueError("LeapCallback has not seen any training yet.")
        return [_numpy(v.value) for v in self.theta0]
