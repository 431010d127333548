"""`WarpGrad`: WarpGrad's continual meta-learning algorithm as a Keras optimizer.

With ``model.compile(optimizer=warpkeras.WarpGrad(...))`` a plain ``model.fit`` on a stream
of batches runs WarpGrad's continual algorithm (Flennerhag et al., Algorithm 3) with the
approximate meta-objective (the inner gradient is held constant, App. G):

* task variables θ take one step of the *inner* rule per batch (SGD by default, or any Keras
  optimizer, e.g. ``keras.optimizers.SGD(0.1, momentum=0.9)``);
* gradients of the warp variables φ are accumulated, and every ``meta_interval`` (η) steps
  their mean is handed to the *meta* optimizer (e.g. ``keras.optimizers.Adam(1e-3)``), after
  which the accumulator is reset.

No forward pass is added: see `WarpGrad` for why the warp gradients that ``fit`` computes
anyway are the approximate meta-gradients.
"""

import copy
import weakref

import keras
import tensorflow as tf
from keras import ops
from keras.src.utils import tracking

from warpkeras import _validation as _v
from warpkeras import roles
from warpkeras.partition import UNTAGGED_POLICIES, partition

__all__ = ["WarpGrad"]

_FROZEN = "frozen"

# Keyword arguments of the base optimizer that make no sense on the wrapper: they belong to
# the inner or the meta optimizer. Values equal to the defaults are accepted (and dropped)
# so that configs written by other Keras versions still load.
_BASE_DEFAULTS = {
    "learning_rate": None,
    "weight_decay": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


def _get_optimizer(identifier, what):
    return _v.get_optimizer(identifier, what, allow_none=False, where="WarpGrad")


@keras.saving.register_keras_serializable(package="warpkeras")
class WarpGrad(keras.optimizers.Optimizer):
    """Meta-learns warp layers during ordinary ``model.fit`` (WarpGrad, Algorithm 3).

    Each call of `apply` (one training batch of ``fit``) does three things with the
    gradients Keras computed at the current parameters (θ_k, φ):

    1. the task variables take one step of the inner optimizer: θ_{k+1} = inner(θ_k, g_θ);
    2. the warp gradient ∂L(θ_k; φ)/∂φ on batch k is added to an accumulator;
    3. when η = ``meta_interval`` gradients have been accumulated, the meta optimizer is
       applied to the warp variables with their **mean** (the sum divided by η) and the
       accumulator is reset. Steps 1 and 3 both use gradients computed before any update.

    **Why no extra forward pass is needed.** Batch k is evaluated at θ_k = θ_{k−1} −
    α ∇L(θ_{k−1}; φ), the point produced by the inner step on batch k−1. With the inner
    gradient held constant, the approximate WarpGrad objective for that step (Eq. 3, App. G)

        L_meta(θ_{k−1} − α sg[∇L_task(θ_{k−1}; φ)]; φ)

    has φ-gradient ∂L(θ_k; φ)/∂φ evaluated on fresh data (batch k), which is exactly the
    warp gradient Keras computes for batch k. So the warp gradient of batch k (k ≥ 1) is
    credited to the inner step k−1 → k, with batch k−1 as the task batch and batch k as the
    meta batch. The warp gradient of the very first batch (k = 0) is evaluated at θ_0, where
    no inner step precedes it: it is the meta-loss at the initialisation and is included as
    it comes. With any other inner rule (momentum, Adam) the same holds with θ_k produced by
    that rule. When a meta-update falls between batches k−1 and k, the gradient of batch k
    is taken at the new φ (the online algorithm's usual one-step lag). Meta-updates happen
    after batches η−1, 2η−1, ... (counting from 0); the accumulator and its count persist
    across ``fit`` calls and through ``model.save``.

    **Finding task and warp variables.** Roles come from the tags of `warpkeras.warp` /
    `warpkeras.task` (and ``untagged``), resolved with `warpkeras.partition` when the
    optimizer is built. Keras hands an optimizer only a list of variables, so the optimizer
    must be given the model: ``WarpGrad(model=model)`` or ``optimizer.bind(model)`` (before
    the first ``fit``). This works with Sequential, functional and subclassed models. The
    resolved roles are written into the optimizer's config, so a model saved with
    ``model.save`` and restored with ``keras.models.load_model`` needs no re-binding.

    The update is graph-friendly (the meta-update is a ``cond`` on a step counter), so it
    works with ``steps_per_execution > 1``, ``jit_compile=True`` and ``run_eagerly=True``
    alike. It runs on one device: under a multi-replica ``tf.distribute`` strategy it
    refuses to build.

    Example:

    ```python
    import keras, numpy as np, warpkeras
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(16, activation="tanh"),            # untagged: task
        warpkeras.warp(keras.layers.Dense(16)),                 # meta-learned
        keras.layers.Dense(1),
    ])
    model.compile(
        optimizer=warpkeras.WarpGrad(
            inner_optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            meta_optimizer=keras.optimizers.Adam(1e-3),
            meta_interval=5,
            model=model,
        ),
        loss="mse",
    )
    x, y = np.random.rand(64, 4), np.random.rand(64, 1)
    model.fit(x, y, batch_size=8, shuffle=False, epochs=1, verbose=0)
    ```

    Args:
        inner_optimizer: the rule applied to task variables at every step: a Keras
            optimizer, its name or its serialised config. `None`: ``SGD(learning_rate)``.
            Clipping, weight decay, EMA and schedules are configured on it.
        meta_optimizer: the optimizer applied to warp variables every η steps (same forms).
            `None`: ``Adam(1e-3)``.
        meta_interval: η ≥ 1, the number of steps between meta-updates.
        learning_rate: the learning rate of the default inner SGD; only valid without
            `inner_optimizer` (set it on the inner optimizer otherwise). Default 0.01.
        model: the model being trained (optional here, see `bind`). Held by weak reference.
        untagged: role of trainable variables of untagged layers, as in
            `warpkeras.partition`: ``"task"`` (default), ``"warp"``, ``"frozen"`` (gradients
            ignored, never updated) or ``"error"``.
        variable_roles: roles of the variables the optimizer is built on (in
            ``model.trainable_variables`` order); written by `get_config`, so normally left
            to Keras' deserialisation.
        variable_paths: the matching variable paths (used in error messages only).
        name: the optimizer's name.

    Raises:
        TypeError: an argument of the wrong type (e.g. ``meta_interval="5"``, an optimizer
            class instead of an instance, a `model` that is not a `keras.Model`).
        ValueError: a value out of range (``meta_interval < 1``, a non-positive or
            non-finite `learning_rate`, an unknown optimizer name or `untagged` policy),
            or the same optimizer instance as inner and meta optimizer.
    """

    def __init__(
        self,
        inner_optimizer=None,
        meta_optimizer=None,
        meta_interval=1,
        learning_rate=None,
        model=None,
        untagged="task",
        variable_roles=None,
        variable_paths=None,
        name="warpgrad",
        **kwargs,
    ):
        for key, default in _BASE_DEFAULTS.items():
            if key == "learning_rate" or key not in kwargs:
                continue
            value = kwargs.pop(key)
            if value != default:
                raise ValueError(
                    f"WarpGrad does not take `{key}`: set it on the inner optimizer (task "
                    "variables) or on the meta optimizer (warp variables)."
                )
        if kwargs:
            raise ValueError(f"WarpGrad got unexpected argument(s): {sorted(kwargs)}.")
        where = "WarpGrad"
        meta_interval = _v.check_int(
            meta_interval, "meta_interval", minimum=1, where=where, example=5
        )
        untagged = _v.check_choice(untagged, "untagged", UNTAGGED_POLICIES, where=where)
        learning_rate = _v.check_float(
            learning_rate,
            "learning_rate",
            minimum=0.0,
            min_inclusive=False,
            allow_none=True,
            where=where,
            example=0.01,
        )
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{where}: name={_v.describe(name)} is not valid: expected a "
                "non-empty string, e.g. name='warpgrad'."
            )
        if model is not None and not isinstance(model, keras.Model):
            raise TypeError(
                f"{where}: model={_v.describe(model)} is not valid: expected the "
                "keras.Model being trained, or None (then call bind(model))."
            )
        for key, value in (("variable_roles", variable_roles), ("variable_paths", variable_paths)):
            if value is not None and (
                isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple))
            ):
                raise TypeError(
                    f"{where}: {key}={_v.describe(value)} is not valid: expected "
                    "a list of strings or None (normally written by get_config)."
                )
        if inner_optimizer is None:
            inner_optimizer = keras.optimizers.SGD(0.01 if learning_rate is None else learning_rate)
        elif learning_rate is not None:
            raise ValueError(
                "Pass either `learning_rate` (for the default inner SGD) or "
                "`inner_optimizer`, not both: set the learning rate on the inner optimizer."
            )
        else:
            inner_optimizer = _get_optimizer(inner_optimizer, "inner_optimizer")
        if meta_optimizer is None:
            meta_optimizer = keras.optimizers.Adam(1e-3)
        else:
            meta_optimizer = _get_optimizer(meta_optimizer, "meta_optimizer")
        if inner_optimizer is meta_optimizer:
            raise ValueError(
                "inner_optimizer and meta_optimizer must be two optimizer instances: one "
                "optimizer cannot hold state for both task and warp variables."
            )
        for opt, what in ((inner_optimizer, "inner_optimizer"), (meta_optimizer, "meta_optimizer")):
            if isinstance(opt, WarpGrad):
                raise TypeError(f"{what} cannot itself be a WarpGrad optimizer.")
            if isinstance(opt, keras.optimizers.LossScaleOptimizer):
                raise TypeError(
                    f"{what} cannot be a LossScaleOptimizer; Keras wraps the whole WarpGrad "
                    "optimizer for mixed precision instead."
                )

        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.meta_optimizer = meta_optimizer
        self.meta_interval = meta_interval
        self.untagged = untagged
        self._configured_roles = list(variable_roles) if variable_roles is not None else None
        self._configured_paths = list(variable_paths) if variable_paths is not None else None
        if self._configured_roles is not None:
            bad = sorted(set(self._configured_roles) - {roles.TASK, roles.WARP, _FROZEN})
            if bad:
                raise ValueError(f"variable_roles contains unknown roles {bad}.")
        self._model_ref = None
        self._roles = None
        if model is not None:
            self.bind(model)

    # -- binding to a model -----------------------------------------------------------------
    def bind(self, model):
        """Tells the optimizer which model it trains, so it can read the layers' roles.

        Call it before the first ``fit`` (or pass ``model=`` to the constructor). Binding an
        already built optimizer checks that the model's roles match the ones it was built
        with.

        Example:

        ```python
        opt = warpkeras.WarpGrad(meta_interval=5).bind(model)
        model.compile(optimizer=opt, loss="mse")
        ```

        Args:
            model: a `keras.Model` whose layers are tagged with `warpkeras.warp` /
                `warpkeras.task`.

        Returns:
            The optimizer itself.
        """
        if not isinstance(model, keras.Model):
            raise TypeError(f"WarpGrad.bind() takes a keras.Model, got {type(model).__name__}.")
        self._model_ref = weakref.ref(model)
        if self.built:
            expected = self._roles_from_model(model, self._trainable_variables)
            if expected != self._roles:
                raise roles.RoleError(
                    f"WarpGrad '{self.name}' was built with variable roles {self._roles} but "
                    f"model '{model.name}' gives {expected}; create a new optimizer for a "
                    "model with different roles."
                )
        return self

    def _bound_model(self):
        return self._model_ref() if self._model_ref is not None else None

    def _roles_from_model(self, model, var_list):
        if not model.built:
            raise ValueError(
                f"Model '{model.name}' is not built: give it a keras.Input or call it once "
                "before training it with WarpGrad."
            )
        part = partition(model, untagged=self.untagged, require_warp=True, require_task=True)
        by_key = {}
        for role, group in (
            (roles.TASK, part.task_variables),
            (roles.WARP, part.warp_variables),
            (_FROZEN, part.frozen_variables),
        ):
            for v in group:
                by_key[self._var_key(v)] = role
        resolved = []
        for v in var_list:
            role = by_key.get(self._var_key(v))
            if role is None:
                raise ValueError(
                    f"WarpGrad '{self.name}' was asked to optimise variable '{v.path}', which "
                    f"is not a trainable variable of model '{model.name}'. Bind the optimizer "
                    "to the model that is being trained."
                )
            resolved.append(role)
        return resolved

    def _resolve_roles(self, var_list):
        model = self._bound_model()
        if model is not None:
            return self._roles_from_model(model, var_list)
        if self._configured_roles is not None:
            if len(self._configured_roles) != len(var_list):
                saved = self._configured_paths or []
                raise ValueError(
                    f"WarpGrad '{self.name}' was configured with roles for "
                    f"{len(self._configured_roles)} variables {saved} but is being built on "
                    f"{len(var_list)} variables {[v.path for v in var_list]}. Bind it to the "
                    "model with `optimizer.bind(model)` to re-read the roles from the tags."
                )
            return list(self._configured_roles)
        raise ValueError(
            f"WarpGrad '{self.name}' does not know which variables are warp variables: "
            "Keras gives an optimizer only a list of variables, not the model. Pass the "
            "model, `warpkeras.WarpGrad(..., model=model)`, or call "
            "`optimizer.bind(model)` before `fit`."
        )

    # -- building -----------------------------------------------------------------------------
    @tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        """Creates the accumulators and builds the inner and meta optimizers.

        Args:
            var_list: the model's trainable variables (Keras passes
                ``model.trainable_variables``).
        """
        if self.built:
            return
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            raise NotImplementedError(
                f"WarpGrad runs on one device; it was built under a tf.distribute strategy "
                f"with {replicas} replicas, where its warp-gradient accumulators would hold "
                "per-replica gradients."
            )
        var_list = list(var_list)
        resolved = self._resolve_roles(var_list)
        if roles.WARP not in resolved:
            raise roles.RoleError(
                f"WarpGrad '{self.name}': none of the {len(var_list)} variables is a warp "
                "variable; tag warp layers with warpkeras.warp(...)."
            )
        if roles.TASK not in resolved:
            raise roles.RoleError(
                f"WarpGrad '{self.name}': none of the {len(var_list)} variables is a task "
                "variable; nothing would be adapted."
            )
        self._roles = resolved
        self._task_vars = [v for v, r in zip(var_list, resolved) if r == roles.TASK]
        self._warp_vars = [v for v, r in zip(var_list, resolved) if r == roles.WARP]
        self._role_by_key = {self._var_key(v): r for v, r in zip(var_list, resolved)}
        self._warp_position = {self._var_key(v): i for i, v in enumerate(self._warp_vars)}
        self._task_keys = {self._var_key(v) for v in self._task_vars}
        self._pending = self.add_variable(
            shape=(), dtype="int64", initializer="zeros", name="pending_meta_gradients"
        )
        self._accumulators = [
            self.add_variable_from_reference(v, name="warp_gradient_sum") for v in self._warp_vars
        ]
        with keras.name_scope("inner", caller=self):
            self._build_child(self.inner_optimizer, self._task_vars, "inner_optimizer")
        with keras.name_scope("meta", caller=self):
            self._build_child(self.meta_optimizer, self._warp_vars, "meta_optimizer")
        super().build(var_list)

    def _build_child(self, opt, variables, what):
        if opt.built:
            known = getattr(opt, "_trainable_variables", [])
            if [self._var_key(v) for v in known] != [self._var_key(v) for v in variables]:
                raise ValueError(
                    f"The {what} '{opt.name}' was already built on other variables; give "
                    "WarpGrad a fresh optimizer instance."
                )
            return
        opt.build(variables)

    # -- state ----------------------------------------------------------------------------------
    @property
    def variables(self):
        """Own variables (iterations, accumulators, count) then the inner and meta optimizers'."""
        return self._variables[:] + self.inner_optimizer.variables + self.meta_optimizer.variables

    def set_weights(self, weights):
        if not self.built:
            raise ValueError(
                f"WarpGrad '{self.name}' is not built yet; call optimizer.build(variables) "
                "before set_weights()."
            )
        variables = self.variables
        if len(weights) != len(variables):
            raise ValueError(
                f"WarpGrad '{self.name}' has {len(variables)} variables, got {len(weights)} "
                "weights."
            )
        for v, w in zip(variables, weights):
            if tuple(v.shape) != tuple(w.shape):
                raise ValueError(
                    f"Optimizer variable '{v.path}' has shape {tuple(v.shape)}, got a weight "
                    f"of shape {tuple(w.shape)}."
                )
            v.assign(w)

    @property
    def learning_rate(self):
        """The inner optimizer's learning rate (callbacks such as LearningRateScheduler
        adjust the inner rule)."""
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.inner_optimizer.learning_rate = value

    @property
    def task_variables(self):
        """The variables the inner rule updates (after `build`)."""
        self._require_built()
        return list(self._task_vars)

    @property
    def warp_variables(self):
        """The variables the meta optimizer updates (after `build`)."""
        self._require_built()
        return list(self._warp_vars)

    @property
    def pending_steps(self):
        """How many warp gradients are in the accumulator (0 ≤ n < η between steps)."""
        self._require_built()
        return int(self._pending.numpy())

    def accumulated_warp_gradient(self):
        """The mean of the accumulated warp gradients (zeros when none is pending).

        Returns:
            A list of tensors matching `warp_variables`.
        """
        self._require_built()
        n = ops.cast(ops.maximum(self._pending, 1), self._accumulators[0].dtype)
        return [acc / ops.cast(n, acc.dtype) for acc in self._accumulators]

    def _require_built(self):
        if not self.built:
            raise ValueError(
                f"WarpGrad '{self.name}' is not built yet: it is built on the first training "
                "step (or by optimizer.build(model.trainable_variables))."
            )

    # -- the update -----------------------------------------------------------------------------
    def apply(self, grads, trainable_variables=None):
        """One step: inner update of task variables, accumulation (and every η steps the
        meta-update) of warp variables.

        Args:
            grads: gradients, one per variable (``None`` entries are skipped).
            trainable_variables: the variables; defaults to the list the optimizer was built
                on (it is built on the first call).
        """
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `trainable_variables`, WarpGrad must "
                    "already be built: call optimizer.build(model.trainable_variables)."
                )
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
            self._check_variables_are_known(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"WarpGrad got {len(grads)} gradients for {len(trainable_variables)} variables."
            )

        task_grads, task_vars = [], []
        warp_grads = [None] * len(self._warp_vars)
        for g, v in zip(grads, trainable_variables):
            key = self._var_key(v)
            role = self._role_by_key[key]
            if role == roles.TASK:
                if g is not None:
                    task_grads.append(g)
                    task_vars.append(v)
            elif role == roles.WARP:
                warp_grads[self._warp_position[key]] = g

        with keras.name_scope(self.name, caller=self):
            if task_grads:
                self.inner_optimizer.apply(task_grads, task_vars)
            for acc, g in zip(self._accumulators, warp_grads):
                if g is not None:
                    self.assign_add(acc, g)
            self._pending.assign_add(1)
            ops.cond(
                ops.greater_equal(self._pending, self.meta_interval),
                self._meta_update,
                lambda: None,
            )
        self._iterations.assign_add(1)

    def _meta_update(self):
        """Applies the meta optimizer with the mean accumulated gradient; resets."""
        count = self._pending.value
        grads = [acc.value / ops.cast(count, acc.dtype) for acc in self._accumulators]
        self.meta_optimizer.apply(grads, self._warp_vars)
        for acc in self._accumulators:
            acc.assign(ops.zeros(acc.shape, dtype=acc.dtype))
        self._pending.assign(0)

    def flush(self):
        """Applies a meta-update now with whatever is accumulated (a no-op when nothing
        is), e.g. at the end of a task or of training. Graph-friendly.

        Example:

        ```python
        model.fit(x, y, epochs=1)
        model.optimizer.flush()
        ```
        """
        self._require_built()
        ops.cond(ops.greater(self._pending, 0), self._meta_update, lambda: None)

    def reset_accumulator(self):
        """Discards the accumulated warp gradients without a meta-update."""
        self._require_built()
        for acc in self._accumulators:
            acc.assign(ops.zeros(acc.shape, dtype=acc.dtype))
        self._pending.assign(0)

    def finalize_variable_values(self, var_list):
        keys = {self._var_key(v) for v in var_list}
        task = [v for v in self._task_vars if self._var_key(v) in keys]
        warp = [v for v in self._warp_vars if self._var_key(v) in keys]
        if task:
            self.inner_optimizer.finalize_variable_values(task)
        if warp:
            self.meta_optimizer.finalize_variable_values(warp)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError(
            "WarpGrad.stateless_apply is not supported (the TensorFlow backend has no "
            "stateless optimizer application)."
        )

    # -- serialisation ------------------------------------------------------------------------
    def get_config(self):
        if self._roles is not None:
            variable_roles = list(self._roles)
            variable_paths = [v.path for v in self._trainable_variables]
        else:
            variable_roles = (
                list(self._configured_roles) if self._configured_roles is not None else None
            )
            variable_paths = (
                list(self._configured_paths) if self._configured_paths is not None else None
            )
        return {
            "name": self.name,
            "inner_optimizer": keras.optimizers.serialize(self.inner_optimizer),
            "meta_optimizer": keras.optimizers.serialize(self.meta_optimizer),
            "meta_interval": self.meta_interval,
            "untagged": self.untagged,
            "variable_roles": variable_roles,
            "variable_paths": variable_paths,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("inner_optimizer", "meta_optimizer"):
            if config.get(key) is not None:
                # `deserialize` edits the dict it is given: hand it a copy.
                config[key] = keras.optimizers.deserialize(
                    copy.deepcopy(config[key]), custom_objects=custom_objects
                )
        return cls(**config)

    def __repr__(self):
        return (
            f"<WarpGrad '{self.name}': inner={type(self.inner_optimizer).__name__}, "
            f"meta={type(self.meta_optimizer).__name__}, meta_interval={self.meta_interval}>"
        )
