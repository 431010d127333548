"""Meta-SGD and ANIL (examples/meta_sgd.py, examples/anil.py), written outside the package
against the public `warpkeras.meta` interface, checked against an independent numpy
reference: a two-layer tanh network whose inner steps are unrolled by hand (analytic
backpropagation) and whose meta-gradients are central finite differences of the query
loss after the K steps, in float64."""

import importlib
import json
import pathlib
import sys

import keras
import numpy as np
import pytest

import warpkeras
from warpkeras.meta import MetaTrainingError

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))
meta_sgd = importlib.import_module("meta_sgd")
anil = importlib.import_module("anil")

K, META_LR, INNER_LR = 3, 0.5, 0.3


# ---------------------------------------------------------------------- numpy reference
def loss_and_grads(params, x, y):
    """MSE of the net tanh(x W1 + b1) W2 + b2 and its gradients (hand-derived)."""
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    r = h @ w2 + b2 - y
    d = 2.0 * r / r.size
    dz = (d @ w2.T) * (1.0 - h**2)
    return np.mean(r**2), [x.T @ dz, dz.sum(0), h.T @ d, d.sum(0)]


def unroll(params, rates, support, steps=K, adapted=range(4)):
    """θ_{k+1} = θ_k − rate ⊙ ∇L_support(θ_k) for the parameters in `adapted`."""
    params = list(params)
    for _ in range(steps):
        _, grads = loss_and_grads(params, *support)
        params = [
            p - rates[i] * g if i in adapted else p for i, (p, g) in enumerate(zip(params, grads))
        ]
    return params


def central_differences(f, values, eps=1e-6):
    """∂f/∂values (a list of arrays) by central differences."""
    grads = []
    for i, v in enumerate(values):
        g = np.zeros_like(v)
        for j in np.ndindex(v.shape):
            plus = [a.copy() for a in values]
            minus = [a.copy() for a in values]
            plus[i][j] += eps
            minus[i][j] -= eps
            g[j] = (f(plus) - f(minus)) / (2 * eps)
        grads.append(g)
    return grads


# ---------------------------------------------------------------------- set-up
def make_tasks():
    rng = np.random.default_rng(7)
    tasks = []
    for i in range(2):
        support = rng.normal(size=(6, 2)), rng.normal(size=(6, 1))
        query = rng.normal(size=(5, 2)), rng.normal(size=(5, 1))
        test = rng.normal(size=(4, 2)), rng.normal(size=(4, 1))
        # batch_size >= the rows: every batch is the whole set (the MSE ignores order)
        tasks.append(
            warpkeras.Task(train=support, meta=query, test=test, batch_size=6, name=f"t{i}")
        )
    return tasks


def make_model(body_role=None):
    keras.utils.set_random_seed(3)
    body = keras.layers.Dense(3, activation="tanh", bias_initializer="random_normal")
    head = keras.layers.Dense(1, bias_initializer="random_normal")
    if body_role is not None:
        body = body_role(body)
    return keras.Sequential([keras.Input((2,)), body, head])


def values(variables):
    return [np.array(v.numpy()) for v in variables]


def trainer_for(model, objective, parallel="sequential"):
    return warpkeras.MetaTrainer(
        model,
        "mse",
        objectives=[objective],
        inner_steps=K,
        meta_batch_size=2,
        inner_learning_rate=INNER_LR,
        seed=0,
        parallel=parallel,
    )


def meta_step(trainer, tasks):
    """One meta step on both tasks (each once)."""
    trainer.fit(warpkeras.TaskSampler(tasks, replace=False), epochs=1, verbose=0)


def assert_close(got, expected, rtol=1e-6, atol=1e-9):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


class RecordingMetaSGD(meta_sgd.MetaSGD):
    """Keeps the meta-gradient the trainer hands to `apply` (summed over tasks)."""

    def apply(self, engine, grads, count):
        self.recorded = ([np.array(g) for g in grads], count)
        super().apply(engine, grads, count)


# ---------------------------------------------------------------------- Meta-SGD
@pytest.mark.parametrize("parallel", ["sequential", "vectorized"])
def test_meta_sgd_gradients_match_finite_differences(float64, parallel):
    objective = RecordingMetaSGD(
        alpha_initializer=keras.initializers.RandomUniform(0.05, 0.4, seed=1),
        optimizer=keras.optimizers.SGD(META_LR),
    )
    trainer = trainer_for(make_model(), objective, parallel)
    theta_vars = trainer.partition.task_variables
    assert [tuple(v.shape) for v in theta_vars] == [(2, 3), (3,), (3, 1), (1,)]
    theta0, alpha = values(theta_vars), values(objective.alpha)
    assert np.ptp(np.concatenate([a.ravel() for a in alpha])) > 0.1  # α per parameter
    tasks = make_tasks()

    def query_loss(task, th, al):
        return loss_and_grads(unroll(th, al, task.train), *task.meta)[0]

    fd_theta = [
        np.mean(g, 0)
        for g in zip(
            *[central_differences(lambda th, t=t: query_loss(t, th, alpha), theta0) for t in tasks]
        )
    ]
    fd_alpha = [
        np.mean(g, 0)
        for g in zip(
            *[central_differences(lambda al, t=t: query_loss(t, theta0, al), alpha) for t in tasks]
        )
    ]

    meta_step(trainer, tasks)
    d_theta = [b - a for a, b in zip(theta0, values(theta_vars))]
    d_alpha = [b - a for a, b in zip(alpha, values(objective.alpha))]
    # The trainer's update is −lr × the finite-difference meta-gradient (mean over tasks).
    assert_close([-d / META_LR for d in d_alpha], fd_alpha)
    assert_close([-d / META_LR for d in d_theta], fd_theta)
    assert max(np.abs(g).max() for g in fd_alpha) > 1e-3  # the check is not vacuous
    # ... and exactly −lr × the meta-gradient the trainer computed (θ0 first, then α).
    grads, count = objective.recorded
    assert count == 2
    flat = np.concatenate([g.ravel() for g in grads]) / count
    step = np.concatenate([d.ravel() for d in d_theta + d_alpha])
    np.testing.assert_allclose(step, -META_LR * flat, rtol=1e-12, atol=1e-15)

    # Adaptation (`adapt`) uses the learned per-parameter rates.
    theta_k, _ = trainer.adapt(tasks[0], steps=K)
    expected = unroll(values(theta_vars), values(objective.alpha), tasks[0].train)
    assert_close([np.asarray(t) for t in theta_k], expected, rtol=1e-10, atol=1e-12)


def test_meta_sgd_rates_are_checkpointed_and_logged(tmp_path):
    def trainer():
        objective = meta_sgd.MetaSGD(optimizer=keras.optimizers.SGD(META_LR))
        return trainer_for(make_model(), objective), objective

    def backup():
        return keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)

    first, trained = trainer()
    history = first.fit(
        make_tasks(),
        epochs=2,
        verbose=0,
        callbacks=[backup()],
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    alpha = values(trained.alpha)
    np.testing.assert_allclose(
        history.history["alpha_mean"][-1],
        np.mean(np.concatenate([a.ravel() for a in alpha])),
        rtol=1e-6,
    )
    # tf.train.Checkpoint (checkpoint_dir, restore) and Keras's BackupAndRestore (weights
    # files) both bring the learned rates back.
    resumed, fresh = trainer()
    assert not np.allclose(values(fresh.alpha)[0], alpha[0])  # α did train
    resumed.restore(str(tmp_path / "ckpt"))
    assert_close(values(fresh.alpha), alpha, rtol=0, atol=0)
    resumed, fresh = trainer()
    resumed.fit(make_tasks(), epochs=2, verbose=0, callbacks=[backup()])  # nothing left to do
    assert_close(values(fresh.alpha), alpha, rtol=0, atol=0)


def test_meta_sgd_with_momentum_is_refused():
    with pytest.raises(MetaTrainingError, match="MetaSGD: .*inner_momentum=None"):
        warpkeras.MetaTrainer(
            make_model(), "mse", objectives=[meta_sgd.MetaSGD()], inner_momentum=0.9
        )


# ---------------------------------------------------------------------- ANIL
def test_anil_adaptation_freezes_the_body_and_adapts_the_head(float64):
    trainer = trainer_for(
        make_model(warpkeras.warp), anil.ANIL(optimizer=keras.optimizers.SGD(META_LR))
    )
    model = trainer.model
    body, head = model.layers[0], model.layers[1]
    assert [id(v) for v in trainer.partition.task_variables] == [id(v) for v in head.weights]
    weights = values(model.weights)
    task = make_tasks()[0]
    theta_k, _ = trainer.adapt(task, steps=K)
    report = trainer.evaluate([task], steps=K, verbose=0)
    assert_close(values(model.weights), weights, rtol=0, atol=0)  # body and θ0 unchanged

    # The adapted parameters are the head's, stepped with the body held fixed.
    params = values(body.weights) + values(head.weights)
    expected = unroll(params, [INNER_LR] * 4, task.train, adapted=(2, 3))
    theta_k = [np.asarray(t) for t in theta_k]
    assert [t.shape for t in theta_k] == [(3, 1), (1,)]
    assert_close(theta_k, expected[2:], rtol=1e-10, atol=1e-12)
    assert not np.allclose(theta_k[0], params[2])  # the head did change
    test_loss = loss_and_grads(expected, *task.test)[0]
    np.testing.assert_allclose(report["final_test_loss"]["mean"], test_loss, rtol=1e-10)
    # Adapting the body too would have given another test loss.
    assert (
        abs(loss_and_grads(unroll(params, [INNER_LR] * 4, task.train), *task.test)[0] - test_loss)
        > 1e-6
    )


@pytest.mark.parametrize("parallel", ["sequential", "vectorized"])
def test_anil_meta_step_moves_body_and_head_by_the_query_gradient(float64, parallel):
    trainer = trainer_for(
        make_model(warpkeras.warp), anil.ANIL(optimizer=keras.optimizers.SGD(META_LR)), parallel
    )
    body, head = trainer.model.layers[0], trainer.model.layers[1]
    params = values(body.weights) + values(head.weights)
    tasks = make_tasks()

    def query_loss(task, p):
        return loss_and_grads(unroll(p, [INNER_LR] * 4, task.train, adapted=(2, 3)), *task.meta)[0]

    fd = [
        np.mean(g, 0)
        for g in zip(*[central_differences(lambda p, t=t: query_loss(t, p), params) for t in tasks])
    ]
    meta_step(trainer, tasks)
    new = values(body.weights) + values(head.weights)
    assert_close([(a - b) / META_LR for a, b in zip(params, new)], fd)
    assert min(np.abs(g).max() for g in fd[:2]) > 1e-3  # the body did move


def test_anil_without_a_body_is_refused():
    with pytest.raises(MetaTrainingError, match=r"ANIL: .*warpkeras\.warp"):
        trainer_for(make_model(), anil.ANIL())


# ---------------------------------------------------------------------- the demos
@pytest.mark.parametrize("module", [meta_sgd, anil], ids=["meta_sgd", "anil"])
def test_example_smoke(module, capsys, tmp_path):
    result = module.main(["--smoke", "--output-dir", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result == json.loads((tmp_path / f"{result['example']}.json").read_text())
    assert result["meta_steps"] == 5
    assert np.isfinite(result["held_out_loss_before"])
    assert np.isfinite(result["held_out_loss_after"])
