"""Peak memory (RSS) of online and offline Warp-Leap meta steps, and of second-order MAML
with and without recomputation.

Each configuration runs in a fresh Python process (``--child``), which builds the
Warp-Leap Omniglot model and trainer, makes one short warm-up meta step (tracing), records
its resident set, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and
runs one meta step; the peak (``VmHWM``, also ``ru_maxrss``) is then read. Growth =
peak − resident set after warm-up, i.e. what the meta step itself added.

* ``online_K{k}``: `WarpTrainer(mode="online")`, K=k inner steps (Algorithm 1 keeps no
  trajectory: the peak must not grow with K; target K=1000 ≤ 1.1x K=100);
* ``offline_memory``: `mode="offline"`, every θ_k of the meta-batch kept in memory
  (K × meta-batch × |θ| floats);
* ``offline_bounded``: ``buffer_capacity`` points kept (reservoir sampling);
* ``offline_spill``: ``buffer_capacity`` in memory, the rest written to disk
  (``buffer_overflow="spill"``).

* ``maml_K{k}`` / ``maml_recompute_K{k}``: second-order `MAMLTrainer` on the same
  network (without warp layers), K=k inner steps, without and with ``recompute=True``
  (each inner step's activations recomputed in the backward pass: memory grows with K ×
  |θ| instead of K × the activations; target at K=20: peak with recomputation ≤ 1/3 of
  without). The warm-up step runs at the same K (MAML's steps are traced per K), so the
  resident set after it already holds what the allocator kept from its peak: the MAML
  runs also report ``tensor_peak_mb``, TensorFlow's own peak of the bytes held by
  tensors during the measured meta step (``tf.config.experimental.get_memory_info``)
  over those held before it, the figure the target reads.

The offline runs cap the warp updates (``--max-warp-updates``, default 10): the buffer is
full at the end of the adaptations, before any update, so the cap does not change the peak
but keeps the run short. Tasks are synthetic (no download).

Usage::

    python bench/memory.py            # ~4 minutes
    python bench/memory.py --quick    # ~1 minute (K=10 vs 100, smaller buffers)
    python bench/memory.py --only maml --maml-k 5 20   # MAML only

Prints one JSON object and writes it to ``bench/results/memory.json``.
"""

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec):
    """Runs one configuration; prints a JSON line."""
    C.setup()
    import keras
    import numpy as np

    import warpkeras

    mode = spec["mode"]
    kw = {}
    if mode == "maml":
        return maml_child(spec)
    if mode == "offline":
        kw = {"meta_interval": 1, "max_warp_updates": spec["max_warp_updates"]}
        if spec.get("capacity"):
            kw["buffer_capacity"] = spec["capacity"]
            kw["buffer_overflow"] = spec.get("overflow", "reservoir")
            if spec.get("overflow") == "spill":
                kw["buffer_spill_dir"] = spec["spill_dir"]
    model = C.omniglot_model(warp=True, seed=spec["seed"])
    trainer = warpkeras.WarpTrainer(
        model,
        C.loss_fn(),
        mode=mode,
        objective=spec["objective"],
        init_objective="leap",
        inner_learning_rate=0.1,
        inner_steps=spec["K"],
        meta_batch_size=spec["meta_batch"],
        meta_optimizer=keras.optimizers.SGD(0.01),
        seed=spec["seed"],
        **kw,
    )
    source = warpkeras.TaskSampler(C.synthetic_tasks(max(4, spec["meta_batch"]), seed=spec["seed"]))
    theta_floats = sum(int(np.prod(v.shape)) for v in trainer.partition.task_variables)

    buffer_info = {}
    if mode == "offline":
        original = trainer._offline_updates

        def recorded(tasks, rng):
            buf = trainer.buffer
            spilled = 0
            if getattr(buf, "_spill_dir", None) and os.path.isdir(buf._spill_dir):
                spilled = sum(
                    os.path.getsize(os.path.join(buf._spill_dir, f))
                    for f in os.listdir(buf._spill_dir)
                )
            buffer_info.update(
                points=len(buf),
                in_memory_bytes=int(buf.nbytes),
                spilled_bytes=int(spilled),
                seen=int(getattr(buf, "seen", 0)),
                rss_kb_before_updates=status_kb("VmRSS"),
            )
            return original(tasks, rng)

        trainer._offline_updates = recorded

    def meta_step(step):
        rng = np.random.default_rng([spec["seed"], step])
        tasks = source.sample(rng, spec["meta_batch"])
        t = time.perf_counter()
        logs = trainer.train_step(tasks, rng)
        trainer.step.assign(step + 1)
        return time.perf_counter() - t, logs

    # warm-up: traces every function and lets the allocators reach their working sizes
    trainer.inner_steps = min(spec["K"], 10)
    meta_step(0)
    trainer.inner_steps = spec["K"]
    buffer_info.clear()
    rss_after_warmup = status_kb("VmRSS")
    peak_reset = reset_peak()
    seconds, logs = meta_step(1)
    out = {
        "name": spec["name"],
        "rss_after_warmup_mb": round(rss_after_warmup / 1024, 1),
        "peak_rss_mb": round(status_kb("VmHWM") / 1024, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_reset_worked": peak_reset,
        "growth_mb": round((status_kb("VmHWM") - rss_after_warmup) / 1024, 1),
        "rss_at_end_mb": round(status_kb("VmRSS") / 1024, 1),
        "meta_step_s": round(seconds, 2),
        "warp_updates": logs.get("warp_updates"),
        "theta_floats": theta_floats,
        "theta_mb": round(theta_floats * 4 / 2**20, 3),
    }
    if buffer_info:
        out["buffer"] = dict(buffer_info)
        out["buffer"]["in_memory_mb"] = round(buffer_info["in_memory_bytes"] / 2**20, 1)
        out["buffer"]["spilled_mb"] = round(buffer_info["spilled_bytes"] / 2**20, 1)
        out["buffer"]["rss_before_updates_mb"] = round(
            buffer_info["rss_kb_before_updates"] / 1024, 1
        )
    print("RESULT " + json.dumps(out), flush=True)


def maml_child(spec):
    """One MAML configuration (second order, with or without recomputation)."""
    import keras
    import numpy as np

    import warpkeras

    model = C.omniglot_model(warp=False, seed=spec["seed"])
    trainer = warpkeras.MAMLTrainer(
        model,
        C.loss_fn(),
        inner_learning_rate=0.1,
        inner_steps=spec["K"],
        meta_batch_size=spec["meta_batch"],
        meta_optimizer=keras.optimizers.SGD(0.01),
        seed=spec["seed"],
        recompute=spec["recompute"],
    )
    source = warpkeras.TaskSampler(C.synthetic_tasks(max(4, spec["meta_batch"]), seed=spec["seed"]))
    theta_floats = sum(int(np.prod(v.shape)) for v in trainer.partition.task_variables)

    def meta_step(step):
        rng = np.random.default_rng([spec["seed"], step])
        tasks = source.sample(rng, spec["meta_batch"])
        t = time.perf_counter()
        trainer.train_step(tasks, rng)
        trainer.step.assign(step + 1)
        return time.perf_counter() - t

    import tensorflow as tf

    meta_step(0)  # warm-up at the same K: traces, allocators reach their working sizes
    rss_after_warmup = status_kb("VmRSS")
    peak_reset = reset_peak()
    try:  # TensorFlow's own count of the bytes its tensors hold on the CPU
        tf.config.experimental.reset_memory_stats("CPU:0")
        tensors_before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    except (ValueError, RuntimeError):
        tensors_before = None
    seconds = meta_step(1)
    tensor_peak = (
        tf.config.experimental.get_memory_info("CPU:0")["peak"] - tensors_before
        if tensors_before is not None
        else None
    )
    steady = [meta_step(2 + i) for i in range(spec.get("steady", 2))]
    out = {
        "name": spec["name"],
        "K": spec["K"],
        "recompute": spec["recompute"],
        "rss_after_warmup_mb": round(rss_after_warmup / 1024, 1),
        "peak_rss_mb": round(status_kb("VmHWM") / 1024, 1),
        "peak_reset_worked": peak_reset,
        "growth_mb": round((status_kb("VmHWM") - rss_after_warmup) / 1024, 1),
        "tensor_peak_mb": None if tensor_peak is None else round(tensor_peak / 2**20, 1),
        "meta_step_s": round(seconds, 3),
        "steady_meta_step_s": round(sorted(steady)[len(steady) // 2], 3) if steady else None,
        "theta_floats": theta_floats,
        "theta_mb": round(theta_floats * 4 / 2**20, 3),
    }
    print("RESULT " + json.dumps(out), flush=True)


def maml_summary(results, ks):
    """Growth and time with recomputation over without, per K."""
    summary, targets = {}, {}
    for k in ks:
        plain, rec = results.get(f"maml_K{k}", {}), results.get(f"maml_recompute_K{k}", {})
        summary[f"maml_K{k}"] = {
            "tensor_peak_mb": [plain.get("tensor_peak_mb"), rec.get("tensor_peak_mb")],
            "tensor_peak_recompute_over_plain": C.ratio(
                rec.get("tensor_peak_mb") or 0, plain.get("tensor_peak_mb") or 0
            ),
            "growth_mb": [plain.get("growth_mb"), rec.get("growth_mb")],
            "growth_recompute_over_plain": C.ratio(
                rec.get("growth_mb", 0), plain.get("growth_mb", 0)
            ),
            "step_s": [plain.get("steady_meta_step_s"), rec.get("steady_meta_step_s")],
            "time_recompute_over_plain": C.ratio(
                rec.get("steady_meta_step_s", 0), plain.get("steady_meta_step_s", 0)
            ),
        }
    if 20 in ks:
        r = summary["maml_K20"]["tensor_peak_recompute_over_plain"]
        targets["maml_recompute_K20_tensor_peak_le_one_third"] = {
            "value": r,
            "met": r is not None and r <= 1 / 3,
        }
    return summary, targets


def run_child(spec):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"name": spec["name"], "error": proc.stderr[-2000:]}


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(json.loads(sys.argv[2]))
    p = C.parser(__doc__, "memory")
    p.add_argument(
        "--online-k",
        type=int,
        nargs=2,
        default=None,
        help="the two K of the online runs (default 100 1000; quick 10 100)",
    )
    p.add_argument(
        "--online-meta-batch",
        type=int,
        default=1,
        help="tasks per online meta step (default 1: memory per task)",
    )
    p.add_argument(
        "--offline-k", type=int, default=None, help="K of the offline runs (default 100, quick 20)"
    )
    p.add_argument(
        "--offline-meta-batch",
        type=int,
        default=None,
        help="tasks per offline meta step (default 5, quick 2)",
    )
    p.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="buffer_capacity of the bounded / spilled runs (default 50, quick 10)",
    )
    p.add_argument("--max-warp-updates", type=int, default=10)
    p.add_argument(
        "--objective",
        choices=("exact", "approx"),
        default=None,
        help="warp objective (default exact; quick approx)",
    )
    p.add_argument("--spill-dir", default="/tmp/warpkeras_bench_spill")
    p.add_argument(
        "--maml-k",
        type=int,
        nargs="+",
        default=None,
        help="K of the MAML runs (default 5 20; quick 20)",
    )
    p.add_argument(
        "--maml-meta-batch", type=int, default=2, help="tasks per MAML meta step (default 2)"
    )
    p.add_argument(
        "--only",
        choices=("warp", "maml"),
        default=None,
        help="run only the Warp-Leap or only the MAML configurations",
    )
    args = p.parse_args()
    started = time.time()
    C.setup()
    k_small, k_large = args.online_k or ((10, 100) if args.quick else (100, 1000))
    off_k = args.offline_k or (20 if args.quick else 100)
    off_mb = args.offline_meta_batch or (2 if args.quick else 5)
    cap = args.capacity or (10 if args.quick else 50)
    objective = args.objective or ("approx" if args.quick else "exact")
    base = {"seed": args.seed, "objective": objective, "max_warp_updates": args.max_warp_updates}
    maml_ks = args.maml_k or ([20] if args.quick else [5, 20])
    maml_specs = [
        dict(
            base,
            name=f"maml{'_recompute' if rec else ''}_K{k}",
            mode="maml",
            K=k,
            meta_batch=args.maml_meta_batch,
            recompute=rec,
        )
        for k in maml_ks
        for rec in (False, True)
    ]
    specs = [
        dict(
            base,
            name=f"online_K{k_small}",
            mode="online",
            K=k_small,
            meta_batch=args.online_meta_batch,
        ),
        dict(
            base,
            name=f"online_K{k_large}",
            mode="online",
            K=k_large,
            meta_batch=args.online_meta_batch,
        ),
        dict(base, name="offline_memory", mode="offline", K=off_k, meta_batch=off_mb),
        dict(
            base,
            name="offline_bounded",
            mode="offline",
            K=off_k,
            meta_batch=off_mb,
            capacity=cap,
            overflow="reservoir",
        ),
        dict(
            base,
            name="offline_spill",
            mode="offline",
            K=off_k,
            meta_batch=off_mb,
            capacity=cap,
            overflow="spill",
            spill_dir=args.spill_dir,
        ),
    ]
    if args.only == "maml":
        specs = []
    if args.only != "warp":
        specs += maml_specs
    info = C.machine_info(args.wait_idle)
    results = {}
    for spec in specs:
        results[spec["name"]] = run_child(spec)
        r = results[spec["name"]]
        print(
            f"# {spec['name']}: peak {r.get('peak_rss_mb')} MB, growth {r.get('growth_mb')} MB",
            file=sys.stderr,
            flush=True,
        )

    summary, targets = {}, {}
    if args.only != "maml":
        small, large = results[f"online_K{k_small}"], results[f"online_K{k_large}"]
        off = {k: results[k] for k in ("offline_memory", "offline_bounded", "offline_spill")}
        theta_mb = small.get("theta_mb")
        summary = {
            f"online_peak_K{k_large}_over_K{k_small}": C.ratio(
                large.get("peak_rss_mb", 0), small.get("peak_rss_mb", 0)
            ),
            f"online_growth_mb_K{k_small}_K{k_large}": [
                small.get("growth_mb"),
                large.get("growth_mb"),
            ],
            "offline_expected_buffer_mb": {
                "memory": round(off_k * off_mb * theta_mb, 1) if theta_mb else None,
                "bounded_or_spill_in_memory": round(cap * theta_mb, 1) if theta_mb else None,
            },
            "offline_growth_mb": {k: v.get("growth_mb") for k, v in off.items()},
            "offline_peak_mb": {k: v.get("peak_rss_mb") for k, v in off.items()},
            "offline_peak_over_memory_buffer": {
                k: C.ratio(v.get("peak_rss_mb", 0), off["offline_memory"].get("peak_rss_mb", 0))
                for k, v in off.items()
            },
        }
        ratio_k = summary[f"online_peak_K{k_large}_over_K{k_small}"]
        targets = {
            f"online_K{k_large}_le_1.1x_K{k_small}": {
                "value": ratio_k,
                "met": ratio_k is not None and ratio_k <= 1.1,
            }
        }
    if args.only != "warp":
        maml_sum, maml_targets = maml_summary(results, maml_ks)
        summary["maml"] = maml_sum
        targets.update(maml_targets)
    result = {
        "benchmark": "memory",
        "quick": args.quick,
        "machine": info,
        "config": {
            "model": "omniglot Warp-Leap; omniglot MAML (no warp layers)",
            "objective": objective,
            "online_meta_batch": args.online_meta_batch,
            "offline_K": off_k,
            "offline_meta_batch": off_mb,
            "buffer_capacity": cap,
            "max_warp_updates_offline": args.max_warp_updates,
            "maml_K": maml_ks,
            "maml_meta_batch": args.maml_meta_batch,
            "only": args.only,
            "measure": "VmHWM after resetting it post warm-up; growth = peak - RSS after warm-up",
        },
        "runs": results,
        "summary": summary,
        "targets": targets,
    }
    C.finish("memory", result, args.out, started)


if __name__ == "__main__":
    main()
