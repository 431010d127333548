"""Gradient descent against WarpGrad on random 2-D loss surfaces (WarpGrad App. E, Fig. 4).

A task is a random surface f(x1, x2) of WarpGrad Appendix E
(`warpkeras.data.LossSurfaceDistribution`) and a starting point x0 ~ U(-3, 3)^2; the learner
minimises it by 100 steps of gradient descent with learning rate 0.1. WarpGrad puts an
explicit warp Ω between the point and the surface, so the task loss is f(Ω(x)), and
meta-learns Ω across surfaces: gradient descent on x then follows the preconditioned
direction J_Ω(x)^T ∇f(Ω(x)) (Eq. 2).

The model is a two-layer Keras model:

* a task layer `Displacement` that holds the task variable δ (a 2-vector, zero at the
  start) and adds it to its input; the input is the starting point x0, so the layer's
  output x = x0 + δ is the point being optimised and a gradient step on δ is exactly a
  gradient step on the point. (Feeding the start point as the input lets every task begin
  from its own x0 while the initialisation of the task variable, δ = 0, stays fixed.)
* the warp Ω: a two-layer feed-forward network with 30 tanh hidden units and a residual
  connection, ``Ω(x) = x + W2 tanh(W1 x + b1) + b2`` (`warpkeras.layers.ResidualWarpDense`),
  which starts as the identity, so the untrained model *is* plain gradient descent on f.

The "labels" of a task are the surface's parameters (s, a1, a2, a3, b1, b2, b3, variant),
and the loss ``surface_loss(params, Ω(x))`` evaluates the surface at the model's output.
Meta-training follows App. E: every meta step draws a new surface and 10 random starting
points, adapts each separately for 100 steps (lr 0.1), and accumulates the exact warp
meta-gradient (Eq. 3) online (Algorithm 1, `warpkeras.WarpTrainer(mode="online")`; the 10
runs of a meta step are adapted side by side in one graph, ``parallel="unrolled"``); the
initialisation is not meta-learned. The warp is trained with Adam (0.01; the paper does not
state its meta-optimiser).

Evaluation on held-out surfaces: from the same starting points, plain gradient descent on
f (the identity warp) and WarpGrad (the meta-learned warp). Reported: the final loss (the
surface value at the final representation point, f(x_K) for GD and f(Ω(x_K)) for WarpGrad)
and the steps to converge (the first step at which the loss is within 1% of the surface's
value range of the best loss either method reached from that start; runs that never get
there count as K). Outputs:
  <output-dir>/synthetic_surfaces.json              numbers, configuration, timings
  <output-dir>/synthetic_surfaces_trajectories.png  Fig. 4: GD (black) and WarpGrad
        (magenta) on three held-out surfaces. Top row: the surface f with the GD path x_k
        and the WarpGrad path in representation space Ω(x_k). Bottom row: the warped loss
        f(Ω(x)) over parameter space with both parameter paths x_k.
  <output-dir>/synthetic_surfaces_curves.png        mean loss vs step, and meta-training loss
  <export-dir>/   the meta-learned optimiser as a SavedModel that runs itself
        (`warpkeras.export.export_adaptive`): feed a start point as ``x`` and the surface
        parameters as ``y`` to ``adapt_and_predict`` to get Ω(x_K), the point WarpGrad
        reaches; ``serving_default`` maps points through Ω.

As in the paper's figure, the three plotted surfaces use starting points where gradient
descent does poorly (the held-out runs where WarpGrad's final loss improves most on GD's);
the numbers in the JSON and the table cover all held-out runs.

Sizes:
  (no flags)       the paper's configuration (100 meta steps x 10 starting points x 100
                   steps), 20 held-out surfaces x 10 starts: about a minute on 2 CPU cores
                   (2.5 minutes when they are shared)
  --preset paper   the same
  --smoke          seconds: 3 meta steps of 3 starts x 10 steps, 2 held-out surfaces
Any explicit flag overrides the preset's value.

Examples:
  python examples/synthetic_surfaces.py
  python examples/synthetic_surfaces.py --meta-steps 300 --meta-lr 0.003 --seeds 0,1,2
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets up sys.path, the Keras backend and matplotlib)

EXAMPLE = "synthetic_surfaces"
NUM_PARAMS = 8  # s, a1, a2, a3, b1, b2, b3, variant flag (0: paper, 1: peaks)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A size preset; `resolve_config` overrides its fields with explicit flags."""

    meta_steps: int = 100
    starts: int = 10
    inner_steps: int = 100
    inner_lr: float = 0.1
    meta_lr: float = 0.01
    warp_units: int = 30
    eval_surfaces: int = 20
    eval_starts: int = 10
    variant: str = "paper"
    converge_tolerance: float = 0.01
    parallel: str = "unrolled"
    seeds: list = dataclasses.field(default_factory=lambda: [0])


PRESETS = {
    "default": Preset(),
    "paper": Preset(),
    "smoke": Preset(
        meta_steps=3, starts=3, inner_steps=10, warp_units=8, eval_surfaces=2, eval_starts=2
    ),
}


# -- command line ---------------------------------------------------------------------------
def build_parser():
    parser = _common.make_parser(EXAMPLE, __doc__)
    g = parser.add_argument_group("experiment (defaults: the preset's)")
    g.add_argument(
        "--preset",
        choices=("default", "paper"),
        default="default",
        help="size preset (--smoke overrides it)",
    )
    g.add_argument("--meta-steps", type=int, help="meta-training steps (one surface each)")
    g.add_argument("--starts", type=int, help="starting points per meta step (meta-batch)")
    g.add_argument("--inner-steps", type=int, help="gradient steps per run (K)")
    g.add_argument("--inner-lr", type=float, help="gradient-descent learning rate")
    g.add_argument("--meta-lr", type=float, help="Adam learning rate of the warp")
    g.add_argument("--warp-units", type=int, help="hidden units of the warp Ω")
    g.add_argument("--eval-surfaces", type=int, help="held-out surfaces")
    g.add_argument("--eval-starts", type=int, help="starting points per held-out surface")
    g.add_argument(
        "--variant",
        choices=("paper", "peaks"),
        help="surface family: as printed in the paper, or the classic 'peaks' "
        "form of the last term",
    )
    g.add_argument(
        "--converge-tolerance",
        type=float,
        help="convergence tolerance, as a fraction of the surface's value range",
    )
    g.add_argument(
        "--parallel",
        choices=("sequential", "unrolled", "vectorized"),
        help="how the starts of a meta step are adapted (WarpTrainer parallel=)",
    )
    return parser


if __name__ == "__main__":
    # --help and flag errors are answered here, before TensorFlow loads (seconds).
    build_parser().parse_args()

import warpkeras  # noqa: E402  (before TensorFlow: it chooses TensorFlow's CPU kernels)

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from warpkeras import objectives as obj  # noqa: E402
from warpkeras.data import LossSurfaceDistribution  # noqa: E402
from warpkeras.layers import ResidualWarpDense  # noqa: E402


# -- the task: a surface evaluated at the model's output ----------------------------------------
def surface_params(surface):
    """The label vector of a `LossSurface`: ``[s, a1, a2, a3, b1, b2, b3, variant]``
    (variant 0 for ``"paper"``, 1 for ``"peaks"``), float32."""
    flag = 0.0 if surface.variant == "paper" else 1.0
    return np.array([surface.s, *surface.a, *surface.b, flag], dtype=np.float32)


def surface_values(points, params):
    """f(points) for surfaces given by their parameter vectors (TensorFlow, differentiable).

    The same function as `warpkeras.data.LossSurface`, written for a batch of surfaces.

    Args:
        points: ``(..., 2)`` points.
        params: ``(..., 8)`` parameter vectors (see `surface_params`), broadcastable.

    Returns:
        ``(...)`` surface values.
    """
    points = tf.convert_to_tensor(points)
    params = tf.cast(params, points.dtype)
    x1, x2 = points[..., 0], points[..., 1]
    s, a1, a2, a3, b1, b2, b3, flag = tf.unstack(params, NUM_PARAMS, axis=-1)
    term1 = b1 * tf.square(a1 - x1) * tf.exp(-tf.square(x1) - tf.square(x2 + a2))
    term2 = b2 * (x1 / s - x1**3 - x2**3) * tf.exp(-tf.square(x1) - tf.square(x2))
    last = (1.0 - flag) * x1 + flag * x2
    term3 = b3 * tf.exp(-tf.square(x1 + a3) - tf.square(last))
    return term1 - term2 - term3


def surface_loss(y_true, y_pred):
    """The task loss: the mean over the batch of the surfaces ``y_true`` (parameter vectors)
    at the points ``y_pred`` (the model's output, Ω(x))."""
    return tf.reduce_mean(surface_values(y_pred, y_true))


@keras.saving.register_keras_serializable(package="warpkeras_examples")
class Displacement(keras.layers.Layer):
    """A task layer holding the displacement δ of the point from its start: ``x0 + δ``.

    δ (``delta``, shape ``(features,)``) starts at zero; it is the task variable adapted by
    gradient descent, so with the starting point as input the output is the current point.
    """

    warpkeras_role = "task"

    def build(self, input_shape):
        self.delta = self.add_weight(
            name="delta", shape=(int(input_shape[-1]),), initializer="zeros"
        )

    def call(self, inputs):
        return inputs + self.delta

    def compute_output_shape(self, input_shape):
        return input_shape


def build_model(warp_units, seed):
    """The point (task variable) followed by the warp Ω (warp variables)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((2,), name="start"),
            Displacement(name="point"),
            ResidualWarpDense(
                hidden_units=warp_units, num_layers=2, activation="tanh", name="warp"
            ),
        ],
        name="warped_point",
    )


def surface_task(surface, start, name="surface"):
    """A `warpkeras.Task` minimising `surface` from `start`: every batch is the single
    pair (start point, surface parameters)."""
    batch = (np.asarray(start, np.float32)[None, :], surface_params(surface)[None, :])

    def batches(rng):
        while True:
            yield batch

    return warpkeras.Task(
        train=batches,
        name=name,
        info={"surface": repr(surface), "start": np.asarray(start).tolist()},
    )


class SurfaceTasks:
    """The meta-training task source: each meta step draws one new surface and a meta
    batch of random starting points on it (WarpGrad App. E)."""

    def __init__(self, distribution):
        self.distribution = distribution

    def sample(self, rng, n):
        surface = self.distribution.sample(rng)
        starts = self.distribution.sample_initial_points(n, rng)
        return [surface_task(surface, x0, name=f"start{i}") for i, x0 in enumerate(starts)]


# -- evaluation ----------------------------------------------------------------------------------
def make_trajectory_fn(partition, learning_rate, steps):
    """A compiled function running `steps` gradient steps of the warped point from a start.

    Returns ``fn(phi, start, params) -> (points, representations, losses)`` with shapes
    ``(K+1, 2)``, ``(K+1, 2)`` and ``(K+1,)``: x_k, Ω(x_k) and f(Ω(x_k)).
    """
    theta0 = [tf.zeros_like(v.value) for v in partition.task_variables]

    @tf.function(reduce_retracing=True)
    def run(phi, start, params):
        x = start[None, :]
        y = params[None, :]
        theta = list(theta0)
        points = tf.TensorArray(tf.float32, size=steps + 1)
        reps = tf.TensorArray(tf.float32, size=steps + 1)
        losses = tf.TensorArray(tf.float32, size=steps + 1)
        for k in tf.range(steps):
            step = obj.task_step(partition, surface_loss, theta, phi, (x, y), learning_rate)
            points = points.write(k, start + theta[0])
            reps = reps.write(k, step.outputs[0])
            losses = losses.write(k, step.loss)
            theta = step.theta
        rep, _ = partition.call(theta, phi, x)
        points = points.write(steps, start + theta[0])
        reps = reps.write(steps, rep[0])
        losses = losses.write(steps, surface_loss(y, rep))
        return points.stack(), reps.stack(), losses.stack()

    return run


def steps_to_converge(losses, target, tolerance):
    """The first step k with ``losses[k] <= target + tolerance`` (len(losses) - 1 if none)."""
    hit = np.flatnonzero(np.asarray(losses) <= target + tolerance)
    return int(hit[0]) if hit.size else len(losses) - 1


def evaluate(cfg, partition, phi_gd, phi_warp, surfaces, starts, verbose):
    """Runs GD (identity warp) and WarpGrad from the same starts on every held-out surface."""
    run = make_trajectory_fn(partition, cfg["inner_lr"], cfg["inner_steps"])
    runs = []
    bar = keras.utils.Progbar(len(surfaces), unit_name="surface") if verbose else None
    for i, (surface, points) in enumerate(zip(surfaces, starts)):
        params = tf.constant(surface_params(surface))
        _, _, z = surface.grid(num=101)
        value_range = float(np.max(z) - np.min(z)) or 1.0
        for x0 in points:
            x0 = tf.constant(x0)
            gd = [t.numpy() for t in run(phi_gd, x0, params)]
            wg = [t.numpy() for t in run(phi_warp, x0, params)]
            target = min(gd[2].min(), wg[2].min())
            tol = cfg["converge_tolerance"] * value_range
            runs.append(
                {
                    "surface": i,
                    "start": x0.numpy(),
                    "tolerance": tol,
                    "gd": {
                        "points": gd[0],
                        "losses": gd[2],
                        "steps_to_converge": steps_to_converge(gd[2], target, tol),
                    },
                    "warpgrad": {
                        "points": wg[0],
                        "representation": wg[1],
                        "losses": wg[2],
                        "steps_to_converge": steps_to_converge(wg[2], target, tol),
                    },
                }
            )
        if bar is not None:
            bar.update(i + 1)
    return runs


def summarise_runs(runs, steps):
    out = {}
    for method in ("gd", "warpgrad"):
        finals = [r[method]["losses"][-1] for r in runs]
        conv = [r[method]["steps_to_converge"] for r in runs]
        out[method] = {
            "final_loss": _common.stats(finals),
            "steps_to_converge": _common.stats(conv),
            "converged_fraction": float(np.mean([c < steps for c in conv])),
            "mean_loss_curve": np.mean([r[method]["losses"] for r in runs], axis=0),
        }
    gd = np.array([r["gd"]["losses"][-1] for r in runs])
    wg = np.array([r["warpgrad"]["losses"][-1] for r in runs])
    tol = np.array([r["tolerance"] for r in runs])
    out["warpgrad_better_fraction"] = float(np.mean(wg < gd - tol))
    out["gd_better_fraction"] = float(np.mean(gd < wg - tol))
    return out


# -- plots ------------------------------------------------------------------------------------
def _limits(*arrays):
    values = np.concatenate([np.abs(np.asarray(a)).ravel() for a in arrays])
    return float(min(6.0, max(3.0, np.max(values) + 0.3)))


def plot_trajectories(path, partition, phi, surfaces, picks):
    """Fig. 4: three surfaces, GD (black) and WarpGrad (magenta) from the same start x_0.

    Top row: f over the representation space z, where f is evaluated: GD's points z = x_k
    and WarpGrad's z = Ω(x_k), which starts at Ω(x_0) (magenta circle), not at x_0. Bottom
    row: the warped loss f(Ω(x)) over the parameter space, where both methods start at x_0.
    """
    plt = _common.pyplot()
    fig, axes = plt.subplots(2, len(picks), figsize=(4.6 * len(picks), 9.0), squeeze=False)
    for col, run in enumerate(picks):
        surface = surfaces[run["surface"]]
        gd, wg = run["gd"], run["warpgrad"]
        lim = _limits(gd["points"], wg["points"], wg["representation"])
        x1, x2, z = surface.grid(limits=(-lim, lim), num=121)
        ax = axes[0, col]
        filled = ax.contourf(x1, x2, z, levels=30, cmap="viridis")
        ax.contour(x1, x2, z, levels=15, colors="white", linewidths=0.4, alpha=0.6)
        fig.colorbar(filled, ax=ax, shrink=0.8, label="loss f(z)")
        ax.plot(*gd["points"].T, "-", color="black", lw=1.6, label="GD: z = x_k")
        ax.plot(*wg["representation"].T, "-", color="magenta", lw=1.6, label="WarpGrad: z = Ω(x_k)")
        ax.plot(*gd["points"][0], "o", color="white", mec="black", ms=7, label="start x_0")
        ax.plot(
            *wg["representation"][0],
            "o",
            color="white",
            mec="magenta",
            ms=7,
            mew=1.5,
            label="WarpGrad start Ω(x_0)",
        )
        ax.plot(*gd["points"][-1], "x", color="black", ms=8, mew=2, label="end")
        ax.plot(*wg["representation"][-1], "x", color="magenta", ms=8, mew=2)
        ax.set_title(
            f"f (surface {run['surface']}), final loss: GD {gd['losses'][-1]:.2f}, "
            f"WarpGrad {wg['losses'][-1]:.2f}",
            fontsize=9,
        )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("z₁")
        ax.set_ylabel("representation space: z₂" if col == 0 else "z₂")
        if col == 0:
            ax.legend(fontsize=7, loc="lower left")
        # bottom: the warped loss over parameter space
        grid = np.stack([x1, x2], axis=-1).reshape(-1, 2).astype(np.float32)
        theta0 = [tf.zeros_like(v.value) for v in partition.task_variables]
        rep, _ = partition.call(theta0, phi, tf.constant(grid))
        zw = surface_values(rep, surface_params(surface)[None, :]).numpy().reshape(x1.shape)
        ax = axes[1, col]
        filled = ax.contourf(x1, x2, zw, levels=30, cmap="viridis")
        ax.contour(x1, x2, zw, levels=15, colors="white", linewidths=0.4, alpha=0.6)
        fig.colorbar(filled, ax=ax, shrink=0.8, label="warped loss f(Ω(x))")
        ax.plot(*gd["points"].T, "-", color="black", lw=1.6, label="GD x_k")
        ax.plot(*wg["points"].T, "-", color="magenta", lw=1.6, label="WarpGrad x_k")
        ax.plot(*gd["points"][0], "o", color="white", mec="black", ms=7, label="start x_0")
        ax.plot(*gd["points"][-1], "x", color="black", ms=8, mew=2)
        ax.plot(*wg["points"][-1], "x", color="magenta", ms=8, mew=2)
        ax.set_title("f(Ω(x)) over parameter space", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("x₁")
        ax.set_ylabel("parameter space: x₂" if col == 0 else "x₂")
        if col == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        "Gradient descent (black) vs WarpGrad (magenta) from the same start x_0; × marks the end"
    )
    return _common.save_figure(fig, path)


def plot_curves(path, summary, meta_losses, steps):
    """Mean held-out loss vs adaptation step; meta-training loss vs meta step (raw, faint,
    and a moving average)."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    k = np.arange(steps + 1)
    axes[0].plot(k, summary["gd"]["mean_loss_curve"], color="black", label="gradient descent")
    axes[0].plot(k, summary["warpgrad"]["mean_loss_curve"], color="magenta", label="WarpGrad")
    axes[0].set_xlabel("adaptation step")
    axes[0].set_ylabel("mean loss f on held-out surfaces")
    axes[0].set_title("held-out surfaces")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    window = 1
    for seed, curve in meta_losses.items():
        window = _common.plot_smoothed(
            axes[1], np.arange(1, len(curve) + 1), curve, label=f"seed {seed}"
        )
    axes[1].set_xlabel("meta step")
    axes[1].set_ylabel("warp meta-loss (mean over steps)")
    axes[1].set_title(
        f"meta-training (each step a new surface); faint: raw, bold: {window}-step mean", fontsize=9
    )
    axes[1].grid(alpha=0.3)
    axes[1].legend()
    for ax in axes:
        _common.integer_ticks(ax, "x")
    return _common.save_figure(fig, path)


def resolve_config(args):
    """Merges the preset (``smoke`` when --smoke) with explicit flags into a dict."""
    preset = "smoke" if args.smoke else args.preset
    cfg = dict(dataclasses.asdict(PRESETS[preset]), preset=preset, verbose=args.verbose)
    for key in (
        "meta_steps",
        "starts",
        "inner_steps",
        "inner_lr",
        "meta_lr",
        "warp_units",
        "eval_surfaces",
        "eval_starts",
        "variant",
        "converge_tolerance",
        "parallel",
        "seeds",
    ):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    for key in (
        "meta_steps",
        "starts",
        "inner_steps",
        "warp_units",
        "eval_surfaces",
        "eval_starts",
    ):
        if cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("inner_lr", "meta_lr", "converge_tolerance"):
        if not cfg[key] > 0:
            raise SystemExit(f"--{key.replace('_', '-')} must be > 0, got {cfg[key]}")
    return cfg


def run_seed(cfg, seed):
    """Meta-trains a warp for one seed and evaluates it; returns (record, model, partition)."""
    model = build_model(cfg["warp_units"], seed)
    trainer = warpkeras.WarpTrainer(
        model,
        loss=surface_loss,
        mode="online",
        objective="exact",
        init_objective=None,
        inner_learning_rate=cfg["inner_lr"],
        inner_steps=cfg["inner_steps"],
        meta_batch_size=cfg["starts"],
        meta_optimizer=keras.optimizers.Adam(cfg["meta_lr"]),
        parallel=cfg["parallel"],
        seed=seed,
    )
    partition = trainer.partition
    phi_identity = partition.warp_values()
    distribution = LossSurfaceDistribution(variant=cfg["variant"])
    verbose = cfg["verbose"]
    if verbose:
        print(
            f"\nSeed {seed}: meta-training the warp on {cfg['meta_steps']} surfaces x "
            f"{cfg['starts']} starts x {cfg['inner_steps']} steps",
            flush=True,
        )
    with _common.Stopwatch() as train_time:
        history = trainer.fit(
            SurfaceTasks(distribution), **_common.fit_epochs(cfg["meta_steps"]), verbose=verbose
        )
    rng = np.random.default_rng([seed, 2024])
    surfaces = [distribution.sample(rng) for _ in range(cfg["eval_surfaces"])]
    starts = [distribution.sample_initial_points(cfg["eval_starts"], rng) for _ in surfaces]
    if verbose:
        print(
            f"Evaluating on {len(surfaces)} held-out surfaces x {cfg['eval_starts']} starts",
            flush=True,
        )
    with _common.Stopwatch() as eval_time:
        runs = evaluate(
            cfg, partition, phi_identity, partition.warp_values(), surfaces, starts, verbose
        )
    record = {
        "seed": seed,
        "summary": summarise_runs(runs, cfg["inner_steps"]),
        "meta_loss": [float(v) for v in history.step_history.get("meta_loss", [])],
        "nan_tasks": int(trainer.nan_tasks.numpy()),
        "meta_train_seconds": train_time.seconds,
        "eval_seconds": eval_time.seconds,
        "surfaces": [repr(s) for s in surfaces],
    }
    return record, model, partition, runs, surfaces


def export(model, cfg, export_dir, runs, surfaces):
    """Exports the meta-learned optimiser and checks the SavedModel against one run."""
    info = _common.export_model(
        model,
        export_dir,
        loss=surface_loss,
        learning_rate=cfg["inner_lr"],
        steps=cfg["inner_steps"],
        input_spec=(2,),
        label_spec=(NUM_PARAMS,),
    )
    if info["format"] == "warpkeras.export_adaptive":
        served = tf.saved_model.load(str(export_dir))
        run = runs[0]
        out = served.signatures["adapt_and_predict"](
            x=tf.constant(run["start"][None, :]),
            y=tf.constant(surface_params(surfaces[run["surface"]])[None, :]),
            steps=tf.constant(cfg["inner_steps"]),
            queries=tf.constant(run["start"][None, :]),
        )
        final = out["predictions"].numpy()[0]
        info["check"] = {
            "served_final_point": final,
            "in_process_final_point": run["warpgrad"]["representation"][-1],
            "max_abs_difference": float(
                np.max(np.abs(final - run["warpgrad"]["representation"][-1]))
            ),
        }
    info["settings"] = {
        k: (v.__name__ if callable(v) else v) for k, v in info.get("settings", {}).items()
    }
    return info


def main(argv=None):
    """Runs the example; returns the results dict (also written as JSON)."""
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    out_dir, export_dir = _common.output_dirs(args, EXAMPLE)
    records, export_info = [], None
    with _common.Stopwatch() as total:
        for i, seed in enumerate(cfg["seeds"]):
            record, model, partition, runs, surfaces = run_seed(cfg, seed)
            records.append(record)
            if i == 0:
                first = (model, partition, runs, surfaces)
        model, partition, runs, surfaces = first
        if not args.no_export:
            export_info = export(model, cfg, export_dir, runs, surfaces)
            if cfg["verbose"]:
                print(f"Exported the meta-learned optimiser to {export_info['path']}", flush=True)

    # pooled over seeds
    methods = {}
    for method in ("gd", "warpgrad"):
        finals = [v for r in records for v in r["summary"][method]["final_loss"]["values"]]
        conv = [v for r in records for v in r["summary"][method]["steps_to_converge"]["values"]]
        methods[method] = {
            "final_loss": _common.stats(finals),
            "steps_to_converge": _common.stats(conv),
            "converged_fraction": float(np.mean([c < cfg["inner_steps"] for c in conv])),
            "mean_loss_curve": np.mean(
                [r["summary"][method]["mean_loss_curve"] for r in records], axis=0
            ),
        }
    methods["warpgrad_better_fraction"] = float(
        np.mean([r["summary"]["warpgrad_better_fraction"] for r in records])
    )
    methods["gd_better_fraction"] = float(
        np.mean([r["summary"]["gd_better_fraction"] for r in records])
    )

    # Fig. 4: the three runs (different surfaces) where WarpGrad gains most over GD
    order = sorted(
        range(len(runs)),
        key=lambda j: runs[j]["warpgrad"]["losses"][-1] - runs[j]["gd"]["losses"][-1],
    )
    picks, seen = [], set()
    for j in order:
        if runs[j]["surface"] not in seen:
            picks.append(runs[j])
            seen.add(runs[j]["surface"])
        if len(picks) == 3:
            break
    plots = {
        "trajectories": str(
            plot_trajectories(
                out_dir / f"{EXAMPLE}_trajectories.png",
                partition,
                partition.warp_values(),
                surfaces,
                picks,
            )
        ),
        "curves": str(
            plot_curves(
                out_dir / f"{EXAMPLE}_curves.png",
                methods,
                {r["seed"]: r["meta_loss"] for r in records},
                cfg["inner_steps"],
            )
        ),
    }
    output = {
        "example": EXAMPLE,
        "config": cfg,
        "metric_notes": {
            "final_loss": "surface value at the final representation point after K steps: "
            "f(x_K) for gradient descent, f(Ω(x_K)) for WarpGrad; mean/std "
            "over held-out surfaces x starts (and seeds)",
            "steps_to_converge": "first step whose loss is within converge_tolerance x (the "
            "surface's value range on [-3, 3]^2) of the best loss either "
            "method reached from that start; K when never",
            "converged_fraction": "fraction of runs that got there within K steps",
            "warpgrad_better_fraction": "fraction of runs whose WarpGrad final loss is lower "
            "than gradient descent's by more than the "
            "convergence tolerance (gd_better_fraction: the "
            "reverse)",
        },
        "results": methods,
        "per_seed": records,
        "plotted_runs": [
            {
                "surface": p["surface"],
                "start": p["start"],
                "gd_final_loss": p["gd"]["losses"][-1],
                "warpgrad_final_loss": p["warpgrad"]["losses"][-1],
            }
            for p in picks
        ],
        "plots": plots,
        "export": export_info,
        "wall_time_seconds": total.seconds,
        "environment": _common.environment(),
    }
    json_path = _common.write_json(out_dir / f"{EXAMPLE}.json", output)

    n_runs = methods["gd"]["final_loss"]["n"]
    print(
        f"\nSynthetic surfaces ({cfg['preset']} size), seeds {cfg['seeds']}: {n_runs} held-out "
        f"runs of {cfg['inner_steps']} steps (lr {cfg['inner_lr']}), same starts:"
    )
    _common.print_table(
        ["method", "final loss", "steps to converge", "converged"],
        [
            [
                label,
                _common.format_stat(methods[m]["final_loss"], scale=1.0, digits=3),
                _common.format_stat(methods[m]["steps_to_converge"], scale=1.0, digits=1),
                f"{methods[m]['converged_fraction'] * 100:.0f}%",
            ]
            for m, label in (("gd", "gradient descent"), ("warpgrad", "WarpGrad"))
        ],
    )
    print(
        f"Final loss lower by more than the tolerance: WarpGrad on "
        f"{methods['warpgrad_better_fraction'] * 100:.0f}% of runs, gradient descent on "
        f"{methods['gd_better_fraction'] * 100:.0f}% (the rest end level)."
    )
    _common.print_written(json_path, plots.values(), export_info, total.seconds)
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
