"""``parallel="auto"``, the trainers' default: what it resolves to and that it trains as the
sequential loop does."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_lists_close, small_warp_model, tanh_regression_task

import warpkeras
from warpkeras.trainers import MetaTrainer
from warpkeras.trainers.parallel import (
    AUTO_GROUP_SIZE,
    SequentialExecutor,
    UnrolledExecutor,
    balanced_group_sizes,
)


def _task(rng):
    return tanh_regression_task(rng, n=24)


def _model():
    return small_warp_model(hidden=4)


def _kw():
    return dict(
        inner_steps=2, inner_learning_rate=0.2, meta_optimizer=keras.optimizers.SGD(0.1), seed=4
    )


@pytest.mark.parametrize("name", ["leap", "warp_leap_offline"])
def test_auto_trains_as_sequential(name):
    weights = {}
    for parallel in (None, "sequential"):  # None: the default
        extra = {} if parallel is None else {"parallel": parallel}
        model = _model()
        if name == "leap":
            trainer = warpkeras.LeapTrainer(model, "mse", meta_batch_size=3, **_kw(), **extra)
        else:
            trainer = warpkeras.WarpTrainer(
                model,
                "mse",
                mode="offline",
                objective="approx",
                init_objective="leap",
                meta_interval=2,
                meta_batch_size=3,
                **_kw(),
                **extra,
            )
        assert trainer.parallel == ("unrolled" if parallel is None else "sequential")
        trainer.fit(_task, meta_steps=2, verbose=0)
        weights[parallel] = model.get_weights()
    assert_lists_close(weights[None], weights["sequential"], rtol=1e-5, atol=1e-6)
    # and training moved the weights (the comparison is not between two untouched models)
    start = _model().get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(weights[None], start)) > 1e-4


@pytest.mark.parametrize(
    "meta_batch,groups",
    [
        (1, [1]),
        (5, [5]),
        (8, [8]),
        (9, [5, 4]),
        (11, [6, 5]),
        (16, [8, 8]),
        (20, [5, 5, 5, 5]),
        (23, [8, 8, 7]),
        (64, [8] * 8),
    ],
)
def test_balanced_group_sizes(meta_batch, groups):
    sizes = balanced_group_sizes(meta_batch)
    assert sizes == groups
    assert sum(sizes) == meta_batch and max(sizes) <= AUTO_GROUP_SIZE
    # sizes differ by at most one: at most two traces
    assert max(sizes) - min(sizes) <= 1


def test_auto_resolves_by_objective_and_meta_batch():
    model = _model()
    t = warpkeras.WarpTrainer(model, "mse", mode="online", meta_batch_size=20)
    assert t.parallel == "unrolled" and isinstance(t.executor, UnrolledExecutor)
    assert t.executor.group_sizes(20) == [5, 5, 5, 5]
    assert t.get_config()["parallel"] == "unrolled" and t.get_config()["group_size"] == 5
    # a continued stream of task parameters runs sequentially
    t = warpkeras.WarpTrainer(
        _model(), "mse", mode="continual", init_objective=None, meta_batch_size=4
    )
    assert t.parallel == "sequential" and t.executor_name == "sequential"
    t = MetaTrainer(_model(), "mse", objectives=[warpkeras.meta.WarpObjective("continual")])
    assert t.parallel == "sequential"
    # baselines that train tasks one after another
    t = warpkeras.FineTuneTrainer(_model(), "mse", multi_headed=False)
    assert t.parallel == "sequential"
    # an explicit group_size wins; explicit modes are kept
    t = warpkeras.LeapTrainer(_model(), "mse", meta_batch_size=20, group_size=6)
    assert t.parallel == "unrolled" and t.executor.group_sizes(20) == [6, 6, 6, 2]
    t = warpkeras.LeapTrainer(_model(), "mse", meta_batch_size=20, parallel="unrolled")
    assert t.executor.group_sizes(20) == [20]
    t = warpkeras.LeapTrainer(_model(), "mse", meta_batch_size=5, parallel="sequential")
    assert isinstance(t.executor, SequentialExecutor) and t.parallel == "sequential"
    # a strategy: the distributed executor, replicas running their tasks unrolled
    t = warpkeras.LeapTrainer(
        _model(), "mse", meta_batch_size=2, strategy=tf.distribute.OneDeviceStrategy("/cpu:0")
    )
    assert t.executor_name == "distributed" and t.parallel == "unrolled"
    # a meta-batch of one: a group of one task, as sequential
    t = warpkeras.LeapTrainer(_model(), "mse", meta_batch_size=1)
    assert t.executor.group_sizes(1) == [1]


def test_auto_with_continual_refuses_group_size():
    with pytest.raises(warpkeras.MetaTrainingError, match="group_size=4.*leave group_size unset"):
        warpkeras.WarpTrainer(_model(), "mse", mode="continual", init_objective=None, group_size=4)


def test_auto_traces_each_group_size_once():
    trainer = warpkeras.LeapTrainer(_model(), "mse", inner_steps=2, meta_batch_size=9, seed=1)
    trainer.fit(_task, meta_steps=2, verbose=0)
    # groups of 5 and 4: one trace each, none at the second meta step
    assert trainer.trace_counts["group_step"] == 2
