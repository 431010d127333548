"""Partition of a built Keras model into task variables θ and warp variables φ."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from warpkeras import roles

UNTAGGED_POLICIES = ("task", "warp", "frozen", "error")


def _children(layer):
    return layer._flatten_layers(include_self=False, recursive=False)


def _assign_roles(model, untagged):
    """Maps id(variable) -> (role, owning layer) for every trainable variable of `model`."""
    found = {}

    def visit(layer, inherited):
        role = roles.role_of(layer)
        if role is not None and not layer.trainable and layer.weights:
            raise roles.RoleError(
                f"Layer '{layer.name}' ({type(layer).__name__}) is tagged '{role}' but is "
                "not trainable (trainable=False): its variables can be neither adapted nor "
                "meta-learned. Set `layer.trainable = True` or remove the tag."
            )
        effective = role if role is not None else inherited
        for v in layer._trainable_variables:
            if not v.trainable:
                continue
            prev = found.get(id(v))
            if prev is not None and prev[0] != effective and None not in (prev[0], effective):
                raise roles.RoleError(
                    f"Variable '{v.path}' is shared by layer '{prev[1].name}' (role "
                    f"'{prev[0]}') and layer '{layer.name}' (role '{effective}')."
                )
            if prev is None or prev[0] is None:
                found[id(v)] = (effective, layer)
        for child in _children(layer):
            visit(child, effective)

    visit(model, None)
    resolved = {}
    for key, (role, layer) in found.items():
        if role is None:
            if untagged == "error":
                raise roles.RoleError(
                    f"Layer '{layer.name}' ({type(layer).__name__}) has trainable "
                    "variables but no role. Tag it with warpkeras.task(...) or "
                    "warpkeras.warp(...), or partition with untagged='task'|'warp'|'frozen'."
                )
            role = untagged
        resolved[key] = (role, layer)
    return resolved


class Partition:
    """A built `keras.Model` seen as a function of task variables θ and warp variables φ.

    The partition is the bridge between Keras and the pure functions of
    `warpkeras.objectives`: `call(theta, phi, x)` runs the model at *any* parameter values
    (through `Model.stateless_call`), without touching its variables, differentiably and
    inside `tf.function`.

    Variables are grouped by role (see `warpkeras.roles`): task variables θ (adapted on each
    task; their current values are the initialisation θ0), warp variables φ (meta-learned),
    frozen variables (trainable in Keras but held fixed here: untagged variables under
    ``untagged="frozen"``), and the model's non-trainable state (batch-norm statistics, RNG
    seeds), which is threaded through calls.

    Example:

    ```python
    import keras, warpkeras
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        warpkeras.layers.WarpDense(),
        keras.layers.Dense(1),
    ])
    p = warpkeras.partition(model)
    theta0, phi = p.initial_task_values(), p.warp_values()
    y, state = p.call(theta0, phi, keras.ops.ones((2, 4)))
    ```

    Args:
        model: a built `keras.Model` (call it once, or give it an `Input`).
        untagged: what untagged trainable variables are: ``"task"`` (default),
            ``"warp"``, ``"frozen"`` (not updated by anything) or ``"error"``.
        require_warp: raise if the model has no warp variables.
        require_task: raise if the model has no task variables.
    """

    def __init__(
        self,
        model: keras.Model,
        untagged: str = "task",
        require_warp: bool = False,
        require_task: bool = True,
    ) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"partition() takes a keras.Model, got {type(model).__name__}; wrap a layer "
                "in keras.Sequential([...]) first."
            )
        if untagged not in UNTAGGED_POLICIES:
            raise ValueError(f"untagged={untagged!r}: expected one of {UNTAGGED_POLICIES}.")
        if not model.built:
            raise ValueError(
                f"Model '{model.name}' is not built: give it a keras.Input or call it on a "
                "batch once before partitioning it."
            )
        self.model = model
        self.untagged = untagged
        assignment = _assign_roles(model, untagged)
        self.task_indices: list[int] = []
        self.warp_indices: list[int] = []
        self.frozen_indices: list[int] = []
        for i, v in enumerate(model.trainable_variables):
            role, _ = assignment.get(id(v), (untagged, None))
            {"task": self.task_indices, "warp": self.warp_indices}.get(
                role, self.frozen_indices
            ).append(i)
        tv = model.trainable_variables
        self.task_variables = [tv[i] for i in self.task_indices]
        self.warp_variables = [tv[i] for i in self.warp_indices]
        self.frozen_variables = [tv[i] for i in self.frozen_indices]
        self.state_variables = list(model.non_trainable_variables)
        seed_ids = {
            id(g.state)
            for layer in model._flatten_layers(include_self=True, recursive=True)
            for g in getattr(layer, "_seed_generators", ())
        }
        self.seed_indices = [
            i
            for i, v in enumerate(self.state_variables)
            if id(v) in seed_ids or v.path.endswith("seed_generator_state")
        ]
        """Positions in `state_variables` of random-number-generator states (`Dropout`,
        `GaussianNoise`, ... keep a `keras.random.SeedGenerator` whose ``[seed, counter]``
        state advances on every draw)."""
        self._num_trainable = len(tv)
        if require_task and not self.task_variables:
            raise roles.RoleError(
                f"Model '{model.name}' has no task variables: nothing would be adapted. "
                "Tag the layers that should adapt with warpkeras.task(...)."
            )
        if require_warp and not self.warp_variables:
            raise roles.RoleError(
                f"Model '{model.name}' has no warp variables: tag layers with "
                "warpkeras.warp(...) or insert layers from warpkeras.layers."
            )

    # -- current values ------------------------------------------------------------------
    def initial_task_values(self) -> list[tf.Tensor]:
        """θ0: the current values of the task variables (a list of tensors)."""
        return [tf.convert_to_tensor(v.value) for v in self.task_variables]

    def warp_values(self) -> list[tf.Tensor]:
        """φ: the current values of the warp variables."""
        return [tf.convert_to_tensor(v.value) for v in self.warp_variables]

    def state_values(self) -> list[tf.Tensor]:
        """The model's non-trainable state (e.g. batch-norm moving statistics)."""
        return [tf.convert_to_tensor(v.value) for v in self.state_variables]

    def reseed(self, state: list[tf.Tensor], key: Sequence[int]) -> list[tf.Tensor]:
        """`state` with every random-number-generator state replaced by one derived from
        `key`, so that the random draws (dropout masks, noise) of a run of forward passes
        are a function of `key` alone.

        Each generator's state becomes ``[s, 0]`` with ``s`` drawn from
        ``numpy.random.SeedSequence(key + (generator index,))``; the counter then advances by
        one on every draw, so successive forward passes that carry the state on draw fresh
        values.

        Args:
            state: a list of state values in `state_variables` order.
            key: a tuple of non-negative ints (e.g. seed, meta step, task, purpose).

        Returns:
            A new list (the same list when the model has no generators).
        """
        if not self.seed_indices:
            return state
        state = list(state)
        for j, i in enumerate(self.seed_indices):
            s = np.random.SeedSequence([int(k) for k in key] + [j]).generate_state(1)[0]
            state[i] = tf.constant([int(s) >> 1, 0], dtype=self.state_variables[i].dtype)
        return state

    def frozen_values(self) -> list[tf.Tensor]:
        """The values of the frozen variables (trainable, but neither task nor warp)."""
        return [tf.convert_to_tensor(v.value) for v in self.frozen_variables]

    # -- writing values back ---------------------------------------------------------------
    def assign_task(self, theta: Sequence[tf.Tensor]) -> None:
        """Assigns `theta` to the task variables.

        Args:
            theta: θ, one tensor per task variable (`task_variables`' order).

        Raises:
            ValueError: `theta` does not hold one value per task variable.
        """
        _assign(self.task_variables, theta, "task")

    def assign_warp(self, phi: Sequence[tf.Tensor]) -> None:
        """Assigns `phi` to the warp variables.

        Args:
            phi: φ, one tensor per warp variable (`warp_variables`' order).

        Raises:
            ValueError: `phi` does not hold one value per warp variable.
        """
        _assign(self.warp_variables, phi, "warp")

    def assign_state(self, state: Sequence[tf.Tensor]) -> None:
        """Assigns `state` to the state variables.

        Args:
            state: one tensor per state variable (`state_variables`' order).

        Raises:
            ValueError: `state` does not hold one value per state variable.
        """
        _assign(self.state_variables, state, "state")

    # -- running the model ---------------------------------------------------------------
    def merge(
        self,
        theta: Sequence[tf.Tensor],
        phi: Sequence[tf.Tensor],
        frozen: Sequence[tf.Tensor] | None = None,
    ) -> list[tf.Tensor]:
        """All trainable values in `model.trainable_variables` order."""
        if len(theta) != len(self.task_indices):
            raise ValueError(f"Expected {len(self.task_indices)} task tensors, got {len(theta)}.")
        if len(phi) != len(self.warp_indices):
            raise ValueError(f"Expected {len(self.warp_indices)} warp tensors, got {len(phi)}.")
        if frozen is None:
            frozen = [v.value for v in self.frozen_variables]
        values = [None] * self._num_trainable
        for idx, group in (
            (self.task_indices, theta),
            (self.warp_indices, phi),
            (self.frozen_indices, frozen),
        ):
            for i, t in zip(idx, group):
                values[i] = t
        return values

    def call(
        self,
        theta: Sequence[tf.Tensor],
        phi: Sequence[tf.Tensor],
        x,
        state: Sequence[tf.Tensor] | None = None,
        training: bool = False,
        return_losses: bool = False,
    ) -> tuple:
        """Runs the model at task values `theta` and warp values `phi`.

        Args:
            theta: list of task tensors, in `task_variables` order.
            phi: list of warp tensors, in `warp_variables` order.
            x: the model's input.
            state: non-trainable values; defaults to the model's current state.
            training: passed to the model (batch norm uses batch statistics, dropout is on).
            return_losses: also return the regularisation losses added during the call.

        Returns:
            ``(outputs, new_state)``, or ``(outputs, new_state, losses)``.
        """
        if state is None:
            state = [v.value for v in self.state_variables]
        kwargs = {"return_losses": return_losses}
        if getattr(self.model, "_call_has_training_arg", True):
            kwargs["training"] = training
        with exact_moments():
            return self.model.stateless_call(self.merge(theta, phi), list(state), x, **kwargs)

    def summary(self) -> str:
        """A short text listing which variables play which role."""
        lines = [f"Partition of '{self.model.name}':"]
        for name, group in (
            ("task", self.task_variables),
            ("warp", self.warp_variables),
            ("frozen", self.frozen_variables),
        ):
            n = sum(int(tf.size(v.value)) for v in group)
            lines.append(f"  {name}: {len(group)} variables, {n} parameters")
            lines.extend(f"    {v.path} {tuple(v.shape)}" for v in group)
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"<Partition of '{self.model.name}': {len(self.task_variables)} task, "
            f"{len(self.warp_variables)} warp, {len(self.frozen_variables)} frozen variables>"
        )


def _exact_tf_moments(x, axes, keepdims):
    """Batch mean and biased variance with every derivative kept.

    `tf.nn.moments` (which Keras' TensorFlow backend uses for `BatchNormalization`,
    `LayerNormalization` and `GroupNormalization`) stops the gradient through the mean inside
    the variance. The first derivative is unchanged (that term is zero), but second
    derivatives through the variance are wrong, and exact meta-gradients (exact WarpGrad,
    second-order MAML) differentiate twice. The values here are the same.
    """
    mean = tf.reduce_mean(x, axes, keepdims=True)
    variance = tf.reduce_mean(tf.math.squared_difference(x, mean), axes, keepdims=True)
    if not keepdims:
        mean = tf.squeeze(mean, axes)
        variance = tf.squeeze(variance, axes)
    return mean, variance


_EXACT = threading.local()


def _tf_nn_backend():
    if keras.backend.backend() != "tensorflow":
        return None
    from keras.src.backend.tensorflow import nn as tf_nn

    return tf_nn if hasattr(tf_nn, "_compute_moments") else None


def _install_moments_switch(tf_nn):
    """Replaces Keras' TensorFlow moments helper, once, by one that computes
    `_exact_tf_moments` while this thread is inside `exact_moments` and Keras' own
    computation otherwise."""
    current = tf_nn._compute_moments
    if getattr(current, "_warpkeras_switch", False):
        return
    keras_moments = current

    def compute_moments(x, axes, keepdims):
        if getattr(_EXACT, "depth", 0):
            return _exact_tf_moments(x, axes, keepdims)
        return keras_moments(x, axes, keepdims)

    compute_moments._warpkeras_switch = True
    tf_nn._compute_moments = compute_moments


@contextlib.contextmanager
def exact_moments() -> Iterator[None]:
    """While active (in this thread), Keras' TensorFlow batch statistics are exactly
    differentiable.

    Every model call made by a `Partition` runs inside it, so stock
    `keras.layers.BatchNormalization`, `LayerNormalization` and `GroupNormalization` give
    exact second derivatives there (the forward values are the same). Calls of the model
    outside it (e.g. Keras' own ``fit``) are untouched.
    """
    tf_nn = _tf_nn_backend()
    if tf_nn is None:
        yield
        return
    _install_moments_switch(tf_nn)
    _EXACT.depth = getattr(_EXACT, "depth", 0) + 1
    try:
        yield
    finally:
        _EXACT.depth -= 1


def exact_moments_available() -> bool:
    """Whether `exact_moments` can make Keras' batch statistics exactly differentiable."""
    return keras.backend.backend() != "tensorflow" or _tf_nn_backend() is not None


def inexact_layers(model: keras.Model) -> list[tuple[keras.layers.Layer, str]]:
    """Layers of `model` whose second derivatives are not those of the function they
    compute, each with the reason and the replacement.

    Exact meta-gradients (exact WarpGrad, second-order MAML, meta-learned learning rates)
    differentiate the model twice. Stock normalisation layers are exact here (see
    `exact_moments`); these layers deliberately treat part of their computation as a
    constant (`stop_gradient`), so differentiating through them twice gives the derivative
    of another function:

    * `keras.layers.BatchNormalization` with ``renorm=True`` (the renorm corrections r, d);
    * `keras.layers.SpectralNormalization` (the power-iteration vectors u, v).

    Returns:
        A list of ``(layer, message)``.
    """
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization) and getattr(layer, "renorm", False):
            found.append(
                (
                    layer,
                    (
                        f"Layer '{layer.name}' (BatchNormalization with renorm=True) treats "
                        "its renorm corrections as constants, so second derivatives through "
                        "it are not exact. Use renorm=False or "
                        "warpkeras.layers.ExactBatchNormalization."
                    ),
                )
            )
        elif isinstance(layer, keras.layers.SpectralNormalization):
            found.append(
                (
                    layer,
                    (
                        f"Layer '{layer.name}' (SpectralNormalization) treats its power-iteration "
                        "vectors as constants, so second derivatives through it are not exact. "
                        "Remove the wrapper (or regularise the kernel instead)."
                    ),
                )
            )
        elif not exact_moments_available() and isinstance(
            layer,
            (
                keras.layers.BatchNormalization,
                keras.layers.LayerNormalization,
                keras.layers.GroupNormalization,
            ),
        ):
            found.append(
                (
                    layer,
                    (
                        f"Layer '{layer.name}' ({type(layer).__name__}) computes its "
                        "statistics with a gradient shortcut in this Keras version, so second "
                        "derivatives through it are not exact. Use "
                        "warpkeras.layers.ExactBatchNormalization."
                    ),
                )
            )
    return found


def check_exact(model: keras.Model, why: str, error: type[Exception] = ValueError) -> None:
    """Raises `error` naming the first layer of `model` that `inexact_layers` lists.

    Args:
        model: a `keras.Model`.
        why: what needs exact second derivatives, for the message (e.g.
            ``"warp_objective='exact'"``).
        error: the exception class raised (a `ValueError` subclass).
    """
    found = inexact_layers(model)
    if found:
        raise error(
            f"{why} differentiates through the inner gradient step, which needs exact second "
            f"derivatives of the model. {found[0][1]} Or use a first-order objective "
            "(warp_objective='approx', first-order MAML)."
        )


def _assign(variables, values, what):
    if len(values) != len(variables):
        raise ValueError(f"Expected {len(variables)} {what} tensors, got {len(values)}.")
    for v, t in zip(variables, values):
        v.assign(t)


def partition(
    model: keras.Model,
    untagged: str = "task",
    require_warp: bool = False,
    require_task: bool = True,
) -> Partition:
    """Splits a built model's variables into task θ and warp φ. See `Partition`."""
    return Partition(model, untagged=untagged, require_warp=require_warp, require_task=require_task)
