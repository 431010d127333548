"""Running the tasks of a meta-batch side by side.

The tasks of a meta-batch are independent until their meta-gradients are summed, so a
trainer can adapt a *group* of them in lock-step: every per-task quantity (θ, momentum,
batch-norm state, batches, accumulated meta-gradients) is stacked along a leading task axis
and one compiled call advances the whole group by one step. An executor decides how a
per-task function runs over that axis:

* `SequentialExecutor` — groups of one task;
* `UnrolledExecutor` — the whole meta-batch (or groups of it) in one graph, one copy of the
  step per task; TF runs the copies concurrently on its inter-op threads;
* `VectorizedExecutor` — the whole meta-batch (or ``group_size`` tasks) through
  `tf.vectorized_map`: one batched kernel per layer for all tasks of the group (the choice
  for accelerators). Convolutions with per-task kernels become grouped convolutions (one
  group per task) rather than `tf.vectorized_map`'s task-by-task while loop, and any op
  that still falls back to a loop is named in a `VectorizationWarning`;
* `DistributedExecutor` — the meta-batch split across the replicas of a
  `tf.distribute.Strategy` (`MirroredStrategy` for several GPUs,
  `MultiWorkerMirroredStrategy` across machines), each replica running its share unrolled or
  vectorised; meta-gradient sums are all-reduced across replicas. Across several workers
  the per-task results are all-gathered, so that every worker holds the whole meta-batch
  (replay buffer, masks, logs) and makes the same meta-update as one device would.

Trainers choose one with ``parallel=`` and ``strategy=``; the training loop is the same.

``parallel="auto"`` (the trainers' default) is resolved once, when the trainer is built
(`resolve_parallel`):

* with a `strategy`: the `DistributedExecutor`, each replica running its tasks unrolled;
* when an objective continues one stream of task parameters across the meta-batch
  (``WarpObjective("continual")``, ``continues_stream = True``): ``"sequential"``;
* otherwise ``"unrolled"`` in groups of at most `AUTO_GROUP_SIZE` (8) tasks
  (`balanced_group_sizes`): on a 2-core CPU the unrolled per-task step measured 0.45–0.68x
  the sequential one at meta-batches 5 and 20 (whole meta steps 0.76–0.83x), while
  ``"vectorized"`` was slower than sequential. Unrolling costs tracing time (one copy of the
  step per task: the first meta step traces about 2x longer at 5 tasks and 8x at 20 in one
  group), which the group bound keeps in check. On GPUs ``"vectorized"`` is the mode to
  try (``bench/gpu.py`` measures it).

An explicit ``group_size=`` wins over the automatic grouping.
"""

import warnings

import tensorflow as tf

from warpkeras.trainers.pfor import _batched_converters, _recording_fallbacks  # noqa: F401

PARALLEL_MODES = ("auto", "sequential", "unrolled", "vectorized")

# Largest group of tasks ``parallel="auto"`` unrolls into one graph.
AUTO_GROUP_SIZE = 8


def balanced_group_sizes(meta_batch_size, max_size=AUTO_GROUP_SIZE):
    """How ``parallel="auto"`` splits a meta-batch into unrolled groups.

    Every distinct group size is traced once (`_per_group_size`), and tracing an unrolled
    group costs time in proportion to its size, so the split uses as few distinct sizes
    as it can while keeping groups large enough to run their tasks concurrently:

    * M <= `max_size`: one group of all M tasks (M = 1 is one task, as sequential);
    * else, when M splits evenly into groups of a size g in [ceil(max_size / 2),
      max_size]: M / g groups of the largest such g (one size, one trace);
    * else ceil(M / max_size) groups whose sizes differ by at most one, larger first
      (two sizes, two traces).

    Examples with ``max_size=8``: 5 → [5]; 16 → [8, 8]; 20 → [5, 5, 5, 5]; 9 → [5, 4];
    23 → [8, 8, 7]; 64 → eight groups of 8.

    Args:
        meta_batch_size: M, the number of tasks (a positive int).
        max_size: the largest group (a positive int).

    Returns:
        A list of positive ints summing to M, in the order the tasks are taken.

    Raises:
        ValueError: `meta_batch_size` or `max_size` is not a positive int.
    """
    for name, value in (("meta_batch_size", meta_batch_size), ("max_size", max_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int.")
    if meta_batch_size <= max_size:
        return [meta_batch_size]
    for size in range(max_size, (max_size + 1) // 2 - 1, -1):
        if meta_batch_size % size == 0:
            return [size] * (meta_batch_size // size)
    groups = -(-meta_batch_size // max_size)
    small, extra = divmod(meta_batch_size, groups)
    return [small + 1] * extra + [small] * (groups - extra)


def resolve_parallel(parallel, strategy=None, continues_stream=False):
    """The mode ``parallel="auto"`` stands for (other modes are returned unchanged).

    Args:
        parallel: one of `PARALLEL_MODES`.
        strategy: the trainer's `tf.distribute.Strategy`, or None.
        continues_stream: whether an objective adapts one stream of task parameters
            across the meta-batch (``MetaObjective.continues_stream``).

    Returns:
        ``"sequential"``, ``"unrolled"`` or ``"vectorized"``: with a strategy, how each
        replica runs its tasks (``"auto"`` → ``"unrolled"``); without one, a continued
        stream → ``"sequential"``, else ``"unrolled"``.

    Raises:
        ValueError: an unknown `parallel`.
    """
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r}: expected one of {PARALLEL_MODES}.")
    if parallel != "auto":
        return parallel
    if strategy is None and continues_stream:
        return "sequential"
    return "unrolled"


def _index(structure, i):
    return tf.nest.map_structure(lambda t: t[i], structure)


def _stack(structures):
    return tf.nest.map_structure(lambda *ts: tf.stack(ts), *structures)


def _unrolled(fn, on_trace=None):
    def run(*stacked):
        if on_trace is not None:
            on_trace()
        size = tf.nest.flatten(stacked)[0].shape[0]
        if size is None:
            raise ValueError("The task axis must have a static size.")
        return _stack([fn(*_index(stacked, i)) for i in range(size)])

    return run


def _per_group_size(make):
    """A function of stacked task groups that keeps one compiled function per group size.

    A meta-batch whose tasks differ in batch shape is run as several groups, one per shape
    (see `MetaTrainer._by_shape`), so one function meets several task-axis sizes. With a
    single `tf.function`, ``reduce_retracing`` would then relax the task axis to an unknown
    size, which unrolling cannot handle; a function per size keeps it static (and traces
    each size once).
    """
    compiled = {}

    def run(*stacked):
        size = tf.nest.flatten(stacked)[0].shape[0]
        if size not in compiled:
            compiled[size] = make()
        return compiled[size](*stacked)

    return run


class VectorizationWarning(RuntimeWarning):
    """`tf.vectorized_map` could not batch some ops of a task's step and runs them task by
    task in a while loop: ``parallel="vectorized"`` is then partly sequential."""


def _vectorized(fn, on_trace=None, on_fallback=None, grouped=lambda: None):
    def run(*stacked):
        if on_trace is not None:
            on_trace()
        with _recording_fallbacks() as fallbacks, _batched_converters(grouped()):
            out = tf.vectorized_map(lambda args: fn(*args), stacked)
        if fallbacks and on_fallback is not None:
            on_fallback(sorted(set(fallbacks)))
        return out

    return run


class SequentialExecutor:
    """One task at a time."""

    name = "sequential"

    def __init__(self, jit_compile=False, group_size=None):
        if group_size not in (None, 1):
            raise ValueError(
                f"group_size={group_size!r}: parallel='sequential' adapts one "
                "task at a time; use parallel='vectorized' or 'unrolled' for "
                "groups of tasks."
            )
        self.jit_compile = jit_compile

    def group_size(self, meta_batch_size):
        """The largest group a meta-batch of `meta_batch_size` tasks is split into."""
        return 1

    def group_sizes(self, meta_batch_size):
        """The sizes of the groups a meta-batch is adapted in, in order (sum: M)."""
        return [1] * meta_batch_size

    def compile(self, fn, on_trace=None):
        """Compiles ``fn`` (one task's step) into a function of stacked task groups;
        `on_trace` is called every time the group function is traced."""
        return _per_group_size(
            lambda: tf.function(
                _unrolled(fn, on_trace), jit_compile=self.jit_compile, reduce_retracing=True
            )
        )

    def masked_sum(self, stacked, mask):
        return _masked_sum(stacked, mask)


class UnrolledExecutor(SequentialExecutor):
    """All tasks of the meta-batch (or groups of ``group_size`` tasks) in one graph.

    Args:
        jit_compile: compile the group function with XLA.
        group_size: tasks per group (a positive int); `None`: the whole meta-batch. A
            meta-batch of M tasks runs as ceil(M / group_size) groups, the last one
            possibly smaller (one more trace).
        balanced: split into `balanced_group_sizes` (groups of at most `group_size`
            tasks, as few distinct sizes as possible) instead; ``parallel="auto"`` sets
            it, with ``group_size=AUTO_GROUP_SIZE``.

    Raises:
        ValueError: `group_size` is not a positive int or None.
    """

    name = "unrolled"

    def __init__(self, jit_compile=False, group_size=None, balanced=False):
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(
                f"group_size={group_size!r}: expected a positive int (tasks "
                "adapted in one call) or None (the whole meta-batch)."
            )
        self.jit_compile = jit_compile
        self.max_group = group_size
        self.balanced = bool(balanced) and group_size is not None

    def group_size(self, meta_batch_size):
        return max(self.group_sizes(meta_batch_size))

    def group_sizes(self, meta_batch_size):
        if self.max_group is None:
            return [meta_batch_size]
        if self.balanced:
            return balanced_group_sizes(meta_batch_size, self.max_group)
        full, rest = divmod(meta_batch_size, self.max_group)
        return [self.max_group] * full + ([rest] if rest else [])


class VectorizedExecutor(UnrolledExecutor):
    """All tasks of the meta-batch (or groups of ``group_size`` tasks) in one batched call.

    The per-task step is mapped over the task axis with `tf.vectorized_map`, so each layer
    runs one batched kernel for the whole group: matmuls with per-task weights become
    batched matmuls, convolutions with per-task kernels one grouped convolution on GPUs
    (see `_batched_converters`). One compiled call advances the group by one inner step.

    If `tf.vectorized_map` still has to fall back to a while loop over the tasks for some
    op, a `VectorizationWarning` names the ops when the step is traced, and
    ``fallback_ops`` lists them (per traced function name).

    Args:
        jit_compile: compile the group function with XLA.
        group_size: tasks per group (see `UnrolledExecutor`).
        grouped_convolutions: batch convolutions with per-task kernels as one grouped
            convolution (True) or as one convolution per task in the same graph (False);
            `None` (default): grouped when TensorFlow sees a GPU, per task on CPUs, where
            oneDNN's grouped convolution is the slower of the two. Read when a step is
            traced (an attribute of the same name).
    """

    name = "vectorized"

    def __init__(self, jit_compile=False, group_size=None, grouped_convolutions=None):
        super().__init__(jit_compile, group_size)
        self.grouped_convolutions = grouped_convolutions
        self.fallback_ops = {}

    def compile(self, fn, on_trace=None):
        name = getattr(fn, "__name__", "step")

        def on_fallback(ops):
            known = self.fallback_ops.setdefault(name, [])
            new = [op for op in ops if op not in known]
            known.extend(new)
            if new:
                warnings.warn(
                    f"parallel='vectorized': tf.vectorized_map cannot batch the op(s) "
                    f"{', '.join(new)} of the per-task function '{name}' and runs them task "
                    "by task in a while loop, so this part of the step is not vectorised. "
                    "Replace the layer emitting them, or use parallel='unrolled' / "
                    "'sequential' if it dominates the step time.",
                    VectorizationWarning,
                    stacklevel=2,
                )

        return _per_group_size(
            lambda: tf.function(
                _vectorized(fn, on_trace, on_fallback, lambda: self.grouped_convolutions),
                jit_compile=self.jit_compile,
                reduce_retracing=True,
            )
        )


def _masked_sum(stacked, mask):
    mask = tf.convert_to_tensor(mask)
    return [tf.reduce_sum(tf.boolean_mask(t, mask), axis=0) for t in stacked]


class DistributedExecutor:
    """Splits the meta-batch across the replicas of a `tf.distribute.Strategy`.

    Each replica adapts ``meta_batch_size / replicas`` tasks (unrolled or vectorised on its
    device). Per-task results come back to the host between steps (the task loop is driven
    from Python); meta-gradient sums are all-reduced with ``strategy.reduce``.

    With several workers (`MultiWorkerMirroredStrategy`) a worker's host only holds its own
    replicas' results, so they are all-gathered across workers inside the replica step
    (``ReplicaContext.all_gather``, one collective per dtype and call): every worker then
    holds every task's θ_k, losses and finiteness flags in global replica order, exactly
    the stacked results of one machine, and so fills the same replay buffer, drops the
    same tasks, logs the same values and makes the same meta-update. All workers must run
    the same script with the same seed (they sample the same tasks and batches).

    Args:
        strategy: a `tf.distribute.Strategy`.
        inner: ``"unrolled"`` or ``"vectorized"``, how a replica runs its tasks.
    """

    name = "distributed"

    def __init__(self, strategy, inner="unrolled", jit_compile=False):
        self.strategy = strategy
        self.inner = inner
        self.jit_compile = jit_compile
        self.replicas = strategy.num_replicas_in_sync
        local = len(getattr(strategy.extended, "worker_devices", ())) or self.replicas
        # Some replicas live on other workers: their results must be all-gathered.
        self.multi_worker = local < self.replicas

    def group_size(self, meta_batch_size):
        if meta_batch_size % self.replicas:
            raise ValueError(
                f"meta_batch_size={meta_batch_size} must be a multiple of the strategy's "
                f"{self.replicas} replicas so that every replica adapts the same number of tasks."
            )
        return meta_batch_size

    def group_sizes(self, meta_batch_size):
        return [self.group_size(meta_batch_size)]

    def _split(self, stacked):
        per = tf.nest.flatten(stacked)[0].shape[0] // self.replicas

        def value_fn(ctx):
            i = ctx.replica_id_in_sync_group
            return tf.nest.map_structure(lambda t: t[i * per : (i + 1) * per], stacked)

        return self.strategy.experimental_distribute_values_from_function(value_fn)

    def _gather(self, per_replica):
        local = self.strategy.experimental_local_results(per_replica)
        if self.multi_worker:  # already all-gathered: every replica holds the whole batch
            return local[0]
        return tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0), *local)

    def compile(self, fn, on_trace=None):
        wrap = _vectorized if self.inner == "vectorized" else _unrolled
        step = tf.function(wrap(fn, on_trace), jit_compile=self.jit_compile, reduce_retracing=True)
        if self.multi_worker:
            replica_step = step
            step = tf.function(
                lambda *args: _all_gather_tasks(replica_step(*args)), reduce_retracing=True
            )

        def run(*stacked):
            args = self._split(tuple(stacked))
            return self._gather(self.strategy.run(step, args=args))

        return run

    def masked_sum(self, stacked, mask):
        mask = tf.cast(tf.convert_to_tensor(mask), stacked[0].dtype)
        split = self._split((tuple(stacked), mask))
        per_replica = self.strategy.run(_replica_masked_sum, args=(split,))
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica]


@tf.function(reduce_retracing=True)
def _replica_masked_sum(args):
    """In a replica context: ``[Σ_i m_i · v[i] for v in values]`` over this replica's tasks,
    for ``args = (values, m)``. A `tf.function`, so that `tf.distribute.Strategy.run` runs
    it as a graph (run eagerly, a multi-worker strategy warns of its overhead on every
    call)."""
    values, m = args
    return [tf.tensordot(m, v, axes=1) for v in values]


def _all_gather_tasks(value):
    """In a replica context: this replica's per-task results concatenated with every other
    replica's (all workers') along the task axis, in replica order. The leaves are packed
    into one ``[tasks, width]`` tensor per dtype (booleans travel as int32), so a step costs
    one collective per dtype rather than one per leaf."""
    leaves = tf.nest.flatten(value)
    if not leaves:
        return value
    groups = {}
    for i, t in enumerate(leaves):
        groups.setdefault(tf.int32 if t.dtype == tf.bool else t.dtype, []).append(i)
    widths = [t.shape[1:].num_elements() for t in leaves]
    if None in widths:
        raise ValueError("Per-task results must have static shapes to be all-gathered.")
    ctx = tf.distribute.get_replica_context()
    out = [None] * len(leaves)
    for dtype, idx in groups.items():
        packed = tf.concat(
            [tf.reshape(tf.cast(leaves[i], dtype), [-1, widths[i]]) for i in idx], axis=1
        )
        full = ctx.all_gather(packed, axis=0)
        for i, piece in zip(idx, tf.split(full, [widths[i] for i in idx], axis=1)):
            shape = [-1] + leaves[i].shape[1:].as_list()
            out[i] = tf.cast(tf.reshape(piece, shape), leaves[i].dtype)
    return tf.nest.pack_sequence_as(value, out)


def make_executor(
    parallel="auto", strategy=None, jit_compile=False, group_size=None, continues_stream=False
):
    """The executor for a trainer's ``parallel`` / ``strategy`` / ``group_size`` arguments.

    ``parallel="auto"`` is resolved by `resolve_parallel`; without a strategy and an
    explicit `group_size`, its unrolled groups are `balanced_group_sizes` of at most
    `AUTO_GROUP_SIZE` tasks.

    Args:
        parallel: one of `PARALLEL_MODES`.
        strategy: a `tf.distribute.Strategy`, or None.
        jit_compile: compile the step functions with XLA.
        group_size: tasks adapted together in one call (a positive int), or None.
        continues_stream: whether an objective adapts one stream of task parameters
            across the meta-batch (only read for ``"auto"``).

    Returns:
        A `SequentialExecutor`, `UnrolledExecutor`, `VectorizedExecutor` or
        `DistributedExecutor`.

    Raises:
        ValueError: an unknown `parallel`, a `group_size` that is not a positive int, a
            `group_size` above 1 with ``parallel="sequential"`` (or ``"auto"`` with a
            continued stream), or a `group_size` with a `strategy` (which splits the whole
            meta-batch across its replicas).
    """
    resolved = resolve_parallel(parallel, strategy, continues_stream)
    if strategy is not None:
        if group_size is not None:
            raise ValueError(
                f"group_size={group_size!r} cannot be combined with a strategy: "
                "it splits the whole meta-batch across its replicas."
            )
        return DistributedExecutor(
            strategy,
            inner="vectorized" if resolved == "vectorized" else "unrolled",
            jit_compile=jit_compile,
        )
    if parallel == "auto" and resolved == "sequential" and group_size not in (None, 1):
        raise ValueError(
            f"group_size={group_size!r}: an objective continues one stream of "
            "task parameters across the meta-batch, so parallel='auto' adapts "
            "one task at a time; leave group_size unset."
        )
    if parallel == "auto" and resolved == "unrolled" and group_size is None:
        return UnrolledExecutor(jit_compile=jit_compile, group_size=AUTO_GROUP_SIZE, balanced=True)
    return {
        "sequential": SequentialExecutor,
        "unrolled": UnrolledExecutor,
        "vectorized": VectorizedExecutor,
    }[resolved](jit_compile=jit_compile, group_size=group_size)
