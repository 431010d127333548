"""Does the warp meta-gradient descend the continual meta-objective? WarpGrad's Eq. 3
gradient against the gradient of Eq. 18 along the whole adaptation, in the continual sine
regression of continual_sine.py (WarpGrad App. K).

WarpGrad meta-learns φ with the objective of Eq. 3: at every point θ_k of a task's
trajectory, the meta-loss one inner step later, with θ_k itself held fixed. Online
(Algorithm 1, as continual_sine.py meta-trains), the meta-gradient of one sequence is

    g_warp = Σ_k ∇φ L_meta(θ_k − α ∇L_task(θ_k; φ); φ)        (θ_k a constant),

where L_meta is Eq. 18 (the weighted validation losses of the current and earlier
sub-tasks). The quantity Fig. 9 and the retention goal judge is that same sum along the
trajectory, Σ_k L_meta(θ_{k+1}; φ), in which every θ_{k+1} depends on φ through all the
updates before it. Its gradient, by backpropagation through all K inner steps (second
order), is g_traj. WarpGrad never computes g_traj (that is the point of Eq. 3: no
backpropagation through the adaptation); this script does, on a few sequences, at points of
meta-training, and reports how well the two agree:

  cosine (mean over sequences of the per-sequence cosine, and the cosine of the two
  gradients summed over the sequences, i.e. of the meta-batch gradients), the norm ratio
  |g_warp| / |g_traj|, and Eq. 18 along the trajectory as a mean over the K steps (the
  sum both are gradients of, divided by K).

Meta-training is continual_sine.py's (same flags, presets and seeds; each seed repeats the
whole run), but every warp is kept: --select-every is refused, and a preset's selection is
switched off. continual_sine.py's evaluation and export flags (--eval-tasks,
--eval-points, --random-order, --export-dir, --no-export) have no effect here. Outputs
<output-dir>/continual_sine_gradients.json and continual_sine_gradients.png (the cosines
and Eq. 18 against the meta step, one line per seed).

Examples:
  python examples/continual_sine_gradients.py --meta-steps 120 --check-every 20
  python examples/continual_sine_gradients.py --warp-units 200 --eq18-weighting average \
      --meta-steps 80 --check-every 20
  python examples/continual_sine_gradients.py --smoke
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets up sys.path, the Keras backend and matplotlib)
from _continual_sine_config import add_experiment_arguments, resolve_config  # noqa: E402

EXAMPLE = "continual_sine_gradients"


def build_parser():
    parser = add_experiment_arguments(_common.make_parser(EXAMPLE, __doc__))
    g = parser.add_argument_group("gradient check")
    g.add_argument(
        "--check-every",
        type=int,
        default=10,
        metavar="N",
        help="compare the gradients before meta-training and every N meta steps "
        "(and at the last; default 10)",
    )
    g.add_argument(
        "--check-sequences",
        type=int,
        default=None,
        metavar="M",
        help="task sequences per comparison (default 5, smoke 2)",
    )
    return parser


if __name__ == "__main__":
    # --help and flag errors are answered here, before TensorFlow loads (seconds).
    build_parser().parse_args()

import warpkeras  # noqa: E402  (before TensorFlow: it chooses TensorFlow's CPU kernels)

# isort: split
import continual_sine as cs  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from warpkeras import objectives as obj  # noqa: E402


def trajectory_gradients(
    partition, loss_fn, meta_loss, learning_rate, num_subtasks, steps_per_subtask
):
    """A compiled ``fn(phi, xs, ys, xv, yv) -> (g_warp, g_traj, eq18)`` for one sequence.

    Args:
        partition: the learner's `warpkeras.Partition` (θ0 = its current task values).
        loss_fn: the task loss (Eq. 17).
        meta_loss: the trainer's ``meta_loss`` hook (`continual_sine.make_meta_loss`).
        learning_rate: α.
        num_subtasks, steps_per_subtask: T and n (K = n T inner steps).

    The returned function takes φ (list of tensors, `warp_variables` order), the training
    batches ``xs``, ``ys`` ``[K, batch, 1]`` and the validation data ``xv``, ``yv``
    ``[T, points, 1]``, and returns ``g_warp`` and ``g_traj`` (lists shaped like φ, see the
    module docstring) and ``eq18``, Σ_k L_meta(θ_{k+1}; φ) / K, the mean over the K steps
    (a scalar; weighted half MSE).
    """
    theta0 = partition.initial_task_values()
    T, n = num_subtasks, steps_per_subtask

    @tf.function(reduce_retracing=True)
    def gradients(phi, xs, ys, xv, yv):
        lr = tf.constant(learning_rate, theta0[0].dtype)  # not via float32
        g_warp = [tf.zeros_like(v) for v in phi]
        total = tf.zeros([], theta0[0].dtype)
        with tf.GradientTape() as along:
            along.watch(phi)
            theta = list(theta0)
            for k in range(T * n):
                t = tf.constant(min(k // n + 1, T), tf.int32)
                batch = (xs[k], ys[k])
                # One step serves both: this tape starts at θ_k, so to it θ_k is a
                # constant (Eq. 3), while `along` sees θ_k's dependence on φ as well.
                with tf.GradientTape() as at_point:
                    at_point.watch(phi)
                    theta = obj.task_step(partition, loss_fn, theta, phi, batch, lr).theta
                    point = meta_loss(partition, loss_fn, theta, phi, (xv, yv, t), None)
                g_warp = [a + b for a, b in zip(g_warp, at_point.gradient(point, phi))]
                total += point
        g_traj = along.gradient(total, phi)
        return g_warp, g_traj, total / (T * n)

    return gradients


def compare(g_warp, g_traj):
    """Cosine and norm ratio of two gradients (lists of arrays), as floats."""
    a = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in g_warp])
    b = np.concatenate([np.ravel(np.asarray(g, np.float64)) for g in g_traj])
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan"), float(na / nb)


def run_seed(cfg, seed, check_every, count):
    """Meta-trains the warp for one seed as continual_sine.py does, comparing the two
    gradients before meta-training and every `check_every` meta steps; returns the list of
    comparison records."""
    T, n = cfg["subtasks"], cfg["steps_per_subtask"]
    model = cs.build_model(cfg["hidden_units"], cfg["warp_units"], cfg["hidden_layers"], seed)
    meta_loss = cs.make_meta_loss(T, n, cfg["eq18_weighting"])
    trainer = warpkeras.WarpTrainer(
        model,
        loss=cs.half_mse,
        mode="online",
        objective="exact",
        init_objective=None,
        inner_learning_rate=cfg["inner_lr"],
        inner_steps=T * n,
        meta_batch_size=cfg["meta_batch_size"],
        meta_optimizer=cs.meta_optimizer(cfg),
        meta_loss=meta_loss,
        parallel=cfg["parallel"],
        seed=seed,
    )
    if cfg["warp_init"] == "random":
        cs.randomise_warps(model, seed)
    partition = trainer.partition
    gradients = trajectory_gradients(partition, cs.half_mse, meta_loss, cfg["inner_lr"], T, n)
    sequences = cs.sequence_runs(cfg, (seed, 17, 2019), count, cfg["meta_val_points"])
    checks = []

    def check(step):
        phi = partition.warp_values()
        cosines, ratios, eq18 = [], [], []
        sums = None
        for seq in sequences:
            g_warp, g_traj, value = gradients(phi, *seq)
            cosine, ratio = compare(g_warp, g_traj)
            cosines.append(cosine)
            ratios.append(ratio)
            eq18.append(float(value))
            pair = ([np.asarray(g) for g in g_warp], [np.asarray(g) for g in g_traj])
            sums = (
                pair
                if sums is None
                else tuple([a + b for a, b in zip(s, p)] for s, p in zip(sums, pair))
            )
        record = {
            "meta_step": step,
            "cosine_per_sequence": _common.stats(cosines),
            "cosine_of_sums": compare(*sums)[0],
            "norm_ratio_warp_to_trajectory": _common.stats(ratios),
            "eq18_along_trajectory": _common.stats(eq18),
        }
        checks.append(record)
        if cfg["verbose"]:
            print(
                f"seed {seed}, meta step {step:5d}: cosine(g_warp, g_traj) per sequence "
                f"{record['cosine_per_sequence']['mean']:+.3f}, of the sums "
                f"{record['cosine_of_sums']:+.3f}; |g_warp|/|g_traj| "
                f"{record['norm_ratio_warp_to_trajectory']['mean']:.3g}; Eq. 18 (mean "
                f"over the steps) {record['eq18_along_trajectory']['mean']:.4f}",
                flush=True,
            )

    def on_epoch_end(epoch, logs=None):
        step = epoch + 1
        if step % check_every == 0 or step == cfg["meta_steps"]:
            check(step)

    check(0)
    trainer.fit(
        cs.SequenceSource(cs.ContinualSineDistribution(num_subtasks=T), cfg),
        meta_steps=cfg["meta_steps"],
        verbose=2 if cfg["verbose"] == 2 else 0,
        callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)],
    )
    return checks


def plot(path, per_seed, title):
    """The per-sequence and meta-batch cosines and Eq. 18 against the meta step."""
    plt = _common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for record in per_seed:
        steps = [c["meta_step"] for c in record["checks"]]
        (line,) = ax.plot(
            steps,
            [c["cosine_per_sequence"]["mean"] for c in record["checks"]],
            marker="o",
            label=f"seed {record['seed']}: mean over sequences",
        )
        ax.plot(
            steps,
            [c["cosine_of_sums"] for c in record["checks"]],
            marker="s",
            linestyle="--",
            color=line.get_color(),
            label=f"seed {record['seed']}: of the meta-batch sums",
        )
        bx.plot(
            steps,
            [c["eq18_along_trajectory"]["mean"] for c in record["checks"]],
            marker="o",
            color=line.get_color(),
            label=f"seed {record['seed']}",
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("meta step")
    ax.set_ylabel("cosine(g_warp, g_traj)")
    ax.set_title("WarpGrad's meta-gradient (Eq. 3) vs\nthe gradient of Eq. 18 along the trajectory")
    ax.legend(fontsize=7)
    bx.set_xlabel("meta step")
    bx.set_ylabel("Eq. 18 along the trajectory (mean over the K steps)")
    bx.set_title("the meta-objective on the same sequences")
    bx.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _common.save_figure(fig, path)


def main(argv=None):
    """Runs the comparison; returns the results dict (also written as JSON and a plot)."""
    args = build_parser().parse_args(argv)
    if args.select_every:
        raise SystemExit(
            "--select-every has no effect in continual_sine_gradients.py: the "
            "gradients are compared along meta-training and no warp is kept "
            "back; leave the flag out"
        )
    cfg = resolve_config(args)
    cfg["select_every"] = 0  # a preset's selection, switched off (see the docstring)
    cfg.pop("select_sequences", None)
    if args.check_every < 1:
        raise SystemExit(f"--check-every must be >= 1, got {args.check_every}")
    count = args.check_sequences if args.check_sequences is not None else (2 if args.smoke else 5)
    if count < 1:
        raise SystemExit(f"--check-sequences must be >= 1, got {count}")
    out_dir, _ = _common.output_dirs(args, EXAMPLE)
    with _common.Stopwatch() as total:
        per_seed = [
            {"seed": seed, "checks": run_seed(cfg, seed, args.check_every, count)}
            for seed in cfg["seeds"]
        ]
    title = (
        f"Continual sine: {cfg['hidden_layers']} x {cfg['hidden_units']} learner, "
        f"{cfg['warp_units']}-unit warp blocks, Eq. 18 weighting "
        f"{cfg['eq18_weighting']}, α = {cfg['inner_lr']}; {count} sequences per check"
    )
    png = plot(out_dir / f"{EXAMPLE}.png", per_seed, title)
    output = {
        "example": EXAMPLE,
        "config": dict(cfg, check_every=args.check_every, check_sequences=count),
        "metric_notes": {
            "g_warp": "Σ_k ∇φ L_meta(θ_k − α∇L_task(θ_k; φ); φ), θ_k held fixed: the online "
            "meta-gradient of Eq. 3 that meta-training follows (one sequence)",
            "g_traj": "∇φ Σ_k L_meta(θ_{k+1}; φ) with θ_{k+1} a function of φ through every "
            "earlier inner step (backpropagation through the adaptation)",
            "cosine_of_sums": "cosine of the two gradients summed over the sequences",
            "eq18_along_trajectory": "Σ_k L_meta(θ_{k+1}; φ) / K per sequence: the mean "
            "over the K steps",
        },
        "per_seed": per_seed,
        "plot": str(png),
        "wall_time_seconds": total.seconds,
        "environment": _common.environment(),
    }
    json_path = _common.write_json(out_dir / f"{EXAMPLE}.json", output)
    _common.print_written(json_path, [png], None, total.seconds)
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
