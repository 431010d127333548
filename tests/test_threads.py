"""warpkeras's default TensorFlow thread pools (warpkeras/_threads.py) and the user's own.

Thread pools are fixed when TensorFlow's runtime starts, so the import-time behaviour is
checked in fresh Python processes (started together, pinned to 2 CPUs so that the result
does not depend on the machine's core count); the decision logic in this process.
"""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from warpkeras import _threads

# what `import warpkeras` did in this process, restored after the tests that call again
RECORD = (_threads.applied, _threads.reason)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Pins the child to 2 CPUs, runs `body` (which imports warpkeras), runs an op (the runtime
# starts with the pools set by then) and prints the pools and warpkeras's record.
_CHILD = """
import json, os
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
{body}
import tensorflow as tf
from warpkeras import _threads
tf.constant(1.0) + 1.0
print("RESULT " + json.dumps({{
    "inter": tf.config.threading.get_inter_op_parallelism_threads(),
    "intra": tf.config.threading.get_intra_op_parallelism_threads(),
    "applied": _threads.applied, "reason": _threads.reason}}))
"""

CASES = {
    "default": ({}, "import warpkeras"),
    "user_env_interop": ({"TF_NUM_INTEROP_THREADS": "2"}, "import warpkeras"),
    "user_env_omp": ({"OMP_NUM_THREADS": "2"}, "import warpkeras"),
    "opt_out": ({"WARPKERAS_SET_THREADS": "0"}, "import warpkeras"),
    "user_config_before": ({}, "import tensorflow as tf\n"
                               "tf.config.threading.set_intra_op_parallelism_threads(1)\n"
                               "import warpkeras"),
    "user_config_after": ({}, "import warpkeras\nimport tensorflow as tf\n"
                              "tf.config.threading.set_inter_op_parallelism_threads(2)"),
}


@pytest.fixture(scope="module")
def children():
    """Runs every case in its own fresh process, all at once; name -> printed record."""
    procs = {}
    for name, (env_extra, body) in CASES.items():
        env = {k: v for k, v in os.environ.items()
               if k not in _threads.USER_ENV and k != _threads.OPT_OUT}
        env.update(env_extra, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
        procs[name] = subprocess.Popen([sys.executable, "-c", _CHILD.format(body=body)],
                                       env=env, cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{name}: {stderr[-2000:]}"
        out[name] = json.loads(lines[-1][len("RESULT "):])
    return out


def test_default_applied_in_fresh_process(children):
    r = children["default"]
    assert r["applied"] == {"inter_op_parallelism_threads": _threads.INTER_OP}, r["reason"]
    assert r["inter"] == _threads.INTER_OP
    assert r["intra"] == 0  # TensorFlow's default: one per core


@pytest.mark.parametrize("case", ["user_env_interop", "user_env_omp"])
def test_user_environment_respected(children, case):
    r = children[case]
    assert r["applied"] is None
    assert (r["inter"], r["intra"]) == (0, 0)  # left to TensorFlow, which reads the env
    assert CASES[case][0].popitem()[0] in r["reason"]


def test_opt_out_respected(children):
    r = children["opt_out"]
    assert r["applied"] is None and "opt-out" in r["reason"]
    assert (r["inter"], r["intra"]) == (0, 0)


def test_user_config_before_import_respected(children):
    r = children["user_config_before"]
    assert r["applied"] is None and "tf.config.threading" in r["reason"]
    assert (r["inter"], r["intra"]) == (0, 1)


def test_user_config_after_import_wins(children):
    r = children["user_config_after"]
    assert r["inter"] == 2


@pytest.mark.parametrize("var", _threads.USER_ENV)
def test_each_user_variable_blocks_the_default(var):
    try:
        assert _threads.apply_default(environ={var: "3"}) is None
        assert var in _threads.reason
    finally:
        _threads.applied, _threads.reason = RECORD


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_opt_out_values(value):
    try:
        assert _threads.apply_default(environ={_threads.OPT_OUT: value}) is None
        assert "opt-out" in _threads.reason
    finally:
        _threads.applied, _threads.reason = RECORD


def test_large_machines_and_initialised_runtime_left_alone(monkeypatch):
    before = tf.config.threading.get_inter_op_parallelism_threads()
    try:
        monkeypatch.setattr(_threads, "usable_cores", lambda: _threads.MAX_CORES + 1)
        assert _threads.apply_default(environ={}) is None
        assert "usable cores" in _threads.reason
        monkeypatch.setattr(_threads, "usable_cores", lambda: 2)
        tf.constant(1.0) + 1.0  # this process's runtime is running
        # as if nothing had been set before the runtime started, with a value that differs
        # from the running one
        monkeypatch.setattr(tf.config.threading, "get_inter_op_parallelism_threads", lambda: 0)
        monkeypatch.setattr(tf.config.threading, "get_intra_op_parallelism_threads", lambda: 0)
        monkeypatch.setattr(_threads, "INTER_OP", before + 3)
        assert _threads.apply_default(environ={}) is None
        assert "already initialised" in _threads.reason
        monkeypatch.undo()
        assert tf.config.threading.get_inter_op_parallelism_threads() == before
    finally:
        _threads.applied, _threads.reason = RECORD
