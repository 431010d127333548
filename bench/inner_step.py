"""Inner-step throughput of warpkeras on the papers' Omniglot network.

Measures, in one process and interleaved (round-robin samples, medians), the time of one
adaptation step (forward + backward + SGD on the task variables θ, batch of 20 28x28x1
images, 20 classes) of the Warp-Leap Omniglot model (4 blocks of 3x3 conv 64 "same",
2x2 max-pool, batch norm, ReLU, each followed by a `WarpConv2D(kernel_size=3)`; flatten;
Dense(20)):

* ``trainer``: one inner step of one task with φ frozen, the engine's compiled step
  (``MetaTrainer._plain_step``, called by `adapt` / `evaluate` / fine-tuning; older
  engines: ``_inner_step``): functional step through `Model.stateless_call`, plus the
  finite check, accuracy and step length;
* ``trainer_meta_step_leap``: one adaptation step as Warp-Leap meta-training runs it
  (``_group_step`` on a group of one task; the Leap increment is computed in the same
  call); ``trainer_meta_step_noinit``: the same without an initialisation objective;
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

    python bench/inner_step.py               # ~3 minutes on an idle machine
    python bench/inner_step.py --quick       # < 1 minute (no XLA, fewer rounds)
    python bench/inner_step.py --onednn 3    # + TF_ENABLE_ONEDNN_OPTS=0 vs 1 (3 pairs)
    python bench/inner_step.py --quick --precision both   # + bfloat16 variants, same rounds

``--precision bfloat16`` builds every model under Keras's ``mixed_bfloat16`` policy
(`warpkeras.precision.compute_policy`: float32 with a warning where the hardware has no
bfloat16); ``--precision both`` adds ``*_bf16`` variants of the trainer, meta, bare and
plain steps and of the matmul to the same interleaved rounds and reports bf16 / fp32 ratios.

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


def cpu_time_ratios(pairs, rounds, calls, sync):
    """bf16 / fp32 ratios of the process CPU time per call (all threads), rounds alternating.

    On a machine shared with other jobs, wall time per call varies several-fold with their
    load, while the CPU time a call consumes barely moves (within a few % between rounds):
    it is the steadier measure of the work each precision costs. (TensorFlow's threads do
    not spin long when idle, so waiting adds little CPU time.)

    Args:
        pairs: ``{name: (fp32_fn, bf16_fn)}``, zero-argument callables.
        rounds, calls: rounds, and calls per sample.
        sync: called on a call's result to wait for it.

    Returns:
        ``{name: {"fp32_cpu_ms": median, "bf16_cpu_ms": median, "bf16_over_fp32": median of
        the per-round ratios}}``.
    """
    samples = {k: ([], []) for k in pairs}
    for _ in range(rounds):
        for name, fns in pairs.items():
            for fn, out in zip(fns, samples[name]):
                start = time.process_time()
                for _ in range(calls):
                    result = fn()
                sync(result)
                out.append((time.process_time() - start) / calls)
    return {
        name: {
            "fp32_cpu_ms": round(1e3 * C.median(a), 2),
            "bf16_cpu_ms": round(1e3 * C.median(b), 2),
            "bf16_over_fp32": C.ratio(C.median([y / x for x, y in zip(a, b)]), 1.0),
        }
        for name, (a, b) in samples.items()
    }


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
    warp = C.Engine(
        warpkeras.WarpTrainer(C.omniglot_model(warp=True), C.loss_fn(), mode="offline"), x, y
    )
    plain = C.Engine(warpkeras.LeapTrainer(C.omniglot_model(warp=False), C.loss_fn()), x, y)
    a = tf.random.normal((2048, 2048), seed=1)
    mm = tf.function(lambda a: tf.matmul(a, a))
    an = np.random.default_rng(1).random((1024, 1024), dtype=np.float32)
    res = C.interleave(
        {
            "inner_step": warp.inner,
            "warp_step_exact": warp.warp_point,
            "plain_inner_step": plain.inner,
            "matmul_2048": lambda: mm(a),
            # single-threaded numpy BLAS (see onednn_ab): the load reference
            "numpy_matmul_1024": lambda: an @ an,
        },
        rounds,
        calls,
        warmup=2,
        sync=C.sync_numpy,
    )
    out = {k: v["median_s"] for k, v in res.items()}
    out.update({k + "_min": v["min_s"] for k, v in res.items()})
    print("RESULT " + json.dumps(out), flush=True)


def onednn_ab(pairs, rounds, calls):
    """Alternates child processes with TF_ENABLE_ONEDNN_OPTS=0 and =1 (it cannot be switched
    inside a process); each child times the steps and the matmul at the same moments."""
    import json
    import subprocess

    out = {"0": [], "1": []}
    for _ in range(pairs):
        for flag in ("0", "1"):
            # numpy's BLAS on one thread: a load reference that oneDNN does not touch and
            # that does not spin threads against TensorFlow's
            env = dict(
                os.environ,
                TF_ENABLE_ONEDNN_OPTS=flag,
                OPENBLAS_NUM_THREADS="1",
                OMP_NUM_THREADS="1",
                MKL_NUM_THREADS="1",
            )
            proc = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--onednn-child",
                    "--rounds",
                    str(rounds),
                    "--calls",
                    str(calls),
                ],
                env=env,
                capture_output=True,
                text=True,
            )
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
        summary[key] = {
            k: round(C.median([r[k] for r in runs]) * 1e3, 2)
            for k in (
                "inner_step",
                "warp_step_exact",
                "plain_inner_step",
                "matmul_2048",
                "numpy_matmul_1024",
            )
        }
        for k in ("inner_step", "warp_step_exact", "plain_inner_step", "matmul_2048"):
            summary[key][k + "_in_numpy_matmuls"] = round(
                C.median([r[k] / r["numpy_matmul_1024"] for r in runs]), 4
            )
            if all(k + "_min" in r for r in runs):
                summary[key][k + "_fastest_ms"] = round(min(r[k + "_min"] for r in runs) * 1e3, 2)
    if "onednn_on" in summary and "onednn_off" in summary:
        on, off = summary["onednn_on"], summary["onednn_off"]
        summary["on_over_off"] = {k: C.ratio(on[k], off[k]) for k in on if k in off}
    summary["runs"] = out
    summary["note"] = (
        "ms are medians over child processes run alternately; "
        "*_in_numpy_matmuls divides by a single-threaded 1024² numpy (OpenBLAS) "
        "matmul timed in the same child, which oneDNN does not touch: it "
        "cancels part of the load difference between children"
    )
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
    p.add_argument("--no-eager", action="store_true", help="skip the eager variants")
    p.add_argument("--no-xla", action="store_true", help="skip the jit_compile=True variants")
    p.add_argument("--no-profile", action="store_true", help="skip the tf.profiler breakdown")
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "both"),
        default="float32",
        help="layer compute precision; both: bfloat16 variants in the same rounds",
    )
    p.add_argument(
        "--onednn",
        type=int,
        default=0,
        metavar="PAIRS",
        help="also compare TF_ENABLE_ONEDNN_OPTS=0 vs 1 over PAIRS alternating "
        "child processes (~40 s per pair on an idle machine)",
    )
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    calls = args.calls or (3 if args.quick else 6)
    eager = not args.no_eager
    xla = not args.no_xla and not args.quick
    started = time.time()

    import keras
    import numpy as np
    import tensorflow as tf

    import warpkeras
    from warpkeras import precision as wprecision

    info = C.machine_info(args.wait_idle)
    bf16_policy = (
        wprecision.compute_policy("bfloat16") if args.precision in ("bfloat16", "both") else None
    )
    if args.precision == "bfloat16":
        keras.config.set_dtype_policy(bf16_policy)
    lr = 0.1
    loss = C.loss_fn()
    rng = np.random.default_rng(args.seed)
    x = rng.random((C.TASK_BATCH,) + C.IMAGE_SHAPE, dtype=np.float32)
    y = rng.integers(0, C.NUM_CLASSES, C.TASK_BATCH).astype(np.int32)

    def engine(warp, jit=False, init="leap"):
        model = C.omniglot_model(warp=warp, bn=args.bn, seed=args.seed)
        kw = dict(inner_learning_rate=lr, inner_steps=100, jit_compile=jit, seed=args.seed)
        if warp:
            tr = warpkeras.WarpTrainer(
                model, C.loss_fn(), mode="offline", init_objective=init, **kw
            )
        elif init == "leap":
            tr = warpkeras.LeapTrainer(model, C.loss_fn(), **kw)
        else:
            tr = warpkeras.NoMetaTrainer(model, C.loss_fn(), **kw)
        return C.Engine(tr, x, y)

    def frozen_warp_model():
        model = C.omniglot_model(warp=True, bn=args.bn, seed=args.seed)
        for layer in model.layers:
            if isinstance(layer, warpkeras.layers.WarpConv2D):
                layer.trainable = False
        return model

    variants, notes = {}, {}
    # -- warpkeras: the adaptation step (φ frozen) and the meta-training step ------------
    main = engine(True)
    notes["engine_functions"] = main.names
    variants["trainer_function"] = main.inner
    if main.meta_inner is not None:
        variants["trainer_meta_step_leap_function"] = main.meta_inner
        variants["trainer_meta_step_noinit_function"] = engine(True, init=None).meta_inner
    if eager:
        variants["trainer_eager"] = lambda: main.inner_function.python_function(*main.inner_args)
    if xla:
        jitted = engine(True, jit=True)
        variants["trainer_xla"] = jitted.inner
        if jitted.meta_inner is not None:
            variants["trainer_meta_step_leap_xla"] = jitted.meta_inner
    plain = engine(False)
    variants["plain_trainer_function"] = plain.inner
    if plain.meta_inner is not None:
        variants["plain_trainer_meta_step_leap_function"] = plain.meta_inner

    # -- the same step written directly ----------------------------------------------------
    bare_modes = (
        [(False, "function")]
        + ([(True, "xla")] if xla else [])
        + ([(None, "eager")] if eager else [])
    )
    for jit, label in bare_modes:
        model = C.omniglot_model(warp=True, bn=args.bn, seed=args.seed)
        fn = make_bare(model, warpkeras.partition(model).task_variables, loss, lr, jit)
        variants[f"bare_{label}"] = lambda fn=fn: fn(x, y)
        if label == "function":
            bare_fn = fn
    model = C.omniglot_model(warp=False, bn=args.bn, seed=args.seed)
    plain_bare = make_bare(model, model.trainable_variables, loss, lr, False)
    variants["plain_bare_function"] = lambda: plain_bare(x, y)

    # -- Keras train_on_batch (warp layers frozen: the same variables are trained) -------
    keras_modes = [(False, "function"), ("auto", "auto")] + ([(True, "xla")] if xla else [])
    for jit, label in keras_modes:
        model = frozen_warp_model()
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=C.loss_fn(), jit_compile=jit)
        variants[f"keras_train_on_batch_{label}"] = lambda m=model: m.train_on_batch(x, y)
        if jit == "auto":
            model.train_on_batch(x, y)
            notes["keras_jit_compile_auto_resolved_to"] = bool(model.jit_compile)
    if eager:
        model = frozen_warp_model()
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=C.loss_fn(), run_eagerly=True)
        variants["keras_train_on_batch_eager"] = lambda m=model: m.train_on_batch(x, y)

    a = tf.random.normal((2048, 2048), seed=1)
    b = tf.random.normal((2048, 2048), seed=2)
    matmul = tf.function(lambda a, b: tf.matmul(a, b))
    variants["matmul_2048"] = lambda: matmul(a, b)
    bf16_pairs = {}
    if args.precision == "both":
        # the same steps on models built under mixed_bfloat16, in the same rounds
        with wprecision.policy_scope(bf16_policy):
            e16, plain16 = engine(True), engine(False)
            model16 = C.omniglot_model(warp=True, bn=args.bn, seed=args.seed)
        bare16 = make_bare(model16, warpkeras.partition(model16).task_variables, loss, lr, False)
        bf16_pairs = {
            "trainer_function": e16.inner,
            "plain_trainer_function": plain16.inner,
            "bare_function": lambda: bare16(x, y),
        }
        if e16.meta_inner is not None:
            bf16_pairs["trainer_meta_step_leap_function"] = e16.meta_inner
        if plain16.meta_inner is not None:
            bf16_pairs["plain_trainer_meta_step_leap_function"] = plain16.meta_inner
        a16, b16 = tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16)
        bf16_pairs["matmul_2048"] = lambda: matmul(a16, b16)
        variants.update({k + "_bf16": v for k, v in bf16_pairs.items()})

    # eager variants are several times slower: fewer calls for them keeps the run short;
    # they are compared with the compiled references re-timed in their own rounds
    timings = {}
    fast = {k: v for k, v in variants.items() if "eager" not in k}
    slow = {k: v for k, v in variants.items() if "eager" in k}
    timings.update(C.interleave(fast, rounds, calls, warmup=3, sync=C.sync_numpy))
    if slow:
        refs = ("trainer_function", "bare_function", "keras_train_on_batch_function")
        both = dict(slow, **{"ref_" + k: variants[k] for k in refs})
        res = C.interleave(
            both, max(3, rounds // 3), max(2, calls // 2), warmup=1, sync=C.sync_numpy
        )
        for k in slow:
            timings[k] = res[k]
            base = {
                "trainer_eager": "trainer_function",
                "bare_eager": "bare_function",
                "keras_train_on_batch_eager": "keras_train_on_batch_function",
            }[k]
            timings[k]["over_" + base + "_same_rounds"] = C.ratio(
                res[k]["median_s"], res["ref_" + base]["median_s"]
            )

    flops = C.conv_flops(warp=True)
    flops_plain = C.conv_flops(warp=False)
    flops["tf_cost_analysis_trainer_step"] = tf_flops(main.inner_function, *main.inner_args)
    flops["tf_cost_analysis_bare_step"] = tf_flops(bare_fn, x, y)
    flops["needed"] = (
        flops["forward"] * 2 - C.TASK_BATCH * 2 * 28 * 28 * 64 * 9 + flops["forward_task_layers"]
    )
    flops["needed_note"] = (
        "forward + input gradients (none for the first conv) + filter "
        "gradients of the task layers only (the warp kernels get none)"
    )

    mm_s = timings["matmul_2048"]["median_s"]
    mm_gflops = 2 * 2048**3 / mm_s / 1e9
    peak = info["fma_peak_from_flags"]["gflops"] if info["fma_peak_from_flags"] else None

    def rate(name, n_flops):
        s = timings[name]["median_s"]
        g = n_flops / s / 1e9
        return {
            "ms": round(s * 1e3, 2),
            "gflops": round(g, 1),
            "of_matmul_rate": C.ratio(g, mm_gflops),
            "of_brief_peak_532": C.ratio(g, C.REFERENCE_PEAK_GFLOPS),
            "of_peak_from_flags": C.ratio(g, peak) if peak else None,
        }

    t = lambda k: timings[k]["median_s"]  # noqa: E731
    ratios = {
        "trainer_over_bare_function": C.ratio(t("trainer_function"), t("bare_function")),
        "trainer_over_keras_train_on_batch": C.ratio(
            t("trainer_function"), t("keras_train_on_batch_function")
        ),
        "keras_train_on_batch_over_bare": C.ratio(
            t("keras_train_on_batch_function"), t("bare_function")
        ),
        "plain_trainer_over_plain_bare": C.ratio(
            t("plain_trainer_function"), t("plain_bare_function")
        ),
        "warp_model_over_plain_model_trainer": C.ratio(
            t("trainer_function"), t("plain_trainer_function")
        ),
    }
    if "trainer_meta_step_leap_function" in timings:
        ratios["meta_step_leap_over_bare"] = C.ratio(
            t("trainer_meta_step_leap_function"), t("bare_function")
        )
        ratios["meta_step_noinit_over_bare"] = C.ratio(
            t("trainer_meta_step_noinit_function"), t("bare_function")
        )
        ratios["meta_step_leap_over_keras_train_on_batch"] = C.ratio(
            t("trainer_meta_step_leap_function"), t("keras_train_on_batch_function")
        )
        ratios["plain_meta_step_leap_over_plain_bare"] = C.ratio(
            t("plain_trainer_meta_step_leap_function"), t("plain_bare_function")
        )
    if xla:
        ratios["trainer_xla_over_function"] = C.ratio(t("trainer_xla"), t("trainer_function"))
        ratios["bare_xla_over_function"] = C.ratio(t("bare_xla"), t("bare_function"))
        ratios["keras_xla_over_function"] = C.ratio(
            t("keras_train_on_batch_xla"), t("keras_train_on_batch_function")
        )
    ratios_min = C.min_ratios(
        timings,
        {
            "trainer_over_bare_function": ("trainer_function", "bare_function"),
            "trainer_over_keras_train_on_batch": (
                "trainer_function",
                "keras_train_on_batch_function",
            ),
            "keras_train_on_batch_over_bare": ("keras_train_on_batch_function", "bare_function"),
            "plain_trainer_over_plain_bare": ("plain_trainer_function", "plain_bare_function"),
            "meta_step_leap_over_bare": ("trainer_meta_step_leap_function", "bare_function"),
            "meta_step_noinit_over_bare": ("trainer_meta_step_noinit_function", "bare_function"),
            "meta_step_leap_over_keras_train_on_batch": (
                "trainer_meta_step_leap_function",
                "keras_train_on_batch_function",
            ),
            "plain_meta_step_leap_over_plain_bare": (
                "plain_trainer_meta_step_leap_function",
                "plain_bare_function",
            ),
            "trainer_xla_over_function": ("trainer_xla", "trainer_function"),
            "bare_xla_over_function": ("bare_xla", "bare_function"),
        },
    )
    for k in slow:
        ratios[k + "_over_function"] = [
            v for kk, v in timings[k].items() if kk.startswith("over_")
        ][0]

    flop_rates = {
        "trainer_function": rate("trainer_function", flops["train_step_3x_forward"]),
        "bare_function": rate("bare_function", flops["train_step_3x_forward"]),
        "plain_trainer_function": rate(
            "plain_trainer_function", flops_plain["train_step_3x_forward"]
        ),
        "trainer_function_needed_flops": rate("trainer_function", flops["needed"]),
        "matmul_2048": {
            "gflops": round(mm_gflops, 1),
            "of_brief_peak_532": C.ratio(mm_gflops, C.REFERENCE_PEAK_GFLOPS),
            "of_peak_from_flags": C.ratio(mm_gflops, peak) if peak else None,
        },
    }
    if xla:
        flop_rates["trainer_xla"] = rate("trainer_xla", flops["train_step_3x_forward"])
    best = lambda k, n: n / timings[k]["min_s"] / 1e9  # noqa: E731
    mm_best = best("matmul_2048", 2 * 2048**3)
    flop_rates["from_fastest_samples"] = {
        k: {
            "gflops": round(best(k, n), 1),
            "of_matmul_rate": C.ratio(best(k, n), mm_best),
            "of_brief_peak_532": C.ratio(best(k, n), C.REFERENCE_PEAK_GFLOPS),
            "of_peak_from_flags": C.ratio(best(k, n), peak) if peak else None,
        }
        for k, n in (
            ("trainer_function", flops["train_step_3x_forward"]),
            ("bare_function", flops["train_step_3x_forward"]),
            ("trainer_meta_step_leap_function", flops["train_step_3x_forward"]),
            ("plain_trainer_function", flops_plain["train_step_3x_forward"]),
            ("matmul_2048", 2 * 2048**3),
        )
        if k in timings
    }

    profile = None
    if not args.no_profile:
        profile = {
            "trainer_function": C.profile_ops(
                main.inner,
                6 if args.quick else 12,
                "/tmp/warpkeras_bench_profile",
                sync=C.sync_numpy,
            )
        }
        if main.meta_inner is not None:
            profile["trainer_meta_step_leap_function"] = C.profile_ops(
                main.meta_inner,
                6 if args.quick else 12,
                "/tmp/warpkeras_bench_profile",
                sync=C.sync_numpy,
            )
        # dispatch cost of a compiled function with the same inputs and outputs, no work
        null = tf.function(lambda t, v, s, x, y: (t, v, s, tf.constant(0.0)))
        null_args = main.inner_args
        profile["null_function_same_signature_ms"] = round(
            1e3
            * C.interleave({"null": lambda: null(*null_args)}, 3, 50, sync=C.sync_numpy)["null"][
                "median_s"
            ],
            3,
        )

    r_bare = ratios["trainer_over_bare_function"]
    r_keras = ratios["trainer_over_keras_train_on_batch"]
    f = flop_rates["trainer_function"]
    targets = {
        "trainer_le_1.1x_bare_compiled": {"value": r_bare, "met": r_bare <= 1.1},
        "trainer_faster_than_train_on_batch": {"value": r_keras, "met": r_keras < 1.0},
        "ge_70pct_of_matmul_rate": {
            "value": f["of_matmul_rate"],
            "met": f["of_matmul_rate"] >= 0.7,
        },
        "ge_50pct_of_fma_peak_532": {
            "value": f["of_brief_peak_532"],
            "met": f["of_brief_peak_532"] >= 0.5,
        },
        "ge_50pct_of_fma_peak_from_flags": {
            "value": f["of_peak_from_flags"],
            "met": (f["of_peak_from_flags"] or 0) >= 0.5,
        },
    }
    if "meta_step_leap_over_bare" in ratios:
        targets["meta_step_leap_le_1.1x_bare_compiled"] = {
            "value": ratios["meta_step_leap_over_bare"],
            "met": ratios["meta_step_leap_over_bare"] <= 1.1,
        }

    onednn = onednn_ab(args.onednn, 5, 4) if args.onednn else None
    precision = {
        "requested": args.precision,
        "bf16_policy": bf16_policy,
        "bf16_supported": wprecision.bf16_supported(),
        "cpu_bf16_flags": list(wprecision.cpu_bf16_flags()),
    }
    if bf16_pairs:
        precision["bf16_over_fp32"] = {k: C.ratio(t(k + "_bf16"), t(k)) for k in bf16_pairs}
        precision["bf16_over_fp32_from_fastest_samples"] = C.min_ratios(
            timings, {k: (k + "_bf16", k) for k in bf16_pairs}
        )
        # each round times both precisions within seconds: the ratio within a round is the
        # one least moved by other jobs' load
        precision["cpu_time"] = cpu_time_ratios(
            {k: (variants[k], variants[k + "_bf16"]) for k in bf16_pairs},
            max(rounds, 8),
            calls,
            C.sync_numpy,
        )
        precision["bf16_over_fp32_median_of_round_ratios"] = {
            k: C.ratio(
                C.median(
                    [
                        b / a
                        for a, b in zip(timings[k]["samples_s"], timings[k + "_bf16"]["samples_s"])
                    ]
                ),
                1.0,
            )
            for k in bf16_pairs
        }

    result = {
        "benchmark": "inner_step",
        "quick": args.quick,
        "machine": info,
        "config": {
            "model": "omniglot 4x[conv3x3(64) same, maxpool2, BN, ReLU] + WarpConv2D(3) "
            "after each block, flatten, Dense(20)",
            "batch_norm": args.bn,
            "batch": C.TASK_BATCH,
            "image": C.IMAGE_SHAPE,
            "inner_learning_rate": lr,
            "rounds": rounds,
            "calls_per_sample": calls,
            "statistic": "median over interleaved rounds of the mean time per call",
            "names": {
                "trainer_*": "one inner step of one task with φ frozen "
                "(engine function in notes.engine_functions.inner)",
                "trainer_meta_step_leap_*": "one adaptation step as Warp-Leap "
                "meta-training runs it (group of one task, "
                "Leap increment in the same call)",
                "trainer_meta_step_noinit_*": "the same without an init objective",
                "bare_*": "tf.GradientTape over the task variables + assign_sub",
                "keras_train_on_batch_*": "model.train_on_batch, warp layers frozen",
                "plain_*": "the Leap model (no warp layers)",
            },
        },
        "ms_per_step": {k: round(v["median_s"] * 1e3, 2) for k, v in timings.items()},
        "steps_per_s": {
            k: round(1 / v["median_s"], 2) for k, v in timings.items() if k != "matmul_2048"
        },
        "ratios": ratios,
        "ratios_from_fastest_samples": ratios_min,
        "flops_per_step": {
            "warp_model": flops,
            "plain_model": {k: v for k, v in flops_plain.items() if k != "rule"},
        },
        "flop_rates": flop_rates,
        "targets": targets,
        "profile": profile,
        "onednn_ab": onednn,
        "precision": precision,
        "notes": notes,
        "samples": {k: v["samples_s"] for k, v in timings.items()},
    }
    C.finish("inner_step", result, args.out, started)


if __name__ == "__main__":
    main()
