"""Cost of one offline warp update relative to one inner step.

Offline Warp-Leap (WarpGrad Algorithm 2) replays stored task parameterisations θ and,
for each, makes one warp update: an inner step at θ and the gradient in φ of the meta loss
at the stepped point (Eq. 3), exact (second order through the inner gradient) or
approximate (inner gradient stopped). This script times, interleaved in one process
(round-robin samples, medians), on the Warp-Leap Omniglot model, batch 20:

* ``inner_step``: ``MetaTrainer._inner_step`` (the unit);
* ``warp_step_{approx,exact}``: ``MetaTrainer._warp_step`` at a stored θ (the compiled
  function alone);
* ``warp_update_{approx,exact}``: one update as the offline loop makes it, with
  ``meta_interval=1``: numpy θ from the buffer to tensors, a task batch and a meta batch
  drawn from a `warpkeras.Task`, ``_warp_step``, the finite check, ``_apply_warp`` of the
  gradient (the Python loop body of ``MetaTrainer._offline_updates``);

and profiles the exact warp step (kernel time per op type vs the rest).

Targets: approximate update ≤ 2.2x an inner step, exact ≤ 4x.

Usage::

    python bench/warp_update.py            # ~2-3 minutes
    python bench/warp_update.py --quick    # ~40 seconds

Prints one JSON object and writes it to ``bench/results/warp_update.json``.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.setup()


def main():
    p = C.parser(__doc__, "warp_update")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)")
    p.add_argument("--calls", type=int, default=None, help="calls per sample (default 6, quick 3)")
    p.add_argument("--bn", choices=("exact", "keras"), default="exact",
                   help="batch-norm layer (default: warpkeras ExactBatchNormalization)")
    p.add_argument("--jit", action="store_true", help="also time jit_compile=True trainers")
    p.add_argument("--no-profile", action="store_true", help="skip the tf.profiler breakdown")
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    calls = args.calls or (3 if args.quick else 6)
    started = time.time()

    import keras
    import numpy as np
    import tensorflow as tf

    import warpkeras

    info = C.machine_info()
    task = C.synthetic_tasks(1, seed=args.seed)[0]
    rng = np.random.default_rng(args.seed)

    def trainer(objective, jit=False):
        model = C.omniglot_model(warp=True, bn=args.bn, seed=args.seed)
        return warpkeras.WarpTrainer(
            model, C.loss_fn(), mode="offline", objective=objective, init_objective="leap",
            inner_learning_rate=0.1, inner_steps=100, meta_interval=1,
            meta_optimizer=keras.optimizers.SGD(1e-3), jit_compile=jit, seed=args.seed)

    trainers = {"approx": trainer("approx"), "exact": trainer("exact")}
    if args.jit:
        trainers["approx_xla"] = trainer("approx", True)
        trainers["exact_xla"] = trainer("exact", True)

    # a stored point: θ after a few inner steps, as numpy (what the replay buffer holds)
    base = trainers["exact"]
    theta, vel, state = base._start_values()
    batches = task.batches("train", rng)
    for _ in range(3):
        bx, by = next(batches)
        theta, vel, state = base._inner_step(theta, vel, state, bx, by)[:3]
    stored = [t.numpy() for t in theta]
    x, y = next(batches)
    meta_batch = next(task.batches("meta", rng))

    def warp_update(tr, train_it, meta_it):
        """The body of MetaTrainer._offline_updates for one entry with meta_interval=1."""
        bx, by = next(train_it)
        mb = next(meta_it)
        th = [tf.convert_to_tensor(t) for t in stored]
        out = tr._warp_step(th, [], state, bx, by, mb)
        meta, g_phi, ok = out[6], out[7], out[10]
        if bool(ok):
            float(meta)
            tr._apply_warp([g / 1.0 for g in g_phi])
        return out[3]

    variants = {"inner_step": lambda: base._inner_step(theta, vel, state, x, y)}
    for name, tr in trainers.items():
        variants[f"warp_step_{name}"] = (
            lambda tr=tr: tr._warp_step(theta, vel, state, x, y, meta_batch))
        its = (task.batches("train", np.random.default_rng(1)),
               task.batches("meta", np.random.default_rng(2)))
        variants[f"warp_update_{name}"] = lambda tr=tr, its=its: warp_update(tr, *its)
    if args.jit:
        trj = trainers["exact_xla"]
        variants["inner_step_xla"] = lambda: trj._inner_step(theta, vel, state, x, y)

    timings = C.interleave(variants, rounds, calls, warmup=3, sync=C.sync_numpy)
    t = lambda k: timings[k]["median_s"]  # noqa: E731
    ratios = {f"{k}_over_inner_step": C.ratio(t(k), t("inner_step"))
              for k in timings if k != "inner_step"}
    if args.jit:
        ratios = {k: v for k, v in ratios.items() if "xla" not in k}
        for k in ("warp_step_approx_xla", "warp_step_exact_xla"):
            ratios[f"{k}_over_inner_step_xla"] = C.ratio(t(k), t("inner_step_xla"))
            ratios[f"{k}_over_inner_step"] = C.ratio(t(k), t("inner_step"))

    flops = C.conv_flops(warp=True)
    # approx: inner step (3F) + meta forward (F) + meta backward to φ (input grads through
    # the net, filter grads of the warp layers only) ~ 2F  => ~6F, i.e. ~2x an inner step;
    # exact adds the backward through the inner backward pass (~ another 2 x 2F) => ~10F.
    model_costs = {"inner_step_in_forwards": 3, "approx_in_forwards_estimate": 6,
                   "exact_in_forwards_estimate": 10,
                   "note": "F = one forward pass (" + str(flops["forward"]) + " FLOPs); "
                           "a backward pass ~2F; double backward through the inner "
                           "gradient ~4F more"}

    profile = None
    if not args.no_profile:
        profile = {}
        for name in ("exact", "approx"):
            tr = trainers[name]
            profile[f"warp_step_{name}"] = C.profile_ops(
                lambda tr=tr: tr._warp_step(theta, vel, state, x, y, meta_batch),
                4 if args.quick else 8, "/tmp/warpkeras_bench_profile", sync=C.sync_numpy)

    targets = {
        "approx_update_le_2.2x_inner_step": {
            "value": ratios["warp_update_approx_over_inner_step"],
            "met": ratios["warp_update_approx_over_inner_step"] <= 2.2},
        "exact_update_le_4x_inner_step": {
            "value": ratios["warp_update_exact_over_inner_step"],
            "met": ratios["warp_update_exact_over_inner_step"] <= 4.0},
    }
    result = {
        "benchmark": "warp_update",
        "quick": args.quick,
        "machine": info,
        "config": {"model": "omniglot Warp-Leap (WarpConv2D(3) after each of 4 blocks)",
                   "batch_norm": args.bn, "batch": C.TASK_BATCH, "meta_interval": 1,
                   "rounds": rounds, "calls_per_sample": calls,
                   "statistic": "median over interleaved rounds of the mean time per call"},
        "ms": {k: round(v["median_s"] * 1e3, 2) for k, v in timings.items()},
        "ratios": ratios,
        "cost_model": model_costs,
        "targets": targets,
        "profile": profile,
        "samples": {k: v["samples_s"] for k, v in timings.items()},
    }
    C.finish("warp_update", result, args.out, started)


if __name__ == "__main__":
    main()
