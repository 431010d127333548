"""The papers' objectives and meta-gradients as pure functions of tensors.

Every function here takes parameter values as lists of tensors (θ for task variables, φ for
warp variables, in the order of a `warpkeras.Partition`) and returns tensors; none of them
reads or writes a Keras variable, so they compose freely inside `tf.function` and nested
`tf.GradientTape`s. Trainers (`warpkeras.trainers`) are the stateful orchestration on top.

| function                    | paper                                   |
|-----------------------------|-----------------------------------------|
| `task_loss`                 | L_task(θ; φ) on one batch               |
| `task_step`                 | WarpGrad Alg. 1 line 8, any inner rule  |
| `warp_objective`            | WarpGrad Eq. 3 (exact or approximate)   |
| `warp_meta_gradient`        | ∇φ of Eq. 3                             |
| `leap_meta_gradient`        | Leap Eq. 8 / WarpGrad Eq. 12            |
| `leap_path_length`          | Leap Eq. 7 / WarpGrad Eq. 9             |
| `maml_objective`            | WarpGrad Eq. 1 (MAML), second/first order |
| `reptile_direction`         | Reptile (Nichol et al.)                 |
| `continual_objective`       | WarpGrad Eq. 14 / 18                    |

A *batch* is ``(x, y)`` or ``(x, y, sample_weight)`` as `keras.Model.fit` takes it (the
trainers pass weighted batches as ``(x, warpkeras._losses.Targets(y, sample_weight))``); a
*loss function* is anything `keras.Model.compile` takes as ``loss`` (a name, a Keras loss
object, ``fn(y_true, y_pred)``, a dict / list per output) or a
`warpkeras._losses.TaskLoss`, and is computed as `model.fit` computes it (`task_loss`).
"""

import weakref
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from warpkeras import rules
from warpkeras._losses import TaskLoss, as_task_loss, split_batch

__all__ = [
    "StepResult",
    "sgd_update",
    "task_loss",
    "task_gradient",
    "task_step",
    "warp_objective",
    "warp_meta_gradient",
    "leap_meta_gradient",
    "leap_path_length",
    "maml_objective",
    "maml_meta_gradient",
    "reptile_direction",
    "continual_weights",
    "continual_objective",
]


def as_dtype(value, dtype):
    """`value` as a tensor of `dtype` without a detour through float32.

    A Python or numpy number is converted straight to `dtype` (`tf.cast` of a Python float
    would first make it a float32 constant); a tensor or variable is cast.
    """
    if isinstance(value, (int, float, np.number)):
        return tf.constant(value, dtype=dtype)
    return tf.cast(value, dtype)


def _as_list(values):
    return [tf.convert_to_tensor(v) for v in values]


def _scalar(loss):
    loss = tf.convert_to_tensor(loss)
    return tf.reduce_mean(loss) if loss.shape.rank else loss


_TASK_LOSSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _task_loss_of(loss_fn):
    """`loss_fn` as a `warpkeras._losses.TaskLoss` (cached per loss object and Keras floatx,
    the dtype a Keras loss computes in)."""
    if isinstance(loss_fn, TaskLoss):
        return loss_fn
    import keras  # noqa: PLC0415 (after TensorFlow's kernels are picked)

    floatx = keras.config.floatx()
    try:
        cached = _TASK_LOSSES.setdefault(loss_fn, {})
    except TypeError:  # not weak-referenceable
        return as_task_loss(loss_fn, where="task_loss")
    if floatx not in cached:
        cached[floatx] = as_task_loss(loss_fn, where="task_loss")
    return cached[floatx]


def task_loss(
    partition, loss_fn, theta, phi, batch, state=None, training=True, return_outputs=False
):
    """L_task(θ; φ) on one batch: the loss of the model run at (θ, φ), as
    `keras.Model.compute_loss` computes it in ``model.fit``.

    The compiled loss of the outputs (`warpkeras._losses.TaskLoss`: Keras's loss
    configuration, the masks the model attaches to its outputs, the batch's sample
    weights, in Keras's floatx) plus the regularisation losses that layers add during the
    call (each summed, as Keras's ``Model.losses`` are). This is the one loss function of
    warpkeras: the inner step, the meta losses, evaluation and the exported program call it.

    Args:
        partition: a `warpkeras.Partition`.
        loss_fn: a `warpkeras._losses.TaskLoss`, or anything `keras.Model.compile` takes as
            ``loss`` (a name, a `keras.losses.Loss`, ``fn(y_true, y_pred)``, a dict / list
            per output), resolved as `compile` resolves it.
        theta: task values (list of tensors).
        phi: warp values (list of tensors).
        batch: ``(x, y)``, ``(x, y, sample_weight)`` or ``(x, Targets(y, sample_weight))``
            as `keras.Model.fit` takes them.
        state: the model's non-trainable values (batch-norm statistics); `None` uses the
            model's current state.
        training: run the model in training mode (batch statistics, dropout).
        return_outputs: also return the model's predictions.

    Returns:
        ``(loss, new_state)``, or ``(loss, new_state, outputs)``.
    """
    x, y, sample_weight = split_batch(batch)
    y_pred, new_state, losses = partition.call(
        theta, phi, x, state=state, training=training, return_losses=True
    )
    loss = _scalar(_task_loss_of(loss_fn)(y, y_pred, sample_weight))
    if losses:
        loss = loss + tf.add_n([tf.cast(tf.reduce_sum(term), loss.dtype) for term in losses])
    if return_outputs:
        return loss, new_state, y_pred
    return loss, new_state


def task_gradient(
    partition, loss_fn, theta, phi, batch, state=None, training=True, return_outputs=False
):
    """∇θ L_task(θ; φ). Differentiable in φ (and θ) when called under an outer tape.

    Returns:
        ``(loss, gradients, new_state)`` (and the predictions last, with
        `return_outputs`); gradients are a list matching `theta` (zeros for task variables
        the loss does not depend on).
    """
    theta = _as_list(theta)
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss, new_state, outputs = task_loss(
            partition, loss_fn, theta, phi, batch, state, training, return_outputs=True
        )
    grads = tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if return_outputs:
        return loss, grads, new_state, outputs
    return loss, grads, new_state


class StepResult(NamedTuple):
    """The outcome of one inner step (`task_step`)."""

    theta: list
    """θ_{k+1}."""
    velocity: object
    """The inner rule's state after the step: the momentum buffer of heavy-ball SGD
    (`None` for plain SGD given by α alone), or a `warpkeras.rules.InnerRule`'s state."""
    loss: tf.Tensor
    """L_task(θ_k; φ) on the step's batch (before the step)."""
    gradients: list
    """∇θ L_task(θ_k; φ)."""
    state: list
    """Non-trainable model state after the forward pass."""
    outputs: object = None
    """The model's predictions on the step's batch (at θ_k)."""


def sgd_update(theta, grads, learning_rate, momentum=None, velocity=None):
    """θ − α v with v = μ v + g (heavy-ball momentum; plain SGD when `momentum` is None):
    `warpkeras.rules.SGD`'s update as a function.

    A Python-number α or μ becomes a constant of each parameter's own dtype (0.3 stays
    0.3 in a float64 model, not float32's 0.30000001192); a tensor or variable is cast.

    Returns:
        ``(new_theta, new_velocity)``; `new_velocity` is `None` without momentum.
    """
    new_theta, new_velocity = rules.SGD(learning_rate, momentum).update(
        list(grads), velocity, list(theta)
    )
    return new_theta, (None if momentum is None else new_velocity)


class _HookRule(rules.InnerRule):
    """An ``update(theta, grads, velocity) -> (theta, velocity)`` function as a rule (the
    form `task_step`'s `update` argument takes)."""

    exportable = False

    def __init__(self, update, velocity_like):
        self.fn = update
        self.velocity_like = velocity_like

    def init(self, theta, seed=0):
        return None

    def update(self, grads, state, theta, extra=None):
        return self.fn(theta, grads, state)


def step_rule(learning_rate, momentum=None, update=None, rule=None):
    """The `warpkeras.rules.InnerRule` that `task_step`'s arguments describe: `rule` if
    given, else an ``update`` function, else SGD with α and μ."""
    if rule is not None:
        return rule
    if update is not None:
        return _HookRule(update, momentum is not None)
    return rules.SGD(learning_rate, momentum)


def task_step(
    partition,
    loss_fn,
    theta,
    phi,
    batch,
    learning_rate,
    momentum=None,
    velocity=None,
    state=None,
    stop_inner_gradient=False,
    training=True,
    update=None,
    rule=None,
    constraints="model",
):
    """One inner step θ_{k+1} = θ_k − α ∇L_task(θ_k; φ) (WarpGrad Alg. 1 line 8).

    With `momentum` μ the rule is heavy-ball SGD, v_{k+1} = μ v_k + ∇L, θ_{k+1} = θ_k − α
    v_{k+1}; the buffer v goes in and out so that it can be stored in a replay buffer and
    replayed in the warp objective (WarpGrad App. G). With `rule` (a
    `warpkeras.rules.InnerRule`) the step is that rule's, and `velocity` is its state.
    After the update the task variables' Keras constraints are applied, as a Keras
    optimiser applies them after every step (`warpkeras.rules.inner_step`, which this
    calls).

    Because the gradient passes through the warp layers, the update is preconditioned by
    them (Eq. 2). Under an outer `tf.GradientTape`, θ_{k+1} is differentiable in φ, α and μ
    (second order) unless `stop_inner_gradient` is set.

    Example:

    ```python
    step = warpkeras.objectives.task_step(p, loss_fn, theta, phi, (x, y), 0.1)
    theta = step.theta
    ```

    Args:
        partition: a `warpkeras.Partition`.
        loss_fn: ``loss_fn(y_true, y_pred)``.
        theta: θ_k.
        phi: warp values φ.
        batch: ``(x, y)``.
        learning_rate: α (Python float or scalar tensor); not used with `rule` or `update`.
        momentum: μ, or `None` for plain SGD; not used with `rule` or `update`.
        velocity: the momentum buffer v_k (`None`: zeros), or `rule`'s state (`None`:
            ``rule.init(theta)``).
        state: non-trainable model state.
        stop_inner_gradient: treat ∇L_task as a constant (the approximate objective).
        training: run the model in training mode.
        update: optional ``update(theta, grads, velocity) -> (new_theta, new_velocity)``
            replacing the SGD rule (e.g. Meta-SGD's per-parameter learning rates).
        rule: optional `warpkeras.rules.InnerRule` replacing the SGD rule.
        constraints: ``"model"`` (default): the task variables' Keras constraints; or a
            list matching θ of constraints / `None`; or `None` for none.

    Returns:
        A `StepResult` (its ``velocity`` is the rule's state after the step; `None` for
        plain SGD).
    """
    theta = _as_list(theta)
    inner = step_rule(learning_rate, momentum, update, rule)
    if constraints == "model":
        constraints = rules.constraints_of(partition.task_variables)
    if velocity is None and rule is not None:
        velocity = rule.init(theta)

    def loss_of(values, step_batch):
        loss, new_state, outputs = task_loss(
            partition, loss_fn, values, phi, step_batch, state, training, return_outputs=True
        )
        return loss, (new_state, outputs)

    loss, grads, (new_state, outputs), new_theta, new_velocity = rules.inner_step(
        inner,
        loss_of,
        theta,
        velocity,
        batch,
        constraints=constraints,
        stop_inner_gradient=stop_inner_gradient,
    )
    if rule is None and update is None and momentum is None:
        new_velocity = None
    return StepResult(new_theta, new_velocity, loss, grads, new_state, outputs)


def warp_objective(
    partition,
    loss_fn,
    theta,
    phi,
    task_batch,
    meta_batch,
    learning_rate,
    momentum=None,
    velocity=None,
    state=None,
    exact=True,
    meta_loss=None,
    training=True,
):
    """The WarpGrad meta-objective at one sampled task parameterisation (Eq. 3):

        L(φ; θ) = L_meta(θ − α ∇L_task(θ; φ); φ)

    θ is a sample from the joint task-parameter distribution p(τ, θ) (a point of a task's
    trajectory) and is held constant. With ``exact=True`` the gradient in φ flows through
    the inner gradient ∇L_task (second order: φ shapes the update direction); with
    ``exact=False`` the inner gradient is stopped (the "approx" objective of App. G), so φ
    is credited only through the forward pass at the stepped point.

    Summing this over tasks and stored points gives L(φ) (Eq. 3); `warp_meta_gradient`
    differentiates it.

    Args:
        partition: a `warpkeras.Partition`.
        loss_fn: loss for both L_task and (by default) L_meta.
        theta: the sampled task values θ (treated as constants).
        phi: warp values φ.
        task_batch: ``(x, y)`` for the inner step.
        meta_batch: ``(x, y)`` for L_meta (the same or other task data; held-out data
            encourages generalisation).
        learning_rate: α of the inner step (may be a meta-learned tensor).
        momentum: μ of the inner step, or `None`.
        velocity: the momentum buffer stored with θ (replayed, App. G).
        state: non-trainable state for the calls.
        exact: second-order (True) or approximate (False).
        meta_loss: optional ``meta_loss(theta_next, phi, state) -> scalar`` replacing the
            loss on `meta_batch` (e.g. `continual_objective`).
        training: training mode for both calls.

    Returns:
        The scalar meta-loss.
    """
    theta = [tf.stop_gradient(t) for t in _as_list(theta)]
    if velocity is not None:
        velocity = [tf.stop_gradient(v) for v in _as_list(velocity)]
    step = task_step(
        partition,
        loss_fn,
        theta,
        phi,
        task_batch,
        learning_rate,
        momentum=momentum,
        velocity=velocity,
        state=state,
        stop_inner_gradient=not exact,
        training=training,
    )
    # The meta pass goes on from the state the inner step left (fresh random draws).
    state = [tf.stop_gradient(s) for s in step.state]
    if meta_loss is not None:
        return _scalar(meta_loss(step.theta, phi, state))
    loss, _ = task_loss(partition, loss_fn, step.theta, phi, meta_batch, state, training)
    return loss


def warp_meta_gradient(
    partition,
    loss_fn,
    theta,
    phi,
    task_batch,
    meta_batch,
    learning_rate,
    extra_sources=(),
    **kwargs,
):
    """∇φ of `warp_objective` (Eq. 3) at one sampled θ.

    Args:
        extra_sources: further tensors to differentiate (e.g. a meta-learned learning rate
            and momentum passed as `learning_rate` / `momentum`).
        **kwargs: forwarded to `warp_objective` (momentum, velocity, state, exact, ...).

    Returns:
        ``(loss, phi_gradients, extra_gradients)``.
    """
    phi = _as_list(phi)
    extra = list(extra_sources)
    with tf.GradientTape() as tape:
        tape.watch(phi)
        for e in extra:
            if not isinstance(e, tf.Variable):
                tape.watch(e)
        loss = warp_objective(
            partition, loss_fn, theta, phi, task_batch, meta_batch, learning_rate, **kwargs
        )
    grads = tape.gradient(loss, [phi, extra], unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, grads[0], grads[1]


def _flat_sq_norm(tensors):
    return tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors])


def leap_meta_gradient(
    theta_prev,
    theta_next,
    loss_prev,
    loss_next,
    grad_prev,
    norm="energy",
    sign_correction=True,
    loss_in_path=True,
    epsilon=1e-12,
):
    """The Leap pull-forward meta-gradient for one step of a task's path, w.r.t. θ0.

    The path lives in (θ, L(θ)) (WarpGrad Eq. 9). For the step ϑ_{k−1} → ϑ_k, the
    frozen-baseline objective ``d(sg[ϑ_k], ϑ_{k−1})`` is differentiated w.r.t. θ_{k−1} and the
    Jacobian dθ_{k−1}/dθ0 is approximated by the identity (Leap App. C):

    * ``norm="energy"`` (Leap Eq. 7/8): d = ||ϑ_k − ϑ_{k−1}||², gradient
      −2(ΔL ∇L(θ_{k−1}) + Δθ);
    * ``norm="length"`` (WarpGrad Eq. 9/12): d = ||ϑ_k − ϑ_{k−1}||₂, gradient
      −(ΔL ∇L(θ_{k−1}) + Δθ) / ||ϑ_k − ϑ_{k−1}||₂;

    with Δθ = θ_k − θ_{k−1} and ΔL = L(θ_k) − L(θ_{k−1}). With `sign_correction` (Leap
    App. C) ΔL is replaced by −|ΔL| in the numerator, so a step on which the loss went *up*
    (noise in SGD) does not pull θ0 uphill: the result is then 2(|ΔL| ∇L − Δθ), Leap Eq. 8.

    Summed over steps and tasks this is the gradient used for θ0 ← θ0 − β ∇C.

    Example:

    ```python
    g = leap_meta_gradient([t0], [t1], l0, l1, [grad_at_t0], norm="length")
    ```

    Args:
        theta_prev: θ_{k−1} (list of tensors).
        theta_next: θ_k.
        loss_prev: L(θ_{k−1}) (scalar).
        loss_next: L(θ_k).
        grad_prev: ∇L(θ_{k−1}) (list matching θ).
        norm: ``"energy"`` or ``"length"``.
        sign_correction: use −|ΔL| in place of ΔL.
        loss_in_path: include the loss as a coordinate of the path (False: the path is in θ
            only, the Reptile-like variant).
        epsilon: guards the division of the length variant.

    Returns:
        A list of tensors matching θ.
    """
    if norm not in ("energy", "length"):
        raise ValueError(f"norm={norm!r}: expected 'energy' or 'length'.")
    theta_prev, theta_next = _as_list(theta_prev), _as_list(theta_next)
    dtype = theta_prev[0].dtype
    d_theta = [b - a for a, b in zip(theta_prev, theta_next)]
    d_loss = tf.cast(loss_next, dtype) - tf.cast(loss_prev, dtype)
    if not loss_in_path:
        d_loss = tf.zeros_like(d_loss)
    coef = -tf.abs(d_loss) if sign_correction else d_loss
    direction = [-(coef * tf.cast(g, dtype) + dt) for g, dt in zip(grad_prev, d_theta)]
    if norm == "energy":
        return [2.0 * d for d in direction]
    length = tf.sqrt(_flat_sq_norm(d_theta) + tf.square(d_loss) + epsilon)
    return [d / length for d in direction]


def leap_path_length(thetas, losses, norm="energy", loss_in_path=True):
    """The length (or energy) of a path ϑ_0..ϑ_K in (θ, L(θ)) (Leap Eq. 7, WarpGrad Eq. 9).

    Args:
        thetas: sequence of K+1 parameter lists θ_0..θ_K.
        losses: sequence of K+1 scalar losses L(θ_k).
        norm: ``"energy"`` (sum of squared chords) or ``"length"`` (sum of chords).
        loss_in_path: include the loss coordinate.

    Returns:
        A scalar tensor.
    """
    total = 0.0
    for k in range(1, len(thetas)):
        sq = _flat_sq_norm([b - a for a, b in zip(_as_list(thetas[k - 1]), _as_list(thetas[k]))])
        if loss_in_path:
            sq = sq + tf.square(tf.cast(losses[k] - losses[k - 1], sq.dtype))
        total = total + (sq if norm == "energy" else tf.sqrt(sq))
    return tf.convert_to_tensor(total)


#: The largest K that `maml_objective` unrolls by default (``unroll=None``).
MAML_UNROLL_MAX_STEPS = 5


def _checkpointed_loop(step, carry, params, steps):
    """``steps`` applications of ``carry = step(k, carry, params)`` in a `tf.while_loop`,
    differentiable in the first `carry` and `params`, whose gradient keeps only the carry
    at each step (K × the carry's size) and recomputes a step's activations when it
    reaches it (gradient checkpointing at every step, Chen et al. 2016, "Training Deep
    Nets with Sublinear Memory Cost", arXiv:1604.06174).

    The backward pass is a second `tf.while_loop`, from step K − 1 down to 0: it reads
    the carry of step k, runs the step again under a `tf.GradientTape` and takes its
    vector-Jacobian product with the incoming gradient. A step may hold tapes of its own
    (an inner step's gradient): they are recorded as in any forward pass, so the product
    is the second-order one. Variables the step reads (e.g. `warpkeras.rules.MetaSGD`'s
    α) get their gradients summed over the steps, as `tf.custom_gradient` passes them.
    (`tf.recompute_grad` cannot serve: it runs its function with every tape stopped,
    which zeroes an inner step's own gradient.)

    Args:
        step: ``step(k, carry, params) -> carry`` on flat lists of tensors (k an int32
            scalar tensor); the carry keeps its dtypes and shapes.
        carry: the flat list of tensors at step 0.
        params: a flat list of tensors every step reads (differentiated).
        steps: K, an int or a scalar int tensor.

    Returns:
        The flat carry after K steps.
    """
    n_carry = len(carry)
    steps_t = tf.cast(steps, tf.int32)

    @tf.custom_gradient
    def run(*flat_in):
        carry0, params_in = list(flat_in[:n_carry]), list(flat_in[n_carry:])
        kept = [
            tf.TensorArray(t.dtype, size=steps_t, element_shape=t.shape, clear_after_read=False)
            for t in carry0
        ]

        def forward(k, c, kept):
            kept = [ta.write(k, x) for ta, x in zip(kept, c)]
            return k + 1, list(step(k, c, params_in)), kept

        _, carry_k, kept = tf.while_loop(
            lambda k, *_: k < steps_t,
            forward,
            (tf.constant(0, tf.int32), carry0, kept),
            maximum_iterations=steps_t,
            parallel_iterations=1,
        )

        def grad(*upstream, variables=None):
            variables = list(variables or [])
            floats = [i for i, t in enumerate(carry0) if t.dtype.is_floating]
            d_carry = [
                tf.zeros_like(carry0[i]) if upstream[i] is None else upstream[i] for i in floats
            ]
            d_params = [tf.zeros_like(p) for p in params_in]
            d_vars = [tf.zeros_like(v) for v in variables]

            def backward(k, d_carry, d_params, d_vars):
                j = k - 1
                c = [ta.read(j) for ta in kept]
                sources = [c[i] for i in floats]
                with tf.GradientTape() as tape:
                    tape.watch(sources + params_in)
                    tape.watch(variables)
                    out = step(j, c, params_in)
                g = tape.gradient(
                    [out[i] for i in floats],
                    sources + params_in + variables,
                    output_gradients=d_carry,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                n, m = len(floats), len(params_in)
                return (
                    j,
                    g[:n],
                    [a + b for a, b in zip(d_params, g[n : n + m])],
                    [a + tf.cast(b, a.dtype) for a, b in zip(d_vars, g[n + m :])],
                )

            # One iteration at a time: a step's recomputation depends only on the kept
            # carry, so parallel iterations would hold several steps' activations.
            _, d_carry, d_params, d_vars = tf.while_loop(
                lambda k, *_: k > 0,
                backward,
                (steps_t, d_carry, d_params, d_vars),
                maximum_iterations=steps_t,
                parallel_iterations=1,
            )
            d_in = [None] * n_carry
            for i, d in zip(floats, d_carry):
                d_in[i] = d
            return d_in + list(d_params), d_vars

        return carry_k, grad

    return run(*(list(carry) + list(params)))


def maml_objective(
    partition,
    loss_fn,
    theta0,
    phi,
    support,
    query,
    learning_rate,
    steps,
    first_order=False,
    state=None,
    training=True,
    update=None,
    momentum=None,
    rule=None,
    unroll=None,
    recompute=False,
):
    """The MAML objective over K inner steps (WarpGrad Eq. 1, P given by the warp):

        C(θ0) = L_query(θ_K),  θ_{k+1} = θ_k − α ∇L_support(θ_k; φ),  θ_0 = θ0.

    Differentiating the result w.r.t. θ0 (under a tape) gives the second-order MAML
    gradient; with ``first_order=True`` the inner gradients are stopped, so dθ_K/dθ0 = I and
    the gradient is ∇L_query(θ_K) (first-order MAML). Each step is `task_step` (so the
    task variables' constraints hold after every step); the rule's state (heavy-ball
    velocity, ...) starts from ``rule.init(θ0)`` and goes on from step to step, as in
    `MetaTrainer.adapt`.

    The K steps run as one symbolic loop (`tf.while_loop`, differentiated twice by
    TensorFlow for the second-order gradient), so a traced graph, and the time to trace
    it, do not grow with K; ``unroll=True`` writes the K steps into the graph one after
    the other instead: they trace in time ∝ K, but run faster once traced (the loop
    passes every step's intermediates to its gradient through TensorFlow's
    accumulators, a cost per step that shows on small models), so by default
    (``unroll=None``) a Python-int K ≤ `MAML_UNROLL_MAX_STEPS` (5, the usual few-shot
    setting) is unrolled and a larger or tensor K runs as the loop.

    With ``recompute=True`` the loop keeps only each step's θ_k and states, and its
    backward pass (a second loop, from step K − 1 down to 0) recomputes a step's
    activations from them (gradient checkpointing at every step), so the memory the
    meta-gradient keeps grows with K × |θ| rather than K × the activations, for one more
    forward and inner backward pass per step. All give the same gradient to float
    rounding.

    Args:
        partition: as in `task_step`.
        loss_fn: as in `task_step`.
        phi: as in `task_step`.
        state: as in `task_step`.
        training: as in `task_step`.
        theta0: the initialisation θ0.
        support: a batch ``(x, y)`` (a tuple; `x` may be any structure the model takes,
            e.g. ``((x_image, x_vector), y)`` or ``({"image": ..., "vector": ...}, y)``)
            used at every step, or a *list* of batches (step k uses
            ``support[k % len(support)]``).
        query: the batch for the outer loss.
        learning_rate: α.
        steps: K (an int ≥ 0, or a scalar int tensor unless ``unroll=True``).
        first_order: stop the inner gradients.
        update: optional inner rule replacing SGD (see `task_step`).
        momentum: μ of heavy-ball SGD, or `None`.
        rule: optional `warpkeras.rules.InnerRule` replacing SGD (α and μ unused).
        unroll: `True`: write the K steps into the graph (a Python loop); `False`: one
            `tf.while_loop`; `None` (default): unrolled for a Python-int K ≤
            `MAML_UNROLL_MAX_STEPS` without `recompute`, the loop otherwise.
        recompute: keep only each step's θ_k and states, and recompute the step's
            activations in the backward pass (not with ``unroll=True``).

    Returns:
        ``(query_loss, theta_K)``.

    Raises:
        ValueError: ``unroll=True`` with a tensor `steps` or with ``recompute=True``; an
            empty list of support batches.
    """
    theta = [tf.convert_to_tensor(t) for t in _as_list(theta0)]
    phi = [tf.convert_to_tensor(v) for v in _as_list(phi)]
    inner = step_rule(learning_rate, momentum, update, rule)
    rule_state = inner.init(theta)
    if state is None:
        state = partition.state_values()
    state = [tf.convert_to_tensor(s) for s in state]
    # Only a list is a sequence of batches: a tuple is always one batch, whatever
    # structure its inputs have (``((x_image, x_vector), y)`` is one batch).
    batches = support if isinstance(support, list) else [support]
    if not batches:
        raise ValueError("The list of support batches is empty.")

    def one_step(carry, phi_values, batch):
        theta_k, rule_state_k, state_k = carry
        step = task_step(
            partition,
            loss_fn,
            theta_k,
            phi_values,
            batch,
            learning_rate,
            velocity=rule_state_k,
            state=state_k,
            stop_inner_gradient=first_order,
            training=training,
            rule=inner,
        )
        # The model state goes on from step to step (random-number-generator seeds
        # advance, so every forward pass draws fresh dropout masks); it is not
        # differentiated.
        new = (list(step.theta), step.velocity, [tf.stop_gradient(s) for s in step.state])
        # the same nested structure (lists, tuples) as the carry, for tf.while_loop
        return tf.nest.pack_sequence_as(carry, tf.nest.flatten(new))

    def step_k(k, carry, phi_values):
        if len(batches) == 1:
            return one_step(carry, phi_values, batches[0])
        flat = tf.switch_case(
            k % len(batches),
            [
                lambda i=i: tf.nest.flatten(one_step(carry, phi_values, batches[i]))
                for i in range(len(batches))
            ],
        )
        return tf.nest.pack_sequence_as(carry, list(flat))

    carry = (theta, rule_state, state)
    if unroll is None:
        unroll = (
            not recompute
            and isinstance(steps, (int, np.integer))
            and int(steps) <= MAML_UNROLL_MAX_STEPS
        )
    if unroll:
        if recompute:
            raise ValueError(
                "maml_objective: recompute=True recomputes the steps of the "
                "symbolic loop; use unroll=False with it."
            )
        if isinstance(steps, (tf.Tensor, tf.Variable)):
            raise ValueError(
                "maml_objective: unroll=True needs a Python int number of "
                f"steps, got the tensor {steps!r}; use unroll=False."
            )
        for k in range(int(steps)):
            carry = one_step(carry, phi, batches[k % len(batches)])
    elif recompute:
        flat = _checkpointed_loop(
            lambda k, flat_carry, phi_values: tf.nest.flatten(
                step_k(k, tf.nest.pack_sequence_as(carry, flat_carry), phi_values)
            ),
            tf.nest.flatten(carry),
            phi,
            steps,
        )
        carry = tf.nest.pack_sequence_as(carry, list(flat))
    else:
        steps_t = tf.cast(steps, tf.int32)
        _, carry = tf.while_loop(
            lambda k, _: k < steps_t,
            lambda k, c: (k + 1, step_k(k, c, phi)),
            (tf.constant(0, tf.int32), carry),
            maximum_iterations=steps_t,
        )
    theta, _, state = carry
    loss, _ = task_loss(partition, loss_fn, list(theta), phi, query, state, training)
    return loss, list(theta)


def maml_meta_gradient(
    partition,
    loss_fn,
    theta0,
    phi,
    support,
    query,
    learning_rate,
    steps,
    first_order=False,
    **kwargs,
):
    """∇θ0 of `maml_objective`. Returns ``(query_loss, gradients, theta_K)``."""
    theta0 = _as_list(theta0)
    with tf.GradientTape() as tape:
        tape.watch(theta0)
        loss, theta_k = maml_objective(
            partition,
            loss_fn,
            theta0,
            phi,
            support,
            query,
            learning_rate,
            steps,
            first_order=first_order,
            **kwargs,
        )
    grads = tape.gradient(loss, theta0, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, grads, theta_k


def reptile_direction(theta0, theta_k):
    """The Reptile meta-gradient θ0 − θ_K (Nichol et al., 2018): θ0 ← θ0 − β(θ0 − θ_K)."""
    return [a - b for a, b in zip(_as_list(theta0), _as_list(theta_k))]


CONTINUAL_WEIGHTINGS = ("appearances", "printed", "average")


def continual_weights(
    num_subtasks, steps_per_subtask, weighting="appearances", current_subtask=None
):
    """Per-sub-task weights of the continual meta-objective (WarpGrad Eq. 18).

    Sub-task i (1-based) of T appears in the meta-objective of every step from its own
    first step on, n(T − i + 1) times in all.

    * ``"appearances"`` (default): w_i = 1 / (n(T − i + 1)), so every sub-task gets the same
      total weight over the sequence ("normalising on number of appearances", App. K).
    * ``"printed"``: Eq. 18 as printed, w_i = 1 / (n(T − t + 1)) for every i ≤ t, where t is
      the current sub-task: all active sub-tasks share one weight, which grows as the
      sequence goes on. Needs ``current_subtask``.
    * ``"average"``: w_i = 1 / t for every i ≤ t, the average loss over the current and
      earlier sub-tasks (WarpGrad App. D, before Eq. 14, and Sec. 4): within a phase every
      active sub-task weighs the same, so the first sub-task, active in every phase, gets
      the largest total weight. Needs ``current_subtask``.

    Args:
        num_subtasks: T.
        steps_per_subtask: n.
        weighting: one of `CONTINUAL_WEIGHTINGS`.
        current_subtask: t (1-based; a number or a scalar tensor), for ``"printed"`` and
            ``"average"``.

    Returns:
        A list of T weights (Python floats; scalar tensors when t is a tensor).

    Raises:
        ValueError: an unknown `weighting`, or no `current_subtask` where it is needed.

    Example:
        >>> continual_weights(3, 2)
        [0.16666666666666666, 0.25, 0.5]
        >>> continual_weights(3, 2, "printed", current_subtask=2)
        [0.25, 0.25, 0.25]
        >>> continual_weights(3, 2, "average", current_subtask=2)
        [0.5, 0.5, 0.5]
    """
    T, n = int(num_subtasks), int(steps_per_subtask)
    if weighting == "appearances":
        return [1.0 / (n * (T - i + 1)) for i in range(1, T + 1)]
    if weighting in ("printed", "average"):
        if current_subtask is None:
            raise ValueError(f'continual_weights(weighting="{weighting}") needs current_subtask')
        number = isinstance(current_subtask, (int, float))
        t = current_subtask if number else tf.cast(current_subtask, tf.float64)
        weight = 1.0 / (n * (T - t + 1.0)) if weighting == "printed" else 1.0 / t
        return [float(weight) if number else weight] * T
    raise ValueError(f"weighting must be one of {CONTINUAL_WEIGHTINGS}, got {weighting!r}")


def continual_objective(
    partition,
    loss_fn,
    theta,
    phi,
    validation_batches,
    current_subtask,
    num_subtasks,
    steps_per_subtask,
    state=None,
    training=True,
    weighting="appearances",
):
    """The continual-learning meta-loss at θ during sub-task t (WarpGrad Eq. 14 / 18):

        L_meta(θ; φ) = Σ_{i=1..t} w_i L_task(θ, D_val^i; φ),

    the weighted validation losses of the current and all earlier sub-tasks, so that an
    update that helps the current sub-task but makes the model forget earlier ones is
    penalised. Use it as `meta_loss` of `warp_objective`. The weights w_i are those of
    `continual_weights`: 1 / (n(T − i + 1)) by default (App. K's normalisation by the number
    of appearances), with ``weighting="printed"`` 1 / (n(T − t + 1)) as Eq. 18 prints it, or
    with ``weighting="average"`` 1 / t (the average of App. D).

    Args:
        validation_batches: list of T batches, one per sub-task (in presentation order).
        current_subtask: t, 1-based (may be a tensor).
        num_subtasks: T.
        steps_per_subtask: n.
        weighting: ``"appearances"``, ``"printed"`` or ``"average"`` (see
            `continual_weights`).

    Returns:
        The scalar meta-loss.
    """
    weights = continual_weights(num_subtasks, steps_per_subtask, weighting, current_subtask)
    total = None
    for i, batch in enumerate(validation_batches[: int(num_subtasks)], start=1):
        loss, _ = task_loss(partition, loss_fn, theta, phi, batch, state, training)
        active = tf.cast(tf.less_equal(i, current_subtask), loss.dtype)
        term = active * as_dtype(weights[i - 1], loss.dtype) * loss
        total = term if total is None else total + term
    return total
