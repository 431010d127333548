"""Roles of layers: `task` layers adapt on each task, `warp` layers are meta-learned.

WarpGrad splits a model's trainable parameters in two (Flennerhag et al., Sec. 2):

* **task** parameters θ are adapted by gradient descent on each task (the inner loop);
* **warp** parameters φ are shared by all tasks, held fixed during adaptation, and
  meta-learned. Because warp layers sit in the forward pass, back-propagation through them
  preconditions the task gradients (WarpGrad Eq. 2).

`warp(layer)` and `task(layer)` tag any Keras layer and return it, so an existing
architecture is partitioned without rewriting it. A tag applies to every variable the layer
owns, including those of its sub-layers, unless a sub-layer carries a tag of its own: the
innermost tag wins. That is how a warp block can hold task variables (the FiLM task
embeddings of `warpkeras.layers.FiLMWarpBlock`).

Trainable layers with no tag, in themselves or in an enclosing layer, are *untagged*; how
they are treated is chosen when the model is partitioned (`warpkeras.partition(model,
untagged="task")` by default, since in the papers' "model augmentation" design every layer
of the original architecture adapts and warp layers are inserted between them).

Tags are saved with the model: `model.save("m.keras")` and `keras.models.load_model`, as well
as `get_config` / `from_config` of Sequential and functional models, keep them (the tag is
written into the layer's build config, which Keras stores beside its config).
"""

from __future__ import annotations

from typing import TypeVar

import keras

TASK = "task"
WARP = "warp"
ROLES = (TASK, WARP)

LayerT = TypeVar("LayerT", bound=keras.layers.Layer)
"""A Keras layer type: the tagging functions return the layer they were given."""

_ATTR = "_warpkeras_role"
_CONFIG_KEY = "warpkeras_role"


class RoleError(ValueError):
    """A layer's role is missing, contradictory or unusable."""


def _check_role(role):
    if role not in ROLES:
        raise RoleError(f"Unknown role {role!r}: expected one of {ROLES}.")


def tag(layer: LayerT, role: str) -> LayerT:
    """Tags `layer` with `role` (``"task"`` or ``"warp"``) and returns it.

    Tagging a layer again with the same role is allowed; with the other role it is an error,
    since a variable cannot be both adapted and meta-learned.

    Args:
        layer: a `keras.layers.Layer` (a model is a layer too).
        role: ``"task"`` or ``"warp"``.

    Returns:
        `layer` itself.

    Raises:
        RoleError: if `layer` already has the other role, or `role` is unknown.
        TypeError: if `layer` is not a Keras layer.
    """
    _check_role(role)
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(
            f"warpkeras.{role}() takes a keras.layers.Layer, got {type(layer).__name__}."
        )
    current = role_of(layer)
    if current is not None and current != role:
        raise RoleError(
            f"Layer '{layer.name}' ({type(layer).__name__}) is already tagged "
            f"'{current}' and cannot also be tagged '{role}'. A layer has one role; to "
            "give part of a layer another role, tag the sub-layer that owns it."
        )
    object.__setattr__(layer, _ATTR, role)
    return layer


def warp(layer: LayerT) -> LayerT:
    """Tags a layer as a **warp** layer: shared across tasks, frozen during adaptation,
    meta-learned.

    Example:

    ```python
    import keras, warpkeras
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),            # untagged: task by default
        warpkeras.warp(keras.layers.Dense(16, name="w1")),      # meta-learned
        keras.layers.Dense(1),
    ])
    assert warpkeras.role_of(model.get_layer("w1")) == "warp"
    ```

    Args:
        layer: any `keras.layers.Layer`.

    Returns:
        The same layer, tagged.
    """
    return tag(layer, WARP)


def task(layer: LayerT) -> LayerT:
    """Tags a layer as a **task** layer: its variables are adapted on every task.

    Example:

    ```python
    import keras, warpkeras
    head = warpkeras.task(keras.layers.Dense(5, name="head"))
    assert warpkeras.role_of(head) == "task"
    ```

    Args:
        layer: any `keras.layers.Layer`.

    Returns:
        The same layer, tagged.
    """
    return tag(layer, TASK)


def role_of(layer: keras.layers.Layer) -> str | None:
    """The role a layer was tagged with: ``"task"``, ``"warp"`` or ``None`` if untagged.

    Layer classes may declare a role for all their instances with a class attribute
    ``warpkeras_role`` (the ready-made layers of `warpkeras.layers` do); an explicit tag on
    the instance takes precedence.

    Args:
        layer: a `keras.layers.Layer`.

    Returns:
        The role string or `None`.
    """
    role = layer.__dict__.get(_ATTR)
    if role is None:
        role = getattr(type(layer), "warpkeras_role", None)
    return role


def untag(layer: LayerT) -> LayerT:
    """Removes an instance tag from `layer` (class-level roles stay). Returns the layer."""
    layer.__dict__.pop(_ATTR, None)
    return layer


# --- persistence -----------------------------------------------------------------------
# Keras stores `get_build_config()` beside each layer's config and hands it back to
# `build_from_config()` when the layer is deserialised. The role rides along there, so any
# layer class (including the user's own) keeps its tag through save/load without changes to
# its constructor signature.
_base_get_build_config = keras.layers.Layer.get_build_config
_base_build_from_config = keras.layers.Layer.build_from_config


def _get_build_config(self):
    config = _base_get_build_config(self)
    role = self.__dict__.get(_ATTR)
    if role is None:
        return config
    config = dict(config or {})
    config[_CONFIG_KEY] = role
    return config


def _build_from_config(self, config):
    if config and _CONFIG_KEY in config:
        config = dict(config)
        tag(self, config.pop(_CONFIG_KEY))
    return _base_build_from_config(self, config)


def _install_persistence():
    if getattr(keras.layers.Layer, "_warpkeras_persistence", False):
        return
    keras.layers.Layer.get_build_config = _get_build_config
    keras.layers.Layer.build_from_config = _build_from_config
    keras.layers.Layer._warpkeras_persistence = True


_install_persistence()
