"""Inner update rules as values: one adaptation step of θ, wherever warpkeras adapts.

An *inner rule* says how the task parameters θ move on one batch. It is a value with two
pure functions, in the spirit of Optax's gradient transformations:

    state = rule.init(theta)
    theta, state = rule.update(grads, state, theta)

`inner_step` is the one definition of an adaptation step that every path calls:
meta-training (every objective and executor, MAML's unrolled steps included), `adapt`,
`evaluate`, fine-tuning, `warpkeras.adapt` and the exported SavedModel's traced loop. It
takes the gradients of ``loss_fn(theta, batch)``, applies the rule, then the variables'
Keras constraints (as a Keras optimiser does after every step).

Built-in rules:

| rule     | update                                        | source                          |
|----------|-----------------------------------------------|---------------------------------|
| `SGD`    | v ← μ v + g, θ ← θ − α v (plain SGD: μ None)  | WarpGrad Alg. 1 line 8, App. G  |
| `MetaSGD`| θ ← θ − α ⊙ g, α learned per parameter        | Li et al. 2017, Eq. 2           |
| `warpkeras.KFAC` | θ ← θ − α ν F̂⁻¹ g (Kronecker factors as state) | Martens & Grosse 2015 |

A researcher's rule subclasses `InnerRule`. Rules are differentiable (the exact WarpGrad
objective and second-order MAML differentiate through `update`), unless a rule says it is
not (``differentiable = False``), in which case the exact objectives refuse it when the
trainer is made.

Example:

```python
import numpy as np, tensorflow as tf, warpkeras

rule = warpkeras.rules.SGD(learning_rate=0.1, momentum=0.9)
theta = [tf.constant([1.0, -2.0])]
state = rule.init(theta)
theta, state = rule.update([tf.constant([0.5, 0.5])], state, theta)
np.testing.assert_allclose(theta[0].numpy(), [0.95, -2.05])
```
"""

import keras
import numpy as np
import tensorflow as tf

__all__ = ["InnerRule", "SGD", "MetaSGD", "inner_step", "apply_constraints", "get"]


def _as_dtype(value, dtype):
    """`value` as a tensor of `dtype`; a Python number becomes a constant of `dtype`
    directly (0.3 stays 0.3 in float64)."""
    if isinstance(value, (int, float, np.number)):
        return tf.constant(value, dtype=dtype)
    return tf.cast(value, dtype)


class InnerRule:
    """Base class of inner update rules: ``init(theta) -> state`` and
    ``update(grads, state, theta) -> (theta, state)``.

    Subclasses implement `init` and `update`; they may override `build` (to create
    variables once the model is known, e.g. Meta-SGD's rates), `value_and_grad` (to observe
    the forward pass, e.g. K-FAC's activations) and `get_config`.

    States are nested structures (tuples, lists, dicts) of tensors with a structure that
    `update` keeps; `init` of a stateless rule returns ``()``.

    Class attributes:
        differentiable: `update` may be differentiated (the exact WarpGrad objective and
            second-order MAML differentiate through it). False makes those objectives
            refuse the rule when the trainer is made.
        exportable: the rule can be traced into `warpkeras.export_adaptive`'s SavedModel
            (its variables are saved with it). False makes the export refuse it, by name.
    """

    differentiable = True
    exportable = True

    def build(self, partition, loss=None):
        """Called once by the trainer (or export) with the model's `warpkeras.Partition`
        and the task loss, before `init`: create variables here.

        Args:
            partition: a `warpkeras.Partition` (``partition.task_variables`` are θ).
            loss: the task loss as the trainer holds it.
        """
        self.built = True

    @property
    def variables(self):
        """The rule's own variables (e.g. Meta-SGD's α): MAML meta-learns them with θ0,
        and `export_adaptive` saves them. Default: none."""
        return []

    def init(self, theta, seed=0):
        """The rule's state before the first step of an adaptation.

        Args:
            theta: θ_0, a list of tensors (the task variables' values).
            seed: an int, the adaptation's seed, for rules that draw random numbers; other
                rules ignore it.

        Returns:
            A nested structure of tensors (``()`` for a stateless rule).
        """
        raise NotImplementedError

    def update(self, grads, state, theta, extra=None):
        """One step.

        Args:
            grads: ∇θ L(θ_k), a list of tensors matching `theta`.
            state: the rule's state (from `init` or the previous `update`).
            theta: θ_k, a list of tensors.
            extra: what `value_and_grad` observed besides the gradients (`None` by
                default).

        Returns:
            ``(theta_next, state_next)``: θ_{k+1} (a list matching `theta`, same shapes and
            dtypes) and the state (same structure as `state`).
        """
        raise NotImplementedError

    def value_and_grad(self, loss_fn, theta, state, batch):
        """The loss and its gradients at θ_k (the one seam through which a loss enters).

        Args:
            loss_fn: ``loss_fn(theta, batch) -> (loss, aux)``, a scalar loss and auxiliary
                outputs (the trainers pass ``aux = (model_state, predictions)``).
            theta: θ_k, a list of tensors.
            state: the rule's state.
            batch: the step's batch, ``(x, y)``.

        Returns:
            ``(loss, grads, aux, extra)``: `extra` is handed to `update` (`None` here).
        """
        theta = [tf.convert_to_tensor(t) for t in theta]
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss, aux = loss_fn(theta, batch)
        grads = tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, grads, aux, None

    def get_config(self):
        """The rule's settings (for logs, results files and export metadata)."""
        return {"class": type(self).__name__}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "class")
        return f"{type(self).__name__}({args})"


class SGD(InnerRule):
    """SGD with optional heavy-ball momentum (WarpGrad Alg. 1 line 8; App. G):

        v_{k+1} = μ v_k + g_k,   θ_{k+1} = θ_k − α v_{k+1}      (v_0 = 0)

    and θ_{k+1} = θ_k − α g_k without momentum. The state is the list of velocities v
    (``()`` without momentum). A Python-number α or μ is a constant of each parameter's
    own dtype; a tensor or variable is cast (and differentiable, e.g. WarpGrad's learned
    α and μ).

    Args:
        learning_rate: α > 0: a Python number, scalar tensor or variable.
        momentum: μ in [0, 1), or `None` for plain SGD.

    Raises:
        TypeError: α or μ is not a number, tensor or variable.
        ValueError: a Python-number α ≤ 0 or μ outside [0, 1).
    """

    def __init__(self, learning_rate=0.01, momentum=None):
        for name, value in (("learning_rate", learning_rate), ("momentum", momentum)):
            if value is not None and (
                isinstance(value, (bool, str))
                or not (isinstance(value, (int, float, np.number)) or hasattr(value, "dtype"))
            ):
                raise TypeError(
                    f"SGD: {name}={value!r} is not valid: expected a number, a "
                    "scalar tensor or a variable" + (" (or None)." if name == "momentum" else ".")
                )
        if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
            raise ValueError(f"SGD: learning_rate={learning_rate!r} must be > 0, e.g. 0.01.")
        if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
            raise ValueError(
                f"SGD: momentum={momentum!r} must lie in [0, 1), e.g. 0.9 (or None for plain SGD)."
            )
        self.learning_rate = learning_rate
        self.momentum = momentum

    def init(self, theta, seed=0):
        if self.momentum is None:
            return ()
        return [tf.zeros_like(t) for t in theta]

    def update(self, grads, state, theta, extra=None):
        if self.momentum is None:
            return (
                [t - _as_dtype(self.learning_rate, t.dtype) * g for t, g in zip(theta, grads)],
                (),
            )
        velocity = state if state is not None and len(state) else [tf.zeros_like(g) for g in grads]
        velocity = [_as_dtype(self.momentum, g.dtype) * v + g for v, g in zip(velocity, grads)]
        new_theta = [
            t - _as_dtype(self.learning_rate, t.dtype) * v for t, v in zip(theta, velocity)
        ]
        return new_theta, velocity

    def get_config(self):
        def number(v):
            if isinstance(v, (int, float, np.number)):
                return float(v)
            return float(tf.convert_to_tensor(v).numpy())

        return {
            "class": "SGD",
            "learning_rate": number(self.learning_rate),
            "momentum": None if self.momentum is None else number(self.momentum),
        }


class MetaSGD(InnerRule):
    """Meta-SGD (Li, Zhou, Chen and Li, 2017, "Meta-SGD: Learning to Learn Quickly for
    Few-Shot Learning", arXiv:1707.09835, Eq. 2): a learning rate per parameter,

        θ_{k+1} = θ_k − α ⊙ ∇L(θ_k),

    with α one `keras.Variable` per task variable (same shape and dtype), created by
    `build`. With `warpkeras.meta.MAML` (second or first order) α is meta-learned with θ0
    by the query loss through the unrolled steps (the rule's `variables` join MAML's);
    every other path (`adapt`, `evaluate`, the exported SavedModel) adapts with the
    current α. Stateless: `init` returns ``()``.

    Args:
        initializer: a Keras initializer (or its name / config) of α, e.g.
            ``keras.initializers.RandomUniform(0.005, 0.1)`` as the paper draws α; a
            Python number > 0 is a constant, exact in each parameter's dtype (float64
            included). Default: 0.01.

    Raises:
        ValueError: a constant ≤ 0; (in `update`) the rule is not built.
    """

    def __init__(self, initializer=0.01):
        self.constant = None
        if isinstance(initializer, (int, float, np.number)) and not isinstance(initializer, bool):
            if not initializer > 0:
                raise ValueError(
                    f"MetaSGD: initializer={initializer!r} must be > 0 as a "
                    "constant learning rate, e.g. 0.01."
                )
            # filled in each variable's own dtype (Keras's Constant rounds through float32)
            self.constant = float(initializer)
            initializer = keras.initializers.Constant(self.constant)
        self.initializer = keras.initializers.get(initializer)
        self.alpha = None

    def build(self, partition, loss=None):
        if self.alpha is not None:
            return
        self.alpha = []
        for i, v in enumerate(partition.task_variables):
            shape, dtype = tuple(v.shape), tf.as_dtype(v.dtype)
            init = (
                self.initializer
                if self.constant is None
                else np.full(shape, self.constant, dtype.as_numpy_dtype)
            )
            self.alpha.append(
                keras.Variable(init, shape=shape, dtype=dtype, name=f"meta_sgd_alpha_{i}")
            )
        self.built = True

    @property
    def variables(self):
        return list(self.alpha or [])

    def init(self, theta, seed=0):
        return ()

    def update(self, grads, state, theta, extra=None):
        if self.alpha is None:
            raise ValueError(
                "MetaSGD: the rule is not built: give it to a trainer "
                "(inner_rule=...) or call rule.build(partition) first."
            )
        return (
            [t - tf.cast(a.value, t.dtype) * g for t, a, g in zip(theta, self.alpha, grads)],
            state,
        )

    def get_config(self):
        return {"class": "MetaSGD", "initializer": keras.initializers.serialize(self.initializer)}


def apply_constraints(constraints, theta):
    """θ with every variable's Keras constraint applied (as a Keras optimiser applies
    ``variable.constraint`` after each step).

    Args:
        constraints: a list matching `theta` of callables or `None`.
        theta: a list of tensors.

    Returns:
        A list of tensors.
    """
    if not constraints or all(c is None for c in constraints):
        return list(theta)
    return [t if c is None else tf.cast(c(t), t.dtype) for c, t in zip(constraints, theta)]


def constraints_of(variables):
    """The Keras constraints of `variables` (a list with `None` where there is none)."""
    return [getattr(v, "constraint", None) for v in variables]


def inner_step(rule, loss_fn, theta, state, batch, constraints=None, stop_inner_gradient=False):
    """One inner step: θ_{k+1} = constrain(update(∇L(θ_k), state, θ_k)).

    The single definition of an adaptation step: the loss's gradients (by the rule's
    `InnerRule.value_and_grad`), the rule's `InnerRule.update`, then the variables' Keras
    constraints (`apply_constraints`), in that order, as `keras.Model.fit` steps a
    constrained variable.

    Args:
        rule: an `InnerRule`.
        loss_fn: ``loss_fn(theta, batch) -> (loss, aux)``.
        theta: θ_k, a list of tensors.
        state: the rule's state.
        batch: the step's batch.
        constraints: a list matching `theta` of Keras constraints or `None`.
        stop_inner_gradient: treat the gradient as a constant under an outer tape (the
            approximate WarpGrad objective, first-order MAML).

    Returns:
        ``(loss, grads, aux, theta_next, state_next)``.
    """
    loss, grads, aux, extra = rule.value_and_grad(loss_fn, theta, state, batch)
    if stop_inner_gradient:
        grads = [tf.stop_gradient(g) for g in grads]
    new_theta, new_state = rule.update(grads, state, list(theta), extra)
    return loss, grads, aux, apply_constraints(constraints, new_theta), new_state


def get(identifier, where="inner_rule"):
    """An `InnerRule` from `identifier`: a rule (returned as is) or `None`.

    Raises:
        TypeError: anything else (the message names `where` and what to pass).
    """
    if identifier is None or isinstance(identifier, InnerRule):
        return identifier
    raise TypeError(
        f"{where}={identifier!r} is not valid: expected an inner rule such as "
        "warpkeras.rules.SGD(0.1, momentum=0.9), warpkeras.rules.MetaSGD() or "
        "warpkeras.KFAC(...) (a warpkeras.rules.InnerRule), or None."
    )
