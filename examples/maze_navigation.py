"""Maze navigation with a Warp-RNN (WarpGrad App. J, Fig. 8).

The environment is the grid maze of Miconi et al. (`warpkeras.envs.MazeVectorEnv`, 11x11):
each episode (200 steps) hides a goal in a random free cell; the agent sees only the walls
around it, its previous action and reward and the time, gets +10 when it reaches the goal
and is then teleported to a random cell, so a good agent explores, finds the goal and then
returns to it as often as it can. Learning where the goal is happens inside an episode, in
the RNN's hidden state; learning *how* to do that happens across episodes, in the weights.

The learner is advantage actor-critic (A2C) with a basic RNN (100 tanh units) whose hidden
state feeds a policy head (logits of a categorical distribution over the 4 moves) and
a value head. The loss of a batch of 30 episodes is

    L = -mean(log π(a_t | h_t) · sg[A_t]) + c_v · mean(A_t²) - c_e · mean(H[π(· | h_t)]),

with advantages A_t = R_t - V(h_t) and discounted returns R_t (γ = 0.9, as in Miconi et al.;
full-episode returns by default, n-step returns bootstrapped on the value with --n-step).
Task parameters (the RNN's W, V, b and both heads) are trained with Adam (1e-3) on every
batch. Methods (--methods):

  warp_rnn   Warp-RNN (`warpkeras.layers.WarpRNNCell`, Eq. 15): a meta-LSTM emits diagonal
             modulations of the RNN's W, V and b at every time step. The meta-LSTM and its
             projection are warp parameters, meta-learned by WarpGrad's continual algorithm
             (Algorithm 3) with the approximate objective: the warp gradient of every batch
             is accumulated and applied (Adam, --meta-lr) every 30th task update.
  rnn        the same RNN without a warp (`warpkeras.layers.TaskRNNCell`), Adam on θ.
  tnets      T-Nets-RNN (`warpkeras.layers.LinearWarpRNNCell`): linear warps T_h, T_x
             meta-learned exactly like the Warp-RNN's.
  hyper_rnn  (optional) the Warp-RNN architecture with every parameter, meta-LSTM included,
             trained by Adam at every step: App. J's control for the meta-LSTM's capacity.

The continual meta-training uses `warpkeras.WarpGrad`, WarpGrad's Algorithm 3 as
a Keras optimizer: ``optimizer.apply(grads, model.trainable_variables)`` steps the task
variables with the inner Adam and accumulates the warp gradients; every η = 30 calls the
meta Adam applies their mean. With the inner gradient held constant, the warp gradient of
batch k at θ_k is the approximate meta-gradient of the update that produced θ_k (App. D,
Eq. 13), so no extra forward pass is needed. All methods start from the same task
parameters θ0 and see the same goals (same environment seeds).

Each batch of episodes is collected in one compiled call (a `tf.while_loop` over time that
steps the numpy environment through `tf.numpy_function`), then the A2C loss re-runs the RNN
over the recorded observations for the gradient. No gradient clipping by default (the paper
does not mention any); --clip-norm clips the global gradient norm of both Adams.

Reported: the mean return per episode (cumulative reward over its 200 steps, averaged over
the batch of 30) at every update: the learning curve of Fig. 8. Outputs:
  <output-dir>/maze_navigation.json        curves, final returns, configuration, timings
  <output-dir>/maze_navigation_returns.png mean return vs update per method (median and
                                           inter-quartile range over seeds, smoothed)
  <export-dir>/                            the trained Warp-RNN agent as a SavedModel
                                           (Keras `model.export`: endpoint ``serve`` maps
                                           observation sequences [batch, time, 15] to policy
                                           logits and values)

Sizes:
  (no flags)       a demonstration of about 2 minutes on 2 CPU cores (9 when they are shared):
                   300 updates of 30 episodes x 200 steps per method (the warp is updated 10
                   times), 1 seed. At this size the agents have only begun to learn and one
                   seed cannot separate the methods; the paper's differences appear over far
                   longer training and 10 seeds.
  --preset paper   200 000 updates per method, 10 seeds (the paper's Fig. 8; days on a CPU)
  --smoke          seconds: 3 updates of 4 episodes x 10 steps, warp update every 2nd
Any explicit flag overrides the preset's value.

Examples:
  python examples/maze_navigation.py
  python examples/maze_navigation.py --updates 3000 --methods warp_rnn,rnn --seeds 0,1,2
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets up sys.path, the Keras backend and matplotlib)

EXAMPLE = "maze_navigation"
METHODS = ("warp_rnn", "rnn", "tnets", "hyper_rnn")
METHOD_LABELS = {
    "warp_rnn": "Warp-RNN (WarpGrad)",
    "rnn": "RNN (no warp)",
    "tnets": "T-Nets-RNN (linear warp)",
    "hyper_rnn": "HyperRNN (meta-LSTM trained every step)",
}
METHOD_COLORS = {
    "warp_rnn": "tab:red",
    "rnn": "tab:blue",
    "tnets": "tab:green",
    "hyper_rnn": "tab:purple",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A size preset; `resolve_config` overrides its fields with explicit flags."""

    updates: int = 300
    episodes: int = 30
    episode_length: int = 200
    maze_size: int = 11
    hidden: int = 100
    meta_units: int | None = None
    lr: float = 1e-3
    meta_lr: float = 1e-3
    meta_interval: int = 30
    gamma: float = 0.9
    n_step: int | None = None
    value_coef: float = 0.1
    entropy_coef: float = 0.03
    clip_norm: float | None = None
    methods: list = dataclasses.field(default_factory=lambda: ["warp_rnn", "rnn", "tnets"])
    seeds: list = dataclasses.field(default_factory=lambda: [0])


PRESETS = {
    "default": Preset(),
    "paper": Preset(updates=200_000, seeds=list(range(10))),
    "smoke": Preset(
        updates=3, episodes=4, episode_length=10, maze_size=7, hidden=8, meta_interval=2
    ),
}


# -- command line ---------------------------------------------------------------------------------
def build_parser():
    parser = _common.make_parser(EXAMPLE, __doc__)
    g = parser.add_argument_group("experiment (defaults: the preset's)")
    g.add_argument(
        "--preset",
        choices=("default", "paper"),
        default="default",
        help="size preset (--smoke overrides it)",
    )
    g.add_argument(
        "--methods",
        type=_common.choice_list(METHODS),
        help=f"comma-separated methods from {', '.join(METHODS)}",
    )
    g.add_argument("--updates", type=int, help="training updates (batches) per method")
    g.add_argument("--episodes", type=int, help="episodes (parallel mazes) per batch")
    g.add_argument("--episode-length", type=int, help="steps per episode")
    g.add_argument("--maze-size", type=int, help="side of the (odd) maze")
    g.add_argument("--hidden", type=int, help="RNN hidden units")
    g.add_argument(
        "--meta-units", type=int, help="meta-LSTM units of the Warp-RNN (default: --hidden)"
    )
    g.add_argument("--lr", type=float, help="Adam learning rate of the task parameters")
    g.add_argument("--meta-lr", type=float, help="Adam learning rate of the warp parameters")
    g.add_argument(
        "--meta-interval", type=int, help="task updates between warp updates (η of Algorithm 3)"
    )
    g.add_argument("--gamma", type=float, help="discount factor")
    g.add_argument(
        "--n-step",
        type=int,
        help="bootstrap the return on the value after this many rewards "
        "(default: full-episode returns)",
    )
    g.add_argument("--value-coef", type=float, help="weight of the value loss")
    g.add_argument("--entropy-coef", type=float, help="weight of the entropy bonus")
    g.add_argument("--clip-norm", type=float, help="global gradient-norm clipping (Adam)")
    return parser


if __name__ == "__main__":
    # --help and flag errors are answered here, before TensorFlow loads (seconds).
    build_parser().parse_args()

import warpkeras  # noqa: E402  (before TensorFlow: it chooses TensorFlow's CPU kernels)

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from warpkeras.envs import NUM_ACTIONS, MazeVectorEnv  # noqa: E402
from warpkeras.layers import LinearWarpRNNCell, TaskRNNCell, WarpRNNCell  # noqa: E402


# -- the agent ---------------------------------------------------------------------------------
def make_cell(method, hidden, meta_units):
    if method in ("warp_rnn", "hyper_rnn"):
        return WarpRNNCell(hidden, meta_units=meta_units, name="cell")
    if method == "tnets":
        return LinearWarpRNNCell(hidden, name="cell")
    if method == "rnn":
        return TaskRNNCell(hidden, name="cell")
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def build_agent(method, hidden, meta_units, obs_dim, seed):
    """The actor-critic: an RNN over observation sequences, a policy and a value head.

    Input ``[batch, time, obs_dim]``; outputs policy logits ``[batch, time, 4]`` and values
    ``[batch, time, 1]``.
    """
    keras.utils.set_random_seed(seed)
    obs = keras.Input((None, obs_dim), name="observations")
    h = keras.layers.RNN(make_cell(method, hidden, meta_units), return_sequences=True, name="rnn")(
        obs
    )
    logits = keras.layers.Dense(NUM_ACTIONS, name="policy")(h)
    value = keras.layers.Dense(1, name="value")(h)
    return keras.Model(obs, [logits, value], name=f"a2c_{method}")


def share_task_initialisation(models):
    """Gives every model the task parameters θ0 of the first one (same shapes required), so
    all methods start from the same RNN and heads."""
    source = warpkeras.partition(models[0]).initial_task_values()
    for model in models[1:]:
        part = warpkeras.partition(model)
        shapes = [tuple(v.shape) for v in part.task_variables]
        if shapes != [tuple(t.shape) for t in source]:
            raise ValueError(
                f"task variables of {model.name} {shapes} differ from "
                f"{[tuple(t.shape) for t in source]}"
            )
        part.assign_task(source)


def make_optimizer(method, model, cfg):
    """Adam on the task parameters; for warped methods, WarpGrad's Algorithm 3 around it."""

    def adam(lr):
        kwargs = {"global_clipnorm": cfg["clip_norm"]} if cfg["clip_norm"] else {}
        return keras.optimizers.Adam(lr, **kwargs)

    if method in ("warp_rnn", "tnets"):
        return warpkeras.WarpGrad(
            inner_optimizer=adam(cfg["lr"]),
            meta_optimizer=adam(cfg["meta_lr"]),
            meta_interval=cfg["meta_interval"],
            model=model,
        )
    return adam(cfg["lr"])


class A2C:
    """Rollouts on a `MazeVectorEnv` and advantage actor-critic updates of one agent."""

    def __init__(self, model, optimizer, cfg, seed):
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.seed = seed
        rnn = model.get_layer("rnn")
        self.cell = rnn.cell
        self.policy = model.get_layer("policy")
        self.value = model.get_layer("value")
        self.env = MazeVectorEnv(
            num_envs=cfg["episodes"],
            size=cfg["maze_size"],
            episode_length=cfg["episode_length"],
            autoreset=False,
        )
        self.obs_dim = self.env.single_observation_space.shape[0]
        self.started = False
        self.collect = tf.function(self._collect, reduce_retracing=True)
        self.train_step = tf.function(self._train_step, reduce_retracing=True)

    def _env_step(self, actions):
        obs, reward, _, _, _ = self.env.step(actions)
        return obs.astype(np.float32), reward.astype(np.float32)

    def _collect(self, obs, update):
        """The whole batch of episodes in one graph: a `tf.while_loop` over time whose body
        runs the RNN cell and the policy, samples actions (stateless seeds, so runs are
        reproducible) and steps the numpy environment through `tf.numpy_function`."""
        b, t_max = self.cfg["episodes"], self.cfg["episode_length"]
        states = [tf.zeros((b, d)) for d in np.atleast_1d(self.cell.state_size)]
        observations = tf.TensorArray(tf.float32, size=t_max)
        actions = tf.TensorArray(tf.int32, size=t_max)
        rewards = tf.TensorArray(tf.float32, size=t_max)
        base = tf.cast(update, tf.int32) * t_max
        for t in tf.range(t_max):
            observations = observations.write(t, obs)
            h, states = self.cell(obs, states)
            seed = tf.stack([tf.constant(self.seed, tf.int32), base + t])
            action = tf.cast(
                tf.random.stateless_categorical(self.policy(h), 1, seed)[:, 0], tf.int32
            )
            obs, reward = tf.numpy_function(
                self._env_step, [action], [tf.float32, tf.float32], stateful=True
            )
            obs = tf.ensure_shape(obs, [b, self.obs_dim])
            reward = tf.ensure_shape(reward, [b])
            actions = actions.write(t, action)
            rewards = rewards.write(t, reward)
        return (
            tf.transpose(observations.stack(), [1, 0, 2]),
            tf.transpose(actions.stack()),
            tf.transpose(rewards.stack()),
        )

    def rollout(self, update):
        """One batch of episodes with the current policy (new goals for every maze).

        Returns observations ``[B, T, obs]``, actions ``[B, T]`` and rewards ``[B, T]`` as
        tensors (the observation at step t is the one the action at step t was chosen on).
        """
        if not self.started:
            obs, _ = self.env.reset(seed=int(self.seed) * 100_003)
            self.started = True
        else:
            obs, _ = self.env.reset()
        return self.collect(tf.constant(obs, tf.float32), tf.constant(update, tf.int32))

    def _train_step(self, observations, actions, rewards):
        cfg = self.cfg
        gamma = cfg["gamma"]
        t_max = cfg["episode_length"]
        n = t_max if not cfg["n_step"] else min(int(cfg["n_step"]), t_max)
        with tf.GradientTape() as tape:
            logits, values = self.model(observations, training=True)
            values = values[..., 0]
            returns = discounted_returns(rewards, tf.stop_gradient(values), gamma, n)
            advantages = returns - values
            log_prob = -tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=actions, logits=logits
            )
            policy_loss = -tf.reduce_mean(log_prob * tf.stop_gradient(advantages))
            value_loss = tf.reduce_mean(tf.square(advantages))
            entropy = tf.reduce_mean(categorical_entropy(logits))
            loss = policy_loss + cfg["value_coef"] * value_loss - cfg["entropy_coef"] * entropy
        variables = self.model.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply(grads, variables)
        return {
            "loss": loss,
            "policy_loss": policy_loss,
            "value_loss": value_loss,
            "entropy": entropy,
        }


def categorical_entropy(logits):
    """Entropy of the categorical distributions with these `logits` (last axis: classes),
    ``-sum(p log p)``, computed as in TensorFlow Probability's ``Categorical.entropy``."""
    log_p = tf.nn.log_softmax(logits)
    return -tf.reduce_sum(tf.math.multiply_no_nan(log_p, tf.math.exp(log_p)), axis=-1)


def discounted_returns(rewards, values, gamma, n):
    """n-step discounted returns ``R_t = Σ_{i<n} γ^i r_{t+i} + γ^n V_{t+n}`` within an
    episode (no bootstrap past its end; ``n >= T`` gives full-episode returns).

    Args:
        rewards: ``[B, T]`` rewards.
        values: ``[B, T]`` value estimates (treated as constants).
        gamma: discount γ.
        n: the number of reward steps before bootstrapping.

    Returns:
        ``[B, T]`` returns.
    """
    rewards = tf.convert_to_tensor(rewards, tf.float32)
    t_max = rewards.shape[1]
    if n >= t_max:
        # full-episode returns, computed backwards with a scan over time
        reversed_r = tf.reverse(tf.transpose(rewards), [0])
        acc = tf.scan(
            lambda carry, r: r + gamma * carry, reversed_r, initializer=tf.zeros_like(rewards[:, 0])
        )
        return tf.transpose(tf.reverse(acc, [0]))
    padded = tf.pad(rewards, [[0, 0], [0, n]])
    total = tf.zeros_like(rewards)
    for i in range(n):
        total += (gamma**i) * padded[:, i : i + t_max]
    boot = tf.pad(values[:, n:], [[0, 0], [0, n]])  # V_{t+n}, zero past the end
    return total + (gamma**n) * boot


# -- one run -----------------------------------------------------------------------------------
def run_method(method, model, cfg, seed):
    """Trains one agent for `cfg['updates']` updates; returns its record."""
    optimizer = make_optimizer(method, model, cfg)
    agent = A2C(model, optimizer, cfg, seed)
    returns, losses, entropies = [], [], []
    verbose = cfg["verbose"]
    bar = keras.utils.Progbar(cfg["updates"], unit_name="update") if verbose == 1 else None
    with _common.Stopwatch() as clock:
        for update in range(cfg["updates"]):
            obs, actions, rewards = agent.rollout(update)
            logs = agent.train_step(obs, actions, rewards)
            ret = float(tf.reduce_mean(tf.reduce_sum(rewards, axis=1)))
            returns.append(ret)
            losses.append(float(logs["loss"]))
            entropies.append(float(logs["entropy"]))
            if bar is not None:
                bar.update(update + 1, values=[("return", ret), ("loss", losses[-1])])
            elif verbose == 2:
                print(
                    f"{method} update {update + 1}/{cfg['updates']} - return {ret:.2f} - "
                    f"loss {losses[-1]:.4f} - entropy {entropies[-1]:.3f}",
                    flush=True,
                )
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(
                    f"{method}: the A2C loss became non-finite at update {update + 1}; "
                    "try a smaller --lr or --clip-norm 4"
                )
    warp_updates = None
    if isinstance(optimizer, warpkeras.WarpGrad):
        warp_updates = int(optimizer.meta_optimizer.iterations.numpy())
    tail = max(1, len(returns) // 10)
    return {
        "seed": seed,
        "returns": returns,
        "losses": losses,
        "entropies": entropies,
        "final_return": float(np.mean(returns[-tail:])),
        "mean_return": float(np.mean(returns)),
        "warp_updates": warp_updates,
        "seconds": clock.seconds,
        "seconds_per_update": clock.seconds / max(1, cfg["updates"]),
        "parameters": {
            "task": int(sum(np.prod(v.shape) for v in warpkeras.partition(model).task_variables)),
            "warp": int(sum(np.prod(v.shape) for v in warpkeras.partition(model).warp_variables)),
        },
    }


# -- plots and summaries --------------------------------------------------------------------------
def smooth(values, window):
    """Trailing moving average (the first points average what is available)."""
    values = np.asarray(values, dtype=float)
    if window <= 1 or len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


def plot_returns(path, results, cfg):
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    window = max(1, cfg["updates"] // 20)
    for method, res in results.items():
        curves = np.array([smooth(r["returns"], window) for r in res["runs"]])
        x = np.arange(1, curves.shape[1] + 1)
        median = np.median(curves, axis=0)
        ax.plot(x, median, color=METHOD_COLORS[method], label=METHOD_LABELS[method])
        if len(curves) > 1:
            q1, q3 = np.percentile(curves, [25, 75], axis=0)
            ax.fill_between(x, q1, q3, color=METHOD_COLORS[method], alpha=0.2, linewidth=0)
    ax.set_xlabel(f"update (batch of {cfg['episodes']} episodes x {cfg['episode_length']} steps)")
    ax.set_ylabel("mean return per episode")
    ax.set_title(
        f"Maze navigation ({cfg['maze_size']}x{cfg['maze_size']}), "
        f"{len(cfg['seeds'])} seed(s); moving average over {window} updates"
    )
    ax.grid(alpha=0.3)
    _common.integer_ticks(ax, "x")
    ax.legend()
    return _common.save_figure(fig, path)


def summarise(method, runs):
    curves = np.array([r["returns"] for r in runs])
    return {
        "label": METHOD_LABELS[method],
        "final_return": _common.stats([r["final_return"] for r in runs]),
        "mean_return": _common.stats([r["mean_return"] for r in runs]),
        "mean_curve": curves.mean(axis=0),
        "warp_updates": runs[0]["warp_updates"],
        "parameters": runs[0]["parameters"],
        "seconds_per_update": float(np.mean([r["seconds_per_update"] for r in runs])),
        "train_seconds": float(np.sum([r["seconds"] for r in runs])),
        "runs": runs,
    }


def export_agent(model, export_dir):
    """Exports the trained agent with Keras's `model.export` (a SavedModel with a ``serve``
    endpoint). `warpkeras.export.export_adaptive` is for supervised models adapted by SGD on
    a support set, which an RL agent is not."""
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(export_dir), verbose=False)
    served = tf.saved_model.load(str(export_dir))
    probe = tf.zeros((1, 5, model.input_shape[-1]))
    logits, values = served.serve(probe)
    ref_logits, ref_values = model(probe)
    diff = float(max(np.max(np.abs(logits - ref_logits)), np.max(np.abs(values - ref_values))))
    return {
        "path": str(export_dir),
        "format": "keras_export",
        "signatures": ["serve"],
        "inputs": f"observations [batch, time, {model.input_shape[-1]}] float32",
        "outputs": ["policy logits [batch, time, 4]", "values [batch, time, 1]"],
        "check": {"max_abs_difference_vs_keras": diff},
    }


def resolve_config(args):
    """Merges the preset (``smoke`` when --smoke) with explicit flags into a dict."""
    preset = "smoke" if args.smoke else args.preset
    cfg = dict(dataclasses.asdict(PRESETS[preset]), preset=preset, verbose=args.verbose)
    for key in (
        "methods",
        "updates",
        "episodes",
        "episode_length",
        "maze_size",
        "hidden",
        "meta_units",
        "lr",
        "meta_lr",
        "meta_interval",
        "gamma",
        "n_step",
        "value_coef",
        "entropy_coef",
        "clip_norm",
        "seeds",
    ):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    for key in ("updates", "episodes", "episode_length", "hidden", "meta_interval"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["maze_size"] < 5 or cfg["maze_size"] % 2 == 0:
        raise SystemExit(f"--maze-size must be odd and >= 5, got {cfg['maze_size']}")
    if not 0.0 <= cfg["gamma"] <= 1.0:
        raise SystemExit(f"--gamma must be in [0, 1], got {cfg['gamma']}")
    if cfg["n_step"] is not None and cfg["n_step"] < 1:
        raise SystemExit(f"--n-step must be >= 1, got {cfg['n_step']}")
    return cfg


def main(argv=None):
    """Runs the example; returns the results dict (also written as JSON)."""
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    out_dir, export_dir = _common.output_dirs(args, EXAMPLE)
    obs_dim = MazeVectorEnv(num_envs=1, size=cfg["maze_size"]).single_observation_space.shape[0]
    records = {m: [] for m in cfg["methods"]}
    export_info = None
    with _common.Stopwatch() as total:
        for seed in cfg["seeds"]:
            models = {
                m: build_agent(m, cfg["hidden"], cfg["meta_units"], obs_dim, seed)
                for m in cfg["methods"]
            }
            share_task_initialisation(list(models.values()))
            for method, model in models.items():
                if cfg["verbose"]:
                    print(
                        f"\nSeed {seed}: {METHOD_LABELS[method]}, {cfg['updates']} updates of "
                        f"{cfg['episodes']} episodes x {cfg['episode_length']} steps",
                        flush=True,
                    )
                records[method].append(run_method(method, model, cfg, seed))
                if method == "warp_rnn" and export_info is None and not args.no_export:
                    export_info = export_agent(model, export_dir)
                    if cfg["verbose"]:
                        print(f"Exported the Warp-RNN agent to {export_dir}", flush=True)
        results = {m: summarise(m, records[m]) for m in cfg["methods"]}

    plots = {"returns": str(plot_returns(out_dir / f"{EXAMPLE}_returns.png", results, cfg))}
    output = {
        "example": EXAMPLE,
        "config": cfg,
        "metric_notes": {
            "returns": "per update: the cumulative reward of an episode (200 steps; +10 per "
            "goal reached, -0.1 per wall bump), averaged over the batch",
            "final_return": "mean return over the last 10% of updates; mean/std over seeds",
            "mean_return": "mean return over all updates (area under the learning curve)",
        },
        "results": results,
        "plots": plots,
        "export": export_info,
        "wall_time_seconds": total.seconds,
        "environment": _common.environment(),
    }
    json_path = _common.write_json(out_dir / f"{EXAMPLE}.json", output)

    print(
        f"\nMaze navigation ({cfg['preset']} size), seeds {cfg['seeds']}, {cfg['updates']} "
        f"updates of {cfg['episodes']} episodes x {cfg['episode_length']} steps:"
    )
    _common.print_table(
        ["method", "return, last 10%", "return, all updates", "warp updates", "s / update"],
        [
            [
                r["label"],
                _common.format_stat(r["final_return"], scale=1.0, digits=2),
                _common.format_stat(r["mean_return"], scale=1.0, digits=2),
                str(r["warp_updates"]) if r["warp_updates"] is not None else "-",
                f"{r['seconds_per_update']:.2f}",
            ]
            for r in results.values()
        ],
    )
    _common.print_written(json_path, plots.values(), export_info, total.seconds)
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
