"""`WarpObjective`: WarpGrad's warp objective L(φ) (WarpGrad Eq. 3, Algorithms 1–3)."""

import keras
import numpy as np
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras import objectives as obj
from warpkeras.buffer import ReplayBuffer
from warpkeras.meta.base import MetaObjective, MetaTrainingError, all_finite
from warpkeras.meta.offline import offline_updates
from warpkeras.partition import check_exact

WARP_MODES = ("online", "offline", "continual")


class WarpObjective(MetaObjective):
    """Meta-learns the warp parameters φ with L(φ) = E[L_meta(θ − α∇L_task(θ; φ); φ)]
    (WarpGrad Eq. 3, `warpkeras.objectives.warp_objective`) over sampled points θ of the
    tasks' trajectories.

    * ``"online"`` (Algorithm 1): ∇φ of Eq. 3 at every adaptation step, accumulated in the
      carry inside the compiled step; one warp update per meta step.
    * ``"offline"`` (Algorithm 2): the adaptation fills a replay buffer with θ_0 … θ_K
      (θ_K with ``final_point``); after the meta-batch, stored points are drawn without
      replacement and φ is updated on mini-batches of ``interval`` (η) points.
    * ``"continual"`` (Algorithm 3): one stream of task parameters without resets; the
      warp gradient is applied every η inner steps.

    The N gradients making one warp update are combined by `reduction`: ``"sum"`` (the
    paper's g_φ ← g_φ + ∇L) or ``"mean"`` (default; the sum / N).

    Args:
        mode: ``"online"``, ``"offline"`` (default) or ``"continual"``.
        exact: differentiate through the inner gradient (second order, default) or stop
            it (the approximate objective, App. G).
        interval: η (offline: points per warp update; continual: inner steps per warp
            update; default 1).
        max_updates: offline, cap on warp updates per meta step (`None`: every point used
            once).
        reduction: ``"mean"`` or ``"sum"``.
        final_point: offline, also store θ_K (Algorithm 2 line 9; default True).
        buffer: offline, a `warpkeras.ReplayBuffer` (default: unbounded, in memory).
        learn_learning_rate: meta-learn the inner α (App. G "learned α"; needs `exact`).
        learn_momentum: meta-learn the inner μ (needs the trainer's ``inner_momentum``).
        hyper_optimizer: optimiser of α / μ (default SGD(1e-3, clipvalue=1e-3), App. G).
        meta_loss: optional ``meta_loss(partition, loss_fn, theta, phi, meta_batch, state)
            -> scalar`` replacing the loss on the meta batch.
        optimizer: Keras optimizer for φ (default: the trainer's ``meta_optimizer``).
    """

    requires_warp = True

    def __init__(
        self,
        mode="offline",
        exact=True,
        interval=None,
        max_updates=None,
        reduction="mean",
        final_point=True,
        buffer=None,
        learn_learning_rate=False,
        learn_momentum=False,
        hyper_optimizer=None,
        meta_loss=None,
        optimizer=None,
    ):
        where = type(self).__name__
        self.mode = _v.check_choice(mode, "mode", WARP_MODES, where=where, error=MetaTrainingError)
        self.exact = _v.check_bool(exact, "exact", where=where)
        integer = dict(where=where, error=MetaTrainingError, minimum=1, allow_none=True)
        self.interval = _v.check_int(interval, "interval", **integer)
        self.max_updates = _v.check_int(max_updates, "max_updates", example=100, **integer)
        self.reduction = _v.check_choice(
            reduction, "reduction", ("mean", "sum"), where=where, error=MetaTrainingError
        )
        self.final_point = _v.check_bool(final_point, "final_point", where=where)
        if buffer is not None and not isinstance(buffer, ReplayBuffer):
            raise TypeError(
                f"{where}: buffer={_v.describe(buffer)} is not valid: expected a "
                "warpkeras.ReplayBuffer(capacity, overflow, spill_dir) or None."
            )
        self.buffer = buffer
        self.learn_lr = _v.check_bool(learn_learning_rate, "learn_learning_rate", where=where)
        self.learn_mu = _v.check_bool(learn_momentum, "learn_momentum", where=where)
        self.hyper_optimizer = _v.get_optimizer(hyper_optimizer, "hyper_optimizer", where=where)
        self.meta_loss = _v.check_callable(
            meta_loss,
            "meta_loss",
            where=where,
            signature="meta_loss(partition, loss_fn, theta, phi, meta_batch, state) -> scalar",
        )
        self.optimizer = _v.get_optimizer(optimizer, "optimizer", where=where)
        self.meta_batches = self.mode in ("online", "continual")
        self.continues_stream = self.mode == "continual"
        if (self.learn_lr or self.learn_mu) and not self.exact:
            raise MetaTrainingError(
                "With the approximate objective the inner update is a constant, so the "
                "learning rate and momentum get no meta-gradient: use warp_objective='exact'."
            )

    # ------------------------------------------------------------------ set-up
    def scale(self, n):
        """1 / n for ``reduction="mean"``, 1 for ``"sum"`` (Algorithms 1–3)."""
        return 1.0 / float(n) if self.reduction == "mean" else 1.0

    def variables(self, engine):
        return engine.partition.warp_variables

    def build(self, engine):
        if self.exact:
            check_exact(engine.model, "warp_objective='exact'", error=MetaTrainingError)
            if not engine.inner_rule.differentiable:
                raise MetaTrainingError(
                    f"warp_objective='exact' differentiates through the inner step, but the "
                    f"inner rule {engine.inner_rule!r} is not differentiable: use "
                    "warp_objective='approx' or another inner rule."
                )
        if (self.learn_lr or self.learn_mu) and engine.custom_update:
            raise MetaTrainingError(
                f"learn_inner_learning_rate / learn_inner_momentum meta-learn the α and μ of "
                f"the trainer's SGD rule, but the trainer's inner rule is "
                f"{engine.inner_rule!r}, which does not use them: drop them or the rule."
            )
        if self.learn_mu and not engine.use_momentum:
            raise MetaTrainingError(
                f"{type(engine).__name__}: learn_inner_momentum=True needs an inner_momentum "
                "value to start from, e.g. inner_momentum=0.9."
            )
        if self.mode == "continual" and engine.executor_name != "sequential":
            raise MetaTrainingError(
                "warp_mode='continual' adapts one stream of task parameters: it runs "
                "sequentially (parallel='sequential', no strategy)."
            )
        if self.mode == "offline" and self.buffer is None:
            self.buffer = ReplayBuffer(seed=engine.seed)
        capacity = self.buffer.capacity if self.buffer is not None else None
        if (
            self.mode == "offline"
            and self.interval is not None
            and capacity is not None
            and self.interval > capacity
            and self.buffer.overflow == "reservoir"
        ):
            raise MetaTrainingError(
                f"meta_interval (η={self.interval}) is larger than the replay buffer "
                f"(capacity {capacity}): no warp update could ever be formed."
            )
        if self.optimizer is None:
            self.optimizer = engine.meta_optimizer
        if self.hyper_optimizer is None:
            self.hyper_optimizer = keras.optimizers.SGD(1e-3, clipvalue=1e-3)
        if engine.partition.warp_variables:
            self.optimizer.build(engine.partition.warp_variables)
        self.hyper_vars = [
            v
            for v, on in ((engine.inner_lr, self.learn_lr), (engine.inner_mu, self.learn_mu))
            if on
        ]
        if self.hyper_vars:
            self.hyper_optimizer.build(self.hyper_vars)
        self.stream_acc = (
            [
                tf.Variable(tf.zeros_like(v.value), trainable=False)
                for v in engine.partition.warp_variables
            ]
            if self.mode == "continual"
            else []
        )
        self.stream_count = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._build_functions(engine)

    def _build_functions(self, engine):
        p, tp, sp = engine.partition, engine.theta_packer, engine.state_packer
        self.phi_packer = pp = type(tp)(p.warp_variables)

        def warp_step(theta, velocity, state, x, y, meta_batch):
            """One inner step at packed θ with ∇φ (and ∇α, ∇μ) of Eq. 3 through it."""
            phi = engine.phi()
            theta_l = [tf.stop_gradient(t) for t in tp.unpack(theta)]
            velocity_l = tf.nest.map_structure(tf.stop_gradient, engine.unpack_rule_state(velocity))
            lr = tf.identity(engine.inner_lr)
            mu = tf.identity(engine.inner_mu) if engine.use_momentum else None
            with tf.GradientTape() as tape:
                tape.watch(phi)
                tape.watch(lr)
                if mu is not None:
                    tape.watch(mu)
                step = engine.task_step(
                    theta_l,
                    velocity_l,
                    sp.unpack(state),
                    x,
                    y,
                    phi=phi,
                    lr=lr,
                    mu=mu,
                    stop_inner_gradient=not self.exact,
                )
                # The meta pass continues from the inner pass's state (fresh dropout masks).
                meta, meta_state = self._meta_value(
                    engine, step.theta, phi, meta_batch, [tf.stop_gradient(s) for s in step.state]
                )
            step = step._replace(state=engine.with_seeds(step.state, meta_state))
            sources = [phi, lr] + ([mu] if mu is not None else [])
            grads = tape.gradient(meta, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            hyper = [g for g, on in zip(grads[1:], (self.learn_lr, self.learn_mu)) if on]
            hyper = tf.stack(hyper) if hyper else tf.zeros([0], lr.dtype)
            return step, meta, pp.pack(grads[0]), hyper

        def warp_point(theta, velocity, state, x, y, meta_batch):
            """∇φ of Eq. 3 at one stored point (offline warp updates)."""
            _, meta, g_phi, g_hyper = warp_step(theta, velocity, state, x, y, meta_batch)
            finite = tf.logical_and(tf.math.is_finite(meta), all_finite(g_phi))
            return meta, g_phi, g_hyper, finite

        def apply_warp(grads):
            self.optimizer.apply(pp.unpack(grads), p.warp_variables)

        def apply_hyper(grads):
            self.hyper_optimizer.apply(tf.unstack(grads), self.hyper_vars)
            engine.inner_lr.assign(tf.maximum(engine.inner_lr, 0.0))
            engine.inner_mu.assign(tf.clip_by_value(engine.inner_mu, 0.0, 0.999))

        def warp_point_update(theta, velocity, state, x, y, meta_batch):
            """`warp_point`, then one warp update on its gradient alone if it is finite
            (η = 1: a mini-batch of one point, whose reduction is the gradient itself)."""
            meta, g_phi, g_hyper, finite = warp_point(theta, velocity, state, x, y, meta_batch)

            def update():
                apply_warp(g_phi)
                if self.hyper_vars:
                    apply_hyper(g_hyper)
                return tf.constant(True)

            tf.cond(finite, update, lambda: tf.constant(False))
            return meta, finite

        self._warp_step = warp_step
        self.warp_point = engine.compile_single(warp_point, "warp_point")
        self._apply_warp = engine.compile_apply(apply_warp)
        self._apply_hyper = engine.compile_apply(apply_hyper)
        # one compiled call per warp update where nothing needs combining across replicas
        self.warp_point_update = (
            engine.compile_single(warp_point_update, "warp_point_update")
            if getattr(engine, "_variables_strategy", None) is None
            else None
        )

    def _meta_value(self, engine, theta, phi, meta_batch, state):
        """L_meta at θ and the model state after its forward pass."""
        if self.meta_loss is not None:
            return (
                self.meta_loss(engine.partition, engine.loss, theta, phi, meta_batch, state),
                state,
            )
        return obj.task_loss(engine.partition, engine.loss, theta, phi, meta_batch, state)

    # ------------------------------------------------------------------ compiled hooks
    def initial_carry(self, engine, size, theta):
        if self.mode != "online":
            return {}
        phi = self.phi_packer.pack(engine.phi())
        return {
            "warp_acc": tuple(tf.zeros([size] + list(t.shape), t.dtype) for t in phi),
            "hyper_acc": tf.zeros([size, len(self.hyper_vars)], theta[0].dtype),
        }

    def inner_step(self, engine, theta, velocity, state, x, y, meta_batch):
        if self.mode == "offline":
            return engine.run_step(theta, velocity, state, x, y), {}
        step, meta, g_phi, g_hyper = self._warp_step(theta, velocity, state, x, y, meta_batch)
        return step, {"meta": meta, "g_phi": g_phi, "g_hyper": g_hyper}

    def step(self, engine, carry, new, out, result):
        if self.mode == "offline":
            return
        aux = result["aux"]
        finite = tf.logical_and(out["finite"], tf.math.is_finite(aux["meta"]))
        out["finite"] = tf.logical_and(finite, all_finite(aux["g_phi"]))
        out["meta"] = aux["meta"]
        if self.mode == "online":
            new["warp_acc"] = tuple(a + g for a, g in zip(carry["warp_acc"], aux["g_phi"]))
            new["hyper_acc"] = carry["hyper_acc"] + aux["g_hyper"]
        else:
            out["g_phi"], out["g_hyper"] = aux["g_phi"], aux["g_hyper"]

    # ------------------------------------------------------------------ host-side hooks
    def begin_meta_step(self, engine):
        if self.buffer is not None:
            self.buffer.clear()

    def before_step(self, engine, group, k, carry):
        if self.mode == "offline":
            self.store(engine, group.task_ids, k, carry)

    def after_step(self, engine, group, k, carry, out):
        if self.mode == "continual":
            self._continual_tick(engine, out["g_phi"])

    def store(self, engine, task_ids, k, carry):
        """Offline: appends every task's θ_k (and momentum buffer) to the buffer."""
        theta = [np.asarray(t) for t in carry["theta"]]
        velocity = [np.asarray(v) for v in carry["velocity"]] if engine.has_rule_state else None
        for g, tid in enumerate(task_ids):
            self.buffer.add(
                tid,
                k,
                [t[g] for t in theta],
                [v[g] for v in velocity] if velocity is not None else None,
            )

    def _continual_tick(self, engine, g_phi):
        """Algorithm 3: add this step's warp gradient; apply every η steps."""
        g_phi = [g[0] for g in g_phi]
        if not bool(all_finite(g_phi)):
            engine.nan_points += 1  # its task is counted too
            return
        for v, g in zip(self.stream_acc, self.phi_packer.unpack(g_phi)):
            v.assign_add(g)
        self.stream_count.assign_add(1)
        eta = self.interval or 1
        if int(self.stream_count.numpy()) >= eta:
            scale = self.scale(eta)
            self._apply_warp(self.phi_packer.pack([v * scale for v in self.stream_acc]))
            for v in self.stream_acc:
                v.assign(tf.zeros_like(v))
            self.stream_count.assign(0)

    def close(self, engine, group):
        if self.mode == "offline" and self.final_point:
            self.store(engine, group.task_ids, engine.inner_steps, group.carry)  # θ_K
        if self.mode != "online":
            return None
        # summed over the K steps here, and over the tasks by the trainer
        scale = self.scale(engine.inner_steps)
        grads = tuple(a * scale for a in group.carry["warp_acc"])
        if self.hyper_vars:
            grads += (group.carry["hyper_acc"] * scale,)
        return {"grads": grads}

    def apply(self, engine, grads, count):
        scale = self.scale(count)
        n = len(self.phi_packer.groups)
        self._apply_warp(tuple(g * scale for g in grads[:n]))
        if self.hyper_vars:
            self._apply_hyper(grads[n] * scale)

    def end_meta_step(self, engine, tasks, rng):
        if self.mode != "offline" or not len(self.buffer):
            return {}
        # through the trainer's `_offline_updates` when it has one (benchmarks wrap it)
        run = getattr(engine, "_offline_updates", None)
        off = run(tasks, rng) if run is not None else offline_updates(self, engine, tasks, rng)
        logs = {"warp_updates": off["warp_updates"]}
        if off["meta_loss"]:
            logs["meta_loss"] = float(np.mean(off["meta_loss"]))
        return logs

    def logs(self, engine):
        logs = {}
        if self.mode in ("offline", "continual"):
            logs["nan_points"] = engine.nan_points
        if self.hyper_vars:
            logs["inner_learning_rate"] = float(engine.inner_lr.numpy())
            if self.learn_mu:
                logs["inner_momentum"] = float(engine.inner_mu.numpy())
        return logs

    def checkpoint_items(self, engine):
        items = {"meta_optimizer": self.optimizer, "stream_count": self.stream_count}
        if self.hyper_vars:
            items["hyper_optimizer"] = self.hyper_optimizer
        for i, v in enumerate(self.stream_acc):
            items[f"stream_acc_{i}"] = v
        return items

    def get_config(self):
        return {
            "class": type(self).__name__,
            "mode": self.mode,
            "exact": self.exact,
            "interval": self.interval,
            "reduction": self.reduction,
            "final_point": self.final_point if self.mode == "offline" else None,
            "learn_learning_rate": self.learn_lr,
            "learn_momentum": self.learn_mu,
        }
