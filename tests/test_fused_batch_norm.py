"""`ExactBatchNormalization` on TensorFlow's fused kernel (``fused=None``, the default)
against its decomposed formula (``fused=False``, exact to any order; checked against
central differences in `test_layers.py`).

The fused path must give the same outputs, moving statistics, first derivatives and second
derivatives (Hessian-vector products in x, and the cross terms in gamma and beta), the
same exact warp and second-order MAML meta-gradients on a convolutional model, and the
same whole meta-training runs; it must be taken exactly where the kernel applies.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import warpkeras
from warpkeras import objectives as obj
from warpkeras.layers import ExactBatchNormalization

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SHAPE = (6, 5, 5, 4)


def _pair(shape=SHAPE, dtype=None, **kwargs):
    """Two layers with the same weights: fused (default) and decomposed."""
    rng = np.random.default_rng(1)
    layers = [
        ExactBatchNormalization(momentum=0.5, dtype=dtype, fused=f, **kwargs) for f in (None, False)
    ]
    for bn in layers:
        bn.build(shape)
    for a, b in zip(*(bn.trainable_weights for bn in layers)):
        value = rng.uniform(0.5, 1.5, size=a.shape)
        a.assign(value.astype(a.dtype))
        b.assign(value.astype(b.dtype))
    return layers


def _inputs(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(1.0, 2.0, size=shape).astype("float32")) for _ in range(3)]


def _first_order(bn, x, w):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = bn(x, training=True)
        loss = tf.reduce_sum(tf.cast(w, y.dtype) * y)
    return y, tape.gradient(loss, [x] + bn.trainable_weights)


def _second_order(bn, x, w, u):
    """∇ of ⟨∇ₓ Σ w·y², u⟩ in x, gamma and beta."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = bn(x, training=True)
            loss = tf.reduce_sum(w * y * y)
        g = tf.reduce_sum(inner.gradient(loss, x) * u)
    return outer.gradient(g, [x] + bn.trainable_weights)


@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False)])
def test_fused_equals_decomposed_to_second_order(center, scale):
    fused, plain = _pair(center=center, scale=scale)
    x, w, u = _inputs()
    (y_f, g_f), (y_p, g_p) = _first_order(fused, x, w), _first_order(plain, x, w)
    np.testing.assert_allclose(y_f, y_p, atol=2e-5)
    for a, b in zip(g_f, g_p):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)
    # the biased batch variance in the moving average, not the kernel's Bessel-corrected
    # one (n = 150: 0.7 % apart)
    np.testing.assert_allclose(fused.moving_mean, plain.moving_mean, atol=1e-5)
    np.testing.assert_allclose(fused.moving_variance, plain.moving_variance, rtol=1e-5)
    for a, b in zip(_second_order(fused, x, w, u), _second_order(plain, x, w, u)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.abs(b).max()))


def _graph_ops(bn, shape, dtype):
    @tf.function
    def call(x):
        return bn(x, training=True)

    graph = call.get_concrete_function(tf.TensorSpec(shape, dtype)).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize(
    "shape, axis, dtype, fused, applies",
    [
        ((6, 5, 5, 4), -1, "float32", None, True),
        ((6, 5, 5, 4), 3, "float32", None, True),
        ((6, 5, 5, 4), -1, "float32", False, False),
        ((6, 5, 5, 4), -1, "float64", None, False),  # no fused kernel for float64
        ((6, 5, 4), -1, "float32", None, False),  # rank 3
        ((6, 4, 5, 5), 1, "float32", None, False),  # channels first
    ],
)
def test_fused_kernel_exactly_where_it_applies(shape, axis, dtype, fused, applies):
    bn = ExactBatchNormalization(axis=axis, dtype=dtype, fused=fused)
    bn.build(shape)
    ops = _graph_ops(bn, shape, dtype)
    assert any(t.startswith("FusedBatchNorm") for t in ops) is applies, ops


def test_fused_argument_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="fused"):
        ExactBatchNormalization(fused=True)
    model = keras.Sequential([keras.Input((4, 4, 2)), ExactBatchNormalization(fused=False)])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.layers[0].fused is False
    assert ExactBatchNormalization().get_config()["fused"] is None


def test_mixed_bfloat16_fused_close_to_decomposed():
    fused, plain = _pair(dtype="mixed_bfloat16")
    x, w, _ = _inputs()
    y_f, _ = _first_order(fused, x, w)
    y_p, _ = _first_order(plain, x, w)
    assert y_f.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(y_f, "float32"), tf.cast(y_p, "float32"), atol=0.05)
    np.testing.assert_allclose(fused.moving_variance, plain.moving_variance, rtol=1e-4)


# --- meta-gradients and meta-training ------------------------------------------------------
def _model(fused, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv1"),
            ExactBatchNormalization(momentum=0.0, fused=fused, name="bn1"),
            keras.layers.ReLU(),
            warpkeras.layers.WarpConv2D(kernel_size=3, name="warp"),
            keras.layers.Conv2D(4, 3, padding="same", name="conv2"),
            ExactBatchNormalization(momentum=0.0, fused=fused, name="bn2"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _batch(rng, n=6):
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), np.arange(n) % 3


def test_exact_meta_gradients_equal_on_both_paths():
    """Exact warp (Eq. 3) and second-order MAML meta-gradients, which differentiate through
    an inner gradient, are the same on the fused kernel as on the decomposed formula."""
    rng = np.random.default_rng(3)
    task, meta = _batch(rng), _batch(rng)
    results = []
    for fused in (None, False):
        p = warpkeras.partition(_model(fused, seed=4))
        theta, phi, state = p.initial_task_values(), p.warp_values(), p.state_values()
        _, g_warp, _ = obj.warp_meta_gradient(
            p, LOSS, theta, phi, task, meta, 0.3, state=state, exact=True
        )
        _, g_maml, _ = obj.maml_meta_gradient(p, LOSS, theta, phi, task, meta, 0.3, 2, state=state)
        results.append((list(g_warp), list(g_maml)))
    # the conv biases in front of batch norm have zero gradient up to rounding, so the
    # tolerance is relative to the largest gradient of each meta-gradient
    for fused, plain in zip(*results):
        scale = max(float(np.abs(b).max()) for b in plain)
        for a, b in zip(fused, plain):
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * scale)


def _tasks(seed, n=3):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x, y = _batch(rng, 12)
        out.append(
            warpkeras.Task(
                (x, y), meta=(x[::-1].copy(), y[::-1].copy()), batch_size=6, name=f"t{i}"
            )
        )
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda m, kw: warpkeras.LeapTrainer(m, LOSS, **kw),
        lambda m, kw: warpkeras.WarpTrainer(
            m, LOSS, mode="offline", objective="exact", init_objective="leap", **kw
        ),
        lambda m, kw: warpkeras.MAMLTrainer(m, LOSS, **kw),
    ],
    ids=["leap", "warp_offline_exact", "maml"],
)
def test_meta_training_equal_on_both_paths(make):
    """Two meta steps give the same θ0, φ and moving statistics on both paths."""
    weights = []
    for fused in (None, False):
        model = _model(fused, seed=7)
        trainer = make(
            model,
            dict(
                inner_steps=3,
                meta_batch_size=2,
                inner_learning_rate=0.1,
                meta_optimizer=keras.optimizers.SGD(0.1),
                seed=0,
            ),
        )
        trainer.fit(_tasks(seed=3), meta_steps=2, verbose=0)
        weights.append([np.array(v) for v in model.weights])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
