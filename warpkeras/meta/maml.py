"""`MAML`: the initialisation meta-learned through K inner steps."""

import functools

import keras
import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras import objectives as obj
from warpkeras.meta.base import MetaTrainingError, all_finite
from warpkeras.meta.leap import InitObjective, default_optimizer
from warpkeras.partition import check_exact


class MAML(InitObjective):
    """Model-Agnostic Meta-Learning (Finn et al.; WarpGrad Eq. 1,
    `warpkeras.objectives.maml_objective`).

    For each task, K inner steps from θ0 on a support batch (the task's first training
    batch, reused at every step), then the loss on a query batch (the task's meta data);
    the meta-gradient is the gradient of that loss through the K steps (second order) or,
    with ``first_order=True``, with the inner gradients stopped (FOMAML). Beyond a few
    steps they run as one symbolic loop (`tf.while_loop`: the traced graph, and the time
    to the first meta step, do not grow with K; see ``unroll``) and use the trainer's
    inner rule
    (`engine.inner_rule`: SGD with α and heavy-ball μ, `warpkeras.rules.MetaSGD`, or an
    objective's own `inner_update`), its state carried through the steps as in `adapt`.
    The rule's own variables (Meta-SGD's α) are meta-learned with θ0.

    Alone, MAML needs no K-step adaptation loop (``adapts`` is False); with a warp
    objective (Warp-MAML) it closes each task after the warp objective's adaptation.

    Subclasses meta-learn more variables with the same query loss by overriding
    `meta_variables` (e.g. ANIL: the body, given as the model's warp layers; Meta-SGD:
    per-parameter learning rates read by `inner_update`).

    Second-order MAML keeps every step's activations for the meta-gradient (memory ∝ K ×
    the activations); ``recompute=True`` keeps only each step's θ_k and states and
    recomputes the step in the backward pass (memory ∝ K × |θ|, about one more forward
    and inner backward pass per step), for the same gradient to float rounding.

    Example:

    ```python
    import keras, warpkeras
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1)])
    trainer = warpkeras.trainers.MetaTrainer(
        model, "mse", objectives=[warpkeras.meta.MAML(recompute=True)], inner_steps=20)
    ```

    Args:
        first_order: FOMAML (default False).
        weight: λ (default 1).
        optimizer: Keras optimizer for θ0 and `meta_variables` (default: a copy of the
            trainer's ``meta_optimizer``).
        unroll: `True`: write the K steps into the graph one after the other (a Python
            loop: tracing time and graph size grow with K, steady steps are faster);
            `False`: one `tf.while_loop`; `None` (default): unrolled for K ≤
            `warpkeras.objectives.MAML_UNROLL_MAX_STEPS` (5) without `recompute`, the
            loop otherwise (see `warpkeras.objectives.maml_objective`).
        recompute: recompute each inner step's activations in the backward pass instead
            of keeping them (default False); not with ``unroll=True``.

    Raises:
        TypeError: `first_order`, `unroll` or `recompute` is not a bool.
        ValueError: ``unroll=True`` with ``recompute=True``.
    """

    adapts = False
    reports_accuracy = False

    def __init__(self, first_order=False, weight=1.0, optimizer=None, unroll=None, recompute=False):
        super().__init__(weight, optimizer)
        where = type(self).__name__
        self.first_order = _v.check_bool(first_order, "first_order", where=where)
        self.unroll = _v.check_bool(unroll, "unroll", allow_none=True, where=where)
        self.recompute = _v.check_bool(recompute, "recompute", where=where)
        if self.unroll and self.recompute:
            raise ValueError(
                f"{where}: recompute=True recomputes the steps of the symbolic "
                "loop, so it cannot be combined with unroll=True: drop one."
            )

    def meta_variables(self, engine):
        """Variables meta-learned besides θ0 by the query loss (default none). Warp
        variables of the model (`engine.partition.warp_variables`) are differentiated as
        the φ the model is called with; any other variable (`tf.Variable` or Keras
        variable) must be read by a hook inside the steps, e.g. `inner_update`."""
        return []

    def variables(self, engine):
        return list(engine.partition.task_variables) + self._extras(engine)

    def _extras(self, engine):
        """`meta_variables` and the inner rule's own variables (e.g. Meta-SGD's α), each
        once: meta-learned with θ0 by the query loss."""
        extras = list(self.meta_variables(engine))
        seen = {id(v) for v in extras}
        for v in engine.inner_rule.variables:
            if id(v) not in seen:
                extras.append(v)
                seen.add(id(v))
        return extras

    def build(self, engine):
        """Checks the model (second order needs layers with exact derivatives) and picks
        the optimiser. The optimiser is built on `variables` (θ0 and `meta_variables`),
        and the steps compiled, in `after_build`, once every objective's
        `build` has run: a subclass may create its meta-variables before or after
        calling ``super().build(engine)``."""
        if not self.first_order:
            check_exact(engine.model, "init_objective='maml'", error=MetaTrainingError)
            if not engine.inner_rule.differentiable:
                raise MetaTrainingError(
                    f"Second-order MAML differentiates through the inner steps, but the "
                    f"inner rule {engine.inner_rule!r} is not differentiable: use "
                    "first_order=True (init_objective='fomaml') or another inner rule."
                )
        self.optimizer = default_optimizer(engine, self.optimizer)

    def after_build(self, engine):
        p, tp, sp = engine.partition, engine.theta_packer, engine.state_packer
        extras = self._extras(engine)
        variables = list(p.task_variables) + extras
        self._built_variables = [id(v) for v in variables]
        self.optimizer.build(variables)
        warp_index = {id(v): i for i, v in enumerate(p.warp_variables)}

        def maml(theta0, state, sx, sy, qx, qy, steps):
            theta0, phi = tp.unpack(theta0), engine.phi()
            kwargs = dict(
                first_order=self.first_order,
                state=sp.unpack(state),
                rule=engine.inner_rule,
                unroll=self.unroll,
                recompute=self.recompute,
            )
            if not extras:
                loss, grads, _ = obj.maml_meta_gradient(
                    p,
                    engine.loss,
                    theta0,
                    phi,
                    (sx, sy),
                    (qx, qy),
                    engine.inner_lr,
                    steps,
                    **kwargs,
                )
            else:
                sources = [
                    phi[warp_index[id(v)]]
                    if id(v) in warp_index
                    else v.value
                    if isinstance(v, keras.Variable)
                    else v
                    for v in extras
                ]
                with tf.GradientTape() as tape:
                    tape.watch(theta0)
                    tape.watch(phi)
                    loss, _ = obj.maml_objective(
                        p,
                        engine.loss,
                        theta0,
                        phi,
                        (sx, sy),
                        (qx, qy),
                        engine.inner_lr,
                        steps,
                        **kwargs,
                    )
                g_theta, g_extra = tape.gradient(
                    loss, [theta0, sources], unconnected_gradients=tf.UnconnectedGradients.ZERO
                )
                grads = list(g_theta) + list(g_extra)
            grads = self.pack_gradients(engine, grads)
            return loss, grads, tf.logical_and(tf.math.is_finite(loss), all_finite(grads))

        def apply(grads):
            self.optimizer.apply(
                [g * self.weight for g in self.unpack_gradients(engine, grads)], variables
            )

        def compiled(steps):
            # K is read when the steps are traced: a trainer whose inner_steps changes
            # gets a function traced for the new K (the loop's graph does not grow with
            # K, so the trace costs the same) rather than the old K's.
            if steps not in self._compiled:
                self._compiled[steps] = engine.compile_group(
                    functools.wraps(maml)(lambda *args: maml(*args, steps)), "group_maml"
                )
            return self._compiled[steps]

        self._compiled = {}
        self._maml = compiled
        self._apply = engine.compile_apply(apply)

    def apply(self, engine, grads, count):
        if [id(v) for v in self.variables(engine)] != self._built_variables:
            raise MetaTrainingError(
                f"{type(self).__name__}: meta_variables() returns other variables than when "
                "the trainer was built: create them in build() (before or after "
                "super().build(engine)) and return the same list every time."
            )
        super().apply(engine, grads, count)

    def close(self, engine, group):
        meta_step, tasks, size = group.meta_step, group.tasks, len(group.tasks)
        maml = self._maml(int(engine.inner_steps))
        state = engine.reseed_stacked(
            group.state_start, [(meta_step, tid, 1) for tid in group.task_ids]
        )

        def run(support, queries):
            return engine.by_shape(
                lambda th, st, s, q: maml(th, st, s[0], s[1], q[0], q[1]),
                tasks,
                (group.theta_start, state),
                [support, queries],
            )

        if group.carry is None:  # no adaptation: support and query from the task streams
            streams = [
                engine.checked_streams(t, t.streams(a, b)) for t, (a, b) in zip(tasks, group.rngs)
            ]
            support = [next(s[0]) for s in streams]
            loss, grads, ok = run(support, [next(s[1]) for s in streams])
            return {
                "grads": grads,
                "finite": np.asarray(ok),
                "losses": np.asarray(loss)[:, None],
                "metrics": np.zeros((size, 1)),
                "first_batch": support,
            }  # for the moving statistics at θ0
        queries = [
            next(engine.checked(t, t.batches("meta", b), "meta"))
            for t, (_, b) in zip(tasks, group.rngs)
        ]
        _, grads, ok = run(group.first_batch, queries)
        return {"grads": grads, "finite": np.asarray(ok)}

    def get_config(self):
        return dict(
            super().get_config(),
            first_order=self.first_order,
            unroll=self.unroll,
            recompute=self.recompute,
        )
