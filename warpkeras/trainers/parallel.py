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
  vectorised; meta-gradient sums are all-reduced across replicas.

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
        return tf.function(_unrolled(fn, on_trace), jit_compile=self.jit_compile,
                           reduce_retracing=True)

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
        return tf.function(_vectorized(fn, on_trace), jit_compile=self.jit_compile,
                           reduce_retracing=True)


def _masked_sum(stacked, mask):
    mask = tf.convert_to_tensor(mask)
    return [tf.reduce_sum(tf.boolean_mask(t, mask), axis=0) for t in stacked]


class DistributedExecutor:
    """Splits the meta-batch across the replicas of a `tf.distribute.Strategy`.

    Each replica adapts ``meta_batch_size / replicas`` tasks (unrolled or vectorised on its
    device). Per-task results come back to the host between steps (the task loop is driven
    from Python); meta-gradient sums are all-reduced with ``strategy.reduce``.

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
        return tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0), *local)

    def compile(self, fn, on_trace=None):
        wrap = _vectorized if self.inner == "vectorized" else _unrolled
        step = tf.function(wrap(fn, on_trace), jit_compile=self.jit_compile,
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
