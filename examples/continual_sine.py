"""Continual sine regression: a meta-learned optimiser against catastrophic forgetting
(WarpGrad App. K, Fig. 9 and 10).

A task is a target function f(x) = σ(x + o) a1 sin(x - b1) + (1 - σ(x + o)) a2 sin(x - b2)
on [-5, 5] (`warpkeras.data.ContinualSineDistribution`), split into 5 consecutive
sub-intervals, the sub-tasks. A learner sees them one at a time, 20 SGD steps on batches of
5 points from the current sub-interval only, 100 steps in all, always from the same fixed
random initialisation θ0. Plain SGD fits the current sub-task and forgets the earlier ones.

The task learner is a feed-forward net with 3 hidden layers of 200 ReLU units and a linear
output (4 layers); every non-linearity is followed by a residual warp block, a two-layer
tanh network with 100 hidden units (`warpkeras.layers.ResidualWarpDense`). The warp blocks
start random (below); with --warp-init identity they start as the identity, and the
untrained model is then the plain network with plain SGD updates. They are meta-learned
with the continual-learning objective of Eq. 18 (`warpkeras.objectives.continual_objective`):
after every inner step on sub-task t, the weighted validation loss of sub-tasks 1..t, weights
1 / (n (T - i + 1)). The meta batch
of every step carries the validation sets of all sub-tasks (stacked, [T, points, 1]) and t
as an integer tensor, so one compiled step serves the whole sequence. The warp meta-gradient
(exact, Eq. 3) is accumulated online over the task sequences of a meta-batch (Algorithm 1,
`warpkeras.WarpTrainer(mode="online", init_objective=None, meta_loss=...)`) and applied with
Adam; θ0 is never meta-learned.

Evaluation on held-out task sequences, from the same θ0: plain SGD (identity warp) and
WarpGrad (meta-learned warp), sub-tasks in the training order (left to right) and in the
paper's random order [1, 3, 4, 2, 0]; the validation loss of every sub-task is recorded at
every one of the 100 steps. Retention (JSON "retention", per order and method): the matrix
R[i, j] of the loss on sub-task i after the last step on the j-th presented sub-task, and the
mean loss after the whole sequence on the sub-tasks learned before the last (sub-tasks 1-4,
1-based by presentation) with its WarpGrad/SGD ratio. Outputs:
  <output-dir>/continual_sine.json              all numbers and curves, configuration, timings
  <output-dir>/continual_sine_losses.png        Fig. 9: mean validation loss of each sub-task
                                                vs step (log axis), WarpGrad and SGD, both
                                                orders
  <output-dir>/continual_sine_retention.png     retention: heat maps of the loss on sub-task i
                                                after learning the j-th sub-task (SGD,
                                                WarpGrad; one colour scale), and the losses
                                                after the whole sequence, both orders
  <output-dir>/continual_sine_predictions.png   Fig. 10: predictions of one held-out task after
                                                each sub-task (red), before adaptation
                                                (dashed green), ground truth (black)
  <export-dir>/   the meta-learned model as a SavedModel that adapts itself
                  (`warpkeras.export.export_adaptive`: serving_default, adapt,
                  adapt_and_predict run warped SGD steps inside the graph)

Learning rates: the paper's α = 0.001 is slow for this 100-step protocol (plain SGD barely
moves in 100 steps of batch 5, so there is little to forget) and its 20 000 meta steps with
Adam 0.001 are far beyond a CPU demonstration. The default uses α = 0.01, where SGD learns
each sub-task and visibly forgets it, and 40 meta steps with Adam 0.0005 (0.001 over so few
steps moved identity-initialised warps far from the identity at once and made some
sequences unstable). --preset paper restores α = 0.001, Adam 0.001 and 20 000 meta steps.

Warp initialisation (--warp-init): App. K does not say how the warp blocks start. By default
every dense map of a block is drawn like PyTorch's nn.Linear default, U(±1/sqrt(fan_in)), as
in the authors' released WarpGrad code, whose Omniglot warp layers keep PyTorch's default
initialisation (measured over 5 seeds: WarpGrad's loss on the earlier sub-tasks after the
whole sequence is 0.62 of SGD's against 0.69 from the identity); --warp-init identity starts
them at the identity, so that the untrained model is the plain network. The SGD baseline is
always the plain network (identity warps). --meta-lr-schedule cosine decays Adam's rate to 0 over
meta-training (App. K: constant); --meta-clipnorm clips each meta-gradient to a global L2
norm before Adam's update (App. K: no clipping).

The meta-objective only scores parameters after an update (θ_{k+1}), never θ0 itself, so a
meta-learned warp is free to change what the model predicts at θ0: after meta-training the
loss at step 0 can be higher than plain SGD's, with the first update making a large jump.
The sequences of a meta-batch are adapted side by side in one graph (WarpTrainer
``parallel="unrolled"``, --parallel).

Sizes:
  (no flags)       about 2 minutes on 2 CPU cores (3 when they are shared): 40 meta steps
                   x 5 task sequences, α = 0.01, meta Adam 0.0005, evaluation on 20
                   held-out sequences
  --preset paper   App. K: α = 0.001, meta Adam 0.001, 20 000 meta steps x 5 sequences,
                   evaluation on 100 held-out sequences (about 8 hours on 2 CPU cores)
  --preset retention  the retention goal's setting: the paper's α = 0.001, 200-unit warp
                   blocks, App. D's average weighting (--eq18-weighting average), 80 meta
                   steps of Adam 0.0005, the warp kept by its validation Eq. 18 every 5
                   steps (--select-every 5), seeds 0, 1, 2 (about 15 minutes on 2 CPU
                   cores)
  --smoke          seconds: a small net, 2 meta steps of 2 sequences x 5 sub-tasks x 3 steps
Any explicit flag overrides the preset's value.

Examples:
  python examples/continual_sine.py
  python examples/continual_sine.py --meta-steps 200 --seeds 0,1,2
  python examples/continual_sine.py --preset retention
  python examples/continual_sine.py --preset paper --meta-steps 2000
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets up sys.path, the Keras backend and matplotlib)
from _continual_sine_config import (  # noqa: E402,F401  (no TensorFlow: --help stays fast)
    EQ18_WEIGHTINGS,
    META_LR_SCHEDULES,
    PAPER_RANDOM_ORDER,
    PRESETS,
    WARP_INITS,
    Preset,
    add_experiment_arguments,
    resolve_config,
)

EXAMPLE = "continual_sine"
METHODS = ("sgd", "warpgrad")
METHOD_LABELS = {"sgd": "SGD", "warpgrad": "WarpGrad"}


# -- command line ------------------------------------------------------------------------------
def build_parser():
    return add_experiment_arguments(_common.make_parser(EXAMPLE, __doc__))


if __name__ == "__main__":
    # --help and flag errors are answered here, before TensorFlow loads (seconds).
    build_parser().parse_args()

import warpkeras  # noqa: E402  (before TensorFlow: it chooses TensorFlow's CPU kernels)

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from warpkeras import objectives as obj  # noqa: E402
from warpkeras.data import ContinualSineDistribution  # noqa: E402
from warpkeras.layers import ResidualWarpDense  # noqa: E402


# -- model, loss and meta-objective -------------------------------------------------------------
def half_mse(y_true, y_pred):
    """The sub-task loss of Eq. 17: half the mean squared error."""
    return 0.5 * tf.reduce_mean(
        tf.square(tf.cast(y_pred, tf.float32) - tf.cast(y_true, tf.float32))
    )


def build_model(hidden_units, warp_units, hidden_layers, seed):
    """The task learner with a residual warp block after every ReLU (App. K)."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((1,), name="x")]
    for i in range(hidden_layers):
        layers.append(keras.layers.Dense(hidden_units, activation="relu", name=f"dense{i + 1}"))
        layers.append(
            ResidualWarpDense(
                hidden_units=warp_units, num_layers=2, activation="tanh", name=f"warp{i + 1}"
            )
        )
    layers.append(keras.layers.Dense(1, name="output"))
    return keras.Sequential(layers, name="continual_sine_learner")


def randomise_warps(model, seed):
    """Draws every dense map of the model's residual warp blocks like PyTorch's
    ``nn.Linear`` default: kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fixed by
    `seed`. The blocks then no longer start as the identity (``--warp-init random``)."""
    rng = np.random.default_rng([seed, 1905])
    for layer in model.layers:
        if isinstance(layer, ResidualWarpDense):
            for linear in layer.linears:
                bound = 1.0 / np.sqrt(linear.kernel.shape[0])
                for var in (linear.kernel, linear.bias):
                    if var is not None:
                        var.assign(rng.uniform(-bound, bound, var.shape).astype(var.dtype))


def make_meta_loss(num_subtasks, steps_per_subtask, weighting="appearances"):
    """The trainer's `meta_loss` hook: Eq. 18 on the meta batch ``(xv, yv, t)``.

    ``xv``, ``yv``: ``[T, points, 1]`` validation data of every sub-task, in presentation
    order; ``t``: the current sub-task, 1-based (an int32 tensor).
    """

    def meta_loss(partition, loss_fn, theta, phi, meta_batch, state):
        xv, yv, t = meta_batch
        batches = [(xv[i], yv[i]) for i in range(num_subtasks)]
        return obj.continual_objective(
            partition,
            loss_fn,
            theta,
            phi,
            batches,
            t,
            num_subtasks,
            steps_per_subtask,
            state=state,
            weighting=weighting,
        )

    return meta_loss


def sequence_task(task, cfg, rng, name):
    """A `warpkeras.Task` for one task sequence, presented left to right.

    Adaptation batches: 20 batches of 5 points per sub-task, in order. Meta batches: at
    step k, ``(validation x, validation y, t)`` with t = k // n + 1.
    """
    n, num_subtasks = cfg["steps_per_subtask"], cfg["subtasks"]
    xv, yv = task.validation_data(cfg["meta_val_points"], rng)

    def train(r):
        xs, ys, _ = task.training_batches(r, n, cfg["batch_size"])
        return iter(zip(xs, ys))

    def meta(r):
        k = 0
        while True:
            yield xv, yv, tf.constant(min(k // n + 1, num_subtasks), tf.int32)
            k += 1

    return warpkeras.Task(train=train, meta=meta, name=name, info={"params": task.params})


class SequenceSource:
    """Meta-training task source: fresh random task sequences."""

    def __init__(self, distribution, cfg):
        self.distribution = distribution
        self.cfg = cfg

    def sample(self, rng, n):
        return [
            sequence_task(self.distribution.sample(rng), self.cfg, rng, f"sequence{i}")
            for i in range(n)
        ]


# -- evaluation ---------------------------------------------------------------------------------
def make_evaluator(partition, num_subtasks, learning_rate):
    """Compiled runs of one task sequence from θ0.

    ``losses(phi, xs, ys, xv, yv)``: SGD steps on the batches ``xs``/``ys`` ``[K, B, 1]``;
    returns the validation loss of every sub-task ``[K+1, T]`` (row k: after k steps) on
    ``xv``/``yv`` ``[T, points, 1]``.
    ``predictions(phi, xs, ys, grid)``: the predictions on ``grid`` ``[G, 1]`` after every
    step, ``[K+1, G]``.
    """
    theta0 = partition.initial_task_values()
    lr = tf.constant(learning_rate, tf.float32)

    def per_subtask(theta, phi, xv, yv):
        pred, _ = partition.call(theta, phi, tf.reshape(xv, [-1, 1]))
        err = tf.square(pred - tf.reshape(yv, [-1, 1]))
        return 0.5 * tf.reduce_mean(tf.reshape(err, [num_subtasks, -1]), axis=1)

    @tf.function(reduce_retracing=True)
    def losses(phi, xs, ys, xv, yv):
        steps = tf.shape(xs)[0]
        out = tf.TensorArray(tf.float32, size=steps + 1)
        theta = list(theta0)
        out = out.write(0, per_subtask(theta, phi, xv, yv))
        for k in tf.range(steps):
            theta = obj.task_step(partition, half_mse, theta, phi, (xs[k], ys[k]), lr).theta
            out = out.write(k + 1, per_subtask(theta, phi, xv, yv))
        return out.stack()

    @tf.function(reduce_retracing=True)
    def predictions(phi, xs, ys, grid):
        steps = tf.shape(xs)[0]
        out = tf.TensorArray(tf.float32, size=steps + 1)
        theta = list(theta0)
        out = out.write(0, partition.call(theta, phi, grid)[0][:, 0])
        for k in tf.range(steps):
            theta = obj.task_step(partition, half_mse, theta, phi, (xs[k], ys[k]), lr).theta
            out = out.write(k + 1, partition.call(theta, phi, grid)[0][:, 0])
        return out.stack()

    return losses, predictions


def evaluation_data(cfg, seed, orders):
    """Held-out task sequences with their batches for every order (fixed by the seed)."""
    rng = np.random.default_rng([seed, 7, 2019])
    distribution = ContinualSineDistribution(num_subtasks=cfg["subtasks"])
    data = []
    for _ in range(cfg["eval_tasks"]):
        task = distribution.sample(rng)
        xv, yv = task.validation_data(cfg["eval_points"], rng)
        streams = {}
        for name, order in orders.items():
            xs, ys, ids = task.training_batches(
                rng, cfg["steps_per_subtask"], cfg["batch_size"], order=order
            )
            streams[name] = (xs, ys)
        data.append({"task": task, "xv": xv, "yv": yv, "streams": streams})
    return data


def forgetting_and_learning(curve, order, n):
    """From one run's ``[K+1, T]`` losses: the loss of each sub-task right after its own n
    steps, and how much it rose by the end (for every sub-task but the last presented)."""
    just_learned, forgetting = [], []
    for position, subtask in enumerate(order):
        after = curve[(position + 1) * n, subtask]
        just_learned.append(after)
        if position < len(order) - 1:
            forgetting.append(curve[-1, subtask] - after)
    return float(np.mean(just_learned)), float(np.mean(forgetting)) if forgetting else 0.0


def evaluate(cfg, evaluator, phis, data, orders, verbose):
    """Runs every method on every held-out sequence in every order; returns raw curves
    ``{order: {method: [K+1, T] per sequence}}``."""
    losses_fn, _ = evaluator
    curves = {o: {m: [] for m in phis} for o in orders}
    total = len(data) * len(orders) * len(phis)
    bar = keras.utils.Progbar(total, unit_name="run") if verbose else None
    done = 0
    for item in data:
        xv, yv = tf.constant(item["xv"]), tf.constant(item["yv"])
        for order_name in orders:
            xs, ys = (tf.constant(a) for a in item["streams"][order_name])
            for method, phi in phis.items():
                curves[order_name][method].append(losses_fn(phi, xs, ys, xv, yv).numpy())
                done += 1
                if bar is not None:
                    bar.update(done)
    return curves


def sequence_runs(cfg, key, count, points):
    """``count`` task sequences in the training order from their own random stream
    ``np.random.default_rng(key)``, as ``[(xs, ys, xv, yv)]`` tensors: the training batches
    ``[K, batch, 1]`` and ``points`` validation points per sub-task ``[T, points, 1]``, the
    arguments of `make_evaluator`'s ``losses`` after φ."""
    T, n = cfg["subtasks"], cfg["steps_per_subtask"]
    rng = np.random.default_rng(list(key))
    distribution = ContinualSineDistribution(num_subtasks=T)
    runs = []
    for _ in range(count):
        task = distribution.sample(rng)
        xv, yv = task.validation_data(points, rng)
        xs, ys, _ = task.training_batches(rng, n, cfg["batch_size"], order=list(range(T)))
        runs.append(tuple(tf.constant(a) for a in (xs, ys, xv, yv)))
    return runs


def eq18_along_curve(curve, num_subtasks, steps_per_subtask, weighting="appearances"):
    """The continual meta-objective (Eq. 18) of one run, averaged over its K steps.

    Args:
        curve: ``[K+1, T]`` validation losses of every sub-task after k steps (row k), in
            the training order (`make_evaluator`'s ``losses``).
        num_subtasks: T.
        steps_per_subtask: n (K = n T).
        weighting: as `warpkeras.objectives.continual_weights`.

    Returns:
        float: the mean over k = 1..K of Σ_{i ≤ t} w_i L_i(θ_k), with t = ⌈k / n⌉ the
        sub-task step k was taken on: what the meta-objective scores after each inner step
        in meta-training (a half MSE, weighted).
    """
    curve = np.asarray(curve)
    total = 0.0
    K = curve.shape[0] - 1
    for k in range(1, K + 1):
        t = min((k - 1) // steps_per_subtask + 1, num_subtasks)
        w = obj.continual_weights(num_subtasks, steps_per_subtask, weighting, current_subtask=t)
        total += sum(w[i] * curve[k, i] for i in range(t))
    return total / K


class SelectWarpByEq18(keras.callbacks.Callback):
    """Keeps the warp with the lowest validation meta-objective: scores the current warp
    every `every` meta steps and at meta step `last`, logs the score as ``val_eq18`` (only
    at those steps, as `fit` logs its ``val_*``), and sets φ back to the best-scoring warp
    when training ends.

    Args:
        score: ``() -> float``, the validation meta-objective of the current warp.
        partition: the trainer's `warpkeras.Partition` (φ is read and restored there).
        every: int >= 1, meta steps between scores.
        last: int, the last meta step (1-based), always scored.

    Attributes:
        scores: ``[(meta step, score)]``; best_step, best: the selected meta step and its
        score (``None`` / inf before any score).
    """

    def __init__(self, score, partition, every, last):
        super().__init__()
        self.score, self.partition, self.every, self.last = score, partition, every, last
        self.scores, self.best_step, self.best, self._best_phi = [], None, float("inf"), None

    def on_epoch_end(self, epoch, logs=None):
        step = epoch + 1
        if step % self.every and step != self.last:
            return
        value = float(self.score())
        self.scores.append((step, value))
        if logs is not None:
            logs["val_eq18"] = value
        if value < self.best:  # a NaN score is never selected
            self.best, self.best_step = value, step
            self._best_phi = [np.array(v) for v in self.partition.warp_values()]

    def on_train_end(self, logs=None):
        if self._best_phi is not None:
            for var, value in zip(self.partition.warp_variables, self._best_phi):
                var.assign(value)


def selection_callbacks(cfg, seed, partition, evaluator):
    """With ``cfg["select_every"]`` > 0: ``[SelectWarpByEq18]`` scoring the warp on
    ``cfg["select_sequences"]`` validation sequences; else ``[]``.

    The validation sequences come from their own random stream (seed, 13, 2019), apart from
    the meta-training sequences and the held-out evaluation sequences (seed, 7, 2019); they
    are learned in the training order, as in meta-training, and scored with the
    meta-training weighting of Eq. 18 (`eq18_along_curve`).
    """
    if not cfg.get("select_every"):
        return []
    T, n = cfg["subtasks"], cfg["steps_per_subtask"]
    runs = sequence_runs(cfg, (seed, 13, 2019), cfg["select_sequences"], cfg["eval_points"])
    losses_fn = evaluator[0]
    weighting = cfg.get("eq18_weighting", "appearances")

    def score():
        phi = partition.warp_values()
        return float(
            np.mean(
                [eq18_along_curve(losses_fn(phi, *run).numpy(), T, n, weighting) for run in runs]
            )
        )

    return [SelectWarpByEq18(score, partition, cfg["select_every"], cfg["meta_steps"])]


def summarise(curves, orders, n):
    """Per order and method: final losses, forgetting, loss over the sequence, mean curves."""
    out = {}
    for order_name, order in orders.items():
        out[order_name] = {"order": order}
        for method, runs in curves[order_name].items():
            runs = np.asarray(runs)  # [tasks, K+1, T]
            learned, forgot = zip(*[forgetting_and_learning(c, order, n) for c in runs])
            out[order_name][method] = {
                "final_loss": _common.stats(runs[:, -1, :].mean(axis=1)),
                "final_loss_per_subtask": runs[:, -1, :].mean(axis=0),
                "loss_over_sequence": _common.stats(runs.mean(axis=(1, 2))),
                "loss_after_own_steps": _common.stats(learned),
                "forgetting": _common.stats(forgot),
                "mean_log_loss_curve": np.log(np.maximum(runs, 1e-12)).mean(axis=0),
                "mean_loss_curve": runs.mean(axis=0),
            }
    return out


def retention(curves, orders, n):
    """Retention matrices: per order and method, ``R[i, j]`` = the validation loss on sub-task i
    after the last of the n steps on the j-th presented sub-task, mean over sequences.

    Args:
        curves: ``{order: {method: [K+1, T] per sequence}}`` (`evaluate`'s raw curves).
        orders: ``{order name: presentation order}`` (lists of sub-task ids).
        n: SGD steps per sub-task.

    Returns:
        Per order: ``loss_on_subtask`` (row i: sub-task ids 0..T-1), ``after_learning``
        (column j: the sub-task learned j-th, its last step at ``after_step[j]`` = (j+1) n;
        in the training order column j is sub-task j), ``matrix`` ``{method: [T, T]}``,
        ``earlier_subtasks`` (all but the last presented), ``earlier_final_loss`` (per method,
        stats over sequences of the mean loss on those sub-tasks after the whole sequence)
        and ``ratio_warpgrad_to_sgd`` of their means.
    """
    out = {}
    for order_name, order in orders.items():
        after_step = [(j + 1) * n for j in range(len(order))]
        earlier = list(order[:-1])
        entry = {
            "loss_on_subtask": list(range(len(order))),
            "after_learning": list(order),
            "after_step": after_step,
            "earlier_subtasks": earlier,
            "matrix": {},
            "earlier_final_loss": {},
        }
        for method, runs in curves[order_name].items():
            runs = np.asarray(runs)  # [sequences, K+1, T]
            entry["matrix"][method] = runs[:, after_step, :].mean(axis=0).T  # [T (i), T (j)]
            entry["earlier_final_loss"][method] = _common.stats(
                runs[:, -1, earlier].mean(axis=1) if earlier else []
            )
        means = {m: entry["earlier_final_loss"][m]["mean"] for m in METHODS}
        # None when a method has no finite sequence (its mean is None) or SGD's mean is 0
        entry["ratio_warpgrad_to_sgd"] = (
            means["warpgrad"] / means["sgd"]
            if earlier and means["sgd"] and means["warpgrad"] is not None
            else None
        )
        out[order_name] = entry
    return out


def earlier_label(order):
    """'sub-tasks 1–4' style name (1-based, by presentation) of all but the last sub-task."""
    count = len(order) - 1
    return "sub-task 1" if count == 1 else f"sub-tasks 1–{count}"


# -- plots ---------------------------------------------------------------------------------------
def plot_losses(path, summary, orders, n, num_subtasks, title):
    """Fig. 9: mean validation loss of each sub-task vs step (log axis); rows WarpGrad / SGD,
    columns the two orders. The diamond at the last step is the final loss of the panel's
    title: the mean over sub-tasks (and sequences) after all steps."""
    plt = _common.pyplot()
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, num_subtasks))
    fig, axes = plt.subplots(
        2, len(orders), figsize=(6.0 * len(orders), 7.8), sharey=True, squeeze=False
    )
    for col, (order_name, order) in enumerate(orders.items()):
        for row, method in enumerate(("warpgrad", "sgd")):
            ax = axes[row, col]
            curve = np.asarray(summary[order_name][method]["mean_loss_curve"])
            steps = np.arange(curve.shape[0])
            for s in range(num_subtasks):
                ax.plot(
                    steps,
                    curve[:, s],
                    color=colors[s],
                    lw=1.5,
                    label=f"sub-task {s}: x in [{-5 + 10 * s / num_subtasks:.0f}, "
                    f"{-5 + 10 * (s + 1) / num_subtasks:.0f}]",
                )
            for position, s in enumerate(order):
                ax.axvspan(position * n, (position + 1) * n, color=colors[s], alpha=0.08)
                ax.axvline(position * n, color="grey", lw=0.5, ls=":")
            final = summary[order_name][method]["final_loss"]["mean"]
            ax.plot(
                [steps[-1]],
                [final],
                "D",
                color="black",
                ms=6,
                zorder=5,
                label="final loss: mean over sub-tasks",
            )
            ax.set_title(
                f"{METHOD_LABELS[method]}, {order_name.replace('_', ' ')} {order}: "
                f"final loss {final:.3f}",
                fontsize=10,
            )
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("adaptation step (shading: sub-task being trained)")
            if col == 0:
                ax.set_ylabel("validation loss (half MSE, log scale)")
            ax.set_xticks(np.arange(0, steps[-1] + 1, n))  # sub-task boundaries
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _common.save_figure(fig, path, rect=(0, 0.08, 1, 1))


def plot_predictions(path, item, predictions, grid, orders, n, num_subtasks):
    """Fig. 10: one held-out task; rows: after each presented sub-task; columns: method and
    order. Ground truth black, before adaptation dashed green, after adaptation red."""
    plt = _common.pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    columns = [(o, m) for o in orders for m in ("warpgrad", "sgd")]
    fig, axes = plt.subplots(
        num_subtasks,
        len(columns),
        figsize=(3.2 * len(columns), 1.9 * num_subtasks + 1.2),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    x = grid[:, 0]
    truth = item["task"](x)
    edges = np.linspace(-5, 5, num_subtasks + 1)
    for col, (order_name, method) in enumerate(columns):
        order = orders[order_name]
        preds = predictions[(order_name, method)]
        for position, subtask in enumerate(order):
            ax = axes[position, col]
            for seen in order[:position]:
                ax.axvspan(edges[seen], edges[seen + 1], color="grey", alpha=0.12)
            ax.axvspan(edges[subtask], edges[subtask + 1], color="tab:orange", alpha=0.25)
            ax.plot(x, truth, color="black", lw=1.2)
            ax.plot(x, preds[0], color="tab:green", ls="--", lw=1.0)
            ax.plot(x, preds[(position + 1) * n], color="tab:red", lw=1.2)
            if position == 0:
                ax.set_title(f"{METHOD_LABELS[method]}, {order_name.replace('_', ' ')}", fontsize=9)
            ax.text(
                0.02,
                0.04,
                f"after sub-task {subtask}",
                transform=ax.transAxes,
                fontsize=7,
                color="tab:red",
            )
            if col == 0:
                ax.set_ylabel(
                    f"{position + 1} sub-task{'s' if position else ''} seen\ny = f(x)", fontsize=8
                )
            if position == len(order) - 1:
                ax.set_xlabel("x", fontsize=8)
    legend = [
        Line2D([], [], color="black", lw=1.2, label="truth f(x)"),
        Line2D([], [], color="tab:green", ls="--", lw=1.0, label="prediction before adaptation"),
        Line2D(
            [],
            [],
            color="tab:red",
            lw=1.2,
            label="prediction after training up to the highlighted sub-task",
        ),
        Patch(color="tab:orange", alpha=0.25, label="sub-task just trained"),
        Patch(color="grey", alpha=0.12, label="earlier sub-tasks"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"One held-out task, learned one sub-task at a time ({n} steps each)", fontsize=10)
    return _common.save_figure(fig, path, rect=(0, 0.06, 1, 1))


def plot_retention(path, ret, n, title):
    """Retention matrices as heat maps: rows the orders; columns SGD, WarpGrad (one shared
    logarithmic colour scale, every cell annotated) and the losses on every sub-task after the
    whole sequence (the matrices' last column) of both methods side by side."""
    plt = _common.pyplot()
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    values = np.concatenate([np.ravel(m) for e in ret.values() for m in e["matrix"].values()])
    values = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=float(values.min()), vmax=float(values.max())) if values.size else None
    cmap = plt.get_cmap("viridis")
    bar_colors = {"sgd": "tab:grey", "warpgrad": "tab:purple"}
    fig, axes = plt.subplots(
        len(ret),
        4,
        figsize=(16.5, 5.0 * len(ret)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 1, 0.05, 1.1]},
    )
    image = None
    for row, (order_name, entry) in enumerate(ret.items()):
        order, T = entry["after_learning"], len(entry["after_learning"])
        label = order_name.replace("_", " ")
        for col, method in enumerate(METHODS):
            ax = axes[row, col]
            matrix = np.asarray(entry["matrix"][method], dtype=float)
            image = ax.imshow(matrix, cmap=cmap, norm=norm, origin="upper")
            for i in range(T):
                for j in range(T):
                    v = matrix[i, j]
                    shade = norm(v) if norm is not None and np.isfinite(v) and v > 0 else 0.0
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if shade > 0.6 else "white",
                        fontweight="bold" if order[j] == i else "normal",
                    )
            ax.set_xticks(
                range(T),
                [f"{s}\n(step {k})" for s, k in zip(order, entry["after_step"])],
                fontsize=8,
            )
            ax.set_yticks(
                range(T),
                [
                    f"{i}: x in [{-5 + 10 * i / T:.0f}, {-5 + 10 * (i + 1) / T:.0f}]"
                    for i in range(T)
                ],
                fontsize=8,
            )
            ax.set_xlabel(
                f"after learning sub-task j ({n} steps each, in presentation order)", fontsize=9
            )
            ax.set_ylabel("loss on sub-task i", fontsize=9)
            ax.set_title(
                f"{METHOD_LABELS[method]}, {label} {order}\n"
                "bold: sub-task just learned; last column: after the whole sequence",
                fontsize=9,
            )
        bar = fig.colorbar(image, cax=axes[row, 2])
        bar.set_label("loss on sub-task i: half MSE (Eq. 17); log scale, shared", fontsize=8)
        bar.ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        bar.ax.yaxis.set_minor_formatter(NullFormatter())
        ax = axes[row, 3]
        width = 0.38
        for k, method in enumerate(METHODS):
            final = np.asarray(entry["matrix"][method], dtype=float)[:, -1]
            bars = ax.bar(
                np.arange(T) + (k - 0.5) * width,
                final,
                width,
                color=bar_colors[method],
                label=METHOD_LABELS[method],
            )
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(
            range(T),
            [f"{i}\n(learned last)" if i == order[-1] else str(i) for i in range(T)],
            fontsize=8,
        )
        ax.set_xlabel("sub-task i", fontsize=9)
        ax.set_ylabel("loss after the whole sequence (half MSE)", fontsize=9)
        earlier = entry["earlier_final_loss"]
        if entry["ratio_warpgrad_to_sgd"] is not None:
            ax.set_title(
                f"{label}: loss after the whole sequence (last column)\nmean on "
                f"{earlier_label(order)} ({', '.join(map(str, entry['earlier_subtasks']))}"
                f"), learned before the last:\nSGD {earlier['sgd']['mean']:.3f}, "
                f"WarpGrad "
                f"{earlier['warpgrad']['mean']:.3f}, ratio "
                f"{entry['ratio_warpgrad_to_sgd']:.2f}",
                fontsize=9,
            )
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _common.save_figure(fig, path)


def meta_learning_rate(cfg):
    """Adam's learning rate: ``cfg["meta_lr"]`` (constant, App. K), or with
    ``meta_lr_schedule="cosine"`` a `keras.optimizers.schedules.CosineDecay` from it to 0 over
    ``cfg["meta_steps"]`` warp updates."""
    if cfg.get("meta_lr_schedule", "constant") == "cosine":
        return keras.optimizers.schedules.CosineDecay(cfg["meta_lr"], cfg["meta_steps"])
    return cfg["meta_lr"]


def meta_optimizer(cfg):
    """The warp's meta optimiser: Adam at `meta_learning_rate`, the meta-gradient clipped to
    the global L2 norm ``cfg["meta_clipnorm"]`` first when it is set (not in App. K)."""
    return keras.optimizers.Adam(meta_learning_rate(cfg), global_clipnorm=cfg.get("meta_clipnorm"))


def run_seed(cfg, seed, orders):
    """Meta-trains the warp for one seed and evaluates SGD and WarpGrad."""
    T, n = cfg["subtasks"], cfg["steps_per_subtask"]
    model = build_model(cfg["hidden_units"], cfg["warp_units"], cfg["hidden_layers"], seed)
    trainer = warpkeras.WarpTrainer(
        model,
        loss=half_mse,
        mode="online",
        objective="exact",
        init_objective=None,
        inner_learning_rate=cfg["inner_lr"],
        inner_steps=T * n,
        meta_batch_size=cfg["meta_batch_size"],
        meta_optimizer=meta_optimizer(cfg),
        meta_loss=make_meta_loss(T, n, cfg.get("eq18_weighting", "appearances")),
        parallel=cfg["parallel"],
        seed=seed,
    )
    partition = trainer.partition
    phi_sgd = partition.warp_values()  # identity warps: plain SGD
    if cfg.get("warp_init", "random") == "random":
        randomise_warps(model, seed)
    source = SequenceSource(ContinualSineDistribution(num_subtasks=T), cfg)
    verbose = cfg["verbose"]
    if verbose:
        print(
            f"\nSeed {seed}: meta-training the warp, {cfg['meta_steps']} meta steps x "
            f"{cfg['meta_batch_size']} sequences x {T * n} steps (α = {cfg['inner_lr']})",
            flush=True,
        )
    evaluator = make_evaluator(partition, T, cfg["inner_lr"])
    callbacks = selection_callbacks(cfg, seed, partition, evaluator)
    with _common.Stopwatch() as train_time:
        history = trainer.fit(
            source, meta_steps=cfg["meta_steps"], verbose=verbose, callbacks=callbacks
        )
    selection = None
    if callbacks:
        select = callbacks[0]
        selection = {
            "scores": select.scores,
            "selected_meta_step": select.best_step,
            "selected_val_eq18": select.best,
        }
        if verbose:
            print(
                f"Selected the warp of meta step {select.best_step} "
                f"(validation Eq. 18: {select.best:.4f})",
                flush=True,
            )
    phis = {"sgd": phi_sgd, "warpgrad": partition.warp_values()}
    data = evaluation_data(cfg, seed, orders)
    if verbose:
        print(
            f"Evaluating on {len(data)} held-out sequences x {len(orders)} orders x "
            f"{len(phis)} methods",
            flush=True,
        )
    with _common.Stopwatch() as eval_time:
        curves = evaluate(cfg, evaluator, phis, data, orders, verbose)
    # Fig. 10 material: the first held-out sequence
    grid = np.linspace(-5, 5, 201, dtype=np.float32)[:, None]
    predictions = {}
    for order_name in orders:
        xs, ys = (tf.constant(a) for a in data[0]["streams"][order_name])
        for method, phi in phis.items():
            predictions[(order_name, method)] = evaluator[1](phi, xs, ys, tf.constant(grid)).numpy()
    record = {
        "seed": seed,
        "curves": curves,
        "meta_loss": [float(v) for v in history.history.get("meta_loss", [])],
        "train_loss": [float(v) for v in history.history.get("loss", [])],
        "nan_tasks": int(trainer.nan_tasks.numpy()),
        "warp_selection": selection,
        "trace_counts": dict(trainer.trace_counts),
        "meta_train_seconds": train_time.seconds,
        "seconds_per_meta_step": train_time.seconds / max(1, cfg["meta_steps"]),
        "eval_seconds": eval_time.seconds,
    }
    return record, model, (data[0], predictions, grid)


def export(model, cfg, export_dir):
    """Exports the meta-learned learner; checks that the SavedModel predicts like Keras."""
    info = _common.export_model(
        model,
        export_dir,
        loss=half_mse,
        learning_rate=cfg["inner_lr"],
        steps=cfg["steps_per_subtask"],
    )
    served = tf.saved_model.load(str(export_dir))
    probe = np.linspace(-5, 5, 11, dtype=np.float32)[:, None]
    if "serving_default" in info["signatures"]:
        out = served.signatures["serving_default"](x=tf.constant(probe))
        served_pred = list(out.values())[0].numpy()
    else:
        served_pred = served.serve(tf.constant(probe)).numpy()
    info["check"] = {
        "max_abs_difference_vs_keras": float(np.max(np.abs(served_pred - model(probe).numpy())))
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
    T, n = cfg["subtasks"], cfg["steps_per_subtask"]
    orders = {"training_order": list(range(T)), "random_order": cfg["random_order"]}
    records, export_info, first = [], None, None
    with _common.Stopwatch() as total:
        for seed in cfg["seeds"]:
            record, model, figure_data = run_seed(cfg, seed, orders)
            records.append(record)
            if first is None:
                first = figure_data
                if not args.no_export:
                    export_info = export(model, cfg, export_dir)
                    if cfg["verbose"]:
                        print(
                            f"Exported the meta-learned learner to {export_info['path']}",
                            flush=True,
                        )
    pooled = {
        o: {m: [c for r in records for c in r["curves"][o][m]] for m in METHODS} for o in orders
    }
    summary = summarise(pooled, orders, n)
    ret = retention(pooled, orders, n)

    title = (
        f"Continual sine regression: {T} sub-tasks x {n} steps, α = {cfg['inner_lr']}, "
        f"{cfg['meta_steps']} meta steps; mean over "
        f"{cfg['eval_tasks'] * len(cfg['seeds'])} held-out sequences"
    )
    plots = {
        "losses": str(plot_losses(out_dir / f"{EXAMPLE}_losses.png", summary, orders, n, T, title)),
        "predictions": str(
            plot_predictions(
                out_dir / f"{EXAMPLE}_predictions.png", first[0], first[1], first[2], orders, n, T
            )
        ),
        "retention": str(
            plot_retention(out_dir / f"{EXAMPLE}_retention.png", ret, n, "Retention: " + title)
        ),
    }
    for r in records:
        r["curves"] = {
            o: {m: np.asarray(c).mean(axis=0) for m, c in v.items()} for o, v in r["curves"].items()
        }
    output = {
        "example": EXAMPLE,
        "config": cfg,
        "metric_notes": {
            "final_loss": "validation loss (half MSE, Eq. 17) after all sub-tasks, averaged "
            "over the sub-tasks; mean/std over held-out sequences (and seeds)",
            "loss_over_sequence": "validation loss averaged over all steps and sub-tasks",
            "loss_after_own_steps": "loss of each sub-task right after its own n steps "
            "(how well it was learned), averaged over sub-tasks",
            "forgetting": "rise of each sub-task's loss from right after its own steps to the "
            "end of the sequence, averaged over all but the last sub-task",
            "mean_log_loss_curve": "[K+1, T]: mean over sequences of the log validation loss "
            "of every sub-task after k steps (Fig. 9)",
            "sgd": "plain SGD: the same model and θ0 with the identity (untrained) warp",
            "retention": "per order: matrix[method][i][j] = validation loss (half MSE) on "
            "sub-task i (row, sub-task id loss_on_subtask[i]) after the last step "
            "on the j-th presented sub-task (column, sub-task after_learning[j], "
            "step after_step[j]), mean over held-out sequences (and seeds); the "
            "last column is after the whole sequence. earlier_final_loss: stats "
            "over sequences of the mean loss on all but the last presented "
            "sub-task (earlier_subtasks) after the whole sequence; "
            "ratio_warpgrad_to_sgd: ratio of their means",
        },
        "results": summary,
        "retention": {
            "axes": ["loss_on_subtask", "after_learning"],
            "units": "validation loss, half mean squared error (Eq. 17)",
            **ret,
        },
        "per_seed": records,
        "plots": plots,
        "export": export_info,
        "wall_time_seconds": total.seconds,
        "environment": _common.environment(),
    }
    json_path = _common.write_json(out_dir / f"{EXAMPLE}.json", output)

    print(
        f"\nContinual sine regression ({cfg['preset']} size), seeds {cfg['seeds']}: "
        f"{cfg['eval_tasks']} held-out sequences per seed, {T} sub-tasks x {n} steps, "
        f"α = {cfg['inner_lr']}, {cfg['meta_steps']} meta steps:"
    )
    rows = []
    for order_name, order in orders.items():
        for method in ("sgd", "warpgrad"):
            s = summary[order_name][method]
            rows.append(
                [
                    f"{order_name.replace('_', ' ')} {order}",
                    METHOD_LABELS[method],
                    _common.format_stat(s["final_loss"], scale=1.0, digits=3),
                    _common.format_stat(s["forgetting"], scale=1.0, digits=3),
                    _common.format_stat(s["loss_over_sequence"], scale=1.0, digits=3),
                ]
            )
    _common.print_table(
        [
            "sub-task order",
            "method",
            "final loss (all sub-tasks)",
            "forgetting",
            "loss over sequence",
        ],
        rows,
    )
    for order_name, entry in ret.items():
        if entry["ratio_warpgrad_to_sgd"] is None:
            continue
        earlier = entry["earlier_final_loss"]
        print(
            f"{order_name.replace('_', ' ')}: mean loss on "
            f"{earlier_label(entry['after_learning'])} after the whole sequence: "
            f"SGD {earlier['sgd']['mean']:.3f}, WarpGrad {earlier['warpgrad']['mean']:.3f}, "
            f"ratio WarpGrad/SGD {entry['ratio_warpgrad_to_sgd']:.2f} (the sub-tasks learned "
            f"before the last, {entry['earlier_subtasks']} in 0-based labels)"
        )
    _common.print_written(json_path, plots.values(), export_info, total.seconds)
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
