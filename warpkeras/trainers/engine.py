"""The adaptation engine: packed parameters, the compiled step built from the objectives in
use, and the executors that run a group of tasks side by side.

Every inner step of a group of tasks is **one compiled call** (`_group_step`): the inner
step (the default warped SGD step, or the one objective's own `inner_step`) followed by
every objective's `step` hook, traced together into one `tf.function` and mapped over the
task axis by the executor (`warpkeras.trainers.parallel`). θ, momentum and model state
travel packed (one flat tensor per dtype, `_Packer`), so calling the step costs a handful
of arguments. Randomness derives from ``(seed, meta_step, task)``.
"""

import types

import numpy as np
import tensorflow as tf

from warpkeras import objectives as obj
from warpkeras import rules
from warpkeras.meta.base import MetaTrainingError, all_finite
from warpkeras.trainers.metrics import batch_accuracy

_all_finite = all_finite


class _Packer:
    """Packs a list of tensors into one flat tensor per dtype, and back.

    Compiled steps take and return θ, momentum and state packed this way: a handful of
    arguments instead of one per variable keeps the cost of calling a `tf.function` small
    next to the step itself.
    """

    def __init__(self, variables):
        self.shapes = [tuple(v.shape) for v in variables]
        self.dtypes = [tf.as_dtype(v.dtype) for v in variables]
        self.groups = []
        for d in self.dtypes:
            if d not in self.groups:
                self.groups.append(d)
        self.index = [[i for i, d in enumerate(self.dtypes) if d == g] for g in self.groups]
        self.sizes = [int(np.prod(s)) for s in self.shapes]

    def pack(self, values):
        values = list(values)
        return tuple(
            tf.concat([tf.reshape(values[i], [-1]) for i in idx], axis=0) for idx in self.index
        )

    def unpack(self, packed):
        out = [None] * len(self.shapes)
        for flat, idx in zip(packed, self.index):
            pieces = tf.split(flat, [self.sizes[i] for i in idx]) if len(idx) > 1 else [flat]
            for i, piece in zip(idx, pieces):
                out[i] = tf.reshape(piece, self.shapes[i])
        return out


def _leaves(structure):
    """The tensors of a rule state (none for `None`)."""
    return [] if structure is None else tf.nest.flatten(structure)


def _only_one(objectives, hook):
    found = [o for o in objectives if type(o).overrides(hook)]
    if len(found) > 1:
        raise MetaTrainingError(
            f"Objectives {', '.join(type(o).__name__ for o in found)} all define "
            f"`{hook}`, but a trainer runs one inner step rule: keep one of them."
        )
    return found[0] if found else None


class _ObjectiveRule(rules.InnerRule):
    """An objective's `inner_update` hook as the trainer's inner rule: its state is the
    heavy-ball velocity when the trainer has ``inner_momentum`` (zeros at the start),
    else `None`. Not exportable: the hook reads the trainer."""

    exportable = False

    def __init__(self, objective, engine):
        self.objective = objective
        self.engine = engine

    def init(self, theta, seed=0):
        if self.engine.use_momentum:
            return [tf.zeros_like(t) for t in theta]
        return None

    def update(self, grads, state, theta, extra=None):
        return self.objective.inner_update(self.engine, list(theta), grads, state)

    def get_config(self):
        return {"class": f"{type(self.objective).__name__}.inner_update"}


class AdaptationEngine:
    """The adaptation half of `MetaTrainer`: packing, compiled steps and group adaptation.

    Needs from the class it is mixed into: ``partition``, ``loss``, ``objectives``,
    ``inner_lr`` / ``inner_mu`` / ``use_momentum``, ``inner_steps``, ``executor``,
    ``seed``, ``step``, ``accuracy``, ``head_indices`` / ``_initial_head``,
    ``eval_training_mode``, ``jit_compile``, ``_variables_strategy`` and the input checks
    (`warpkeras.trainers.checks.InputChecks`).
    """

    # ------------------------------------------------------------------ public pieces
    @property
    def theta_packer(self):
        return self._theta_packer

    @property
    def state_packer(self):
        return self._state_packer

    @property
    def executor_name(self):
        return getattr(self.executor, "name", "sequential")

    def packer(self, variables):
        """The packer of a list of variables (or tensors): ``pack(list) -> tuple`` of one
        flat tensor per dtype, in order of first appearance, and ``unpack(tuple) -> list``
        of tensors of the variables' shapes. The same list gives the same packer."""
        key = tuple(id(v) for v in variables)
        if key not in self._packers:
            self._packers[key] = _Packer(variables)
        return self._packers[key]

    def phi(self):
        """Current warp values φ (list of tensors)."""
        return [v.value for v in self.partition.warp_variables]

    def theta0(self):
        """Current initialisation θ0 (list of tensors)."""
        return [v.value for v in self.partition.task_variables]

    _phi, _theta0 = phi, theta0

    def inner_update(self, theta, grads, velocity):
        """``inner_rule.update`` with the arguments in the order of the objectives'
        `inner_update` hook: lists θ_k, ∇L(θ_k) and the rule's state in,
        ``(θ_{k+1}, state)`` out (before the constraints, which `inner_step` applies)."""
        return self.inner_rule.update(grads, velocity, list(theta))

    @property
    def custom_update(self):
        """Whether the inner rule is not the trainer's SGD with α and μ."""
        return self.inner_rule is not self._sgd_rule

    @property
    def has_rule_state(self):
        """Whether the inner rule carries a state (heavy-ball velocity, K-FAC factors):
        it travels packed (`rule_state_packer`) where the momentum buffer did."""
        return bool(self._rule_packer.shapes)

    @property
    def rule_state_packer(self):
        """Packs the leaves of the inner rule's state (see `pack_rule_state`)."""
        return self._rule_packer

    def pack_rule_state(self, state):
        """The inner rule's state (a nested structure) as packed tensors (a tuple)."""
        return self._rule_packer.pack(tf.nest.flatten(state)) if self.has_rule_state else ()

    def unpack_rule_state(self, packed):
        """The inverse of `pack_rule_state` (`None` for a rule without state)."""
        if not self.has_rule_state:
            return self._rule_empty
        return tf.nest.pack_sequence_as(self._rule_structure, self._rule_packer.unpack(packed))

    def task_step(
        self,
        theta,
        velocity,
        state,
        x,
        y,
        rule=None,
        phi=None,
        lr=None,
        mu=None,
        stop_inner_gradient=False,
    ):
        """The one inner step (`warpkeras.objectives.task_step`) with the trainer's loss,
        partition, constraints and inner rule, at lists θ_k and rule state (traceable).

        Args:
            theta: θ_k (list of tensors).
            velocity: the rule's state (unpacked).
            state: the model's state (list).
            x, y: the batch.
            rule: another rule (default: the trainer's).
            phi: φ (default: the current warp values).
            lr, mu: α and μ tensors for the trainer's SGD rule (to differentiate them).
            stop_inner_gradient: see `task_step`.

        Returns:
            A `warpkeras.objectives.StepResult`.
        """
        rule = self.inner_rule if rule is None else rule
        if rule is self._sgd_rule and lr is not None:
            rule = rules.SGD(lr, mu if self.use_momentum else None)
        return obj.task_step(
            self.partition,
            self.loss,
            theta,
            self._phi() if phi is None else phi,
            (x, y),
            None,
            velocity=velocity,
            state=state,
            rule=rule,
            stop_inner_gradient=stop_inner_gradient,
        )

    def compile_group(self, fn, name):
        """``fn`` (one task) compiled into a function of stacked task groups by the
        executor; traces are counted in ``trace_counts[name]``."""
        return self.executor.compile(fn, self._traced(name))

    def compile_single(self, fn, name):
        """``fn`` compiled as one `tf.function` (no task axis)."""
        on_trace = self._traced(name)

        def run(*args):
            on_trace()
            return fn(*args)

        return tf.function(run, jit_compile=self.jit_compile, reduce_retracing=True)

    def compile_apply(self, fn):
        """An optimiser update ``fn(grads)`` as a `tf.function`. Mirrored variables are
        updated the way Keras' own `fit` does: the optimiser runs in every replica and
        all-reduces (sums) the replicas' gradients; ours are already the all-reduced
        totals, so each replica passes its 1 / replicas share."""
        strategy = self._variables_strategy
        if strategy is None:
            return tf.function(fn)
        share = 1.0 / strategy.num_replicas_in_sync
        return tf.function(
            lambda grads: strategy.run(
                fn, args=(tf.nest.map_structure(lambda g: g * share, grads),)
            )
        )

    def _traced(self, name):
        def on_trace():
            self.trace_counts[name] = self.trace_counts.get(name, 0) + 1

        return on_trace

    # ------------------------------------------------------------------ compiled steps
    def _build_engine(self):
        self.trace_counts = {}
        self._theta_packer = _Packer(self.partition.task_variables)
        self._state_packer = _Packer(self.partition.state_variables)
        self._stepper = _only_one(self.objectives, "inner_step")
        self._updater = _only_one(self.objectives, "inner_update")
        if (
            self._updater is not None
            and self.use_momentum
            and not getattr(self._updater, "supports_momentum", False)
        ):
            name = type(self._updater).__name__
            raise MetaTrainingError(
                f"{name}: its inner_update replaces the inner SGD rule and does not use "
                f"momentum, but the trainer has inner_momentum={float(self.inner_mu.numpy()):g}: "
                f"create the trainer with inner_momentum=None, or set "
                f"{name}.supports_momentum = True if the rule uses the velocity it is given."
            )
        self._build_rule()
        self._adapts = any(o.adapts for o in self.objectives) or not self.objectives
        self._meta_batches = any(o.meta_batches for o in self.objectives)
        self._stream = any(o.continues_stream for o in self.objectives)
        steppers = [o for o in self.objectives if type(o).overrides("step")]
        self._before = [o for o in self.objectives if type(o).overrides("before_step")]
        self._after = [o for o in self.objectives if type(o).overrides("after_step")]
        self._packers = {}
        for o in self.objectives:
            o.build(self)
        for o in self.objectives:
            o.after_build(self)
        tp, sp, p = self._theta_packer, self._state_packer, self.partition
        stop = tf.stop_gradient

        def meta_step_fn(carry, x, y, meta_batch):
            """One adaptation step of one task during meta-training, carrying everything
            the objectives accumulate."""
            if self._stepper is not None:
                step, aux = self._stepper.inner_step(
                    self, carry["theta"], carry.get("velocity"), carry["state"], x, y, meta_batch
                )
            else:
                step, aux = (
                    self.run_step(carry["theta"], carry.get("velocity"), carry["state"], x, y),
                    {},
                )
            new = dict(carry)
            new["theta"] = tp.pack([stop(t) for t in step.theta])
            if self.has_rule_state:
                new["velocity"] = tuple(stop(v) for v in self.pack_rule_state(step.velocity))
            new["state"] = sp.pack(step.state)
            grads = tp.pack([stop(g) for g in step.gradients])
            finite = tf.logical_and(
                tf.math.is_finite(step.loss), tf.reduce_all([all_finite(grads)])
            )
            out = {"loss": step.loss, "metric": self._metric(y, step.outputs), "finite": finite}
            result = {
                "step": step,
                "gradients": grads,
                "aux": aux,
                "x": x,
                "y": y,
                "meta_batch": meta_batch,
            }
            for o in steppers:
                o.step(self, carry, new, out, result)
            return new, out

        def evaluate_point(theta, state, x, y):
            # Keras's `evaluate`: every layer in inference mode (no dropout, no noise).
            # With `eval_training_mode` (the papers' transductive convention) batch-norm
            # layers normalise with the evaluated batch's own statistics: the moving
            # statistics are replaced by the batch's (momentum-0 pass) before the pass.
            theta_l, phi, state_l = tp.unpack(theta), self._phi(), sp.unpack(state)
            if self.eval_training_mode and self._has_statistics():
                from warpkeras.export import batch_statistics  # noqa: PLC0415

                state_l = batch_statistics(p, theta_l, phi, x, state_l)
            loss, _, outputs = obj.task_loss(
                p, self.loss, theta_l, phi, (x, y), state_l, training=False, return_outputs=True
            )
            return loss, self._metric(y, outputs)

        self._group_step = self.compile_group(meta_step_fn, "group_step")
        self._plain_steps = {}
        self._plain_step = self.plain_step()
        self._evaluate_point = self.compile_single(evaluate_point, "evaluate_point")

    def _build_rule(self):
        """The inner rule in use (`inner_rule`): the one given to the trainer, else an
        objective's `inner_update` hook, else SGD with α (and heavy-ball μ); built on the
        partition, and the layout of its packed state."""
        mu = self.inner_mu if self.use_momentum else None
        self._sgd_rule = rules.SGD(self.inner_lr, mu)
        given = getattr(self, "_given_rule", None)
        if given is not None and self._updater is not None:
            raise MetaTrainingError(
                f"{type(self._updater).__name__} defines inner_update, and the trainer was "
                f"given inner_rule={given!r}: a trainer runs one inner rule; keep one."
            )
        if given is not None:
            self.inner_rule = given
        elif self._updater is not None:
            self.inner_rule = _ObjectiveRule(self._updater, self)
        else:
            self.inner_rule = self._sgd_rule
        self.inner_rule.build(self.partition, self.loss)
        self._rule_structure = self.inner_rule.init(
            [tf.convert_to_tensor(v.value) for v in self.partition.task_variables]
        )
        leaves = _leaves(self._rule_structure)
        self._rule_empty = self._rule_structure if not leaves else None
        self._rule_packer = _Packer(leaves)

    def plain_step(self, rule=None):
        """The compiled inner step with φ frozen (evaluation and fine-tuning) for `rule`
        (default: the trainer's): ``step(theta, rule_state, state, x, y) -> (theta,
        rule_state, state, loss, metric, squared step length, finite)``, everything
        packed. One compiled step per rule."""
        rule = self.inner_rule if rule is None else rule
        if id(rule) in self._plain_steps:
            return self._plain_steps[id(rule)][1]
        tp, sp = self._theta_packer, self._state_packer
        theta0 = [tf.convert_to_tensor(v.value) for v in self.partition.task_variables]
        structure = rule.init(theta0)
        leaves = _leaves(structure)
        packer = _Packer(leaves)

        def plain_step_fn(theta, velocity, state, x, y):
            """One inner step with φ frozen (evaluation and fine-tuning)."""
            rule_state = (
                tf.nest.pack_sequence_as(structure, packer.unpack(velocity))
                if leaves
                else structure
            )
            step = self.task_step(
                [tf.stop_gradient(t) for t in tp.unpack(theta)],
                rule_state,
                sp.unpack(state),
                x,
                y,
                rule=rule,
            )
            new_theta = tp.pack(step.theta)
            sq = tf.add_n([tf.reduce_sum(tf.square(a - b)) for a, b in zip(new_theta, theta)])
            finite = tf.logical_and(tf.math.is_finite(step.loss), all_finite(step.gradients))
            new_velocity = packer.pack(tf.nest.flatten(step.velocity)) if leaves else velocity
            return (
                new_theta,
                new_velocity,
                sp.pack(step.state),
                step.loss,
                self._metric(y, step.outputs),
                sq,
                finite,
            )

        def start(theta, seed=0):
            """The packed rule state at the start of an adaptation from packed θ."""
            return (
                packer.pack(tf.nest.flatten(rule.init(tp.unpack(theta), seed=seed)))
                if leaves
                else ()
            )

        fn = self.compile_single(plain_step_fn, "plain_step")
        fn.start = start
        self._plain_steps[id(rule)] = (rule, fn)
        return fn

    def run_step(self, theta, velocity, state, x, y):
        """The trainer's inner step at packed θ_k and rule state (traced): a `StepResult`
        (lists)."""
        tp = self._theta_packer
        theta_l = [tf.stop_gradient(t) for t in tp.unpack(theta)]
        velocity_l = tf.nest.map_structure(tf.stop_gradient, self.unpack_rule_state(velocity))
        lr = tf.identity(self.inner_lr)
        mu = tf.identity(self.inner_mu) if self.use_momentum else None
        return self.task_step(
            theta_l, velocity_l, self._state_packer.unpack(state), x, y, lr=lr, mu=mu
        )

    def _metric(self, y, outputs):
        if self.accuracy:
            return batch_accuracy(y, outputs, self.loss)
        return tf.constant(0.0)

    # ------------------------------------------------------------------ start values, seeds
    def start_values(self, task=None, head=None):
        """θ0 (with the task's head, or the initial head, for multi-headed models), zero
        momentum and the model's state, packed."""
        theta = [tf.convert_to_tensor(v) for v in self._theta0()]
        if self.head_indices:
            values = head if head is not None else self._initial_head
            for i, h in zip(self.head_indices, values):
                theta[i] = tf.convert_to_tensor(h)
        velocity = self.pack_rule_state(self.inner_rule.init(theta))
        theta = self._theta_packer.pack(theta)
        state = self._state_packer.pack([v.value for v in self.partition.state_variables])
        return theta, velocity, state

    _start_values = start_values

    def task_rngs(self, rng):
        a, b = rng.spawn(2)
        return a, b

    _task_rngs = task_rngs

    def _initial_carry(self, size, start=None):
        theta, velocity, state = start if start is not None else self._start_values()
        stack = lambda values: tuple(tf.stack([v] * size) for v in values)  # noqa: E731
        carry = {"theta": stack(theta), "state": stack(state)}
        if self.has_rule_state:
            carry["velocity"] = stack(velocity)
        for o in self.objectives:
            carry.update(o.initial_carry(self, size, carry["theta"]))
        return carry

    def with_seeds(self, state, source):
        """`state` with the random-number-generator states taken from `source`."""
        state = list(state)
        for i in self.partition.seed_indices:
            state[i] = source[i]
        return state

    def reseed(self, packed_state, *key):
        """A packed state whose generator states derive from ``(seed,) + key``; every
        forward pass after it draws fresh random values (see `Partition.reseed`)."""
        if not self.partition.seed_indices:
            return packed_state
        sp = self._state_packer
        return sp.pack(self.partition.reseed(sp.unpack(packed_state), (self.seed,) + key))

    def reseed_stacked(self, stacked_state, keys):
        """`reseed` for a group: one key per task along the leading axis."""
        if not self.partition.seed_indices:
            return stacked_state
        per_task = [
            self.reseed(tuple(t[g] for t in stacked_state), *key) for g, key in enumerate(keys)
        ]
        return tuple(tf.stack(parts) for parts in zip(*per_task))

    _reseed, _reseed_stacked = reseed, reseed_stacked

    # ------------------------------------------------------------------ groups of tasks
    @staticmethod
    def _stack_batches(batches):
        return tf.nest.map_structure(lambda *ts: np.stack([np.asarray(t) for t in ts]), *batches)

    @staticmethod
    def _batch_signature(batch):
        """Shapes and dtypes of the leaves of one task's batch structure."""
        return tuple(
            (tuple(getattr(t, "shape", np.shape(t))), str(getattr(t, "dtype", "")))
            for t in tf.nest.flatten(batch)
        )

    def by_shape(self, fn, tasks, stacked, batches):
        """``fn(*stacked, *stacked_batches)`` for a group of tasks whose batches may differ
        in shape: tasks with equal shapes run together (one call in the usual case), one
        sub-group per shape otherwise, and the results come back in task order.

        Args:
            fn: a group function (`compile_group`); every leaf of its result has the task
                axis first.
            tasks: the group's tasks (for error messages).
            stacked: a tuple of structures with a leading task axis.
            batches: per batch argument of `fn`, a list of per-task batch structures.

        Raises:
            ValueError: shapes that differ under a `tf.distribute.Strategy` (whose replicas
                need equally shaped tasks), naming the tasks and their shapes.
        """
        size = len(tasks)
        if size == 1:
            return fn(*stacked, *[self._stack_batches(arg) for arg in batches])
        signatures = [tuple(self._batch_signature(arg[i]) for arg in batches) for i in range(size)]
        groups = {}
        for i, sig in enumerate(signatures):
            groups.setdefault(sig, []).append(i)
        if len(groups) == 1:
            return fn(*stacked, *[self._stack_batches(arg) for arg in batches])
        if self.executor_name == "distributed":
            shapes = "; ".join(
                f"'{getattr(tasks[i], 'name', i)}': "
                + ", ".join(str(list(shape)) for arg in signatures[i] for shape, _ in arg)
                for i in range(size)
            )
            raise ValueError(
                "The tasks of a meta-batch split across a tf.distribute.Strategy must have "
                f"batches of one shape, but they differ: {shapes}. Give every task the same "
                "batch_size (at most the smallest task's number of examples, and "
                "drop_remainder=True for tf.data batches), or train without a strategy "
                "(parallel='unrolled' / 'vectorized' group the tasks by shape)."
            )
        outs, order = [], []
        for idx in groups.values():
            part = tf.nest.map_structure(lambda t, idx=idx: tf.gather(t, idx), stacked)
            outs.append(fn(*part, *[self._stack_batches([arg[i] for i in idx]) for arg in batches]))
            order.extend(idx)
        inverse = np.argsort(order)
        return tf.nest.map_structure(lambda *ts: tf.gather(tf.concat(ts, 0), inverse), *outs)

    _by_shape = by_shape

    def _adapt_group(self, tasks, task_ids, rngs, start=None):
        """Adapts a group of tasks in lock-step for K steps (one compiled call per step)
        and closes them with every objective.

        Returns a dict of per-task results stacked along axis 0: ``carry``, ``losses`` /
        ``metrics`` (``[tasks, steps]``), ``metas``, ``grads`` (per objective index, its
        ``close`` gradients), ``first_batch`` and a boolean ``finite`` array (a task whose
        loss or gradients became non-finite is to be dropped).
        """
        size = len(tasks)
        theta, _, state = start if start is not None else self._start_values()
        group = types.SimpleNamespace(
            tasks=tasks,
            task_ids=task_ids,
            rngs=[self._task_rngs(r) for r in rngs],
            meta_step=int(self.step.numpy()),
            carry=None,
            first_batch=None,
            train_iterators=None,
            theta_start=tuple(tf.stack([t] * size) for t in theta),
            state_start=tuple(tf.stack([s] * size) for s in state),
        )
        result = {"finite": np.ones(size, bool), "metas": None, "grads": {}}
        if self._adapts:
            self._run_adaptation(group, start, result)
        for i, o in enumerate(self.objectives):
            closed = o.close(self, group)
            if not closed:
                continue
            if "finite" in closed:
                result["finite"] &= np.asarray(closed["finite"])
            for key in ("losses", "metrics", "first_batch"):
                if key in closed:
                    result[key] = closed[key]
            if "grads" in closed:
                result["grads"][i] = closed["grads"]
        return result

    def _run_adaptation(self, group, start, result):
        tasks, size = group.tasks, len(group.tasks)
        streams = [
            self._checked_streams(t, t.streams(a, b)) for t, (a, b) in zip(tasks, group.rngs)
        ]
        train_its = [s[0] for s in streams]
        meta_its = [s[1] for s in streams] if self._meta_batches else None
        carry = self._initial_carry(size, start)
        # Random draws (dropout) derive from (seed, meta step, task); the state then carries
        # them on from step to step, so every forward pass draws fresh values.
        carry["state"] = self._reseed_stacked(
            carry["state"], [(group.meta_step, tid, 0) for tid in group.task_ids]
        )
        group.theta_start = carry["theta"]
        outs, first_batch = [], None
        for k in range(self.inner_steps):
            train_batches = [next(it) for it in train_its]
            if first_batch is None:
                first_batch = train_batches
            for o in self._before:
                o.before_step(self, group, k, carry)
            meta_batches = [next(it) for it in meta_its] if meta_its else [()] * size
            carry, out = self._by_shape(
                lambda c, b, m: self._group_step(c, b[0], b[1], m),
                tasks,
                (carry,),
                [train_batches, meta_batches],
            )
            for o in self._after:
                o.after_step(self, group, k, carry, out)
            outs.append(out)
        group.carry, group.first_batch, group.train_iterators = carry, first_batch, train_its
        result["finite"] = np.all([np.asarray(o["finite"]) for o in outs], axis=0)
        result["carry"] = carry
        result["losses"] = np.stack([np.asarray(o["loss"]) for o in outs], axis=1)
        result["metrics"] = np.stack([np.asarray(o["metric"]) for o in outs], axis=1)
        if "meta" in outs[0]:
            result["metas"] = np.stack([np.asarray(o["meta"]) for o in outs], axis=1)
        result["first_batch"] = first_batch  # for the moving statistics at θ0
