"""`Leap`: the initialisation θ0 pulled forward along the tasks' gradient paths."""

import keras
import tensorflow as tf

from warpkeras import _validation as _v
from warpkeras import objectives as obj
from warpkeras.meta.base import MetaObjective, MetaTrainingError, all_finite


def default_optimizer(engine, optimizer):
    """`optimizer`, or a fresh copy of the trainer's ``meta_optimizer``."""
    if optimizer is not None:
        return optimizer
    base = engine.meta_optimizer
    return base.__class__.from_config(base.get_config())


class InitObjective(MetaObjective):
    """Shared by the objectives that meta-learn θ0: its optimiser (``init_optimizer``) and
    the weight λ of J = L(φ) + λC(θ0) (WarpGrad Eq. 8), applied to the mean over the
    meta-batch's finite tasks of the per-task meta-gradient."""

    optimizer_name = "init_optimizer"

    def __init__(self, weight=1.0, optimizer=None):
        where = type(self).__name__
        self.weight = _v.check_float(
            weight, "weight", minimum=0.0, where=where, error=MetaTrainingError, example=1.0
        )
        self.optimizer = _v.get_optimizer(optimizer, "optimizer", where=where)

    def build(self, engine):
        self.optimizer = default_optimizer(engine, self.optimizer)
        self.optimizer.build(self.variables(engine))
        tp = engine.theta_packer
        variables = self.variables(engine)

        def apply(grads):
            self.optimizer.apply([g * self.weight for g in tp.unpack(grads)], variables)

        self._apply = engine.compile_apply(apply)

    def variables(self, engine):
        return engine.partition.task_variables

    def apply(self, engine, grads, count):
        self._apply(tuple(g / float(count) for g in grads))

    def get_config(self):
        return {
            "class": type(self).__name__,
            "weight": self.weight,
            "optimizer": keras.optimizers.serialize(self.optimizer)
            if isinstance(self.optimizer, keras.optimizers.Optimizer)
            else None,
        }


class Leap(InitObjective):
    """Leap's pull-forward meta-gradient of θ0 (Leap Algorithm 1).

    Every inner step k → k + 1 adds the increment of
    `warpkeras.objectives.leap_meta_gradient` (Leap Eq. 8 with ``norm="energy"``, WarpGrad
    Eq. 12 with ``norm="length"``) between θ_k and θ_{k+1}; the path is closed at θ_K with
    one more loss on a fresh training batch. The sum over a task's steps is its
    meta-gradient; the mean over the meta-batch is applied to θ0.

    Args:
        norm: ``"length"`` (default, the reference implementation) or ``"energy"``.
        sign_correction: Leap App. C stabiliser (default True).
        loss_in_path: the loss is a coordinate of the path (default True).
        weight: λ (default 1).
        optimizer: Keras optimizer for θ0 (default: a copy of the trainer's
            ``meta_optimizer``).
    """

    def __init__(
        self, norm="length", sign_correction=True, loss_in_path=True, weight=1.0, optimizer=None
    ):
        super().__init__(weight, optimizer)
        where = type(self).__name__
        self.norm = _v.check_choice(
            norm, "norm", ("length", "energy"), where=where, error=MetaTrainingError
        )
        self.sign_correction = _v.check_bool(sign_correction, "sign_correction", where=where)
        self.loss_in_path = _v.check_bool(loss_in_path, "loss_in_path", where=where)

    def _increment(self, prev_theta, theta, prev_loss, loss, prev_grad):
        return obj.leap_meta_gradient(
            list(prev_theta),
            list(theta),
            prev_loss,
            loss,
            list(prev_grad),
            norm=self.norm,
            sign_correction=self.sign_correction,
            loss_in_path=self.loss_in_path,
        )

    def build(self, engine):
        super().build(engine)
        p, tp, sp = engine.partition, engine.theta_packer, engine.state_packer

        def leap_close(carry, x, y):
            """Closes the path at θ_K with one more loss on a fresh batch."""
            loss, _ = obj.task_loss(
                p,
                engine.loss,
                tp.unpack(carry["theta"]),
                engine.phi(),
                (x, y),
                sp.unpack(carry["state"]),
            )
            inc = self._increment(
                carry["prev_theta"], carry["theta"], carry["prev_loss"], loss, carry["prev_grad"]
            )
            total = tuple(a + i for a, i in zip(carry["leap"], inc))
            return total, all_finite(total)

        self._close = engine.compile_group(leap_close, "group_leap_close")

    def initial_carry(self, engine, size, theta):
        zeros = tuple(tf.zeros_like(t) for t in theta)
        dtype = theta[0].dtype
        return {
            "leap": zeros,
            "prev_theta": zeros,
            "prev_grad": zeros,
            "prev_loss": tf.zeros([size], dtype),
            "has_prev": tf.zeros([size], dtype),
        }

    def step(self, engine, carry, new, out, result):
        inc = self._increment(
            carry["prev_theta"],
            carry["theta"],
            carry["prev_loss"],
            result["step"].loss,
            carry["prev_grad"],
        )
        new["leap"] = tuple(a + carry["has_prev"] * i for a, i in zip(carry["leap"], inc))
        new["prev_theta"], new["prev_grad"] = carry["theta"], result["gradients"]
        new["prev_loss"] = result["step"].loss
        new["has_prev"] = tf.ones_like(carry["has_prev"])

    def close(self, engine, group):
        batches = [next(it) for it in group.train_iterators]
        grads, ok = engine.by_shape(
            lambda c, b: self._close(c, b[0], b[1]), group.tasks, (group.carry,), [batches]
        )
        return {"grads": grads, "finite": ok}

    def get_config(self):
        return dict(
            super().get_config(),
            norm=self.norm,
            sign_correction=self.sign_correction,
            loss_in_path=self.loss_in_path,
        )
