"""Conformance: every meta-learner on every kind of model Keras itself trains.

One table of model kinds (`KINDS`), one of meta-learners (`LEARNERS`, `KERAS_LEARNERS`), and
the operations that users run on them. Each cell checks a property that fails when the
library computes something wrong; a cell that cannot be supported must be refused with an
error naming the reason.

Model kinds (tiny: a few units, 3 classes, 12 examples per task): a Sequential model; a
functional model with two inputs (image + vector) and one with dict inputs; a subclassed
model; a Sequential block (holding the warp layer) nested in a functional model; stock
`BatchNormalization`; stock `LayerNormalization` + `GroupNormalization`; `Dropout`;
`LSTM` + `GRU`; kernel and activity regularisers; a layer applied twice (tied weights);
float64; ``mixed_float16`` and ``mixed_bfloat16``. Each kind is built once per module and
reset to its initial values before every cell.

Covering design (cells × property):

* ``test_fit`` — every kind × every `MetaTrainer` learner (WarpTrainer online / offline /
  continual × exact / approx, Warp-MAML, LeapTrainer, MAMLTrainer first and second order,
  ReptileTrainer, FineTuneTrainer, NoMetaTrainer): one meta step runs, its logs are finite,
  the variables the learner meta-learns change and nothing else does (warp variables under
  initialisation-only learners, everything under `NoMetaTrainer`, frozen variables always).
  These cells run the step functions eagerly (the same Python code as the compiled
  functions, without minutes of tracing); the compiled path is covered per kind below.
* ``test_keras_fit`` — every kind × the `WarpGrad` optimizer in ``model.fit`` and
  `LeapCallback` (with `WarpGrad`): the warp variables, resp. the initialisation, move.
* ``test_exact_objectives_match_finite_differences`` — every kind that has a float64
  version (all but the mixed-precision kinds, whose float16 arithmetic is not exact by
  construction) × {exact warp objective (WarpGrad Eq. 3), second-order MAML}: the gradient
  agrees with central finite differences in float64 along random directions to 1e-6.
* ``test_evaluate_and_adapt`` — every kind, compiled, with Warp-Leap (online, exact):
  `evaluate`'s final test loss equals the loss recomputed from `adapt`'s parameters.
* ``test_served_prediction_equals_evaluate`` — every kind: `trainer.export` and a fresh
  process that imports only TensorFlow (one process serves every kind) runs
  ``adapt_and_predict``; its test loss equals `trainer.evaluate`'s. Dropout adapts with
  random masks, so its served values can only be checked to run and be finite.
* ``test_resume`` — every kind: a run interrupted after one meta step and resumed from its
  checkpoint ends with exactly the variables of the uninterrupted run.
* ``test_fit_compiled`` — the multi-input, batch-norm and dropout kinds × Warp-MAML, MAML
  and offline WarpGrad through the compiled step functions.
* Single properties: dropout masks are fresh in every forward pass (steps, tasks, meta
  steps), reproducible from the seed and independent of the executor; a float64 model
  keeps α = 0.3 (and the continual weights) exact in adaptation and export; stock
  normalisation layers give exact Hessian-vector products; exact objectives refuse, at
  construction and by name, layers whose second derivatives are deliberately inexact
  (`BatchNormalization(renorm=True)`, `SpectralNormalization`).

Multi-input models export with one signature argument per input (``x_image``,
``x_vector``, ``queries_image``, ...); their served predictions are checked like every
other kind's.
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
from warpkeras import objectives as obj

L = keras.layers
N_IN, N_OUT, N_TRAIN, N_TEST = 4, 3, 12, 6
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# --- model kinds ------------------------------------------------------------------------
def _trunk(h, dtype=None):
    h = L.Dense(4, activation="tanh", dtype=dtype, name="body")(h)
    h = warpkeras.warp(L.Dense(4, activation="tanh", dtype=dtype, name="warp"))(h)
    head_dtype = "float32" if dtype and dtype.startswith("mixed") else dtype
    return L.Dense(N_OUT, dtype=head_dtype, name="head")(h)


def _sequential():
    frozen = L.Dense(N_IN, name="frozen")
    frozen.trainable = False
    return keras.Sequential(
        [
            keras.Input((N_IN,)),
            frozen,
            L.Dense(4, activation="tanh"),
            warpkeras.warp(L.Dense(4, activation="tanh")),
            L.Dense(N_OUT),
        ]
    )


def _two_inputs():
    img, vec = keras.Input((3, 3, 1), name="image"), keras.Input((2,), name="vector")
    return keras.Model([img, vec], _trunk(L.Concatenate()([L.Flatten()(img), vec])))


def _dict_inputs():
    img, vec = keras.Input((3, 3, 1), name="image"), keras.Input((2,), name="vector")
    return keras.Model(
        {"image": img, "vector": vec}, _trunk(L.Concatenate()([L.Flatten()(img), vec]))
    )


class SubclassedModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.body = L.Dense(4, activation="tanh")
        self.warp = warpkeras.warp(L.Dense(4, activation="tanh"))
        self.head = L.Dense(N_OUT)

    def call(self, x):
        return self.head(self.warp(self.body(x)))


def _subclassed():
    model = SubclassedModel()
    model(np.zeros((1, N_IN), keras.config.floatx()))
    return model


def _nested():
    inp = keras.Input((N_IN,))
    block = keras.Sequential(
        [L.Dense(4, activation="tanh"), warpkeras.warp(L.Dense(4, activation="tanh"))], name="block"
    )
    return keras.Model(inp, L.Dense(N_OUT)(block(inp)))


def _batchnorm():
    inp = keras.Input((N_IN,))
    h = L.Activation("tanh")(L.BatchNormalization()(L.Dense(4)(inp)))
    return keras.Model(inp, _trunk(h))


def _layer_group_norm():
    inp = keras.Input((N_IN,))
    h = L.LayerNormalization()(L.Dense(4, activation="tanh")(inp))
    h = L.GroupNormalization(groups=2)(L.Dense(4)(h))
    return keras.Model(inp, _trunk(h))


def _dropout():
    inp = keras.Input((N_IN,))
    h = L.Dropout(0.5, seed=3)(L.Dense(4, activation="tanh")(inp))
    return keras.Model(inp, _trunk(h))


def _recurrent():
    inp = keras.Input((3, 2))
    h = L.GRU(3, unroll=True)(L.LSTM(3, return_sequences=True, unroll=True)(inp))
    return keras.Model(inp, _trunk(h))


def _regularised():
    inp = keras.Input((N_IN,))
    h = L.Dense(
        4,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(0.1),
        activity_regularizer=keras.regularizers.L2(0.05),
    )(inp)
    h = warpkeras.warp(
        L.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1))
    )(h)
    return keras.Model(inp, L.Dense(N_OUT)(h))


def _tied():
    inp = keras.Input((N_IN,))
    shared = L.Dense(N_IN, activation="tanh", name="shared")
    return keras.Model(inp, _trunk(shared(shared(inp))))


def _float64():
    inp = keras.Input((N_IN,), dtype="float64")
    return keras.Model(inp, _trunk(inp, "float64"))


def _mixed(policy):
    def build():
        inp = keras.Input((N_IN,))
        return keras.Model(inp, _trunk(inp, policy))

    return build


KINDS = {
    "sequential": _sequential,
    "two_inputs": _two_inputs,
    "dict_inputs": _dict_inputs,
    "subclassed": _subclassed,
    "nested": _nested,
    "batchnorm": _batchnorm,
    "layer_group_norm": _layer_group_norm,
    "dropout": _dropout,
    "recurrent": _recurrent,
    "regularised": _regularised,
    "tied": _tied,
    "float64": _float64,
    "mixed_float16": _mixed("mixed_float16"),
    "mixed_bfloat16": _mixed("mixed_bfloat16"),
}
MIXED = ("mixed_float16", "mixed_bfloat16")
MULTI_INPUT = ("two_inputs", "dict_inputs")


def _inputs(kind, n, rng, dtype="float32"):
    if kind in MULTI_INPUT:
        img = rng.normal(size=(n, 3, 3, 1)).astype(dtype)
        vec = rng.normal(size=(n, 2)).astype(dtype)
        return (img, vec) if kind == "two_inputs" else {"image": img, "vector": vec}
    if kind == "recurrent":
        return rng.normal(size=(n, 3, 2)).astype(dtype)
    return rng.normal(size=(n, N_IN)).astype("float64" if kind == "float64" else dtype)


def _task(kind, seed, batch_size=6, dtype="float32"):
    rng = np.random.default_rng(seed)
    x, xt = _inputs(kind, N_TRAIN, rng, dtype), _inputs(kind, N_TEST, rng, dtype)
    return warpkeras.Task(
        train=(x, rng.integers(0, N_OUT, N_TRAIN)),
        test=(xt, rng.integers(0, N_OUT, N_TEST)),
        batch_size=batch_size,
        name=f"{kind}-{seed}",
    )


_BUILT = {}


def _model(kind):
    """The module's model of this kind, reset to its initial values."""
    if kind not in _BUILT:
        keras.utils.set_random_seed(7)
        model = KINDS[kind]()
        _BUILT[kind] = (model, [np.array(v) for v in model.variables])
    model, values = _BUILT[kind]
    for v, value in zip(model.variables, values):
        v.assign(value)
    return model


def _tasks(kind, batch_size=6):
    return [_task(kind, s, batch_size) for s in range(3)]


@pytest.fixture
def eager():
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


def _snapshot(variables):
    return [np.array(v) for v in variables]


def _changed(before, variables):
    return any(not np.array_equal(b, np.array(v)) for b, v in zip(before, variables))


# --- meta-learners ------------------------------------------------------------------------
KW = dict(inner_steps=2, meta_batch_size=2, inner_learning_rate=0.1, seed=3)

LEARNERS = {
    # name: (constructor, variable groups it may change)
    "warp_online_exact": (
        lambda m: warpkeras.WarpTrainer(m, LOSS, mode="online", objective="exact", **KW),
        {"task", "warp"},
    ),
    "warp_online_approx": (
        lambda m: warpkeras.WarpTrainer(m, LOSS, mode="online", objective="approx", **KW),
        {"task", "warp"},
    ),
    "warp_offline_exact": (
        lambda m: warpkeras.WarpTrainer(m, LOSS, mode="offline", objective="exact", **KW),
        {"task", "warp"},
    ),
    "warp_offline_approx": (
        lambda m: warpkeras.WarpTrainer(m, LOSS, mode="offline", objective="approx", **KW),
        {"task", "warp"},
    ),
    "warp_continual_exact": (
        lambda m: warpkeras.WarpTrainer(
            m, LOSS, mode="continual", objective="exact", init_objective=None, **KW
        ),
        {"task", "warp"},
    ),
    "warp_continual_approx": (
        lambda m: warpkeras.WarpTrainer(
            m, LOSS, mode="continual", objective="approx", init_objective=None, **KW
        ),
        {"task", "warp"},
    ),
    "warp_maml": (
        lambda m: warpkeras.WarpTrainer(m, LOSS, mode="online", init_objective="maml", **KW),
        {"task", "warp"},
    ),
    "leap": (lambda m: warpkeras.LeapTrainer(m, LOSS, **KW), {"task"}),
    "maml": (lambda m: warpkeras.MAMLTrainer(m, LOSS, **KW), {"task"}),
    "fomaml": (lambda m: warpkeras.MAMLTrainer(m, LOSS, first_order=True, **KW), {"task"}),
    "reptile": (lambda m: warpkeras.ReptileTrainer(m, LOSS, **KW), {"task"}),
    "finetune": (lambda m: warpkeras.FineTuneTrainer(m, LOSS, multi_headed=False, **KW), {"task"}),
    "nometa": (lambda m: warpkeras.NoMetaTrainer(m, LOSS, **KW), set()),
}


def _groups(model):
    p = warpkeras.partition(model)
    fixed = [
        v
        for v in model.non_trainable_variables
        if "moving_" not in v.path and "seed_generator" not in v.path
    ]
    return {
        "task": p.task_variables,
        "warp": p.warp_variables,
        "frozen": p.frozen_variables + fixed,
    }


@pytest.mark.parametrize("learner", list(LEARNERS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_fit(kind, learner, eager):
    model = _model(kind)
    make, may_change = LEARNERS[learner]
    trainer = make(model)
    groups = _groups(model)
    before = {k: _snapshot(v) for k, v in groups.items()}
    history = trainer.fit(_tasks(kind), meta_steps=1, verbose=0)
    for key, values in history.history.items():
        assert np.all(np.isfinite(values)), (key, values)
    for key, variables in groups.items():
        changed = _changed(before[key], variables)
        if key in may_change:
            assert changed, f"{learner} left the {key} variables unchanged"
        else:
            assert not changed, f"{learner} changed the {key} variables"


COMPILED_FIT = [
    (k, trainer)
    for k in MULTI_INPUT + ("batchnorm", "dropout")
    for trainer in ("warp_maml", "maml", "warp_offline_exact")
]


@pytest.mark.parametrize("kind,learner", COMPILED_FIT)
def test_fit_compiled(kind, learner):
    """Structured inputs and model state through the compiled step functions."""
    model = _model(kind)
    before = _snapshot(model.trainable_variables)
    history = LEARNERS[learner][0](model).fit(_tasks(kind), meta_steps=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert _changed(before, model.trainable_variables)


# --- Keras' own fit: the WarpGrad optimizer and LeapCallback -------------------------------
KERAS_LEARNERS = ("warpgrad", "leap_callback")


def _keras_data(kind):
    task = _task(kind, 0)
    return task.train


@pytest.mark.parametrize("learner", KERAS_LEARNERS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_keras_fit(kind, learner):
    model = _model(kind)
    groups = _groups(model)
    before = {k: _snapshot(v) for k, v in groups.items()}
    optimizer = warpkeras.WarpGrad(
        inner_optimizer=keras.optimizers.SGD(0.1),
        meta_optimizer=keras.optimizers.SGD(0.1),
        meta_interval=2,
        model=model,
    )
    model.compile(optimizer=optimizer, loss=LOSS, run_eagerly=kind != "sequential")
    x, y = _keras_data(kind)
    callbacks = []
    if learner == "leap_callback":
        leap = warpkeras.LeapCallback(meta_optimizer=keras.optimizers.SGD(0.1))
        callbacks.append(leap)
    history = model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    assert np.all(np.isfinite(history.history["loss"]))
    assert _changed(before["warp"], groups["warp"])
    assert _changed(before["task"], groups["task"])
    assert not _changed(before["frozen"], groups["frozen"])
    if learner == "leap_callback":
        assert leap.path_lengths and np.all(np.isfinite(leap.path_lengths))


# --- exactness: finite differences in float64 ---------------------------------------------
FD_KINDS = [k for k in KINDS if k not in MIXED]


def _directional_check(f, grads, params, seed, h=1e-5, rtol=1e-6):
    rng = np.random.default_rng(seed)
    params = [np.array(p) for p in params]
    for _ in range(2):
        d = [rng.normal(size=p.shape) for p in params]
        plus = float(f([tf.constant(p + h * e) for p, e in zip(params, d)]))
        minus = float(f([tf.constant(p - h * e) for p, e in zip(params, d)]))
        numeric = (plus - minus) / (2 * h)
        analytic = sum(float(np.sum(np.array(g) * e)) for g, e in zip(grads, d))
        assert abs(numeric - analytic) <= rtol * max(1.0, abs(analytic)), (numeric, analytic)


@pytest.mark.parametrize("objective", ["warp_exact", "maml_second_order"])
@pytest.mark.parametrize("kind", FD_KINDS)
def test_exact_objectives_match_finite_differences(kind, objective, float64):
    keras.utils.set_random_seed(5)
    model = KINDS[kind]()
    p = warpkeras.partition(model)
    rng = np.random.default_rng(1)
    batch = lambda n: (_inputs(kind, n, rng, "float64"), rng.integers(0, N_OUT, n))  # noqa: E731
    task_batch, meta_batch = batch(5), batch(5)
    theta, phi, state = p.initial_task_values(), p.warp_values(), p.state_values()
    lr = 0.4
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    if objective == "warp_exact":
        _, grads, _ = obj.warp_meta_gradient(
            p, loss, theta, phi, task_batch, meta_batch, lr, state=state, exact=True
        )

        def warp_loss(ph):
            return obj.warp_objective(
                p, loss, theta, ph, task_batch, meta_batch, lr, state=state, exact=True
            )

        _directional_check(warp_loss, grads, phi, seed=2)
    else:
        _, grads, _ = obj.maml_meta_gradient(
            p, loss, theta, phi, task_batch, meta_batch, lr, 2, state=state
        )

        def maml_loss(th):
            return obj.maml_objective(p, loss, th, phi, task_batch, meta_batch, lr, 2, state=state)[
                0
            ]

        _directional_check(maml_loss, grads, theta, seed=2)


def test_stock_batch_statistics_are_exact_to_second_order(float64):
    """Hessian-vector products through stock BatchNormalization / LayerNormalization in
    training mode equal those of the same function written out by hand."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(6, 3)))
    v = tf.constant(rng.normal(size=(6, 3)))
    w = tf.constant(rng.normal(size=(6, 3)))
    for layer, axes in (
        (L.BatchNormalization(epsilon=1e-3), 0),
        (L.LayerNormalization(epsilon=1e-3), 1),
    ):
        model = keras.Sequential([keras.Input((3,)), layer])
        p = warpkeras.partition(model)

        def by_layer(x, p=p):
            return p.call(p.initial_task_values(), [], x, training=True)[0]

        def by_hand(x, axes=axes):
            mean = tf.reduce_mean(x, axes, keepdims=True)
            var = tf.reduce_mean(tf.square(x - mean), axes, keepdims=True)
            return (x - mean) / tf.sqrt(var + 1e-3)

        def hvp(fn):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    out = tf.reduce_sum(tf.sin(fn(x)) * w)
                g = inner.gradient(out, x)
                gv = tf.reduce_sum(g * v)
            return outer.gradient(gv, x)

        np.testing.assert_allclose(hvp(by_layer), hvp(by_hand), rtol=1e-9, atol=1e-12)


# --- evaluate, adapt and export (compiled; one fresh process serves every kind) ----------
def _representative(model, **kwargs):
    return warpkeras.WarpTrainer(
        model, LOSS, mode="online", objective="exact", init_objective="leap", **{**KW, **kwargs}
    )


SERVE_SCRIPT = NO_WARPKERAS + textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    work = sys.argv[1]
    kinds = json.load(open(work + "/kinds.json"))
    out = {}
    for kind in kinds:
        # The signature's arguments by name: x, y, steps, queries (x_<input>,
        # queries_<input> for a model with several inputs).
        request = {k: tf.constant(v) for k, v in np.load(f"{work}/{kind}.npz").items()}
        served = tf.saved_model.load(f"{work}/{kind}")
        pred = served.signatures["adapt_and_predict"](**request)
        out[kind] = pred["predictions"].numpy()
    np.savez(work + "/outputs.npz", **out)
    """
)

EXPORT_STEPS = 2


def _loss_with_penalties(partition, theta, x, y, training):
    """The task loss of the model at θ on (x, y): the loss plus the layers' penalties."""
    state = [tf.convert_to_tensor(v) for v in partition.state_values()]
    pred, _, penalties = partition.call(
        theta, partition.warp_values(), x, state=state, training=training, return_losses=True
    )
    loss = float(LOSS(y, pred))
    return loss + sum(float(p) for p in penalties), np.array(pred)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Per kind, with compiled step functions: one meta step of Warp-Leap, `evaluate` and
    `adapt` on a task whose batches are the whole support set, and `trainer.export`; then
    one fresh process that imports only TensorFlow serves every exported model."""
    work = tmp_path_factory.mktemp("conformance-export")
    results, exported = {}, []
    for kind in KINDS:
        model = _model(kind)
        trainer = _representative(model)
        tf.config.run_functions_eagerly(True)  # compiled meta steps: `test_fit_compiled`
        try:
            trainer.fit(_tasks(kind), meta_steps=1, verbose=0)
        finally:
            tf.config.run_functions_eagerly(False)
        task = _task(kind, 0, batch_size=N_TRAIN)  # full batches: the served support set
        report = trainer.evaluate([task], steps=EXPORT_STEPS, verbose=0)
        theta, curves = trainer.adapt(task, steps=EXPORT_STEPS, seed=0)
        x, y = task.test
        loss, pred = _loss_with_penalties(
            trainer.partition, theta, x, y, trainer.eval_training_mode
        )
        result = results[kind] = dict(report=report, curves=curves, loss=loss, pred=pred, labels=y)
        kwargs = {"input_spec": (N_IN,)} if kind == "subclassed" else {}
        if kind in MULTI_INPUT:  # served through the signature only: skip the Python-
            kwargs["dtype_tolerant"] = False  # client functions' many dtype traces
        try:
            trainer.export(str(work / kind), steps=EXPORT_STEPS, **kwargs)
        except ValueError as err:
            result["refused"] = str(err)
            continue
        (sx, sy) = task.train
        request = dict(y=sy.astype("int64"), steps=np.int32(EXPORT_STEPS))
        if kind in MULTI_INPUT:
            for role, value in (("x", sx), ("queries", x)):
                img, vec = value if kind == "two_inputs" else (value["image"], value["vector"])
                request.update({f"{role}_image": img, f"{role}_vector": vec})
        else:
            request.update(x=sx, queries=x)
        np.savez(work / f"{kind}.npz", **request)
        exported.append(kind)
    with open(work / "kinds.json", "w") as f:
        json.dump(exported, f)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONNOUSERSITE="1")
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(work)],
        cwd=str(work),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for kind, pred in np.load(work / "outputs.npz").items():
        results[kind]["served"] = pred
    return results


def _rtol(kind):
    return 2e-2 if kind in MIXED else 1e-5


@pytest.mark.parametrize("kind", list(KINDS))
def test_evaluate_and_adapt(kind, compiled):
    result = compiled[kind]
    report, curves = result["report"], result["curves"]
    assert report["final_test_loss"]["values"] == [curves["test_loss"][-1]]
    if kind == "dropout":
        return  # evaluation in training mode draws random masks: no replay
    # The reported loss is the task loss of the adapted parameters on the test data.
    assert result["loss"] == pytest.approx(curves["test_loss"][-1], rel=_rtol(kind))


@pytest.mark.parametrize("kind", list(KINDS))
def test_served_prediction_equals_evaluate(kind, compiled):
    result = compiled[kind]
    assert "refused" not in result, result.get("refused")  # every kind exports
    served = result["served"]
    assert np.all(np.isfinite(served))
    if kind == "dropout":
        return  # adaptation draws random masks: the served run cannot replay evaluate's
    np.testing.assert_allclose(served, result["pred"], rtol=_rtol(kind), atol=_rtol(kind))


# --- resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_resume(kind, tmp_path, eager):
    tasks = _tasks(kind)
    model = _model(kind)
    _representative(model).fit(tasks, meta_steps=2, verbose=0)
    straight = _snapshot(model.trainable_variables)
    model = _model(kind)
    _representative(model).fit(tasks, meta_steps=1, verbose=0, checkpoint_dir=str(tmp_path))
    model = _model(kind)  # a fresh start: everything must come from the checkpoint
    _representative(model).fit(tasks, meta_steps=2, verbose=0, checkpoint_dir=str(tmp_path))
    for a, b in zip(straight, model.trainable_variables):
        np.testing.assert_array_equal(a, np.array(b))


# --- randomness ---------------------------------------------------------------------------
def _dropout_losses(seed):
    inp = keras.Input((N_IN,))
    init = keras.initializers.RandomNormal(seed=11)
    h = L.Dropout(0.5, seed=3)(L.Dense(8, kernel_initializer=init)(inp))
    model = keras.Model(inp, warpkeras.warp(L.Dense(N_OUT, kernel_initializer=init))(h))
    x = np.ones((N_TRAIN, N_IN), "float32")
    y = np.arange(N_TRAIN) % N_OUT
    tasks = [warpkeras.Task(train=(x, y), batch_size=6, name=f"t{i}") for i in range(2)]
    trainer = warpkeras.WarpTrainer(
        model,
        LOSS,
        mode="online",
        init_objective="leap",
        inner_steps=3,
        meta_batch_size=2,
        inner_learning_rate=1e-12,
        seed=seed,
    )
    losses = []
    adapt_group = trainer._adapt_group

    def spy(*args, **kwargs):
        result = adapt_group(*args, **kwargs)
        losses.append(np.array(result["losses"]))
        return result

    trainer._adapt_group = spy
    trainer.fit(tasks, meta_steps=3, verbose=0)
    return np.concatenate(losses).reshape(3, 2, 3)  # [meta step, task, step]


def test_dropout_masks_are_fresh_in_every_pass_and_reproducible(eager):
    first = _dropout_losses(seed=0)
    # Same input, same (unchanging) parameters: only the masks differ from pass to pass.
    assert len(np.unique(first)) == first.size, first
    np.testing.assert_array_equal(first, _dropout_losses(seed=0))
    assert not np.array_equal(first, _dropout_losses(seed=1))


# --- float64 learning rates ---------------------------------------------------------------
def test_float64_learning_rate_is_not_rounded_through_float32(float64, tmp_path):
    alpha = 0.3
    theta, g = tf.constant([1.0], tf.float64), tf.constant([1.0], tf.float64)
    new, _ = obj.sgd_update([theta], [g], alpha)
    assert float(new[0][0]) == 1.0 - 0.3
    new, _ = obj.sgd_update([theta], [g], alpha, momentum=0.9)
    assert float(new[0][0]) == 1.0 - 0.3

    # One adaptation step of a linear least-squares model, by hand in float64.
    model = keras.Sequential([keras.Input((2,)), L.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign(np.array([[0.5], [-0.25]]))
    x = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    y = np.array([[1.0], [0.0], [2.0]])
    w0 = np.array([[0.5], [-0.25]])
    w1 = w0 - alpha * (2.0 / len(x)) * x.T @ (x @ w0 - y)
    trainer = warpkeras.NoMetaTrainer(model, "mse", inner_learning_rate=alpha, inner_steps=1)
    theta, _ = trainer.adapt(warpkeras.Task(train=(x, y), batch_size=3), steps=1)
    # float32's 0.3 would be off by 4e-8 relative; float64 round-off is ~1e-16.
    np.testing.assert_allclose(np.array(theta[0]), w1, rtol=1e-13)
    values = wexport.adapt_task_values(model, x, y, 1, loss="mse", learning_rate=alpha)
    np.testing.assert_allclose(np.array(list(values.values())[0]), w1, rtol=1e-13)


# --- layers whose second derivatives are deliberately inexact are refused ------------------
@pytest.mark.parametrize("layer", ["renorm", "spectral"])
def test_exact_objectives_refuse_layers_with_inexact_second_derivatives(layer):
    inp = keras.Input((N_IN,))
    if layer == "renorm":
        h = L.BatchNormalization(renorm=True, name="bn_renorm")(L.Dense(4)(inp))
    else:
        h = L.SpectralNormalization(L.Dense(4), name="spectral")(inp)
    model = keras.Model(inp, _trunk(h))
    name = "bn_renorm" if layer == "renorm" else "spectral"
    with pytest.raises(warpkeras.MetaTrainingError, match=f"'{name}'.*(ExactBatch|Remove)"):
        warpkeras.MAMLTrainer(model, LOSS, **KW)
    with pytest.raises(warpkeras.MetaTrainingError, match=f"warp_objective='exact'.*'{name}'"):
        warpkeras.WarpTrainer(model, LOSS, mode="online", objective="exact", **KW)
    # First-order objectives do not differentiate twice: accepted.
    warpkeras.WarpTrainer(model, LOSS, mode="online", objective="approx", **KW)
    warpkeras.MAMLTrainer(model, LOSS, first_order=True, **KW)


def test_float64_continual_weights_are_not_rounded_through_float32(float64):
    model = keras.Sequential([keras.Input((2,)), L.Dense(1)])
    p = warpkeras.partition(model)
    batch = (np.ones((3, 2)), np.zeros((3, 1)))
    mse = keras.losses.MeanSquaredError(dtype="float64")
    loss, _ = obj.task_loss(p, mse, p.initial_task_values(), [], batch)
    # One sub-task seen over 6 steps: weight 1/6, which float32 would round by 1e-8.
    total = obj.continual_objective(p, mse, p.initial_task_values(), [], [batch], 1, 1, 6)
    np.testing.assert_allclose(float(total), float(loss) / 6, rtol=1e-15)


def test_dropout_masks_do_not_depend_on_how_tasks_are_batched(eager):
    """Masks derive from (seed, meta step, task, step), not from the executor."""
    losses = []
    for parallel in ("sequential", "unrolled"):
        model = _model("dropout")
        trainer = warpkeras.WarpTrainer(model, LOSS, mode="online", parallel=parallel, **KW)
        losses.append(trainer.fit(_tasks("dropout"), meta_steps=2, verbose=0).history["loss"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
