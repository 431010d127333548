"""Offline warp updates from the replay buffer (WarpGrad Algorithm 2, lines 12–23)."""

import numpy as np


def offline_updates(objective, engine, tasks, rng):
    """Warp updates of `objective` (a `WarpObjective` in ``"offline"`` mode) from its
    replay buffer, each on the gradients of (up to) η points combined by its reduction.

    Every stored point's gradient is ∇φ of Eq. 3 through one inner step from it on a fresh
    training batch, with a fresh meta batch (random draws derived from
    ``(seed, meta step, task, 2, k)``).

    Returns:
        ``{"warp_updates": int, "meta_loss": [float per point used]}``; the buffer is
        emptied.
    """
    eta = objective.interval or 1
    batch_iters = {}
    logs = {"warp_updates": 0, "meta_loss": []}
    acc, hyper, count = None, None, 0
    updates_left = objective.max_updates
    state = engine.start_values()[2]
    # η = 1: gradient and update in one compiled call (same values as the general path)
    fused = eta == 1 and getattr(objective, "warp_point_update", None) is not None
    step = int(engine.step.numpy())

    def apply():
        scale = objective.scale(count)
        objective._apply_warp(tuple(a * scale for a in acc))
        if objective.hyper_vars:
            objective._apply_hyper(hyper * scale)
        logs["warp_updates"] += 1

    for entry in objective.buffer.drain(rng):
        tid = entry["task_id"]
        if tid not in batch_iters:
            r1, r2 = engine.task_rngs(np.random.default_rng([engine.seed, step, 7919, tid]))
            batch_iters[tid] = engine.checked_streams(tasks[tid], tasks[tid].streams(r1, r2))
        train_it, meta_it = batch_iters[tid]
        x, y = next(train_it)
        meta_batch = next(meta_it)
        velocity = tuple(entry["velocity"]) if engine.has_rule_state else ()
        point_state = engine.reseed(state, step, tid, 2, entry["step"])
        args = (tuple(entry["theta"]), velocity, point_state, x, y, meta_batch)
        if fused:  # the update is applied inside the call when the gradient is finite
            meta, ok = objective.warp_point_update(*args)
        else:
            meta, g_phi, g_hyper, ok = objective.warp_point(*args)
        if not bool(ok):
            engine.nan_points += 1  # a point, not a task
            continue
        logs["meta_loss"].append(float(meta))
        if fused:
            logs["warp_updates"] += 1
        else:
            acc = g_phi if acc is None else tuple(a + g for a, g in zip(acc, g_phi))
            hyper = g_hyper if hyper is None else hyper + g_hyper
            count += 1
            if count < eta:
                continue
            apply()
            acc, hyper, count = None, None, 0
        if updates_left is not None:
            updates_left -= 1
            if updates_left <= 0:
                break
    if count and (updates_left is None or updates_left > 0):
        apply()
    objective.buffer.clear()
    return logs
