"""Multi-shot Omniglot: Warp-Leap against Leap, Reptile, fine-tuning and no meta-training.

The protocol of the Leap paper (App. D) and WarpGrad (App. F): every alphabet is one 20-way
classification task (alphabets with fewer than 20 characters are dropped; larger ones use 20
characters chosen by the seed); 5 drawings per character are held out as the task's test
set, the other 15 are adaptation data, augmented by random affine transforms. A few
alphabets, chosen by the seed, are held out: meta-training never sees them, and the
meta-learned optimisers are evaluated by adapting to them from scratch for 100 SGD steps.

The learner is the papers' convolutional network: four blocks of [3x3 conv with 64 filters
("same" padding), 2x2 max-pooling, batch norm, ReLU] on 28x28 images, then a linear layer
on the 1x1x64 features. Warp-Leap inserts a warp layer after every block,
W ∘ ω4 ∘ h4 ∘ ... ∘ ω1 ∘ h1 (a 3x3 convolution by default, see --warp; the conv warps start
random, like PyTorch's default conv initialisation, or as the identity with --warp-init
identity); the convolutions, batch-norm scales/offsets and the head are the task
parameters. The warp is meta-learned offline (WarpGrad Algorithm 2: a replay buffer of
every visited task parameterisation, then one warp update per stored point) with the
approximate objective (Eq. 3 with the inner gradient stopped; --objective exact for Eq. 3)
on augmented meta-objective batches, and the initialisation with Leap (Eq. 9).

Methods (--methods):
  warp_leap  WarpGrad + Leap initialisation (warpkeras.WarpTrainer)
  leap       Leap (warpkeras.LeapTrainer)
  reptile    Reptile (warpkeras.ReptileTrainer)
  finetune   multi-headed fine-tuning: pre-train the body on the meta-training alphabets
             with one head per alphabet, fresh head on each new task (FineTuneTrainer)
  none       no meta-training: adapt from a random initialisation (NoMetaTrainer)
  sgd_large_batch
             no meta-training, SGD with a 10x larger task batch and learning rate
             (WarpGrad Table 2, "SGD‡"; not in the default --methods)
  kfac       no meta-training, K-FAC (warpkeras.KFAC, Martens & Grosse 2015; KFC for the
             convolutions) on the same 10x batches, learning rate --kfac-lr, damping
             --kfac-damping (WarpGrad Table 2, "KFAC‡"; not in the default --methods)
All methods of one seed start from the same random initialisation of the shared layers.

Protocols (--protocol):
  default    adaptation batches and meta-objective batches augmented by random affine
             transforms (independent draws: the warp is meta-learned so that a step on
             one augmented batch lowers the loss on another); test images clean; random
             warp initialisation (conv warps); approximate objective. Only Warp-Leap uses
             the meta-objective batches and the warp settings: the other methods run
             exactly as under clean meta batches.
  reference  the authors' Omniglot code: the default protocol, and the test images
             augmented too (one fixed draw per image and seed, the same for every method).
  Explicit --augment-meta / --augment-test / --warp-init / --objective flags override the
  protocol's choice; the previous default, clean meta batches with identity warps and the
  exact objective, is --no-augment-meta --warp-init identity --objective exact.

Reported per method (mean ± std over held-out tasks and seeds): test accuracy after the
last adaptation step and AUC, the area under the training-error curve (mean over steps of
1 - accuracy on the adaptation batches; lower is faster learning). Outputs:
  <output-dir>/omniglot.json           all numbers, configuration, timings, per-seed curves
  <output-dir>/omniglot_curves.png     test accuracy and training error vs adaptation step
  <export-dir>/                        the meta-learned Warp-Leap model as a SavedModel that
                                       adapts itself (signatures serving_default, adapt,
                                       adapt_and_predict)
With --ablation, the rows of WarpGrad's Table 3 (App. G: warp architectures, offline vs
online meta-training, exact vs approximate objective, learned learning rate) run at the
chosen size instead, written to omniglot_ablation.json and omniglot_ablation.png.
With --ngd-ablation, the rows of WarpGrad's Table 4 (App. H: warped geometry against natural
gradient descent) run instead, all from the seed's random initialisation (no meta-learned
θ0) with 10x task batches and a 10x learning rate: SGD, K-FAC, and WarpGrad meta-learning
only the warp (init_objective=None) with linear 3x3 conv warps or the expressive 2-layer
conv + BN + residual + ReLU warps; written to omniglot_ngd.json and omniglot_ngd.png with
the paper's Table 4 figures next to ours.

Sizes:
  (no flags)       a CPU-friendly run of a few minutes: 10 meta steps of 20 adaptation steps,
                   at most 20 warp updates per meta step, evaluation after 100 steps, 1 seed
  --preset paper   the reference setting: 50 meta steps, meta-batch 5, task batch 20,
                   100 adaptation steps, SGD 0.1 inside and outside, one warp update per
                   stored point (meta-interval 1, no cap), seeds 0,1,2
  --smoke          2 alphabets, 8 filters, 2 meta steps of 3 adaptation steps, 1 warp
                   update: about half a minute, mostly TensorFlow tracing the step
                   functions of five trainers and the export
Any explicit flag overrides the preset's value.

Data: the Omniglot copy in --data-dir (default: ../shared/data/omniglot next to the
repository, if present; its 7 usable alphabets give 5 meta-training and 2 held-out ones),
else warpkeras's default Omniglot folder or TensorFlow Datasets (--source tfds: the full
data set, 46 usable alphabets, 10 held out).

Examples:
  python examples/omniglot.py
  python examples/omniglot.py --preset paper --methods warp_leap,leap,none
  python examples/omniglot.py --warp residual2 --methods warp_leap
  python examples/omniglot.py --ablation --seeds 0,1
  python examples/omniglot.py --protocol reference --methods warp_leap,leap,none --seeds 0,1,2
  python examples/omniglot.py --methods sgd_large_batch,kfac,none
  python examples/omniglot.py --ngd-ablation
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets up sys.path, the Keras backend and matplotlib)

EXAMPLE = "omniglot"
METHODS = ("warp_leap", "leap", "reptile", "finetune", "none", "sgd_large_batch", "kfac")
DEFAULT_METHODS = ("warp_leap", "leap", "reptile", "finetune", "none")
# Methods that adapt with a LARGE_BATCH x larger task batch and learning rate (WarpGrad
# Table 2, ‡: "no meta-training, but 10x larger batch sizes (allows 10x larger learning
# rates)").
LARGE_BATCH = 10
LARGE_BATCH_METHODS = ("sgd_large_batch", "kfac")
METHOD_LABELS = {
    "warp_leap": "Warp-Leap",
    "leap": "Leap",
    "reptile": "Reptile",
    "finetune": "Fine-tuning (multi-headed)",
    "none": "No meta-training",
    "sgd_large_batch": "SGD, 10x batch and learning rate",
    "kfac": "KFAC, 10x batch",
}

# WarpGrad Table 2, 5 meta-training tasks (the nearest to the 5 meta-training alphabets of
# the shared 7-alphabet subset): test accuracy (%) after 100 steps on held-out alphabets of
# the full data set; KFAC and SGD (10x batch and learning rate) have no meta-training.
PAPER_TABLE2 = {
    "warp_leap": 75.0,
    "leap": 59.5,
    "reptile": 58.3,
    "finetune": 67.7,
    "kfac": 56.0,
    "sgd_large_batch": 51.0,
}
# The authors' Omniglot code on the shared 7-alphabet subset (its reference protocol, 50
# meta steps, seed 0): test accuracy (%) after 100 steps on the 2 held-out alphabets.
AUTHORS_CODE_SUBSET = {"warp_leap": 59.6, "leap": 53.2, "none": 20.2}

# The protocols of --protocol: the choices each switches on (explicit flags win).
PROTOCOLS = {
    # augmented meta batches: Warp-Leap 72.2% against Leap 60.7% (3 seeds, examples/README)
    "default": {
        "augment_meta": True,
        "augment_test": False,
        "warp_init": "random",
        "objective": "approx",
    },
    "reference": {
        "augment_meta": True,
        "augment_test": True,
        "warp_init": "random",
        "objective": "approx",
    },
}

# WarpGrad Table 4 (App. H): name -> (label, preconditioning, settings, the paper's
# accuracy mean and std in %, 4 seeds, 10x batch (200) and learning rate (1.0), no θ0
# meta-learning).
NGD_ROWS = {
    "sgd": ("SGD", "none", {"method": "sgd_large_batch"}, (40.1, 6.1)),
    "kfac": ("KFAC (NGD)", "linear (block-diagonal)", {"method": "kfac"}, (58.2, 3.2)),
    "warp_linear": (
        "WarpGrad, linear warps",
        "linear (block-diagonal)",
        {"method": "warp_only", "warp": "conv3x3"},
        (68.0, 4.4),
    ),
    "warp_expressive": (
        "WarpGrad, 2-layer conv + BN + Res + ReLU warps",
        "non-linear (full)",
        {"method": "warp_only", "warp": "residual2"},
        (81.3, 4.0),
    ),
}
WARPS = (
    "conv3x3",
    "conv1x1",
    "scaling",
    "conv_relu",
    "conv_bn",
    "conv_bn_relu",
    "residual",
    "residual2",
    "film",
)
CONV_WARPS = ("conv3x3", "conv1x1", "conv_relu")
WARP_LABELS = {
    "conv3x3": "3x3 conv",
    "conv1x1": "1x1 conv",
    "scaling": "Scaling",
    "conv_relu": "3x3 conv + ReLU",
    "conv_bn": "3x3 conv + BN",
    "conv_bn_relu": "3x3 conv + BN + ReLU",
    "residual": "3x3 conv + BN + Res + ReLU",
    "residual2": "2-layer 3x3 conv + BN + Res",
    "film": "2-layer 3x3 conv + BN + Res + TA",
}

# Batch-norm momentum of every batch-norm layer. Meta-training and evaluation run batch norm
# in training mode (batch statistics), so the moving statistics never enter them; with
# momentum 0 the moving statistics are those of the last batch seen, which is what the
# exported model needs: its `adapt_and_predict` adapts in training mode and then predicts
# in inference mode with the statistics of the last adaptation step.
BN_MOMENTUM = 0.0

# WarpGrad Table 3 (App. G): name -> (label, settings overriding the command line).
ABLATION_ROWS = {
    "leap": ("None (Leap)", {"method": "leap"}),
    "conv3x3": ("3x3 conv (default)", {"warp": "conv3x3"}),
    "conv3x3_approx": ("3x3 conv, approx objective", {"warp": "conv3x3", "objective": "approx"}),
    "conv3x3_online": ("3x3 conv, online", {"warp": "conv3x3", "meta_training": "online"}),
    "conv3x3_learned_lr": (
        "3x3 conv, learned α, μ",
        {"warp": "conv3x3", "learn_lr": True, "learn_momentum": True},
    ),
    "scaling": ("Scaling", {"warp": "scaling"}),
    "conv1x1": ("1x1 conv", {"warp": "conv1x1"}),
    "conv_relu": ("3x3 conv + ReLU", {"warp": "conv_relu"}),
    "conv_bn": ("3x3 conv + BN", {"warp": "conv_bn"}),
    "conv_bn_relu": ("3x3 conv + BN + ReLU", {"warp": "conv_bn_relu"}),
    "residual": ("3x3 conv + BN + Res + ReLU", {"warp": "residual"}),
    "residual2": ("2-layer 3x3 conv + BN + Res", {"warp": "residual2"}),
    "film": ("2-layer 3x3 conv + BN + Res + TA", {"warp": "film"}),
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A size preset; `resolve_config` overrides its fields with explicit flags."""

    seeds: list = dataclasses.field(default_factory=lambda: [0])
    meta_steps: int = 10
    inner_steps: int = 20
    eval_steps: int = 100
    eval_every: int = 10
    meta_batch_size: int = 5
    task_batch_size: int = 20
    max_warp_updates: int = 20
    meta_interval: int = 1
    inner_lr: float = 0.1
    meta_lr: float = 0.1
    filters: int = 64
    image_size: int = 28
    num_classes: int = 20
    num_train_alphabets: int | None = None
    num_test_alphabets: int | None = None


PRESETS = {
    "default": Preset(),
    "paper": Preset(
        seeds=[0, 1, 2], meta_steps=50, inner_steps=100, eval_every=5, max_warp_updates=0
    ),
    "smoke": Preset(
        meta_steps=2,
        inner_steps=3,
        eval_steps=3,
        eval_every=1,
        meta_batch_size=2,
        task_batch_size=8,
        max_warp_updates=1,
        filters=8,
        num_train_alphabets=1,
        num_test_alphabets=1,
    ),
}


# ------------------------------------------------------------------------------------------
# command line
def build_parser():
    """The command-line interface (see the module docstring, ``--help``)."""
    parser = _common.make_parser(EXAMPLE, __doc__)
    g = parser.add_argument_group("experiment")
    g.add_argument(
        "--preset",
        choices=("default", "paper"),
        default="default",
        help="size of the run; explicit flags override its values",
    )
    g.add_argument(
        "--methods",
        type=_common.choice_list(METHODS),
        default=",".join(DEFAULT_METHODS),
        help="comma-separated methods to compare (default: "
        + ",".join(DEFAULT_METHODS)
        + "; also: sgd_large_batch, kfac)",
    )
    g.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        default="default",
        help="default: augmented meta batches, clean test images, "
        "--warp-init random, --objective approx; reference: the authors' "
        "protocol, the same with augmented test images. Explicit "
        "--augment-meta/--augment-test/--warp-init/--objective flags win "
        "over the protocol's choice",
    )
    g.add_argument(
        "--ablation",
        action="store_true",
        help="run the rows of WarpGrad's Table 3 (App. G) instead of --methods",
    )
    g.add_argument(
        "--ablation-rows",
        type=_common.choice_list(tuple(ABLATION_ROWS)),
        default=None,
        help="subset of ablation rows (default: all): " + ", ".join(ABLATION_ROWS),
    )
    g.add_argument(
        "--ngd-ablation",
        action="store_true",
        help="run the rows of WarpGrad's Table 4 (App. H: SGD, KFAC, linear and "
        "expressive warps from a random initialisation) instead of --methods",
    )
    g.add_argument(
        "--ngd-rows",
        type=_common.choice_list(tuple(NGD_ROWS)),
        default=None,
        help="subset of --ngd-ablation rows (default: all): " + ", ".join(NGD_ROWS),
    )

    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder of a local Omniglot copy (default: ../shared/data/omniglot "
        "next to the repository if it exists, else warpkeras's default)",
    )
    g.add_argument(
        "--source",
        choices=("auto", "local", "tfds"),
        default="auto",
        help="where to load Omniglot from (tfds: TensorFlow Datasets, the full data set)",
    )
    g.add_argument(
        "--num-train-alphabets",
        type=int,
        default=None,
        help="meta-training alphabets (default: all that are not held out)",
    )
    g.add_argument(
        "--num-test-alphabets",
        type=int,
        default=None,
        help="held-out alphabets (default: 2 on the 7-alphabet subset, 10 on the full data set)",
    )
    g.add_argument("--num-classes", type=int, default=None, help="classes per task (20)")
    g.add_argument("--image-size", type=int, default=None, help="image side (28)")
    g.add_argument(
        "--no-augment",
        action="store_true",
        help="no random affine augmentation of adaptation batches",
    )
    g.add_argument(
        "--augment-meta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw the meta-objective batches with the random affine "
        "augmentation too (default: from --protocol; on for both)",
    )
    g.add_argument(
        "--augment-test",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="augment the test images (one fixed draw per image and seed; "
        "default: from --protocol; on for reference only)",
    )

    g = parser.add_argument_group("meta-training (defaults: default preset; paper preset)")
    g.add_argument("--meta-steps", type=int, default=None, help="meta steps (10; 50)")
    g.add_argument(
        "--meta-batch-size",
        type=int,
        default=None,
        help="tasks per meta step, drawn with replacement (5; 5)",
    )
    g.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="adaptation steps per task during meta-training (20; 100)",
    )
    g.add_argument(
        "--task-batch-size", type=int, default=None, help="images per adaptation batch (20; 20)"
    )
    g.add_argument(
        "--inner-lr",
        type=float,
        default=None,
        help="SGD learning rate of task adaptation (0.1; 0.1)",
    )
    g.add_argument(
        "--meta-lr",
        type=float,
        default=None,
        help="SGD learning rate of the initialisation (Leap, Reptile) and, "
        "offline, of the warp (0.1; 0.1)",
    )
    g.add_argument(
        "--warp-lr",
        type=float,
        default=None,
        help="SGD learning rate of the warp parameters (default: --meta-lr "
        "offline, 0.001 online as in WarpGrad App. G)",
    )
    g.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="learning rate of fine-tuning, pre-training and adaptation "
        "(default: --inner-lr; the Leap paper found 0.01 best)",
    )
    g.add_argument(
        "--reptile-meta-lr",
        type=float,
        default=None,
        help="Reptile's outer learning rate (default: --meta-lr; the Leap paper found 0.01 best)",
    )
    g.add_argument(
        "--max-warp-updates",
        type=int,
        default=None,
        help="offline: cap on warp updates per meta step, 0 = one per stored point (20; 0)",
    )
    g.add_argument(
        "--meta-interval",
        type=int,
        default=None,
        help="offline: stored points per warp update, η (1; 1)",
    )

    g = parser.add_argument_group("Warp-Leap design (WarpGrad App. G)")
    g.add_argument(
        "--warp",
        choices=WARPS,
        default="conv3x3",
        help="warp layer after each block: "
        + "; ".join(f"{k} = {v}" for k, v in WARP_LABELS.items()),
    )
    g.add_argument(
        "--warp-init",
        choices=("identity", "random"),
        default=None,
        help="initial kernels of the conv warps (conv3x3, conv1x1, conv_relu): "
        "identity, or random like PyTorch's default conv initialisation "
        "(uniform in ±1/sqrt(fan-in), bias too), as in the authors' code "
        "(default: random for the conv warps, under both protocols; "
        "identity for the other warps)",
    )
    g.add_argument(
        "--meta-training",
        choices=("offline", "online"),
        default="offline",
        help="WarpGrad Algorithm 2 (replay buffer) or Algorithm 1",
    )
    g.add_argument(
        "--objective",
        choices=("exact", "approx"),
        default=None,
        help="warp meta-objective: Eq. 3, or with the inner gradient stopped "
        "(default: approx, under both protocols)",
    )
    g.add_argument(
        "--learn-lr",
        action="store_true",
        help="meta-learn the scalar inner learning rate α (needs --objective exact)",
    )
    g.add_argument(
        "--learn-momentum",
        action="store_true",
        help="meta-learn a scalar inner momentum μ (starts at "
        "--inner-momentum, default 1e-4; needs --objective exact; with or "
        "without --learn-lr)",
    )
    g.add_argument(
        "--inner-momentum",
        type=float,
        default=None,
        help="heavy-ball momentum of Warp-Leap's adaptation (default: none)",
    )
    g.add_argument(
        "--warp-leap-path-loss",
        action="store_true",
        help="include the loss as a coordinate of the path in Warp-Leap's Leap "
        "objective (Eq. 9); by default it is left out, as in the authors' "
        "Omniglot code; Leap always includes it",
    )

    g = parser.add_argument_group("model and evaluation")
    g.add_argument("--filters", type=int, default=None, help="filters per conv layer (64)")
    g.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        help="adaptation steps on each held-out task (100; 100)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="test-set evaluation interval along adaptation (10; 5)",
    )
    g.add_argument(
        "--kfac-lr",
        type=float,
        default=0.3,
        help="learning rate of the kfac method (0.3; 1.0, the 10x rate of the "
        "paper, was unstable in a quick test)",
    )
    g.add_argument(
        "--kfac-damping",
        type=float,
        default=1e-2,
        help="Tikhonov damping λ of the kfac method (1e-2)",
    )
    g.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "auto"),
        default="float32",
        help="layer compute precision: bfloat16 builds the models under Keras's "
        "mixed_bfloat16 policy (float32 variables, θ0, φ and meta-gradients; "
        "bfloat16 convolutions) where the hardware computes in bfloat16, else "
        "float32 with a warning; auto: bfloat16 where supported "
        "(warpkeras.precision; default float32)",
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

from warpkeras import layers as wl  # noqa: E402
from warpkeras import precision as wprecision  # noqa: E402
from warpkeras.data import OmniglotNotFoundError, OmniglotTasks, load_omniglot  # noqa: E402


def resolve_config(args):
    """Merges the preset (``smoke`` when --smoke) with explicit flags into a dict."""
    preset = "smoke" if args.smoke else args.preset
    cfg = dataclasses.asdict(PRESETS[preset])
    for key in list(cfg):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    protocol = PROTOCOLS[args.protocol]
    chosen = {}  # protocol choice -> where it came from
    for key in protocol:
        explicit = getattr(args, key)
        chosen[key] = "flag" if explicit is not None else f"protocol {args.protocol}"
    warp_init = args.warp_init
    if warp_init is None:
        # the protocol's random warp initialisation applies to the conv warps only
        warp_init = protocol["warp_init"] if args.warp in CONV_WARPS else "identity"
    cfg.update(
        preset=preset,
        protocol=args.protocol,
        protocol_sources=chosen,
        augment_meta=protocol["augment_meta"]
        if args.augment_meta is None
        else bool(args.augment_meta),
        augment_test=protocol["augment_test"]
        if args.augment_test is None
        else bool(args.augment_test),
        methods=list(args.methods),
        ablation=bool(args.ablation),
        ablation_rows=list(args.ablation_rows or ABLATION_ROWS),
        ngd_ablation=bool(args.ngd_ablation),
        ngd_rows=list(args.ngd_rows or NGD_ROWS),
        large_batch=LARGE_BATCH,
        kfac_lr=args.kfac_lr,
        kfac_damping=args.kfac_damping,
        warp=args.warp,
        warp_init=warp_init,
        meta_training=args.meta_training,
        objective=args.objective if args.objective is not None else protocol["objective"],
        learn_lr=bool(args.learn_lr),
        learn_momentum=bool(args.learn_momentum),
        inner_momentum=args.inner_momentum,
        warp_lr=args.warp_lr,
        finetune_lr=args.finetune_lr,
        reptile_meta_lr=args.reptile_meta_lr,
        warp_leap_path_loss=bool(args.warp_leap_path_loss),
        augment=not args.no_augment,
        verbose=args.verbose,
        precision=args.precision,
        dtype_policy=wprecision.compute_policy(args.precision),
    )
    problems = []
    for key in (
        "meta_batch_size",
        "inner_steps",
        "task_batch_size",
        "eval_steps",
        "eval_every",
        "meta_interval",
        "filters",
        "num_classes",
    ):
        if int(cfg[key]) < 1:
            problems.append(f"--{key.replace('_', '-')} must be >= 1 (got {cfg[key]})")
    for key in ("meta_steps", "max_warp_updates"):
        if int(cfg[key]) < 0:
            problems.append(f"--{key.replace('_', '-')} must be >= 0 (got {cfg[key]})")
    if cfg["image_size"] < 16:
        problems.append(
            f"--image-size must be >= 16 for four 2x2 poolings (got {cfg['image_size']})"
        )
    if cfg["warp_init"] != "identity" and cfg["warp"] not in CONV_WARPS and not cfg["ablation"]:
        problems.append(
            f"--warp-init {cfg['warp_init']} applies to the conv warps "
            f"{', '.join(CONV_WARPS)}, not --warp {cfg['warp']}"
        )
    learned = [
        flag
        for flag, on in (
            ("--learn-lr", cfg["learn_lr"]),
            ("--learn-momentum", cfg["learn_momentum"]),
        )
        if on
    ]
    if learned and cfg["objective"] != "exact":
        problems.append(
            f"{' and '.join(learned)} need{'s' if len(learned) == 1 else ''} "
            "--objective exact (the approximate objective gives the learning "
            "rate and momentum no meta-gradient"
            + (
                f"; --protocol {args.protocol} chooses approx unless --objective exact is given"
                if args.objective is None
                else ""
            )
            + ")"
        )
    if cfg["ablation"] and cfg["ngd_ablation"]:
        problems.append("--ablation and --ngd-ablation are separate runs: give one of them")
    if not cfg["kfac_lr"] > 0:
        problems.append(f"--kfac-lr must be > 0 (got {cfg['kfac_lr']})")
    if not cfg["kfac_damping"] > 0:
        problems.append(f"--kfac-damping must be > 0 (got {cfg['kfac_damping']})")
    if problems:
        raise SystemExit("omniglot.py: error: " + "; ".join(problems))
    return cfg


# ------------------------------------------------------------------------------------------
# model
def random_conv_initializers(fan_in):
    """Kernel and bias initializers equal in law to PyTorch's default for a conv layer.

    PyTorch draws both from U(-b, b) with b = 1/sqrt(fan-in); ``VarianceScaling(1/3,
    "fan_in", "uniform")`` has limit sqrt(3 · (1/3) / fan-in) = b.
    """
    bound = 1.0 / float(np.sqrt(fan_in))
    return dict(
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
        ),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
    )


def make_warp(kind, filters, name, init="identity"):
    """One warp layer of the kind named by ``--warp`` (WarpGrad App. G, Table 3).

    With ``init="identity"`` all are identity (or, after a ReLU block, identity on its
    non-negative outputs) at initialisation, except the batch-normalised non-residual ones,
    which start as a normalisation. ``init="random"`` (conv warps only) draws the kernel and
    bias as PyTorch's default conv initialisation does, like the authors' Omniglot code.
    """
    if kind in CONV_WARPS:
        size = 1 if kind == "conv1x1" else 3
        kwargs = {}
        if init == "random":
            kwargs = random_conv_initializers(fan_in=size * size * filters)
        elif init != "identity":
            raise ValueError(f"unknown warp initialisation {init!r}")
        activation = "relu" if kind == "conv_relu" else None
        return wl.WarpConv2D(kernel_size=size, activation=activation, name=name, **kwargs)
    if init != "identity":
        raise ValueError(f"--warp-init {init} applies to {CONV_WARPS}, not {kind!r}")
    if kind == "scaling":
        return wl.ChannelScaling(name=name)
    if kind == "conv_bn":
        return wl.ResidualWarpBlock(
            num_layers=1, residual=False, activation=None, momentum=BN_MOMENTUM, name=name
        )
    if kind == "conv_bn_relu":
        return wl.ResidualWarpBlock(
            num_layers=1, residual=False, activation="relu", momentum=BN_MOMENTUM, name=name
        )
    if kind == "residual":
        return wl.ResidualWarpBlock(num_layers=1, momentum=BN_MOMENTUM, name=name)
    if kind == "residual2":
        return wl.ResidualWarpBlock(
            num_layers=2, hidden_filters=2 * filters, momentum=BN_MOMENTUM, name=name
        )
    if kind == "film":
        return wl.FiLMWarpBlock(hidden_filters=2 * filters, momentum=BN_MOMENTUM, name=name)
    raise ValueError(f"unknown warp {kind!r}; expected one of {WARPS}")


def build_model(
    num_classes=20, image_size=28, filters=64, warp=None, blocks=4, warp_init="identity"
):
    """The Omniglot convolutional network, optionally with a warp layer after each block.

    Block i is ``conv{i}`` (3x3, "same") → ``pool{i}`` (2x2 max) → ``bn{i}`` (batch norm with
    exact higher-order gradients) → ``relu{i}`` [→ ``warp{i}``]; then ``flatten`` and the
    linear ``head``. Layer names are fixed so that weights can be copied between the
    variants of one seed.

    Returns:
        ``(model, head_layer)``.
    """
    inputs = keras.Input((image_size, image_size, 1), name="image")
    h = inputs
    for i in range(1, blocks + 1):
        h = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(h)
        h = keras.layers.MaxPooling2D(2, name=f"pool{i}")(h)
        h = wl.ExactBatchNormalization(momentum=BN_MOMENTUM, name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
        if warp is not None:
            h = make_warp(warp, filters, f"warp{i}", warp_init)(h)
    h = keras.layers.Flatten(name="flatten")(h)
    head = keras.layers.Dense(num_classes, name="head")
    outputs = head(h)
    name = "omniglot_convnet" if warp is None else f"omniglot_convnet_warp_{warp}"
    return keras.Model(inputs, outputs, name=name), head


def shared_initialisation(cfg, seed):
    """Random initial weights of the task layers for `seed`, by layer name."""
    keras.utils.set_random_seed(seed)
    with wprecision.policy_scope(cfg["dtype_policy"]):
        model, _ = build_model(cfg["num_classes"], cfg["image_size"], cfg["filters"])
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def model_for(spec, cfg, seed, init):
    """Builds the model of one run and loads the seed's shared initialisation."""
    keras.utils.set_random_seed(seed + 7919)  # random parts of warp blocks
    warp = spec["warp"] if spec["method"] in ("warp_leap", "warp_only") else None
    with wprecision.policy_scope(cfg["dtype_policy"]):
        model, head = build_model(
            cfg["num_classes"],
            cfg["image_size"],
            cfg["filters"],
            warp,
            warp_init=spec.get("warp_init", "identity"),
        )
    for layer in model.layers:
        if layer.name in init:
            layer.set_weights(init[layer.name])
    return model, head


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_trainer(spec, cfg, model, head, seed):
    """The warpkeras trainer of one run (see the module docstring)."""
    common = dict(
        inner_steps=cfg["inner_steps"],
        meta_batch_size=cfg["meta_batch_size"],
        inner_learning_rate=cfg["inner_lr"],
        seed=seed,
    )
    method = spec["method"]
    if method in LARGE_BATCH_METHODS or method == "warp_only":
        # WarpGrad Table 2 ‡ and App. H: 10x task batch (the tasks) and learning rate
        common["inner_learning_rate"] = cfg["large_batch"] * cfg["inner_lr"]
    if method in LARGE_BATCH_METHODS:
        # no meta-training; kfac adapts with `inner_optimizer(cfg)` in `run_one`
        return warpkeras.NoMetaTrainer(model, LOSS, **common)
    if method == "warp_only":
        # WarpGrad App. H: λC(θ0) = 0, only the warp is meta-learned; θ0 stays random
        cap = cfg["max_warp_updates"] or None
        warp_lr = cfg["warp_lr"] if cfg["warp_lr"] is not None else cfg["meta_lr"]
        return warpkeras.WarpTrainer(
            model,
            LOSS,
            mode="offline",
            objective=spec["objective"],
            init_objective=None,
            meta_optimizer=keras.optimizers.SGD(warp_lr),
            meta_interval=cfg["meta_interval"],
            max_warp_updates=cap,
            **common,
        )
    if method == "warp_leap":
        online = spec["meta_training"] == "online"
        warp_lr = (
            cfg["warp_lr"] if cfg["warp_lr"] is not None else (0.001 if online else cfg["meta_lr"])
        )
        momentum = cfg["inner_momentum"]
        if spec["learn_momentum"] and momentum is None:
            momentum = 1e-4
        cap = cfg["max_warp_updates"] or None
        return warpkeras.WarpTrainer(
            model,
            LOSS,
            mode=spec["meta_training"],
            objective=spec["objective"],
            init_objective="leap",
            meta_optimizer=keras.optimizers.SGD(warp_lr),
            init_optimizer=keras.optimizers.SGD(cfg["meta_lr"]),
            meta_interval=cfg["meta_interval"] if not online else None,
            max_warp_updates=cap if not online else None,
            inner_momentum=momentum,
            learn_inner_learning_rate=spec["learn_lr"],
            learn_inner_momentum=spec["learn_momentum"],
            leap_loss_in_path=cfg["warp_leap_path_loss"],
            **common,
        )
    if method == "leap":
        return warpkeras.LeapTrainer(
            model, LOSS, meta_optimizer=keras.optimizers.SGD(cfg["meta_lr"]), **common
        )
    if method == "reptile":
        lr = cfg["reptile_meta_lr"] if cfg["reptile_meta_lr"] is not None else cfg["meta_lr"]
        return warpkeras.ReptileTrainer(
            model, LOSS, meta_optimizer=keras.optimizers.SGD(lr), **common
        )
    if method == "finetune":
        if cfg["finetune_lr"] is not None:
            common["inner_learning_rate"] = cfg["finetune_lr"]
        return warpkeras.FineTuneTrainer(
            model, LOSS, head_layers=[head], multi_headed=True, **common
        )
    if method == "none":
        return warpkeras.NoMetaTrainer(model, LOSS, **common)
    raise ValueError(f"unknown method {method!r}")


def inner_optimizer(spec, cfg, seed):
    """The adaptation optimiser of a run: `warpkeras.KFAC` for ``kfac``, else `None` (the
    trainer's SGD step)."""
    if spec["method"] != "kfac":
        return None
    return warpkeras.KFAC(learning_rate=cfg["kfac_lr"], damping=cfg["kfac_damping"], seed=seed)


# ------------------------------------------------------------------------------------------
# data
def default_data_dir():
    """``../shared/data/omniglot`` next to the repository, or None if it does not exist."""
    path = _common.REPO_ROOT.parent / "shared" / "data" / "omniglot"
    return path if path.is_dir() else None


def load_data(args, cfg):
    """Loads Omniglot (see --data-dir / --source); exits with the library's message if no
    copy can be found."""
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    if args.source == "tfds":
        data_dir = None
    try:
        return load_omniglot(source=args.source, data_dir=data_dir, image_size=cfg["image_size"])
    except OmniglotNotFoundError as err:
        raise SystemExit(f"omniglot.py: {err}") from err


def split_tasks(data, cfg, seed):
    """Meta-training and held-out tasks for one seed (the split depends on the seed)."""
    usable = data.usable_alphabets(cfg["num_classes"])
    n_test = cfg["num_test_alphabets"]
    if n_test is None:
        n_test = 2 if len(usable) < 20 else 10
    any_augment = cfg["augment"] or cfg["augment_meta"] or cfg["augment_test"]
    try:
        tasks = OmniglotTasks(
            data,
            num_classes=cfg["num_classes"],
            num_meta_val=0,
            num_meta_test=n_test,
            num_meta_train=cfg["num_train_alphabets"],
            seed=seed,
            augmentation=None if any_augment else False,
        )
    except ValueError as err:
        raise SystemExit(f"omniglot.py: {err} (usable alphabets: {len(usable)})") from err
    if not tasks.meta_train or not tasks.meta_test:
        raise SystemExit(
            f"omniglot.py: need at least one meta-training and one held-out alphabet; "
            f"{len(usable)} alphabets have >= {cfg['num_classes']} characters"
        )
    return tasks, task_sets(tasks, cfg, seed)


def augmented_test_images(task, seed, index):
    """The test images of a `ClassificationTask`, each transformed once by the task's
    random affine augmentation; the draw depends only on (seed, index), so every method
    and batch size of a seed sees the same augmented test set."""
    rng = np.random.default_rng([seed, index, 7])
    return task.numpy_augment(task.x_test, rng)


def make_task(task, cfg, batch_size, test_x=None):
    """A trainer `warpkeras.Task` from a `ClassificationTask`, under the run's protocol.

    Adaptation batches are augmented unless --no-augment. With ``cfg["augment_meta"]``
    the meta-objective batches are drawn, by the trainer's meta-batch generator, from a
    second augmented stream of the same images (``Task(meta=rng -> iterator)``): other
    batches, transformed independently, as in the authors' code, where every training
    image passes the augmentation. `test_x` replaces the clean test images (augmented
    ones, see `augmented_test_images`).
    """
    base = task.to_task(batch_size=batch_size, augment=cfg["augment"])
    meta = None
    if cfg["augment_meta"]:
        augmented = task.to_task(batch_size=batch_size, augment=True)
        meta = lambda rng, _task=augmented: _task.batches("train", rng)  # noqa: E731
    test = base.test
    if test_x is not None:
        test = (test_x, task.y_test)
    return warpkeras.Task(
        train=base.train,
        meta=meta,
        test=test,
        batch_size=batch_size,
        augment=base.augment,
        name=base.name,
        info=base.info,
    )


def task_sets(tasks, cfg, seed):
    """``scale -> (meta-training tasks, held-out tasks)`` with task batches of
    ``scale * --task-batch-size`` for scale 1 and `LARGE_BATCH`; the sets share their
    (augmented, under --augment-test) test images."""
    tests = [
        augmented_test_images(t, seed, i) if cfg["augment_test"] else None
        for i, t in enumerate(tasks.meta_test)
    ]
    out = {}
    for scale in (1, cfg["large_batch"]):
        batch = scale * cfg["task_batch_size"]
        out[scale] = (
            [make_task(t, cfg, batch) for t in tasks.meta_train],
            [make_task(t, cfg, batch, x) for t, x in zip(tasks.meta_test, tests)],
        )
    return out


# ------------------------------------------------------------------------------------------
# runs
def run_specs(cfg):
    """The list of runs: one per method, or one per ablation row."""
    base = dict(
        warp=cfg["warp"],
        warp_init=cfg["warp_init"],
        meta_training=cfg["meta_training"],
        objective=cfg["objective"],
        learn_lr=cfg["learn_lr"],
        learn_momentum=cfg["learn_momentum"],
    )
    specs = []
    if cfg["ngd_ablation"]:
        for name in cfg["ngd_rows"]:
            label, preconditioning, override, paper = NGD_ROWS[name]
            spec = dict(base, meta_training="offline", learn_lr=False, learn_momentum=False)
            spec.update(override)
            if spec.get("warp") not in CONV_WARPS:
                spec["warp_init"] = "identity"
            spec.update(
                name=name,
                label=label,
                preconditioning=preconditioning,
                paper_accuracy={"mean": paper[0], "std": paper[1]},
                batch_scale=cfg["large_batch"],
            )
            specs.append(spec)
        return specs
    if cfg["ablation"]:
        for name in cfg["ablation_rows"]:
            label, override = ABLATION_ROWS[name]
            spec = dict(
                base,
                warp="conv3x3",
                meta_training="offline",
                objective="exact",
                learn_lr=False,
                learn_momentum=False,
                method="warp_leap",
            )
            spec.update(override)
            if spec["warp"] not in CONV_WARPS:
                spec["warp_init"] = "identity"
            spec.update(name=name, label=label)
            specs.append(spec)
        return specs
    for method in cfg["methods"]:
        label = METHOD_LABELS[method]
        default = PROTOCOLS["default"]
        if method == "warp_leap" and (
            base["warp"] != "conv3x3"
            or base["meta_training"] != "offline"
            or base["objective"] != default["objective"]
            or base["learn_lr"]
        ):
            label += (
                f" ({WARP_LABELS[base['warp']]}, {base['meta_training']}, "
                f"{base['objective']}{', learned α' if base['learn_lr'] else ''})"
            )
        if (
            method == "warp_leap"
            and base["warp"] in CONV_WARPS
            and base["warp_init"] != default["warp_init"]
        ):
            label += f" ({base['warp_init']} warp init)"
        specs.append(
            dict(
                base,
                method=method,
                name=method,
                label=label,
                batch_scale=cfg["large_batch"] if method in LARGE_BATCH_METHODS else 1,
            )
        )
    return specs


def run_one(spec, cfg, seed, init, train_tasks, test_tasks):
    """Meta-trains and evaluates one run on one seed. Returns ``(record, trainer)``."""
    model, head = model_for(spec, cfg, seed, init)
    trainer = make_trainer(spec, cfg, model, head, seed)
    optimizer = inner_optimizer(spec, cfg, seed)
    if cfg["verbose"]:
        print(
            f"\n[{spec['label']}] seed {seed}: meta-training ({cfg['meta_steps']} meta steps)",
            flush=True,
        )
    with _common.Stopwatch() as fit_time:
        history = trainer.fit(train_tasks, meta_steps=cfg["meta_steps"], verbose=cfg["verbose"])
    if cfg["verbose"]:
        print(
            f"[{spec['label']}] seed {seed}: adapting to {len(test_tasks)} held-out "
            f"tasks for {cfg['eval_steps']} steps",
            flush=True,
        )
    with _common.Stopwatch() as eval_time:
        report = trainer.evaluate(
            test_tasks,
            steps=cfg["eval_steps"],
            eval_every=cfg["eval_every"],
            seed=seed,
            verbose=1 if cfg["verbose"] else 0,
            inner_optimizer=optimizer,
        )
    hist = {k: [float(v) for v in vals] for k, vals in (history.history or {}).items()}
    step_seconds = hist.get("seconds", [])
    record = {
        "seed": seed,
        "test_tasks": [t.name for t in test_tasks],
        "final_test_accuracy": report["final_test_accuracy"]["values"],
        "final_test_loss": report["final_test_loss"]["values"],
        "auc": report["auc"]["values"],
        "curves": [
            {
                "test_steps": c["test_steps"],
                "test_accuracy": c["test_accuracy"],
                "test_loss": c["test_loss"],
                "train_loss": c["train_loss"],
                "train_accuracy": c["train_accuracy"],
            }
            for c in report["curves"]
        ],
        "history": hist,
        "meta_train_seconds": fit_time.seconds,
        "eval_seconds": eval_time.seconds,
        # the first meta step includes tracing the step functions
        "seconds_per_meta_step": float(np.median(step_seconds[1:]))
        if len(step_seconds) > 1
        else (step_seconds[0] if step_seconds else None),
        "eval_seconds_per_adaptation_step": eval_time.seconds
        / max(1, len(test_tasks) * cfg["eval_steps"]),
        "trainer": trainer.get_config(),
        "task_batch_size": test_tasks[0].batch_size if test_tasks else None,
    }
    if optimizer is not None:
        record["inner_optimizer"] = optimizer.get_config()
    if trainer.learn_lr:
        record["learned_inner_learning_rate"] = float(trainer.inner_lr.numpy())
    if trainer.learn_mu:
        record["learned_inner_momentum"] = float(trainer.inner_mu.numpy())
    if cfg["verbose"]:
        print(
            f"[{spec['label']}] seed {seed}: test accuracy "
            f"{np.mean(record['final_test_accuracy']) * 100:.1f}%, AUC "
            f"{np.mean(record['auc']):.3f}, meta-training {fit_time.seconds:.0f}s",
            flush=True,
        )
    return record, trainer


def summarise(spec, records):
    """Pools the per-seed records of one run: statistics over tasks and seeds, curves."""
    acc = [v for r in records for v in r["final_test_accuracy"]]
    curves = [c for r in records for c in r["curves"]]
    out = {
        "label": spec["label"],
        "settings": {
            k: spec[k]
            for k in (
                "method",
                "warp",
                "warp_init",
                "meta_training",
                "objective",
                "learn_lr",
                "learn_momentum",
            )
        },
        "task_batch_scale": spec.get("batch_scale", 1),
        "final_test_accuracy": _common.stats(acc),
        "final_test_loss": _common.stats([v for r in records for v in r["final_test_loss"]]),
        "auc": _common.stats([v for r in records for v in r["auc"]]),
        "per_seed": records,
        "meta_train_seconds": float(sum(r["meta_train_seconds"] for r in records)),
        "eval_seconds": float(sum(r["eval_seconds"] for r in records)),
    }
    per_step = [
        r["seconds_per_meta_step"] for r in records if r["seconds_per_meta_step"] is not None
    ]
    out["seconds_per_meta_step"] = float(np.mean(per_step)) if per_step else None
    if curves:
        test_acc = np.array([c["test_accuracy"] for c in curves], dtype=float)
        train_err = 1.0 - np.array([c["train_accuracy"] for c in curves], dtype=float)
        train_loss = np.array([c["train_loss"] for c in curves], dtype=float)
        out["curves"] = {
            "test_steps": curves[0]["test_steps"],
            "test_accuracy_mean": test_acc.mean(0).tolist(),
            "test_accuracy_std": test_acc.std(0).tolist(),
            "train_steps": list(range(1, train_err.shape[1] + 1)),
            "train_error_mean": train_err.mean(0).tolist(),
            "train_error_std": train_err.std(0).tolist(),
            "train_loss_mean": train_loss.mean(0).tolist(),
        }
    return out


# ------------------------------------------------------------------------------------------
# export
def export_warp_leap(model, trainer, cfg, export_dir, train_tasks, test_task):
    """Exports the meta-learned Warp-Leap model and checks the SavedModel on a held-out task.

    Before exporting, the batch-norm statistics are set from one meta-training batch at
    (θ0, φ), so that ``serving_default`` runs the initialisation with sensible statistics.
    The check loads the SavedModel with TensorFlow alone, adapts it with its
    ``adapt_and_predict`` signature (full-batch SGD on the first adaptation images of the
    held-out task), and measures accuracy on the task's test images.
    """
    x_cal = np.concatenate([t.train[0][: cfg["task_batch_size"]] for t in train_tasks])
    model(x_cal, training=True)  # with momentum 0 the moving statistics become these
    steps = cfg["eval_steps"]
    info = _common.export_model(
        model,
        export_dir,
        loss="sparse_categorical_crossentropy",
        from_logits=True,
        learning_rate=float(trainer.inner_lr.numpy()),
        momentum=float(trainer.inner_mu.numpy()) if trainer.use_momentum else None,
        steps=steps,
        training=True,
    )
    if info["format"] != "warpkeras.export_adaptive":
        return info
    x, y = test_task.train
    per_class = max(1, min(5, len(x) // cfg["num_classes"]))
    pick = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    check_steps = min(steps, 20)
    served = tf.saved_model.load(str(export_dir))
    x_test, y_test = test_task.test
    out = served.signatures["adapt_and_predict"](
        x=tf.constant(x[pick]),
        y=tf.constant(y[pick].astype(np.int64)),
        steps=tf.constant(check_steps, tf.int32),
        queries=tf.constant(x_test),
    )
    pred = np.argmax(out["predictions"].numpy(), axis=-1)
    info["check"] = {
        "task": test_task.name,
        "support_images": int(len(pick)),
        "full_batch_steps": check_steps,
        "query_images": int(len(x_test)),
        "query_accuracy": float(np.mean(pred == y_test)),
        "chance": 1.0 / cfg["num_classes"],
    }
    return info


# ------------------------------------------------------------------------------------------
# outputs
SMOOTHING = 5


def smooth(values, window=SMOOTHING):
    """Trailing running mean (the first points average what is available)."""
    values = np.asarray(values, dtype=float)
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_curves(results, path, title):
    """Test accuracy and training error vs adaptation step, and the meta-training loss."""
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    window = 1
    for res in results.values():
        curves = res.get("curves")
        if not curves:
            continue
        line = _common.plot_band(
            axes[0],
            curves["test_steps"],
            curves["test_accuracy_mean"],
            curves["test_accuracy_std"],
            label=res["label"],
            marker=".",
        )
        _common.plot_band(
            axes[1],
            curves["train_steps"],
            smooth(curves["train_error_mean"]),
            smooth(curves["train_error_std"]),
            label=res["label"],
            color=line.get_color(),
        )
        losses = [r["history"].get("loss") for r in res["per_seed"]]
        losses = [seed_losses for seed_losses in losses if seed_losses]
        if losses:
            n = min(len(seed_losses) for seed_losses in losses)
            mean = np.nanmean(
                [np.asarray(seed_losses[:n], dtype=float) for seed_losses in losses], axis=0
            )
            window = _common.plot_smoothed(
                axes[2], np.arange(1, n + 1), mean, label=res["label"], color=line.get_color()
            )
    axes[0].set(
        xlabel="adaptation step", ylabel="test accuracy", title="Held-out tasks: test accuracy"
    )
    axes[1].set(
        xlabel="adaptation step",
        ylabel=f"training error (1 - batch accuracy), {SMOOTHING}-step mean",
        title="Held-out tasks: training error",
    )
    axes[2].set(
        xlabel="meta step",
        ylabel="task loss after adaptation",
        title=f"Meta-training tasks (faint: raw, bold: {window}-step mean)",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        _common.integer_ticks(ax, "x")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _common.save_figure(fig, path)


def paper_figures(mode):
    """The papers' figures that the results of `mode` are compared with (JSON)."""
    if mode == "ngd_ablation":
        return {
            "source": "WarpGrad App. H, Table 4: test accuracy (%) after 100 steps, mean "
            "± std over 4 seeds, 25 meta-training tasks, batch 200, lr 1.0",
            "rows": {
                k: {"label": v[0], "preconditioning": v[1], "mean": v[3][0], "std": v[3][1]}
                for k, v in NGD_ROWS.items()
            },
        }
    if mode == "comparison":
        return {
            "table2": {
                "source": "WarpGrad Table 2, 5 meta-training tasks: test "
                "accuracy (%) after 100 steps",
                "accuracy": PAPER_TABLE2,
            },
            "authors_code_subset": {
                "source": "the authors' Omniglot code on the shared 7-alphabet subset, "
                "reference protocol, 50 meta steps, seed 0",
                "accuracy": AUTHORS_CODE_SUBSET,
            },
        }
    return None


def result_table(mode, specs, results):
    """The printed summary table: ``(headers, rows)``, with the papers' figures."""
    timing = ["s / meta step", "meta-train s"]

    def times(r):
        return [
            f"{r['seconds_per_meta_step']:.2f}" if r["seconds_per_meta_step"] else "-",
            f"{r['meta_train_seconds']:.0f}",
        ]

    if mode == "ngd_ablation":
        headers = ["method", "preconditioning", "test accuracy (%)", "paper Table 4 (%)", *timing]
        rows = [
            [
                r["label"],
                spec["preconditioning"],
                _common.format_stat(r["final_test_accuracy"]),
                f"{spec['paper_accuracy']['mean']:.1f} ± {spec['paper_accuracy']['std']:.1f}",
                *times(r),
            ]
            for spec, r in ((s, results[s["name"]]) for s in specs)
        ]
        return headers, rows
    headers = ["method", "test accuracy (%)", "AUC (train error)", *timing]
    if mode == "comparison":
        headers[2:2] = ["paper Table 2 (%)", "authors' code, subset (%)"]
    rows = []
    for spec in specs:
        r = results[spec["name"]]
        row = [
            r["label"],
            _common.format_stat(r["final_test_accuracy"]),
            _common.format_stat(r["auc"], scale=1.0, digits=3),
            *times(r),
        ]
        if mode == "comparison":
            row[2:2] = [
                _paper(PAPER_TABLE2, spec["method"]),
                _paper(AUTHORS_CODE_SUBSET, spec["method"]),
            ]
        rows.append(row)
    return headers, rows


def _paper(table, method):
    return f"{table[method]:.1f}" if method in table else "-"


def main(argv=None):
    """Runs the example; returns the results dict (also written as JSON).

    The JSON is rewritten after every finished run (``"complete": false`` until the end),
    so a long run that is interrupted still leaves the results obtained so far.
    """
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    out_dir, export_dir = _common.output_dirs(args, EXAMPLE)
    specs = run_specs(cfg)
    mode = (
        "ablation" if cfg["ablation"] else "ngd_ablation" if cfg["ngd_ablation"] else "comparison"
    )
    name = {"ablation": "omniglot_ablation", "ngd_ablation": "omniglot_ngd"}.get(mode, "omniglot")
    json_path = out_dir / f"{name}.json"
    records = {spec["name"]: [] for spec in specs}
    splits, state = {}, {"export": None, "plots": {}}

    def write(seconds, complete):
        results = {
            spec["name"]: summarise(spec, records[spec["name"]])
            for spec in specs
            if records[spec["name"]]
        }
        output = {
            "example": EXAMPLE,
            "mode": mode,
            "complete": complete,
            "config": cfg,
            "protocol": {
                "name": cfg["protocol"],
                "augment_adaptation_batches": cfg["augment"],
                "augment_meta_batches": cfg["augment_meta"],
                "augment_test_images": cfg["augment_test"],
                "warp_init": cfg["warp_init"],
                "objective": cfg["objective"],
                "sources": cfg["protocol_sources"],
            },
            "data": {
                "source": data.source,
                "usable_alphabets": data.usable_alphabets(cfg["num_classes"]),
                "splits": splits,
            },
            "metric_notes": {
                "final_test_accuracy": "accuracy on each held-out task's test images after "
                "the last adaptation step; mean/std over tasks and "
                "seeds",
                "auc": "mean over adaptation steps of 1 - accuracy on the adaptation batches "
                "(area under the training-error curve); lower is better",
            },
            "results": results,
            "paper": paper_figures(mode),
            "plots": state["plots"],
            "export": state["export"],
            "wall_time_seconds": seconds,
            "environment": _common.environment(),
        }
        _common.write_json(json_path, output)
        return output

    with _common.Stopwatch() as total:
        data = load_data(args, cfg)
        if cfg["verbose"]:
            print(
                f"Omniglot: {data}; usable alphabets {data.usable_alphabets(cfg['num_classes'])}",
                flush=True,
            )
        for seed in cfg["seeds"]:
            tasks, sets = split_tasks(data, cfg, seed)
            splits[seed] = {
                "meta_train": tasks.meta_train_alphabets,
                "held_out": tasks.meta_test_alphabets,
            }
            if cfg["verbose"]:
                print(
                    f"\nSeed {seed}: meta-train alphabets {tasks.meta_train_alphabets}, "
                    f"held-out {tasks.meta_test_alphabets}",
                    flush=True,
                )
            init = shared_initialisation(cfg, seed)
            for spec in specs:
                train_tasks, test_tasks = sets[spec.get("batch_scale", 1)]
                record, trainer = run_one(spec, cfg, seed, init, train_tasks, test_tasks)
                records[spec["name"]].append(record)
                if (
                    spec["method"] == "warp_leap"
                    and mode == "comparison"
                    and state["export"] is None
                    and not args.no_export
                ):
                    info = export_warp_leap(
                        trainer.model, trainer, cfg, export_dir, train_tasks, test_tasks[0]
                    )
                    info["seed"] = seed
                    state["export"] = info
                    if cfg["verbose"]:
                        print(
                            f"Exported Warp-Leap to {export_dir}"
                            + (
                                f" (check: {info['check']['query_accuracy'] * 100:.1f}%"
                                f" test accuracy after {info['check']['full_batch_steps']}"
                                " full-batch steps)"
                                if "check" in info
                                else ""
                            ),
                            flush=True,
                        )
                write(time.perf_counter() - total.start, complete=False)

    results = {spec["name"]: summarise(spec, records[spec["name"]]) for spec in specs}
    title = (
        f"Omniglot {cfg['num_classes']}-way, {len(cfg['seeds'])} seed(s), "
        f"{cfg['meta_steps']} meta steps x {cfg['inner_steps']} adaptation steps"
    )
    plots = state["plots"]
    plots["curves"] = str(plot_curves(results, out_dir / f"{name}_curves.png", title))
    if cfg["ablation"]:
        labels = [r["label"] for r in results.values()]
        means = [r["final_test_accuracy"]["mean"] or 0.0 for r in results.values()]
        stds = [r["final_test_accuracy"]["std"] or 0.0 for r in results.values()]
        plots["ablation"] = str(
            _common.bar_plot(
                out_dir / f"{name}.png",
                labels,
                [m * 100 for m in means],
                [s * 100 for s in stds],
                ylabel=f"test accuracy after {cfg['eval_steps']} steps (%)",
                title="WarpGrad ablation (App. G, Table 3)",
            )
        )
    if mode == "ngd_ablation":
        labels = [r["label"] for r in results.values()]
        means = [r["final_test_accuracy"]["mean"] or 0.0 for r in results.values()]
        stds = [r["final_test_accuracy"]["std"] or 0.0 for r in results.values()]
        plots["ngd_ablation"] = str(
            _common.bar_plot(
                out_dir / f"{name}.png",
                labels,
                [m * 100 for m in means],
                [s * 100 for s in stds],
                ylabel=f"test accuracy after {cfg['eval_steps']} steps (%)",
                title="Warped geometry vs natural gradient (App. H, Table 4)",
            )
        )
    output = write(total.seconds, complete=True)
    export_info = state["export"]

    overridden = [k for k, source in cfg["protocol_sources"].items() if source == "flag"]
    protocol = f"{cfg['protocol']} protocol" + (
        "; set by flags: " + ", ".join(f"{k}={cfg[k]}" for k in overridden) if overridden else ""
    )
    print(
        f"\nOmniglot multi-shot ({cfg['preset']} size, {protocol}), seeds "
        f"{cfg['seeds']}, {cfg['eval_steps']} adaptation steps on held-out alphabets:"
    )
    headers, rows = result_table(mode, specs, results)
    _common.print_table(headers, rows)
    output["table"] = {"headers": headers, "rows": rows}
    _common.write_json(json_path, output)
    _common.print_written(json_path, plots.values(), export_info, total.seconds)
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
