"""What ``import warpkeras`` costs on top of ``import tensorflow, keras``.

Each round starts two fresh interpreters, one after the other in alternating order: one
runs ``import tensorflow, keras``, the other ``import warpkeras`` (which imports both); each
times its own import with ``time.perf_counter``. The medians over the rounds and their
difference (and those of the fastest runs, the least disturbed by other load) are printed
as JSON (and written to ``bench/results/import_time.json``), with
the CPU, the load before and after, and the modules ``import warpkeras`` loads beyond the
baseline (none of tensorflow_datasets, tensorflow_probability, gymnasium or matplotlib
should be among them). The target is a difference of at most 0.5 s.

Both interpreters see the same environment. warpkeras sets ``TF_ENABLE_ONEDNN_OPTS=1`` on
x86 CPUs when it is unset (README, "Import-time settings"); ``--onednn 0`` or ``1`` sets it
for both, so that only the import itself is compared.

    python bench/import_time.py                 # 7 rounds
    python bench/import_time.py --quick --out -  # 3 rounds, print only
"""

import json
import os
import statistics
import subprocess
import sys
import time

import _common

OPTIONAL = ("tensorflow_datasets", "tensorflow_probability", "gymnasium", "matplotlib")

_TIMED = """
import sys, time, json
before = set(sys.modules)
start = time.perf_counter()
import {what}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "modules": sorted(set(sys.modules) - before)}}))
"""


def _time_import(what, env):
    proc = subprocess.run(
        [sys.executable, "-c", _TIMED.format(what=what)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`import {what}` failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = _common.parser(__doc__.split("\n\n")[0], "import_time")
    p.add_argument("--rounds", type=int, default=7, help="interpreter pairs (default: 7)")
    p.add_argument(
        "--onednn",
        choices=("0", "1"),
        help="set TF_ENABLE_ONEDNN_OPTS for both imports (default: as inherited)",
    )
    args = p.parse_args()
    rounds = 3 if args.quick else args.rounds
    started = time.time()
    waited = _common.wait_idle(args.wait_idle) if args.wait_idle else None

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_common.REPO, env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    for key in ("WARPKERAS_SET_ONEDNN",):
        env.pop(key, None)
    if args.onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = args.onednn

    cpu = _common.cpu_info()
    result = {
        "cpu_model": cpu["model"],
        "avx2": "avx2" in cpu["flags"],
        "avx512f": "avx512f" in cpu["flags"],
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "TF_ENABLE_ONEDNN_OPTS": env.get("TF_ENABLE_ONEDNN_OPTS", "(unset)"),
        "rounds": rounds,
        "wait_idle": waited,
        "load_at_start": _common.load(),
    }
    baseline, warpkeras = [], []
    added = set()
    for r in range(rounds):
        order = ("base", "warp") if r % 2 == 0 else ("warp", "base")
        for which in order:
            if which == "base":
                out = _time_import("tensorflow, keras", env)
                baseline.append(out["seconds"])
                base_modules = set(out["modules"])
            else:
                out = _time_import("warpkeras", env)
                warpkeras.append(out["seconds"])
                warp_modules = set(out["modules"])
        added |= warp_modules - base_modules
    result["import_tensorflow_keras_s"] = [round(s, 3) for s in baseline]
    result["import_warpkeras_s"] = [round(s, 3) for s in warpkeras]
    result["median_tensorflow_keras_s"] = round(statistics.median(baseline), 3)
    result["median_warpkeras_s"] = round(statistics.median(warpkeras), 3)
    result["difference_s"] = round(statistics.median(warpkeras) - statistics.median(baseline), 3)
    result["within_0_5_s"] = result["difference_s"] <= 0.5
    # The fastest of several runs is the least disturbed by other load on the machine.
    result["min_tensorflow_keras_s"] = round(min(baseline), 3)
    result["min_warpkeras_s"] = round(min(warpkeras), 3)
    result["difference_of_minimums_s"] = round(min(warpkeras) - min(baseline), 3)
    third_party = sorted({m.split(".")[0] for m in added} - {"warpkeras"})
    result["top_level_modules_added_besides_warpkeras"] = third_party
    result["optional_modules_loaded"] = sorted(
        m for m in OPTIONAL if any(a == m or a.startswith(m + ".") for a in added)
    )
    _common.finish("import_time", result, args.out, started)


if __name__ == "__main__":
    main()
