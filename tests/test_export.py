"""Tests of `warpkeras.export`: SavedModels that adapt themselves, served by TensorFlow alone.

The exported models are loaded in a fresh Python process that imports only TensorFlow
(warpkeras is not importable there), so the signatures are checked to need nothing from
this library. One such process runs every check; `saved_model_cli` runs beside it.
"""

import json
import os
import shutil
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

STEPS, LR, MOMENTUM = 3, 0.1, 0.5

FRESH_SCRIPT = NO_WARPKERAS + textwrap.dedent(
    """
    import json, sys
    import numpy as np
    result = {}
    try:
        import warpkeras  # noqa: F401
        result["warpkeras_importable"] = True
    except ImportError:
        result["warpkeras_importable"] = False
    import tensorflow as tf

    work = sys.argv[1]
    data = dict(np.load(work + "/inputs.npz"))
    out = {}
    cls = tf.saved_model.load(work + "/cls-adaptive")
    reg = tf.saved_model.load(work + "/reg-adaptive")
    adapted = tf.saved_model.load(work + "/cls-adapted")
    result["signatures"] = sorted(cls.signatures.keys())
    x, y, q = (tf.constant(data[k]) for k in ("x", "y", "q"))
    steps = tf.constant(data["steps"])
    out["cls_serve"] = cls.signatures["serving_default"](x=q)["predictions"].numpy()
    for name, value in cls.signatures["adapt"](x=x, y=y, steps=steps).items():
        out["cls_adapt/" + name] = value.numpy()
    out["cls_adapt_predict"] = cls.signatures["adapt_and_predict"](
        x=x, y=y, steps=steps, queries=q)["predictions"].numpy()
    rx, ry, rq = (tf.constant(data[k]) for k in ("rx", "ry", "rq"))
    for name, value in reg.signatures["adapt"](x=rx, y=ry, steps=steps).items():
        out["reg_adapt/" + name] = value.numpy()
    out["reg_adapt_predict"] = reg.signatures["adapt_and_predict"](
        x=rx, y=ry, steps=steps, queries=rq)["predictions"].numpy()
    out["adapted_serve"] = adapted.signatures["serving_default"](q)
    out["adapted_serve"] = list(out["adapted_serve"].values())[0].numpy()
    result["metadata"] = {k: (v.numpy().decode() if v.dtype == tf.string else v.numpy().item())
                          for k, v in cls.metadata().items()}

    bad = {
        "feature_size": dict(x=x[:, :-1]),
        "rank": dict(x=x[0]),
        "lengths": dict(y=y[:-2]),
        "negative_steps": dict(steps=tf.constant(-1)),
        "too_many_steps": dict(steps=tf.constant(10 ** 6)),
        "labels": dict(y=y + 10),
        "empty": dict(x=x[:0], y=y[:0]),
        "queries": dict(queries=q[:, :, None]),
    }
    errors = {}
    for case, override in bad.items():
        kwargs = dict(x=x, y=y, steps=steps, queries=q)
        kwargs.update(override)
        try:
            cls.signatures["adapt_and_predict"](**kwargs)
            errors[case] = ["no error", ""]
        except Exception as err:
            errors[case] = [type(err).__name__, getattr(err, "message", str(err))]
    result["errors"] = errors
    # The process still serves after the bad requests.
    again = cls.signatures["adapt_and_predict"](x=x, y=y, steps=steps, queries=q)
    out["again"] = again["predictions"].numpy()
    result["warpkeras_loaded"] = "warpkeras" in sys.modules
    np.savez(work + "/outputs.npz", **out)
    with open(work + "/result.json", "w") as f:
        json.dump(result, f)
    """
)


def _classifier():
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, name="hidden")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("relu")(h)
    h = warpkeras.warp(keras.layers.Dense(8, activation="tanh", name="warp_dense"))(h)
    out = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inp, out, name="classifier")
    bn = model.get_layer("bn")
    rng = np.random.default_rng(5)
    bn.moving_mean.assign(rng.normal(size=8).astype("float32") * 0.1)
    bn.moving_variance.assign(1.0 + rng.random(8).astype("float32"))
    return model


def _regressor():
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(8, activation="tanh"),
            warpkeras.warp(keras.layers.Dense(8)),
            keras.layers.Dense(1),
        ],
        name="regressor",
    )


def _saved_model_cli():
    found = shutil.which("saved_model_cli")
    sibling = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if os.path.exists(sibling):
        return sibling
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(11)
    work = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    data = {
        "x": rng.normal(size=(12, 6)).astype("float32"),
        "y": (np.arange(12) % 3).astype("int64"),
        "q": rng.normal(size=(5, 6)).astype("float32"),
        "rx": rng.normal(size=(10, 2)).astype("float32"),
        "ry": rng.normal(size=(10, 1)).astype("float32"),
        "rq": rng.normal(size=(4, 2)).astype("float32"),
        "steps": np.int32(STEPS),
    }
    np.savez(work / "inputs.npz", **data)

    cls, reg = _classifier(), _regressor()
    cls_kwargs = dict(
        loss="sparse_categorical_crossentropy",
        from_logits=True,
        learning_rate=LR,
        momentum=MOMENTUM,
    )
    reg_kwargs = dict(loss=keras.losses.MeanSquaredError(), learning_rate=LR)
    # The dtype-tolerant functions are tested in test_serving_hostile.py.
    wexport.export_adaptive(
        cls,
        str(work / "cls-adaptive"),
        steps=STEPS,
        max_steps=100,
        dtype_tolerant=False,
        **cls_kwargs,
    )
    wexport.export_adaptive(
        reg, str(work / "reg-adaptive"), steps=STEPS, dtype_tolerant=False, **reg_kwargs
    )
    adapted = wexport.adapt(cls, data["x"], data["y"], STEPS, **cls_kwargs)
    adapted.export(str(work / "cls-adapted"), verbose=False)

    expected = {
        "cls_serve": cls.predict(data["q"], verbose=0),
        "cls_adapt_predict": adapted.predict(data["q"], verbose=0),
        "adapted_serve": adapted.predict(data["q"], verbose=0),
    }
    values = wexport.adapt_task_values(cls, data["x"], data["y"], STEPS, **cls_kwargs)
    expected.update({"cls_adapt/" + k: v.numpy() for k, v in values.items()})
    reg_values = wexport.adapt_task_values(reg, data["rx"], data["ry"], STEPS, **reg_kwargs)
    expected.update({"reg_adapt/" + k: v.numpy() for k, v in reg_values.items()})
    reg_adapted = wexport.adapt(reg, data["rx"], data["ry"], STEPS, **reg_kwargs)
    expected["reg_adapt_predict"] = reg_adapted.predict(data["rq"], verbose=0)

    # A process that cannot import warpkeras: a temporary working directory, no PYTHONPATH,
    # and an import hook that refuses it (warpkeras may be installed in the environment).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONNOUSERSITE="1")
    fresh = subprocess.Popen(
        [sys.executable, "-c", FRESH_SCRIPT, str(work)],
        cwd=str(work),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cli = _saved_model_cli()
    cli_proc = None
    if cli:
        cli_proc = subprocess.Popen(
            [cli, "show", "--all", "--dir", str(work / "cls-adaptive")],
            cwd=str(work),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    stdout, stderr = fresh.communicate(timeout=240)
    assert fresh.returncode == 0, f"fresh process failed:\n{stdout}\n{stderr[-4000:]}"
    cli_out = None
    if cli_proc is not None:
        cli_out, cli_err = cli_proc.communicate(timeout=240)
        assert cli_proc.returncode == 0, cli_err[-4000:]
    with open(work / "result.json") as f:
        result = json.load(f)
    outputs = dict(np.load(work / "outputs.npz"))
    return dict(
        result=result,
        outputs=outputs,
        expected=expected,
        cli=cli_out,
        names=list(values),
        cls=cls,
        data=data,
    )


def test_fresh_process_does_not_use_warpkeras(exported):
    result = exported["result"]
    assert result["warpkeras_importable"] is False
    assert result["warpkeras_loaded"] is False
    assert result["signatures"] == ["adapt", "adapt_and_predict", "serving_default"]


def test_signatures_match_in_process_results(exported):
    outputs, expected = exported["outputs"], exported["expected"]
    names = exported["names"]
    assert names == warpkeras.export.task_parameter_names(exported["cls"])
    # Untagged layers (here the batch norm's scale and offset) are task variables.
    assert names == [
        "hidden_kernel",
        "hidden_bias",
        "bn_gamma",
        "bn_beta",
        "head_kernel",
        "head_bias",
    ]
    for key, want in expected.items():
        assert key in outputs, key
        np.testing.assert_allclose(outputs[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(
        outputs["again"], expected["cls_adapt_predict"], rtol=1e-5, atol=1e-6
    )
    # Adaptation did something: the adapted head differs from θ0.
    head = exported["cls"].get_layer("head").kernel.numpy()
    assert np.abs(outputs["cls_adapt/head_kernel"] - head).max() > 1e-4


def test_adapted_model_export_matches(exported):
    np.testing.assert_allclose(
        exported["outputs"]["adapted_serve"],
        exported["expected"]["adapted_serve"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_metadata(exported):
    meta = exported["result"]["metadata"]
    assert meta["default_steps"] == STEPS
    assert meta["max_steps"] == 100
    assert meta["learning_rate"] == pytest.approx(LR)
    assert meta["momentum"] == pytest.approx(MOMENTUM)
    assert meta["label_dtype"] == "int64"
    assert "from_logits=True" in meta["loss"]


@pytest.mark.parametrize(
    "case,message",
    [
        ("feature_size", "`x` must have shape [batch, 6] (rank 2); got shape] [12 5]"),
        ("rank", "`x` must have shape [batch, 6] (rank 2); got shape] [6]"),
        ("lengths", "`x` and `y` must hold the same number of examples; got] [12] [and] [10]"),
        ("negative_steps", "`steps` must be >= 0; got] [-1]"),
        ("too_many_steps", "`steps` must be <= 100"),
        ("labels", "class labels in `y` must lie in [0, 3)"),
        ("empty", "`x` must hold at least one example"),
        ("queries", "`queries` must have shape [batch, 6] (rank 2); got shape] [5 6 1]"),
    ],
)
def test_bad_inputs_raise_readable_errors(exported, case, message):
    kind, text = exported["result"]["errors"][case]
    assert kind == "InvalidArgumentError", (case, kind, text)
    assert message in text, text
    assert "adapt_and_predict:" in text


def test_saved_model_cli_lists_signatures(exported):
    if exported["cli"] is None:
        pytest.skip("saved_model_cli is not installed")
    out = exported["cli"]
    for name in ("serving_default", "adapt", "adapt_and_predict"):
        assert f"signature_def['{name}']" in out
    assert "inputs['steps']" in out and "inputs['queries']" in out


# --- in-process behaviour ---------------------------------------------------------------
def test_zero_steps_returns_theta0_and_adaptation_lowers_loss():
    model = _regressor()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 2)).astype("float32")
    y = (x[:, :1] * 2.0 - x[:, 1:]).astype("float32")
    values = wexport.adapt_task_values(model, x, y, 0, loss="mse", learning_rate=0.1)
    part = warpkeras.partition(model)
    for v, got in zip(part.task_variables, values.values()):
        np.testing.assert_array_equal(v.numpy(), got.numpy())
    before = float(keras.losses.mean_squared_error(y, model(x)).numpy().mean())
    adapted = wexport.adapt(model, x, y, 20, loss="mse", learning_rate=0.1)
    after = float(keras.losses.mean_squared_error(y, adapted(x)).numpy().mean())
    assert after < 0.5 * before
    assert warpkeras.role_of(adapted.layers[1]) == "warp"  # tags survive the copy
    # The warp was not adapted.
    np.testing.assert_array_equal(adapted.layers[1].kernel.numpy(), model.layers[1].kernel.numpy())
    # In place.
    same = wexport.adapt(model, x, y, 20, loss="mse", learning_rate=0.1, copy=False)
    assert same is model
    for a, b in zip(model.get_weights(), adapted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_in_process_bad_inputs_raise():
    model = _regressor()
    x = np.zeros((4, 3), "float32")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`x` must have shape"):
        wexport.adapt(model, x, np.zeros((4, 1), "float32"), 2, loss="mse")


class _Sub(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = keras.layers.Dense(1)

    def call(self, x):
        return self.d(x)


def _subclassed():
    sub = _Sub()
    sub(np.zeros((1, 2), "float32"))
    return sub


# (case, overrides of the good arguments, exception, words the message must contain)
BAD_EXPORT_ARGUMENTS = [
    ("model_type", dict(model="a model"), TypeError, ["model must be a keras.Model"]),
    (
        "model_unbuilt",
        dict(model=lambda: keras.Sequential([keras.layers.Dense(1)])),
        ValueError,
        ["not built", "keras.Input"],
    ),
    ("model_no_input", dict(model=_subclassed), ValueError, ["input_spec"]),
    ("path_type", dict(path=3), TypeError, ["path", "folder path"]),
    ("path_empty", dict(path=""), ValueError, ["path is empty"]),
    ("path_file", dict(path="FILE"), FileExistsError, ["is a file"]),
    ("path_exists", dict(path="EXISTING"), FileExistsError, ["already exists", "overwrite=True"]),
    (
        "path_not_saved_model",
        dict(path="OTHER", overwrite=True),
        FileExistsError,
        ["is not a SavedModel", "refusing"],
    ),
    ("loss_missing", dict(loss=None), ValueError, ["No loss", "loss="]),
    ("loss_unknown", dict(loss="no_such_loss"), ValueError, ["Unknown loss"]),
    ("loss_type", dict(loss=3), TypeError, ["loss must be"]),
    ("from_logits_unsupported", dict(from_logits=True), ValueError, ["does not take from_logits"]),
    ("from_logits_type", dict(from_logits="yes"), TypeError, ["from_logits", "True or False"]),
    ("learning_rate_zero", dict(learning_rate=0.0), ValueError, ["learning_rate", "> 0.0"]),
    ("learning_rate_negative", dict(learning_rate=-0.1), ValueError, ["learning_rate"]),
    (
        "learning_rate_nan",
        dict(learning_rate=float("nan")),
        ValueError,
        ["learning_rate", "finite"],
    ),
    ("learning_rate_string", dict(learning_rate="fast"), TypeError, ["learning_rate"]),
    ("momentum_one", dict(momentum=1.0), ValueError, ["momentum", "< 1.0"]),
    ("momentum_string", dict(momentum="0.9"), TypeError, ["momentum", "not a string"]),
    ("steps_negative", dict(steps=-1), ValueError, ["steps=-1", ">= 0"]),
    ("steps_over_max", dict(steps=20, max_steps=10), ValueError, ["steps=20", "<= 10"]),
    ("steps_string", dict(steps="five"), TypeError, ["steps='five'"]),
    ("steps_bool", dict(steps=True), TypeError, ["steps=True"]),
    ("max_steps_negative", dict(max_steps=-1), ValueError, ["max_steps"]),
    ("max_steps_huge", dict(max_steps=2**40), ValueError, ["max_steps", "2147483647"]),
    ("max_rows_zero", dict(max_rows=0), ValueError, ["max_rows", ">= 1"]),
    ("max_rows_float", dict(max_rows=1.5), TypeError, ["max_rows"]),
    ("max_row_steps_zero", dict(max_row_steps=0), ValueError, ["max_row_steps", ">= 1"]),
    ("training_type", dict(training="True"), TypeError, ["training", "True or False"]),
    ("predict_training_type", dict(predict_training=1), TypeError, ["predict_training"]),
    ("overwrite_type", dict(overwrite="yes"), TypeError, ["overwrite", "True or False"]),
    ("dtype_tolerant_type", dict(dtype_tolerant=None), TypeError, ["dtype_tolerant"]),
    ("untagged_unknown", dict(untagged="tasks"), ValueError, ["untagged", "did you mean"]),
    ("input_spec_type", dict(input_spec="(2,)"), TypeError, ["input_spec"]),
    (
        "input_spec_rank",
        dict(input_spec=tf.TensorSpec([], tf.float32)),
        ValueError,
        ["input_spec", "rank"],
    ),
    ("label_spec_type", dict(label_spec=1), TypeError, ["label_spec"]),
]


@pytest.mark.parametrize(
    "case,overrides,error,words", BAD_EXPORT_ARGUMENTS, ids=[c[0] for c in BAD_EXPORT_ARGUMENTS]
)
def test_export_argument_errors(tmp_path, case, overrides, error, words):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "EXISTING").mkdir()
    (tmp_path / "EXISTING" / "saved_model.pb").write_text("old")
    (tmp_path / "OTHER").mkdir()
    (tmp_path / "OTHER" / "notes.txt").write_text("keep me")
    kwargs = dict(model=_regressor(), path="NEW", loss="mse")
    kwargs.update(overrides)
    if not isinstance(kwargs["model"], (keras.Model, str)):
        kwargs["model"] = kwargs["model"]()  # a builder
    if isinstance(kwargs["path"], str) and kwargs["path"]:
        kwargs["path"] = str(tmp_path / kwargs["path"])
    with pytest.raises(error) as info:
        wexport.export_adaptive(**kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (case, message)
    # Nothing was written or replaced.
    assert not (tmp_path / "NEW").exists()
    assert (tmp_path / "EXISTING" / "saved_model.pb").read_text() == "old"
    assert (tmp_path / "OTHER" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXISTING", "FILE", "OTHER"]


def test_export_overwrite(tmp_path):
    model = _regressor()
    path = tmp_path / "model"
    path.mkdir()
    (path / "saved_model.pb").write_text("an older export")
    (path / "stale.txt").write_text("left over")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        wexport.export_adaptive(model, str(path), loss="mse", steps=3, max_steps=50)
    assert (path / "saved_model.pb").read_text() == "an older export"
    wexport.export_adaptive(
        model, str(path), loss="mse", steps=3, max_steps=50, overwrite=True, dtype_tolerant=False
    )
    assert not (path / "stale.txt").exists()  # replaced as a whole
    assert int(tf.saved_model.load(str(path)).metadata()["default_steps"]) == 3
    # No staging folders are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("from_logits, refused", [(None, False), (True, False), (False, True)])
def test_from_logits_with_the_trainers_loss_object_must_agree_with_it(
    tmp_path, from_logits, refused
):
    """`trainer.export(from_logits=...)` with a loss object: the object's own setting is
    used; a `from_logits` that repeats it is accepted, one that contradicts it is refused
    before anything is written."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    trainer = warpkeras.LeapTrainer(
        model,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        inner_steps=1,
        meta_batch_size=1,
    )
    path = tmp_path / "m"
    kwargs = {} if from_logits is None else {"from_logits": from_logits}
    if refused:
        with pytest.raises(ValueError, match=r"from_logits=False does not describe the loss"):
            trainer.export(str(path), steps=1, **kwargs)
        assert not path.exists()
    else:
        trainer.export(str(path), steps=1, **kwargs)
        meta = wexport.read_metadata(str(path))
        # class ids, as the sparse cross-entropy takes them
        assert (meta["label_dtype"], meta["label_shape"]) == ("int64", "[None]")
