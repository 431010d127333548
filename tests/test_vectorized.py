"""`parallel="vectorized"` adapts a whole group of tasks in one batched call per inner step,
with the same meta-updates as the sequential loop."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, assert_lists_close

import warpkeras
from warpkeras.trainers import parallel as P
from warpkeras.trainers import pfor

CLASSES = 3


def _conv_model(warp=True):
    """A small version of the papers' Omniglot network: conv, pool, batch norm, ReLU, a
    warp convolution, and a dense head."""
    keras.utils.set_random_seed(3)
    layers = [
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.MaxPooling2D(2),
        warpkeras.layers.ExactBatchNormalization(),
        keras.layers.ReLU(),
    ]
    if warp:
        layers.append(warpkeras.layers.WarpConv2D(kernel_size=3))
    layers += [keras.layers.Flatten(), keras.layers.Dense(CLASSES)]
    return keras.Sequential(layers)


def _task(rng):
    x = rng.random((12, 6, 6, 1), dtype=np.float32)
    y = np.arange(12, dtype=np.int32) % CLASSES
    return warpkeras.Task(train=(x, y), batch_size=6)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
COMMON = dict(inner_steps=3, inner_learning_rate=0.3, meta_batch_size=4, seed=5)
CONFIGS = {
    "leap": (warpkeras.LeapTrainer, False, {}),
    "warp_leap_online": (
        warpkeras.WarpTrainer,
        True,
        dict(mode="online", objective="approx", init_objective="leap"),
    ),
    "warp_leap_offline": (
        warpkeras.WarpTrainer,
        True,
        dict(mode="offline", objective="approx", init_objective="leap", meta_interval=2),
    ),
    "maml": (warpkeras.MAMLTrainer, False, {}),
}


def _trainer(config, parallel, **kw):
    cls, warp, extra = CONFIGS[config]
    common = dict(COMMON, **kw)
    opt = "init_optimizer" if cls is warpkeras.MAMLTrainer else "meta_optimizer"
    common[opt] = keras.optimizers.SGD(0.1)
    model = _conv_model(warp)
    return model, cls(model, LOSS, parallel=parallel, **common, **extra)


class _Counted:
    """Wraps a trainer's group function, recording the task axis of every call."""

    def __init__(self, fn):
        self.fn, self.sizes = fn, []

    def __call__(self, *args):
        self.sizes.append(int(tf.nest.flatten(args)[0].shape[0]))
        return self.fn(*args)


@pytest.mark.parametrize("group_size, sizes", [(None, [4]), (3, [3, 1])])
def test_group_is_the_meta_batch_one_call_per_inner_step(group_size, sizes):
    _, trainer = _trainer("warp_leap_online", "vectorized", group_size=group_size)
    assert trainer.executor.group_size(4) == sizes[0]
    trainer.fit(_task, meta_steps=1, verbose=0)  # builds and traces the functions
    counted = _Counted(trainer._group_step)
    trainer._group_step = counted
    trainer.fit(_task, meta_steps=3, verbose=0)  # meta steps 2 and 3
    K = COMMON["inner_steps"]
    # one call per inner step and group, each with the group's tasks on the task axis
    assert counted.sizes == [s for s in sizes for _ in range(K)] * 2
    # traced once per group size, never again
    assert trainer.trace_counts["group_step"] == len(sizes)
    assert trainer.executor.fallback_ops == {}


def test_sequential_groups_are_single_tasks():
    _, trainer = _trainer("leap", "sequential")
    assert trainer.executor.group_size(4) == 1
    with pytest.raises(ValueError, match="group_size"):
        _trainer("leap", "sequential", group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        _trainer("leap", "vectorized", group_size=0)


def _meta_trained_weights(config, parallel, grouped=None):
    """The weights after 2 meta steps of `CONFIGS[config]` with the given executor."""
    model, trainer = _trainer(config, parallel)  # seeded: the same initial weights
    if parallel == "vectorized":
        trainer.executor.grouped_convolutions = grouped
    with warnings.catch_warnings():
        warnings.simplefilter("error", P.VectorizationWarning)  # nothing falls back
        trainer.fit(_task, meta_steps=2, verbose=0)
    return model.get_weights()


@pytest.fixture(scope="module")
def sequential_weights():
    """`_meta_trained_weights(config, "sequential")`, computed once per config and module:
    both ways of batching the convolutions are compared with the same sequential run."""
    cache = {}

    def get(config):
        if config not in cache:
            cache[config] = _meta_trained_weights(config, "sequential")
        return cache[config]

    return get


@pytest.mark.parametrize(
    "config, grouped", [(c, None) for c in sorted(CONFIGS)] + [("warp_leap_online", True)]
)
def test_vectorized_meta_steps_equal_sequential(config, grouped, sequential_weights):
    weights = {
        "sequential": sequential_weights(config),
        "vectorized": _meta_trained_weights(config, "vectorized", grouped),
    }
    # the weights moved, and the same way (float32, batched vs single kernels)
    assert not np.allclose(
        weights["sequential"][0], _conv_model(CONFIGS[config][1]).get_weights()[0]
    )
    assert_lists_close(weights["vectorized"], weights["sequential"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grouped, jit_compile", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize(
    "fmt, strides, padding, dilation",
    [("NHWC", 1, "SAME", 1), ("NHWC", 2, "VALID", 1), ("NHWC", 1, "VALID", 2)],
)
def test_per_task_kernels_are_batched_without_a_loop(
    fmt, strides, padding, dilation, grouped, jit_compile
):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(3, 2, 7, 7, 2)), tf.float32)
    w = tf.constant(rng.normal(size=(3, 3, 3, 2, 5)), tf.float32)

    def one(x, w):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = tf.nn.conv2d(x, w, strides, padding, data_format=fmt, dilations=dilation)
            loss = tf.reduce_sum(tf.sin(y))
        return (y,) + tuple(tape.gradient(loss, [x, w]))

    run = P.VectorizedExecutor(jit_compile=jit_compile, grouped_convolutions=grouped).compile(one)
    got = run(x, w)
    want = [tf.stack(t) for t in zip(*[one(x[i], w[i]) for i in range(3)])]
    for g, e in zip(got, want):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
    # no while loop left: one grouped convolution, or one per task
    # (the graph also keeps the one-task ops that pfor converted, hence `single`)
    ops = _ops(
        tf.function(lambda x, w: tf.vectorized_map(lambda a: one(*a), (x, w))), grouped, x, w
    )
    single = _ops(tf.function(one), grouped, x[0], w[0])
    assert not [op for op in ops if "While" in op]
    for op in ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"):
        assert ops.count(op) - single.count(op) == (1 if grouped else 3), op


def _ops(fn, grouped, *args):
    """The op types in the graph of the `tf.function` `fn`."""
    with P._batched_converters(grouped):
        graph = fn.get_concrete_function(*args).graph.as_graph_def()
    return [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def]


def test_ops_that_fall_back_to_a_loop_are_named(monkeypatch):
    level = tf.get_logger().level
    ex = P.VectorizedExecutor()
    run = ex.compile(
        lambda x: (
            tf.cast(tf.histogram_fixed_width(x, [-1.0, 1.0], 4), tf.float32) + tf.reduce_sum(x)
        )
    )
    with pytest.warns(P.VectorizationWarning, match="HistogramFixedWidth"):
        out = run(tf.constant(np.linspace(-1, 1, 12).reshape(3, 4), tf.float32))
    assert out.shape == (3, 4)
    assert list(ex.fallback_ops.values()) == [["HistogramFixedWidth"]]
    assert tf.get_logger().level == level  # opened to DEBUG only while tracing
    # without the grouped convolutions, per-task kernels would fall back (pfor logs that
    # at DEBUG level): the warning names Conv2D and its gradients
    monkeypatch.setattr(pfor, "_CONVERTERS", {})
    ex = P.VectorizedExecutor()

    def conv(x, w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, "SAME") ** 2)
        return tape.gradient(loss, w)

    with pytest.warns(P.VectorizationWarning, match="Conv2D"):
        ex.compile(conv)(tf.ones([2, 1, 4, 4, 1]), tf.ones([2, 3, 3, 1, 2]))
    (ops,) = ex.fallback_ops.values()
    assert "Conv2D" in ops and "Conv2DBackpropFilter" in ops


def test_gpu_bench_quick_runs_and_prints_the_fields():
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "gpu.py"), "--quick", "--out", "-"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for key in ("benchmark", "device", "runs", "ratios", "machine"):
        assert key in out, key
    assert out["device"]["gpu"] is False
    modes = {(r["parallel"], r["meta_batch"], r["jit_compile"]) for r in out["runs"]}
    assert ("sequential", 2, False) in modes and ("vectorized", 2, False) in modes
    for r in out["runs"]:
        for key in (
            "per_task_step_ms",
            "group_step_ms",
            "tasks_per_s",
            "steps_per_s",
            "group_size",
            "fallback_ops",
        ):
            assert key in r, key
        assert r["per_task_step_ms"] > 0
        assert r["group_size"] == (1 if r["parallel"] == "sequential" else r["meta_batch"])
