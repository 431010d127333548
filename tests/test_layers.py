"""Tests of the ready-made layers in `warpkeras.layers`."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import warpkeras  # noqa: E402
from warpkeras import layers as wl  # noqa: E402

IMAGE_SHAPE = (6, 6, 4)
VECTOR_SHAPE = (5,)
SEQUENCE_SHAPE = (4, 3)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)


def _atol(dtype):
    return 1e-6 if dtype == "float32" else 1e-12


# --- model builders -------------------------------------------------------------------
# Each case: (id, warp factory, kind, signed). `kind` picks the task model the warp is
# inserted into; `signed` makes the features entering the warp take both signs (no ReLU
# before it), for warps that are the identity on any input.
CASES = [
    ("dense", lambda **k: wl.WarpDense(**k), "vector", True),
    ("dense_nobias", lambda **k: wl.WarpDense(use_bias=False, **k), "vector", True),
    ("conv1x1", lambda **k: wl.WarpConv2D(kernel_size=1, **k), "image", True),
    ("conv3x3", lambda **k: wl.WarpConv2D(kernel_size=3, **k), "image", True),
    (
        "conv5x5_nobias",
        lambda **k: wl.WarpConv2D(kernel_size=5, use_bias=False, **k),
        "image",
        True,
    ),
    ("scaling_image", lambda **k: wl.ChannelScaling(**k), "image", True),
    ("scaling_vector", lambda **k: wl.ChannelScaling(**k), "vector", True),
    ("resblock1", lambda **k: wl.ResidualWarpBlock(**k), "image", False),
    (
        "resblock2",
        lambda **k: wl.ResidualWarpBlock(num_layers=2, hidden_filters=16, **k),
        "image",
        False,
    ),
    (
        "resblock2_linear_out",
        lambda **k: wl.ResidualWarpBlock(
            num_layers=2, hidden_filters=16, activate_output=False, **k
        ),
        "image",
        True,
    ),
    (
        "resblock2_nobn",
        lambda **k: wl.ResidualWarpBlock(num_layers=2, batch_norm=False, **k),
        "image",
        False,
    ),
    (
        "resblock2_plain_identity",
        lambda **k: wl.ResidualWarpBlock(
            num_layers=2, hidden_filters=8, residual=False, batch_norm=False, activation=None, **k
        ),
        "image",
        True,
    ),
    ("resdense", lambda **k: wl.ResidualWarpDense(hidden_units=100, **k), "vector", True),
    ("resdense1", lambda **k: wl.ResidualWarpDense(num_layers=1, **k), "vector", True),
    (
        "resdense_bn",
        lambda **k: wl.ResidualWarpDense(hidden_units=10, batch_norm=True, **k),
        "vector",
        True,
    ),
    (
        "resdense_plain_identity",
        lambda **k: wl.ResidualWarpDense(hidden_units=12, residual=False, activation=None, **k),
        "vector",
        True,
    ),
    ("film", lambda **k: wl.FiLM(**k), "image", True),
    ("film_block", lambda **k: wl.FiLMWarpBlock(hidden_filters=16, **k), "image", False),
]
CASE_IDS = [c[0] for c in CASES]


def _task_layers(kind, signed, dtype):
    act = None if signed else "relu"
    if kind == "image":
        first = keras.layers.Conv2D(8, 3, padding="same", activation=act, dtype=dtype)
        rest = [
            keras.layers.GlobalAveragePooling2D(dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
        return keras.Input(IMAGE_SHAPE, dtype=dtype), first, rest
    first = keras.layers.Dense(8, activation=act, dtype=dtype)
    rest = [keras.layers.Dense(3, dtype=dtype)]
    return keras.Input(VECTOR_SHAPE, dtype=dtype), first, rest


def _models(factory, kind, signed, dtype="float32"):
    """(model without the warp, model with the warp, warp layer); task layers are shared."""
    inputs, first, rest = _task_layers(kind, signed, dtype)
    warp = factory(dtype=dtype)
    h = first(inputs)
    plain, warped = h, warp(h)
    for layer in rest:
        plain, warped = layer(plain), layer(warped)
    return keras.Model(inputs, plain), keras.Model(inputs, warped), warp


def _batch(kind, dtype="float32", n=3, seed=0):
    shape = IMAGE_SHAPE if kind == "image" else VECTOR_SHAPE
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype(dtype)


def _perturb(model, scale=0.1, seed=0):
    """Moves every trainable variable off its initial value."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(v.numpy() + scale * rng.normal(size=v.shape).astype(v.dtype))


def _rnn_model(cell, dtype="float32", return_sequences=True, unroll=False):
    return keras.Sequential(
        [
            keras.Input(SEQUENCE_SHAPE, dtype=dtype),
            keras.layers.RNN(cell, return_sequences=return_sequences, unroll=unroll, dtype=dtype),
            keras.layers.Dense(2, dtype=dtype),
        ]
    )


def _sequences(dtype="float32", n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + SEQUENCE_SHAPE).astype(dtype)


# --- identity at initialisation -------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,factory,kind,signed", CASES, ids=CASE_IDS)
def test_untrained_warp_leaves_model_unchanged(name, factory, kind, signed, dtype):
    plain, warped, warp = _models(factory, kind, signed, dtype)
    x = _batch(kind, dtype)
    for training in (False, True):
        y0 = plain(x, training=training)
        y1 = warped(x, training=training)
        assert y1.dtype == dtype
        np.testing.assert_allclose(y1, y0, atol=_atol(dtype), rtol=0)
    assert all(v.dtype == dtype for v in warp.weights)
    # The test can fail: once the warp's variables move, the function changes.
    _perturb(warp)
    assert np.abs(warped(x) - plain(x)).max() > 1e-4


def test_warp_conv_channels_first_identity():
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype("float32")
    for layer in (
        wl.WarpConv2D(data_format="channels_first"),
        wl.ResidualWarpBlock(num_layers=2, activate_output=False, data_format="channels_first"),
        wl.FiLMWarpBlock(activate_output=False, data_format="channels_first"),
        wl.ChannelScaling(axis=1),
    ):
        np.testing.assert_allclose(layer(x), x, atol=1e-6)
        assert layer.compute_output_shape(x.shape) == x.shape


def test_warp_dense_and_conv_shapes_and_kernels():
    dense = wl.WarpDense()
    assert dense(np.ones((2, 3, 6), "float32")).shape == (2, 3, 6)
    np.testing.assert_array_equal(dense.kernel.numpy(), np.eye(6))
    wide = wl.WarpDense(units=9)
    assert wide.compute_output_shape((None, 6)) == (None, 9)
    conv = wl.WarpConv2D(filters=7, kernel_size=3, activation="relu")
    assert conv(np.ones((1, 5, 5, 4), "float32")).shape == (1, 5, 5, 7)
    assert conv.compute_output_shape((None, 5, 5, 4)) == (None, 5, 5, 7)
    k = conv.kernel.numpy()
    np.testing.assert_array_equal(k[1, 1], np.eye(4, 7))
    k[1, 1] = 0
    assert not k.any()


# --- batch normalisation --------------------------------------------------------------
@pytest.mark.parametrize("axis,shape", [(-1, (6, 4, 4, 3)), (1, (6, 3, 4, 4)), (-1, (6, 5))])
def test_exact_batch_norm_matches_keras_batch_norm(axis, shape):
    x = np.random.default_rng(0).normal(1.0, 2.0, size=shape).astype("float32")
    ours = wl.ExactBatchNormalization(axis=axis, momentum=0.8, epsilon=1e-3)
    ref = keras.layers.BatchNormalization(axis=axis, momentum=0.8, epsilon=1e-3)
    ours.build(shape)
    ref.build(shape)
    rng = np.random.default_rng(1)
    for a, b in zip(ours.weights, ref.weights):
        assert a.path.split("/")[-1] == b.path.split("/")[-1]
        value = rng.uniform(0.5, 1.5, size=a.shape).astype("float32")
        a.assign(value)
        b.assign(value)
    for training in (True, True, False):
        np.testing.assert_allclose(ours(x, training=training), ref(x, training=training), atol=1e-5)
    for a, b in zip(ours.weights, ref.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert [v.trainable for v in ours.weights] == [True, True, False, False]


def _second_derivative_through_bn(bn):
    """Directional derivative of u·∇ₓL for L = Σ w·bn(x)², by autodiff and by central
    differences (float64, training mode)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(5, 3)))
    w = tf.constant(rng.normal(size=(5, 3)))
    u = tf.constant(rng.normal(size=(5, 3)))
    bn.build(x.shape)

    def directional_gradient(x):
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = bn(x, training=True)
            loss = tf.reduce_sum(w * y * y)
        return tf.reduce_sum(inner.gradient(loss, x) * u)

    with tf.GradientTape() as outer:
        outer.watch(x)
        g = directional_gradient(x)
    analytic = outer.gradient(g, x).numpy()
    eps = 1e-6
    direction = rng.normal(size=x.shape)
    plus = directional_gradient(x + eps * direction)
    minus = directional_gradient(x - eps * direction)
    numeric = (plus - minus) / (2 * eps)
    return float(np.sum(analytic * direction)), float(numeric)


def test_exact_batch_norm_second_derivatives():
    analytic, numeric = _second_derivative_through_bn(wl.ExactBatchNormalization(dtype="float64"))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
    # The reason for the layer: Keras's batch norm on TensorFlow stops the gradient through
    # the batch mean inside the variance, which is exact to first order only.
    analytic, numeric = _second_derivative_through_bn(
        keras.layers.BatchNormalization(dtype="float64")
    )
    assert abs(analytic - numeric) > 1e-4 * abs(numeric)


# --- recurrent warps ------------------------------------------------------------------
def _copy_task_params(src, dst):
    dst.task_params.set_weights(src.task_params.get_weights())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell_cls", [wl.WarpRNNCell, wl.LinearWarpRNNCell])
def test_untrained_recurrent_warp_equals_task_rnn(cell_cls, dtype):
    kwargs = {"meta_units": 5} if cell_cls is wl.WarpRNNCell else {}
    warp_cell = cell_cls(6, dtype=dtype, **kwargs)
    task_cell = wl.TaskRNNCell(6, dtype=dtype)
    warp_rnn = keras.layers.RNN(warp_cell, return_sequences=True, dtype=dtype)
    task_rnn = keras.layers.RNN(task_cell, return_sequences=True, dtype=dtype)
    x = _sequences(dtype)
    task_rnn(x)
    warp_rnn(x)
    _copy_task_params(task_cell, warp_cell)
    y_task, y_warp = task_rnn(x), warp_rnn(x)
    assert y_warp.shape == (3, SEQUENCE_SHAPE[0], 6) and y_warp.dtype == dtype
    np.testing.assert_allclose(y_warp, y_task, atol=_atol(dtype), rtol=0)
    # A trained (non-zero / non-identity) warp changes the RNN.
    warp_vars = [v for v in warp_cell.trainable_variables if "task_params" not in v.path]
    rng = np.random.default_rng(1)
    for v in warp_vars:
        v.assign(v.numpy() + 0.5 * rng.normal(size=v.shape))
    assert np.abs(warp_rnn(x) - y_task).max() > 1e-3


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def test_warp_rnn_cell_matches_equation_15():
    cell = wl.WarpRNNCell(4, meta_units=3, projection_initializer="glorot_uniform", dtype="float64")
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True, dtype="float64")
    x = _sequences("float64", n=2)
    outputs, h, z, c = rnn(x)
    assert outputs.shape == (2, SEQUENCE_SHAPE[0], 4)
    assert h.shape == (2, 4) and z.shape == (2, 3) and c.shape == (2, 3)

    W, V, b = (w.numpy() for w in (cell.kernel, cell.recurrent_kernel, cell.bias))
    K = cell.meta_lstm.kernel.numpy()
    R = cell.meta_lstm.recurrent_kernel.numpy()
    bl = cell.meta_lstm.bias.numpy()
    P = cell.projection.numpy()
    assert np.abs(P).max() > 0
    d, n, m = SEQUENCE_SHAPE[1], 4, 3
    hh, zz, cc = np.zeros((2, n)), np.zeros((2, m)), np.zeros((2, m))
    expected = []
    for t in range(SEQUENCE_SHAPE[0]):
        xt = x[:, t]
        gates = np.concatenate([xt, hh], -1) @ K + zz @ R + bl
        i, f, g, o = np.split(gates, 4, axis=-1)
        cc = _sigmoid(f) * cc + _sigmoid(i) * np.tanh(g)
        zz = _sigmoid(o) * np.tanh(cc)
        u = 1 + np.tanh(zz @ P)
        ux1, ux2, uh1, uh2, ub = np.split(u, [d, d + n, d + 2 * n, d + 3 * n], axis=-1)
        # Eq. 15 with explicit diagonal matrices (column form, one sample at a time).
        hh = np.stack(
            [
                np.tanh(
                    np.diag(uh2[s]) @ V.T @ np.diag(uh1[s]) @ hh[s]
                    + np.diag(ux2[s]) @ W.T @ np.diag(ux1[s]) @ xt[s]
                    + np.diag(ub[s]) @ b
                )
                for s in range(2)
            ]
        )
        expected.append(hh)
    np.testing.assert_allclose(outputs, np.stack(expected, 1), atol=1e-12)
    np.testing.assert_allclose(h, hh, atol=1e-12)
    np.testing.assert_allclose(z, zz, atol=1e-12)
    np.testing.assert_allclose(c, cc, atol=1e-12)


def test_linear_warp_rnn_cell_matches_definition():
    cell = wl.LinearWarpRNNCell(4, transform_initializer="glorot_uniform", dtype="float64")
    rnn = keras.layers.RNN(cell, dtype="float64")
    x = _sequences("float64", n=2)
    y = rnn(x)
    W, V, b = (w.numpy() for w in (cell.kernel, cell.recurrent_kernel, cell.bias))
    Th, Tx = cell.transform_h.numpy(), cell.transform_x.numpy()
    h = np.zeros((2, 4))
    for t in range(SEQUENCE_SHAPE[0]):
        h = np.tanh(h @ V @ Th + x[:, t] @ W @ Tx + b)
    np.testing.assert_allclose(y, h, atol=1e-12)


def test_warp_rnn_gradients_exist_and_are_finite():
    cell = wl.WarpRNNCell(6, meta_units=5)
    model = _rnn_model(cell, return_sequences=False)
    p = warpkeras.partition(model, require_warp=True)
    x, target = _sequences(), np.ones((3, 2), "float32")

    def grads(theta, phi):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(theta)
            tape.watch(phi)
            y, _ = p.call(theta, phi, x)
            loss = tf.reduce_mean((y - target) ** 2)
        return tape.gradient(loss, theta), tape.gradient(loss, phi)

    def check(expect_lstm_gradient):
        g_theta, g_phi = grads(p.initial_task_values(), p.warp_values())
        for v, g in zip(p.task_variables + p.warp_variables, list(g_theta) + list(g_phi)):
            assert g is not None, v.path
            assert np.all(np.isfinite(g.numpy())), v.path
            if "meta_lstm" not in v.path or expect_lstm_gradient:
                assert np.abs(g.numpy()).max() > 0, v.path

    # At initialisation P = 0: the gradient reaches P (and all task variables) ...
    check(expect_lstm_gradient=False)
    # ... and once P is non-zero it reaches the meta-LSTM too.
    rng = np.random.default_rng(0)
    cell.projection.assign(0.3 * rng.normal(size=cell.projection.shape))
    check(expect_lstm_gradient=True)


# --- roles and partition --------------------------------------------------------------
def test_roles_of_layer_classes():
    for layer in (
        wl.WarpDense(),
        wl.WarpConv2D(),
        wl.ChannelScaling(),
        wl.ResidualWarpBlock(),
        wl.ResidualWarpDense(),
        wl.FiLMWarpBlock(),
        wl.WarpRNNCell(3),
        wl.LinearWarpRNNCell(3),
    ):
        assert warpkeras.role_of(layer) == "warp", layer
    assert warpkeras.role_of(wl.ExactBatchNormalization()) is None
    assert warpkeras.role_of(wl.FiLM()) == "task"
    assert warpkeras.role_of(wl.TaskRNNCell(3)) is None
    with pytest.raises(warpkeras.RoleError):
        warpkeras.task(wl.WarpDense())


def _ids(variables):
    return {id(v) for v in variables}


def test_partition_of_image_model_with_warp_blocks():
    conv = keras.layers.Conv2D(8, 3, padding="same", activation="relu")
    warps = [
        wl.WarpConv2D(),
        wl.ChannelScaling(),
        wl.ResidualWarpBlock(num_layers=2, hidden_filters=16),
        wl.ResidualWarpBlock(),
    ]
    film_block = wl.FiLMWarpBlock(hidden_filters=12)
    head = keras.layers.Dense(3)
    vec_warps = [wl.WarpDense(), wl.ResidualWarpDense(hidden_units=7)]
    model = keras.Sequential(
        [
            keras.Input(IMAGE_SHAPE),
            conv,
            *warps,
            film_block,
            keras.layers.GlobalAveragePooling2D(),
            *vec_warps,
            head,
        ]
    )
    p = warpkeras.partition(model, require_warp=True)

    film_vars = film_block.film.trainable_variables
    assert len(film_vars) == 2
    expected_task = conv.trainable_variables + head.trainable_variables + film_vars
    expected_warp = [
        v
        for layer in warps + vec_warps + [film_block]
        for v in layer.trainable_variables
        if id(v) not in _ids(film_vars)
    ]
    assert _ids(p.task_variables) == _ids(expected_task)
    assert _ids(p.warp_variables) == _ids(expected_warp)
    assert not p.frozen_variables
    # Batch-norm scales/offsets are warp variables; moving statistics are state.
    bn_gammas = [v for v in p.warp_variables if "batch_norm" in v.path and "gamma" in v.path]
    assert len(bn_gammas) == 5
    moving = [v for v in p.state_variables if "moving_" in v.path]
    assert len(moving) == 10
    # FiLM task embeddings start every task at zero (their θ0 is their initial value).
    for v, value in zip(p.task_variables, p.initial_task_values()):
        if id(v) in _ids(film_vars):
            assert not np.any(value.numpy())
    # Training-mode calls update the moving statistics in the returned state only.
    x = _batch("image")
    before = p.state_values()
    _, state = p.call(p.initial_task_values(), p.warp_values(), x, training=True)
    changed = [
        v.path
        for v, a, b in zip(p.state_variables, before, state)
        if not np.allclose(a.numpy(), np.asarray(b))
    ]
    assert changed and all("moving_" in c for c in changed)
    for a, v in zip(before, p.state_variables):
        np.testing.assert_array_equal(a.numpy(), v.numpy())


@pytest.mark.parametrize("cell_cls", [wl.WarpRNNCell, wl.LinearWarpRNNCell, wl.TaskRNNCell])
def test_partition_of_recurrent_models(cell_cls):
    cell = cell_cls(6, meta_units=4) if cell_cls is wl.WarpRNNCell else cell_cls(6)
    model = _rnn_model(cell)
    p = warpkeras.partition(model)
    head = model.layers[-1]
    params = cell.task_params
    assert _ids(p.task_variables) == _ids(
        [params.kernel, params.recurrent_kernel, params.bias] + head.trainable_variables
    )
    if cell_cls is wl.WarpRNNCell:
        lstm = cell.meta_lstm
        expected = [lstm.kernel, lstm.recurrent_kernel, lstm.bias, cell.projection]
    elif cell_cls is wl.LinearWarpRNNCell:
        expected = [cell.transform_h, cell.transform_x]
    else:
        expected = []
    assert _ids(p.warp_variables) == _ids(expected)


# --- serialisation --------------------------------------------------------------------
@pytest.mark.parametrize("name,factory,kind,signed", CASES, ids=CASE_IDS)
def test_get_config_round_trip(name, factory, kind, signed):
    layer = factory()
    layer.build((None,) + (IMAGE_SHAPE if kind == "image" else VECTOR_SHAPE))
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer)
    assert (
        revived.get_config()
        == keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(clone)
        ).get_config()
    )


def test_exact_batch_norm_config_round_trip(tmp_path):
    bn = wl.ExactBatchNormalization(axis=1, momentum=0.9, epsilon=1e-4, center=False)
    config = bn.get_config()
    assert wl.ExactBatchNormalization.from_config(config).get_config() == config
    model = keras.Sequential([keras.Input((3, 4)), bn, keras.layers.Flatten()])
    x = np.random.default_rng(0).normal(size=(5, 3, 4)).astype("float32")
    model(x, training=True)
    model.save(str(tmp_path / "bn.keras"))
    loaded = keras.models.load_model(str(tmp_path / "bn.keras"))
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    assert len(loaded.trainable_variables) == 1  # gamma only (center=False)


@pytest.mark.parametrize(
    "make_cell",
    [
        lambda: wl.WarpRNNCell(6, meta_units=4, projection_initializer="ones"),
        lambda: wl.LinearWarpRNNCell(6, activation="relu"),
        lambda: wl.TaskRNNCell(6),
    ],
    ids=["warp_rnn", "linear_warp_rnn", "task_rnn"],
)
def test_rnn_cell_config_round_trip(make_cell):
    cell = make_cell()
    config = cell.get_config()
    assert type(cell).from_config(config).get_config() == config


SAVE_CASES = [
    c
    for c in CASES
    if c[0]
    in {
        "dense",
        "conv3x3",
        "scaling_image",
        "resblock2",
        "resdense_bn",
        "film",
        "film_block",
    }
]


@pytest.mark.parametrize("name,factory,kind,signed", SAVE_CASES, ids=[c[0] for c in SAVE_CASES])
def test_saved_model_gives_same_outputs(name, factory, kind, signed, tmp_path):
    _, model, _ = _models(factory, kind, signed)
    _perturb(model)
    x = _batch(kind)
    model(x, training=True)  # moves batch-norm statistics off their initial values
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    p0, p1 = warpkeras.partition(model), warpkeras.partition(loaded)
    assert [v.path.split("/", 1)[1] for v in p0.task_variables] == [
        v.path.split("/", 1)[1] for v in p1.task_variables
    ]
    assert len(p0.warp_variables) == len(p1.warp_variables)
    assert len(p1.warp_variables) > 0 or name == "film"


@pytest.mark.parametrize(
    "make_cell",
    [
        lambda: wl.WarpRNNCell(6, meta_units=4),
        lambda: wl.LinearWarpRNNCell(6),
        lambda: wl.TaskRNNCell(6),
    ],
    ids=["warp_rnn", "linear_warp_rnn", "task_rnn"],
)
def test_saved_rnn_model_gives_same_outputs(make_cell, tmp_path):
    model = _rnn_model(make_cell())
    _perturb(model, scale=0.3)
    x = _sequences()
    path = str(tmp_path / "rnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-6)
    p0, p1 = warpkeras.partition(model), warpkeras.partition(loaded)
    assert len(p0.task_variables) == len(p1.task_variables)
    assert len(p0.warp_variables) == len(p1.warp_variables)


# --- preconditioning (WarpGrad Eq. 2, T-Nets) -----------------------------------------
def test_linear_warp_preconditions_task_gradient():
    rng = np.random.default_rng(0)
    n_in, n_out, batch, lr = 5, 4, 7, 0.05
    x = rng.normal(size=(batch, n_in))
    target = rng.normal(size=(batch, n_out))
    W = rng.normal(size=(n_in, n_out))
    T = rng.normal(size=(n_out, n_out))
    model = keras.Sequential(
        [
            keras.Input((n_in,), dtype="float64"),
            keras.layers.Dense(n_out, use_bias=False, dtype="float64", name="task"),
            wl.WarpDense(use_bias=False, dtype="float64", name="warp"),
        ]
    )
    model.get_layer("task").kernel.assign(W)
    model.get_layer("warp").kernel.assign(T)
    p = warpkeras.partition(model, require_warp=True)
    theta, phi = p.initial_task_values(), p.warp_values()
    with tf.GradientTape() as tape:
        tape.watch(theta)
        y, _ = p.call(theta, phi, x)
        loss = 0.5 * tf.reduce_sum((y - target) ** 2)
    (grad_W,) = tape.gradient(loss, theta)

    # Keras layout: y = x @ W @ T. With E = y - t, ∂L/∂W = xᵀ E Tᵀ; in the paper's column
    # layout (y = T_col W_col x, T_col = Tᵀ, W_col = Wᵀ) that is T_colᵀ (y - t) xᵀ.
    E = x @ W @ T - target
    np.testing.assert_allclose(grad_W, x.T @ E @ T.T, atol=1e-10)
    T_col = T.T
    np.testing.assert_allclose(np.transpose(grad_W), T_col.T @ E.T @ x, atol=1e-10)

    # Eq. 2: the task gradient is the unwarped one pulled back through the warp's
    # Jacobian D_x ω (here obtained by autodiff of the warp layer alone).
    warp = model.get_layer("warp")
    h = tf.constant(x[:1] @ W)
    with tf.GradientTape() as tape:
        tape.watch(h)
        out = warp(h)
    D_omega = tape.batch_jacobian(out, h)[0].numpy()  # (out, in) = T_col
    np.testing.assert_allclose(D_omega, T_col, atol=1e-12)
    np.testing.assert_allclose(grad_W, x.T @ (E @ D_omega), atol=1e-10)

    # One SGD step on W moves the effective map M = W @ T by the gradient w.r.t. M,
    # preconditioned: ΔM = -lr ∇_M L (Tᵀ T) in the row layout, i.e.
    # ΔM_col = -lr (T_col T_colᵀ) ∇_{M_col} L in the column layout (the T Tᵀ blocks of
    # WarpGrad Sec. 2).
    W_next = W - lr * grad_W.numpy()
    delta_M = W_next @ T - W @ T
    grad_M = x.T @ E
    np.testing.assert_allclose(delta_M, -lr * grad_M @ (T.T @ T), atol=1e-5)
    np.testing.assert_allclose(delta_M.T, -lr * (T_col @ T_col.T) @ grad_M.T, atol=1e-5)
    # The warp matters: without it the step would be plain gradient descent on M.
    assert np.abs(delta_M - (-lr * grad_M)).max() > 1e-3


# --- second-order gradients through every warp ----------------------------------------
SECOND_ORDER_CASES = [
    ("dense", lambda **k: wl.WarpDense(**k), "vector"),
    ("conv3x3", lambda **k: wl.WarpConv2D(**k), "image"),
    ("scaling", lambda **k: wl.ChannelScaling(**k), "image"),
    (
        "resblock2",
        lambda **k: wl.ResidualWarpBlock(num_layers=2, hidden_filters=6, **k),
        "image",
    ),
    ("resdense", lambda **k: wl.ResidualWarpDense(hidden_units=6, **k), "vector"),
    ("film_block", lambda **k: wl.FiLMWarpBlock(hidden_filters=6, **k), "image"),
    ("warp_rnn", lambda **k: wl.WarpRNNCell(5, meta_units=3, **k), "sequence"),
    ("linear_warp_rnn", lambda **k: wl.LinearWarpRNNCell(5, **k), "sequence"),
]


@pytest.mark.parametrize(
    "name,factory,kind", SECOND_ORDER_CASES, ids=[c[0] for c in SECOND_ORDER_CASES]
)
def test_exact_warp_meta_gradient_matches_finite_differences(name, factory, kind):
    """d/dφ of L_meta(θ - α ∇θ L_task(θ, φ), φ) (WarpGrad Eq. 3) by nested tapes inside
    tf.function through `Model.stateless_call`, against central differences."""
    dtype = "float64"
    if kind == "sequence":
        model = _rnn_model(factory(dtype=dtype), dtype=dtype, return_sequences=False, unroll=True)
        x_task, x_meta = _sequences(dtype, seed=1), _sequences(dtype, seed=2)
    else:
        _, model, _ = _models(factory, kind, signed=True, dtype=dtype)
        x_task, x_meta = _batch(kind, dtype, seed=1), _batch(kind, dtype, seed=2)
    _perturb(model, scale=0.2)
    out_dim = model.output_shape[-1]
    t_task = np.random.default_rng(3).normal(size=(3, out_dim))
    t_meta = np.random.default_rng(4).normal(size=(3, out_dim))
    p = warpkeras.partition(model, require_warp=True)
    theta = p.initial_task_values()
    lr = 0.1

    def meta_loss(phi):
        with tf.GradientTape() as inner:
            inner.watch(theta)
            y, _ = p.call(theta, phi, x_task, training=True)
            task_loss = tf.reduce_mean((y - t_task) ** 2)
        grads = inner.gradient(task_loss, theta)
        adapted = [t - lr * g for t, g in zip(theta, grads)]
        y, _ = p.call(adapted, phi, x_meta, training=True)
        return tf.reduce_mean((y - t_meta) ** 2)

    @tf.function
    def meta_gradient(phi):
        with tf.GradientTape() as outer:
            outer.watch(phi)
            loss = meta_loss(phi)
        return outer.gradient(loss, phi)

    phi = p.warp_values()
    grads = meta_gradient(phi)
    assert all(g is not None for g in grads)
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)

    rng = np.random.default_rng(5)
    direction = [tf.constant(rng.normal(size=v.shape)) for v in phi]
    eps = 1e-6
    plus = meta_loss([v + eps * d for v, d in zip(phi, direction)])
    minus = meta_loss([v - eps * d for v, d in zip(phi, direction)])
    numeric = (plus - minus).numpy() / (2 * eps)
    analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(grads, direction))
    assert abs(analytic) > 1e-6
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_warp_rnn_second_order_through_while_loop_in_tf_function():
    """The exact warp meta-gradient through a (non-unrolled) `keras.layers.RNN` inside
    tf.function equals the one through the unrolled RNN."""
    results = []
    for unroll in (False, True):
        keras.utils.set_random_seed(7)
        model = _rnn_model(
            wl.WarpRNNCell(5, meta_units=3, dtype="float64"),
            dtype="float64",
            return_sequences=False,
            unroll=unroll,
        )
        _perturb(model, scale=0.2)
        p = warpkeras.partition(model)
        theta = p.initial_task_values()
        x_task, x_meta = _sequences("float64", seed=1), _sequences("float64", seed=2)

        def meta_gradient(phi, p=p, theta=theta, x_task=x_task, x_meta=x_meta):
            with tf.GradientTape() as outer:
                outer.watch(phi)
                with tf.GradientTape() as inner:
                    inner.watch(theta)
                    y, _ = p.call(theta, phi, x_task)
                    task_loss = tf.reduce_mean(y**2)
                grads = inner.gradient(task_loss, theta)
                adapted = [t - 0.1 * g for t, g in zip(theta, grads)]
                y, _ = p.call(adapted, phi, x_meta)
                meta_loss = tf.reduce_mean((y - 1.0) ** 2)
            return outer.gradient(meta_loss, phi)

        fn = tf.function(meta_gradient) if not unroll else meta_gradient
        results.append([g.numpy() for g in fn(p.warp_values())])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-12)
    assert any(np.abs(a).max() > 0 for a in results[0])


# --- errors ---------------------------------------------------------------------------
def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="4-D"):
        wl.WarpConv2D()(np.zeros((2, 5, 3), "float32"))
    with pytest.raises(ValueError, match="odd"):
        wl.WarpConv2D(kernel_size=2)
    with pytest.raises(ValueError, match="odd"):
        wl.ResidualWarpBlock(kernel_size=4)
    with pytest.raises(ValueError, match="4-D"):
        wl.ResidualWarpBlock()(np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match="rank >= 2"):
        wl.WarpDense().build((5,))
    with pytest.raises(ValueError, match="hidden_filters"):
        wl.ResidualWarpBlock(num_layers=1, hidden_filters=8)
    with pytest.raises(ValueError, match="num_layers"):
        wl.ResidualWarpDense(num_layers=0)
    with pytest.raises(ValueError, match="keras.layers.RNN"):
        wl.WarpRNNCell(4).build((2, 3, 5))
    with pytest.raises(ValueError, match="units"):
        wl.TaskRNNCell(0)
    with pytest.raises(ValueError, match="data_format"):
        wl.WarpConv2D(data_format="nhwc")
