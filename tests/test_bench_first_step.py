"""bench/first_step.py: one cell in a child process gives every field, with the split of
the first meta step into tracing and compiled calls hooked and consistent."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_cell_reports_first_and_steady_steps_and_their_split():
    cell = {
        "model": "mlp",
        "trainer": "leap",
        "executor": "default",
        "k": 2,
        "meta_batch": 1,
        "steady": 1,
    }
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "first_step.py"), "--cell", json.dumps(cell)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CELL ")][-1]
    record = json.loads(line[5:])
    split = record["first_step_split"]
    assert split["hooked"], "TensorFlow's tracing / call entry points were not found"
    # a fresh trainer traces its step: both parts are positive and within the first step
    assert 0 < split["tracing_s"] and 0 < split["execution_s"]
    assert split["tracing_s"] + split["execution_s"] <= record["first_step_s"]
    assert 0 < record["steady_step_s"] < record["first_step_s"]
    assert record["keras_first_fit_step_s"] > 0
    assert record["second_trainer_first_step_s"] > 0
    assert record["ratio_first_to_keras"] == round(
        record["first_step_s"] / record["keras_first_fit_step_s"], 2
    )
    assert record["retracing_warnings"] >= 0
