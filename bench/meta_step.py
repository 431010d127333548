"""Meta-step wall time of Leap and Warp-Leap on the papers' Omniglot network.

One meta step = a meta-batch of tasks, each adapted for K=100 inner steps (task batch 20),
plus the meta-updates:

* ``leap``: `LeapTrainer` on the plain model (no warp layers): K steps per task, the
  pull-forward gradient accumulated along the way, one θ0 update;
* ``warp_leap_offline``: `WarpTrainer(mode="offline", init_objective="leap")` with
  ``meta_interval=1``: the adaptations fill the replay buffer, then one warp update per
  stored point (K × meta-batch updates; ``--max-warp-updates`` caps them), and a θ0 update;
* ``warp_leap_online``: `WarpTrainer(mode="online", init_objective="leap")`: a fused
  inner step + warp gradient at every inner step, one φ and one θ0 update.

Tasks are synthetic random 28x28 images with 20 classes (300 training images per task;
no download). Each meta step is timed after a warm-up meta step (which traces and
compiles everything). Just before and after each timed meta step, the script times the
trainer's inner step and warp step (interleaved, medians), so each meta step is also given
in units of the inner step measured at the same time: that ratio is what survives other
jobs loading the machine. ``--profile`` runs one extra meta step under cProfile and splits
its time into the compiled calls and the Python around them.

When the installed trainer takes ``parallel=`` (auto / sequential / unrolled / vectorized
meta-batches), the modes given by ``--parallel`` are timed side by side (default: auto,
the trainers' default).

Reference (the authors' PyTorch code on a 2-core AMD EPYC, 2 threads, meta-batch 5, K=100,
batch 20, with BN): Warp-Leap offline 18.6 s (inner step ~12 ms, warp update ~24 ms),
Leap 6.0 s. Targets: Warp-Leap ≤ 9 s (stretch ≤ 6 s), Leap ≤ 4 s.

Usage::

    python bench/meta_step.py                    # meta-batch 5, all three; ~5 minutes
    python bench/meta_step.py --meta-batch 5 20  # also meta-batch 20 (~20 minutes)
    python bench/meta_step.py --quick            # K=10, meta-batch 5, extrapolated; ~1 minute
    python bench/meta_step.py --max-warp-updates 100 --meta-batch 20
    python bench/meta_step.py --quick --precision both   # float32 and bfloat16 runs

``--precision bfloat16`` builds the models under Keras's ``mixed_bfloat16`` policy
(`warpkeras.precision.compute_policy`: float32 with a warning where the hardware has no
bfloat16); ``--precision both`` builds each configuration in both, times their meta steps
alternately (``--repeats`` of each) and reports the bf16 / fp32 ratios
(``precision_ratios``).

Prints one JSON object and writes it to ``bench/results/meta_step.json``.
"""

import cProfile
import inspect
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.setup()

REFERENCE = {
    "warp_leap_offline_s": 18.6,
    "leap_s": 6.0,
    "inner_step_ms": 12.0,
    "warp_update_ms": 24.0,
    "meta_batch": 5,
    "inner_steps": 100,
}
TARGETS = {"warp_leap_offline_s": 9.0, "warp_leap_offline_stretch_s": 6.0, "leap_s": 4.0}
CONFIGS = ("leap", "warp_leap_offline", "warp_leap_online")


def reference_ratios(path, leap, off, at_k100):
    """warpkeras / reference ratios against reference timings taken on this machine.

    The reference meta step also evaluates every task on its held-out images; that time
    (``heldout_eval_s_per_meta_step``) is subtracted when given, since warpkeras' `fit`
    does not evaluate.
    """
    if not path:
        return None
    with open(path) as f:
        ref = json.load(f)
    out = {
        "source": os.path.abspath(path),
        "torch": ref.get("torch_version"),
        "threads": ref.get("torch_num_threads"),
    }

    def ref_step(name):
        r = ref.get(name) or {}
        total = r.get("meta_step_s_mean")
        if total is None:
            return None, r
        return total - (r.get("heldout_eval_s_per_meta_step") or 0.0), r

    leap_ref, leap_r = ref_step("leap")
    warp_ref, warp_r = ref_step("warp_leap")
    if leap and leap_ref:
        out["leap_meta_step_s"] = {
            "warpkeras": at_k100(leap),
            "reference": round(leap_ref, 3),
            "ratio": C.ratio(at_k100(leap), leap_ref),
        }
        if leap_r.get("inner_step_ms"):
            out["leap_inner_step_ms"] = {
                "warpkeras": leap["inner_step_ms_same_time"],
                "reference": leap_r["inner_step_ms"],
                "ratio": C.ratio(leap["inner_step_ms_same_time"], leap_r["inner_step_ms"]),
            }
    if off and warp_ref:
        out["warp_leap_offline_meta_step_s"] = {
            "warpkeras": at_k100(off),
            "reference": round(warp_ref, 3),
            "ratio": C.ratio(at_k100(off), warp_ref),
            "warpkeras_objective": off["objective"],
        }
        if warp_r.get("inner_step_ms"):
            out["warp_leap_inner_step_ms"] = {
                "warpkeras": off["inner_step_ms_same_time"],
                "reference": warp_r["inner_step_ms"],
                "ratio": C.ratio(off["inner_step_ms_same_time"], warp_r["inner_step_ms"]),
            }
        if warp_r.get("warp_update_ms") and off.get("warp_step_ms_same_time"):
            out["warp_update_ms"] = {
                "warpkeras": off["warp_step_ms_same_time"],
                "reference": warp_r["warp_update_ms"],
                "ratio": C.ratio(off["warp_step_ms_same_time"], warp_r["warp_update_ms"]),
            }
    return out


def supports_parallel():
    import warpkeras

    return "parallel" in inspect.signature(warpkeras.MetaTrainer.__init__).parameters


def build(
    config, meta_batch, inner_steps, objective, max_warp_updates, parallel, seed, policy=None
):
    import keras

    import warpkeras
    from warpkeras import precision

    if policy is not None:
        with precision.policy_scope(policy):
            return build(
                config, meta_batch, inner_steps, objective, max_warp_updates, parallel, seed
            )

    extra = {"parallel": parallel} if parallel is not None else {}
    common = dict(
        inner_learning_rate=0.1,
        inner_steps=inner_steps,
        meta_batch_size=meta_batch,
        meta_optimizer=keras.optimizers.SGD(0.01),
        seed=seed,
        **extra,
    )
    if config == "leap":
        model = C.omniglot_model(warp=False, seed=seed)
        return warpkeras.LeapTrainer(model, C.loss_fn(), **common)
    model = C.omniglot_model(warp=True, seed=seed)
    mode = "offline" if config == "warp_leap_offline" else "online"
    kw = {"meta_interval": 1, "max_warp_updates": max_warp_updates} if mode == "offline" else {}
    return warpkeras.WarpTrainer(
        model, C.loss_fn(), mode=mode, objective=objective, init_objective="leap", **common, **kw
    )


def meta_step(trainer, source, step):
    import numpy as np

    rng = np.random.default_rng([trainer.seed, step])
    tasks = source.sample(rng, trainer.meta_batch_size)
    start = time.perf_counter()
    logs = trainer.train_step(tasks, rng)
    seconds = time.perf_counter() - start
    trainer.step.assign(step + 1)
    return seconds, logs


def interleaved_meta_steps(args, config, mb, K, mode, policies, source, rounds, calls):
    """Builds and warms up one trainer of this configuration per precision of `policies`,
    then times their meta steps alternately (so that a change of load hits all alike).

    Returns:
        ``{precision: (trainer, warm-up seconds, unit costs before, meta-step seconds,
        logs of the last meta step, unit costs after, meta-step CPU seconds)}``: CPU time of
        the process, all threads, which moves far less than wall time with other jobs' load.
    """
    out = {}
    for prec, policy in policies.items():
        trainer = build(
            config, mb, K, args.objective, args.max_warp_updates, mode, args.seed, policy=policy
        )
        # warm-up: one short meta step traces every function of this configuration
        trainer.inner_steps = 2
        t0 = time.perf_counter()
        meta_step(trainer, source, 0)
        warmup_s = time.perf_counter() - t0
        trainer.inner_steps = K
        out[prec] = [trainer, warmup_s, None, [], None, None, []]
    for entry in out.values():
        entry[2] = unit_costs(entry[0], rounds, calls)
    for r in range(args.repeats):
        for entry in out.values():
            cpu = time.process_time()
            seconds, entry[4] = meta_step(entry[0], source, 1 + r)
            entry[6].append(time.process_time() - cpu)
            entry[3].append(seconds)
    for entry in out.values():
        entry[5] = unit_costs(entry[0], rounds, calls)
    return {prec: tuple(entry) for prec, entry in out.items()}


def unit_costs(trainer, rounds, calls):
    """Median time of the trainer's compiled adaptation step (for online Warp-Leap that
    step includes the warp gradient) and of its warp gradient at a stored point."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((C.TASK_BATCH,) + C.IMAGE_SHAPE, dtype=np.float32)
    y = rng.integers(0, C.NUM_CLASSES, C.TASK_BATCH).astype(np.int32)
    e = C.Engine(trainer, x, y)
    # the unit: one adaptation step as this trainer's meta-training runs it
    variants = {"inner_step": e.meta_inner if e.meta_inner is not None else e.inner}
    if e.warp_point is not None:
        variants["warp_step"] = e.warp_point
    res = C.interleave(variants, rounds, calls, warmup=1, sync=C.sync_numpy)
    return {k: v["median_s"] for k, v in res.items()}


def python_profile(trainer, source, step, top=25):
    """One meta step under cProfile: where the host time goes, and how many compiled-function
    executions, eager ops and device-to-host reads the loop issues per inner step."""
    prof = cProfile.Profile()
    prof.enable()
    seconds, _ = meta_step(trainer, source, step)
    prof.disable()
    stats = pstats.Stats(prof)
    rows, raw = [], {}
    for (filename, line, func), (_, nc, tt, ct, _) in stats.stats.items():
        name = f"{os.path.basename(filename)}:{line}:{func}"
        raw[name] = (nc, tt, ct)
        rows.append(
            {"function": name, "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)}
        )

    def total(pred, field):
        idx = {"calls": 0, "tottime": 1, "cumtime": 2}[field]
        return sum(v[idx] for k, v in raw.items() if pred(k))

    executes = lambda k: k.endswith("TFE_Py_Execute>")  # noqa: E731  (compiled functions)
    eager = lambda k: k.endswith("TFE_Py_FastPathExecute>")  # noqa: E731  (eager ops)
    reads = lambda k: k.split(":")[-1] in ("_numpy", "numpy") and "tensor" in k  # noqa: E731
    n_inner = trainer.meta_batch_size * trainer.inner_steps
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
    in_functions = total(executes, "tottime")
    return {
        "meta_step_s_under_cprofile": round(seconds, 3),
        "in_compiled_functions_s": round(in_functions, 3),
        "in_eager_ops_s": round(total(eager, "tottime"), 3),
        "rest_python_s": round(seconds - in_functions - total(eager, "tottime"), 3),
        "per_inner_step": {
            "compiled_function_executions": round(total(executes, "calls") / n_inner, 2),
            "eager_ops": round(total(eager, "calls") / n_inner, 2),
            "tensor_to_numpy_reads": round(total(reads, "calls") / n_inner, 2),
        },
        "top_by_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:top],
        "cumulative_text": text.getvalue().splitlines()[:70],
    }


def main():
    p = C.parser(__doc__, "meta_step")
    p.add_argument(
        "--meta-batch",
        type=int,
        nargs="+",
        default=None,
        help="meta-batch sizes (default 5; quick 5)",
    )
    p.add_argument("--inner-steps", type=int, default=None, help="K (default 100, quick 10)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument(
        "--objective",
        choices=("exact", "approx"),
        default="exact",
        help="warp objective of the Warp-Leap runs (default exact)",
    )
    p.add_argument(
        "--max-warp-updates",
        type=int,
        default=None,
        help="cap on offline warp updates per meta step (default: one per stored "
        "point, K x meta-batch)",
    )
    p.add_argument(
        "--parallel",
        nargs="+",
        default=None,
        choices=("auto", "sequential", "unrolled", "vectorized"),
        help="parallel modes to time when the trainer supports them (default "
        "auto, the trainers' default)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed meta steps per configuration")
    p.add_argument(
        "--reference-json",
        default=None,
        help="timings of the authors' PyTorch code measured on this machine (JSON with "
        "leap.meta_step_s_mean, warp_leap.meta_step_s_mean, and optionally "
        ".inner_step_ms / warp_leap.warp_update_ms, .heldout_eval_s_per_meta_step); "
        "adds the ratios against it as vs_reference_same_machine",
    )
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "both"),
        default="float32",
        help="layer compute precision; both: each configuration in float32 and "
        "in bfloat16, meta steps alternating",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more meta step of each configuration under cProfile",
    )
    args = p.parse_args()
    started = time.time()
    mbs = args.meta_batch or [5]
    K = args.inner_steps or (10 if args.quick else 100)
    has_parallel = supports_parallel()
    if has_parallel:
        modes = args.parallel or ["auto"]
    else:
        modes = [None]

    import numpy as np  # noqa: F401

    import warpkeras
    from warpkeras import precision as wprecision

    info = C.machine_info(args.wait_idle)
    precisions = ["float32", "bfloat16"] if args.precision == "both" else [args.precision]
    policies = {p: wprecision.compute_policy(p) for p in precisions}
    source = warpkeras.TaskSampler(C.synthetic_tasks(20, seed=args.seed))
    unit_rounds, unit_calls = (2, 3) if args.quick else (3, 5)
    runs, timed = [], {}
    for mb in mbs:
        for config in args.configs:
            for mode, prec in ((m, p) for m in modes for p in precisions):
                if mode not in (None, "sequential") and config == "warp_leap_offline" and mb == 1:
                    continue
                if (config, mb, mode) not in timed:
                    timed[config, mb, mode] = interleaved_meta_steps(
                        args, config, mb, K, mode, policies, source, unit_rounds, unit_calls
                    )
                trainer, warmup_s, before, steps, logs, after, cpu_steps = timed[
                    config, mb, mode
                ].pop(prec)
                inner_s = (before["inner_step"] + after["inner_step"]) / 2
                warp_s = (
                    (before["warp_step"] + after["warp_step"]) / 2
                    if "warp_step" in before
                    else None
                )
                s = C.median(steps)
                n_inner = mb * K
                n_warp = (
                    logs.get("warp_updates", 0)
                    if config == "warp_leap_offline"
                    else n_inner
                    if config == "warp_leap_online"
                    else 0
                )
                # what the compiled pieces alone would take, timed at the same moment
                if config == "leap":
                    components = n_inner * inner_s
                elif config == "warp_leap_offline":
                    components = n_inner * inner_s + n_warp * warp_s
                else:  # the online unit step already includes the warp gradient
                    components = n_inner * inner_s
                run = {
                    "config": config,
                    "meta_batch": mb,
                    "inner_steps": K,
                    "precision": prec,
                    "dtype_policy": policies[prec],
                    "parallel": mode,
                    "objective": args.objective if config != "leap" else None,
                    "max_warp_updates": args.max_warp_updates
                    if config == "warp_leap_offline"
                    else None,
                    "warp_updates": n_warp,
                    "meta_step_s": round(s, 3),
                    "samples_s": [round(v, 3) for v in steps],
                    "meta_step_cpu_s": round(C.median(cpu_steps), 3),
                    "cpu_samples_s": [round(v, 3) for v in cpu_steps],
                    "warmup_s": round(warmup_s, 2),
                    "unit": "this configuration's compiled adaptation step (_group_step, one "
                    "task; online: includes the warp gradient)",
                    "inner_step_ms_same_time": round(inner_s * 1e3, 2),
                    "warp_step_ms_same_time": round(warp_s * 1e3, 2) if warp_s else None,
                    "meta_step_in_inner_steps": round(s / inner_s, 1),
                    "compiled_pieces_s": round(components, 3),
                    "meta_step_over_compiled_pieces": C.ratio(s, components),
                    "load_after": C.load(),
                }
                if K != 100:
                    run["extrapolated_to_K100_s"] = round(s * 100 / K, 3)
                if args.profile:
                    trainer.step.assign(100)
                    run["python_profile"] = python_profile(trainer, source, 100)
                    # kernel time vs the rest over a whole meta step (tf.profiler)
                    run["tf_profile"] = C.profile_ops(
                        lambda t=trainer: meta_step(t, source, 101),
                        1,
                        "/tmp/warpkeras_bench_profile",
                    )
                runs.append(run)
                print(
                    f"# {config} mb={mb} parallel={mode} {prec}: {s:.2f} s "
                    f"({s / inner_s:.0f} inner steps of {inner_s * 1e3:.1f} ms)",
                    file=sys.stderr,
                    flush=True,
                )
                del trainer

    def find(config, mb=5, mode=None, prec=None):
        mode = mode if mode is not None else modes[0]  # targets: the first mode timed
        prec = prec or precisions[0]
        for r in runs:
            if (
                r["config"] == config
                and r["meta_batch"] == mb
                and r["parallel"] == mode
                and r["precision"] == prec
            ):
                return r
        return None

    def at_k100(r):
        return r.get("extrapolated_to_K100_s", r["meta_step_s"]) if r else None

    targets, vs_reference = {}, {}
    leap, off = find("leap"), find("warp_leap_offline")
    if leap:
        targets["leap_le_4s"] = {
            "value_s": at_k100(leap),
            "met": at_k100(leap) <= TARGETS["leap_s"],
        }
        vs_reference["leap_over_pytorch"] = C.ratio(at_k100(leap), REFERENCE["leap_s"])
    if off:
        full = off["max_warp_updates"] is None
        v = at_k100(off)
        targets["warp_leap_offline_le_9s"] = {
            "value_s": v,
            "met": v <= TARGETS["warp_leap_offline_s"],
            "uncapped": full,
        }
        targets["warp_leap_offline_stretch_le_6s"] = {
            "value_s": v,
            "met": v <= TARGETS["warp_leap_offline_stretch_s"],
            "uncapped": full,
        }
        vs_reference["warp_leap_offline_over_pytorch"] = C.ratio(
            v, REFERENCE["warp_leap_offline_s"]
        )
        vs_reference["inner_step_over_pytorch"] = C.ratio(
            off["inner_step_ms_same_time"], REFERENCE["inner_step_ms"]
        )
        vs_reference["warp_step_over_pytorch_update"] = C.ratio(
            off["warp_step_ms_same_time"], REFERENCE["warp_update_ms"]
        )
    same_machine = reference_ratios(args.reference_json, leap, off, at_k100)
    parallel_ratios = {}
    if has_parallel:
        for r in runs:
            if r["parallel"] not in (None, "sequential"):
                seq = find(r["config"], r["meta_batch"], "sequential", r["precision"])
                if seq:
                    parallel_ratios[
                        f"{r['config']}_mb{r['meta_batch']}_{r['parallel']}_over_sequential"
                    ] = {
                        "wall": C.ratio(r["meta_step_s"], seq["meta_step_s"]),
                        "in_inner_steps": C.ratio(
                            r["meta_step_in_inner_steps"], seq["meta_step_in_inner_steps"]
                        ),
                    }

    precision_ratios = {}
    if args.precision == "both":
        for r in runs:
            if r["precision"] == "bfloat16":
                f32 = find(r["config"], r["meta_batch"], r["parallel"], "float32")
                if f32:
                    precision_ratios[f"{r['config']}_mb{r['meta_batch']}_{r['parallel']}"] = {
                        "meta_step_bf16_over_fp32": C.ratio(r["meta_step_s"], f32["meta_step_s"]),
                        "meta_step_cpu_time_bf16_over_fp32": C.ratio(
                            r["meta_step_cpu_s"], f32["meta_step_cpu_s"]
                        ),
                        "meta_step_cpu_time_bf16_over_fp32_per_repeat": [
                            C.ratio(b, a) for a, b in zip(f32["cpu_samples_s"], r["cpu_samples_s"])
                        ],
                        "inner_step_bf16_over_fp32": C.ratio(
                            r["inner_step_ms_same_time"], f32["inner_step_ms_same_time"]
                        ),
                        "warp_step_bf16_over_fp32": C.ratio(
                            r["warp_step_ms_same_time"], f32["warp_step_ms_same_time"]
                        )
                        if r["warp_step_ms_same_time"]
                        else None,
                        "load_after": [f32["load_after"], r["load_after"]],
                    }

    # the floor: FLOPs of a meta step at the matmul rate measured now
    mm = C.matmul_rate(2.0 if args.quick else 4.0)
    f_warp = C.conv_flops(warp=True)["forward"]
    f_plain = C.conv_flops(warp=False)["forward"]
    floor = {
        "matmul_gflops_now": round(mm["gflops"], 1),
        "leap_mb5_K100_s": round(500 * 3 * f_plain / (mm["gflops"] * 1e9), 2),
        "warp_leap_offline_mb5_K100_approx_s": round(
            500 * (3 + 6) * f_warp / (mm["gflops"] * 1e9), 2
        ),
        "warp_leap_offline_mb5_K100_exact_s": round(
            500 * (3 + 10) * f_warp / (mm["gflops"] * 1e9), 2
        ),
        "note": "FLOPs (3 forwards per inner step, ~6 per approximate and ~10 per exact warp "
        "update, see warp_update.py) divided by the 2048² matmul rate: the time if "
        "every kernel ran as fast as a large matmul",
        "pytorch_reference_implied_gflops": {
            "inner_step_warp_model": round(3 * f_warp / 0.012 / 1e9, 1),
            "inner_step_plain_model": round(3 * f_plain / 0.012 / 1e9, 1),
        },
    }
    result = {
        "benchmark": "meta_step",
        "quick": args.quick,
        "machine": info,
        "config": {
            "tasks": "synthetic 28x28x1, 20 classes, 300 train images, batch 20",
            "inner_learning_rate": 0.1,
            "meta_interval": 1,
            "parallel_supported": has_parallel,
            "repeats": args.repeats,
        },
        "runs": runs,
        "reference_pytorch": REFERENCE,
        "vs_reference": vs_reference,
        "vs_reference_same_machine": same_machine,
        "parallel_ratios": parallel_ratios,
        "precision": {
            "requested": args.precision,
            "policies": policies,
            "bf16_supported": wprecision.bf16_supported(),
            "cpu_bf16_flags": list(wprecision.cpu_bf16_flags()),
        },
        "precision_ratios": precision_ratios,
        "floor_at_matmul_rate": floor,
        "targets": targets,
    }
    C.finish("meta_step", result, args.out, started)


if __name__ == "__main__":
    main()
