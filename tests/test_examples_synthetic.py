"""End-to-end runs of the data-free examples: continual sine regression, synthetic loss
surfaces and maze navigation (examples/continual_sine.py, synthetic_surfaces.py,
maze_navigation.py).

Each example's ``main(argv)`` runs its ``--smoke`` configuration in this process (one
TensorFlow import for all three), writing into `tmp_path`; the tests check the results
JSON, the PNG plots and the exported SavedModel. A few cheap checks of the examples'
own pieces (the surface loss, the A2C returns) run alongside.
"""

import importlib
import json
import pathlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

REPO = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


def run_smoke(name, tmp_path, *flags):
    """Runs ``examples/<name>.py --smoke`` through its ``main``; returns (module, returned
    dict, JSON written, output folder, export folder)."""
    module = importlib.import_module(name)
    out, export = tmp_path / "results", tmp_path / "saved_model"
    returned = module.main(
        ["--smoke", "--verbose", "0", "--output-dir", str(out), "--export-dir", str(export), *flags]
    )
    path = out / f"{name}.json"
    assert path.is_file(), f"{name} wrote no results JSON"
    data = json.loads(path.read_text())
    assert data["example"] == name == returned["example"]
    assert data["wall_time_seconds"] > 0
    return module, returned, data, out, export


def assert_png(path):
    path = pathlib.Path(path)
    assert path.is_file(), f"missing plot {path}"
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def assert_saved_model(export):
    export = pathlib.Path(export)
    assert (export / "saved_model.pb").is_file(), f"no SavedModel in {export}"
    assert (export / "variables").is_dir()


def assert_stat(stat):
    assert set(stat) >= {"mean", "std", "values"}
    assert stat["values"], "no values"
    assert np.isfinite(stat["mean"])


def test_continual_sine_smoke(tmp_path):
    module, _, data, out, export = run_smoke("continual_sine", tmp_path)
    cfg = data["config"]
    T, n = cfg["subtasks"], cfg["steps_per_subtask"]
    assert set(data["results"]) == {"training_order", "random_order"}
    assert data["results"]["random_order"]["order"] == [1, 3, 4, 2, 0]
    for order in ("training_order", "random_order"):
        for method in ("sgd", "warpgrad"):
            res = data["results"][order][method]
            for key in ("final_loss", "loss_over_sequence", "forgetting", "loss_after_own_steps"):
                assert_stat(res[key])
            assert len(res["final_loss"]["values"]) == cfg["eval_tasks"]
            curve = np.asarray(res["mean_log_loss_curve"])
            assert curve.shape == (T * n + 1, T)
            assert np.all(np.isfinite(curve))
    assert cfg["warp_init"] == "random" and cfg["meta_lr_schedule"] == "constant"
    run = data["per_seed"][0]
    assert len(run["meta_loss"]) == cfg["meta_steps"]
    # the meta batch (stacked validation data, t as a tensor) never retraces the step
    assert run["trace_counts"] and all(c == 1 for c in run["trace_counts"].values()), run[
        "trace_counts"
    ]
    # retention: R[i, j] = loss on sub-task i after the last step on the j-th presented one
    ret = data["retention"]
    assert ret["axes"] == ["loss_on_subtask", "after_learning"]
    for order in ("training_order", "random_order"):
        entry, presented = ret[order], data["results"][order]["order"]
        assert entry["loss_on_subtask"] == list(range(T))
        assert entry["after_learning"] == presented
        assert entry["after_step"] == [(j + 1) * n for j in range(T)]
        assert entry["earlier_subtasks"] == presented[:-1]
        means = {}
        for method in ("sgd", "warpgrad"):
            res = data["results"][order][method]
            matrix = np.asarray(entry["matrix"][method], dtype=float)
            assert matrix.shape == (T, T) and np.all(np.isfinite(matrix))
            curve = np.asarray(res["mean_loss_curve"])  # [K+1, T], row k: after k steps
            for j, subtask in enumerate(presented):
                # the diagonal: each sub-task right after its own n steps, as the curves say
                np.testing.assert_allclose(
                    matrix[subtask, j], curve[(j + 1) * n, subtask], rtol=1e-6
                )
                np.testing.assert_allclose(matrix[:, j], curve[(j + 1) * n], rtol=1e-6)
            # ... and, averaged over sub-tasks, the separately computed loss_after_own_steps
            own = np.mean([matrix[s, j] for j, s in enumerate(presented)])
            np.testing.assert_allclose(own, res["loss_after_own_steps"]["mean"], rtol=1e-5)
            np.testing.assert_allclose(matrix[:, -1], res["final_loss_per_subtask"], rtol=1e-6)
            # the earlier sub-tasks (all but the last presented) after the whole sequence
            means[method] = entry["earlier_final_loss"][method]["mean"]
            np.testing.assert_allclose(means[method], matrix[presented[:-1], -1].mean(), rtol=1e-5)
        np.testing.assert_allclose(
            entry["ratio_warpgrad_to_sgd"], means["warpgrad"] / means["sgd"], rtol=1e-6
        )
    for key in ("losses", "predictions", "retention"):
        assert_png(data["plots"][key])
    assert_saved_model(export)
    assert data["export"]["check"]["max_abs_difference_vs_keras"] < 1e-4


def test_continual_meta_loss_matches_objective():
    """The meta batch (stacked validation data, t as a tensor) gives Eq. 18."""
    module = importlib.import_module("continual_sine")
    import warpkeras
    from warpkeras import objectives as obj

    model = module.build_model(8, 4, 1, seed=0)
    p = warpkeras.partition(model)
    rng = np.random.default_rng(0)
    xv = rng.uniform(-5, 5, (3, 4, 1)).astype("float32")
    yv = np.sin(xv).astype("float32")
    meta_loss = module.make_meta_loss(3, 2)
    for t in (1, 2, 3):
        got = meta_loss(
            p,
            module.half_mse,
            p.initial_task_values(),
            p.warp_values(),
            (xv, yv, tf.constant(t)),
            None,
        )
        weights = obj.continual_weights(3, 2)
        want = sum(weights[i] * float(module.half_mse(yv[i], model(xv[i]))) for i in range(t))
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_continual_sine_smoke_identity_warps_cosine_meta_lr(tmp_path):
    _, _, data, _, _ = run_smoke(
        "continual_sine",
        tmp_path,
        "--warp-init",
        "identity",
        "--meta-lr-schedule",
        "cosine",
        "--no-export",
    )
    assert data["config"]["warp_init"] == "identity"
    assert data["config"]["meta_lr_schedule"] == "cosine"
    assert len(data["per_seed"][0]["meta_loss"]) == data["config"]["meta_steps"]
    for method in ("sgd", "warpgrad"):
        assert np.all(np.isfinite(data["results"]["training_order"][method]["mean_loss_curve"]))


def test_continual_randomise_warps():
    """--warp-init random: every dense map of the warp blocks ~ U(±1/sqrt(fan_in)), by seed;
    the task learner's own layers are left alone."""
    module = importlib.import_module("continual_sine")
    model = module.build_model(8, 4, 2, seed=0)
    theta = [
        w.copy()
        for layer in model.layers
        if layer.name.startswith(("dense", "output"))
        for w in layer.get_weights()
    ]
    x = np.linspace(-5, 5, 7, dtype="float32")[:, None]
    before = model(x).numpy()
    module.randomise_warps(model, seed=3)
    warps = [layer for layer in model.layers if isinstance(layer, module.ResidualWarpDense)]
    assert len(warps) == 2
    for warp in warps:
        for linear in warp.linears:
            bound = 1.0 / np.sqrt(linear.kernel.shape[0])
            for var in (linear.kernel, linear.bias):
                values = np.asarray(var)
                assert np.all(np.abs(values) <= bound) and np.std(values) > 0.3 * bound
    after = [
        w
        for layer in model.layers
        if layer.name.startswith(("dense", "output"))
        for w in layer.get_weights()
    ]
    for a, b in zip(theta, after):
        np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(model(x).numpy() - before)) > 1e-3  # no longer the identity
    first = [np.asarray(v) for w in warps for v in w.trainable_variables]
    module.randomise_warps(model, seed=3)
    for a, w in zip(first, [v for warp in warps for v in warp.trainable_variables]):
        np.testing.assert_array_equal(a, np.asarray(w))


def test_continual_meta_lr_schedule():
    """--meta-lr-schedule cosine decays Adam's rate from --meta-lr to 0 over the meta steps."""
    module = importlib.import_module("continual_sine")
    cfg = {"meta_lr": 0.002, "meta_steps": 10}
    assert module.meta_learning_rate(dict(cfg, meta_lr_schedule="constant")) == 0.002
    schedule = module.meta_learning_rate(dict(cfg, meta_lr_schedule="cosine"))
    np.testing.assert_allclose(
        [float(schedule(k)) for k in (0, 5, 10)], [0.002, 0.001, 0.0], atol=1e-9
    )


def test_continual_meta_clipnorm():
    """--meta-clipnorm clips the warp's meta-gradient (Adam global_clipnorm); off by default,
    and a non-positive norm is refused."""
    module = importlib.import_module("continual_sine")

    def cfg(*flags):
        return module.resolve_config(module.build_parser().parse_args(["--smoke", *flags]))

    assert cfg()["meta_clipnorm"] is None
    assert module.meta_optimizer(cfg()).global_clipnorm is None
    clipped = module.meta_optimizer(cfg("--meta-clipnorm", "0.5"))
    assert clipped.global_clipnorm == 0.5
    # a gradient of norm 10 enters Adam's moments at norm 0.5
    var = keras.Variable(np.zeros(4, "float32"))
    clipped.apply([np.full(4, 5.0, "float32")], [var])
    np.testing.assert_allclose(
        np.linalg.norm(clipped._momentums[0].numpy()), (1 - clipped.beta_1) * 0.5, rtol=1e-5
    )
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(SystemExit, match="--meta-clipnorm must be a finite number"):
            cfg("--meta-clipnorm", bad)


def test_continual_eq18_along_curve_by_hand():
    """The validation meta-objective of a run: Eq. 18 after each of the K steps, averaged."""
    module = importlib.import_module("continual_sine")
    T, n = 2, 2
    curve = np.array([[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    # appearances: w = [1/(n T), 1/n] = [1/4, 1/2]; steps 1-2 on sub-task 1, 3-4 on 2
    want = (1.0 / 4 + 3.0 / 4 + (5.0 / 4 + 6.0 / 2) + (7.0 / 4 + 8.0 / 2)) / 4
    np.testing.assert_allclose(module.eq18_along_curve(curve, T, n), want)
    # average (1/t): steps on sub-task 1 score it alone, then the mean of both
    want = (1.0 + 3.0 + 5.5 + 7.5) / 4
    np.testing.assert_allclose(module.eq18_along_curve(curve, T, n, "average"), want)


def test_continual_select_every_keeps_the_best_scored_warp():
    """--select-every: the warp restored after fit is the one of the meta step with the
    lowest validation score, not the last one; scores only every N steps and at the end."""
    module = importlib.import_module("continual_sine")
    import warpkeras

    cfg = module.resolve_config(
        module.build_parser().parse_args(["--smoke", "--meta-steps", "4", "--select-every", "2"])
    )
    model = module.build_model(cfg["hidden_units"], cfg["warp_units"], cfg["hidden_layers"], 0)
    module.randomise_warps(model, 0)
    trainer = warpkeras.WarpTrainer(
        model,
        loss=module.half_mse,
        mode="online",
        objective="exact",
        init_objective=None,
        inner_learning_rate=0.01,
        inner_steps=cfg["subtasks"] * cfg["steps_per_subtask"],
        meta_batch_size=2,
        meta_optimizer=keras.optimizers.Adam(0.05),
        meta_loss=module.make_meta_loss(cfg["subtasks"], cfg["steps_per_subtask"]),
        seed=0,
    )
    partition = trainer.partition
    evaluator = module.make_evaluator(partition, cfg["subtasks"], cfg["inner_lr"])
    (select,) = module.selection_callbacks(cfg, 0, partition, evaluator)
    assert select.every == 2 and select.last == 4
    real_score = select.score
    scripted = iter([0.5, 0.9])  # meta step 2 is the best of the two scored
    select.score = lambda: (real_score(), next(scripted))[1]
    phis = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: phis.append([np.asarray(v) for v in partition.warp_values()])
    )
    source = module.SequenceSource(module.ContinualSineDistribution(num_subtasks=5), cfg)
    history = trainer.fit(source, meta_steps=4, verbose=0, callbacks=[record, select])
    assert select.scores == [(2, 0.5), (4, 0.9)] and select.best_step == 2
    np.testing.assert_array_equal(history.history["val_eq18"], [np.nan, 0.5, np.nan, 0.9])
    final = [np.asarray(v) for v in partition.warp_values()]
    assert max(np.max(np.abs(a - b)) for a, b in zip(phis[-1], phis[1])) > 1e-6
    for got, want in zip(final, phis[1]):
        np.testing.assert_array_equal(got, want)
    # the real score is Eq. 18 over the validation runs: finite and positive
    assert 0 < real_score() < np.inf
    assert module.selection_callbacks(dict(cfg, select_every=0), 0, partition, evaluator) == []
    for flag, bad, message in (
        ("--select-every", "-1", ">= 0"),
        ("--select-sequences", "0", ">= 1"),
    ):
        with pytest.raises(SystemExit, match=message):
            module.resolve_config(module.build_parser().parse_args(["--smoke", flag, bad]))


def test_continual_retention_without_finite_warpgrad_runs():
    """A method whose every sequence diverged has no mean: the ratio is None, not an
    error."""
    module = importlib.import_module("continual_sine")
    T, n = 3, 2
    finite = np.ones((4, T * n + 1, T))
    curves = {"training_order": {"sgd": finite, "warpgrad": np.full_like(finite, np.nan)}}
    out = module.retention(curves, {"training_order": [0, 1, 2]}, n)["training_order"]
    assert out["earlier_final_loss"]["sgd"]["mean"] == 1.0
    assert out["earlier_final_loss"]["warpgrad"]["mean"] is None
    assert out["ratio_warpgrad_to_sgd"] is None


def test_synthetic_surfaces_smoke(tmp_path):
    module, _, data, out, export = run_smoke("synthetic_surfaces", tmp_path)
    cfg = data["config"]
    runs = cfg["eval_surfaces"] * cfg["eval_starts"]
    for method in ("gd", "warpgrad"):
        res = data["results"][method]
        assert_stat(res["final_loss"])
        assert_stat(res["steps_to_converge"])
        assert len(res["final_loss"]["values"]) == runs
        assert all(0 <= s <= cfg["inner_steps"] for s in res["steps_to_converge"]["values"])
        assert len(res["mean_loss_curve"]) == cfg["inner_steps"] + 1
        assert 0.0 <= res["converged_fraction"] <= 1.0
    assert len(data["per_seed"][0]["meta_loss"]) == cfg["meta_steps"]
    for key in ("trajectories", "curves"):
        assert_png(data["plots"][key])
    assert_saved_model(export)
    # the SavedModel runs the meta-learned optimiser by itself and lands where it did here
    assert data["export"]["check"]["max_abs_difference"] < 1e-4


@pytest.mark.parametrize("variant", ["paper", "peaks"])
def test_surface_loss_matches_loss_surface(variant):
    module = importlib.import_module("synthetic_surfaces")
    from warpkeras.data import LossSurfaceDistribution

    dist = LossSurfaceDistribution(variant=variant)
    rng = np.random.default_rng(1)
    for _ in range(3):
        surface = dist.sample(rng)
        points = dist.sample_initial_points(7, rng)
        want = surface(points.astype(np.float64))
        got = module.surface_values(
            tf.constant(points), module.surface_params(surface)[None, :]
        ).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_maze_navigation_smoke(tmp_path):
    module, _, data, out, export = run_smoke("maze_navigation", tmp_path)
    cfg = data["config"]
    assert set(data["results"]) == set(cfg["methods"]) == {"warp_rnn", "rnn", "tnets"}
    for res in data["results"].values():
        assert_stat(res["final_return"])
        assert_stat(res["mean_return"])
        assert len(res["mean_curve"]) == cfg["updates"]
        assert np.all(np.isfinite(res["mean_curve"]))
    # same θ0, identity warps and the same environment seeds: the first batch is identical
    first = {m: r["mean_curve"][0] for m, r in data["results"].items()}
    assert len(set(np.round(list(first.values()), 6))) == 1, first
    # the warp was updated every meta_interval task updates
    expected = cfg["updates"] // cfg["meta_interval"]
    assert data["results"]["warp_rnn"]["warp_updates"] == expected
    assert data["results"]["tnets"]["warp_updates"] == expected
    assert data["results"]["rnn"]["warp_updates"] is None
    assert_png(data["plots"]["returns"])
    assert_saved_model(export)
    assert data["export"]["check"]["max_abs_difference_vs_keras"] < 1e-4


def test_discounted_returns():
    module = importlib.import_module("maze_navigation")
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(3, 6)).astype("float32")
    values = rng.normal(size=(3, 6)).astype("float32")
    gamma = 0.9

    def reference(n):
        out = np.zeros_like(rewards)
        for t in range(6):
            total = sum(gamma**i * rewards[:, t + i] for i in range(min(n, 6 - t)))
            if t + n < 6:
                total = total + gamma**n * values[:, t + n]
            out[:, t] = total
        return out

    for n in (1, 2, 6, 10):
        np.testing.assert_allclose(
            module.discounted_returns(rewards, values, gamma, n), reference(n), rtol=1e-5, atol=1e-5
        )


def test_continual_retention_preset():
    """--preset retention is the retention table's best row; explicit flags still win."""
    module = importlib.import_module("continual_sine")

    def cfg(*flags):
        return module.resolve_config(module.build_parser().parse_args(list(flags)))

    got = cfg("--preset", "retention")
    assert (
        got["warp_units"],
        got["eq18_weighting"],
        got["meta_steps"],
        got["select_every"],
        got["seeds"],
    ) == (200, "average", 80, 5, [0, 1, 2])
    assert got["inner_lr"] == 0.001 and got["warp_init"] == "random"
    assert cfg()["eq18_weighting"] == "appearances" and cfg()["select_every"] == 0
    mixed = cfg("--preset", "retention", "--eq18-weighting", "printed", "--seeds", "4")
    assert mixed["eq18_weighting"] == "printed" and mixed["seeds"] == [4]
    assert mixed["warp_units"] == 200
