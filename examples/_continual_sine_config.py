"""The command-line flags, size presets and configuration of examples/continual_sine.py,
without TensorFlow: `--help` of continual_sine.py and of the scripts built on it
(continual_sine_gradients.py) answers before TensorFlow loads."""

import dataclasses

import _common
import numpy as np

PAPER_RANDOM_ORDER = [1, 3, 4, 2, 0]
# The sub-task weightings of Eq. 18 (`warpkeras.objectives.CONTINUAL_WEIGHTINGS`), named
# here so that --help needs no TensorFlow.
EQ18_WEIGHTINGS = ("appearances", "printed", "average")
# How the residual warp blocks start (--warp-init).
WARP_INITS = ("identity", "random")
# The meta learning rate over meta-training (--meta-lr-schedule).
META_LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A size preset; `resolve_config` overrides its fields with explicit flags."""

    meta_steps: int = 40
    meta_batch_size: int = 5
    inner_lr: float = 0.01
    meta_lr: float = 0.0005
    hidden_units: int = 200
    warp_units: int = 100
    hidden_layers: int = 3
    subtasks: int = 5
    steps_per_subtask: int = 20
    batch_size: int = 5
    meta_val_points: int = 20
    eval_tasks: int = 20
    eval_points: int = 100
    random_order: list = dataclasses.field(default_factory=lambda: list(PAPER_RANDOM_ORDER))
    parallel: str = "unrolled"
    meta_clipnorm: float = None  # no clipping (App. K)
    eq18_weighting: str = "appearances"  # App. K's normalisation by appearances
    select_every: int = 0  # 0: keep the last φ (App. K); N: the best by validation Eq. 18
    select_sequences: int = 20
    seeds: list = dataclasses.field(default_factory=lambda: [0])


PRESETS = {
    "default": Preset(),
    "paper": Preset(meta_steps=20_000, inner_lr=0.001, meta_lr=0.001, eval_tasks=100),
    # the retention table's best setting (examples/README.md): the paper's α, wider warp
    # blocks, App. D's average weighting, twice the meta steps, the warp kept by its
    # validation Eq. 18
    "retention": Preset(
        meta_steps=80,
        inner_lr=0.001,
        warp_units=200,
        eq18_weighting="average",
        select_every=5,
        seeds=[0, 1, 2],
    ),
    "smoke": Preset(
        meta_steps=2,
        meta_batch_size=2,
        meta_lr=0.001,
        hidden_units=16,
        warp_units=8,
        hidden_layers=2,
        steps_per_subtask=3,
        meta_val_points=5,
        eval_tasks=2,
        eval_points=10,
    ),
}


def add_experiment_arguments(parser):
    """Adds continual_sine.py's experiment flags (sizes, rates, warps, selection) to
    `parser`, an `argparse.ArgumentParser` from `_common.make_parser`; returns it."""
    g = parser.add_argument_group("experiment (defaults: the preset's)")
    g.add_argument(
        "--preset",
        choices=("default", "paper", "retention"),
        default="default",
        help="size preset (--smoke overrides it); retention: the paper's α = "
        "0.001, 200-unit warp blocks, --eq18-weighting average, 80 meta "
        "steps, --select-every 5, seeds 0,1,2 (about 15 minutes on 2 cores)",
    )
    g.add_argument("--meta-steps", type=int, help="meta-training steps")
    g.add_argument("--meta-batch-size", type=int, help="task sequences per meta step")
    g.add_argument("--inner-lr", type=float, help="SGD learning rate α of the task learner")
    g.add_argument("--meta-lr", type=float, help="Adam learning rate of the warp")
    g.add_argument("--hidden-units", type=int, help="width of the task learner's hidden layers")
    g.add_argument("--warp-units", type=int, help="hidden units of each residual warp block")
    g.add_argument(
        "--hidden-layers", type=int, help="hidden ReLU layers (each followed by a warp block)"
    )
    g.add_argument("--subtasks", type=int, help="sub-tasks per sequence (T)")
    g.add_argument("--steps-per-subtask", type=int, help="SGD steps per sub-task (n)")
    g.add_argument("--batch-size", type=int, help="points per SGD batch")
    g.add_argument(
        "--meta-val-points", type=int, help="validation points per sub-task in the meta-objective"
    )
    g.add_argument("--eval-tasks", type=int, help="held-out task sequences")
    g.add_argument("--eval-points", type=int, help="evaluation points per sub-task")
    g.add_argument(
        "--random-order",
        type=_common.int_list,
        help="the second evaluation order, e.g. 1,3,4,2,0 (default: the paper's "
        "for 5 sub-tasks, else a permutation drawn from the seed)",
    )
    g.add_argument(
        "--parallel",
        choices=("sequential", "unrolled", "vectorized"),
        help="how the sequences of a meta-batch are adapted (WarpTrainer parallel=)",
    )
    g.add_argument(
        "--eq18-weighting",
        choices=EQ18_WEIGHTINGS,
        default=None,
        help="sub-task weights of the meta-objective: 1/(n(T-i+1)), App. K's "
        "normalisation by appearances; 1/(n(T-t+1)) as Eq. 18 prints it; or "
        "1/t, the average over the current and earlier sub-tasks of App. D "
        "(t: the current sub-task)",
    )
    g.add_argument(
        "--meta-lr-schedule",
        choices=META_LR_SCHEDULES,
        default="constant",
        help="constant: Adam at --meta-lr throughout (App. K); cosine: decayed from "
        "--meta-lr to 0 over the meta steps (keras CosineDecay)",
    )
    g.add_argument(
        "--meta-clipnorm",
        type=float,
        default=None,
        help="clip each meta-gradient to this global L2 norm before Adam's update "
        "(keras Adam global_clipnorm; default: no clipping, as in App. K)",
    )
    g.add_argument(
        "--select-every",
        type=int,
        default=None,
        metavar="N",
        help="every N meta steps (and at the last) score the warp by the "
        "meta-objective (Eq. 18, the chosen weighting) on validation "
        "sequences of their own, and keep the best-scoring warp (logged as "
        "val_eq18). Default 0: the warp of the last meta step, as App. K",
    )
    g.add_argument(
        "--select-sequences",
        type=int,
        default=None,
        metavar="M",
        help="validation sequences for --select-every (default 20; drawn apart "
        "from the meta-training and the held-out evaluation sequences)",
    )
    g.add_argument(
        "--warp-init",
        choices=WARP_INITS,
        default="random",
        help="random (default): all dense maps of the warp blocks drawn like "
        "PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as "
        "the authors' released WarpGrad code leaves its warp layers (App. K "
        "does not state the initialisation); identity: every block starts as "
        "the identity (zero last map), so meta-training starts from plain "
        "SGD. The SGD baseline is always the identity warp",
    )
    return parser


def resolve_config(args):
    """Merges the preset (``smoke`` when --smoke) with explicit flags into a dict."""
    preset = "smoke" if args.smoke else args.preset
    cfg = dict(dataclasses.asdict(PRESETS[preset]), preset=preset, verbose=args.verbose)
    for key in (
        "meta_steps",
        "meta_batch_size",
        "inner_lr",
        "meta_lr",
        "hidden_units",
        "warp_units",
        "hidden_layers",
        "subtasks",
        "steps_per_subtask",
        "batch_size",
        "meta_val_points",
        "eval_tasks",
        "eval_points",
        "random_order",
        "parallel",
        "seeds",
        "eq18_weighting",
        "warp_init",
        "meta_lr_schedule",
        "meta_clipnorm",
        "select_every",
        "select_sequences",
    ):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    for key in (
        "meta_steps",
        "meta_batch_size",
        "hidden_units",
        "warp_units",
        "hidden_layers",
        "subtasks",
        "steps_per_subtask",
        "batch_size",
        "meta_val_points",
        "eval_tasks",
        "eval_points",
    ):
        if cfg[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("inner_lr", "meta_lr"):
        if not cfg[key] > 0:
            raise SystemExit(f"--{key.replace('_', '-')} must be > 0, got {cfg[key]}")
    if cfg["select_every"] < 0:
        raise SystemExit(
            f"--select-every must be >= 0 (0: no selection), got {cfg['select_every']}"
        )
    if cfg["select_sequences"] < 1:
        raise SystemExit(f"--select-sequences must be >= 1, got {cfg['select_sequences']}")
    clip = cfg["meta_clipnorm"]
    if clip is not None and not (np.isfinite(clip) and clip > 0):
        raise SystemExit(
            f"--meta-clipnorm must be a finite number > 0, got {clip} (leave "
            "the flag out for no clipping)"
        )
    T = cfg["subtasks"]
    order = cfg["random_order"]
    if args.random_order is not None and sorted(order) != list(range(T)):
        raise SystemExit(f"--random-order must be a permutation of 0..{T - 1}, got {order}")
    if sorted(order) != list(range(T)):
        rng = np.random.default_rng([cfg["seeds"][0], 31])
        order = list(range(T))
        while T > 1 and order == list(range(T)):  # a random order other than the training one
            order = [int(i) for i in rng.permutation(T)]
    cfg["random_order"] = order
    return cfg
