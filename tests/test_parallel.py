"""Parallel meta-batches give the same meta-update as the sequential loop."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import REPO, assert_lists_close, small_warp_model, tanh_regression_task

import warpkeras


def _task(rng):
    return tanh_regression_task(rng, n=40)


def _model():
    return small_warp_model(hidden=6)


CONFIGS = {
    "warp_leap_online": dict(mode="online", objective="exact", init_objective="leap"),
    "warp_reptile_offline": dict(
        mode="offline", objective="approx", init_objective="reptile", meta_interval=3
    ),
    "warp_maml": dict(mode="online", objective="approx", init_objective="maml"),
}


def _meta_trained_weights(config, parallel):
    """The weights after 2 meta steps of `CONFIGS[config]` with the given executor."""
    model = _model()  # seeded: the same initial weights on every call
    trainer = warpkeras.WarpTrainer(
        model,
        "mse",
        inner_steps=3,
        inner_learning_rate=0.2,
        meta_batch_size=3,
        inner_momentum=0.5,
        meta_optimizer=keras.optimizers.SGD(0.1),
        parallel=parallel,
        seed=4,
        **CONFIGS[config],
    )
    trainer.fit(_task, meta_steps=2, verbose=0)
    return model.get_weights()


@pytest.fixture(scope="module")
def sequential_weights():
    """`_meta_trained_weights(config, "sequential")`, computed once per config and module:
    every parallel executor is compared with the same sequential run."""
    cache = {}

    def get(config):
        if config not in cache:
            cache[config] = _meta_trained_weights(config, "sequential")
        return cache[config]

    return get


@pytest.mark.parametrize("parallel", ["unrolled", "vectorized"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_parallel_meta_step_equals_sequential(parallel, config, sequential_weights):
    # float32, different kernel order (batched vs single matmuls): 1e-5 relative
    assert_lists_close(
        _meta_trained_weights(config, parallel), sequential_weights(config), rtol=1e-5, atol=1e-6
    )


def test_leap_and_maml_trainers_accept_parallel():
    for cls, kw in ((warpkeras.LeapTrainer, {}), (warpkeras.MAMLTrainer, {"first_order": True})):
        weights = []
        for mode in ("sequential", "vectorized"):
            keras.utils.set_random_seed(3)
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            cls(model, "mse", inner_steps=2, meta_batch_size=4, parallel=mode, **kw).fit(
                _task, meta_steps=2, verbose=0
            )
            weights.append(model.get_weights())
        assert_lists_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


def test_bad_parallel_settings_are_rejected():
    with pytest.raises(ValueError, match="parallel"):
        warpkeras.WarpTrainer(_model(), "mse", parallel="threads")
    with pytest.raises(warpkeras.MetaTrainingError, match="continual"):
        warpkeras.WarpTrainer(
            _model(), "mse", mode="continual", init_objective=None, parallel="vectorized"
        )


MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, warpkeras
    sys.path.insert(0, {tests!r})
    from test_parallel import _model, _task
    out = {{}}
    for name in ("single", "mirrored", "model_in_scope"):
        strategy = (None if name == "single"
                    else tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
        if name == "model_in_scope":  # the README's pattern: mirrored model, trainer outside
            with strategy.scope():
                model = _model()
        else:
            model = _model()
        trainer = warpkeras.WarpTrainer(
            model, "mse", mode="online", objective="exact", init_objective="leap",
            inner_steps=3, inner_learning_rate=0.2, meta_batch_size=4,
            meta_optimizer=keras.optimizers.SGD(0.1), strategy=strategy, seed=4,
            learn_inner_learning_rate=True)
        trainer.fit(_task, meta_steps=2, verbose=0)
        out[name] = [w.tolist() for w in model.get_weights()] + [[float(trainer.inner_lr.numpy())]]
        if strategy is not None:
            out["replicas"] = strategy.num_replicas_in_sync
    print("RESULT" + json.dumps(out))
    """
)


def test_mirrored_strategy_on_two_logical_cpus_equals_one_device():
    script = MIRRORED.format(tests=os.path.join(REPO, "tests"))
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [row for row in proc.stdout.splitlines() if row.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT") :])
    assert out["replicas"] == 2
    # the all-reduce sums in another order: 1e-5 relative in float32
    for name in ("mirrored", "model_in_scope"):
        assert_lists_close(
            [np.array(w) for w in out[name]],
            [np.array(w) for w in out["single"]],
            rtol=1e-5,
            atol=1e-6,
        )
