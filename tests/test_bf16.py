"""bfloat16: hardware detection and its fallback, and meta-training a model built under
Keras's ``mixed_bfloat16`` policy (float32 masters, bfloat16 layer compute)."""

import warnings

import keras
import numpy as np
import pytest

import warpkeras
from warpkeras import precision

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

ZEN4 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n"
    "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
)
SAPPHIRE_RAPIDS = "flags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"


@pytest.fixture
def cpu(monkeypatch):
    """Pretends to be an x86-64 machine without GPUs whose /proc/cpuinfo is the text
    given to the returned setter (None: no /proc/cpuinfo) and whose oneDNN switch is on."""
    monkeypatch.setattr(precision, "_gpus_bf16", lambda: None)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "_onednn_enabled", lambda: True)

    def set_cpuinfo(text):
        monkeypatch.setattr(precision, "_read_cpuinfo", lambda: text)

    return set_cpuinfo


# --- detection ----------------------------------------------------------------------------
def test_cpu_flags_read_from_cpuinfo(cpu):
    cpu(ZEN4)
    assert precision.cpu_bf16_flags() == ("avx512_bf16",)
    cpu(SAPPHIRE_RAPIDS)
    assert precision.cpu_bf16_flags() == ("amx_bf16", "avx512_bf16")
    cpu(SKYLAKE)
    assert precision.cpu_bf16_flags() == ()
    cpu(None)
    assert precision.cpu_bf16_flags() == ()
    # a flag named in another field (e.g. "bugs") is not a CPU flag
    cpu("bugs\t\t: avx512_bf16\nflags\t\t: avx2\n")
    assert precision.cpu_bf16_flags() == ()


def test_bf16_supported_needs_flag_onednn_and_x86(cpu, monkeypatch):
    cpu(ZEN4)
    assert precision.bf16_supported() is True
    cpu(SKYLAKE)
    assert precision.bf16_supported() is False
    cpu(None)
    assert precision.bf16_supported() is False
    cpu(ZEN4)
    monkeypatch.setattr(precision, "_onednn_enabled", lambda: False)
    assert precision.bf16_supported() is False  # TensorFlow's own kernels emulate bf16
    monkeypatch.setattr(precision, "_onednn_enabled", lambda: True)
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    assert precision.bf16_supported() is False


def test_visible_gpus_decide(cpu, monkeypatch):
    cpu(ZEN4)
    monkeypatch.setattr(precision, "_gpus_bf16", lambda: False)  # e.g. a V100 (7.0)
    assert precision.bf16_supported() is False
    cpu(SKYLAKE)
    monkeypatch.setattr(precision, "_gpus_bf16", lambda: True)  # e.g. an A100 (8.0)
    assert precision.bf16_supported() is True


# --- policy and its fallback ----------------------------------------------------------------
def test_compute_policy_falls_back_with_a_warning(cpu):
    cpu(SKYLAKE)
    with pytest.warns(precision.Bfloat16UnsupportedWarning, match="avx512_bf16"):
        assert precision.compute_policy("bfloat16") == "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.compute_policy("auto") == "float32"
        assert precision.compute_policy("float32") == "float32"


def test_compute_policy_where_supported(cpu):
    cpu(ZEN4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.compute_policy("bfloat16") == "mixed_bfloat16"
        assert precision.compute_policy("auto") == "mixed_bfloat16"
        assert precision.compute_policy("float32") == "float32"


@pytest.mark.parametrize("bad", ["bf16", "float16", None, 16])
def test_compute_policy_refuses_unknown_precision(bad):
    with pytest.raises(ValueError, match="precision=.*'auto', 'float32', 'bfloat16'"):
        precision.compute_policy(bad)


def test_precision_scope_builds_and_restores(cpu):
    cpu(ZEN4)
    before = keras.config.dtype_policy().name
    with precision.precision_scope("bfloat16") as policy:
        layer = L.Dense(2)
    assert policy == "mixed_bfloat16"
    assert layer.compute_dtype == "bfloat16" and layer.variable_dtype == "float32"
    assert keras.config.dtype_policy().name == before
    with pytest.raises(RuntimeError):
        with precision.precision_scope("bfloat16"):
            raise RuntimeError
    assert keras.config.dtype_policy().name == before


# --- meta-training in bfloat16 ------------------------------------------------------------
def _model(policy):
    keras.utils.set_random_seed(5)
    with precision.policy_scope(policy):
        return keras.Sequential(
            [
                keras.Input((6,)),
                L.Dense(16, activation="tanh", name="body"),
                warpkeras.warp(L.Dense(16, activation="tanh", name="warp")),
                L.Dense(3, name="head"),
            ]
        )


def _tasks():
    out = []
    for s in range(2):
        rng = np.random.default_rng(s)
        w = rng.normal(size=(6, 3))
        x, xt = (
            rng.normal(size=(40, 6)).astype("float32"),
            rng.normal(size=(20, 6)).astype("float32"),
        )
        out.append(
            warpkeras.Task(
                train=(x, np.argmax(x @ w, 1)),
                test=(xt, np.argmax(xt @ w, 1)),
                batch_size=20,
                name=f"t{s}",
            )
        )
    return out


def _meta_gradients(policy, warp):
    """θ0's and φ's meta-gradients of one meta step (SGD(1e-3) steps divided back), and
    the trainer."""
    model = _model(policy)
    kw = dict(
        inner_steps=3,
        meta_batch_size=2,
        inner_learning_rate=0.1,
        seed=1,
        meta_optimizer=keras.optimizers.SGD(1e-3),
    )
    if warp:
        trainer = warpkeras.WarpTrainer(
            model, LOSS, mode="offline", init_objective="leap", max_warp_updates=1, **kw
        )
    else:
        trainer = warpkeras.LeapTrainer(model, LOSS, **kw)
    part = warpkeras.partition(model)
    groups = [list(part.task_variables), list(part.warp_variables)]
    before = [[v.numpy() for v in g] for g in groups]
    trainer.train_step(_tasks(), np.random.default_rng(0))
    grads = [
        np.concatenate([((b - v.numpy()) / 1e-3).ravel() for v, b in zip(g, bs)])
        for g, bs in zip(groups, before)
    ]
    return grads, trainer


@pytest.mark.parametrize("warp", [False, True], ids=["leap", "warp_leap"])
def test_bf16_meta_gradient_matches_float32(warp):
    (t32, p32), _ = _meta_gradients("float32", warp)
    (t16, p16), trainer = _meta_gradients("mixed_bfloat16", warp)
    assert trainer.model.get_layer("body").compute_dtype == "bfloat16"
    pairs = [(t32, t16)] + ([(p32, p16)] if warp else [])
    for a, b in pairs:
        assert np.linalg.norm(a) > 0
        rel = np.linalg.norm(a - b) / np.linalg.norm(a)
        # bfloat16 rounding (8 significant bits) changes the gradients; they stay within
        # 0.3-0.4 % here ...
        assert rel < 1e-2, rel
        # ... and the difference shows that the layers really computed in bfloat16
        assert rel > 1e-4, rel
    if not warp:
        assert not np.any(p16)  # Leap leaves the warp layer alone


def test_masters_stay_float32_after_meta_steps():
    """θ0, φ and the optimisers' slots are float32 master values; only the layers' compute
    is bfloat16 (the engine packs θ, φ and the Leap / warp accumulators from the
    variables' dtypes)."""
    _, trainer = _meta_gradients("mixed_bfloat16", True)
    trainer.train_step(_tasks(), np.random.default_rng(1))
    model = trainer.model
    assert {layer.compute_dtype for layer in model.layers} == {"bfloat16"}
    assert {v.dtype for v in model.variables} == {"float32"}
    slots = [v for opt in (trainer.meta_optimizer, trainer.init_optimizer) for v in opt.variables]
    assert slots and all(v.dtype in ("float32", "int64") for v in slots)
    assert all(np.all(np.isfinite(v.numpy())) for v in model.variables)


# --- the Omniglot example's flag -----------------------------------------------------------
def _omniglot():
    import pathlib
    import sys

    examples = str(pathlib.Path(__file__).resolve().parent.parent / "examples")
    sys.path.insert(0, examples)
    try:
        import omniglot
    finally:
        sys.path.remove(examples)
    return omniglot


def test_omniglot_precision_flag_builds_bf16_models(cpu):
    cpu(ZEN4)
    omniglot = _omniglot()

    def cfg(*flags):
        return omniglot.resolve_config(omniglot.build_parser().parse_args(["--smoke", *flags]))

    assert cfg()["dtype_policy"] == "float32"
    config = cfg("--precision", "bfloat16")
    assert config["dtype_policy"] == "mixed_bfloat16"
    before = keras.config.dtype_policy().name
    spec = next(s for s in omniglot.run_specs(config) if s["method"] == "warp_leap")
    model, _ = omniglot.model_for(spec, config, 0, omniglot.shared_initialisation(config, 0))
    assert keras.config.dtype_policy().name == before
    convs = [layer for layer in model.layers if isinstance(layer, L.Conv2D)]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    assert {v.dtype for v in model.variables} == {"float32"}
    cpu(SKYLAKE)
    with pytest.warns(precision.Bfloat16UnsupportedWarning):
        assert cfg("--precision", "bfloat16")["dtype_policy"] == "float32"
