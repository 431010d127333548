"""Wall time of the examples' runs, with the machine they ran on: the figures behind the
times README.md and examples/README.md state.

Each example runs as a reader runs it (``python examples/<example>.py [flags]``, in a fresh
interpreter), with its results and SavedModel written to a temporary folder so that nothing
under ``results/`` or ``saved_models/`` is replaced. The JSON printed (and written to
``bench/results/example_times.json``, or ``--out``) holds, per run, the command, the wall
seconds, the exit status and the 1-minute load average before and after; and the CPU model,
its AVX2 / AVX-512 flags, the number of cores and the TensorFlow version. Figures for the
README come from an idle machine (``--wait-idle``), and a time stated there names the CPU.

    python bench/example_times.py continual_sine                 # the README's main job
    python bench/example_times.py synthetic_surfaces few_shot maze_navigation --wait-idle 600
    python bench/example_times.py continual_sine --args="--smoke" --out -   # seconds
"""

import importlib.metadata
import os
import shlex
import subprocess
import sys
import tempfile
import time

import _common

EXAMPLES_DIR = os.path.join(_common.REPO, "examples")


def available_examples():
    """The example scripts (``examples/<name>.py``, not the ``_`` helpers), by name."""
    return sorted(
        f[:-3] for f in os.listdir(EXAMPLES_DIR) if f.endswith(".py") and not f.startswith("_")
    )


def time_example(name, extra_args, workdir):
    """Runs one example as a reader would and returns what it cost.

    Args:
        name: the example's name (``"continual_sine"``).
        extra_args: list of str, flags added after the script (``[]``: its defaults).
        workdir: a folder for its results and SavedModel.

    Returns:
        A dict: ``command`` (str, as a reader types it), ``wall_s`` (float), ``returncode``
        (int), ``load_1m_before`` / ``load_1m_after`` (float) and ``stderr_tail`` (str, the
        end of its error output when it failed).
    """
    script = os.path.join(EXAMPLES_DIR, f"{name}.py")
    out_args = [
        "--output-dir",
        os.path.join(workdir, "results", name),
        "--export-dir",
        os.path.join(workdir, "saved_models", name),
    ]
    command = [sys.executable, script, *extra_args, *out_args]
    before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(
        command, cwd=_common.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wall = time.perf_counter() - start
    after = os.getloadavg()[0]
    return {
        "example": name,
        "command": " ".join(["python", f"examples/{name}.py", *map(shlex.quote, extra_args)]),
        "wall_s": round(wall, 1),
        "wall_min": round(wall / 60, 2),
        "returncode": proc.returncode,
        "load_1m_before": round(before, 2),
        "load_1m_after": round(after, 2),
        "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
    }


def _installed_version(*distributions):
    """The version of the first of `distributions` that is installed (without importing it)."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def main():
    p = _common.parser(__doc__.split("\n\n")[0], "example_times")
    p.add_argument(
        "examples",
        nargs="+",
        metavar="EXAMPLE",
        help=f"example names: {', '.join(available_examples())}",
    )
    p.add_argument(
        "--args",
        default="",
        help="flags for every example, as one string (default: none, the example's default run)",
    )
    args = p.parse_args()
    unknown = sorted(set(args.examples) - set(available_examples()))
    if unknown:
        p.error(f"unknown example(s) {unknown}; choose from {available_examples()}")
    started = time.time()
    waited = _common.wait_idle(args.wait_idle) if args.wait_idle else None
    cpu = _common.cpu_info()
    result = {
        "benchmark": "example_times",
        "cpu_model": cpu["model"],
        "avx2": "avx2" in cpu["flags"],
        "avx512f": "avx512f" in cpu["flags"],
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "hypervisor": cpu["hypervisor"],
        "python": sys.version.split()[0],
        "wait_idle": waited,
        "load_at_start": _common.load(),
        "runs": [],
    }
    result["tensorflow"] = _installed_version("tensorflow", "tensorflow-cpu")
    extra = shlex.split(args.args)
    with tempfile.TemporaryDirectory(prefix="warpkeras-example-times-") as workdir:
        for name in args.examples:
            run = time_example(name, extra, workdir)
            result["runs"].append(run)
            print(
                f"{run['command']}: {run['wall_s']} s (exit {run['returncode']}, load "
                f"{run['load_1m_before']} -> {run['load_1m_after']})",
                file=sys.stderr,
                flush=True,
            )
    _common.finish("example_times", result, args.out, started)
    if any(r["returncode"] for r in result["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
