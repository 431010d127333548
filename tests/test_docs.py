"""The documentation runs as written, and the examples start quickly and quietly.

* Every ```python block of README.md, examples/README.md and saved_models/README.md runs
  verbatim, in a namespace of its own (so each block must define every name it uses). The
  blocks of one document run in order, in one fresh interpreter and one temporary working
  folder (files a block writes, such as a SavedModel, are there for the next, as for a
  reader following the document); a block that must make the first TensorFlow call gets an
  interpreter of its own. A block fails the test if it raises or prints a NaN.
* ``python examples/<example>.py --help`` answers without importing TensorFlow.
* ``import warpkeras`` does not print TensorFlow's oneDNN notice that it causes itself.
"""

import csv
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DOCS = ("README.md", "examples/README.md", "saved_models/README.md")
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.py") if not p.name.startswith("_"))
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(doc):
    """``[(line, code)]`` of the ```python blocks of `doc` (line: 1-based, of the fence)."""
    text = (REPO / doc).read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def _block_params():
    params = []
    for doc in DOCS:
        for line, _ in python_blocks(doc):
            params.append(pytest.param(doc, line, id=f"{doc}:{line}"))
    return params


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


# Runs blocks in order, each in a fresh namespace (its own globals: every name it uses must
# be defined in it), and reports per block whether it raised and what it printed. One
# interpreter serves the blocks of a document so that TensorFlow is imported once. Each
# block's source is registered with `linecache`, as a script's would be on disk, so that
# AutoGraph can read the functions it defines.
_RUNNER = """
import contextlib, io, json, linecache, sys, traceback
blocks = json.load(open(sys.argv[1]))
results = []
for line, code in blocks:
    out = io.StringIO()
    error = None
    name = f"<block at line {line}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        error = traceback.format_exc()
    results.append({"line": line, "stdout": out.getvalue(), "error": error})
json.dump(results, open(sys.argv[2], "w"))
"""


def _run_blocks(blocks, folder):
    """Runs `blocks` (``[(line, code)]``) in one fresh interpreter; ``{line: result}``."""
    spec, report = folder / "_blocks.json", folder / "_results.json"
    spec.write_text(json.dumps(blocks))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(spec), str(report)],
        cwd=folder,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["line"]: r for r in json.loads(report.read_text())}
    spec.unlink()
    report.unlink()
    results["stderr"] = results.get("stderr", "") + proc.stderr
    return results


def _merge(into, results):
    """Adds `results` of `_run_blocks` to `into`, concatenating their ``"stderr"``."""
    stderr = into.get("stderr", "") + results.pop("stderr", "")
    into.update(results)
    into["stderr"] = stderr


@pytest.fixture(scope="module")
def doc_results(tmp_path_factory):
    """``doc -> {line: result, "folder": path}``: a document's blocks, run in order in a
    temporary folder of its own.

    A block that creates a `MultiWorkerMirroredStrategy` (which must come before any other
    TensorFlow call) runs in an interpreter of its own.
    """
    cache = {}

    def results(doc):
        if doc not in cache:
            folder = tmp_path_factory.mktemp(doc.replace("/", "_").replace(".", "_"))
            cache[doc] = {"folder": folder}
            shared = []
            for line, code in python_blocks(doc):
                if "MultiWorkerMirroredStrategy()" in code:
                    if shared:
                        _merge(cache[doc], _run_blocks(shared, folder))
                        shared = []
                    _merge(cache[doc], _run_blocks([(line, code)], folder))
                else:
                    shared.append((line, code))
            if shared:
                _merge(cache[doc], _run_blocks(shared, folder))
        return cache[doc]

    return results


def test_documents_have_python_blocks():
    assert len(python_blocks("README.md")) >= 5
    assert len(python_blocks("saved_models/README.md")) >= 3


@pytest.mark.parametrize("doc, line", _block_params())
def test_python_block_runs_verbatim(doc, line, doc_results):
    result = doc_results(doc)[line]
    assert result["error"] is None, f"{doc}, block at line {line}:\n{result['error']}"
    assert not re.search(r"\bnan\b", result["stdout"], re.I), (
        f"{doc}, block at line {line} printed NaN:\n{result['stdout'][-3000:]}"
    )


# What TensorFlow itself may print while README blocks run, explained in README.md
# ("Messages from TensorFlow"): its CPU-feature notice at the first op, and the absl banner.
_TENSORFLOW_OWN = re.compile(
    r"cpu_feature_guard|^To enable the following instructions|"
    r"^WARNING: All log messages before absl::InitializeLog"
)


@pytest.mark.parametrize("doc", DOCS)
def test_blocks_print_no_warnings(doc, doc_results):
    """No warning the library could avoid: Python warnings, TensorFlow's and Keras's
    ``WARNING`` log lines and errors; only TensorFlow's own notices remain."""
    stderr = doc_results(doc).get("stderr", "")
    lines = [row for row in stderr.splitlines() if row.strip() and not _TENSORFLOW_OWN.search(row)]
    warned = [row for row in lines if re.search(r"warn|error", row, re.I)]
    assert not warned, "\n".join(lines[-60:])


def test_meta_training_block_learns(doc_results):
    """The README's meta-training block leaves a finite, small loss in its CSV log."""
    results = doc_results("README.md")
    line = next(n for n, code in python_blocks("README.md") if "CSVLogger" in code)
    assert results[line]["error"] is None, results[line]["error"]
    with (results["folder"] / "log.csv").open() as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 2  # epochs=2 of steps_per_epoch=10 meta steps
    assert all(v == v and v < 1.0 for v in losses), losses  # no NaN, no divergence


def test_meta_training_block_run_again_resumes(doc_results, tmp_path):
    """Run a second time (with its progress output on), the block resumes from the
    checkpoint the first run wrote."""
    import shutil

    results = doc_results("README.md")
    line, code = next((n, c) for n, c in python_blocks("README.md") if "CSVLogger" in c)
    shutil.copytree(results["folder"] / "runs", tmp_path / "runs")
    again = _run_blocks([(line, code)], tmp_path)[line]
    assert again["error"] is None, again["error"]
    assert "Resumed from runs/demo/ckpt/ckpt-20 at meta step 20." in again["stdout"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_help_is_fast_and_needs_no_tensorflow(script):
    path = str(REPO / "examples" / script)
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{path!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({path!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('tensorflow loaded:', 'tensorflow' in sys.modules)\n"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: python examples/" in proc.stdout
    assert "tensorflow loaded: False" in proc.stdout
    assert seconds < 5.0, f"--help of {script} took {seconds:.1f} s"


def test_examples_readme_names_no_machine_paths():
    text = (REPO / "examples" / "README.md").read_text()
    assert not re.search(r"/work/|/home/|venv/bin/", text)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="warpkeras turns oneDNN on only on x86 CPUs",
)
@pytest.mark.parametrize("who", ["unset", "set by warpkeras in a parent", "set by the user"])
def test_import_prints_no_onednn_notice_of_its_own(who):
    env = _env()
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    env.pop("WARPKERAS_SET_ONEDNN", None)
    if who == "set by warpkeras in a parent":
        env.update(TF_ENABLE_ONEDNN_OPTS="1", WARPKERAS_SET_ONEDNN="1")
    elif who == "set by the user":
        env.update(TF_ENABLE_ONEDNN_OPTS="1")
    code = (
        "import os, warpkeras, tensorflow as tf\n"
        "tf.constant(1.0) + 1.0\n"
        "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "1"  # oneDNN is on in all three cases
    # warpkeras hides the notice only where it made the choice; a user's own choice and
    # everything else TensorFlow prints reach stderr untouched.
    assert ("oneDNN custom operations" in proc.stderr) == (who == "set by the user"), proc.stderr


def test_onednn_filter_keeps_everything_else():
    import warpkeras

    banner = (
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    )
    notice = (
        b"I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on. You may see "
        b"slightly different numerical results.\n"
    )
    other = b"I0000 00:00:1.1 1 cpu_feature_guard.cc:227] This TensorFlow binary ...\n"
    error = b"E0000 something went wrong\n"
    text = banner + notice + other + error + banner + notice
    assert warpkeras._drop_onednn_notice(text) == other + error
    assert warpkeras._drop_onednn_notice(banner + other) == banner + other
    assert warpkeras._drop_onednn_notice(b"") == b""
