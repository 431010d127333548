"""Inner-step throughput of warpkeras on the papers' Omniglot network.

Measures, in one process and interleaved (round-robin samples, medians), the time of one
adaptation step (forward + backward + SGD on the task variables θ, batch of 20 28x28x1
images, 20 classes) of the Warp-Leap Omniglot model (4 blocks of 3x3 conv 64 "same",
2x2 max-pool, batch norm, ReLU, each followed by a `WarpConv2D(kernel_size=3)`; flatten;
Dense(20)):

* ``trainer``: ``MetaTrainer._inner_step`` — what `fit` / `adapt` call once per inner step
  (functional step through `Model.stateless_call`, plus the finite check and accuracy);
* ``bare``: the same step written directly, ``tf.GradientTape`` over the model's task
  variables and ``assign_sub`` (the cost of the meta-machinery is trainer / bare);
* ``keras``: ``model.train_on_batch`` on an identical model whose warp layers are frozen
  (so that it updates the same variables), Keras SGD;

each eager, as a ``tf.function`` and with XLA (``jit_compile=True``). A compiled
2048x2048 float32 matmul is timed in the same rounds, as the reference FLOP rate. FLOPs
of a step are counted by hand (`_common.conv_flops`: 2·H·W·Cin·Cout·9 per conv forward,
x3 for forward + backward) and checked against TensorFlow's graph cost analysis. The
plain (Leap) model without warp layers is timed as well, and one profile of the trainer's
step splits its time into kernels (per op type) and everything else.

Usage::

    python bench/inner_step.py            # ~3 minutes
    python bench/inner_step.py --quick    # ~40 seconds

Prints one JSON object and writes it to ``bench/results/inner_step.json``.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.setup()


def make_bare(model, task_vars, loss_fn, lr, jit):
    import tensorflow as tf

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, task_vars)
        for v, g in zip(task_vars, grads):
            v.assign_sub(lr * g)
        return loss

    if jit is None:
        return step
    return tf.function(step, jit_compile=jit)


def tf_flops(fn, *args):
    """FLOPs of a tf.function's graph by TensorFlow's cost model (float_operation)."""
    import tensorflow as tf

    graph = fn.get_concrete_function(*args).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    try:
        return int(tf.compat.v1.profiler.profile(graph=graph, options=opts).total_float_ops)
    except Exception as err:  # noqa: BLE001 - cost analysis is a cross-check only
        return f"unavailable: {type(err).__name__}"


def onednn_child(rounds, calls):
    """Times the trainer's steps and the matmul in this process (its oneDNN setting)."""
    import json

    import numpy as np
    import tensorflow as tf

    import warpkeras

    rng = np.random.default_rng(0)
    x = rng.random((C.TASK_BATCH,) + C.IMAGE_SHAPE, dtype=np.float32)
    y = rng.integers(0, C.NUM_CLASSES, C.TASK_BATCH).astype(np.int32)
    warp = warpkeras.WarpTrainer(C.omniglot_model(warp=True), C.loss_fn(), mode="offline")
    plain = warpkeras.LeapTrainer(C.omniglot_model(warp=False), C.loss_fn())
    tw, vw, sw = warp._start_values()
    tp, vp, sp = plain._start_values()
    a = tf.random.normal((2048, 2048), seed=1)
    mm = tf.function(lambda a: tf.matmul(a, a))
    res = C.interleave({
        "inner_step": lambda: warp._inner_step(tw, vw, sw, x, y),
        "warp_step_exact": lambda: warp._warp_step(tw, vw, sw, x, y, (x, y)),
        "plain_inner_step": lambda: plain._inner_step(tp, vp, sp, x, y),
        "matmul_2048": lambda: mm(a),
    }, rounds, calls, warmup=2, sync=C.sync_numpy)
    out = {k: v["median_s"] for k, v in res.items()}
    print("RESULT " + json.dumps(out), flush=True)


def onednn_ab(pairs, rounds, calls):
    """Alternates child processes with TF_ENABLE_ONEDNN_OPTS=0 and =1 (it cannot be switched
    inside a process); each child times the steps and the matmul at the same moments."""
    import json
    import subprocess

    out = {"0": [], "1": []}
    for _ in range(pairs):
        for flag in ("0", "1"):
            env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=flag)
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--onednn-child",
                 "--rounds", str(rounds), "--calls", str(calls)],
                env=env, capture_output=True, text=True)
            for line in proc.stdout.splitlines():
                if line.startswith("RESULT "):
                    r = json.loads(line[7:])
                    r["load_1m"] = C.load()["loadavg_1m"]
                    out[flag].append(r)
    summary = {}
    for flag, runs in out.items():
        if not runs:
            continue
        key = "onednn_on" if flag == "1" else "onednn_off"
        summary[key] = {k: round(C.median([r[k] for r in runs]) * 1e3, 2)
                        for k in ("inner_step", "warp_step_exact", "plain_inner_step", "matmul_2048")}
        summary[key]["inner_step_in_matmuls"] = round(
            C.median([r["inner_step"] / r["matmul_2048"] for r in runs]), 4)
        summary[key]["warp_step_exact_in_matmuls"] = round(
            C.median([r["warp_step_exact"] / r["matmul_2048"] for r in runs]), 4)
        summary[key]["plain_inner_step_in_matmuls"] = round(
            C.median([r["plain_inner_step"] / r["matmul_2048"] for r in runs]), 4)
    if "onednn_on" in summary and "onednn_off" in summary:
        on, off = summary["onednn_on"], summary["onednn_off"]
        summary["on_over_off"] = {
            k: C.ratio(on[k], off[k]) for k in
            ("inner_step", "warp_step_exact", "plain_inner_step", "inner_step_in_matmuls",
             "warp_step_exact_in_matmuls", "plain_inner_step_in_matmuls", "matmul_2048")}
    summary["runs"] = out
    summary["note"] = ("ms are medians over child processes run alternately; *_in_matmuls "
                       "divides by the 2048² matmul timed in the same child, which cancels "
                       "most of the load difference between children")
    return summary


def main():
    if "--onednn-child" in sys.argv:
        sys.argv.remove("--onednn-child")
        p = C.parser(__doc__, "inner_step")
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--calls", type=int, default=5)
        a = p.parse_args()
        return onednn_child(a.rounds, a.calls)
    p = C.parser(__doc__, "inner_step")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)")
    p.add_argument("--calls", type=int, default=None, help="calls per sample (default 8, quick 4)")
    p.add_argument("--bn", choices=("exact", "keras"), default="exact",
                   help="batch-norm layer (default: warpkeras ExactBatchNormalization)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager variants")
    p.add_argument("--no-profile", action="store_true", help="skip the tf.profiler breakdown")
    p.add_argument("--onednn", type=int, default=0, metavar="PAIRS",
                   help="also compare TF_ENABLE_ONEDNN_OPTS=0 vs 1 over PAIRS alternating "
                        "child processes (~40 s per pair)")
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    calls = args.calls or (4 if args.quick else 8)
    started = time.time()

    import keras
    import numpy as np
    import tensorflow as tf

    import warpkeras

    info = C.machine_info()
    lr = 0.1
    loss = C.loss_fn()
    rng = np.random.default_rng(args.seed)
    x = rng.random((C.TASK_BATCH,) + C.IMAGE_SHAPE, dtype=np.float32)
    y = rng.integers(0, C.NUM_CLASSES, C.TASK_BATCH).astype(np.int32)

    def trainer_for(model, jit):
        cls = warpkeras.WarpTrainer if any(
            isinstance(l, warpkeras.layers.WarpConv2D) for l in model.layers) else warpkeras.LeapTrainer
        kw = {"mode": "offline"} if cls is warpkeras.WarpTrainer else {}
        return cls(model, C.loss_fn(), inner_learning_rate=lr, inner_steps=100, jit_compile=jit,
                   **kw)

    variants, notes = {}, {}
    for warp in (True, False):
        tag = "" if warp else "plain_"
        # trainer: functional step at explicit θ (as `adapt` / `fit` call it, numpy batch)
        for jit in (False, True):
            tr = trainer_for(C.omniglot_model(warp=warp, bn=args.bn, seed=args.seed), jit)
            theta, vel, state = tr._start_values()
            name = f"{tag}trainer_" + ("xla" if jit else "function")
            variants[name] = (lambda tr=tr, t=theta, v=vel, s=state:
                              tr._inner_step(t, v, s, x, y))
            if not jit and not args.no_eager and warp:
                variants[f"{tag}trainer_eager"] = (
                    lambda tr=tr, t=theta, v=vel, s=state:
                    tr._inner_step.python_function(t, v, s, x, y))
            if not jit and warp and hasattr(tr, "_group_inner_step"):
                # what `fit` calls in the sequential executor: the step over a group of one
                # task stacked on a leading axis
                gt, gv, gs = tr._stacked_start(1)
                gx, gy = tf.constant(x[None]), tf.constant(y[None])
                variants["trainer_group_function"] = (
                    lambda tr=tr, t=gt, v=gv, s=gs: tr._group_inner_step(t, v, s, gx, gy))
            if not jit:
                if warp:
                    main_trainer, main_args = tr, (theta, vel, state)
                else:
                    plain_trainer, plain_args = tr, (theta, vel, state)
        # bare GradientTape step on the model's task variables
        for jit, label in ((False, "function"), (True, "xla")) + (
                ((None, "eager"),) if warp and not args.no_eager else ()):
            model = C.omniglot_model(warp=warp, bn=args.bn, seed=args.seed)
            part = warpkeras.partition(model)
            fn = make_bare(model, part.task_variables, loss, lr, jit)
            variants[f"{tag}bare_{label}"] = lambda fn=fn: fn(x, y)
            if jit is False and warp:
                bare_fn = fn
        # Keras train_on_batch (warp layers frozen so that the same variables are trained)
        if warp:
            for jit, label in ((False, "function"), (True, "xla"), ("auto", "auto")):
                model = C.omniglot_model(warp=warp, bn=args.bn, seed=args.seed)
                for layer in model.layers:
                    if isinstance(layer, warpkeras.layers.WarpConv2D):
                        layer.trainable = False
                model.compile(optimizer=keras.optimizers.SGD(lr), loss=C.loss_fn(), jit_compile=jit)
                variants[f"keras_train_on_batch_{label}"] = (
                    lambda m=model: m.train_on_batch(x, y))
                if jit == "auto":
                    model.train_on_batch(x, y)
                    notes["keras_jit_compile_auto_resolved_to"] = bool(model.jit_compile)
            if not args.no_eager:
                model = C.omniglot_model(warp=warp, bn=args.bn, seed=args.seed)
                for layer in model.layers:
                    if isinstance(layer, warpkeras.layers.WarpConv2D):
                        layer.trainable = False
                model.compile(optimizer=keras.optimizers.SGD(lr), loss=C.loss_fn(),
                              run_eagerly=True)
                variants["keras_train_on_batch_eager"] = lambda m=model: m.train_on_batch(x, y)

    a = tf.random.normal((2048, 2048), seed=1)
    b = tf.random.normal((2048, 2048), seed=2)
    matmul = tf.function(lambda a, b: tf.matmul(a, b))
    variants["matmul_2048"] = lambda: matmul(a, b)

    # eager variants are ~3-10x slower: fewer calls for them keeps the run short
    timings = {}
    fast = {k: v for k, v in variants.items() if "eager" not in k}
    slow = {k: v for k, v in variants.items() if "eager" in k}
    timings.update(C.interleave(fast, rounds, calls, warmup=3, sync=C.sync_numpy))
    if slow:
        timings.update(C.interleave(slow, max(3, rounds // 3), max(2, calls // 2), warmup=1,
                                    sync=C.sync_numpy))
        # the eager rounds ran at another time (another load): re-time the two references
        ref = C.interleave({k: variants[k] for k in ("trainer_function", "bare_function")},
                           max(3, rounds // 3), calls, warmup=1, sync=C.sync_numpy)
        for k in slow:
            base = "bare_function" if k.startswith("bare") else "trainer_function"
            timings[k]["x_" + base + "_same_rounds"] = C.ratio(
                timings[k]["median_s"], ref[base]["median_s"])

    flops = C.conv_flops(warp=True)
    flops_plain = C.conv_flops(warp=False)
    flops["tf_cost_analysis_trainer_step"] = tf_flops(main_trainer._inner_step, *main_args, x, y)
    flops["tf_cost_analysis_bare_step"] = tf_flops(bare_fn, x, y)
    flops["needed"] = (flops["forward"] * 2 - C.TASK_BATCH * 2 * 28 * 28 * 64 * 9
                       + flops["forward_task_layers"])
    flops["needed_note"] = ("forward + input gradients (none for the first conv) + filter "
                            "gradients of the task layers only (the warp kernels get none)")

    mm_s = timings["matmul_2048"]["median_s"]
    mm_gflops = 2 * 2048**3 / mm_s / 1e9
    peak = info["fma_peak_from_flags"]["gflops"] if info["fma_peak_from_flags"] else None

    def rate(name, n_flops):
        s = timings[name]["median_s"]
        g = n_flops / s / 1e9
        return {"ms": round(s * 1e3, 2), "gflops": round(g, 1),
                "of_matmul_rate": C.ratio(g, mm_gflops),
                "of_brief_peak_532": C.ratio(g, C.BRIEF_PEAK_GFLOPS),
                "of_peak_from_flags": C.ratio(g, peak) if peak else None}

    ms = {k: round(v["median_s"] * 1e3, 2) for k, v in timings.items()}
    t = lambda k: timings[k]["median_s"]  # noqa: E731
    ratios = {
        "trainer_over_bare_function": C.ratio(t("trainer_function"), t("bare_function")),
        "trainer_over_keras_train_on_batch": C.ratio(t("trainer_function"),
                                                     t("keras_train_on_batch_function")),
        "keras_train_on_batch_over_bare": C.ratio(t("keras_train_on_batch_function"),
                                                  t("bare_function")),
        "trainer_xla_over_function": C.ratio(t("trainer_xla"), t("trainer_function")),
        "bare_xla_over_function": C.ratio(t("bare_xla"), t("bare_function")),
        "plain_trainer_over_plain_bare": C.ratio(t("plain_trainer_function"),
                                                 t("plain_bare_function")),
        "warp_model_over_plain_model_trainer": C.ratio(t("trainer_function"),
                                                       t("plain_trainer_function")),
    }
    if "trainer_eager" in timings:
        ratios["trainer_eager_over_function"] = timings["trainer_eager"]["x_trainer_function_same_rounds"]
        ratios["bare_eager_over_function"] = timings["bare_eager"]["x_bare_function_same_rounds"]
        ratios["keras_eager_over_trainer_function"] = timings["keras_train_on_batch_eager"][
            "x_trainer_function_same_rounds"]

    flop_rates = {
        "trainer_function": rate("trainer_function", flops["train_step_3x_forward"]),
        "bare_function": rate("bare_function", flops["train_step_3x_forward"]),
        "trainer_xla": rate("trainer_xla", flops["train_step_3x_forward"]),
        "plain_trainer_function": rate("plain_trainer_function",
                                       flops_plain["train_step_3x_forward"]),
        "trainer_function_needed_flops": rate("trainer_function", flops["needed"]),
        "matmul_2048": {"gflops": round(mm_gflops, 1),
                        "of_brief_peak_532": C.ratio(mm_gflops, C.BRIEF_PEAK_GFLOPS),
                        "of_peak_from_flags": C.ratio(mm_gflops, peak) if peak else None},
    }

    profile = None
    if not args.no_profile:
        profile = {
            "trainer_function": C.profile_ops(
                lambda: main_trainer._inner_step(*main_args, x, y), 6 if args.quick else 12,
                "/tmp/warpkeras_bench_profile", sync=C.sync_numpy),
        }
        # dispatch cost of a compiled function with the same inputs and outputs but no work
        null = tf.function(lambda t, v, s, x, y: (t, v, s, tf.constant(0.0)))
        profile["null_function_same_signature_ms"] = round(1e3 * C.interleave(
            {"null": lambda: null(*main_args, x, y)}, 3, 50, sync=C.sync_numpy)["null"]["median_s"], 3)

    targets = {
        "trainer_le_1.1x_bare_compiled": {
            "value": ratios["trainer_over_bare_function"],
            "met": ratios["trainer_over_bare_function"] <= 1.1},
        "trainer_faster_than_train_on_batch": {
            "value": ratios["trainer_over_keras_train_on_batch"],
            "met": ratios["trainer_over_keras_train_on_batch"] < 1.0},
        "ge_70pct_of_matmul_rate": {
            "value": flop_rates["trainer_function"]["of_matmul_rate"],
            "met": flop_rates["trainer_function"]["of_matmul_rate"] >= 0.7},
        "ge_50pct_of_fma_peak_532": {
            "value": flop_rates["trainer_function"]["of_brief_peak_532"],
            "met": flop_rates["trainer_function"]["of_brief_peak_532"] >= 0.5},
        "ge_50pct_of_fma_peak_from_flags": {
            "value": flop_rates["trainer_function"]["of_peak_from_flags"],
            "met": (flop_rates["trainer_function"]["of_peak_from_flags"] or 0) >= 0.5},
    }

    onednn = onednn_ab(args.onednn, 5, 4) if args.onednn else None

    result = {
        "benchmark": "inner_step",
        "quick": args.quick,
        "machine": info,
        "config": {"model": "omniglot 4x[conv3x3(64) same, maxpool2, BN, ReLU] + WarpConv2D(3) "
                            "after each block, flatten, Dense(20)",
                   "batch_norm": args.bn, "batch": C.TASK_BATCH, "image": C.IMAGE_SHAPE,
                   "inner_learning_rate": lr, "rounds": rounds, "calls_per_sample": calls,
                   "statistic": "median over interleaved rounds of the mean time per call"},
        "ms_per_step": ms,
        "steps_per_s": {k: round(1 / v["median_s"], 2) for k, v in timings.items()
                        if k != "matmul_2048"},
        "ratios": ratios,
        "flops_per_step": {"warp_model": flops, "plain_model": {
            k: v for k, v in flops_plain.items() if k != "rule"}},
        "flop_rates": flop_rates,
        "targets": targets,
        "profile": profile,
        "onednn_ab": onednn,
        "notes": notes,
        "samples": {k: v["samples_s"] for k, v in timings.items()},
    }
    C.finish("inner_step", result, args.out, started)


if __name__ == "__main__":
    main()
