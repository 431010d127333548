"""Sequential vs vectorised meta-batches on an accelerator (or a CPU), with XLA off and on.

For the papers' Omniglot network on synthetic tasks (28x28x1, 20 classes, task batch 20;
see `_common.py`), for each configuration, meta-batch size, ``jit_compile`` setting and
``parallel`` mode:

* ``per_task_step_ms``: the compiled adaptation step (``_group_step``, what meta-training
  runs K times per task) timed while advancing the whole meta-batch by one inner step
  (one call per group: M calls of one task sequentially, one call of M tasks vectorised),
  divided by the meta-batch size. Rounds interleave the modes, so the ratios
  (``ratios``) are measured at the same moment;
* ``tasks_per_s`` / ``steps_per_s``: task adaptations and task inner steps per second of
  that step; ``gflops_per_s``: the convolution FLOPs those steps do (Leap: 3 forward
  passes per step, `_common.conv_flops`) per second, i.e. how busy the device is kept;
* ``meta_step_s``: one whole `train_step` (K inner steps per task, data, meta-update),
  end to end;
* ``memory_peak_mb`` (GPU): `tf.config.experimental.get_memory_info` peak over a warm-up
  and a meta step of that mode alone;
* ``group_size``, ``trace_counts``, ``fallback_ops``, ``grouped_convolutions``: how the
  executor ran (ops that `tf.vectorized_map` could not batch and ran task by task; whether
  per-task convolutions ran as one grouped convolution, see ``--grouped``).

Configurations: ``leap`` (`LeapTrainer`, plain network) and ``warp_leap_online``
(`WarpTrainer(mode="online", objective="approx", init_objective="leap")`, a WarpConv2D after
each block; its step includes the warp gradient).

Usage::

    python bench/gpu.py                  # on a CUDA machine: meta-batch 5/20/64, XLA off/on
    python bench/gpu.py --quick          # tiny sizes, CPU is fine (about a minute)
    python bench/gpu.py --meta-batch 5 20 --modes sequential unrolled vectorized --jit off

Prints one JSON object and writes it to ``bench/results/gpu.json`` (``--out -``: print
only). A configuration that fails (e.g. out of memory) is reported with its error and
the rest still run.
"""

import json  # noqa: F401  (the result is JSON; see C.finish)
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.setup()

CONFIGS = ("leap", "warp_leap_online")


def device_info():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    info = {"gpu": bool(gpus), "devices": [d.name for d in tf.config.list_logical_devices()]}
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(gpus[0])
        except (ValueError, RuntimeError):
            details = {}
        info.update(
            name=details.get("device_name", gpus[0].name),
            compute_capability=details.get("compute_capability"),
            count=len(gpus),
        )
        for g in gpus:
            try:
                tf.config.experimental.set_memory_growth(g, True)
            except RuntimeError:
                pass
    else:
        info["name"] = C.cpu_info()["model"]
    info["cuda_build"] = tf.test.is_built_with_cuda()
    return info


def build(config, meta_batch, inner_steps, parallel, jit_compile, seed):
    import keras

    import warpkeras

    common = dict(
        inner_learning_rate=0.1,
        inner_steps=inner_steps,
        meta_batch_size=meta_batch,
        meta_optimizer=keras.optimizers.SGD(0.01),
        seed=seed,
        parallel=parallel,
        jit_compile=jit_compile,
    )
    if config == "leap":
        return warpkeras.LeapTrainer(C.omniglot_model(warp=False, seed=seed), C.loss_fn(), **common)
    return warpkeras.WarpTrainer(
        C.omniglot_model(warp=True, seed=seed),
        C.loss_fn(),
        mode="online",
        objective="approx",
        init_objective="leap",
        **common,
    )


class MetaBatchStep:
    """Advances every task of a meta-batch by one inner step, as meta-training does: one
    ``_group_step`` call per group of the trainer's executor, each group's carry fed back."""

    def __init__(self, trainer, meta_batch, batch, seed=0):
        import numpy as np
        import tensorflow as tf

        self.trainer = trainer
        self.group = trainer.executor.group_size(meta_batch)
        sizes = [min(self.group, meta_batch - lo) for lo in range(0, meta_batch, self.group)]
        rng = np.random.default_rng(seed)
        online = trainer.warp_mode in ("online", "continual")
        self.groups = []
        for g in sizes:
            x = tf.constant(rng.random((g, batch) + C.IMAGE_SHAPE, dtype=np.float32))
            y = tf.constant(rng.integers(0, C.NUM_CLASSES, (g, batch)).astype(np.int32))
            m = (x, y) if online else ()
            self.groups.append([trainer._initial_carry(g), x, y, m])

    def __call__(self):
        out = None
        for item in self.groups:
            carry, x, y, m = item
            item[0], out = self.trainer._group_step(carry, x, y, m)
        return out["loss"]


def memory_peak_mb(gpu):
    import tensorflow as tf

    if not gpu:
        return None
    try:
        return round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
    except (ValueError, RuntimeError):
        return None


def reset_memory(gpu):
    import tensorflow as tf

    if gpu:
        try:
            tf.config.experimental.reset_memory_stats("GPU:0")
        except (ValueError, RuntimeError):
            pass


def meta_step(trainer, source, step):
    import numpy as np

    rng = np.random.default_rng([trainer.seed, step])
    tasks = source.sample(rng, trainer.meta_batch_size)
    start = time.perf_counter()
    trainer.train_step(tasks, rng)
    seconds = time.perf_counter() - start
    trainer.step.assign(step + 1)
    return seconds


def run_setting(config, mb, jit, modes, args, source, gpu):
    """All modes of one (configuration, meta-batch, jit) setting, timed interleaved."""
    import gc

    import warpkeras  # noqa: F401

    runs, variants, trainers = {}, {}, {}
    for mode in modes:
        run = {
            "config": config,
            "meta_batch": mb,
            "jit_compile": jit,
            "parallel": mode,
            "inner_steps": args.inner_steps,
            "task_batch": args.batch,
        }
        runs[mode] = run
        try:
            reset_memory(gpu)
            trainer = build(config, mb, 2, mode, jit, args.seed)
            if mode == "vectorized":
                grouped = {"auto": None, "on": True, "off": False}[args.grouped]
                trainer.executor.grouped_convolutions = grouped
                run["grouped_convolutions"] = gpu if grouped is None else grouped
            t0 = time.perf_counter()
            meta_step(trainer, source, 0)  # traces / compiles every function
            run["warmup_s"] = round(time.perf_counter() - t0, 2)
            trainer.inner_steps = args.inner_steps
            run["meta_step_s"] = round(meta_step(trainer, source, 1), 4)
            step = MetaBatchStep(trainer, mb, args.batch, args.seed)
            C.sync_numpy(step())  # traces the step at this batch size
            run["memory_peak_mb"] = memory_peak_mb(gpu)
            run["group_size"] = step.group
            variants[mode], trainers[mode] = step, trainer
        except Exception as e:  # noqa: BLE001  (reported; the other settings still run)
            run["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(
                f"# {config} mb={mb} jit={jit} {mode}: {run['error']}", file=sys.stderr, flush=True
            )
    if variants:
        try:
            timed = C.interleave(variants, args.rounds, args.calls, warmup=1, sync=C.sync_numpy)
        except Exception as e:  # noqa: BLE001
            timed = {}
            for mode in variants:
                runs[mode]["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        flops = C.conv_flops(warp=False, batch=args.batch)["train_step_3x_forward"]
        for mode, t in timed.items():
            run, trainer = runs[mode], trainers[mode]
            per_task = t["median_s"] / mb
            run.update(
                group_step_ms=round(t["median_s"] / math.ceil(mb / run["group_size"]) * 1e3, 3),
                per_task_step_ms=round(per_task * 1e3, 4),
                per_task_step_ms_min=round(t["min_s"] / mb * 1e3, 4),
                steps_per_s=round(1 / per_task, 1),
                tasks_per_s=round(1 / (per_task * args.inner_steps), 2),
                gflops_per_s=round(flops / per_task / 1e9, 1) if config == "leap" else None,
                trace_counts=dict(trainer.trace_counts),
                fallback_ops=dict(getattr(trainer.executor, "fallback_ops", {})),
                samples_ms=[round(s / mb * 1e3, 4) for s in t["samples_s"]],
            )
    out = list(runs.values())
    del variants, trainers
    gc.collect()
    return out


def main():
    p = C.parser(__doc__, "gpu")
    p.add_argument(
        "--meta-batch",
        type=int,
        nargs="+",
        default=None,
        help="meta-batch sizes (default 5 20 64; quick: 2)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["sequential", "vectorized"],
        choices=("sequential", "unrolled", "vectorized"),
    )
    p.add_argument(
        "--jit",
        nargs="+",
        choices=("off", "on"),
        default=None,
        help="XLA settings (default: off on; quick: off)",
    )
    p.add_argument(
        "--configs", nargs="+", choices=CONFIGS, default=None, help="default: both; quick: leap"
    )
    p.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="K of the timed meta step (default 10, quick 2)",
    )
    p.add_argument("--batch", type=int, default=None, help="task batch (default 20, quick 5)")
    p.add_argument(
        "--grouped",
        choices=("auto", "on", "off"),
        default="auto",
        help="vectorized: per-task convolutions as one grouped convolution (on), "
        "one per task (off), or grouped on GPUs only (auto, the default)",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--calls", type=int, default=None, help="calls per sample (default 3)")
    args = p.parse_args()
    q = args.quick
    args.meta_batch = args.meta_batch or ([2] if q else [5, 20, 64])
    args.jit = [j == "on" for j in (args.jit or (["off"] if q else ["off", "on"]))]
    args.configs = args.configs or (["leap"] if q else list(CONFIGS))
    args.inner_steps = args.inner_steps or (2 if q else 10)
    args.batch = args.batch or (5 if q else C.TASK_BATCH)
    args.rounds = args.rounds or (2 if q else 5)
    args.calls = args.calls or (1 if q else 3)
    started = time.time()

    import warpkeras

    device = device_info()
    info = C.machine_info(args.wait_idle)
    source = warpkeras.TaskSampler(
        C.synthetic_tasks(max(args.meta_batch), seed=args.seed, batch_size=args.batch)
    )
    runs = []
    for config in args.configs:
        for jit in args.jit:
            for mb in args.meta_batch:
                part = run_setting(config, mb, jit, args.modes, args, source, device["gpu"])
                runs.extend(part)
                for r in part:
                    print(
                        f"# {config} mb={mb} jit={jit} {r['parallel']}: "
                        f"{r.get('per_task_step_ms', 'n/a')} ms per task step",
                        file=sys.stderr,
                        flush=True,
                    )
    ratios = {}
    for r in runs:
        if r["parallel"] == "sequential" or "per_task_step_ms" not in r:
            continue
        for s in runs:
            if (
                s["parallel"] == "sequential"
                and "per_task_step_ms" in s
                and (s["config"], s["meta_batch"], s["jit_compile"])
                == (r["config"], r["meta_batch"], r["jit_compile"])
            ):
                key = (
                    f"{r['config']}_mb{r['meta_batch']}_{'xla' if r['jit_compile'] else 'noxla'}"
                    f"_{r['parallel']}_over_sequential"
                )
                ratios[key] = {
                    "per_task_step": C.ratio(r["per_task_step_ms"], s["per_task_step_ms"]),
                    "meta_step": C.ratio(r["meta_step_s"], s["meta_step_s"]),
                }
    result = {
        "benchmark": "gpu",
        "quick": q,
        "device": device,
        "machine": info,
        "config": {
            "network": "papers' Omniglot network (4 conv blocks, 64 channels)",
            "tasks": f"synthetic 28x28x1, {C.NUM_CLASSES} classes, batch {args.batch}",
            "inner_steps_of_meta_step": args.inner_steps,
            "rounds": args.rounds,
            "calls_per_sample": args.calls,
            "modes": args.modes,
            "grouped": args.grouped,
        },
        "runs": runs,
        "ratios": ratios,
        "note": "ratios < 1: the mode is faster than sequential; per-task figures are the "
        "median over interleaved rounds",
    }
    C.finish("gpu", result, args.out, started)


if __name__ == "__main__":
    main()
