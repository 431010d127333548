"""`LeapTrainer`: meta-learned initialisation by gradient-path length (Leap)."""

from warpkeras import _validation as _v
from warpkeras.trainers.base import MetaTrainer, MetaTrainingError


class LeapTrainer(MetaTrainer):
    """Leap's Pull-Forward algorithm (Leap Algorithm 1): θ0 is pulled along the tasks'
    gradient paths so that adaptation from it travels a shorter path.

    The meta-gradient of each step is `warpkeras.objectives.leap_meta_gradient`
    (Leap Eq. 8 with ``norm="energy"``, WarpGrad Eq. 12 with ``norm="length"``, the
    default, as in the reference implementation), summed over a task's steps and averaged
    over the meta-batch, then applied by `init_optimizer`. Warp layers, if the model has
    any, are left untouched (they act as fixed preconditioners); use `WarpTrainer` with
    ``init_objective="leap"`` for Warp-Leap.

    A preset for ``MetaTrainer(model, loss, objectives=[warpkeras.meta.Leap(norm, ...)])``.

    Example:

    ```python
    trainer = warpkeras.LeapTrainer(model, loss="sparse_categorical_crossentropy",
                                    inner_steps=100, meta_batch_size=5,
                                    inner_learning_rate=0.1,
                                    meta_optimizer=keras.optimizers.SGD(0.1))
    trainer.fit(train_tasks, meta_steps=50)
    ```

    Args:
        model: a built `keras.Model` (untagged layers are task layers).
        loss: the task loss.
        norm: ``"length"`` (default) or ``"energy"``.
        sign_correction: Leap App. C stabiliser (default True).
        loss_in_path: include the loss as a path coordinate (default True).
        **kwargs: see `warpkeras.trainers.MetaTrainer`.
    """

    def __init__(
        self, model, loss, norm="length", sign_correction=True, loss_in_path=True, **kwargs
    ):
        where = type(self).__name__
        norm = _v.check_choice(
            norm, "norm", ("length", "energy"), where=where, error=MetaTrainingError
        )
        sign_correction = _v.check_bool(sign_correction, "sign_correction", where=where)
        loss_in_path = _v.check_bool(loss_in_path, "loss_in_path", where=where)
        kwargs.setdefault("init_optimizer", kwargs.get("meta_optimizer"))
        super().__init__(
            model,
            loss,
            warp_mode=None,
            init_objective="leap",
            leap_norm=norm,
            leap_sign_correction=sign_correction,
            leap_loss_in_path=loss_in_path,
            **kwargs,
        )
