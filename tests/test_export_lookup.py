"""Models with lookup layers (`StringLookup`, `IntegerLookup`) export and serve.

Their vocabularies live in lookup tables, resources that are not variables; the export
tracks them as Keras's own `model.export` does. A fresh process without warpkeras loads
the SavedModels written by `trainer.export` and `export_adaptive` and runs
``serving_default``, ``adapt``, ``adapt_and_predict`` and the Python-client functions;
the answers equal Keras's `model.predict` and warpkeras's in-process `adapt`.
"""

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
LOSS = dict(loss="sparse_categorical_crossentropy", from_logits=True, learning_rate=0.1)
STEPS = 3
VOCAB = {"string": ["red", "green", "blue", "grey"], "int64": [3, 17, 42, 99]}


def _model(kind):
    keras.utils.set_random_seed(11)
    inp = keras.Input((3,), dtype=kind, name="tokens")
    lookup = (
        L.StringLookup(vocabulary=VOCAB[kind], name="lookup")
        if kind == "string"
        else L.IntegerLookup(vocabulary=VOCAB[kind], name="lookup")
    )
    h = L.Embedding(len(VOCAB[kind]) + 1, 4, name="embed")(lookup(inp))
    h = L.Flatten()(h)
    h = warpkeras.warp(L.Dense(6, activation="tanh", name="warp"))(h)
    return keras.Model(inp, L.Dense(3, name="head")(h), name=f"{kind}_lookup")


def _data(kind, n, seed):
    rng = np.random.default_rng(seed)
    # Out-of-vocabulary tokens too: they map to the OOV index in and out of the export.
    tokens = VOCAB[kind] + (["purple"] if kind == "string" else [7])
    x = np.array(tokens, dtype=object if kind == "string" else "int64")[
        rng.integers(0, len(tokens), size=(n, 3))
    ]
    if kind == "string":
        x = x.astype(str)
    return x, (np.arange(n) % 3).astype("int64")


CLIENT = NO_WARPKERAS + textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    work = sys.argv[1]
    data = np.load(work + "/data.npz")
    out = {}
    for name in sys.argv[2:]:
        kind = name.split("-")[0]
        served = tf.saved_model.load(f"{work}/{name}")
        x, y, q = (tf.constant(data[f"{kind}_{k}"]) for k in ("x", "y", "q"))
        steps = tf.constant(STEPS)
        out[f"{name}/serve"] = served.signatures["serving_default"](x=q)["predictions"]
        out[f"{name}/predict"] = served.predict(q)["predictions"]
        out[f"{name}/adapt_and_predict"] = served.signatures["adapt_and_predict"](
            x=x, y=y, steps=steps, queries=q)["predictions"]
        for k, v in served.signatures["adapt"](x=x, y=y, steps=steps).items():
            out[f"{name}/adapt/{k}"] = v
        for k, v in served.adapt(x, y, steps).items():
            out[f"{name}/adapt_fn/{k}"] = v
    out["warpkeras_loaded"] = np.array("warpkeras" in sys.modules)
    np.savez(work + "/served.npz", **{k: np.asarray(v) for k, v in out.items()})
    """
).replace("STEPS", str(STEPS))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("lookup")
    expected, data, names = {}, {}, []
    for kind in ("string", "int64"):
        model = _model(kind)
        x, y = _data(kind, 12, 0)
        xt, yt = _data(kind, 8, 1)
        q, _ = _data(kind, 5, 2)
        data.update({f"{kind}_x": x, f"{kind}_y": y, f"{kind}_q": q})
        # Meta-train one step, then export through the trainer and directly.
        trainer = warpkeras.WarpTrainer(
            model,
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            mode="online",
            init_objective="leap",
            inner_steps=2,
            inner_learning_rate=LOSS["learning_rate"],
            meta_batch_size=1,
        )
        trainer.fit(warpkeras.Task((x, y), test=(xt, yt)), meta_steps=1, verbose=0)
        trainer.export(str(work / f"{kind}-trainer"), steps=STEPS, from_logits=True)
        wexport.export_adaptive(model, str(work / f"{kind}-direct"), steps=STEPS, **LOSS)
        adapted = wexport.adapt(model, x, y, STEPS, **LOSS)
        values = wexport.adapt_task_values(model, x, y, STEPS, **LOSS)
        for name in (f"{kind}-trainer", f"{kind}-direct"):
            names.append(name)
            expected[f"{name}/serve"] = model.predict(tf.constant(q), verbose=0)
            expected[f"{name}/adapt_and_predict"] = adapted.predict(tf.constant(q), verbose=0)
            expected[f"{name}/adapt"] = {k: v.numpy() for k, v in values.items()}
    np.savez(work / "data.npz", **data)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONNOUSERSITE="1")
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(work)] + names,
        cwd=str(work),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return dict(np.load(work / "served.npz")), expected, names


def test_served_without_warpkeras(served):
    got, _, _ = served
    assert not bool(got["warpkeras_loaded"])


@pytest.mark.parametrize("kind", ["string", "int64"])
@pytest.mark.parametrize("how", ["trainer", "direct"])
def test_lookup_model_serves_as_in_process(served, kind, how):
    got, expected, _ = served
    name = f"{kind}-{how}"
    want = expected[f"{name}/serve"]
    np.testing.assert_allclose(got[f"{name}/serve"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[f"{name}/predict"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        got[f"{name}/adapt_and_predict"],
        expected[f"{name}/adapt_and_predict"],
        rtol=1e-5,
        atol=1e-6,
    )
    # Adaptation moves the parameters (the check can fail).
    assert np.abs(got[f"{name}/adapt_and_predict"] - want).max() > 1e-4
    for param, value in expected[f"{name}/adapt"].items():
        np.testing.assert_allclose(got[f"{name}/adapt/{param}"], value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[f"{name}/adapt_fn/{param}"], value, rtol=1e-5, atol=1e-6)


def test_adapted_vocabulary_exports_and_adapts(tmp_path):
    """A vocabulary learnt by ``TextVectorization.adapt`` (in no config) is served, and kept
    by the adapted copy that `warpkeras.adapt` returns."""
    keras.utils.set_random_seed(12)
    text = L.TextVectorization(max_tokens=20, output_sequence_length=4)
    text.adapt(["the cat sat", "a dog ran far away", "the dog", "a cat"])
    inp = keras.Input((1,), dtype="string")
    h = L.Flatten()(L.Embedding(20, 4)(text(inp)))
    h = warpkeras.warp(L.Dense(4, activation="tanh"))(h)
    model = keras.Model(inp, L.Dense(3)(h))
    x = tf.constant([["the cat"], ["dog ran"], ["a dog"], ["far away cat"]])
    y = tf.constant([0, 1, 2, 1], tf.int64)
    path = str(tmp_path / "text")
    wexport.export_adaptive(model, path, steps=STEPS, dtype_tolerant=False, **LOSS)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(
        served.signatures["serving_default"](x=x)["predictions"],
        model.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    adapted = wexport.adapt(model, x, y, STEPS, **LOSS)
    assert adapted.layers[1].get_vocabulary() == text.get_vocabulary()
    got = served.signatures["adapt_and_predict"](x=x, y=y, steps=tf.constant(STEPS), queries=x)[
        "predictions"
    ].numpy()
    np.testing.assert_allclose(got, adapted.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert np.abs(got - model.predict(x, verbose=0)).max() > 1e-4


def test_tracking_the_tables_saves_no_optimizer_slots(tmp_path):
    """Only the model's variables and tables are saved: a compiled model's optimiser
    slots stay out of the SavedModel."""
    model = _model("string")
    model.compile(
        keras.optimizers.Adam(), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = _data("string", 12, 0)
    model.fit(tf.constant(x), y, verbose=0)
    path = str(tmp_path / "compiled")
    wexport.export_adaptive(model, path, dtype_tolerant=False, **LOSS)
    saved = tf.train.list_variables(path + "/variables/variables")
    numbers = sum(
        int(np.prod(shape))
        for name, shape in saved
        if name.endswith("VARIABLE_VALUE") and "table" not in name.lower()
    )
    assert numbers == sum(int(np.prod(v.shape)) for v in model.variables), saved
