"""Omniglot input pipeline throughput against what the inner loop consumes.

Times, interleaved in one process (round-robin samples, medians), batches of 20 28x28x1
images with the protocol's random affine augmentation (scale U[0.8, 1.2], rotation
U[0, 360), translation ±20 %):

* ``tfdata``: ``ClassificationTask.train_dataset(batch_size=20)`` (tf.data: stateless
  shuffle, gather, augmentation in parallel map calls, prefetch);
* ``to_task``: ``ClassificationTask.to_task(batch_size=20).batches("train", rng)`` — the
  numpy path the trainers draw their inner-loop batches from (numpy indexing, then the
  augmentation as eager TensorFlow ops on the caller's thread);
* ``to_task_augment_compiled_proposed``: the same numpy path with the augmentation wrapped
  in a ``tf.function`` (the change proposed for ``ClassificationTask.augment``);

each with and without augmentation, against the images/s the inner loop consumes
(20 / the time of the compiled adaptation step of Warp-Leap meta-training on the Omniglot
model, timed in the same rounds). Target: every augmented path ≥ 10x the consumption rate. The
``to_task`` path runs synchronously inside the inner loop, so its cost per batch is also
given as a share of an inner step.

Data: the Omniglot copy in ``../shared/data/omniglot`` (from the repository root) or
``--data-dir``; without one, synthetic images go through the same augmentation.

Usage::

    python bench/data_pipeline.py            # ~1-2 minutes
    python bench/data_pipeline.py --quick    # ~30 seconds

Prints one JSON object and writes it to ``bench/results/data_pipeline.json``.
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.setup()


def load_task(data_dir, cache_dir, seed):
    """A ClassificationTask of Omniglot (first meta-train alphabet) or a synthetic one."""
    import numpy as np

    from warpkeras.data import ClassificationTask, random_affine

    if data_dir and os.path.isdir(data_dir):
        from warpkeras.data import OmniglotTasks

        t0 = time.perf_counter()
        tasks = OmniglotTasks(
            data_dir=data_dir, cache_dir=cache_dir, num_meta_val=1, num_meta_test=1, seed=seed
        )
        task = tasks.meta_train[0]
        return task, {
            "source": "omniglot",
            "data_dir": os.path.abspath(data_dir),
            "alphabet": task.name,
            "train_images": task.num_train,
            "load_s": round(time.perf_counter() - t0, 2),
        }
    rng = np.random.default_rng(seed)
    (x, y), (xt, yt) = C.synthetic_arrays(rng)
    task = ClassificationTask(
        x,
        y,
        xt,
        yt,
        num_classes=C.NUM_CLASSES,
        name="synthetic",
        augmentation=functools.partial(random_affine, fill_value=0.0),
    )
    return task, {"source": "synthetic (no Omniglot copy found)", "train_images": len(x)}


def main():
    p = C.parser(__doc__, "data_pipeline")
    p.add_argument(
        "--data-dir", default=C.SHARED_OMNIGLOT, help="local Omniglot copy (default: %(default)s)"
    )
    p.add_argument(
        "--cache-dir",
        default="/tmp/warpkeras_bench_cache",
        help="where decoded Omniglot is cached (default: %(default)s)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 3)"
    )
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="batches per sample of a data path (default 20, quick 10)",
    )
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 9)
    nb = args.batches or (10 if args.quick else 20)
    started = time.time()

    import numpy as np

    import warpkeras

    info = C.machine_info(args.wait_idle)
    task, data_info = load_task(args.data_dir, args.cache_dir, args.seed)

    its = {
        "tfdata_augment": iter(task.train_dataset(batch_size=C.TASK_BATCH, seed=args.seed)),
        "tfdata_no_augment": iter(
            task.train_dataset(batch_size=C.TASK_BATCH, augment=False, seed=args.seed)
        ),
        "to_task_augment": task.to_task(batch_size=C.TASK_BATCH).batches(
            "train", np.random.default_rng(args.seed)
        ),
        "to_task_no_augment": task.to_task(batch_size=C.TASK_BATCH, augment=False).batches(
            "train", np.random.default_rng(args.seed)
        ),
    }

    # the proposed fix: the same augmentation compiled once (tf.function) instead of
    # dispatching its ~30 ops eagerly per batch
    import tensorflow as tf

    compiled = tf.function(task.augmentation, reduce_retracing=True)

    def compiled_augment(images, rng):
        seed = rng.integers(0, 2**31 - 1, size=2)
        return compiled(
            tf.convert_to_tensor(images, tf.float32), tf.constant(seed, tf.int64)
        ).numpy()

    its["to_task_augment_compiled_proposed"] = warpkeras.Task(
        train=(task.x_train, task.y_train), batch_size=C.TASK_BATCH, augment=compiled_augment
    ).batches("train", np.random.default_rng(args.seed))

    def draw(it):
        out = None
        for _ in range(nb):
            out = next(it)
        return out

    model = C.omniglot_model(warp=True, seed=args.seed)
    trainer = warpkeras.WarpTrainer(model, C.loss_fn(), mode="offline", inner_steps=100)
    x, y = next(its["to_task_augment"])
    engine = C.Engine(trainer, x, y)
    step = engine.meta_inner or engine.inner  # the step meta-training runs per batch
    variants = {k: (lambda it=it: draw(it)) for k, it in its.items()}
    # consume as many images per sample as a data sample produces (nb inner steps is long:
    # use a fixed few and scale)
    inner_calls = 3
    variants["inner_step"] = lambda: [step() for _ in range(inner_calls)][-1]
    timings = C.interleave(variants, rounds, 1, warmup=2, sync=C.sync_numpy)

    inner_s = timings["inner_step"]["median_s"] / inner_calls
    consumed = C.TASK_BATCH / inner_s
    rates = {k: C.TASK_BATCH * nb / timings[k]["median_s"] for k in its}
    per_batch_ms = {k: round(timings[k]["median_s"] / nb * 1e3, 3) for k in its}
    ratios = {k: round(v / consumed, 1) for k, v in rates.items()}
    inner_best = timings["inner_step"]["min_s"] / inner_calls
    ratios_min = {
        k: round(C.TASK_BATCH * nb / timings[k]["min_s"] / (C.TASK_BATCH / inner_best), 1)
        for k in its
    }
    targets = {
        f"{k}_ge_10x_consumption": {"value": ratios[k], "met": ratios[k] >= 10}
        for k in ("tfdata_augment", "to_task_augment")
    }
    result = {
        "benchmark": "data_pipeline",
        "quick": args.quick,
        "machine": info,
        "data": data_info,
        "config": {
            "batch": C.TASK_BATCH,
            "batches_per_sample": nb,
            "rounds": rounds,
            "augmentation": "random_affine scale U[0.8,1.2], rotation U[0,360), "
            "translation U[-0.2,0.2]",
            "statistic": "median over interleaved rounds",
        },
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ms_per_batch": per_batch_ms,
        "inner_step_ms": round(inner_s * 1e3, 2),
        "consumed_images_per_s": round(consumed, 1),
        "pipeline_over_consumption": ratios,
        "pipeline_over_consumption_from_fastest_samples": ratios_min,
        "to_task_augment_share_of_inner_step": C.ratio(
            per_batch_ms["to_task_augment"], inner_s * 1e3
        ),
        "to_task_augment_compiled_share_of_inner_step": C.ratio(
            per_batch_ms["to_task_augment_compiled_proposed"], inner_s * 1e3
        ),
        "to_task_augment_eager_over_compiled": C.ratio(
            per_batch_ms["to_task_augment"], per_batch_ms["to_task_augment_compiled_proposed"]
        ),
        "targets": targets,
        "samples": {k: v["samples_s"] for k, v in timings.items()},
    }
    C.finish("data_pipeline", result, args.out, started)


if __name__ == "__main__":
    main()
