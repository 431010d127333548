"""Few-shot Omniglot: Warp-MAML against MAML, 5-way 1-shot and 5-shot.

The few-shot protocol of WarpGrad Table 1 (Vinyals et al.'s N-way K-shot episodes) on
Omniglot characters. Every character is a class. The alphabets are split by the seed:
meta-training episodes draw their classes from the characters of the meta-training
alphabets (optionally with each character rotated by 0/90/180/270 degrees counted as a
class, --rotate-classes), evaluation episodes from the characters of held-out alphabets.
An episode has N classes with K support and L query images each (labels 0..N-1).

Each episode is one `warpkeras.Task`: the support set is the adaptation data (a single
batch holding the whole support set, used at every adaptation step), the query set is the
meta data (the MAML outer loss, and the WarpGrad meta-loss L_meta) and, for evaluation,
the test data: a held-out episode is solved by K adaptation steps on its support set from
the meta-learned initialisation, then scored on its query set.

Learners (WarpGrad App. I): four blocks of [3x3 conv, batch norm, ReLU, 2x2 max-pool] on
28x28 images (1x1 features) and a linear head.
  maml       every layer adapts; θ0 follows the second-order MAML gradient (MAMLTrainer)
  warp_maml  warp layers (identity-initialised 3x3 convolutions) follow the last three
             convolutions, and the first block is meta-learned too: the first
             convolution and its batch norm, and the warp layers, form φ, trained online
             with the exact WarpGrad objective (Eq. 3, Algorithm 1) while θ0 of the other
             layers follows the MAML gradient (WarpTrainer(mode="online",
             init_objective="maml")); only the last three convolutions, their batch norms
             and the head adapt.
Both use SGD for adaptation and Adam for meta-updates.

Outputs:
  <output-dir>/few_shot.json    accuracy per setting and method: mean, std and 95%
                                confidence interval over test episodes (and seeds),
                                meta-training history, timings, configuration
  <output-dir>/few_shot.png     accuracy per method and setting with 95% CI error bars
  <export-dir>/                 the meta-learned Warp-MAML model (first setting) as a
                                SavedModel that adapts itself (signatures serving_default,
                                adapt, adapt_and_predict)

Sizes:
  (no flags)       about 3.5 minutes on 2 CPU cores (9 when they are shared): 32 filters,
                   60 meta steps of 4 episodes, 3 adaptation steps, 50 test episodes, 1 seed
  --preset paper   the protocol's size: 64 filters, 60000 meta steps, 5 adaptation steps,
                   600 test episodes (hours to days on a CPU)
  --smoke          4 filters, 1-shot only, 2 meta steps, 3 test episodes: a quarter of a
                   minute, mostly TensorFlow tracing
Any explicit flag overrides the preset's value.

Examples:
  python examples/few_shot.py
  python examples/few_shot.py --shots 1 --meta-steps 1000 --test-episodes 600
  python examples/few_shot.py --rotate-classes --filters 64
"""

import dataclasses
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets up sys.path, the Keras backend and matplotlib)

EXAMPLE = "few_shot"
METHODS = ("warp_maml", "maml")
METHOD_LABELS = {"warp_maml": "Warp-MAML", "maml": "MAML"}

# Batch-norm momentum. Meta-training and evaluation use batch statistics (training mode);
# with momentum 0 the moving statistics are those of the last batch, which the exported
# model's `adapt_and_predict` uses for its predictions (those of the support set).
BN_MOMENTUM = 0.0


@dataclasses.dataclass(frozen=True)
class Preset:
    """A size preset; `resolve_config` overrides its fields with explicit flags."""

    seeds: list = dataclasses.field(default_factory=lambda: [0])
    shots: list = dataclasses.field(default_factory=lambda: [1, 5])
    ways: int = 5
    queries: int = 15
    meta_steps: int = 60
    meta_batch_size: int = 4
    inner_steps: int = 3
    eval_steps: int = 3
    inner_lr: float = 0.4
    meta_lr: float = 0.003
    filters: int = 32
    test_episodes: int = 50
    num_test_alphabets: int | None = None
    image_size: int = 28


PRESETS = {
    "default": Preset(),
    "paper": Preset(
        meta_steps=60000, inner_steps=5, eval_steps=5, meta_lr=0.001, filters=64, test_episodes=600
    ),
    "smoke": Preset(
        shots=[1],
        queries=2,
        meta_steps=2,
        meta_batch_size=1,
        inner_steps=1,
        eval_steps=1,
        filters=4,
        test_episodes=3,
    ),
}


def build_parser():
    """The command-line interface (see the module docstring, ``--help``)."""
    parser = _common.make_parser(EXAMPLE, __doc__)
    g = parser.add_argument_group("experiment (defaults: default preset; paper preset)")
    g.add_argument(
        "--preset",
        choices=("default", "paper"),
        default="default",
        help="size of the run; explicit flags override its values",
    )
    g.add_argument(
        "--methods",
        type=_common.choice_list(METHODS),
        default=",".join(METHODS),
        help="comma-separated methods",
    )
    g.add_argument("--ways", type=int, default=None, help="classes per episode, N (5; 5)")
    g.add_argument(
        "--shots",
        type=_common.int_list,
        default=None,
        help="comma-separated support images per class, K (1,5; 1,5)",
    )
    g.add_argument("--queries", type=int, default=None, help="query images per class, L (15; 15)")
    g.add_argument(
        "--test-episodes", type=int, default=None, help="held-out evaluation episodes (50; 600)"
    )
    g.add_argument("--meta-steps", type=int, default=None, help="meta steps (60; 60000)")
    g.add_argument(
        "--meta-batch-size", type=int, default=None, help="episodes per meta step (4; 4)"
    )
    g.add_argument(
        "--inner-steps", type=int, default=None, help="adaptation steps during meta-training (3; 5)"
    )
    g.add_argument(
        "--eval-steps", type=int, default=None, help="adaptation steps on test episodes (3; 5)"
    )
    g.add_argument(
        "--inner-lr", type=float, default=None, help="SGD learning rate of adaptation (0.4; 0.4)"
    )
    g.add_argument(
        "--meta-lr", type=float, default=None, help="Adam learning rate of θ0 and φ (0.003; 0.001)"
    )
    g.add_argument("--filters", type=int, default=None, help="filters per conv (32; 64)")
    g.add_argument(
        "--warp-kernel",
        type=int,
        default=3,
        choices=(1, 3),
        help="kernel size of the warp convolutions",
    )
    g.add_argument(
        "--objective",
        choices=("exact", "approx"),
        default="exact",
        help="Warp-MAML's warp meta-objective",
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
        help="where to load Omniglot from (tfds: TensorFlow Datasets)",
    )
    g.add_argument(
        "--num-test-alphabets",
        type=int,
        default=None,
        help="held-out alphabets (default: 2 on the 8-alphabet subset, 20 on the full data set)",
    )
    g.add_argument(
        "--rotate-classes",
        action="store_true",
        help="count each meta-training character rotated by 0/90/180/270 degrees as its own class",
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
from warpkeras.data import EpisodeSampler, OmniglotNotFoundError, load_omniglot, rotate_classes  # noqa: E402


def resolve_config(args):
    """Merges the preset (``smoke`` when --smoke) with explicit flags into a dict."""
    preset = "smoke" if args.smoke else args.preset
    cfg = dataclasses.asdict(PRESETS[preset])
    for key in list(cfg):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg.update(
        preset=preset,
        methods=list(args.methods),
        warp_kernel=args.warp_kernel,
        objective=args.objective,
        rotate_classes=bool(args.rotate_classes),
        verbose=args.verbose,
    )
    problems = [
        f"--{k.replace('_', '-')} must be >= 1 (got {cfg[k]})"
        for k in (
            "ways",
            "queries",
            "test_episodes",
            "meta_batch_size",
            "inner_steps",
            "eval_steps",
            "filters",
        )
        if int(cfg[k]) < 1
    ]
    problems += [f"--shots must be >= 1 (got {s})" for s in cfg["shots"] if s < 1]
    if cfg["meta_steps"] < 0:
        problems.append(f"--meta-steps must be >= 0 (got {cfg['meta_steps']})")
    if problems:
        raise SystemExit("few_shot.py: error: " + "; ".join(problems))
    return cfg


# ------------------------------------------------------------------------------------------
# model
def build_model(method, ways=5, image_size=28, filters=32, warp_kernel=3):
    """The few-shot convolutional network (WarpGrad App. I).

    Block i is ``conv{i}`` (3x3, "same") [→ ``warp{i}``] → ``bn{i}`` → ``relu{i}`` →
    ``pool{i}`` (2x2 max); then ``flatten`` and the linear ``head``. For ``"warp_maml"``,
    blocks 2–4 get a warp convolution after their convolution, and ``conv1``/``bn1`` are
    tagged as warp layers (meta-learned, fixed during adaptation).
    """
    inputs = keras.Input((image_size, image_size, 1), name="image")
    h = inputs
    for i in range(1, 5):
        conv = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")
        bn = wl.ExactBatchNormalization(momentum=BN_MOMENTUM, name=f"bn{i}")
        if method == "warp_maml" and i == 1:
            warpkeras.warp(conv)
            warpkeras.warp(bn)
        h = conv(h)
        if method == "warp_maml" and i > 1:
            h = wl.WarpConv2D(kernel_size=warp_kernel, name=f"warp{i}")(h)
        h = bn(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
        h = keras.layers.MaxPooling2D(2, name=f"pool{i}")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    outputs = keras.layers.Dense(ways, name="head")(h)
    return keras.Model(inputs, outputs, name=f"few_shot_{method}")


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_trainer(method, cfg, model, seed):
    """MAMLTrainer or WarpTrainer(mode="online", init_objective="maml")."""
    common = dict(
        inner_steps=cfg["inner_steps"],
        meta_batch_size=cfg["meta_batch_size"],
        inner_learning_rate=cfg["inner_lr"],
        seed=seed,
    )
    if method == "maml":
        return warpkeras.MAMLTrainer(
            model, LOSS, meta_optimizer=keras.optimizers.Adam(cfg["meta_lr"]), **common
        )
    return warpkeras.WarpTrainer(
        model,
        LOSS,
        mode="online",
        objective=cfg["objective"],
        init_objective="maml",
        meta_optimizer=keras.optimizers.Adam(cfg["meta_lr"]),
        init_optimizer=keras.optimizers.Adam(cfg["meta_lr"]),
        **common,
    )


# ------------------------------------------------------------------------------------------
# data
def load_data(args):
    """Loads Omniglot (see --data-dir / --source); exits with the library's message if no
    copy can be found."""
    data_dir = args.data_dir
    if data_dir is None:
        shared = _common.REPO_ROOT.parent / "shared" / "data" / "omniglot"
        data_dir = shared if shared.is_dir() else None
    if args.source == "tfds":
        data_dir = None
    try:
        return load_omniglot(source=args.source, data_dir=data_dir)
    except OmniglotNotFoundError as err:
        raise SystemExit(f"few_shot.py: {err}") from err


def split_alphabets(data, cfg, seed):
    """``(meta_train_alphabets, held_out_alphabets)`` for a seed."""
    names = list(data.alphabet_names)
    n_test = cfg["num_test_alphabets"]
    if n_test is None:
        n_test = 2 if len(names) < 20 else 20
    if not 1 <= n_test < len(names):
        raise SystemExit(f"few_shot.py: cannot hold out {n_test} of {len(names)} alphabets")
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    return shuffled[n_test:], shuffled[:n_test]


def episode_task(episode, name):
    """A `warpkeras.Task` from an `Episode`: support = adaptation data (one batch holding
    the whole support set), query = meta data (always the whole query set) and test data."""
    sx, sy, qx, qy = episode.support_x, episode.support_y, episode.query_x, episode.query_y
    query = (qx, qy)
    return warpkeras.Task(
        train=(sx, sy),
        meta=lambda rng: itertools.repeat(query),
        test=query,
        batch_size=len(sx),
        name=name,
    )


def samplers(data, cfg, seed, shots):
    """Episode samplers over meta-training and held-out characters."""
    train_alphabets, test_alphabets = split_alphabets(data, cfg, seed)
    x_tr, y_tr, _ = data.character_arrays(train_alphabets)
    if cfg["rotate_classes"]:
        x_tr, y_tr = rotate_classes(x_tr, y_tr)
    x_te, y_te, _ = data.character_arrays(test_alphabets)
    kwargs = dict(num_ways=cfg["ways"], num_shots=shots, num_queries=cfg["queries"])
    try:
        train = EpisodeSampler(x_tr, y_tr, seed=seed, **kwargs)
        test = EpisodeSampler(x_te, y_te, seed=seed + 100003, **kwargs)
    except ValueError as err:
        raise SystemExit(f"few_shot.py: {err}") from err
    return train, test, train_alphabets, test_alphabets


# ------------------------------------------------------------------------------------------
# runs
def run_setting(cfg, data, seed, shots, export_dir):
    """Meta-trains and evaluates every method on one (seed, shots) setting.

    Returns ``({method: record}, export_info_or_None)``.
    """
    train_sampler, test_sampler, train_alphabets, test_alphabets = samplers(data, cfg, seed, shots)

    def sample_train_task(rng):
        index = int(rng.integers(0, 2**31 - 1))
        return episode_task(train_sampler.sample(index), f"train_episode_{index}")

    test_tasks = [
        episode_task(test_sampler.sample(i), f"test_episode_{i}")
        for i in range(cfg["test_episodes"])
    ]
    records, export_info = {}, None
    for method in cfg["methods"]:
        keras.utils.set_random_seed(seed)
        model = build_model(
            method, cfg["ways"], cfg["image_size"], cfg["filters"], cfg["warp_kernel"]
        )
        trainer = make_trainer(method, cfg, model, seed)
        label = f"{METHOD_LABELS[method]} {cfg['ways']}-way {shots}-shot"
        if cfg["verbose"]:
            print(
                f"\n[{label}] seed {seed}: meta-training ({cfg['meta_steps']} meta steps)",
                flush=True,
            )
        with _common.Stopwatch() as fit_time:
            history = trainer.fit(
                sample_train_task, **_common.fit_epochs(cfg["meta_steps"]), verbose=cfg["verbose"]
            )
        if cfg["verbose"]:
            print(f"[{label}] seed {seed}: {len(test_tasks)} test episodes", flush=True)
        with _common.Stopwatch() as eval_time:
            report = trainer.evaluate(
                test_tasks, steps=cfg["eval_steps"], seed=seed, verbose=1 if cfg["verbose"] else 0
            )
        hist = {k: [float(v) for v in vals] for k, vals in history.step_history.items()}
        step_seconds = hist.get("seconds", [])
        accuracies = report["final_test_accuracy"]["values"]
        records[method] = {
            "seed": seed,
            "meta_train_alphabets": train_alphabets,
            "held_out_alphabets": test_alphabets,
            "meta_train_classes": int(train_sampler.num_classes),
            "held_out_classes": int(test_sampler.num_classes),
            "episode_accuracy": accuracies,
            "episode_loss": report["final_test_loss"]["values"],
            "accuracy_before_adaptation": [c["test_accuracy"][0] for c in report["curves"]],
            "history": hist,
            "meta_train_seconds": fit_time.seconds,
            "eval_seconds": eval_time.seconds,
            "seconds_per_meta_step": float(np.median(step_seconds[1:]))
            if len(step_seconds) > 1
            else None,
            "trainer": trainer.get_config(),
        }
        if cfg["verbose"]:
            print(
                f"[{label}] seed {seed}: accuracy {np.mean(accuracies) * 100:.1f}% "
                f"(± {(_common.confidence95(accuracies) or 0) * 100:.1f}), meta-training "
                f"{fit_time.seconds:.0f}s",
                flush=True,
            )
        if method == "warp_maml" and export_dir is not None:
            export_info = export_warp_maml(
                model,
                trainer,
                cfg,
                export_dir,
                sample_train_task(np.random.default_rng(seed)),
                test_tasks[0],
                accuracies[0],
            )
            export_info.update(seed=seed, shots=shots)
            if cfg["verbose"]:
                print(f"Exported Warp-MAML to {export_dir}", flush=True)
            export_dir = None
    return records, export_info


def export_warp_maml(
    model, trainer, cfg, export_dir, calibration_task, test_task, trainer_accuracy
):
    """Exports the meta-learned Warp-MAML model and checks the SavedModel on a test episode.

    The batch-norm statistics are first set from a meta-training support set at (θ0, φ).
    The check loads the SavedModel with TensorFlow alone and runs ``adapt_and_predict`` on
    the episode's support set; its predictions use the support set's batch statistics,
    whereas the trainer's evaluation normalises the query batch with its own statistics,
    so the two accuracies can differ a little.
    """
    model(calibration_task.train[0], training=True)
    info = _common.export_model(
        model,
        export_dir,
        loss="sparse_categorical_crossentropy",
        from_logits=True,
        learning_rate=cfg["inner_lr"],
        steps=cfg["eval_steps"],
        training=True,
    )
    if info["format"] != "warpkeras.export_adaptive":
        return info
    served = tf.saved_model.load(str(export_dir))
    (sx, sy), (qx, qy) = test_task.train, test_task.test
    out = served.signatures["adapt_and_predict"](
        x=tf.constant(sx),
        y=tf.constant(sy.astype(np.int64)),
        steps=tf.constant(cfg["eval_steps"], tf.int32),
        queries=tf.constant(qx),
    )
    pred = np.argmax(out["predictions"].numpy(), axis=-1)
    info["check"] = {
        "episode": test_task.name,
        "steps": cfg["eval_steps"],
        "query_accuracy_saved_model": float(np.mean(pred == qy)),
        "query_accuracy_trainer": float(trainer_accuracy),
        "chance": 1.0 / cfg["ways"],
    }
    return info


def summarise(records):
    """Pools per-seed records of one method and setting."""
    acc = [a for r in records for a in r["episode_accuracy"]]
    stat = _common.stats(acc)
    per_step = [r["seconds_per_meta_step"] for r in records if r["seconds_per_meta_step"]]
    return {
        "accuracy": stat,
        "ci95": _common.confidence95(acc),
        "accuracy_before_adaptation": _common.stats(
            [a for r in records for a in r["accuracy_before_adaptation"]]
        ),
        "per_seed": records,
        "meta_train_seconds": float(sum(r["meta_train_seconds"] for r in records)),
        "eval_seconds": float(sum(r["eval_seconds"] for r in records)),
        "seconds_per_meta_step": float(np.mean(per_step)) if per_step else None,
    }


def main(argv=None):
    """Runs the example; returns the results dict (also written as JSON).

    The JSON is rewritten after every finished (setting, seed) (``"complete": false`` until
    the end), so an interrupted long run keeps what it has.
    """
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    out_dir, export_dir = _common.output_dirs(args, EXAMPLE)
    json_path = out_dir / "few_shot.json"
    results, state = {}, {"export": None, "plots": {}}

    def write(seconds, complete):
        output = {
            "example": EXAMPLE,
            "complete": complete,
            "config": cfg,
            "data": {"source": data.source, "alphabets": data.alphabet_names},
            "metric_notes": {
                "accuracy": "query-set accuracy of each held-out episode after adaptation on "
                "its support set; mean/std over episodes (and seeds)",
                "ci95": "half-width of the 95% confidence interval of the mean accuracy",
            },
            "results": results,
            "plots": state["plots"],
            "export": state["export"],
            "wall_time_seconds": seconds,
            "environment": _common.environment(),
        }
        _common.write_json(json_path, output)
        return output

    with _common.Stopwatch() as total:
        data = load_data(args)
        if cfg["verbose"]:
            print(f"Omniglot: {data}", flush=True)
        for shots in cfg["shots"]:
            setting = f"{cfg['ways']}-way {shots}-shot"
            per_method = {m: [] for m in cfg["methods"]}
            for seed in cfg["seeds"]:
                records, info = run_setting(
                    cfg,
                    data,
                    seed,
                    shots,
                    None if (args.no_export or state["export"] is not None) else export_dir,
                )
                state["export"] = state["export"] or info
                for method, record in records.items():
                    per_method[method].append(record)
                results[setting] = {
                    method: dict(label=METHOD_LABELS[method], **summarise(recs))
                    for method, recs in per_method.items()
                }
                write(time.perf_counter() - total.start, complete=False)

    settings = list(results)
    plot = _common.bar_plot(
        out_dir / "few_shot.png",
        [METHOD_LABELS[m] for m in cfg["methods"]],
        [[results[s][m]["accuracy"]["mean"] * 100 for s in settings] for m in cfg["methods"]],
        [[(results[s][m]["ci95"] or 0.0) * 100 for s in settings] for m in cfg["methods"]],
        ylabel="query accuracy after adaptation (%)",
        title=f"Omniglot few-shot, {cfg['test_episodes']} test episodes (95% CI)",
        groups=settings,
    )
    state["plots"]["accuracy"] = str(plot)
    output = write(total.seconds, complete=True)
    export_info = state["export"]
    print(
        f"\nOmniglot few-shot ({cfg['preset']} size), seeds {cfg['seeds']}, "
        f"{cfg['test_episodes']} test episodes, {cfg['eval_steps']} adaptation steps:"
    )
    rows = []
    for setting, per_method in results.items():
        for r in per_method.values():
            ci = f"± {r['ci95'] * 100:.1f}" if r["ci95"] is not None else ""
            rows.append(
                [
                    setting,
                    r["label"],
                    f"{r['accuracy']['mean'] * 100:.1f} {ci}",
                    f"{r['seconds_per_meta_step']:.3f}" if r["seconds_per_meta_step"] else "-",
                    f"{r['meta_train_seconds']:.0f}",
                ]
            )
    _common.print_table(
        ["setting", "method", "accuracy (%, 95% CI)", "s / meta step", "meta-train s"], rows
    )
    _common.print_written(json_path, [plot], export_info, total.seconds)
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
