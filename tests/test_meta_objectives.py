"""Meta-objectives composed in `MetaTrainer(objectives=[...])` train exactly as the
front-ends that choose them by keyword, and a custom objective written against the public
hooks (`warpkeras.meta.MetaObjective`) plugs into the same engine."""

import keras
import numpy as np
import pytest

import warpkeras
from warpkeras.meta import MAML, Leap, MetaObjective, MetaTrainingError, Reptile, WarpObjective
from warpkeras.trainers import MetaTrainer


def _model(seed=0, warp=True):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((3,)), keras.layers.Dense(6, activation="tanh")]
    if warp:
        layers.append(warpkeras.layers.WarpDense())
    return keras.Sequential(layers + [keras.layers.Dense(1)])


def _tasks():
    rng = np.random.default_rng(0)
    tasks = []
    for i in range(4):
        w = rng.normal(size=(3, 1))
        x = rng.normal(size=(24, 3)).astype("float32")
        tasks.append(
            warpkeras.Task(train=(x, (x @ w).astype("float32")), batch_size=8, name=f"t{i}")
        )
    return tasks


def _weights(trainer):
    return [np.array(v) for v in trainer.model.get_weights()]


def _train(trainer, steps=2):
    trainer.fit(_tasks(), epochs=steps, verbose=0)
    return _weights(trainer)


COMMON = dict(inner_steps=3, meta_batch_size=2, inner_learning_rate=0.05, seed=3)


@pytest.mark.parametrize(
    "preset,objectives",
    [
        (
            dict(cls="WarpTrainer", mode="offline", init_objective="leap"),
            lambda: [WarpObjective("offline"), Leap()],
        ),
        (
            dict(cls="WarpTrainer", mode="online", objective="approx", init_objective="reptile"),
            lambda: [WarpObjective("online", exact=False), Reptile()],
        ),
        (dict(cls="MAMLTrainer", first_order=True), lambda: [MAML(first_order=True)]),
    ],
)
def test_composition_equals_preset(preset, objectives):
    preset = dict(preset)
    cls = getattr(warpkeras, preset.pop("cls"))
    warp = cls is not warpkeras.MAMLTrainer
    by_keyword = cls(
        _model(warp=warp), "mse", meta_optimizer=keras.optimizers.SGD(0.1), **preset, **COMMON
    )
    composed = MetaTrainer(
        _model(warp=warp),
        "mse",
        objectives=objectives(),
        meta_optimizer=keras.optimizers.SGD(0.1),
        **COMMON,
    )
    start = _weights(composed)
    expected = _train(by_keyword)
    got = _train(composed)
    assert any(not np.allclose(a, b) for a, b in zip(start, got))  # it did train
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


class CustomReptile(MetaObjective):
    """Reptile from scratch: θ0 ← θ0 − β mean(θ0 − θ_K)."""

    optimizer_name = "init_optimizer"

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def variables(self, engine):
        return engine.partition.task_variables

    def build(self, engine):
        self.optimizer.build(self.variables(engine))

    def close(self, engine, group):
        return {"grads": tuple(a - b for a, b in zip(group.theta_start, group.carry["theta"]))}

    def apply(self, engine, grads, count):
        self.optimizer.apply(
            engine.theta_packer.unpack([g / count for g in grads]), self.variables(engine)
        )


def test_custom_objective_matches_built_in_reptile():
    expected = _train(
        warpkeras.ReptileTrainer(
            _model(warp=False), "mse", meta_optimizer=keras.optimizers.SGD(0.5), **COMMON
        )
    )
    got = _train(
        MetaTrainer(
            _model(warp=False),
            "mse",
            objectives=[CustomReptile(keras.optimizers.SGD(0.5))],
            **COMMON,
        )
    )
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_objectives_and_keyword_objectives_are_not_mixed():
    with pytest.raises(MetaTrainingError, match="leap_norm choose objectives"):
        MetaTrainer(_model(), "mse", objectives=[Leap()], leap_norm="energy")


def test_two_inner_rules_refused():
    class Rule(MetaObjective):
        def inner_update(self, engine, theta, grads, velocity):
            return theta, velocity

    with pytest.raises(MetaTrainingError, match="one inner step rule"):
        MetaTrainer(_model(), "mse", objectives=[Rule(), Rule()])


OBJECTIVE_ROWS = [
    (WarpObjective, "mode", "onlin", ValueError, r"WarpObjective: mode='onlin'.*'online'"),
    (WarpObjective, "exact", "yes", TypeError, r"exact='yes'.*True or False"),
    (WarpObjective, "interval", 0, ValueError, r"interval=0.*>= 1"),
    (WarpObjective, "max_updates", "all", TypeError, r"max_updates='all'"),
    (WarpObjective, "reduction", "average", ValueError, r"reduction='average'.*'mean', 'sum'"),
    (WarpObjective, "final_point", 1, TypeError, r"final_point=1.*True or False"),
    (WarpObjective, "buffer", 100, TypeError, r"buffer=100.*ReplayBuffer"),
    (WarpObjective, "learn_learning_rate", "no", TypeError, r"learn_learning_rate='no'"),
    (WarpObjective, "learn_momentum", "no", TypeError, r"learn_momentum='no'"),
    (WarpObjective, "hyper_optimizer", "sgdd", ValueError, r"hyper_optimizer='sgdd'"),
    (WarpObjective, "meta_loss", "mse", TypeError, r"meta_loss='mse'.*callable"),
    (WarpObjective, "optimizer", 3, TypeError, r"optimizer=3"),
    (Leap, "norm", "l2", ValueError, r"Leap: norm='l2'.*'length', 'energy'"),
    (Leap, "sign_correction", "yes", TypeError, r"sign_correction='yes'"),
    (Leap, "loss_in_path", 0, TypeError, r"loss_in_path=0"),
    (Leap, "weight", -1.0, ValueError, r"weight=-1\.0.*>= 0"),
    (Leap, "optimizer", "adamm", ValueError, r"optimizer='adamm'"),
    (MAML, "first_order", "yes", TypeError, r"MAML: first_order='yes'"),
    (MAML, "weight", "one", TypeError, r"weight='one'"),
    (MAML, "optimizer", 0.1, TypeError, r"optimizer=0\.1"),
    (MAML, "unroll", "yes", TypeError, r"MAML: unroll='yes'"),
    (MAML, "recompute", 1, TypeError, r"MAML: recompute=1"),
    (Reptile, "weight", float("nan"), ValueError, r"weight=nan.*finite"),
    (Reptile, "optimizer", keras.optimizers.SGD, TypeError, r"optimizer=.*instance"),
]


@pytest.mark.parametrize(
    "cls,arg,value,exc,regex",
    OBJECTIVE_ROWS,
    ids=[f"{r[0].__name__}-{r[1]}" for r in OBJECTIVE_ROWS],
)
def test_objective_argument_refused(cls, arg, value, exc, regex):
    with pytest.raises(exc, match=regex):
        cls(**{arg: value})


def test_every_objective_argument_has_a_row():
    import inspect

    for cls in (WarpObjective, Leap, MAML, Reptile):
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert params <= {r[1] for r in OBJECTIVE_ROWS if r[0] is cls}, cls
