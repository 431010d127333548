"""ANIL on few-shot regression with shared features, written only against the public
`warpkeras.meta` interface.

ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio and Vinyals, 2020, "Rapid Learning or
Feature Reuse? Towards Understanding the Effectiveness of MAML", ICLR, Sec. 4), is MAML
whose inner loop adapts only the head θ_h; the body θ_b is reused as it is:

    θ_h,k+1 = θ_h,k − α ∇_{θ_h} L_support(θ_b, θ_h,k),   k = 0 .. K−1,

while the outer loop meta-learns the body and the head's initialisation together by the
query loss after the K steps, min_{θ_b, θ_h,0} E_τ [L_query(θ_b, θ_h,K(θ_b, θ_h,0))]
(second order: through the steps). In warpkeras the body is tagged `warpkeras.warp` (frozen
during adaptation, meta-learned) and the head is the task part.

The demo's tasks share a nonlinear feature map and differ by a linear read-out,
y = tanh(x A + c) w_τ (A, c fixed, w_τ ~ N(0, I) per task): the case where reusing
meta-learned features is all a task needs. It prints one JSON line with the held-out query
loss after adapting the head from the initial model (`before`) and from the meta-learned
one (`after`).

Examples:
  python examples/anil.py            # about 15 s of CPU time (longer on shared cores)
  python examples/anil.py --smoke    # a few seconds (the tests run it)
  python examples/anil.py --maml     # and MAML from the same start, for comparison
  python examples/anil.py --output-dir results/anil   # also writes anil.json
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the repository on sys.path, the Keras backend; no TensorFlow)

EXAMPLE = "anil"


def parse_args(argv=None):
    """The command line (parsed before TensorFlow loads, so ``--help`` answers at once)."""
    parser = _common.demo_parser(
        EXAMPLE,
        __doc__,
        meta_steps=400,
        inner_steps=5,
        inner_lr=0.1,
        meta_lr=3e-3,
        meta_lr_help="Adam, body and head θ0",
        maml_help="also meta-train MAML (every layer adapts) from the same start",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and bad flags answer before TensorFlow loads

import warpkeras  # noqa: E402  (first: it picks TensorFlow's CPU kernels)

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402

from warpkeras.meta import MAML, MetaTrainingError  # noqa: E402


class ANIL(MAML):
    """ANIL (Raghu et al., 2020): only the head adapts; the body is meta-learned.

    `MAML` (second order unless ``first_order=True``) whose `meta_variables` are the
    body's: the model's layers tagged `warpkeras.warp` (the trainer's φ, so every
    adaptation, in `fit`, `adapt` and `evaluate`, leaves them unchanged). The gradient of
    the query loss after the K head steps updates both the body and the head's θ0, with
    one optimiser. The head is every other layer (or the layers tagged `warpkeras.task`
    with ``MetaTrainer(..., untagged="warp")``).

    Args:
        first_order, weight, optimizer: as in `warpkeras.meta.MAML`.

    Raises:
        MetaTrainingError: (at trainer construction) the model has no body (no layer
            tagged `warpkeras.warp`).
    """

    def build(self, engine):
        if not engine.partition.warp_variables:
            raise MetaTrainingError(
                "ANIL: the model has no body to meta-learn: tag the body's layers with "
                "warpkeras.warp(layer) (the head, every other layer, adapts)."
            )
        super().build(engine)

    def meta_variables(self, engine):
        return list(engine.partition.warp_variables)


def feature_task(rng, features, shots=10, queries=10, test=100, name="task"):
    """A task y = tanh(x A + c) w with the shared (A, c) = `features` and w ~ N(0, I):
    `shots` support points (one batch), `queries` query points, `test` held-out points."""
    a, c = features
    w = rng.normal(size=(a.shape[1], 1))

    def points(n):
        x = rng.normal(size=(n, a.shape[0]))
        return x.astype("float32"), (np.tanh(x @ a + c) @ w).astype("float32")

    return warpkeras.Task(
        train=points(shots),
        meta=points(queries),
        test=points(test),
        batch_size=max(shots, queries),
        name=name,
    )


def make_model(inputs=4, width=32, seed=0, body_role=warpkeras.warp):
    """A body of two tanh layers, tagged with `body_role` (`warpkeras.warp` for ANIL,
    `warpkeras.task` to adapt every layer), and a linear head."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            body_role(keras.layers.Dense(width, activation="tanh", name="body_1")),
            body_role(keras.layers.Dense(width, activation="tanh", name="body_2")),
            keras.layers.Dense(1, name="head"),
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.meta_steps, args.test_tasks = 5, 5
    start = time.perf_counter()
    rng = np.random.default_rng([args.seed, 0])
    features = (rng.normal(size=(4, 8)), rng.normal(size=8))
    held_out = [
        feature_task(rng, features, args.shots, name=f"test{i}") for i in range(args.test_tasks)
    ]

    def run(objective, body_role):
        """Held-out query loss after K steps, before and after meta-training."""
        trainer = warpkeras.MetaTrainer(
            make_model(seed=args.seed, body_role=body_role),
            "mse",
            objectives=[objective],
            inner_steps=args.inner_steps,
            meta_batch_size=args.meta_batch_size,
            inner_learning_rate=args.inner_lr,
            seed=args.seed,
        )
        before = trainer.evaluate(held_out, verbose=0)["final_test_loss"]["mean"]
        trainer.fit(
            lambda r: feature_task(r, features, args.shots),
            **_common.fit_epochs(args.meta_steps),
            verbose=args.verbose,
        )
        return before, trainer.evaluate(held_out, verbose=0)["final_test_loss"]["mean"]

    before, after = run(ANIL(optimizer=keras.optimizers.Adam(args.meta_lr)), warpkeras.warp)
    result = {
        "example": "anil",
        "meta_steps": args.meta_steps,
        "inner_steps": args.inner_steps,
        "shots": args.shots,
        "test_tasks": args.test_tasks,
        "held_out_loss_before": before,
        "held_out_loss_after": after,
    }
    if args.maml:
        result["maml_held_out_loss_after"] = run(
            MAML(optimizer=keras.optimizers.Adam(args.meta_lr)), warpkeras.task
        )[1]
    return _common.finish_demo(EXAMPLE, args, result, start)


if __name__ == "__main__":
    main()
