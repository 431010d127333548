"""Running the tasks of a meta-batch side by side.

The tasks of a meta-batch are independent until their meta-gradients are summed, so a
trainer can adapt a *group* of them in lock-step: every per-task quantity (θ, momentum,
batch-norm state, batches, accumulated meta-gradients) is stacked along a leading task axis
and one compiled call advances the whole group by one step. An executor decides how a
per-task function runs over that axis:

* `SequentialExecutor` — groups of one task (the default);
* `UnrolledExecutor` — the whole meta-batch in one graph, one copy of the step per task; TF
  runs the copies concurrently on its inter-op threads;
* `VectorizedExecutor` — the whole meta-batch through `tf.vectorized_map` (batched kernels;
  the fast choice on accelerators);
* `DistributedExecutor` — the meta-batch split across the replicas of a
  `tf.distribute.Strategy` (`MirroredStrategy` for several GPUs,
  `MultiWorkerMirroredStrategy` across machines), each replica running its share unrolled or
  vectorised; meta-gradient sums are all-reduced across replicas. Across several workers
  the per-task results are all-gathered, so that every worker holds the whole meta-batch
  (replay buffer, masks, logs) and makes the same meta-update as one device would.

Trainers choose one with ``parallel=`` and ``strategy=``; the training loop is the same.
"""

import tensorflow as tf

PARALLEL_MODES = ("sequential", "unrolled", "vectorized")


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


def _vectorized(fn, on_trace=None):
    def run(*stacked):
        if on_trace is not None:
            on_trace()
        return tf.vectorized_map(lambda args: fn(*args), stacked)
    return run


class SequentialExecutor:
    """One task at a time."""

    name = "sequential"

    def __init__(self, jit_compile=False):
        self.jit_compile = jit_compile

    def group_size(self, meta_batch_size):
        return 1

    def compile(self, fn, on_trace=None):
        """Compiles ``fn`` (one task's step) into a function of stacked task groups;
        `on_trace` is called every time the group function is traced."""
        return _per_group_size(lambda: tf.function(
            _unrolled(fn, on_trace), jit_compile=self.jit_compile, reduce_retracing=True))

    def masked_sum(self, stacked, mask):
        return _masked_sum(stacked, mask)


class UnrolledExecutor(SequentialExecutor):
    """All tasks of the meta-batch in one graph."""

    name = "unrolled"

    def group_size(self, meta_batch_size):
        return meta_batch_size


class VectorizedExecutor(SequentialExecutor):
    """All tasks of the meta-batch through `tf.vectorized_map`."""

    name = "vectorized"

    def compile(self, fn, on_trace=None):
        return _per_group_size(lambda: tf.function(
            _vectorized(fn, on_trace), jit_compile=self.jit_compile, reduce_retracing=True))


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

    def _split(self, stacked):
        per = tf.nest.flatten(stacked)[0].shape[0] // self.replicas

        def value_fn(ctx):
            i = ctx.replica_id_in_sync_group
            return tf.nest.map_structure(lambda t: t[i * per:(i + 1) * per], stacked)

        return self.strategy.experimental_distribute_values_from_function(value_fn)

    def _gather(self, per_replica):
        local = self.strategy.experimental_local_results(per_replica)
        if self.multi_worker:  # already all-gathered: every replica holds the whole batch
            return local[0]
        return tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0), *local)

    def compile(self, fn, on_trace=None):
        wrap = _vectorized if self.inner == "vectorized" else _unrolled
        step = tf.function(wrap(fn, on_trace), jit_compile=self.jit_compile,
                           reduce_retracing=True)
        if self.multi_worker:
            replica_step = step
            step = tf.function(lambda *args: _all_gather_tasks(replica_step(*args)),
                               reduce_retracing=True)

        def run(*stacked):
            args = self._split(tuple(stacked))
            return self._gather(self.strategy.run(step, args=args))

        return run

    def masked_sum(self, stacked, mask):
        mask = tf.cast(tf.convert_to_tensor(mask), stacked[0].dtype)
        split = self._split((tuple(stacked), mask))

        def partial(args):
            values, m = args
            return [tf.tensordot(m, v, axes=1) for v in values]

        per_replica = self.strategy.run(partial, args=(split,))
        return [self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for v in per_replica]


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
        packed = tf.concat([tf.reshape(tf.cast(leaves[i], dtype), [-1, widths[i]]) for i in idx],
                           axis=1)
        full = ctx.all_gather(packed, axis=0)
        for i, piece in zip(idx, tf.split(full, [widths[i] for i in idx], axis=1)):
            shape = [-1] + leaves[i].shape[1:].as_list()
            out[i] = tf.cast(tf.reshape(piece, shape), leaves[i].dtype)
    return tf.nest.pack_sequence_as(value, out)


def make_executor(parallel="sequential", strategy=None, jit_compile=False):
    """The executor for a trainer's ``parallel`` / ``strategy`` arguments."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel={parallel!r}: expected one of {PARALLEL_MODES}.")
    if strategy is not None:
        return DistributedExecutor(
            strategy, inner="vectorized" if parallel == "vectorized" else "unrolled",
            jit_compile=jit_compile,
        )
    return {"sequential": SequentialExecutor, "unrolled": UnrolledExecutor,
            "vectorized": VectorizedExecutor}[parallel](jit_compile=jit_compile)
