"""Keras is the oracle: with no meta-learning in the way, warpkeras adapts, evaluates and
serves as `keras.Model.fit` / `evaluate` / `predict` do.

A matrix of model kinds (MLP, several inputs, dict and list outputs, a masked sequence,
Embedding with mask_zero, batch norm, dropout, regularisers, a nested model, float64,
mixed_float16, mixed_bfloat16) × data conventions (arrays, tf.data, generators; with and
without sample weights) checks, for each cell:

* ``NoMetaTrainer.adapt(task, steps=K)`` with inner SGD(α) gives the weights of Keras's
  ``model.fit`` with ``keras.optimizers.SGD(α)`` for K steps on the same batches (float32
  rounding; mixed_float16 to 2e-3 and mixed_bfloat16 to 1e-2: 16-bit forward passes
  rounded in other places, and Keras's loss scaling);
* the test loss before adaptation equals ``model.evaluate`` on the same data, and after
  adaptation equals ``model.evaluate`` of the adapted weights;
* the exported SavedModel's ``serving_default`` equals ``model.predict`` (one cell served
  in a process without warpkeras).

Cells that cannot hold say why (dropout's random draws are warpkeras's own, seeded per
task; batch norm's moving statistics after adaptation follow warpkeras's documented rule).
Keras runs eagerly here (``run_eagerly=True``): no tracing per cell, and an independent
execution path from warpkeras's compiled steps.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import NO_WARPKERAS

import warpkeras
from warpkeras import _losses
from warpkeras import objectives as obj

ALPHA = 0.05
K = 3
N = 12  # rows of the adaptation data (generators: K batches of N // K rows)
N_TEST = 8


# ----------------------------------------------------------------------------- model kinds
def _mlp(dtype=None):
    return keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(6, activation="tanh", dtype=dtype),
            keras.layers.Dense(2, dtype=dtype),
        ]
    )


def _inputs():
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(5, activation="tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(h))


def _dict_outputs():
    x = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh")(x)
    return keras.Model(
        x,
        {"reg": keras.layers.Dense(1, name="reg")(h), "cls": keras.layers.Dense(3, name="cls")(h)},
    )


def _list_outputs():
    x = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh")(x)
    return keras.Model(
        x,
        [
            keras.layers.Dense(1, name="first")(h),
            keras.layers.Dense(3, activation="softmax", name="second")(h),
        ],
    )


def _masked():
    return keras.Sequential(
        [
            keras.Input((5, 2)),
            keras.layers.Masking(0.0),
            keras.layers.LSTM(3, return_sequences=True),
            keras.layers.TimeDistributed(keras.layers.Dense(1)),
        ]
    )


def _embedding():
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(10, 4, mask_zero=True),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )


def _batchnorm():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dense(1),
        ]
    )


def _dropout():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1),
        ]
    )


def _regularised():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(
                6,
                activation="tanh",
                kernel_regularizer=keras.regularizers.L2(0.05),
                activity_regularizer=keras.regularizers.L1(0.01),
            ),
            keras.layers.Dense(
                1, bias_regularizer=keras.regularizers.L2(0.1), bias_initializer="ones"
            ),
        ]
    )


def _nested():
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh")], name="inner"
    )
    x = keras.Input((4,))
    return keras.Model(x, keras.layers.Dense(2)(inner(x)))


def _mixed(name="mixed_float16"):
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dense(2, dtype="float32"),
            ]
        )
    finally:
        keras.config.set_dtype_policy(policy)


def _x(rng, n, kind):
    if kind == "inputs":
        return {
            "a": rng.normal(size=(n, 3)).astype("float32"),
            "b": rng.normal(size=(n, 2)).astype("float32"),
        }
    if kind == "masked":
        x = rng.normal(size=(n, 5, 2)).astype("float32")
        lengths = rng.integers(2, 6, size=n)
        for i, length in enumerate(lengths):
            x[i, length:] = 0.0
        return x
    if kind == "embedding":
        x = rng.integers(1, 10, size=(n, 6)).astype("int32")
        for i, length in enumerate(rng.integers(2, 7, size=n)):
            x[i, length:] = 0
        return x
    if kind == "float64":
        return rng.normal(size=(n, 4))
    return rng.normal(size=(n, 4)).astype("float32")


def _y(rng, n, kind, x):
    if kind == "dict_outputs":
        return {"reg": rng.normal(size=(n, 1)).astype("float32"), "cls": rng.integers(0, 3, size=n)}
    if kind == "list_outputs":
        return [rng.normal(size=(n, 1)).astype("float32"), rng.integers(0, 3, size=n)]
    if kind == "masked":
        y = rng.normal(size=(n, 5, 1)).astype("float32")
        y[np.all(x == 0.0, axis=-1)] = 100.0  # padded steps: counted, the loss would be huge
        return y
    if kind == "embedding":
        return rng.integers(0, 3, size=n)
    if kind == "float64":
        return rng.normal(size=(n, 2))
    if kind in ("inputs", "batchnorm", "dropout", "regularised"):
        return rng.normal(size=(n, 1)).astype("float32")
    return rng.normal(size=(n, 2)).astype("float32")


def _w(rng, n, kind):
    if kind == "masked":  # per-time-step weights (Keras cannot combine [n] with a mask)
        return rng.uniform(0.0, 2.0, size=(n, 5)).astype("float32")
    return rng.uniform(0.0, 2.0, size=n).astype("float32")


KINDS = {
    "mlp": (_mlp, "mse", None),
    "inputs": (_inputs, "mse", None),
    "dict_outputs": (
        _dict_outputs,
        {"reg": "mse", "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        {"reg": 0.5, "cls": 2.0},
    ),
    "list_outputs": (_list_outputs, ["mse", "sparse_categorical_crossentropy"], [1.0, 0.3]),
    "masked": (_masked, "mse", None),
    "embedding": (_embedding, keras.losses.SparseCategoricalCrossentropy(from_logits=True), None),
    "batchnorm": (_batchnorm, "mse", None),
    "dropout": (_dropout, "mse", None),
    "regularised": (_regularised, "mae", None),
    "nested": (_nested, "huber", None),
    "float64": (lambda: _mlp("float64"), "mse", None),
    "mixed_float16": (_mixed, "mse", None),
    "mixed_bfloat16": (lambda: _mixed("mixed_bfloat16"), "mse", None),
}


class _Kind:
    """One model kind: the model, its trainer (traced once for all its cells) and data."""

    def __init__(self, name):
        build, self.loss, self.loss_weights = KINDS[name]
        self.name = name
        keras.utils.set_random_seed(7)
        self.model = build()
        self.trainer = warpkeras.NoMetaTrainer(
            self.model,
            self.loss,
            loss_weights=self.loss_weights,
            inner_learning_rate=ALPHA,
            inner_steps=K,
            accuracy=False,
            eval_training_mode=False,
        )
        rng = np.random.default_rng(11)
        x = _x(rng, N + N_TEST, name)
        y = _y(rng, N + N_TEST, name, x)
        w = _w(rng, N + N_TEST, name)
        rows = lambda s, a, b: tf.nest.map_structure(lambda t: t[a:b], s)  # noqa: E731
        self.train = (rows(x, 0, N), rows(y, 0, N), w[:N])
        self.test = (rows(x, N, N + N_TEST), rows(y, N, N + N_TEST), w[N:])
        # 16-bit forward passes: Keras's fit and warpkeras round in other places (Keras
        # scales the float16 loss); float32 and float64 agree to float32 rounding.
        self.tol = {"mixed_float16": 2e-3, "mixed_bfloat16": 1e-2}.get(name, 2e-5)

    def keras_twin(self):
        """A Keras copy of the model with the same weights, compiled as the trainer's."""
        twin = keras.models.clone_model(self.model)
        twin.set_weights(self.model.get_weights())
        twin.compile(
            optimizer=keras.optimizers.SGD(ALPHA),
            loss=self.loss,
            loss_weights=self.loss_weights,
            run_eagerly=True,
        )
        return twin

    def batches(self, weighted):
        """K adaptation batches (for generators) as (x, y[, w]) tuples."""
        size = N // K
        out = []
        for k in range(K):
            part = tuple(
                tf.nest.map_structure(lambda t, k=k: t[k * size : (k + 1) * size], p)
                for p in self.train
            )
            out.append(part if weighted else part[:2])
        return out


_KIND_CACHE = {}


def _kind(name):
    if name not in _KIND_CACHE:
        _KIND_CACHE[name] = _Kind(name)
    return _KIND_CACHE[name]


def _task(kind, convention, weighted):
    """The task of one cell, and the batches Keras's fit sees (the same)."""
    train = kind.train if weighted else kind.train[:2]
    test = kind.test if weighted else kind.test[:2]
    if convention == "arrays":
        # One full batch per step (the rows in another order: the mean is the same).
        return warpkeras.Task(train=train, test=test, batch_size=N, name=convention), [train] * K
    if convention == "tf.data":
        ds = tf.data.Dataset.from_tensors(train)
        test_ds = tf.data.Dataset.from_tensor_slices(test).batch(N_TEST)
        return warpkeras.Task(train=ds, test=test_ds, name=convention), [train] * K
    batches = kind.batches(weighted)
    return (warpkeras.Task(train=lambda rng: iter(batches), test=test, name=convention), batches)


def _fit(twin, batches):
    # Keras's generator adapter takes tuples, not lists, for several outputs' labels.
    batches = [tuple(tuple(p) if isinstance(p, list) else p for p in b) for b in batches]
    twin.fit((b for b in batches), steps_per_epoch=len(batches), epochs=1, shuffle=False, verbose=0)


def _evaluate(twin, test):
    return twin.evaluate(
        *test[:2],
        sample_weight=test[2] if len(test) == 3 else None,
        batch_size=N_TEST,
        verbose=0,
        return_dict=True,
    )["loss"]


def _compare_weights(kind, theta, twin):
    model_vars = kind.model.trainable_variables
    twin_vars = twin.trainable_variables
    by_id = {id(v): i for i, v in enumerate(model_vars)}
    assert len(theta) == len(kind.trainer.partition.task_variables) == len(model_vars)
    moved = 0.0
    for v, t in zip(kind.trainer.partition.task_variables, theta):
        want = twin_vars[by_id[id(v)]].numpy()
        np.testing.assert_allclose(
            np.asarray(t, dtype=np.float64),
            want,
            rtol=kind.tol,
            atol=kind.tol,
            err_msg=f"{kind.name}: {v.path}",
        )
        moved = max(moved, float(np.abs(want - v.numpy()).max()))
    assert moved > 1e-3, "adaptation did not move the weights: the check would be vacuous"


CONVENTIONS = [(c, w) for c in ("arrays", "tf.data", "generator") for w in (False, True)]
FULL = ["mlp", "dict_outputs", "masked"]  # every data convention
ONE = [
    "inputs",
    "list_outputs",
    "embedding",
    "regularised",
    "nested",
    "float64",
    "mixed_float16",
    "mixed_bfloat16",
]
CELLS = (
    [(k, c, w) for k in FULL for c, w in CONVENTIONS]
    + [(k, "arrays", True) for k in ONE]
    + [(k, "generator", False) for k in ONE]
)


@pytest.mark.parametrize(
    "name,convention,weighted", CELLS, ids=[f"{k}-{c}-{'w' if w else 'nw'}" for k, c, w in CELLS]
)
def test_adapt_and_evaluate_equal_keras(name, convention, weighted):
    kind = _kind(name)
    task, batches = _task(kind, convention, weighted)
    theta, curves = kind.trainer.adapt(task, steps=K)
    twin = kind.keras_twin()
    test = kind.test if weighted else kind.test[:2]
    before = _evaluate(twin, test)
    _fit(twin, batches)
    after = _evaluate(twin, test)
    _compare_weights(kind, [t.numpy() for t in theta], twin)
    tol = dict(rtol=kind.tol, atol=kind.tol)
    np.testing.assert_allclose(curves["test_loss"][0], before, **tol)
    np.testing.assert_allclose(curves["test_loss"][-1], after, **tol)
    # Keras's training loss of the first step (same batch, same weights) is warpkeras's too.
    np.testing.assert_allclose(curves["train_loss"][0], float(_first_loss(kind, batches[0])), **tol)


def _first_loss(kind, batch):
    twin = kind.keras_twin()
    x, y = batch[0], batch[1]
    w = batch[2] if len(batch) == 3 else None
    y_pred = twin(x, training=True)
    return twin.compute_loss(x, y, y_pred, w)


def test_the_masked_test_loss_leaves_padding_out():
    """The issue's example: padded steps (targets 100) do not count, as in Keras."""
    kind = _kind("masked")
    task = warpkeras.Task(train=kind.train[:2], test=kind.test[:2], batch_size=N)
    _, curves = kind.trainer.adapt(task, steps=1)
    assert curves["test_loss"][0] < 10.0  # with the padding counted it is in the 1000s
    np.testing.assert_allclose(
        curves["test_loss"][0], _evaluate(kind.keras_twin(), kind.test[:2]), rtol=2e-5
    )


def test_batchnorm_cells():
    """Batch norm: adaptation (batch statistics in training mode) equals `fit`; evaluation
    before adaptation (moving statistics) equals `evaluate`. After adaptation warpkeras's
    documented rule applies (not Keras's momentum average): the statistics of the latest
    adaptation batch at the adapted weights; checked with Keras's own layer run at
    momentum 0 on that batch. With `eval_training_mode=True` (transductive) the test
    batch's own statistics, likewise."""
    kind = _kind("batchnorm")
    task, batches = _task(kind, "generator", False)
    theta, curves = kind.trainer.adapt(task, steps=K)
    twin = kind.keras_twin()
    np.testing.assert_allclose(
        curves["test_loss"][0], _evaluate(twin, kind.test[:2]), rtol=2e-5, atol=2e-5
    )
    _fit(twin, batches)
    _compare_weights(kind, [t.numpy() for t in theta], twin)

    def with_statistics_of(x):
        for layer in twin.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.0
        twin(x, training=True)  # Keras's own layer writes the batch's statistics
        return _evaluate(twin, kind.test[:2])

    np.testing.assert_allclose(
        curves["test_loss"][-1], with_statistics_of(batches[-1][0]), rtol=2e-5, atol=2e-5
    )
    transductive = warpkeras.NoMetaTrainer(
        kind.model, "mse", inner_learning_rate=ALPHA, inner_steps=K, accuracy=False
    )
    _, curves = transductive.adapt(task, steps=K)
    np.testing.assert_allclose(
        curves["test_loss"][-1], with_statistics_of(kind.test[0]), rtol=2e-5, atol=2e-5
    )


def test_dropout_cell():
    """Dropout: evaluation runs in inference mode as `evaluate` does (before and after
    adaptation, whatever `eval_training_mode`). Adaptation cannot equal `fit` draw for
    draw: warpkeras's dropout masks derive from its own seed per task, Keras's from the
    layer's generator; the weights are checked to have moved instead."""
    kind = _kind("dropout")
    for trainer in (
        kind.trainer,
        warpkeras.NoMetaTrainer(
            kind.model, "mse", inner_learning_rate=ALPHA, inner_steps=K, accuracy=False
        ),
    ):
        task, _ = _task(kind, "arrays", True)
        theta, curves = trainer.adapt(task, steps=K)
        twin = kind.keras_twin()
        np.testing.assert_allclose(curves["test_loss"][0], _evaluate(twin, kind.test), rtol=2e-5)
        twin.set_weights([t.numpy() for t in theta])
        np.testing.assert_allclose(curves["test_loss"][-1], _evaluate(twin, kind.test), rtol=2e-5)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["mlp", "inputs", "masked", "embedding", "nested"])
def test_exported_predict_equals_keras(name, tmp_path):
    kind = _kind(name)
    path = kind.trainer.export(str(tmp_path / name))
    served = tf.saved_model.load(path).signatures["serving_default"]
    x = kind.test[0]
    args = (
        {f"x_{k}": tf.constant(v) for k, v in x.items()}
        if isinstance(x, dict)
        else {"x": tf.constant(x)}
    )
    got = served(**args)["predictions"].numpy()
    np.testing.assert_allclose(got, kind.model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


SERVE = (
    NO_WARPKERAS
    + """
import json, sys
import numpy as np
import tensorflow as tf
path, data = sys.argv[1], np.load(sys.argv[2])
served = tf.saved_model.load(path).signatures["serving_default"]
out = served(x=tf.constant(data["x"]))["predictions"].numpy()
np.save(sys.argv[3], out)
print(json.dumps({"warpkeras_loaded": "warpkeras" in sys.modules}))
"""
)


def test_exported_predict_equals_keras_without_warpkeras(tmp_path):
    kind = _kind("mlp")
    path = kind.trainer.export(str(tmp_path / "mlp"))
    np.savez(tmp_path / "in.npz", x=kind.test[0])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONNOUSERSITE="1")
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, path, str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"warpkeras_loaded": False}
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"),
        kind.model.predict(kind.test[0], verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


# ----------------------------------------------------------------------------- the loss
def test_keras_compile_loss_is_what_compile_uses():
    """The one internal route (`keras_compile_loss`) still exists and gives
    `model.compute_loss` of a compiled model (dict outputs, loss weights, sample
    weights); a Keras change that breaks it fails here first."""
    kind = _kind("dict_outputs")
    twin = kind.keras_twin()
    x, y, w = kind.train
    y_pred = twin(x)
    compiled = _losses.keras_compile_loss(kind.loss, kind.loss_weights, twin.output_names)
    for _ in range(2):  # built once, then reused; its trackers stay out of the way
        np.testing.assert_allclose(
            float(compiled(y, y_pred, w)), float(twin.compute_loss(x, y, y_pred, w)), rtol=1e-6
        )
    assert all(m is None for m in compiled.metrics)


def test_names_functions_and_objects_give_the_same_masked_loss():
    kind = _kind("masked")
    p = kind.trainer.partition
    theta = [v.value for v in p.task_variables]
    batch = kind.test[:2]
    want = _evaluate(kind.keras_twin(), batch)
    for loss in (
        "mse",
        keras.losses.mean_squared_error,
        keras.losses.MeanSquaredError(),
        lambda t, q: keras.losses.mean_squared_error(t, q),
    ):
        got, _ = obj.task_loss(p, loss, theta, [], batch, training=False)
        np.testing.assert_allclose(float(got), want, rtol=2e-5, err_msg=repr(loss))


@pytest.mark.parametrize("name,width", [("inputs", 3), ("mlp", 3), ("mlp", 1)])
def test_labels_of_another_shape_are_refused(name, width):
    """3-wide targets on a 1-unit output with "mse" would broadcast silently (Keras trains
    on); 3-wide on 2 units would fail deep in the graph. Both are refused, naming the
    shapes."""
    kind = _kind(name)
    x = kind.train[0]
    units = 1 if name == "inputs" else 2
    task = warpkeras.Task(train=(x, np.zeros((N, width), "float32")), batch_size=4)
    with pytest.raises(
        ValueError,
        match=rf"Task 'task': its train data: the labels of the "
        rf"output have shape \(4, {width}\).*\(None, {units}\).*broadcast",
    ):
        kind.trainer.adapt(task, steps=1)
    p = kind.trainer.partition
    theta = [v.value for v in p.task_variables]
    batch = (tf.nest.map_structure(lambda t: t[:4], x), np.zeros((4, width), "float32"))
    with pytest.raises(ValueError, match=rf"\(4, {width}\).*\(4, {units}\).*broadcast"):
        obj.task_loss(p, "mse", theta, [], batch)


def test_loss_kinds_are_decided_in_one_place():
    kind = _losses.TaskLoss
    scce = kind("sparse_categorical_crossentropy").kinds()[0]
    assert (scce.category, scce.from_logits) == ("sparse_categorical", False)
    obj_kind = kind(keras.losses.CategoricalCrossentropy(from_logits=True)).kinds()[0]
    assert (obj_kind.category, obj_kind.from_logits) == ("categorical", True)
    focal = kind(keras.losses.BinaryFocalCrossentropy(from_logits=True)).kinds()[0]
    assert (focal.category, focal.from_logits) == ("binary", True)
    assert kind("mse").kinds()[0].category is None
    assert not kind("mse").classification
    assert kind({"a": "binary_crossentropy", "b": "categorical_crossentropy"}).classification

    def my_crossentropy(y_true, y_pred):  # a user's function: its name decides nothing
        return keras.losses.mean_squared_error(y_true, y_pred)

    assert kind(my_crossentropy).kinds()[0].category is None


# ----------------------------------------------------------------------------- the data
def test_tasks_refuse_what_fit_refuses_naming_the_element():
    x = np.zeros((10, 4), "float32")
    with pytest.raises(ValueError, match=r"y\['cls'\] has 9"):
        warpkeras.Task(train=(x, {"reg": np.zeros((10, 1)), "cls": np.zeros(9)}))
    with pytest.raises(ValueError, match=r"sample_weight has 3"):
        warpkeras.Task(train=(x, np.zeros((10, 1)), np.ones(3)))
    bad = tf.data.Dataset.from_tensors((x, x, x, x))
    with pytest.raises(ValueError, match=r"tuple of 4 elements.*\(x, y, sample_weight\)"):
        warpkeras.Task(train=bad)
    with pytest.raises(ValueError, match=r"`test` dataset yields"):
        warpkeras.Task(train=(x, x), test=tf.data.Dataset.from_tensors(x))


def test_evaluate_reports_keras_numbers_for_weighted_tf_data():
    """The issue's example: a tf.data task of (x, y, w) triples is weighted (not dropped)
    in adaptation and evaluation, and `evaluate` runs."""
    kind = _kind("mlp")
    task, _ = _task(kind, "tf.data", True)
    report = kind.trainer.evaluate([task], steps=K, verbose=0)
    twin = kind.keras_twin()
    _fit(twin, [kind.train] * K)
    np.testing.assert_allclose(
        report["final_test_loss"]["mean"], _evaluate(twin, kind.test), rtol=2e-5
    )
    unweighted = _evaluate(twin, kind.test[:2])
    assert abs(unweighted - report["final_test_loss"]["mean"]) > 1e-4


# ----------------------------------------------------------------------------- meta-training
@pytest.mark.parametrize("trainer_cls", ["MAMLTrainer", "LeapTrainer"])
def test_meta_training_weighs_the_examples(trainer_cls):
    """Weights 2 on half of the rows and 0 on the other half are the unweighted half (the
    loss's sum over the batch is divided by the batch size, as in Keras): one meta step
    on either gives the same θ0. Dict outputs, weighted adaptation and meta data."""
    kind = _kind("dict_outputs")
    x, y, _ = kind.train
    half = N // 2
    w = np.r_[np.full(half, 2.0), np.zeros(N - half)].astype("float32")
    first = lambda s: tf.nest.map_structure(lambda t: t[:half], s)  # noqa: E731
    results = []
    for data in ((x, y, w), (first(x), first(y))):
        model = keras.models.clone_model(kind.model)
        model.set_weights(kind.model.get_weights())
        trainer = getattr(warpkeras, trainer_cls)(
            model,
            kind.loss,
            loss_weights=kind.loss_weights,
            inner_learning_rate=ALPHA,
            inner_steps=2,
            meta_batch_size=1,
            meta_optimizer=keras.optimizers.SGD(0.1),
            parallel="sequential",
            accuracy=False,
        )
        trainer.fit([warpkeras.Task(train=data, meta=data, batch_size=N)], epochs=1, verbose=0)
        results.append([v.numpy() for v in model.trainable_variables])
    moved = max(float(np.abs(a - b).max()) for a, b in zip(results[0], kind.model.get_weights()))
    assert moved > 1e-4
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_test_data_from_a_generator_equals_evaluate():
    """`test` as a generator of (x, y, sample_weight) batches, as `model.evaluate` takes."""
    kind = _kind("mlp")
    x, y, w = kind.test
    gen = ((x[i : i + 4], y[i : i + 4], w[i : i + 4]) for i in range(0, N_TEST, 4))
    task = warpkeras.Task(train=kind.train, test=gen, batch_size=N)
    _, curves = kind.trainer.adapt(task, steps=1)
    np.testing.assert_allclose(
        curves["test_loss"][0], _evaluate(kind.keras_twin(), kind.test), rtol=2e-5
    )
    with pytest.raises(ValueError, match="yields no batches"):
        warpkeras.Task(train=kind.train, test=iter([]))


def test_accuracy_of_a_masked_sequence_is_keras_accuracy():
    """Accuracy leaves masked steps out, as Keras's ``metrics=["accuracy"]`` does (sample
    weights not applied: that would be ``weighted_metrics``)."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((5, 2)),
            keras.layers.Masking(0.0),
            keras.layers.LSTM(4, return_sequences=True),
            keras.layers.TimeDistributed(keras.layers.Dense(3)),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(3)
    x = _x(rng, N_TEST, "masked")
    y = rng.integers(0, 3, size=(N_TEST, 5))
    y[np.all(x == 0.0, axis=-1)] = 0  # padded steps: class 0, which the model may "hit"
    trainer = warpkeras.NoMetaTrainer(model, loss, inner_steps=1, eval_training_mode=False)
    assert trainer.accuracy
    _, curves = trainer.adapt(warpkeras.Task(train=(x, y), test=(x, y), batch_size=N_TEST), steps=1)
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    twin.compile(loss=loss, metrics=["accuracy"], run_eagerly=True)
    want = twin.evaluate(x, y, batch_size=N_TEST, verbose=0, return_dict=True)
    np.testing.assert_allclose(curves["test_loss"][0], want["loss"], rtol=2e-5)
    np.testing.assert_allclose(curves["test_accuracy"][0], want["accuracy"], rtol=1e-6)
