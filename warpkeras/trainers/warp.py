"""`WarpTrainer`: WarpGrad meta-training (Algorithms 1–3), alone or with an initialisation."""

from warpkeras import _validation as _v
from warpkeras.meta import MetaTrainingError
from warpkeras.trainers.base import MetaTrainer
from warpkeras.trainers.presets import INIT_OBJECTIVES, WARP_OBJECTIVES


class WarpTrainer(MetaTrainer):
    """Meta-learns warp parameters φ (WarpGrad), optionally with an initialisation θ0.

    The warp objective is L(φ) of WarpGrad Eq. 3, the expected one-step improvement of the
    meta loss over sampled task parameterisations. `mode` picks the meta-training algorithm:

    * ``"online"`` (Algorithm 1): ∇φ L at every adaptation step k = 0 … K − 1 is
      accumulated while the tasks adapt; φ is updated once per meta step. Memory is
      constant in K.
    * ``"offline"`` (Algorithm 2): adaptation fills a replay buffer with θ_0 … θ_K of every
      task (K + 1 points, each with its momentum buffer; ``buffer_final_point=False``
      leaves out θ_K); then stored points are drawn without replacement and φ is updated
      on mini-batches of ``meta_interval`` (η) points, up to one update per η points (the
      Omniglot experiment makes 2000 warp updates per meta step this way). A point's warp
      gradient is that of Eq. 3 through one inner step from it (for θ_K, one step more
      than the adaptation took, as in Algorithm 2).
    * ``"continual"`` (Algorithm 3): one stream of task parameters adapts across all tasks
      without resets; the approximate warp meta-gradient is accumulated and applied every
      η inner steps (the maze-navigation experiment uses η = 30).

    The N gradients that make one warp update are averaged by default
    (``warp_gradient_reduction="mean"``); Algorithms 1–3 sum them
    (``warp_gradient_reduction="sum"``, the paper's choice). With an SGD meta optimizer the
    mean with learning rate β is the paper's sum with β / N, where N is K × (finite tasks)
    online, the mini-batch's points (η) offline and η in continual mode; see
    `warpkeras.trainers.MetaTrainer`.

    A preset: ``WarpTrainer(model, loss, mode="offline", init_objective="leap")`` is
    ``MetaTrainer(model, loss, objectives=[warpkeras.meta.WarpObjective("offline"),
    warpkeras.meta.Leap()])`` (see `warpkeras.trainers.presets`).

    ``objective="exact"`` differentiates through the inner step (second order in φ);
    ``"approx"`` stops the inner gradient (App. G).

    ``init_objective`` adds λC(θ0) (Eq. 8): ``"leap"`` gives Warp-Leap (the multi-shot
    Omniglot learner), ``"maml"`` Warp-MAML (few-shot; online mode), ``"reptile"``, or
    `None` to keep the initialisation fixed (the continual-learning experiment).

    Example:

    ```python
    import keras, numpy as np, warpkeras
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(16, activation="tanh"),
        warpkeras.layers.WarpDense(), keras.layers.Dense(1)])
    rng = np.random.default_rng(0)
    def make_task(rng):
        w = rng.normal(size=(4, 1)); x = rng.normal(size=(64, 4)).astype("float32")
        return warpkeras.Task(train=(x, (x @ w).astype("float32")), batch_size=16)
    trainer = warpkeras.WarpTrainer(model, loss="mse", mode="online",
                                    init_objective="leap", inner_steps=5,
                                    meta_batch_size=2, inner_learning_rate=0.05)
    history = trainer.fit(make_task, meta_steps=2, verbose=0)
    report = trainer.evaluate([make_task(rng)], steps=5, verbose=0)
    ```

    Args:
        model: a built, tagged `keras.Model` with at least one warp layer.
        loss: the task loss.
        mode: ``"online"``, ``"offline"`` (default) or ``"continual"``.
        objective: ``"exact"`` (default) or ``"approx"``.
        init_objective: ``"leap"`` (default), ``"maml"``, ``"fomaml"``, ``"reptile"`` or
            `None` (forced to `None` in continual mode only if you pass it so).
        **kwargs: see `warpkeras.trainers.MetaTrainer` (inner_learning_rate,
            inner_momentum, learn_inner_learning_rate, inner_steps, meta_batch_size,
            meta_optimizer, init_optimizer, init_weight, meta_interval,
            warp_gradient_reduction, buffer_final_point, buffer_capacity,
            leap_norm, meta_loss, seed, jit_compile, ...).
    """

    def __init__(
        self, model, loss, mode="offline", objective="exact", init_objective="leap", **kwargs
    ):
        where = type(self).__name__
        mode = _v.check_choice(
            mode, "mode", ("online", "offline", "continual"), where=where, error=MetaTrainingError
        )
        objective = _v.check_choice(
            objective, "objective", WARP_OBJECTIVES, where=where, error=MetaTrainingError
        )
        init_objective = _v.check_choice(
            init_objective, "init_objective", INIT_OBJECTIVES, where=where, error=MetaTrainingError
        )
        super().__init__(
            model,
            loss,
            warp_mode=mode,
            warp_objective=objective,
            init_objective=init_objective,
            **kwargs,
        )
