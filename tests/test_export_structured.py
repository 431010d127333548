"""Adaptive SavedModels of models with several inputs: a two-input functional model (image +
vector, inputs given as a list) and a dict-input model.

The signatures take one flat argument per model input (``x_<name>``, ``queries_<name>``);
the Python-client functions take the model's own structure. One fresh process, which
cannot import warpkeras, serves both models; its answers must equal the in-process
adaptation (`warpkeras.export.adapt`) to 1e-5, and bad requests must fail with an
``InvalidArgumentError`` naming the inputs.
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

L = keras.layers
STEPS, LR = 3, 0.2
N, NQ = 8, 5
MAX_ROWS, MAX_ROW_STEPS = 10, 40
KWARGS = dict(loss="sparse_categorical_crossentropy", from_logits=True, learning_rate=LR)

SERVE = NO_WARPKERAS + textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    work = sys.argv[1]
    d = {k: tf.constant(v) for k, v in np.load(work + "/inputs.npz").items()}
    steps = tf.constant(STEPS)
    out, result, errors = {}, {}, {}
    good = dict(x_image=d["img"], x_vector=d["vec"], y=d["y"], steps=steps,
                queries_image=d["qimg"], queries_vector=d["qvec"])
    for kind in ("listed", "keyed"):
        served = tf.saved_model.load(f"{work}/{kind}")
        sig = served.signatures
        result[kind] = {
            "signatures": {k: sorted(f.structured_input_signature[1]) for k, f in sig.items()},
            "metadata": {k: (v.numpy().decode() if v.dtype == tf.string else v.numpy().item())
                         for k, v in served.metadata().items()},
        }
        out[kind + "/adapt_and_predict"] = sig["adapt_and_predict"](**good)["predictions"]
        out[kind + "/serve"] = sig["serving_default"](
            x_image=d["qimg"], x_vector=d["qvec"])["predictions"]
        for name, value in sig["adapt"](**{k: good[k] for k in
                                           ("x_image", "x_vector", "y", "steps")}).items():
            out[f"{kind}/adapt/{name}"] = value
        if kind == "listed":
            # The Python-client function takes the model's structure: a list or a tuple.
            for form in (list, tuple):
                out[f"listed/client_{form.__name__}"] = served.adapt_and_predict(
                    x=form([d["img"], d["vec"]]), y=d["y"], steps=steps,
                    queries=form([d["qimg"], d["qvec"]]))["predictions"]
        else:
            # Dtype-tolerant: a dict with uint8 images and int32 class ids.
            out["keyed/client_uint8"] = served.adapt_and_predict(
                x={"image": d["img_u8"], "vector": d["vec"]}, y=tf.cast(d["y"], tf.int32),
                steps=steps, queries={"image": d["qimg_u8"], "vector": d["qvec"]},
            )["predictions"]
            out["keyed/signature_uint8"] = sig["adapt_and_predict"](
                **dict(good, x_image=tf.cast(d["img_u8"], tf.float32),
                       queries_image=tf.cast(d["qimg_u8"], tf.float32)))["predictions"]
            try:
                served.adapt_and_predict(
                    x={"image": d["img"], "vector": d["vec"]}, y=tf.cast(d["y"], tf.float32),
                    steps=steps, queries={"image": d["qimg"], "vector": d["qvec"]})
                errors["keyed/float_labels"] = ["no error", ""]
            except Exception as err:
                errors["keyed/float_labels"] = [type(err).__name__,
                                                getattr(err, "message", str(err))]

    served = tf.saved_model.load(work + "/listed")
    nan_vec = d["vec"].numpy().copy()
    nan_vec[2, 1] = np.nan
    bad = {
        "x_rows": dict(x_vector=d["vec"][:5]),
        "y_rows": dict(y=d["y"][:6]),
        "query_rows": dict(queries_vector=d["qvec"][:2]),
        "image_shape": dict(x_image=d["img"][:, :2]),
        "vector_rank": dict(queries_vector=d["qvec"][:, :, None]),
        "nan_vector": dict(x_vector=tf.constant(nan_vec)),
        "max_rows": dict(x_image=d["big_img"], x_vector=d["big_vec"], y=d["big_y"]),
        "max_row_steps": dict(steps=tf.constant(6)),
    }
    for case, override in bad.items():
        try:
            served.signatures["adapt_and_predict"](**dict(good, **override))
            errors[case] = ["no error", ""]
        except Exception as err:
            errors[case] = [type(err).__name__, getattr(err, "message", str(err))]
    result["errors"] = errors
    out["listed/again"] = served.signatures["adapt_and_predict"](**good)["predictions"]
    result["warpkeras_loaded"] = "warpkeras" in sys.modules
    np.savez(work + "/outputs.npz", **{k: np.asarray(v) for k, v in out.items()})
    with open(work + "/result.json", "w") as f:
        json.dump(result, f)
    """
).replace("STEPS", str(STEPS))


def _body(img, vec):
    h = L.Concatenate()([L.Flatten()(img), vec])
    h = L.Dense(6, activation="tanh", name="body")(h)
    h = warpkeras.warp(L.Dense(6, activation="tanh", name="warp"))(h)
    return L.Dense(3, name="head")(h)


def _listed():
    img, vec = keras.Input((3, 3, 1), name="image"), keras.Input((2,), name="vector")
    return keras.Model([img, vec], _body(img, vec), name="listed")


def _keyed():
    # Dict keys differ from the creation order; Keras orders dict inputs by key.
    vec, img = keras.Input((2,), name="vector"), keras.Input((3, 3, 1), name="image")
    return keras.Model({"vector": vec, "image": img}, _body(img, vec), name="keyed")


def _data():
    rng = np.random.default_rng(0)
    img_u8 = rng.integers(0, 4, size=(N, 3, 3, 1)).astype("uint8")
    qimg_u8 = rng.integers(0, 4, size=(NQ, 3, 3, 1)).astype("uint8")
    return {
        "img": img_u8.astype("float32") - 1.5,
        "img_u8": img_u8,
        "vec": rng.normal(size=(N, 2)).astype("float32"),
        "y": (np.arange(N) % 3).astype("int64"),
        "qimg": qimg_u8.astype("float32") - 1.5,
        "qimg_u8": qimg_u8,
        "qvec": rng.normal(size=(NQ, 2)).astype("float32"),
        "big_img": rng.normal(size=(MAX_ROWS + 2, 3, 3, 1)).astype("float32"),
        "big_vec": rng.normal(size=(MAX_ROWS + 2, 2)).astype("float32"),
        "big_y": (np.arange(MAX_ROWS + 2) % 3).astype("int64"),
    }


def _structure(kind, img, vec):
    return [img, vec] if kind == "listed" else {"image": img, "vector": vec}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    keras.utils.set_random_seed(2)
    work = tmp_path_factory.mktemp("structured")
    data = _data()
    np.savez(work / "inputs.npz", **data)
    models = {"listed": _listed(), "keyed": _keyed()}
    expected = {}
    for kind, model in models.items():
        # The dtype-tolerant functions are traced for the dict model only (export time).
        wexport.export_adaptive(
            model,
            str(work / kind),
            steps=STEPS,
            max_steps=20,
            max_rows=MAX_ROWS,
            max_row_steps=MAX_ROW_STEPS,
            dtype_tolerant=kind == "keyed",
            **KWARGS,
        )
        x = _structure(kind, data["img"], data["vec"])
        q = _structure(kind, data["qimg"], data["qvec"])
        adapted = wexport.adapt(model, x, data["y"], STEPS, **KWARGS)
        expected[kind + "/adapt_and_predict"] = adapted.predict(q, verbose=0)
        expected[kind + "/serve"] = model.predict(q, verbose=0)
        values = wexport.adapt_task_values(model, x, data["y"], STEPS, **KWARGS)
        expected.update({f"{kind}/adapt/{k}": v.numpy() for k, v in values.items()})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONNOUSERSITE="1")
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, str(work)],
        cwd=str(work),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"serving process failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    with open(work / "result.json") as f:
        result = json.load(f)
    return dict(
        result=result,
        outputs=dict(np.load(work / "outputs.npz")),
        expected=expected,
        models=models,
        data=data,
    )


def test_signatures_take_one_argument_per_input(served):
    result = served["result"]
    assert result["warpkeras_loaded"] is False
    for kind in ("listed", "keyed"):
        sigs = result[kind]["signatures"]
        assert sigs["serving_default"] == ["x_image", "x_vector"]
        assert sigs["adapt"] == ["steps", "x_image", "x_vector", "y"]
        assert sigs["adapt_and_predict"] == [
            "queries_image",
            "queries_vector",
            "steps",
            "x_image",
            "x_vector",
            "y",
        ]


def test_served_predictions_equal_in_process_adaptation(served):
    outputs, expected = served["outputs"], served["expected"]
    for key, want in expected.items():
        np.testing.assert_allclose(outputs[key], want, rtol=1e-5, atol=1e-5, err_msg=key)
    # Adaptation changed the predictions (the check above is not of θ0 against θ0).
    for kind in ("listed", "keyed"):
        assert (
            np.abs(expected[kind + "/adapt_and_predict"] - expected[kind + "/serve"]).max() > 1e-3
        )
    # The Python-client functions take the model's structure (lists and tuples alike).
    for key in ("listed/client_list", "listed/client_tuple", "listed/again"):
        np.testing.assert_allclose(
            outputs[key], expected["listed/adapt_and_predict"], rtol=1e-5, atol=1e-5, err_msg=key
        )
    # uint8 images in a dict are cast: the same answer as the float request.
    np.testing.assert_allclose(
        outputs["keyed/client_uint8"], outputs["keyed/signature_uint8"], rtol=1e-6, atol=1e-6
    )


def test_metadata_records_inputs(served):
    for kind, structure in (("listed", "list"), ("keyed", "dict")):
        meta = served["result"][kind]["metadata"]
        assert meta["input_structure"] == structure
        inputs = json.loads(meta["inputs"])
        assert inputs == [
            {
                "name": "image",
                "x": "x_image",
                "queries": "queries_image",
                "shape": [None, 3, 3, 1],
                "dtype": "float32",
            },
            {
                "name": "vector",
                "x": "x_vector",
                "queries": "queries_vector",
                "shape": [None, 2],
                "dtype": "float32",
            },
        ]
        assert json.loads(meta["input_shape"]) == {"image": [None, 3, 3, 1], "vector": [None, 2]}


@pytest.mark.parametrize(
    "case,words",
    [
        (
            "x_rows",
            [
                "the inputs `x_image` and `x_vector` must hold the same number of "
                "examples; got] [8] [in `x_image`,] [5] [in `x_vector`]"
            ],
        ),
        (
            "y_rows",
            [
                "`x_image`, `x_vector` and `y` must hold the same number of examples",
                "[8] [in `x_image` and] [6] [in `y`]",
            ],
        ),
        (
            "query_rows",
            [
                "the inputs `queries_image` and `queries_vector` must hold the same",
                "[5] [in `queries_image`,] [2] [in `queries_vector`]",
            ],
        ),
        (
            "image_shape",
            ["`x_image` must have shape [batch, 3, 3, 1] (rank 4); got shape] [8 2 3 1]"],
        ),
        ("vector_rank", ["`queries_vector` must have shape [batch, 2] (rank 2)"]),
        ("nan_vector", ["adapt_and_predict: `x_vector` must be finite"]),
        ("max_rows", ["`x_image` holds more examples than max_rows=10", "[12]"]),
        (
            "max_row_steps",
            ["rows of the support set × `steps` must be <= max_row_steps=40", "[8] [×] [6]"],
        ),
        ("keyed/float_labels", ["adapt_and_predict: `y` must be int64", "got float32"]),
    ],
)
def test_bad_requests_name_the_inputs(served, case, words):
    kind, text = served["result"]["errors"][case]
    assert kind == "InvalidArgumentError", (case, kind, text)
    for word in words:
        assert word in text, (case, text)


def test_in_process_adaptation_checks_the_structure(served):
    model, data = served["models"]["keyed"], served["data"]
    with pytest.raises(TypeError, match=r"`x` must be a dict with keys \['image', 'vector'\]"):
        wexport.adapt(model, [data["img"], data["vec"]], data["y"], 1, **KWARGS)
    with pytest.raises(
        TypeError,
        match=r"`x` must be a list or tuple of 2 arrays .*image, "
        r"vector",
    ):
        wexport.adapt(served["models"]["listed"], data["img"], data["y"], 1, **KWARGS)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"`x_image` and `x_vector` must "
        r"hold the same number",
    ):
        wexport.adapt_task_values(
            model, {"image": data["img"], "vector": data["vec"][:3]}, data["y"], 1, **KWARGS
        )


class DictInputs(keras.Model):
    def __init__(self):
        super().__init__()
        self.body = L.Dense(4, activation="tanh")
        self.head = L.Dense(3)

    def call(self, inputs):
        return self.head(self.body(tf.concat([inputs["a"], inputs["b"]], axis=-1)))


def test_input_spec_structure_names_the_inputs(tmp_path):
    """A subclassed model has no keras.Input: a dict `input_spec` gives the inputs, their
    names (sanitised to signature keys) and the structure the model is called with."""
    model = DictInputs()
    x = {"a": np.ones((4, 2), "float32"), "b": np.zeros((4, 1), "float32")}
    model(x)
    wexport.export_adaptive(
        model,
        str(tmp_path / "m"),
        input_spec={"a": (2,), "b": (1,)},
        dtype_tolerant=False,
        **KWARGS,
    )
    served_model = tf.saved_model.load(str(tmp_path / "m"))
    sig = served_model.signatures["serving_default"]
    assert sorted(sig.structured_input_signature[1]) == ["x_a", "x_b"]
    np.testing.assert_allclose(sig(x_a=x["a"], x_b=x["b"])["predictions"], model(x), rtol=1e-6)
    with pytest.raises(ValueError, match="input_spec describes 3 inputs"):
        wexport.export_adaptive(
            _listed(), str(tmp_path / "n"), input_spec=[(3, 3, 1), (2,), (1,)], **KWARGS
        )
    with pytest.raises(
        ValueError,
        match=r"structure of model 'keyed''s inputs \(a dict "
        r"with keys \['image', 'vector'\]\); got a list",
    ):
        wexport.export_adaptive(
            _keyed(), str(tmp_path / "n"), input_spec=[(3, 3, 1), (2,)], **KWARGS
        )
    with pytest.raises(ValueError, match="has 2 inputs; give input_spec as a list"):
        wexport.export_adaptive(_listed(), str(tmp_path / "n"), input_spec=(2,), **KWARGS)
    assert not (tmp_path / "n").exists()


def test_element_limits_count_every_input(tmp_path):
    """With several inputs, a request's size is the numbers of all inputs together
    (9 + 2 = 11 per example here)."""
    keras.utils.set_random_seed(2)
    path = str(tmp_path / "limits")
    wexport.export_adaptive(
        _listed(),
        path,
        steps=STEPS,
        max_elements=50,
        max_element_steps=100,
        dtype_tolerant=False,
        **KWARGS,
    )
    assert wexport.read_metadata(path)["example_elements"] == 11
    sig = tf.saved_model.load(path).signatures["adapt"]

    def request(n, steps):
        return dict(
            x_image=tf.zeros((n, 3, 3, 1)),
            x_vector=tf.zeros((n, 2)),
            y=tf.constant(np.arange(n) % 3),
            steps=tf.constant(steps),
        )

    sig(**request(4, 2))  # 44 numbers × 2 steps = 88
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"`x_image` and `x_vector` together must hold at most "
        r"max_elements=50 numbers .*\[55\]",
    ):
        sig(**request(5, 1))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"max_element_steps=100 .*\[44\] \[×\] \[3\]"
    ):
        sig(**request(4, 3))
