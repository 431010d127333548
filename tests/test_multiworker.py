"""`MultiWorkerMirroredStrategy` with two worker processes on localhost gives, on every
worker, the φ and θ0 that one device running the whole meta-batch gives.

Each worker process runs `run_configs` (below) under the strategy and saves φ, θ0 and the
logged values; the test process runs the same function without a strategy and compares.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import REPO
from test_parallel import _model, _task

import warpkeras

META_STEPS = 2
TIMEOUT = 300  # seconds for both workers, on a loaded machine (normally ~30 s)
# The results are concatenated in replica order and the meta-gradient sums are
# all-reduced (2 + 2 tasks instead of 4 in a row): float32 rounding only.
RTOL, ATOL = 1e-5, 1e-6


def _configs():
    common = dict(inner_steps=3, inner_learning_rate=0.2, meta_batch_size=4, seed=4)
    return {
        # Warp-Leap, Algorithm 2: the replay buffer must hold all 4 tasks' θ_k
        "warp_leap_offline": lambda s: warpkeras.WarpTrainer(
            _model(),
            "mse",
            mode="offline",
            objective="exact",
            init_objective="leap",
            meta_interval=3,
            inner_momentum=0.5,
            meta_optimizer=keras.optimizers.SGD(0.1),
            strategy=s,
            **common,
        ),
        # Leap: θ0's meta-gradient is summed over all tasks
        "leap": lambda s: warpkeras.LeapTrainer(
            _model(), "mse", meta_optimizer=keras.optimizers.SGD(0.1), strategy=s, **common
        ),
        # Warp-MAML, Algorithm 1 with a meta-learned α: online warp, MAML and α gradients
        "warp_maml_online": lambda s: warpkeras.WarpTrainer(
            _model(),
            "mse",
            mode="online",
            objective="exact",
            init_objective="maml",
            learn_inner_learning_rate=True,
            meta_optimizer=keras.optimizers.SGD(0.1),
            strategy=s,
            **common,
        ),
    }


def run_configs(strategy=None):
    """Trains every configuration for `META_STEPS` meta steps; returns name -> arrays."""
    out = {}
    for name, make in _configs().items():
        trainer = make(strategy)
        history = trainer.fit(_task, meta_steps=META_STEPS, verbose=0)
        arrays = {f"phi_{i}": v.numpy() for i, v in enumerate(trainer.partition.warp_variables)}
        arrays.update(
            {f"theta0_{i}": v.numpy() for i, v in enumerate(trainer.partition.task_variables)}
        )
        arrays["inner_learning_rate"] = trainer.inner_lr.numpy()
        for key, values in history.history.items():
            if key != "seconds":
                arrays[f"log_{key}"] = np.asarray(values, dtype="float64")
        out[name] = arrays
    return out


WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import tensorflow as tf
    sys.path.insert(0, {tests!r})
    index, out_dir = int(sys.argv[1]), sys.argv[2]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # one all-reduce across the two workers: the collectives work on this platform
    total = strategy.reduce(tf.distribute.ReduceOp.SUM,
                            strategy.run(lambda: tf.constant(1.0)), axis=None)
    assert strategy.num_replicas_in_sync == 2 and float(total) == 2.0, float(total)
    print("COLLECTIVES_STARTED", flush=True)
    import test_multiworker
    results = test_multiworker.run_configs(strategy)
    for name, arrays in results.items():
        np.savez(os.path.join(out_dir, f"{{name}}.worker{{index}}.npz"), **arrays)
    print("DONE", flush=True)
    """
)


def _free_ports(n):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _worker_env(ports, index):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        PYTHONPATH=REPO,
        TF_CPP_MIN_LOG_LEVEL="2",
        KERAS_BACKEND="tensorflow",
        CUDA_VISIBLE_DEVICES="",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TF_CONFIG=json.dumps(
            {
                "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                "task": {"type": "worker", "index": index},
            }
        ),
    )
    return env


def test_two_workers_match_each_other_and_one_device(tmp_path):
    script = WORKER.format(tests=os.path.join(REPO, "tests"))
    ports = _free_ports(2)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i), str(tmp_path)],
            env=_worker_env(ports, i),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [None, None]
    try:
        # the reference, one device running the whole meta-batch, while the workers run
        single = run_configs(strategy=None)
        deadline = time.monotonic() + TIMEOUT
        for i, p in enumerate(procs):
            outputs[i] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:  # timed out (or the reference failed): stop the workers
                p.kill()
                stdout, stderr = p.communicate()
                outputs[i] = (stdout, stderr + f"\n[killed: no result within {TIMEOUT} s]")

    for i, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        if "COLLECTIVES_STARTED" not in stdout:
            pytest.skip(
                f"MultiWorkerMirroredStrategy collectives could not start on this "
                f"platform (worker {i}, exit {p.returncode}): {stderr[-1500:]}"
            )
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and "DONE" in stdout, f"worker {i}:\n{stderr[-4000:]}"

    for name, ref in single.items():
        workers = [dict(np.load(tmp_path / f"{name}.worker{i}.npz")) for i in range(2)]
        for i, got in enumerate(workers):
            assert sorted(got) == sorted(ref), (name, i)
            for key in ref:
                np.testing.assert_allclose(
                    got[key],
                    ref[key],
                    rtol=RTOL,
                    atol=ATOL,
                    err_msg=f"{name}: worker {i} vs one device, {key}",
                )
        for key in ref:
            np.testing.assert_allclose(
                workers[0][key],
                workers[1][key],
                rtol=RTOL,
                atol=ATOL,
                err_msg=f"{name}: worker 0 vs worker 1, {key}",
            )
        # the meta-updates did move θ0 (and φ, with a warp mode): the check is not vacuous
        fresh = _configs()[name](None)
        moved = lambda prefix, variables, ref=ref: [  # noqa: E731
            not np.allclose(ref[f"{prefix}_{i}"], v.numpy(), rtol=0, atol=1e-6)
            for i, v in enumerate(variables)
        ]
        assert any(moved("theta0", fresh.partition.task_variables)), name
        if fresh.warp_mode is not None:
            assert any(moved("phi", fresh.partition.warp_variables)), name
    # 4 tasks × (K + 1 = 4) stored points θ_0 … θ_K, in mini-batches of η = 3: 5 full + 1
    assert single["warp_leap_offline"]["log_warp_updates"].tolist() == [6.0] * META_STEPS
