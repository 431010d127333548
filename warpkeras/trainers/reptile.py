"""`ReptileTrainer`: Reptile (Nichol et al., 2018)."""

from warpkeras.trainers.base import MetaTrainer


class ReptileTrainer(MetaTrainer):
    """Reptile: adapt K steps from θ0, then move θ0 towards the adapted parameters,
    θ0 ← θ0 − β (θ0 − θ_K) averaged over the meta-batch
    (`warpkeras.objectives.reptile_direction`).

    A preset for ``MetaTrainer(model, loss, objectives=[warpkeras.meta.Reptile()])``.

    Example:

    ```python
    trainer = warpkeras.ReptileTrainer(model, loss="mse", inner_steps=32,
                                       meta_optimizer=keras.optimizers.SGD(0.1))
    ```

    Args:
        model: a built `keras.Model`.
        loss: the task loss.
        **kwargs: see `warpkeras.trainers.MetaTrainer`.
    """

    def __init__(self, model, loss, **kwargs):
        kwargs.setdefault("init_optimizer", kwargs.get("meta_optimizer"))
        super().__init__(model, loss, warp_mode=None, init_objective="reptile", **kwargs)
