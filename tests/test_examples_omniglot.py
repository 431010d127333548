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
    cmd = [sys.executable, str(EXAMPLES / script), "--smoke", "--verbose", "0",
           "--data-dir", str(SHARED_OMNIGLOT), "--output-dir", str(out),
           "--export-dir", str(export), *flags]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-5000:]}")
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
    assert set(report) >= {"example", "mode", "config", "data", "results", "plots", "export",
                           "wall_time_seconds", "environment"}
    assert report["mode"] == "comparison" and report["complete"] is True
    assert set(report["results"]) == {"warp_leap", "leap", "reptile", "finetune", "none"}
    for name, result in report["results"].items():
        assert set(result) >= {"label", "final_test_accuracy", "auc", "final_test_loss",
                               "curves", "per_seed", "meta_train_seconds"}, name
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
        np.testing.assert_array_equal(model.get_layer("conv1").get_weights()[0],
                                      init["conv1"][0])
        if spec["warp"] == "film":  # FiLM task embeddings inside the warp blocks adapt
            assert any("film" in v.path for v in trainer.partition.task_variables)


def test_random_warp_init_matches_pytorch_default_conv_law(tmp_path):
    """--warp-init random draws kernel and bias from U(-b, b), b = 1/sqrt(9 * 64): the bound
    holds, the spread is that of the uniform law (std b/sqrt(3)), and the warp is no longer
    the identity; the other warps reject it."""
    import numpy as np

    omniglot = _import_example("omniglot")
    args = omniglot.build_parser().parse_args(
        ["--smoke", "--filters", "64", "--warp-init", "random", "--methods", "warp_leap"])
    cfg = omniglot.resolve_config(args)
    (spec,) = omniglot.run_specs(cfg)
    assert spec["warp_init"] == "random" and "random warp init" in spec["label"]
    init = omniglot.shared_initialisation(cfg, 0)
    model, _ = omniglot.model_for(spec, cfg, 0, init)
    bound = 1.0 / np.sqrt(9 * 64)
    for i in range(1, 5):
        kernel, bias = model.get_layer(f"warp{i}").get_weights()
        assert kernel.shape == (3, 3, 64, 64)
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.02)
        assert abs(kernel.mean()) < 0.1 * bound
    identity, _ = omniglot.model_for(dict(spec, warp_init="identity"), cfg, 0, init)
    centre = identity.get_layer("warp1").get_weights()[0][1, 1]
    np.testing.assert_array_equal(centre, np.eye(64, dtype=centre.dtype))
    with pytest.raises(SystemExit) as err:
        omniglot.main(["--smoke", "--warp", "scaling", "--warp-init", "random",
                       "--output-dir", str(tmp_path)])
    assert "--warp-init" in str(err.value)


@needs_omniglot
def test_few_shot_smoke(tmp_path):
    out, export = run_example("few_shot.py", tmp_path)
    report = json.loads((out / "few_shot.json").read_text())
    assert set(report) >= {"example", "config", "data", "results", "plots", "export",
                           "wall_time_seconds"}
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
            set(record["held_out_alphabets"]) & set(record["meta_train_alphabets"]))
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
        omniglot.main(["--smoke", "--source", "local", "--data-dir", str(tmp_path / "none"),
                       "--output-dir", str(tmp_path / "out"), "--no-export"])
    assert "images_background.zip" in str(err.value)


def test_bad_flags_are_rejected(tmp_path, capsys):
    omniglot = _import_example("omniglot")
    with pytest.raises(SystemExit):
        omniglot.main(["--methods", "warp_leap,bogus"])
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        omniglot.main(["--learn-lr", "--objective", "approx", "--output-dir",
                       str(tmp_path)])
    assert "--learn-lr" in str(err.value)
    few_shot = _import_example("few_shot")
    with pytest.raises(SystemExit) as err:
        few_shot.main(["--shots", "0", "--output-dir", str(tmp_path)])
    assert "--shots" in str(err.value)
