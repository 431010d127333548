"""Cost of one offline warp update relative to one inner step.

Offline Warp-Leap (WarpGrad Algorithm 2) replays stored task parameterisations θ and,
for each, makes one warp update: an inner step at θ and the gradient in φ of the meta loss
at the stepped point (Eq. 3), exact (second order through the inner gradient) or
approximate (inner gradient stopped). This script times, interleaved in one process
(round-robin samples, medians), on the Warp-Leap Omniglot model, batch 20:

* ``inner_step``: one inner step with φ frozen (``MetaTrainer._plain_step``; the unit);
  ``meta_inner_step_leap``: one adaptation step of Warp-Leap meta-training
  (``_group_step``, Leap increment included);
* ``warp_step_{approx,exact}``: the compiled warp gradient at a stored θ
  (``MetaTrainer._warp_point``) alone;
* ``warp_update_{approx,exact}``: updates made by the trainer's own offline loop
  (``MetaTrainer._offline_updates`` with ``meta_interval=1`` over a buffer of stored
  points: draining the buffer, numpy θ to tensors, a task batch and a meta batch drawn from
  a `warpkeras.Task`, the warp gradient, the finite check and the update, in one compiled
  call per point since η = 1), per update; with ``--compare-unfused`` also
  ``warp_update_{approx,exact}_unfused``: the same loop with the gradient and the update
  as two calls (the general path for η > 1), and their ratio;

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
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)"
    )
    p.add_argument("--calls", type=int, default=None, help="calls per sample (default 6, quick 3)")
    p.add_argument(
        "--bn",
        choices=("exact", "keras"),
        default="exact",
        help="batch-norm layer (default: warpkeras ExactBatchNormalization)",
    )
    p.add_argument("--jit", action="store_true", help="also time jit_compile=True trainers")
    p.add_argument("--no-profile", action="store_true", help="skip the tf.profiler breakdown")
    p.add_argument(
        "--compare-unfused",
        action="store_true",
        help="also time the offline loop with the gradient and the update as two "
        "compiled calls (the η > 1 path) against the one-call path of η = 1",
    )
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    calls = args.calls or (3 if args.quick else 6)
    started = time.time()

    import keras
    import numpy as np

    import warpkeras

    info = C.machine_info(args.wait_idle)
    task = C.synthetic_tasks(1, seed=args.seed)[0]
    rng = np.random.default_rng(args.seed)

    def trainer(objective, jit=False):
        model = C.omniglot_model(warp=True, bn=args.bn, seed=args.seed)
        return warpkeras.WarpTrainer(
            model,
            C.loss_fn(),
            mode="offline",
            objective=objective,
            init_objective="leap",
            inner_learning_rate=0.1,
            inner_steps=100,
            meta_interval=1,
            meta_optimizer=keras.optimizers.SGD(1e-3),
            jit_compile=jit,
            seed=args.seed,
        )

    trainers = {"approx": trainer("approx"), "exact": trainer("exact")}
    if args.compare_unfused:
        for name in ("approx", "exact"):
            trainers[f"{name}_unfused"] = tr = trainer(name)
            tr._warp.warp_point_update = None  # gradient, then `_apply_warp`: two calls
    if args.jit:
        trainers["approx_xla"] = trainer("approx", True)
        trainers["exact_xla"] = trainer("exact", True)

    # a stored point: θ after a few inner steps from θ0 (what the replay buffer holds)
    batches = task.batches("train", rng)
    x, y = next(batches)
    meta_batch = next(task.batches("meta", rng))
    engines = {name: C.Engine(tr, x, y, meta_batch) for name, tr in trainers.items()}
    base = engines["exact"]
    theta, vel, state = base.advanced_theta(batches, 3)
    stored_theta = [np.asarray(t) for t in theta]
    stored_vel = [np.asarray(v) for v in vel] if base.trainer.use_momentum else None
    for e in engines.values():  # time the warp gradient at the stored point, not at θ0
        tr = e.trainer
        e.warp_point = lambda tr=tr: tr._warp_point(theta, vel, state, x, y, meta_batch)
    notes = {"engine_functions": base.names}

    per_call = 4 if args.quick else 6

    def offline_updates(tr, counter):
        """`per_call` updates of the trainer's own offline loop (meta_interval=1) over a
        buffer holding the stored point; returns after the last update is applied."""
        tr.buffer.clear()
        for i in range(per_call):
            tr.buffer.add(0, i, stored_theta, stored_vel)
        counter[0] += 1
        tr.step.assign(counter[0])
        logs = tr._offline_updates([task], np.random.default_rng(counter[0]))
        assert logs["warp_updates"] == per_call, logs
        return tr.partition.warp_variables[0].value

    variants = {"inner_step": base.inner}
    if base.meta_inner is not None:
        variants["meta_inner_step_leap"] = base.meta_inner
    for name, e in engines.items():
        if not name.endswith("_unfused"):  # the same compiled gradient as its fused twin
            variants[f"warp_step_{name}"] = e.warp_point
        counter = [0]
        variants[f"warp_update_{name}"] = lambda tr=e.trainer, c=counter: offline_updates(tr, c)
    if args.jit:
        variants["inner_step_xla"] = engines["exact_xla"].inner

    timings = C.interleave(variants, rounds, calls, warmup=3, sync=C.sync_numpy)
    for k in timings:  # one warp_update call makes `per_call` updates
        if k.startswith("warp_update_"):
            for field in ("median_s", "min_s"):
                timings[k][field] /= per_call
            timings[k]["samples_s"] = [round(v / per_call, 6) for v in timings[k]["samples_s"]]
    t = lambda k: timings[k]["median_s"]  # noqa: E731
    ratios = {
        f"{k}_over_inner_step": C.ratio(t(k), t("inner_step")) for k in timings if k != "inner_step"
    }
    if "meta_inner_step_leap" in timings:
        for k in ("warp_update_approx", "warp_update_exact"):
            ratios[f"{k}_over_meta_inner_step_leap"] = C.ratio(t(k), t("meta_inner_step_leap"))
    if args.compare_unfused:
        ratios = {k: v for k, v in ratios.items() if "unfused" not in k}
        for name in ("approx", "exact"):
            ratios[f"warp_update_{name}_over_unfused"] = C.ratio(
                t(f"warp_update_{name}"), t(f"warp_update_{name}_unfused")
            )
    if args.jit:
        ratios = {k: v for k, v in ratios.items() if "xla" not in k}
        for k in ("warp_step_approx_xla", "warp_step_exact_xla"):
            ratios[f"{k}_over_inner_step_xla"] = C.ratio(t(k), t("inner_step_xla"))
            ratios[f"{k}_over_inner_step"] = C.ratio(t(k), t("inner_step"))

    ratios_min = C.min_ratios(
        timings, {f"{k}_over_inner_step": (k, "inner_step") for k in timings if k != "inner_step"}
    )
    flops = C.conv_flops(warp=True)
    # approx: inner step (3F) + meta forward (F) + meta backward to φ (input grads through
    # the net, filter grads of the warp layers only) ~ 2F  => ~6F, i.e. ~2x an inner step;
    # exact adds the backward through the inner backward pass (~ another 2 x 2F) => ~10F.
    model_costs = {
        "inner_step_in_forwards": 3,
        "approx_in_forwards_estimate": 6,
        "exact_in_forwards_estimate": 10,
        "note": "F = one forward pass (" + str(flops["forward"]) + " FLOPs); "
        "a backward pass ~2F; double backward through the inner "
        "gradient ~4F more",
    }

    profile = None
    if not args.no_profile:
        profile = {}
        for name in ("exact", "approx"):
            profile[f"warp_step_{name}"] = C.profile_ops(
                engines[name].warp_point,
                4 if args.quick else 8,
                "/tmp/warpkeras_bench_profile",
                sync=C.sync_numpy,
            )

    targets = {
        "approx_update_le_2.2x_inner_step": {
            "value": ratios["warp_update_approx_over_inner_step"],
            "met": ratios["warp_update_approx_over_inner_step"] <= 2.2,
        },
        "exact_update_le_4x_inner_step": {
            "value": ratios["warp_update_exact_over_inner_step"],
            "met": ratios["warp_update_exact_over_inner_step"] <= 4.0,
        },
    }
    result = {
        "benchmark": "warp_update",
        "quick": args.quick,
        "machine": info,
        "config": {
            "model": "omniglot Warp-Leap (WarpConv2D(3) after each of 4 blocks)",
            "batch_norm": args.bn,
            "batch": C.TASK_BATCH,
            "meta_interval": 1,
            "rounds": rounds,
            "calls_per_sample": calls,
            "updates_per_warp_update_call": per_call,
            "statistic": "median over interleaved rounds of the mean time per call",
        },
        "ms": {k: round(v["median_s"] * 1e3, 2) for k, v in timings.items()},
        "ratios": ratios,
        "ratios_from_fastest_samples": ratios_min,
        "cost_model": model_costs,
        "targets": targets,
        "profile": profile,
        "notes": notes,
        "samples": {k: v["samples_s"] for k, v in timings.items()},
    }
    C.finish("warp_update", result, args.out, started)


if __name__ == "__main__":
    main()
