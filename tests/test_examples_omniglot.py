"""End-to-end runs of the Omniglot examples (examples/omniglot.py, examples/few_shot.py).

Each example runs its ``--smoke`` configuration in a subprocess, writing into `tmp_path`,
and the test checks the results JSON, the plot and the exported SavedModel. The examples
need the shared Omniglot subset (../shared/data/omniglot next to the repository); without
it these tests are skipped.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"

needs_omniglot = pytest.mark.skipif(
    not SHARED_OMNIGLOT.is_dir(),
    reason=f"the shared Omniglot subset is not available at {SHARED_OMNIGLOT}",
)


def run_example(script, tmp_path, *flags):
    """Runs ``examples/<script> --smoke`` in a subprocess; returns (output_dir, export_dir)."""
    out, export = tmp_path / "results", tmp_path / "saved_model"
    cmd = [
        sys.executable,
        str(EXAMPLES / script),
        "--smoke",
        "--verbose",
        "0",
        "--data-dir",
        str(SHARED_OMNIGLOT),
        "--output-dir",
        str(out),
        "--export-dir",
        str(export),
        *flags,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return out, export


def assert_png(path):
    path = pathlib.Path(path)
    assert path.is_file(), f"missing plot {path}"
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def assert_saved_model(export):
    assert (export / "saved_model.pb").is_file(), f"no SavedModel in {export}"
    assert (export / "variables").is_dir()


def assert_stat(stat):
    assert set(stat) >= {"mean", "std", "values"}
    assert stat["values"], "no values"
    assert 0.0 <= stat["mean"] <= 1.0


@needs_omniglot
def test_omniglot_smoke(tmp_path):
    out, export = run_example("omniglot.py", tmp_path)
    report = json.loads((out / "omniglot.json").read_text())
    assert set(report) >= {
        "example",
        "mode",
        "config",
        "data",
        "results",
        "plots",
        "export",
        "wall_time_seconds",
        "environment",
    }
    assert report["mode"] == "comparison" and report["complete"] is True
    assert set(report["results"]) == {"warp_leap", "leap", "reptile", "finetune", "none"}
    for name, result in report["results"].items():
        assert set(result) >= {
            "label",
            "final_test_accuracy",
            "auc",
            "final_test_loss",
            "curves",
            "per_seed",
            "meta_train_seconds",
        }, name
        assert_stat(result["final_test_accuracy"])
        assert_stat(result["auc"])
        curves = result["curves"]
        steps = report["config"]["eval_steps"]
        assert curves["test_steps"][0] == 0 and curves["test_steps"][-1] == steps
        assert len(curves["test_accuracy_mean"]) == len(curves["test_steps"])
        assert len(curves["train_error_mean"]) == steps
        seed = result["per_seed"][0]
        assert seed["seed"] == 0 and seed["test_tasks"]
    assert report["results"]["warp_leap"]["per_seed"][0]["history"]["warp_updates"]
    assert_png(out / "omniglot_curves.png")
    assert report["export"]["format"] == "warpkeras.export_adaptive"
    assert 0.0 <= report["export"]["check"]["query_accuracy"] <= 1.0
    assert_saved_model(export)


@needs_omniglot
def test_omniglot_ablation_smoke(tmp_path):
    out, export = run_example("omniglot.py", tmp_path, "--ablation", "--ablation-rows", "film")
    report = json.loads((out / "omniglot_ablation.json").read_text())
    assert report["mode"] == "ablation"
    assert list(report["results"]) == ["film"]
    film = report["results"]["film"]
    assert film["settings"]["warp"] == "film" and film["settings"]["method"] == "warp_leap"
    assert_stat(film["final_test_accuracy"])
    assert_png(out / "omniglot_ablation.png")
    assert_png(out / "omniglot_ablation_curves.png")
    assert report["export"] is None and not export.exists()


def test_every_ablation_row_builds_a_trainer():
    """All rows of Table 3 give a model whose partition and trainer are consistent (no
    meta-training here: that is what the smoke runs do)."""
    import numpy as np

    omniglot = _import_example("omniglot")
    args = omniglot.build_parser().parse_args(["--smoke", "--ablation"])
    cfg = omniglot.resolve_config(args)
    specs = omniglot.run_specs(cfg)
    assert [s["name"] for s in specs] == list(omniglot.ABLATION_ROWS)
    init = omniglot.shared_initialisation(cfg, 0)
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype("float32")
    for spec in specs:
        model, head = omniglot.model_for(spec, cfg, 0, init)
        trainer = omniglot.make_trainer(spec, cfg, model, head, 0)
        assert model(x, training=True).shape == (4, 20), spec["name"]
        warps = trainer.partition.warp_variables
        if spec["method"] == "leap":
            assert not warps and trainer.warp_mode is None
            continue
        assert warps and trainer.warp_mode == spec["meta_training"], spec["name"]
        assert trainer.warp_objective == spec["objective"]
        assert trainer.learn_lr == spec["learn_lr"]
        # the shared initialisation is loaded into the task layers
        np.testing.assert_array_equal(model.get_layer("conv1").get_weights()[0], init["conv1"][0])
        if spec["warp"] == "film":  # FiLM task embeddings inside the warp blocks adapt
            assert any("film" in v.path for v in trainer.partition.task_variables)


@needs_omniglot
def test_omniglot_reference_protocol_and_large_batch_methods_smoke(tmp_path):
    """--protocol reference switches on its four choices (recorded in the JSON); the
    large-batch baselines adapt with 10x batches and learning rate, kfac with KFAC."""
    out, export = run_example(
        "omniglot.py",
        tmp_path,
        "--protocol",
        "reference",
        "--methods",
        "warp_leap,sgd_large_batch,kfac",
        "--kfac-lr",
        "0.2",
        "--no-export",
    )
    report = json.loads((out / "omniglot.json").read_text())
    assert report["protocol"] == {
        "name": "reference",
        "augment_adaptation_batches": True,
        "augment_meta_batches": True,
        "augment_test_images": True,
        "warp_init": "random",
        "objective": "approx",
        "sources": dict.fromkeys(
            ("augment_meta", "augment_test", "warp_init", "objective"), "protocol reference"
        ),
    }
    results = report["results"]
    assert set(results) == {"warp_leap", "sgd_large_batch", "kfac"}
    warp = results["warp_leap"]
    assert warp["settings"]["objective"] == "approx"
    assert warp["settings"]["warp_init"] == "random"
    assert warp["per_seed"][0]["trainer"]["warp_objective"] == "approx"
    batch = report["config"]["task_batch_size"]
    assert warp["per_seed"][0]["task_batch_size"] == batch
    for name in ("sgd_large_batch", "kfac"):
        record = results[name]["per_seed"][0]
        assert record["task_batch_size"] == 10 * batch, name
        assert_stat(results[name]["final_test_accuracy"])
    sgd = results["sgd_large_batch"]["per_seed"][0]
    np.testing.assert_allclose(
        sgd["trainer"]["inner_learning_rate"], 10 * report["config"]["inner_lr"], rtol=1e-6
    )
    assert "inner_optimizer" not in sgd
    kfac = results["kfac"]["per_seed"][0]["inner_optimizer"]
    assert kfac["class"] == "KFAC" and kfac["learning_rate"] == 0.2
    assert kfac["damping"] == 1e-2
    # a different optimiser on the same tasks: different curves
    assert (
        results["kfac"]["curves"]["train_error_mean"]
        != results["sgd_large_batch"]["curves"]["train_error_mean"]
    )
    assert report["paper"]["table2"]["accuracy"]["kfac"] == 56.0
    headers, rows = report["table"]["headers"], report["table"]["rows"]
    assert "paper Table 2 (%)" in headers
    assert [r[headers.index("paper Table 2 (%)")] for r in rows] == ["75.0", "51.0", "56.0"]
    assert not export.exists()


@needs_omniglot
def test_omniglot_ngd_ablation_smoke(tmp_path):
    """--ngd-ablation: the warp rows of Table 4 meta-learn only the warp (θ0 stays the
    random one) with 10x batches; the paper's figures stand next to ours. (The SGD and KFAC
    rows run the methods of the test above; their specs are checked below.)"""
    out, export = run_example(
        "omniglot.py",
        tmp_path,
        "--ngd-ablation",
        "--meta-steps",
        "1",
        "--ngd-rows",
        "warp_linear,warp_expressive",
    )
    report = json.loads((out / "omniglot_ngd.json").read_text())
    assert report["mode"] == "ngd_ablation"
    results = report["results"]
    assert list(results) == ["warp_linear", "warp_expressive"]
    assert results["warp_linear"]["settings"]["warp"] == "conv3x3"
    assert results["warp_expressive"]["settings"]["warp"] == "residual2"
    for name, result in results.items():
        assert result["task_batch_scale"] == 10, name
        assert_stat(result["final_test_accuracy"])
        record = result["per_seed"][0]
        assert record["task_batch_size"] == 10 * report["config"]["task_batch_size"]
        assert record["trainer"]["init_objective"] is None, name
        assert record["history"]["warp_updates"], name
    assert report["paper"]["rows"]["warp_expressive"]["mean"] == 81.3
    headers, rows = report["table"]["headers"], report["table"]["rows"]
    assert [r[headers.index("paper Table 4 (%)")] for r in rows] == ["68.0 ± 4.4", "81.3 ± 4.0"]
    assert_png(out / "omniglot_ngd.png")
    assert report["export"] is None and not export.exists()


def test_ngd_ablation_rows():
    omniglot = _import_example("omniglot")
    args = omniglot.build_parser().parse_args(["--smoke", "--ngd-ablation"])
    specs = omniglot.run_specs(omniglot.resolve_config(args))
    assert [(s["name"], s["method"], s["batch_scale"]) for s in specs] == [
        ("sgd", "sgd_large_batch", 10),
        ("kfac", "kfac", 10),
        ("warp_linear", "warp_only", 10),
        ("warp_expressive", "warp_only", 10),
    ]
    assert [s["paper_accuracy"]["mean"] for s in specs] == [40.1, 58.2, 68.0, 81.3]
    assert [s["paper_accuracy"]["std"] for s in specs] == [6.1, 3.2, 4.4, 4.0]


def test_protocol_choices_and_explicit_flags_win():
    omniglot = _import_example("omniglot")

    def cfg(*flags):
        return omniglot.resolve_config(omniglot.build_parser().parse_args(["--smoke", *flags]))

    # the default protocol: augmented meta batches, clean test images, random conv warps,
    # approximate objective (Warp-Leap +11.5 points over Leap, examples/README.md)
    default = cfg()
    assert (
        default["augment_meta"],
        default["augment_test"],
        default["warp_init"],
        default["objective"],
    ) == (True, False, "random", "approx")
    assert default["protocol_sources"] == dict.fromkeys(
        ("augment_meta", "augment_test", "warp_init", "objective"), "protocol default"
    )
    previous = cfg("--no-augment-meta", "--warp-init", "identity", "--objective", "exact")
    assert (previous["augment_meta"], previous["warp_init"], previous["objective"]) == (
        False,
        "identity",
        "exact",
    )
    assert cfg("--warp", "scaling")["warp_init"] == "identity"
    ref = cfg("--protocol", "reference")
    assert (ref["augment_meta"], ref["augment_test"], ref["warp_init"], ref["objective"]) == (
        True,
        True,
        "random",
        "approx",
    )
    mixed = cfg(
        "--protocol",
        "reference",
        "--no-augment-test",
        "--objective",
        "exact",
        "--warp-init",
        "identity",
    )
    assert (
        mixed["augment_meta"],
        mixed["augment_test"],
        mixed["warp_init"],
        mixed["objective"],
    ) == (True, False, "identity", "exact")
    assert mixed["protocol_sources"]["objective"] == "flag"
    assert mixed["protocol_sources"]["augment_meta"] == "protocol reference"
    # the protocol's random initialisation only applies to the conv warps
    assert cfg("--protocol", "reference", "--warp", "residual")["warp_init"] == "identity"
    assert cfg("--no-augment-meta")["augment_meta"] is False
    for protocol in ("default", "reference"):
        with pytest.raises(SystemExit) as err:
            cfg("--protocol", protocol, "--learn-lr")
        assert "--objective exact" in str(err.value)
        assert f"--protocol {protocol} chooses approx" in str(err.value)
    assert cfg("--learn-lr", "--objective", "exact")["learn_lr"] is True
    with pytest.raises(SystemExit) as err:
        cfg("--learn-momentum")
    assert "--learn-momentum needs --objective exact" in str(err.value)
    with pytest.raises(SystemExit) as err:
        cfg("--learn-lr", "--learn-momentum")
    assert "--learn-lr and --learn-momentum need --objective exact" in str(err.value)
    with pytest.raises(SystemExit) as err:
        cfg("--ablation", "--ngd-ablation")
    assert "--ngd-ablation" in str(err.value)
    with pytest.raises(SystemExit) as err:
        cfg("--kfac-lr", "0")
    assert "--kfac-lr" in str(err.value)


def test_reference_protocol_augments_meta_batches_and_test_images():
    """Under the reference protocol the meta-objective batches are augmented images (not
    rows of the adaptation set) and the test images are a fixed augmented draw shared by
    the normal and the 10x-batch task sets; the default protocol keeps both clean."""
    import numpy as np

    from warpkeras.data import ClassificationTask, random_affine

    omniglot = _import_example("omniglot")
    rng = np.random.default_rng(0)
    images = (rng.random((30, 16, 16, 1)) > 0.7).astype("float32")
    task = ClassificationTask(
        images[:20],
        np.arange(20) % 4,
        images[20:],
        np.arange(10) % 4,
        name="toy",
        augmentation=random_affine,
    )

    class Split:
        meta_train, meta_test = [task], [task]

    def rows_of(batch, data):
        return [any(np.array_equal(b, d) for d in data) for b in batch]

    base = dict(augment=True, task_batch_size=5, large_batch=10)
    ref = omniglot.task_sets(Split, dict(base, augment_meta=True, augment_test=True), 3)
    clean = omniglot.task_sets(Split, dict(base, augment_meta=False, augment_test=False), 3)
    (train_ref,), (test_ref,) = ref[1]
    (train_clean,), (test_clean,) = clean[1]
    x_meta, y_meta = next(train_ref.batches("meta", np.random.default_rng(1)))
    assert x_meta.shape == (5, 16, 16, 1) and not any(rows_of(x_meta, task.x_train))
    x_meta, _ = next(train_clean.batches("meta", np.random.default_rng(1)))
    assert all(rows_of(x_meta, task.x_train))
    # adaptation batches are augmented under both protocols
    x_train, _ = next(train_clean.batches("train", np.random.default_rng(1)))
    assert not any(rows_of(x_train, task.x_train))
    # the trainer's (adaptation, meta) streams of one step
    _, meta_stream = train_ref.streams(np.random.default_rng(2), np.random.default_rng(3))
    assert not any(rows_of(next(meta_stream)[0], task.x_train))
    np.testing.assert_array_equal(test_clean.test[0], task.x_test)
    assert not any(rows_of(test_ref.test[0], task.x_test))
    np.testing.assert_array_equal(test_ref.test[1], task.y_test)
    (_,), (test_large,) = ref[10]
    assert test_large.batch_size == 50 and test_ref.batch_size == 5
    np.testing.assert_array_equal(test_large.test[0], test_ref.test[0])


def test_random_warp_init_matches_pytorch_default_conv_law(tmp_path):
    """--warp-init random draws kernel and bias from U(-b, b), b = 1/sqrt(9 * 64): the bound
    holds, the spread is that of the uniform law (std b/sqrt(3)), and the warp is no longer
    the identity; the other warps reject it."""
    import numpy as np

    omniglot = _import_example("omniglot")
    args = omniglot.build_parser().parse_args(
        ["--smoke", "--filters", "64", "--warp-init", "random", "--methods", "warp_leap"]
    )
    cfg = omniglot.resolve_config(args)
    (spec,) = omniglot.run_specs(cfg)
    assert spec["warp_init"] == "random" and spec["label"] == "Warp-Leap"
    init = omniglot.shared_initialisation(cfg, 0)
    model, _ = omniglot.model_for(spec, cfg, 0, init)
    bound = 1.0 / np.sqrt(9 * 64)
    for i in range(1, 5):
        kernel, bias = model.get_layer(f"warp{i}").get_weights()
        assert kernel.shape == (3, 3, 64, 64)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.02)
        assert abs(kernel.mean()) < 0.1 * bound
    (spec_identity,) = omniglot.run_specs(
        omniglot.resolve_config(
            omniglot.build_parser().parse_args(
                [
                    "--smoke",
                    "--warp-init",
                    "identity",
                    "--objective",
                    "exact",
                    "--methods",
                    "warp_leap",
                ]
            )
        )
    )
    assert spec_identity["label"] == ("Warp-Leap (3x3 conv, offline, exact) (identity warp init)")
    identity, _ = omniglot.model_for(dict(spec, warp_init="identity"), cfg, 0, init)
    centre = identity.get_layer("warp1").get_weights()[0][1, 1]
    np.testing.assert_array_equal(centre, np.eye(64, dtype=centre.dtype))
    with pytest.raises(SystemExit) as err:
        omniglot.main(
            ["--smoke", "--warp", "scaling", "--warp-init", "random", "--output-dir", str(tmp_path)]
        )
    assert "--warp-init" in str(err.value)


@needs_omniglot
def test_few_shot_smoke(tmp_path):
    out, export = run_example("few_shot.py", tmp_path)
    report = json.loads((out / "few_shot.json").read_text())
    assert set(report) >= {
        "example",
        "config",
        "data",
        "results",
        "plots",
        "export",
        "wall_time_seconds",
    }
    assert report["complete"] is True
    assert list(report["results"]) == ["5-way 1-shot"]
    setting = report["results"]["5-way 1-shot"]
    assert set(setting) == {"warp_maml", "maml"}
    for result in setting.values():
        assert set(result) >= {"label", "accuracy", "ci95", "per_seed", "meta_train_seconds"}
        assert_stat(result["accuracy"])
        assert len(result["accuracy"]["values"]) == report["config"]["test_episodes"]
        record = result["per_seed"][0]
        assert record["held_out_alphabets"] and not (
            set(record["held_out_alphabets"]) & set(record["meta_train_alphabets"])
        )
    assert_png(out / "few_shot.png")
    check = report["export"]["check"]
    assert 0.0 <= check["query_accuracy_saved_model"] <= 1.0
    assert_saved_model(export)


def _import_example(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_missing_data_gives_a_clear_error(tmp_path):
    omniglot = _import_example("omniglot")
    with pytest.raises(SystemExit) as err:
        omniglot.main(
            [
                "--smoke",
                "--source",
                "local",
                "--data-dir",
                str(tmp_path / "none"),
                "--output-dir",
                str(tmp_path / "out"),
                "--no-export",
            ]
        )
    assert "images_background.zip" in str(err.value)


def test_bad_flags_are_rejected(tmp_path, capsys):
    omniglot = _import_example("omniglot")
    with pytest.raises(SystemExit):
        omniglot.main(["--methods", "warp_leap,bogus"])
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        omniglot.main(["--learn-lr", "--objective", "approx", "--output-dir", str(tmp_path)])
    assert "--learn-lr" in str(err.value)
    few_shot = _import_example("few_shot")
    with pytest.raises(SystemExit) as err:
        few_shot.main(["--shots", "0", "--output-dir", str(tmp_path)])
    assert "--shots" in str(err.value)
