"""TensorFlow thread settings on a small CPU: inner step, Leap meta step and per-task cost.

TensorFlow runs independent ops of a graph at once on its inter-op threads, and each
oneDNN kernel splits its own work over the intra-op threads. By default both pools have
one thread per core. On a 2-core CPU the inner step of the papers' Omniglot model then
runs a layer's input-gradient and weight-gradient convolutions at the same time, each
wanting both cores, and a profile showed the convolutions taking 1.5-2x their bare-loop
time. This benchmark measures the alternatives.

Thread pools are fixed when TensorFlow's runtime starts, so every setting runs in its own
persistent child process. The children build and warm every measured step one after the
other; then the parent asks them for one sample of each metric in turn (A B C ... then
C B A ...), so that a change in the machine's load hits every setting alike. Metrics:

* ``warp_inner``: one inner step of the Warp-Leap model with φ frozen (the trainer's
  compiled ``_plain_step``, see `_common.Engine`), batch 20;
* ``leap_inner``: the same for the plain (Leap) model; ``leap_meta_inner``: one
  adaptation step as Leap meta-training runs it (``_group_step``, with the Leap increment);
* ``bare_leap``: the step written directly (``tf.GradientTape`` + ``assign_sub`` in a
  ``tf.function``), to see whether the setting acts on the kernels or on the trainer;
* ``leap_meta_step``: one whole `LeapTrainer.train_step` (meta-batch 5, K inner steps,
  default K = 10), one call per sample.

``ratios_to_default`` are medians over rounds of (setting / default) in the same round,
with ``of_minima`` (the ratio of the fastest samples, the steadier estimate under bursty
interference) and the number of rounds in which the setting was faster. The load average
is recorded every round. Results and conclusions: ``bench/README.md``, "Threads".

``--pertask`` adds the per-task cost of one inner step of a Leap meta-batch of 5 and 20
tasks for ``parallel="sequential"``, ``"unrolled"`` and ``"vectorized"`` under a few
thread settings (``bench/gpu.py``'s measure, one child per setting): ``"unrolled"`` with
two inter-op threads of one intra-op thread each runs two tasks' kernels at once, one per
core.

Usage::

    python bench/threads.py --quick              # 5 settings, 7 rounds
    python bench/threads.py --pertask            # + per-task cost (long: unrolled
                                                 #   traces 20 tasks for minutes)
    python bench/threads.py --settings default inter1 --rounds 5

Prints one JSON object and writes it to ``bench/results/threads.json`` (the stored file
combines three such runs, see ``commands`` in it).
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

# name -> (environment variables for the child, tf.config.threading values (inter, intra)
# set in the child before its first op; None leaves TensorFlow's default)
SETTINGS = {
    "default": ({}, (None, None)),
    "inter1": ({}, (1, None)),
    "inter1_intra1": ({}, (1, 1)),
    "inter2_intra1": ({}, (2, 1)),
    "env_interop1": ({"TF_NUM_INTEROP_THREADS": "1"}, (None, None)),
    "env_omp1": ({"OMP_NUM_THREADS": "1"}, (None, None)),
    "env_omp1_interop1": ({"OMP_NUM_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}, (None, None)),
    "onednn_off": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, (None, None)),
    "onednn_off_inter1": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, (1, None)),
}
QUICK_SETTINGS = ("default", "inter1", "inter1_intra1", "inter2_intra1", "env_omp1")
PERTASK_SETTINGS = ("default", "inter1", "inter2_intra1")
PERTASK_MODES = ("sequential", "unrolled", "vectorized")


def child_env(name):
    env, _ = SETTINGS[name]
    out = dict(os.environ)
    for key in ("TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"):
        out.pop(key, None)
    out.update(env)
    return out


def apply_config(name):
    """In the child, after `import warpkeras` and before the first op."""
    import tensorflow as tf

    inter, intra = SETTINGS[name][1]
    if inter is not None:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    if intra is not None:
        tf.config.threading.set_intra_op_parallelism_threads(intra)


def pools():
    import tensorflow as tf

    return {
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
    }


def worker(name, args):
    """A persistent child with one thread setting: builds and warms every measured step,
    prints ``READY``, then for each metric name read from stdin times ``--calls`` calls
    of it and prints the seconds per call, until stdin closes."""
    import keras
    import numpy as np
    import tensorflow as tf

    import warpkeras

    apply_config(name)
    rng = np.random.default_rng(args.seed)
    x = rng.random((C.TASK_BATCH,) + C.IMAGE_SHAPE, dtype=np.float32)
    y = rng.integers(0, C.NUM_CLASSES, C.TASK_BATCH).astype(np.int32)
    warp = C.Engine(
        warpkeras.WarpTrainer(
            C.omniglot_model(warp=True, seed=args.seed), C.loss_fn(), mode="offline"
        ),
        x,
        y,
    )
    plain = C.Engine(
        warpkeras.LeapTrainer(C.omniglot_model(warp=False, seed=args.seed), C.loss_fn()), x, y
    )
    bare_model = C.omniglot_model(warp=False, seed=args.seed)
    bare_vars = bare_model.trainable_variables
    loss_fn = C.loss_fn()

    @tf.function
    def bare(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, bare_model(x, training=True))
        for v, g in zip(bare_vars, tape.gradient(loss, bare_vars)):
            v.assign_sub(0.1 * g)
        return loss

    trainer = warpkeras.LeapTrainer(
        C.omniglot_model(warp=False, seed=args.seed),
        C.loss_fn(),
        inner_learning_rate=0.1,
        inner_steps=args.inner_steps,
        meta_batch_size=5,
        meta_optimizer=keras.optimizers.SGD(0.01),
        seed=args.seed,
    )
    source = warpkeras.TaskSampler(C.synthetic_tasks(5, seed=args.seed))
    counter = [0]

    def leap_meta_step():
        r = np.random.default_rng([args.seed, counter[0]])
        logs = trainer.train_step(source.sample(r, 5), r)
        counter[0] += 1
        trainer.step.assign(counter[0])
        return logs

    xt, yt = tf.constant(x), tf.constant(y)
    steps = {
        "warp_inner": warp.inner,
        "leap_inner": plain.inner,
        "bare_leap": lambda: bare(xt, yt),
        "leap_meta_step": leap_meta_step,
    }
    if plain.meta_inner is not None:
        steps["leap_meta_inner"] = plain.meta_inner
    for fn in steps.values():
        for _ in range(2):
            C.sync_numpy(fn())
    print("READY " + json.dumps({"pools": pools(), "metrics": list(steps)}), flush=True)
    for line in sys.stdin:
        metric = line.strip()
        n = 1 if metric == "leap_meta_step" else args.calls
        seconds = C.time_calls(steps[metric], n, C.sync_numpy)
        print(f"TIME {seconds!r}", flush=True)


def child_pertask(name, args):
    """Per-task step cost of sequential / unrolled / vectorized Leap meta-batches."""
    import gpu as G

    import warpkeras

    apply_config(name)

    class A:
        pass

    a = A()
    a.inner_steps, a.batch, a.seed, a.grouped = args.inner_steps, C.TASK_BATCH, args.seed, "auto"
    a.rounds, a.calls = args.rounds_inner, 1
    source = warpkeras.TaskSampler(C.synthetic_tasks(max(args.meta_batch), seed=args.seed))
    runs = []
    for mb in args.meta_batch:
        runs.extend(G.run_setting("leap", mb, False, list(PERTASK_MODES), a, source, False))
    keep = (
        "meta_batch",
        "parallel",
        "per_task_step_ms",
        "per_task_step_ms_min",
        "meta_step_s",
        "warmup_s",
        "group_size",
        "error",
    )
    return {"runs": [{k: r[k] for k in keep if k in r} for r in runs], "pools": pools()}


def child_cmd(name, part, args):
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        name,
        "--part",
        part,
        "--rounds-inner",
        str(args.rounds_inner),
        "--calls",
        str(args.calls),
        "--inner-steps",
        str(args.inner_steps),
        "--seed",
        str(args.seed),
        "--meta-batch",
        *map(str, args.meta_batch),
    ]


def run_child(name, part, args):
    """Runs a one-shot child (the per-task part) and returns its RESULT."""
    load = C.load()["loadavg_1m"]
    t = time.time()
    proc = subprocess.run(
        child_cmd(name, part, args),
        env=child_env(name),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    wall = round(time.time() - t, 1)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
            out.update(loadavg_1m_at_start=load, child_wall_s=wall)
            return out
    return {"error": (proc.stderr or proc.stdout)[-2000:], "loadavg_1m_at_start": load}


class Worker:
    """The parent's handle on a persistent `worker` child."""

    def __init__(self, name, args):
        self.name = name
        self.proc = subprocess.Popen(
            child_cmd(name, "worker", args),
            env=child_env(name),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.info = self._read("READY ")

    def _read(self, prefix):
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        raise RuntimeError(
            f"thread setting {self.name!r}: the worker exited (code {self.proc.wait()})"
        )

    def time(self, metric):
        self.proc.stdin.write(metric + "\n")
        self.proc.stdin.flush()
        return self._read("TIME ")

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def measure_inner(names, args):
    """Starts one worker per setting (one after the other, so that tracing does not
    compete), then samples every metric round-robin over the workers."""
    workers = {}
    try:
        for name in names:
            t = time.time()
            workers[name] = Worker(name, args)
            print(
                f"# {name} ready in {time.time() - t:.0f} s: {workers[name].info}",
                file=sys.stderr,
                flush=True,
            )
        metrics = [m for m in METRICS if all(m in w.info["metrics"] for w in workers.values())]
        samples = {n: {m: [] for m in metrics} for n in names}
        loads = []
        for r in range(args.rounds):
            loads.append(C.load()["loadavg_1m"])
            for metric in metrics:
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    samples[name][metric].append(workers[name].time(metric))
            print(
                f"# round {r}: load {loads[-1]} "
                + " ".join(f"{n}={samples[n]['warp_inner'][-1] * 1e3:.1f}" for n in names),
                file=sys.stderr,
                flush=True,
            )
        pools_ = {n: w.info["pools"] for n, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    return samples, loads, pools_


METRICS = ("warp_inner", "leap_inner", "leap_meta_inner", "bare_leap", "leap_meta_step")


def summarise_inner(samples, names):
    medians, ratios = {}, {}
    for name in names:
        medians[name] = {m: round(C.median(v) * 1e3, 3) for m, v in samples[name].items()}
        if name == "default":
            continue
        ratios[name] = {}
        for m, v in samples[name].items():
            per_round = [a / b for a, b in zip(v, samples["default"][m])]
            ratios[name][m] = {
                "median": round(C.median(per_round), 3),
                "of_minima": C.ratio(min(v), min(samples["default"][m])),
                "rounds_faster": sum(r < 1 for r in per_round),
                "rounds": len(per_round),
            }
    return medians, ratios


def summarise_pertask(results):
    table = {}
    for name, out in results.items():
        if "error" in out:
            table[name] = {"error": out["error"]}
            continue
        rows = {}
        for r in out["runs"]:
            rows.setdefault(f"mb{r['meta_batch']}", {})[r["parallel"]] = r
        for modes in rows.values():
            seq = modes.get("sequential", {}).get("per_task_step_ms")
            for r in modes.values():
                if seq and "per_task_step_ms" in r:
                    r["over_sequential_same_child"] = C.ratio(r["per_task_step_ms"], seq)
        table[name] = {
            "rows": rows,
            "pools": out["pools"],
            "loadavg_1m_at_start": out["loadavg_1m_at_start"],
        }
    # every (setting, mode) against sequential under TensorFlow's default threads
    base = table.get("default", {}).get("rows", {})
    for t in table.values():
        for mb, modes in t.get("rows", {}).items():
            seq = base.get(mb, {}).get("sequential", {}).get("per_task_step_ms")
            for r in modes.values():
                if seq and "per_task_step_ms" in r:
                    r["over_default_sequential"] = C.ratio(r["per_task_step_ms"], seq)
    return table


def main():
    p = C.parser(__doc__, "threads")
    p.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS),
        default=None,
        help="thread settings to compare (default: all; quick: a subset)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="round-robin samples of every metric per setting (default 15, quick 7)",
    )
    p.add_argument(
        "--rounds-inner",
        type=int,
        default=None,
        help="per-task part: interleaved samples inside a child (default 5, quick 3)",
    )
    p.add_argument(
        "--calls",
        type=int,
        default=None,
        help="inner steps per sample (default 5; a Leap meta step is one sample)",
    )
    p.add_argument("--inner-steps", type=int, default=10, help="K of the Leap meta step")
    p.add_argument(
        "--pertask", action="store_true", help="also measure per-task cost at --meta-batch sizes"
    )
    p.add_argument("--pertask-only", action="store_true", help="only the per-task part")
    p.add_argument(
        "--pertask-settings", nargs="+", choices=list(SETTINGS), default=list(PERTASK_SETTINGS)
    )
    p.add_argument("--meta-batch", type=int, nargs="+", default=[5, 20])
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--part", default="inner", help=argparse_hidden())
    args = p.parse_args()
    q = args.quick
    args.rounds = args.rounds or (7 if q else 15)
    args.rounds_inner = args.rounds_inner or (3 if q else 5)
    args.calls = args.calls or 5

    if args.child:
        C.setup()
        if args.part == "worker":
            return worker(args.child, args)
        print("RESULT " + json.dumps(child_pertask(args.child, args)), flush=True)
        return

    started = time.time()
    names = args.settings or list(QUICK_SETTINGS if q else SETTINGS)
    if "default" not in names:
        names.insert(0, "default")
    C.setup()
    info = C.machine_info(args.wait_idle)
    result = {
        "benchmark": "threads",
        "quick": q,
        "machine": info,
        "settings": {
            n: {"env": SETTINGS[n][0], "tf_config_inter_intra": SETTINGS[n][1]} for n in names
        },
        "config": {
            "rounds": args.rounds,
            "inner_steps_per_sample": args.calls,
            "leap_meta_step": f"meta-batch 5, K={args.inner_steps}, one train_step per sample",
        },
    }
    if not args.pertask_only:
        samples, loads, pools_ = measure_inner(names, args)
        medians, ratios = summarise_inner(samples, names)
        result.update(
            inner_ms=medians,
            ratios_to_default=ratios,
            pools=pools_,
            loadavg_1m_per_round=loads,
            samples_ms={
                n: {m: [round(t * 1e3, 2) for t in v] for m, v in d.items()}
                for n, d in samples.items()
            },
        )
    if args.pertask or args.pertask_only:
        results = {}
        for name in args.pertask_settings:
            results[name] = run_child(name, "pertask", args)
            print(
                f"# pertask {name}: {json.dumps(results[name])[:600]}", file=sys.stderr, flush=True
            )
        result["pertask"] = summarise_pertask(results)
        result["pertask_note"] = (
            "per-task cost of one inner step of a Leap meta-batch (gpu.py's measure: "
            "_group_step over every group, / meta-batch); modes interleaved inside a child, "
            "settings in separate children one after the other; meta_step_s is one whole "
            f"train_step with K={args.inner_steps}"
        )
    result["note"] = (
        "ratios < 1: faster than TensorFlow's default thread pools (2 inter-op "
        "x 2 intra-op threads on 2 cores); load averages are of the whole "
        "shared machine"
    )
    C.finish("threads", result, args.out, started)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
