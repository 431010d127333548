"""Time to the first meta step of a fresh trainer, against Keras's own first `fit` step.

Users meet the first meta step before any steady one. For each trainer, each executor
(``parallel=``), each number of inner steps K and each meta-batch size, one child process
(so no trace is shared with an earlier cell) does, in order:

1. warms up TensorFlow's runtime with an unrelated one-step `model.fit` (not timed);
2. times Keras's first `model.fit` step on the cell's model (compile, trace, one batch of
   the task batch size, `keras.optimizers.SGD`): the reference a user compares with;
3. times ``trainer.fit(tasks, epochs=1 + steady)`` of a fresh trainer, with a callback
   that marks each meta step: the first meta step (from the `fit` call to the end of meta
   step 0, so construction checks, tracing, graph optimisation and execution) and the
   median steady meta step. Meta step 0 is split (`Split`) into *tracing* (Python
   building graphs), *execution* (compiled calls, which on a first call include
   TensorFlow's graph optimisation) and the rest (Python around them);
4. builds a second trainer of the same kind on a new model of the same architecture and
   times its first meta step: what reusing compiled functions across trainers saves;
5. counts TensorFlow's retracing warnings over the whole cell.

Models: ``mlp`` (4 → 32 tanh → `WarpDense` → 1, mean squared error, regression tasks of
100 rows, batch 20) and ``conv`` (4 blocks of 3x3 conv 32 "same", 2x2 max-pool, batch
norm, ReLU, a `WarpConv2D` after each block where the trainer warps; 5-way 28x28 tasks
with 10 images per class, batch 25). Warp layers are left out for trainers that do not
learn a warp (Leap, MAML, Reptile), as a user of those would build the model.

Trainers (``--trainers``): ``leap``, ``warp_leap`` (offline, Algorithm 2 + Leap),
``warp_online`` (Algorithm 1), ``warp_maml`` (online warp + second-order MAML
initialisation), ``maml`` (second order), ``fomaml``, ``reptile``, ``continual``
(Algorithm 3) and ``warpgrad_fit`` (`model.compile(optimizer=warpkeras.WarpGrad(...))`
then `model.fit`, whose first step is the first `fit` step itself).

Usage::

    python bench/first_step.py --quick                 # MLP, K in {5, 50}, meta-batch 4
    python bench/first_step.py                         # the full grid (about an hour)
    python bench/first_step.py --models conv --trainers maml warp_maml --inner-steps 3 15

Prints one JSON object (one record per cell, with the CPU features and load) and writes it
to ``bench/results/first_step.json``. Figures depend on the machine and its load; compare
ratios measured in one run.
"""

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

TRAINERS = (
    "leap",
    "warp_leap",
    "warp_online",
    "warp_maml",
    "maml",
    "fomaml",
    "reptile",
    "continual",
    "warpgrad_fit",
)
WARPED = {"warp_leap", "warp_online", "warp_maml", "continual", "warpgrad_fit"}
EXECUTORS = ("sequential", "unrolled", "vectorized")
MODELS = ("mlp", "conv")


# ----------------------------------------------------------------------------------------
# one cell, in a child process


def build_model(kind, warp, seed):
    import keras

    import warpkeras

    keras.utils.set_random_seed(seed)
    if kind == "mlp":
        layers = [keras.Input((4,)), keras.layers.Dense(32, activation="tanh")]
        if warp:
            layers.append(warpkeras.layers.WarpDense())
        layers.append(keras.layers.Dense(1))
        return keras.Sequential(layers)
    layers = [keras.Input((28, 28, 1))]
    for _ in range(4):
        layers += [
            keras.layers.Conv2D(32, 3, padding="same"),
            keras.layers.MaxPooling2D(2),
            warpkeras.layers.ExactBatchNormalization(),
            keras.layers.ReLU(),
        ]
        if warp:
            layers.append(warpkeras.layers.WarpConv2D(kernel_size=3))
    layers += [keras.layers.Flatten(), keras.layers.Dense(5)]
    return keras.Sequential(layers)


def loss_of(kind):
    import keras

    if kind == "mlp":
        return "mse"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def arrays(kind, rng):
    import numpy as np

    if kind == "mlp":
        w = rng.normal(size=(4, 1))
        x = rng.normal(size=(120, 4)).astype("float32")
        return (x[:100], (x[:100] @ w).astype("float32")), (
            x[100:],
            (x[100:] @ w).astype("float32"),
        )
    x = rng.random((60, 28, 28, 1), dtype=np.float32)
    y = np.repeat(np.arange(5, dtype=np.int32), 12)
    return (x[:50], y[:50]), (x[50:], y[50:])


def batch_size_of(kind):
    return 20 if kind == "mlp" else 25


def tasks_for(kind, n, seed):
    import numpy as np

    import warpkeras

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        train, test = arrays(kind, rng)
        out.append(
            warpkeras.Task(train=train, test=test, batch_size=batch_size_of(kind), name=f"task{i}")
        )
    return out


def make_trainer(name, model, kind, k, meta_batch, executor):
    import keras

    import warpkeras

    common = dict(
        inner_learning_rate=0.05,
        inner_steps=k,
        meta_batch_size=meta_batch,
        meta_optimizer=keras.optimizers.Adam(1e-3),
        seed=0,
    )
    if executor != "default":
        common["parallel"] = executor
    loss = loss_of(kind)
    if name == "leap":
        return warpkeras.LeapTrainer(model, loss, **common)
    if name == "warp_leap":
        return warpkeras.WarpTrainer(model, loss, mode="offline", init_objective="leap", **common)
    if name == "warp_online":
        return warpkeras.WarpTrainer(model, loss, mode="online", init_objective=None, **common)
    if name == "warp_maml":
        return warpkeras.WarpTrainer(model, loss, mode="online", init_objective="maml", **common)
    if name == "maml":
        return warpkeras.MAMLTrainer(model, loss, first_order=False, **common)
    if name == "fomaml":
        return warpkeras.MAMLTrainer(model, loss, first_order=True, **common)
    if name == "reptile":
        return warpkeras.ReptileTrainer(model, loss, **common)
    if name == "continual":
        return warpkeras.WarpTrainer(
            model,
            loss,
            mode="continual",
            init_objective=None,
            meta_interval=max(1, k // 2),
            **common,
        )
    raise ValueError(f"unknown trainer {name!r}")


class Split:
    """Wall time spent tracing and in compiled calls, by wrapping TensorFlow's two entry
    points: `func_graph_from_py_func` (Python building a graph) and
    `ConcreteFunction._call_flat` (running one; a first call includes TensorFlow's graph
    optimisation). Only outermost calls count, so nested traces are not counted twice.
    Private TensorFlow names, for measurement only: a TensorFlow that renamed them gives
    zeros and ``"hooked": False``."""

    def __init__(self):
        self.seconds = {"tracing": 0.0, "execution": 0.0}
        self.active = False
        self.hooked = False
        try:
            from tensorflow.python.eager.polymorphic_function import concrete_function as cf
            from tensorflow.python.framework import func_graph as fg

            self._targets = [
                (fg, "func_graph_from_py_func", "tracing"),
                (cf.ConcreteFunction, "_call_flat", "execution"),
            ]
            for owner, attr, key in self._targets:
                setattr(owner, attr, self._wrap(getattr(owner, attr), key))
            self.hooked = True
        except (ImportError, AttributeError):
            self._targets = []

    def _wrap(self, fn, key):
        depth = [0]

        def wrapped(*args, **kwargs):
            if not self.active or depth[0]:
                depth[0] += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    depth[0] -= 1
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                depth[0] -= 1

        return wrapped

    def report(self):
        return {
            "tracing_s": round(self.seconds["tracing"], 3),
            "execution_s": round(self.seconds["execution"], 3),
            "hooked": self.hooked,
        }


class Marks:
    """A Keras callback recording the wall clock at each epoch's end (one meta step)."""

    def __new__(cls, *args, **kwargs):
        import keras

        class _Marks(keras.callbacks.Callback):
            def __init__(self, split):
                super().__init__()
                self.split = split
                self.ends = []

            def on_epoch_end(self, epoch, logs=None):
                if epoch == 0 and self.split is not None:
                    self.split.active = False
                self.ends.append(time.perf_counter())

        return _Marks(*args, **kwargs)


def keras_first_step(kind, seed):
    """Seconds of Keras's first `model.fit` step (compile, trace, one batch)."""
    import keras
    import numpy as np

    model = build_model(kind, warp=False, seed=seed)
    (x, y), _ = arrays(kind, np.random.default_rng(seed))
    bs = batch_size_of(kind)
    start = time.perf_counter()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_of(kind))
    model.fit(x[:bs], y[:bs], batch_size=bs, epochs=1, verbose=0)
    return time.perf_counter() - start


def warpgrad_fit_first_step(kind, seed, steady):
    """First and steady `fit` steps of a model compiled with `warpkeras.WarpGrad`."""
    import keras
    import numpy as np

    import warpkeras

    model = build_model(kind, warp=True, seed=seed)
    (x, y), _ = arrays(kind, np.random.default_rng(seed))
    bs = batch_size_of(kind)
    opt = warpkeras.WarpGrad(
        model=model,
        inner_optimizer=keras.optimizers.SGD(0.05),
        meta_optimizer=keras.optimizers.Adam(1e-3),
        meta_interval=2,
    )
    start = time.perf_counter()
    model.compile(optimizer=opt, loss=loss_of(kind))
    model.fit(x[:bs], y[:bs], batch_size=bs, epochs=1, verbose=0)
    first = time.perf_counter() - start
    times = []
    for _ in range(steady):
        t = time.perf_counter()
        model.fit(x[:bs], y[:bs], batch_size=bs, epochs=1, verbose=0)
        times.append(time.perf_counter() - t)
    return first, times


def run_cell(cell):
    """Measures one cell (a dict of model, trainer, executor, k, meta_batch, steady)."""
    import logging

    C.setup()
    import keras
    import numpy as np

    retraces = []

    class _Count(logging.Handler):
        def emit(self, record):
            if "retracing" in record.getMessage():
                retraces.append(record.getMessage()[:120])

    logging.getLogger("tensorflow").addHandler(_Count())

    # 1. warm TensorFlow's runtime up with an unrelated model
    warm = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    warm.compile(optimizer="sgd", loss="mse")
    warm.fit(np.zeros((4, 3), "float32"), np.zeros((4, 2), "float32"), verbose=0)

    kind, name = cell["model"], cell["trainer"]
    out = dict(cell)
    out["keras_first_fit_step_s"] = round(keras_first_step(kind, seed=1), 3)
    steady = cell["steady"]
    if name == "warpgrad_fit":
        first, times = warpgrad_fit_first_step(kind, seed=2, steady=steady)
        out.update(
            first_step_s=round(first, 3),
            steady_step_s=round(statistics.median(times), 4) if times else None,
        )
    else:
        tasks = tasks_for(kind, cell["meta_batch"], seed=3)
        model = build_model(kind, warp=name in WARPED, seed=2)
        split = Split()
        marks = Marks(split)
        start = time.perf_counter()
        split.active = True
        trainer = make_trainer(name, model, kind, cell["k"], cell["meta_batch"], cell["executor"])
        trainer.fit(tasks, epochs=1 + steady, verbose=0, callbacks=[marks])
        first = marks.ends[0] - start
        steps = [b - a for a, b in zip(marks.ends, marks.ends[1:])]
        out.update(
            first_step_s=round(first, 3),
            steady_step_s=round(statistics.median(steps), 4) if steps else None,
            first_step_split=split.report(),
            executor_used=getattr(trainer, "executor_name", None),
        )
        # 4. a second trainer of the same kind on a new model of the same architecture
        model2 = build_model(kind, warp=name in WARPED, seed=4)
        marks2 = Marks(None)
        start = time.perf_counter()
        trainer2 = make_trainer(name, model2, kind, cell["k"], cell["meta_batch"], cell["executor"])
        trainer2.fit(tasks, epochs=1, verbose=0, callbacks=[marks2])
        out["second_trainer_first_step_s"] = round(marks2.ends[0] - start, 3)
    out["ratio_first_to_keras"] = round(out["first_step_s"] / out["keras_first_fit_step_s"], 2)
    out["retracing_warnings"] = len(retraces)
    return out


# ----------------------------------------------------------------------------------------
# the grid, in the parent


def cells(args):
    for kind in args.models:
        for name in args.trainers:
            executors = ["default"] if name in ("warpgrad_fit", "continual") else args.executors
            for executor in executors:
                ks = args.inner_steps or ([3, 15] if kind == "conv" else [5, 20, 100])
                for k in ks:
                    for mb in args.meta_batch:
                        if name == "continual" and mb != args.meta_batch[0]:
                            continue
                        if name == "warpgrad_fit" and (k != ks[0] or mb != args.meta_batch[0]):
                            continue  # one stream, no K or meta-batch
                        yield {
                            "model": kind,
                            "trainer": name,
                            "executor": executor,
                            "k": k,
                            "meta_batch": mb,
                            "steady": args.steady,
                        }


def main():
    p = C.parser(__doc__.split("\n\n")[0], "first_step")
    p.add_argument("--models", nargs="+", choices=MODELS, default=["mlp", "conv"])
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument(
        "--executors",
        nargs="+",
        default=["default"],
        choices=("default",) + EXECUTORS,
        help="values of parallel= (default: the trainers' own choice)",
    )
    p.add_argument(
        "--inner-steps",
        nargs="+",
        type=int,
        default=None,
        help="K values (default: 5 20 100 for mlp, 3 15 for conv)",
    )
    p.add_argument("--meta-batch", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--steady", type=int, default=3, help="steady meta steps timed per cell")
    p.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--cell", help=argparse_hidden())
    args = p.parse_args()
    if args.cell:
        print("CELL " + json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return
    if args.quick:
        args.models = ["mlp"]
        args.inner_steps = args.inner_steps or [5, 50]
        args.meta_batch = [4]
        args.steady = 2
    started = time.time()
    C.setup()
    result = {"benchmark": "first_step", "machine": C.machine_info(args.wait_idle), "cells": []}
    for cell in cells(args):
        cmd = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(cell)]
        t = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            record = dict(cell, error=f"timed out after {args.timeout} s")
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")]
            if proc.returncode == 0 and lines:
                record = json.loads(lines[-1][5:])
            else:
                record = dict(cell, error=(proc.stderr.strip().splitlines() or ["?"])[-1])
        record["process_s"] = round(time.time() - t, 1)
        record["load"] = C.load()
        print(json.dumps(record), file=sys.stderr, flush=True)
        result["cells"].append(record)
    result["growth_with_k"] = growth(result["cells"])
    C.finish("first_step", result, args.out, started)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def growth(records):
    """First-step time at the largest K over the smallest, per (model, trainer, executor,
    meta-batch): the figure that says whether the graph grows with K."""
    by = {}
    for r in records:
        if "first_step_s" in r:
            by.setdefault((r["model"], r["trainer"], r["executor"], r["meta_batch"]), []).append(
                (r["k"], r["first_step_s"])
            )
    out = []
    for key, points in sorted(by.items()):
        if len(points) > 1:
            points.sort()
            out.append(
                {
                    "model": key[0],
                    "trainer": key[1],
                    "executor": key[2],
                    "meta_batch": key[3],
                    "k": [points[0][0], points[-1][0]],
                    "ratio": round(points[-1][1] / points[0][1], 2),
                }
            )
    return out


if __name__ == "__main__":
    main()
