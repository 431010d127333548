"""`MetaObjective`: the interface every meta-learning algorithm implements.

A trainer (`warpkeras.trainers.MetaTrainer`) adapts the tasks of a meta-batch for K inner
steps and hands every step to the objectives it was given. An objective is a small object
with hooks, called by the trainer (the *engine*, passed as the first argument):

========================  ======================================================  ==========
hook                      what it does                                            where
========================  ======================================================  ==========
``build``                 create its variables and optimiser; check the model     once
``after_build``           (optional) work needing every variable, once all        once
                          objectives are built (MAML builds its optimiser here)
``initial_carry``         its entries of the per-task carry and their start       Python
``inner_step``            (optional) the inner step itself, e.g. under a tape     compiled
``inner_update``          (optional) the update rule θ, ∇ → θ'                    compiled
``step``                  its contribution per inner step (updates the carry)     compiled
``before_step``,          (optional) host-side work per step (replay buffer,      Python
``after_step``            streamed updates)
``close``                 ends a task: the meta-gradient per task                 Python
``apply``                 applies the meta-gradient summed over finite tasks      Python
``end_meta_step``         (optional) work after the meta-batch (offline updates)  Python
========================  ======================================================  ==========

``initial_carry``, ``inner_step``, ``inner_update`` and ``step`` are traced into the one
compiled call that advances a group of tasks by one inner step (per task; the engine maps
them over the task axis), so adding an objective adds no Python per step. Carries hold
tensors only; parameter lists travel *packed* (one flat tensor per dtype, see
``engine.theta_packer``).
"""

import tensorflow as tf


class MetaTrainingError(ValueError):
    """A trainer was configured in a way that cannot work."""


def all_finite(tensors):
    """A scalar bool tensor: every tensor of the list is finite (`None` entries skipped)."""
    flags = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors if t is not None]
    return tf.reduce_all(tf.stack(flags)) if flags else tf.constant(True)


class MetaObjective:
    """Base class of meta-objectives: every hook does nothing by default.

    Subclasses override what they need. The engine passed to every hook is the trainer;
    objectives use its public pieces:

    * ``engine.partition`` (`warpkeras.Partition`), ``engine.loss``, ``engine.inner_steps``
      (K), ``engine.inner_lr`` / ``engine.inner_mu`` (α and μ, scalar `tf.Variable`s),
      ``engine.use_momentum``, ``engine.seed``;
    * ``engine.theta_packer`` / ``engine.state_packer``: ``pack(list) -> tuple`` and
      ``unpack(tuple) -> list`` of the task variables' / model state's values;
    * ``engine.phi()`` / ``engine.theta0()``: current values of φ / θ0 (lists of tensors);
    * ``engine.inner_rule``: the inner update rule in use (a `warpkeras.rules.InnerRule`);
      ``engine.task_step(theta, rule_state, state, x, y)``: the one inner step with the
      trainer's loss, rule and constraints (lists in, a `StepResult` out), differentiable;
      ``engine.has_rule_state`` / ``engine.pack_rule_state`` /
      ``engine.unpack_rule_state``: the rule's state, which the carry holds packed under
      ``"velocity"``;
    * ``engine.inner_update(theta, grads, velocity)``: ``inner_rule.update`` in the order
      of the hook below (lists in, ``(theta, velocity)`` out), differentiable;
    * ``engine.compile_group(fn, name)``: compiles ``fn`` (one task's tensors in, a
      structure of tensors out) into a function of stacked task groups, run by the
      trainer's executor (sequential, unrolled, vectorised or distributed);
    * ``engine.by_shape(group_fn, tasks, stacked, batches)``: calls a compiled group
      function on a group whose tasks' batches may differ in shape;
    * ``engine.compile_apply(fn)``: compiles an optimiser update (run in every replica
      under a `tf.distribute.Strategy`).

    Class attributes:
        adapts: the objective needs the K-step adaptation loop (False for MAML, which
            unrolls its own steps in ``close``).
        meta_batches: draw a meta (query) batch at every inner step for ``inner_step``.
        continues_stream: one stream of task parameters adapts across the meta-batch's
            tasks without resets (continual learning; tasks run one at a time).
        reports_accuracy: the trainer's logs carry the adaptation accuracy.
        requires_warp: the model must have warp layers.
        optimizer_name: the checkpoint / callback name of the objective's optimiser.
        supports_momentum: an overridden `inner_update` uses the velocity (heavy-ball μ)
            it is given. When False (default), a trainer with ``inner_momentum`` set
            refuses the objective at construction (`MetaTrainingError`).
    """

    adapts = True
    meta_batches = False
    continues_stream = False
    reports_accuracy = True
    requires_warp = False
    supports_momentum = False
    optimizer_name = "meta_optimizer"
    optimizer = None

    # ------------------------------------------------------------------ set-up
    def build(self, engine):
        """Called once by the trainer, inside the variables' distribution scope, after
        packing is set up: create variables, build the optimiser, check the model.
        Raise `MetaTrainingError` (a `ValueError`) for a combination that cannot work."""

    def after_build(self, engine):
        """Called once after every objective's `build` (in the same scope): work that
        needs `variables` complete, such as building the optimiser on them (MAML does it
        here, so that subclasses may create meta-variables after ``super().build``)."""

    def variables(self, engine):
        """The variables this objective meta-learns (what ``optimizer`` updates)."""
        return []

    def pack_gradients(self, engine, grads):
        """Packs one gradient per variable of `variables` (a list aligned with it) into
        the layout ``close`` returns and ``apply`` receives: one flat tensor per dtype
        (``engine.packer(self.variables(engine))``). For objectives whose `variables`
        are the task variables this is ``engine.theta_packer.pack``. Traceable."""
        return engine.packer(self.variables(engine)).pack(grads)

    def unpack_gradients(self, engine, grads):
        """The inverse of `pack_gradients`: packed gradients (e.g. ``apply``'s `grads`)
        to a list of tensors aligned with `variables`, each of its variable's shape.
        Traceable."""
        return engine.packer(self.variables(engine)).unpack(grads)

    # ------------------------------------------------------------------ traced hooks
    def initial_carry(self, engine, size, theta):
        """This objective's entries of the carry of a group of `size` tasks.

        Args:
            engine: the trainer.
            size: the number of tasks of the group (leading axis of every entry).
            theta: the stacked, packed start values θ_0 (tuple of ``[size, n]`` tensors).

        Returns:
            A dict of tensors with a leading axis of `size` (keys unique to the objective).
        """
        return {}

    def inner_step(self, engine, theta, velocity, state, x, y, meta_batch):
        """Override to run the inner step yourself (at most one objective may), e.g.
        under a `tf.GradientTape` to differentiate through it.

        Returns:
            ``(step, aux)``: a `warpkeras.objectives.StepResult` and a dict of tensors
            handed to ``step`` as ``result["aux"]``.
        """
        raise NotImplementedError

    def inner_update(self, engine, theta, grads, velocity):
        """Override to change the inner update rule (at most one objective may): lists
        θ_k and ∇L(θ_k) in, ``(θ_{k+1}, velocity)`` out. The trainer wraps it as its
        ``inner_rule``, used by every adaptation (meta training, `adapt`, `evaluate`) and
        inside MAML's unrolled steps, constraints applied after it. ``velocity`` is
        `None` unless the trainer has ``inner_momentum``, which it accepts only when the
        class sets ``supports_momentum = True`` (then ``engine.inner_mu`` is μ). The hook
        reads the trainer, so `export` refuses it: a rule that is served is a
        `warpkeras.rules.InnerRule` given as ``inner_rule=``."""
        raise NotImplementedError

    def step(self, engine, carry, new, out, result):
        """This objective's work at one inner step of one task (traced).

        Args:
            carry: the carry before the step (packed tensors, one task).
            new: the carry after the step; write this objective's entries into it.
            out: per-step outputs (``loss``, ``metric``, ``finite``); an objective may add
                entries or AND a condition into ``out["finite"]`` (a non-finite task is
                dropped from the meta-update).
            result: a dict: ``step`` (the `StepResult`, lists), ``gradients`` (∇θ packed,
                not differentiable), ``aux`` (from ``inner_step``), ``x``, ``y``,
                ``meta_batch``.
        """

    # ------------------------------------------------------------------ host-side hooks
    def begin_meta_step(self, engine):
        """Host-side work before a meta-batch is adapted."""

    def before_step(self, engine, group, k, carry):
        """Host-side work before inner step `k` of a group (e.g. storing θ_k)."""

    def after_step(self, engine, group, k, carry, out):
        """Host-side work after inner step `k` (e.g. a streamed warp update)."""

    def close(self, engine, group):
        """Ends the tasks of a group after their K steps.

        Args:
            group: a `types.SimpleNamespace` with ``tasks``, ``task_ids``, ``rngs``
                (per task a pair of generators for train / meta batches), ``meta_step``,
                ``theta_start`` (packed, stacked θ_0), ``carry`` (after K steps; `None`
                when no objective adapts), ``first_batch`` (per task its first training
                batch), ``train_iterators``.

        Returns:
            `None`, or a dict with ``grads`` (a tuple of tensors with a leading task axis:
            the per-task meta-gradient, summed over the finite tasks for ``apply``) and
            optionally ``finite`` (a bool array per task), ``losses`` / ``metrics``
            (``[tasks, steps]`` arrays replacing the adaptation's) and ``first_batch``.
        """
        return None

    def apply(self, engine, grads, count):
        """Applies `grads` (``close``'s ``grads`` summed over `count` finite tasks)."""

    def end_meta_step(self, engine, tasks, rng):
        """Work after the meta-batch's meta-updates; returns a dict of logs."""
        return {}

    def logs(self, engine):
        """Extra logs at the end of a meta step (e.g. a meta-learned learning rate)."""
        return {}

    def own_variables(self, engine):
        """The variables of `variables` that are not the model's (e.g. Meta-SGD's rates):
        the default `checkpoint_items` saves them."""
        model = {id(v) for v in engine.model.variables}
        return [v for v in self.variables(engine) if id(v) not in model]

    def checkpoint_items(self, engine):
        """Trackables a checkpoint must hold, by name: values are trackables (optimisers,
        variables) or lists of variables.

        Default: the optimiser (as ``optimizer_name``) and, as
        ``"<ClassName>_variables"``, the objective's own variables (`own_variables`:
        those of `variables` that are not the model's), so that `restore`,
        ``fit(checkpoint_dir=...)`` and Keras' `BackupAndRestore` bring them back.
        Override (calling ``super()``) to add accumulators or counters."""
        items = {}
        if self.optimizer is not None and self.variables(engine):
            items[self.optimizer_name] = self.optimizer
        own = self.own_variables(engine)
        if own:
            items[f"{type(self).__name__}_variables"] = list(own)
        return items

    def get_config(self):
        """The objective's settings (for logs and results files)."""
        return {"class": type(self).__name__}

    @classmethod
    def overrides(cls, name):
        """Whether this class overrides hook `name` of `MetaObjective`."""
        return getattr(cls, name) is not getattr(MetaObjective, name)
