"""Meta-SGD on sine regression, written only against the public `warpkeras.meta` interface.

Meta-SGD (Li, Zhou, Chen and Li, 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning", arXiv:1707.09835, Sec. 3) adapts with a learning rate per parameter,

    θ_{k+1} = θ_k − α ⊙ ∇L_support(θ_k),   k = 0 .. K−1,

and meta-learns both the initialisation θ0 and the rates α by the query loss after the K
steps, min_{θ0, α} E_τ [L_query(θ_K(θ0, α))], differentiating through the steps (second
order). In WarpGrad's terms (Flennerhag et al., Eq. 1) it is MAML with a diagonal
preconditioner P = diag(α).

This file writes the rule as an objective's `inner_update` hook, against the public
`warpkeras.meta` interface only. The same rule ships as a value,
``MetaTrainer(..., objectives=[MAML()], inner_rule=warpkeras.rules.MetaSGD())``, which
`trainer.export` also serves (a hook reads the trainer, so `export` refuses it by name).

The demo meta-trains a small MLP on sine waves (Finn et al., 2017: amplitude in [0.1, 5],
phase in [0, π], x in [−5, 5]; K-shot support and query sets) and prints one JSON line
with the held-out query loss after adapting from the initial θ0, α (`before`) and from
the meta-learned ones (`after`).

Examples:
  python examples/meta_sgd.py            # about 20 s of CPU time (longer on shared cores)
  python examples/meta_sgd.py --smoke    # a few seconds (the tests run it)
  python examples/meta_sgd.py --maml     # and MAML from the same start, for comparison
  python examples/meta_sgd.py --output-dir results/meta_sgd   # also writes meta_sgd.json
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the repository on sys.path, the Keras backend; no TensorFlow)

EXAMPLE = "meta_sgd"


def parse_args(argv=None):
    """The command line (parsed before TensorFlow loads, so ``--help`` answers at once)."""
    parser = _common.demo_parser(
        EXAMPLE,
        __doc__,
        meta_steps=600,
        inner_steps=1,
        inner_lr=0.01,
        meta_lr=1e-3,
        inner_steps_help="K (the paper uses 1)",
        inner_lr_help="initial α",
        meta_lr_help="Adam, θ0 and α",
        maml_help="also meta-train MAML (a fixed α) from the same start",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad flags answer before TensorFlow loads

import warpkeras  # noqa: E402  (first: it picks TensorFlow's CPU kernels)

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402

from warpkeras.meta import MAML  # noqa: E402


class MetaSGD(MAML):
    """Meta-SGD (Li et al., 2017): θ ← θ − α ⊙ ∇L with a meta-learned rate per parameter.

    `MAML` (second order unless ``first_order=True``) whose inner rule multiplies the
    gradient elementwise by α, one `keras.Variable` per task variable (same shape and
    dtype), meta-learned with θ0 by the same query loss through the K unrolled steps and
    updated by the same optimiser. The rates are used wherever the trainer adapts (`fit`,
    `adapt`, `evaluate`), are saved in the trainer's checkpoints, and their mean is logged
    as ``alpha_mean``.

    Args:
        alpha_initializer: Keras initializer of α (e.g. ``keras.initializers.RandomUniform(
            0.005, 0.1)``; the paper draws α at random); default: the trainer's inner
            learning rate.
        first_order, weight, optimizer: as in `warpkeras.meta.MAML`.

    Raises:
        MetaTrainingError: (at trainer construction) the trainer has an inner momentum,
            which this rule has no place for.
    """

    def __init__(self, alpha_initializer=None, first_order=False, weight=1.0, optimizer=None):
        super().__init__(first_order=first_order, weight=weight, optimizer=optimizer)
        self.alpha_initializer = keras.initializers.get(alpha_initializer)
        self.alpha = None

    def build(self, engine):
        lr = float(engine.inner_lr.numpy())
        init = self.alpha_initializer or keras.initializers.Constant(lr)
        self.alpha = [
            keras.Variable(init, shape=v.shape, dtype=v.dtype, name=f"alpha_{i}")
            for i, v in enumerate(engine.partition.task_variables)
        ]
        super().build(engine)

    def meta_variables(self, engine):
        return self.alpha

    def inner_update(self, engine, theta, grads, velocity):
        return [t - a * g for t, a, g in zip(theta, self.alpha, grads)], velocity

    def logs(self, engine):
        values = np.concatenate([np.ravel(a.numpy()) for a in self.alpha])
        return {"alpha_mean": float(values.mean())}


def sine_task(rng, shots=10, queries=10, test=100, name="sine"):
    """A sine-regression task: y = A sin(x − b), A ~ U[0.1, 5], b ~ U[0, π], x ~ U[−5, 5];
    `shots` support points (one batch), `queries` query points, `test` held-out points."""
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, np.pi)

    def points(n):
        x = rng.uniform(-5.0, 5.0, size=(n, 1)).astype("float32")
        return x, (amplitude * np.sin(x - phase)).astype("float32")

    return warpkeras.Task(
        train=points(shots),
        meta=points(queries),
        test=points(test),
        batch_size=max(shots, queries),
        name=name,
    )


def make_model(width=32, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(1),
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.meta_steps, args.test_tasks = 5, 5
    start = time.perf_counter()
    test_rng = np.random.default_rng([args.seed, 1])
    held_out = [sine_task(test_rng, args.shots, name=f"test{i}") for i in range(args.test_tasks)]

    def run(objective):
        """Held-out query loss after K steps, before and after meta-training."""
        trainer = warpkeras.MetaTrainer(
            make_model(seed=args.seed),
            "mse",
            objectives=[objective],
            inner_steps=args.inner_steps,
            meta_batch_size=args.meta_batch_size,
            inner_learning_rate=args.inner_lr,
            seed=args.seed,
        )
        before = trainer.evaluate(held_out, verbose=0)["final_test_loss"]["mean"]
        trainer.fit(
            lambda rng: sine_task(rng, args.shots),
            **_common.fit_epochs(args.meta_steps),
            verbose=args.verbose,
        )
        return before, trainer.evaluate(held_out, verbose=0)["final_test_loss"]["mean"]

    meta_sgd = MetaSGD(optimizer=keras.optimizers.Adam(args.meta_lr))
    before, after = run(meta_sgd)
    alpha = np.concatenate([np.ravel(a.numpy()) for a in meta_sgd.alpha])
    result = {
        "example": "meta_sgd",
        "meta_steps": args.meta_steps,
        "inner_steps": args.inner_steps,
        "shots": args.shots,
        "test_tasks": args.test_tasks,
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "alpha": {
            "min": float(alpha.min()),
            "mean": float(alpha.mean()),
            "max": float(alpha.max()),
        },
    }
    if args.maml:
        result["maml_held_out_loss_after"] = run(
            MAML(optimizer=keras.optimizers.Adam(args.meta_lr))
        )[1]
    return _common.finish_demo(EXAMPLE, args, result, start)


if __name__ == "__main__":
    main()
