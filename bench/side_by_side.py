"""Meta steps of the authors' PyTorch code and of warpkeras, side by side in one run.

Each round runs, in this order and each in its own subprocess, so that no side inherits
another's threads, caches or memory:

1. reference Leap (``reference_harness.py --methods leap``, under the PyTorch venv), once
   per ``--ref-variants`` entry: ``as_is`` (the authors' code as it is) and ``passive``
   (``OMP_WAIT_POLICY=PASSIVE``, see below),
2. warpkeras Leap (`LeapTrainer`, built by ``meta_step.py``'s ``build``),
3. reference Warp-Leap (``reference_harness.py --methods warp_leap``), per variant,
4. warpkeras Warp-Leap (`WarpTrainer`, offline, ``init_objective="leap"``,
   ``meta_interval=1``, one warp update per stored point, ``objective="approx"``).

torch's OpenMP threads spin while they wait for each other; when other processes hold the
cores, that makes a 2-thread torch step many times slower (measured here at a load average
of 11: Warp-Leap inner step 1664 ms as is, 105 ms with ``OMP_WAIT_POLICY=PASSIVE``).
The ``passive`` variant is the authors' code in its best setting on a shared machine; the
ratios are given against ``as_is`` and against the faster variant of each round.

Same work on both sides: the papers' Omniglot network (4 x [3x3 conv 64, max-pool, batch
norm, ReLU], 20 classes; Warp-Leap: a 3x3 conv warp layer after each block), meta-batch 5,
K = 100 inner SGD steps at lr 0.1, task batch 20, synthetic 28x28 images, 500 warp updates
per Warp-Leap meta step. warpkeras runs the approximate objective: the authors' warp update
differentiates the loss at the stepped point θ − α∇L(θ) with the inner gradient ∇L(θ)
stored detached (their ``step`` accumulates it into ``.grad`` without a graph), which is
what ``objective="approx"`` computes (inner forward/backward, step, outer
forward/backward). The authors' meta step also evaluates each task on its held-out
images; that time is subtracted (``reference_net_s``). Each subprocess first runs one
untimed warm-up meta step with a few inner steps (tracing on the warpkeras side), then
``--repeats`` timed meta steps.

The 1-minute load average is recorded before and after every side of every round: the
machine may be shared, and a ratio from a round under load is weaker evidence. Ratios are
per round (the sides of one round ran within minutes of each other); the medians are over
rounds.

Usage::

    python bench/side_by_side.py --ref-repo /work/ref/warpgrad --ref-python /work/refvenv/bin/python
    python bench/side_by_side.py --smoke     # K = 2, one round: checks that both sides run

Writes ``bench/results/side_by_side.json`` (``--smoke``: ``side_by_side_smoke.json``). Its
top-level ``leap`` / ``warp_leap`` entries hold the reference's medians in the form
``python bench/meta_step.py --reference-json`` reads.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import _common as C  # noqa: E402  (stdlib only at import; TensorFlow loads in the workers)

# reference variants: the environment each reference subprocess runs under
REF_VARIANTS = {"as_is": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def sides(methods, variants):
    """(key, kind, method, extra environment) in the order of one round."""
    out = []
    for method in ("leap", "warp_leap"):
        if method not in methods:
            continue
        for v in variants:
            key = "reference" if v == "as_is" else f"reference_{v}"
            out.append((key, "reference", method, REF_VARIANTS[v]))
        out.append(("warpkeras", "warpkeras", method, {}))
    return out


# ----------------------------------------------------------------------------------------
# warpkeras worker (a subprocess of the driver)


def warpkeras_worker(args):
    C.setup()
    import meta_step as M  # the same build() and meta_step() as bench/meta_step.py
    import numpy as np  # noqa: F401

    import warpkeras

    info = C.machine_info()
    config = "leap" if args.worker == "leap" else "warp_leap_offline"
    from warpkeras import precision

    parallel = args.parallel if M.supports_parallel() else None
    # float32, or mixed_bfloat16 where the CPU has bfloat16 (else float32 with a warning)
    policy = precision.compute_policy(args.precision)
    trainer = M.build(
        config,
        args.meta_batch,
        args.inner_steps,
        "approx",
        None,
        parallel,
        args.seed,
        policy=policy,
    )
    source = warpkeras.TaskSampler(C.synthetic_tasks(20, seed=args.seed))
    trainer.inner_steps = args.warmup_inner_steps
    t0 = time.perf_counter()
    M.meta_step(trainer, source, 0)  # traces every function of this configuration
    warmup_s = time.perf_counter() - t0
    trainer.inner_steps = args.inner_steps
    samples, warp_updates = [], []
    for r in range(args.repeats):
        seconds, logs = M.meta_step(trainer, source, 1 + r)
        samples.append(seconds)
        warp_updates.append(float(logs.get("warp_updates", 0)))
    out = {
        "meta_step_s_all": samples,
        "meta_step_s_mean": sum(samples) / len(samples),
        "warmup_s": warmup_s,
        "warp_updates_per_meta_step": warp_updates,
        "objective": "approx" if config != "leap" else None,
        "parallel": parallel,
        "precision": args.precision,
        "dtype_policy": policy,
        "config": config,
        "machine": info,
    }
    with open(args.worker_out, "w") as f:
        json.dump(out, f, default=C._json_default)


# ----------------------------------------------------------------------------------------
# driver


def run_side(key, side, method, env, args, tmpdir, round_index):
    out = os.path.join(tmpdir, f"{key}_{method}_{round_index}.json")
    if side == "reference":
        cmd = [
            args.ref_python,
            os.path.join(BENCH, "reference_harness.py"),
            "--repo",
            args.ref_repo,
            "--methods",
            method,
            "--meta-batch",
            str(args.meta_batch),
            "--inner-steps",
            str(args.inner_steps),
            "--repeats",
            str(args.repeats),
            "--warmup-inner-steps",
            str(args.warmup_inner_steps),
            "--threads",
            str(args.ref_threads),
            "--seed",
            str(args.seed),
            "--out",
            out,
        ]
    else:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            method,
            "--worker-out",
            out,
            "--meta-batch",
            str(args.meta_batch),
            "--inner-steps",
            str(args.inner_steps),
            "--repeats",
            str(args.repeats),
            "--warmup-inner-steps",
            str(args.warmup_inner_steps),
            "--seed",
            str(args.seed),
            "--parallel",
            args.parallel,
            "--precision",
            args.precision,
        ]
    waited = C.wait_idle(args.wait_idle) if args.wait_idle else None
    load_before = C.load()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    base = dict(os.environ)
    if side == "reference":
        base.pop("OMP_WAIT_POLICY", None)  # as_is: torch's default
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**base, **env})
    wall = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = C.load()
    if proc.returncode != 0:
        raise SystemExit(
            f"{key} {method} failed (exit {proc.returncode}):\n"
            f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        )
    with open(out) as f:
        res = json.load(f)
    if side == "reference":
        res = {
            "harness": {k: v for k, v in res.items() if k not in ("leap", "warp_leap")},
            **res[method],
        }
    res["process_wall_s"] = wall
    # CPU seconds of the whole subprocess (imports, warm-up and timed meta steps)
    res["process_cpu_s"] = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    res["wait_idle"] = waited
    res["extra_environment"] = env
    res["load_before"] = load_before
    res["load_after"] = load_after
    return res


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def r3(x):
    return None if x is None else round(x, 3)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--repeats", type=int, default=1, help="timed meta steps per side per round (default 1)"
    )
    p.add_argument("--meta-batch", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=100, help="K (default 100)")
    p.add_argument(
        "--warmup-inner-steps",
        type=int,
        default=2,
        help="K of each side's untimed warm-up meta step (default 2)",
    )
    p.add_argument(
        "--ref-repo",
        default="/work/ref/warpgrad",
        help="checkout of the authors' warpgrad repository (outside this one)",
    )
    p.add_argument(
        "--ref-python",
        default="/work/refvenv/bin/python",
        help="a Python with torch (the reference's environment)",
    )
    p.add_argument("--ref-threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--ref-variants",
        nargs="+",
        choices=tuple(REF_VARIANTS),
        default=["as_is", "passive"],
        help="environments of the reference runs, each timed every round: as_is "
        "(the authors' code as it is) and passive (OMP_WAIT_POLICY=PASSIVE: "
        "torch's OpenMP threads sleep instead of spinning while they wait, "
        "which keeps torch from collapsing when other processes share the "
        "cores); default both. Ratios are given against as_is (else the "
        "first variant) and against the faster variant of each round",
    )
    p.add_argument(
        "--methods", nargs="+", choices=("leap", "warp_leap"), default=["leap", "warp_leap"]
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--parallel",
        choices=("auto", "sequential", "unrolled", "vectorized"),
        default="auto",
        help="warpkeras's meta-batch mode (default auto, the trainers' default)",
    )
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="warpkeras's layer compute precision: bfloat16 builds its models "
        "under Keras's mixed_bfloat16 policy where the CPU has bfloat16 "
        "(AVX512_BF16 or AMX; float32 master weights and meta-gradients), "
        "float32 with a warning elsewhere; the reference stays float32",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each side, wait up to SECONDS for the 1-minute load average "
        "to drop below 1.5 (default 0: no wait)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="one round at K = 2: checks that both sides run (figures meaningless)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON path (default bench/results/side_by_side.json; "
        "--smoke: side_by_side_smoke.json); '-' for stdout only",
    )
    # internal: one warpkeras side in a subprocess
    p.add_argument("--worker", choices=("leap", "warp_leap"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return warpkeras_worker(args)
    # the variant the plain "reference" figures and ratios refer to: as_is when it runs
    primary = "as_is" if "as_is" in args.ref_variants else args.ref_variants[0]
    key_of = lambda v: "reference" if v == "as_is" else f"reference_{v}"  # noqa: E731
    if args.smoke:
        args.rounds, args.inner_steps = 1, 2
    out_path = args.out or os.path.join(
        C.RESULTS_DIR, "side_by_side_smoke.json" if args.smoke else "side_by_side.json"
    )
    if not os.path.exists(args.ref_python):
        raise SystemExit(
            f"--ref-python {args.ref_python!r} does not exist: make a venv with "
            "torch (see reference_harness.py's docstring)"
        )

    started = time.time()
    cpu = C.cpu_info()
    order = sides(args.methods, args.ref_variants)
    rounds = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for i in range(args.rounds):
            entry = {"round": i}
            for key, side, method, env in order:
                res = run_side(key, side, method, env, args, tmpdir, i)
                entry[f"{key}_{method}"] = res
                print(
                    f"# round {i} {key} {method}: {res['meta_step_s_mean']:.2f} s "
                    f"(load {res['load_before']['loadavg_1m']} -> "
                    f"{res['load_after']['loadavg_1m']})",
                    file=sys.stderr,
                    flush=True,
                )
            for method in args.methods:
                ref, wk = entry[f"{key_of(primary)}_{method}"], entry[f"warpkeras_{method}"]
                ref_net = ref["meta_step_s_mean"] - ref["heldout_eval_s_per_meta_step"]
                variants = {
                    v: entry[("reference" if v == "as_is" else f"reference_{v}") + f"_{method}"]
                    for v in args.ref_variants
                }
                nets = {
                    v: x["meta_step_s_mean"] - x["heldout_eval_s_per_meta_step"]
                    for v, x in variants.items()
                }
                best = min(nets, key=nets.get)
                loads = [
                    x[k]["loadavg_1m"]
                    for x in [*variants.values(), wk]
                    for k in ("load_before", "load_after")
                ]
                entry[f"{method}_summary"] = {
                    "reference_net_s_by_variant": {v: r3(n) for v, n in nets.items()},
                    "fastest_reference_variant": best,
                    "speedup_vs_fastest_reference": r3(nets[best] / wk["meta_step_s_mean"]),
                    "reference_s": r3(ref["meta_step_s_mean"]),
                    "reference_heldout_eval_s": r3(ref["heldout_eval_s_per_meta_step"]),
                    "reference_net_s": r3(ref_net),
                    "warpkeras_s": r3(wk["meta_step_s_mean"]),
                    "warpkeras_over_reference": r3(wk["meta_step_s_mean"] / ref_net),
                    "speedup": r3(ref_net / wk["meta_step_s_mean"]),
                    "process_cpu_s": {
                        **{f"reference_{v}": r3(x["process_cpu_s"]) for v, x in variants.items()},
                        "warpkeras": r3(wk["process_cpu_s"]),
                    },
                    "load_1m_range": [min(loads), max(loads)],
                }
            rounds.append(entry)

    medians, compat = {}, {}
    for method in args.methods:
        s = [r[f"{method}_summary"] for r in rounds]
        refs = [r[f"{key_of(primary)}_{method}"] for r in rounds]
        medians[method] = {
            "reference_s": r3(median([x["reference_s"] for x in s])),
            "reference_net_s": r3(median([x["reference_net_s"] for x in s])),
            "warpkeras_s": r3(median([x["warpkeras_s"] for x in s])),
            "speedup_per_round": [x["speedup"] for x in s],
            "speedup_median": r3(median([x["speedup"] for x in s])),
            "speedup_of_medians": r3(
                median([x["reference_net_s"] for x in s]) / median([x["warpkeras_s"] for x in s])
            ),
            "speedup_vs_fastest_reference_per_round": [
                x["speedup_vs_fastest_reference"] for x in s
            ],
            "speedup_vs_fastest_reference_median": r3(
                median([x["speedup_vs_fastest_reference"] for x in s])
            ),
            "fastest_reference_variant_per_round": [x["fastest_reference_variant"] for x in s],
            "load_1m_per_round": [x["load_1m_range"] for x in s],
        }
        # the reference medians in reference_harness.py's form (meta_step.py --reference-json)
        compat[method] = {
            "meta_step_s_mean": medians[method]["reference_s"],
            "heldout_eval_s_per_meta_step": r3(
                median([x["heldout_eval_s_per_meta_step"] for x in refs])
            ),
            "inner_step_ms": r3(median([x["inner_step_ms"] for x in refs])),
            "note": "medians over the rounds of this run",
        }
        if method == "warp_leap":
            compat[method]["warp_update_ms"] = r3(median([x["warp_update_ms"] for x in refs]))
            compat[method]["warp_updates_per_meta_step"] = median(
                [x["warp_updates_per_meta_step"] for x in refs]
            )
    first = rounds[0]
    harness = next((first[f"{key_of(primary)}_{m}"]["harness"] for m in args.methods), {})
    machine = next((first[f"warpkeras_{m}"]["machine"] for m in args.methods), {})
    flags = sorted(f for f in cpu["flags"] if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
    result = {
        "benchmark": "side_by_side",
        "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "meta_batch": args.meta_batch,
            "inner_steps": args.inner_steps,
            "task_batch": C.TASK_BATCH,
            "inner_lr": 0.1,
            "rounds": args.rounds,
            "repeats_per_side_per_round": args.repeats,
            "warmup_inner_steps": args.warmup_inner_steps,
            "order": [f"{k} {m}" for k, _, m, _ in order],
            "reference_variants": {v: REF_VARIANTS[v] for v in args.ref_variants},
            "reference_s_and_speedup_refer_to": primary,
            "warpkeras_parallel": args.parallel,
            "warpkeras_precision": args.precision,
            "warpkeras_warp_objective": "approx (the reference's effective gradient)",
            "warpkeras_warp_leap": "WarpTrainer offline, init_objective=leap, "
            "meta_interval=1, one warp update per stored point",
            "reference_subtracted": "held-out evaluation of each task",
        },
        "cpu": {
            "model": cpu["model"],
            "family_model": cpu["family_model"],
            "cores": os.cpu_count(),
            "flags": flags,
            "avx512_bf16": "avx512_bf16" in cpu["flags"],
            "amx_bf16": "amx_bf16" in cpu["flags"],
        },
        "versions": {
            "torch": harness.get("torch_version"),
            "torch_threads": [
                harness.get("torch_num_threads"),
                harness.get("torch_num_interop_threads"),
            ],
            "torch_cpu_capability": harness.get("cpu_capability"),
            "tensorflow": machine.get("tensorflow"),
            "keras": machine.get("keras"),
            "tf_threads_intra_inter": [
                machine.get("tf_intra_op_threads"),
                machine.get("tf_inter_op_threads"),
            ],
            "warpkeras_commit": machine.get("warpkeras_commit"),
        },
        "medians": medians,
        "rounds": rounds,
        **compat,
        "load_at_end": C.load(),
        "wall_seconds": round(time.time() - started, 1),
    }
    text = json.dumps(result, indent=1, default=C._json_default)
    if out_path != "-":
        C.write_text(out_path, text + "\n")
    print(json.dumps({"medians": medians, "out": out_path}, indent=1))


if __name__ == "__main__":
    main()
