"""Offline warp updates from the replay buffer (WarpGrad Algorithm 2, lines 12–23).

Two paths compute the same updates:

* per point: one compiled ``warp_point`` call per stored point, the finite check, the
  accumulation and every η-th ``_apply_warp`` on the host;
* in chunks (default with the approximate objective): up to ``chunk_size`` consecutive
  drained points whose batches have equal shapes go to ONE compiled call, a loop that computes each point's warp gradient at
  the current φ, skips non-finite points, accumulates and applies the warp (and α / μ)
  update every η finite points. The points, their order, their batches and their random
  seeds are the ones of the per-point path; only the host overhead per point goes.
"""

import numpy as np
import tensorflow as tf

#: default number of stored points per compiled call of the chunked path
DEFAULT_CHUNK_SIZE = 32


def offline_updates(objective, engine, tasks, rng, chunk_size=None):
    """Warp updates of `objective` (a `WarpObjective` in ``"offline"`` mode) from its
    replay buffer, each on the gradients of (up to) η points combined by its reduction
    (WarpGrad Algorithm 2, lines 12–23).

    Every stored point's gradient is ∇φ of Eq. 3 through one inner step from it on a fresh
    training batch, with a fresh meta batch (random draws derived from
    ``(seed, meta step, task, 2, k)``). Points are drawn from the buffer without
    replacement; non-finite points are skipped and counted in ``engine.nan_points``; at most
    ``objective.max_updates`` updates are made; a last partial mini-batch of fewer than η
    points makes one more update.

    Args:
        objective: the `WarpObjective` (built, ``mode="offline"``).
        engine: its trainer.
        tasks: the meta step's tasks, indexed by the buffer's task ids.
        rng: `numpy.random.Generator` of the buffer's draw order.
        chunk_size: stored points per compiled call (int >= 1); `None` takes
            ``objective.chunk_size``, and when that is `None` too, `DEFAULT_CHUNK_SIZE`
            with the approximate objective and 1 with the exact one (`WarpObjective`). 1
            is the per-point path. The chunked path is used when the warp variables are not mirrored by a
            distribution strategy; consecutive points whose batches differ in shape go to
            separate calls (a lone point takes the per-point path).

    Returns:
        ``{"warp_updates": int, "meta_loss": [float per point used]}``; the buffer is
        emptied. Both paths return the same values.

    Raises:
        ValueError: `chunk_size` is not a positive int.
    """
    if chunk_size is None:
        chunk_size = getattr(objective, "chunk_size", None)
    if chunk_size is None:
        chunk_size = 1 if objective.exact else DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"offline_updates: chunk_size={chunk_size!r} is not valid: expected "
                         "an int >= 1 (1: one compiled call per stored point).")
    chunk_size = int(chunk_size)
    if getattr(engine, "_variables_strategy", None) is not None:
        chunk_size = 1  # optimiser updates of mirrored variables run through strategy.run
    eta = objective.interval or 1
    batch_iters = {}
    run = {"logs": {"warp_updates": 0, "meta_loss": []}, "acc": None, "hyper": None,
           "count": 0, "updates_left": objective.max_updates}
    state = engine.start_values()[2]
    step = int(engine.step.numpy())

    def apply():
        scale = objective.scale(run["count"])
        objective._apply_warp(tuple(a * scale for a in run["acc"]))
        if objective.hyper_vars:
            objective._apply_hyper(run["hyper"] * scale)
        run["logs"]["warp_updates"] += 1

    def draw(entry):
        """The point's training and meta batches and its model state (host side)."""
        tid = entry["task_id"]
        if tid not in batch_iters:
            r1, r2 = engine.task_rngs(np.random.default_rng([engine.seed, step, 7919, tid]))
            batch_iters[tid] = tasks[tid].streams(r1, r2)
        train_it, meta_it = batch_iters[tid]
        x, y = next(train_it)
        meta_batch = next(meta_it)
        point_state = engine.reseed(state, step, tid, 2, entry["step"])
        return x, y, meta_batch, point_state

    def per_point(entry, x, y, meta_batch, point_state):
        """One point through the compiled `warp_point`; False once max_updates is hit."""
        velocity = tuple(entry["velocity"]) if engine.use_momentum else ()
        meta, g_phi, g_hyper, ok = objective.warp_point(tuple(entry["theta"]), velocity,
                                                        point_state, x, y, meta_batch)
        if not bool(ok):
            engine.nan_points += 1  # a point, not a task
            return True
        acc, hyper = run["acc"], run["hyper"]
        run["acc"] = g_phi if acc is None else tuple(a + g for a, g in zip(acc, g_phi))
        run["hyper"] = g_hyper if hyper is None else hyper + g_hyper
        run["count"] += 1
        run["logs"]["meta_loss"].append(float(meta))
        if run["count"] == eta:
            apply()
            run["acc"], run["hyper"], run["count"] = None, None, 0
            if run["updates_left"] is not None:
                run["updates_left"] -= 1
                if run["updates_left"] <= 0:
                    return False
        return True

    def flush(pending):
        """Processes drained points in order; False once max_updates is hit."""
        if len(pending) == 1 or chunk_size == 1:
            for args in pending:
                if not per_point(*args):
                    return False
            return True
        return _run_chunk(objective, engine, pending, state, eta, run)

    def limit():
        """Points to gather: never more than the remaining updates can use if every point
        is finite, so exactly the points (and batches) of the per-point path are drawn."""
        if run["updates_left"] is None:
            return chunk_size
        return min(chunk_size, run["updates_left"] * eta - run["count"])

    pending, signature, stopped = [], None, False
    for entry in objective.buffer.drain(rng):
        args = (entry,) + draw(entry)
        sig = _signature(*args) if chunk_size > 1 else None
        if pending and sig != signature:  # batch shapes change: a call per shape run
            stopped = not flush(pending)
            pending = []
            if stopped:
                break
        pending.append(args)
        signature = sig
        if len(pending) >= limit():
            stopped = not flush(pending)
            pending = []
            if stopped:
                break
    if pending and not stopped:
        flush(pending)
    if run["count"] and (run["updates_left"] is None or run["updates_left"] > 0):
        apply()
    objective.buffer.clear()
    return run["logs"]


def _signature(entry, x, y, meta_batch, point_state):
    """Shapes and dtypes of everything one point stacks into a chunk."""
    leaves = tf.nest.flatten((entry["theta"], entry.get("velocity"), x, y, meta_batch,
                              point_state))
    return tuple((tuple(np.shape(t)), str(getattr(t, "dtype", type(t).__name__)))
                 for t in leaves)


def _stack(values):
    return np.stack([np.asarray(v) for v in values])


def _run_chunk(objective, engine, pending, state, eta, run):
    """The points of `pending` (equal shapes, drain order) through one compiled call of
    `_chunk_function`; updates `run` (accumulator, count, logs, updates left) and
    ``engine.nan_points`` exactly as the per-point path does. Returns False once
    max_updates is hit."""
    entries = [p[0] for p in pending]
    theta = tuple(_stack(t) for t in zip(*[e["theta"] for e in entries]))
    velocity = (tuple(_stack(v) for v in zip(*[e["velocity"] for e in entries]))
                if engine.use_momentum else ())
    per_point_state = any(p[4] is not state for p in pending)
    states = (tuple(_stack(s) for s in zip(*[p[4] for p in pending])) if per_point_state
              else tuple(state))
    x = tf.nest.map_structure(lambda *t: _stack(t), *[p[1] for p in pending])
    y = tf.nest.map_structure(lambda *t: _stack(t), *[p[2] for p in pending])
    meta_batch = tf.nest.map_structure(lambda *t: _stack(t), *[p[3] for p in pending])
    phi = objective.phi_packer.pack(engine.phi())
    if run["acc"] is None:
        acc = tuple(tf.zeros_like(p) for p in phi)
        hyper = tf.zeros([len(objective.hyper_vars)], engine.inner_lr.dtype)
    else:
        acc, hyper = tuple(run["acc"]), run["hyper"]
    left = -1 if run["updates_left"] is None else run["updates_left"]
    fn = _chunk_function(objective, engine, per_point_state)
    metas, finite, acc, hyper, count, updates = fn(
        theta, velocity, states, x, y, meta_batch, acc, hyper,
        tf.constant(run["count"], tf.int64), tf.constant(eta, tf.int64),
        tf.constant(left, tf.int64))
    metas, finite = metas.numpy(), finite.numpy()
    count, updates = int(count.numpy()), int(updates.numpy())
    for m, ok in zip(metas, finite):
        if ok:
            run["logs"]["meta_loss"].append(float(m))
        else:
            engine.nan_points += 1  # a point, not a task
    run["logs"]["warp_updates"] += updates
    run["count"] = count
    run["acc"], run["hyper"] = (tuple(acc), hyper) if count else (None, None)
    if run["updates_left"] is not None:
        run["updates_left"] -= updates
        if run["updates_left"] <= 0:
            return False
    return True


def _chunk_function(objective, engine, per_point_state):
    """The compiled chunk loop of `objective` (one `tf.function` per state layout, traced
    with an unknown chunk length so that chunks of any size share one trace).

    Called as ``fn(theta, velocity, state, x, y, meta_batch, acc, hyper, count, eta,
    updates_left)`` with every point input stacked along a leading chunk axis (``state``
    only when `per_point_state`), the running accumulator ``acc`` (packed φ shapes) and
    ``hyper`` ([number of learned hyper-parameters]), the number ``count`` of points in
    it, η and the number of updates still allowed (-1: no limit); returns the per-point
    meta losses (float64) and finite flags of the points processed ([≤ chunk]), the new accumulator, hyper accumulator and
    count, and the number of updates made."""
    cache = objective.__dict__.setdefault("_chunk_functions", {})
    key = (per_point_state, objective.reduction)
    if key in cache:
        return cache[key]
    warp_point, apply_warp, apply_hyper = objective._chunk_parts
    learned = bool(objective.hyper_vars)
    mean = objective.reduction == "mean"
    on_trace = engine._traced("warp_chunk")

    def chunk(theta, velocity, state, x, y, meta_batch, acc, hyper, count, eta, left):
        on_trace()
        n = tf.shape(theta[0])[0]
        take = lambda s, i: tf.nest.map_structure(lambda t: t[i], s)  # noqa: E731
        # float64 holds float16/32/64 losses exactly; unwritten entries read as 0 / False
        metas = tf.TensorArray(tf.float64, size=n, element_shape=[])
        flags = tf.TensorArray(tf.bool, size=n, element_shape=[])
        acc_zero = tuple(tf.zeros_like(a) for a in acc)
        hyper_zero = tf.zeros_like(hyper)

        def scaled(values, c):
            if not mean:
                return values
            # the host's 1.0 / count (a double), rounded once to the values' dtype
            s = 1.0 / tf.cast(c, tf.float64)
            return tf.nest.map_structure(lambda v: v * tf.cast(s, v.dtype), values)

        def body(i, acc, hyper, count, updates, metas, flags):
            point_state = take(state, i) if per_point_state else state
            meta, g_phi, g_hyper, ok = warp_point(take(theta, i), take(velocity, i),
                                                  point_state, take(x, i), take(y, i),
                                                  take(meta_batch, i))
            metas = metas.write(i, tf.cast(meta, metas.dtype))
            flags = flags.write(i, ok)

            def add():
                new_acc = tuple(a + g for a, g in zip(acc, g_phi))
                new_hyper = hyper + tf.cast(g_hyper, hyper.dtype)
                new_count = count + 1

                def update():
                    apply_warp(scaled(new_acc, new_count))
                    if learned:
                        apply_hyper(scaled(new_hyper, new_count))
                    return acc_zero, hyper_zero, tf.zeros_like(count), updates + 1

                return tf.cond(tf.equal(new_count, eta), update,
                               lambda: (new_acc, new_hyper, new_count, updates))

            acc, hyper, count, updates = tf.cond(
                ok, add, lambda: (acc, hyper, count, updates))
            return i + 1, acc, hyper, count, updates, metas, flags

        def cond(i, acc, hyper, count, updates, metas, flags):
            return tf.logical_and(i < n, tf.logical_or(left < 0, updates < left))

        done, acc, hyper, count, updates, metas, flags = tf.while_loop(
            cond, body, (tf.constant(0), tuple(acc), hyper, count,
                         tf.zeros([], tf.int64), metas, flags),
            parallel_iterations=1)
        return metas.stack()[:done], flags.stack()[:done], acc, hyper, count, updates

    fn = tf.function(chunk, jit_compile=engine.jit_compile, reduce_retracing=True)
    compiled = {}

    def call(*args):
        args = tf.nest.map_structure(tf.convert_to_tensor, args)
        stacked = [True] * 6 + [False] * 5  # leading chunk axis on the point inputs
        stacked[2] = per_point_state
        specs = tuple(tf.nest.map_structure(
            lambda t, s=s: tf.TensorSpec([None] + t.shape[1:] if s else t.shape, t.dtype),
            a) for a, s in zip(args, stacked))
        sig = tuple(tf.nest.flatten(specs))
        if sig not in compiled:
            compiled[sig] = fn.get_concrete_function(*specs)
        return compiled[sig](*args)

    cache[key] = call
    return call
