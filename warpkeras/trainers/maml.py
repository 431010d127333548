"""`MAMLTrainer`: MAML and first-order MAML."""

from warpkeras import _validation as _v
from warpkeras.trainers.base import MetaTrainer


class MAMLTrainer(MetaTrainer):
    """Model-Agnostic Meta-Learning (Finn et al.; WarpGrad Eq. 1).

    For each task, K steps of the inner rule (SGD with ``inner_learning_rate`` and, when
    given, heavy-ball ``inner_momentum``, or ``inner_rule=``) from θ0 on a support batch
    (the task's first adaptation batch, reused at every step), then the loss on a query
    batch (the task's meta data);
    θ0 follows the gradient of that loss, through the K steps (second order) or, with
    ``first_order=True``, with the inner gradients stopped (FOMAML). Beyond
    `warpkeras.objectives.MAML_UNROLL_MAX_STEPS` (5) steps they run as one symbolic loop
    (`tf.while_loop`), so the time to the first meta step does not grow with K.

    A preset for ``MetaTrainer(model, loss, objectives=[warpkeras.meta.MAML(first_order)])``.

    Example:

    ```python
    trainer = warpkeras.MAMLTrainer(model, loss="sparse_categorical_crossentropy",
                                    inner_steps=5, inner_learning_rate=0.4,
                                    meta_optimizer=keras.optimizers.Adam(1e-3))
    ```

    Args:
        model: a built `keras.Model`.
        loss: the task loss.
        first_order: FOMAML.
        unroll: `True`: write the K steps into the graph one after the other (tracing
            time grows with K, steady steps are faster); `False`: one `tf.while_loop`;
            `None` (default): unrolled for K ≤ 5 without `recompute`, the loop
            otherwise.
        recompute: recompute each inner step's activations in the backward pass instead
            of keeping them: the memory of second-order MAML grows with K × |θ| rather
            than K × the activations, for about one more forward and inner backward pass
            per step; the same meta-gradient (default False).
        **kwargs: see `warpkeras.trainers.MetaTrainer`.
    """

    def __init__(self, model, loss, first_order=False, unroll=None, recompute=False, **kwargs):
        where = type(self).__name__
        first_order = _v.check_bool(first_order, "first_order", where=where)
        unroll = _v.check_bool(unroll, "unroll", allow_none=True, where=where)
        recompute = _v.check_bool(recompute, "recompute", where=where)
        kwargs.setdefault("init_optimizer", kwargs.get("meta_optimizer"))
        super().__init__(
            model,
            loss,
            warp_mode=None,
            init_objective="fomaml" if first_order else "maml",
            maml_unroll=unroll,
            maml_recompute=recompute,
            **kwargs,
        )
