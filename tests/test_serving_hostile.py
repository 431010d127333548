"""A hostile client against an exported adaptive SavedModel, served by TensorFlow alone.

One fresh Python process (warpkeras cannot be imported there) loads the SavedModel and
sends bad requests: over the work budget, NaN / inf inputs, wrong dtypes, mismatched
shapes, negative step counts. Each must fail with an ``InvalidArgumentError`` that names
the input or the limit, and good requests must still give the same answers afterwards.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import NO_WARPKERAS

import warpkeras
from warpkeras import export as wexport

MAX_STEPS, MAX_ROWS, MAX_ROW_STEPS, STEPS = 20, 32, 200, 3

CLIENT = NO_WARPKERAS + textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    work = sys.argv[1]
    served = tf.saved_model.load(work + "/model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)).astype("float32")
    y = (np.arange(12) % 3).astype("int64")
    q = rng.normal(size=(5, 6)).astype("float32")
    good = dict(x=tf.constant(x), y=tf.constant(y), steps=tf.constant(3),
                queries=tf.constant(q))
    sig = served.signatures["adapt_and_predict"]
    result = {"metadata": {k: (v.numpy().decode() if v.dtype == tf.string
                               else v.numpy().item())
                           for k, v in served.metadata().items()}}
    first = sig(**good)["predictions"].numpy()

    def big(n):
        return (tf.constant(rng.normal(size=(n, 6)).astype("float32")),
                tf.constant((np.arange(n) % 3).astype("int64")))

    bx, by = big(40)
    nan_x = x.copy(); nan_x[3, 2] = np.nan
    inf_q = q.copy(); inf_q[0, 0] = -np.inf
    bad = {
        # the work budget
        "rows": ("sig", dict(x=bx, y=by)),
        "query_rows": ("sig", dict(queries=bx)),
        "row_steps": ("sig", dict(steps=tf.constant(17))),
        "steps": ("sig", dict(steps=tf.constant(21))),
        "steps_int64_huge": ("fn", dict(steps=tf.constant(2 ** 40, tf.int64))),
        "serve_rows": ("serve", dict(x=bx)),
        # non-finite values
        "nan_x": ("sig", dict(x=tf.constant(nan_x))),
        "inf_queries": ("sig", dict(queries=tf.constant(inf_q))),
        "nan_x_fn": ("fn", dict(x=tf.constant(nan_x, tf.float64),
                                queries=tf.constant(q, tf.float64))),
        "serve_nan": ("serve", dict(x=tf.constant(nan_x))),
        # shapes and counts
        "features": ("sig", dict(x=tf.constant(x[:, :4]))),
        "lengths": ("sig", dict(y=tf.constant(y[:7]))),
        "queries_rank": ("sig", dict(queries=tf.constant(q[0]))),
        "negative_steps": ("sig", dict(steps=tf.constant(-4))),
        "labels": ("sig", dict(y=tf.constant(y + 3))),
        # dtypes
        "float_labels": ("fn", dict(y=tf.constant(y, tf.float32))),
        "float_steps": ("fn", dict(steps=tf.constant(3.0))),
        "signature_int_images": ("sig", dict(x=tf.constant(x.astype("int32")))),
    }
    errors = {}
    for case, (target, override) in bad.items():
        kwargs = dict(good)
        kwargs.update(override)
        try:
            if target == "sig":
                sig(**kwargs)
            elif target == "fn":
                served.adapt_and_predict(**kwargs)
            else:
                served.signatures["serving_default"](x=kwargs["x"])
            errors[case] = ["no error", ""]
        except Exception as err:
            errors[case] = [type(err).__name__, getattr(err, "message", str(err))]
    result["errors"] = errors

    # Good requests still work, and give the same answers.
    outputs = {"first": first, "again": sig(**good)["predictions"].numpy()}
    images = (np.abs(x) * 40).astype("uint8")
    outputs["uint8_fn"] = served.adapt_and_predict(
        x=tf.constant(images), y=tf.constant(y, tf.int32), steps=tf.constant(3, tf.int64),
        queries=tf.constant(images[:4]))["predictions"].numpy()
    outputs["uint8_float"] = sig(
        x=tf.constant(images.astype("float32")), y=tf.constant(y), steps=tf.constant(3),
        queries=tf.constant(images[:4].astype("float32")))["predictions"].numpy()
    # numpy arrays are converted to the declared dtypes by TensorFlow itself.
    outputs["numpy_ints"] = sig(x=images, y=y.astype("int32"), steps=np.int32(3),
                                queries=images[:4])["predictions"].numpy()
    outputs["float64_fn"] = served.adapt_and_predict(
        x=tf.constant(x, tf.float64), y=tf.constant(y), steps=tf.constant(3),
        queries=tf.constant(q, tf.float64))["predictions"].numpy()
    outputs["at_limit"] = sig(x=bx[:MAX_ROWS], y=by[:MAX_ROWS], steps=tf.constant(6),
                              queries=tf.constant(q))["predictions"].numpy()
    result["warpkeras_loaded"] = "warpkeras" in sys.modules
    np.savez(work + "/outputs.npz", **outputs)
    with open(work + "/result.json", "w") as f:
        json.dump(result, f)
    """
).replace("MAX_ROWS", str(MAX_ROWS))


def _classifier():
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, name="hidden")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("relu")(h)
    h = warpkeras.warp(keras.layers.Dense(8, activation="tanh", name="warp_dense"))(h)
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inp, out, name="classifier")


KWARGS = dict(loss="sparse_categorical_crossentropy", from_logits=True, learning_rate=0.1)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    keras.utils.set_random_seed(3)
    work = tmp_path_factory.mktemp("hostile")
    model = _classifier()
    wexport.export_adaptive(
        model,
        str(work / "model"),
        steps=STEPS,
        max_steps=MAX_STEPS,
        max_rows=MAX_ROWS,
        max_row_steps=MAX_ROW_STEPS,
        **KWARGS,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONNOUSERSITE="1")
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(work)],
        cwd=str(work),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    with open(work / "result.json") as f:
        result = json.load(f)
    return dict(result=result, outputs=dict(np.load(work / "outputs.npz")), model=model)


def test_budget_is_recorded(client):
    meta = client["result"]["metadata"]
    assert (meta["max_steps"], meta["max_rows"], meta["max_row_steps"]) == (
        MAX_STEPS,
        MAX_ROWS,
        MAX_ROW_STEPS,
    )
    assert (meta["input_dtype"], meta["label_dtype"], meta["steps_dtype"]) == (
        "float32",
        "int64",
        "int32",
    )
    assert client["result"]["warpkeras_loaded"] is False


@pytest.mark.parametrize(
    "case,words",
    [
        ("rows", ["adapt_and_predict: `x` holds more examples than max_rows=32", "[40]"]),
        ("query_rows", ["`queries` holds more examples than max_rows=32"]),
        ("row_steps", ["max_row_steps=200", "[12] [×] [17]"]),
        ("steps", ["`steps` must be <= 20 (max_steps of the export); got] [21]"]),
        ("steps_int64_huge", ["`steps` must be <= 20"]),
        ("serve_rows", ["serving_default: `x` holds more examples than max_rows=32"]),
        ("nan_x", ["adapt_and_predict: `x` must be finite; it holds NaN or inf"]),
        ("inf_queries", ["adapt_and_predict: `queries` must be finite"]),
        ("nan_x_fn", ["adapt_and_predict: `x` must be finite"]),
        ("serve_nan", ["serving_default: `x` must be finite"]),
        ("features", ["`x` must have shape [batch, 6] (rank 2); got shape] [12 4]"]),
        ("lengths", ["`x` and `y` must hold the same number of examples; got] [12] [and] [7]"]),
        ("queries_rank", ["`queries` must have shape [batch, 6] (rank 2); got shape] [6]"]),
        ("negative_steps", ["`steps` must be >= 0; got] [-4]"]),
        ("labels", ["class labels in `y` must lie in [0, 3)"]),
        ("float_labels", ["adapt_and_predict: `y` must be int64", "got float32"]),
        ("float_steps", ["adapt_and_predict: `steps` must be int32", "got float32"]),
        # A signature is one concrete function: TensorFlow refuses other tensor dtypes
        # before the graph runs, with its own message.
        ("signature_int_images", ["expected to be a float tensor but is a int32 tensor"]),
    ],
)
def test_bad_request_is_refused_by_name(client, case, words):
    kind, text = client["result"]["errors"][case]
    assert kind == "InvalidArgumentError", (case, kind, text)
    for word in words:
        assert word in text, (case, text)


def test_good_requests_work_after_bad_ones(client):
    out = client["outputs"]
    assert out["first"].shape == (5, 3) and np.isfinite(out["first"]).all()
    np.testing.assert_array_equal(out["again"], out["first"])
    # Integer images are cast to float: the same answer as the float request.
    np.testing.assert_allclose(out["uint8_fn"], out["uint8_float"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["numpy_ints"], out["uint8_float"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["float64_fn"], out["first"], rtol=1e-6, atol=1e-6)
    assert out["at_limit"].shape == (5, 3)  # 32 rows × 6 steps = 192 <= 200


def test_regression_targets_must_be_finite():
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    x = np.ones((5, 2), "float32")
    y = np.zeros((5, 1), "float32")
    y[2, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="`y` must be finite"):
        wexport.adapt_task_values(model, x, y, 2, loss="mse")
    y[2, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="`y` must be finite"):
        wexport.adapt(model, x, y, 2, loss="mse")


def test_in_process_adaptation_casts_or_names_the_dtype():
    model = _classifier()
    rng = np.random.default_rng(4)
    images = rng.integers(0, 255, size=(9, 6)).astype("uint8")
    labels = np.arange(9) % 3
    got = wexport.adapt_task_values(model, images, labels.astype("int32"), 2, **KWARGS)
    want = wexport.adapt_task_values(model, images.astype("float32"), labels, 2, **KWARGS)
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-6)
    with pytest.raises(TypeError, match=r"adapt: `x` must be float32 .* got bool"):
        wexport.adapt(model, images > 100, labels, 2, **KWARGS)
    with pytest.raises(TypeError, match=r"`y` must be int64 .* got float32"):
        wexport.adapt(model, images, labels.astype("float32"), 2, **KWARGS)
    with pytest.raises(TypeError, match=r"adapt: steps='2' is not valid"):
        wexport.adapt(model, images, labels, "2", **KWARGS)


# --- work bounded by size: limits in numbers (tensor elements), not rows ------------------
def _sequence_model():
    keras.utils.set_random_seed(5)
    return keras.Sequential(
        [
            keras.Input((None, 3)),
            keras.layers.LSTM(4),
            warpkeras.warp(keras.layers.Dense(4)),
            keras.layers.Dense(1),
        ]
    )


@pytest.fixture(scope="module")
def sequence_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("sequence") / "model"
    wexport.export_adaptive(_sequence_model(), str(path), loss="mse", dtype_tolerant=False)
    return tf.saved_model.load(str(path)), wexport.read_metadata(str(path))


def _error(fn, **kwargs):
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        fn(**kwargs)
    return info.value.message


def test_default_element_budget_of_a_sequence_model(sequence_export):
    served, meta = sequence_export
    # One example holds 3 numbers per time step (the unknown time axis counted as 1):
    # 10 000 examples' worth per request, and as much × steps.
    assert (meta["example_elements"], meta["max_elements"], meta["max_element_steps"]) == (
        3,
        30_000,
        30_000,
    )
    adapt = served.signatures["adapt"]
    one = tf.zeros((1, 1))
    # One long sequence is as much work as many short ones: refused by its size × steps,
    # before any step runs (a row limit would have let it through).
    text = _error(adapt, x=tf.zeros((1, 2000, 3)), y=one, steps=tf.constant(50))
    assert "max_element_steps=30000" in text and "[6000] [×] [50]" in text, text
    text = _error(adapt, x=tf.zeros((1, 10_001, 3)), y=one, steps=tf.constant(1))
    assert "`x` must hold at most max_elements=30000 numbers" in text and "[30003]" in text
    predict = served.signatures["serving_default"]
    text = _error(predict, x=tf.zeros((2, 5001, 3)))
    assert "serving_default: `x` must hold at most max_elements=30000" in text, text
    text = _error(
        served.signatures["adapt_and_predict"],
        x=tf.zeros((1, 10, 3)),
        y=one,
        steps=tf.constant(1),
        queries=tf.zeros((1, 10_001, 3)),
    )
    assert "`queries` must hold at most max_elements=30000" in text, text
    # At the limit: 100 time steps × 3 features × 100 steps = 30 000.
    out = adapt(x=tf.ones((1, 100, 3)), y=one, steps=tf.constant(100))
    assert all(np.isfinite(v.numpy()).all() for v in out.values())


def test_element_budget_defaults_and_overrides(tmp_path):
    model = _classifier()
    path = str(tmp_path / "fixed")
    # A fixed example size (6 numbers): the row defaults of earlier versions, in numbers.
    wexport.export_adaptive(model, path, dtype_tolerant=False, **KWARGS)
    meta = wexport.read_metadata(path)
    assert (meta["example_elements"], meta["max_elements"], meta["max_element_steps"]) == (
        6,
        60_000,
        6_000_000,
    )
    wexport.export_adaptive(
        model,
        path,
        dtype_tolerant=False,
        max_elements=60,
        max_element_steps=120,
        overwrite=True,
        **KWARGS,
    )
    served = tf.saved_model.load(path)
    sig = served.signatures["adapt"]
    y = tf.constant(np.arange(10) % 3)
    sig(x=tf.zeros((10, 6)), y=y, steps=tf.constant(2))  # 60 × 2 = 120
    text = _error(sig, x=tf.zeros((10, 6)), y=y, steps=tf.constant(3))
    assert "max_element_steps=120" in text and "[60] [×] [3]" in text, text
    text = _error(sig, x=tf.zeros((11, 6)), y=tf.constant(np.arange(11) % 3), steps=tf.constant(0))
    assert "max_elements=60" in text, text
    for bad, words in [
        (dict(max_elements=0), ["max_elements", ">= 1"]),
        (dict(max_element_steps=1.5), ["max_element_steps"]),
    ]:
        with pytest.raises((TypeError, ValueError)) as info:
            wexport.export_adaptive(model, str(tmp_path / "bad"), **bad, **KWARGS)
        assert all(w in str(info.value) for w in words), str(info.value)


def test_image_of_any_size_is_bounded(tmp_path):
    """A conv model over ``keras.Input((None, None, 1))`` exports (its output spec traced
    with the unknown sizes), and one 4000 × 4000 image is refused by size."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential(
        [
            keras.Input((None, None, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            warpkeras.warp(keras.layers.Conv2D(4, 3)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1),
        ]
    )
    path = str(tmp_path / "conv")
    wexport.export_adaptive(model, path, loss="mse", dtype_tolerant=False)
    meta = wexport.read_metadata(path)
    assert (meta["max_elements"], meta["max_element_steps"]) == (10_000, 10_000)
    served = tf.saved_model.load(path)
    text = _error(served.signatures["serving_default"], x=tf.zeros((1, 4000, 4000, 1)))
    assert "max_elements=10000" in text and "[16000000]" in text, text
    x = np.random.default_rng(0).normal(size=(2, 20, 30, 1)).astype("float32")
    np.testing.assert_allclose(
        served.signatures["serving_default"](x=x)["predictions"],
        model.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
