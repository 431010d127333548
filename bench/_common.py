"""Shared helpers of the benchmark scripts (not a benchmark itself).

* `setup()` puts the repository root on ``sys.path`` and quietens TensorFlow's logging;
* `machine_info()` records what the figures were measured on (CPU model and flags, cores,
  clock, TensorFlow / Keras versions, thread pools, load, date, commit);
* `omniglot_model()` builds the papers' Omniglot network (4 blocks of 3x3 conv 64 "same",
  2x2 max-pool, batch norm, ReLU; flatten; Dense(20)), with a `WarpConv2D(kernel_size=3)`
  after each block for Warp-Leap;
* `synthetic_tasks()` makes Omniglot-shaped random 20-way tasks (no download);
* `conv_flops()` counts the model's multiply-adds by hand;
* `interleave()` times several variants round-robin and reports medians, so that the
  ratios between them are measured under the same (possibly varying) machine load;
* `finish()` prints the result as JSON and writes ``bench/results/<name>.json``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
SHARED_OMNIGLOT = os.path.join(os.path.dirname(REPO), "shared", "data", "omniglot")

# FP32 peak, in GFLOP/s, quoted for the 2-core reference machine the figures in
# bench/README.md were planned for (AVX-512, 2 FMA units); `fma_peak()` gives the peak
# implied by the CPU flags and clock the kernel actually reports.
REFERENCE_PEAK_GFLOPS = 532.0

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 20
TASK_BATCH = 20


def setup():
    """Makes `import warpkeras` work from a checkout and silences TensorFlow's C++ logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    # before TensorFlow loads, as a user's program would: warpkeras picks the CPU kernels
    import warpkeras  # noqa: F401


def parser(description, name):
    """An argument parser with the flags every benchmark shares."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a fast, rougher run (< 1 minute)")
    p.add_argument(
        "--out",
        default=os.path.join(RESULTS_DIR, f"{name}.json"),
        help="where to write the JSON result (default: %(default)s); '-' for stdout only",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-minute load average to drop "
        "below 1.5 (other jobs on the machine distort absolute figures)",
    )
    return p


def wait_idle(max_seconds, threshold=1.5, poll=15):
    """Waits until the 1-minute load average is below `threshold` (or `max_seconds` pass).
    Returns the seconds waited and the load when the wait ended."""
    start = time.time()
    while max_seconds and time.time() - start < max_seconds:
        if os.getloadavg()[0] < threshold:
            break
        time.sleep(poll)
    return {"waited_s": round(time.time() - start, 1), "load": load()}


# ----------------------------------------------------------------------------------------
# machine


def cpu_info(text=None):
    """The CPU as the Linux kernel describes it in ``/proc/cpuinfo`` (what ``lscpu`` reads).

    Args:
        text: the file's contents (for tests); by default ``/proc/cpuinfo`` is read.

    Returns:
        A dict: ``model`` (str), ``family_model`` (``"family/model"``), ``flags`` (set of
        str, e.g. ``{"avx2", "fma", ...}``), ``mhz`` (float, the highest current clock over
        the logical CPUs, or None), ``threads_per_core`` (int or None) and ``hypervisor``
        (bool: the kernel runs under one). Empty values where the file is missing (not
        Linux).
    """
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            text = ""
    blocks = []
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if fields:
            blocks.append(fields)
    first = blocks[0] if blocks else {}
    flags = set(first.get("flags", "").split())
    mhz = [float(b["cpu MHz"]) for b in blocks if b.get("cpu MHz")]
    try:
        threads = int(first["siblings"]) // int(first["cpu cores"])
    except (KeyError, ValueError, ZeroDivisionError):
        threads = None
    return {
        "model": first.get("model name", platform.processor()),
        "family_model": f"{first.get('cpu family', '?')}/{first.get('model', '?')}",
        "flags": flags,
        "mhz": max(mhz) if mhz else None,
        "threads_per_core": threads,
        "hypervisor": "hypervisor" in flags,
    }


def load():
    """(1, 5, 15)-minute load averages and the number of CPUs."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        one = five = fifteen = float("nan")
    return {
        "loadavg_1m": round(one, 2),
        "loadavg_5m": round(five, 2),
        "loadavg_15m": round(fifteen, 2),
        "cpus": os.cpu_count(),
    }


def uptime_text():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def fma_peak(cores, mhz, flags):
    """FP32 peak in GFLOP/s from the kernel's view of the CPU: cores × clock × FLOPs/cycle,
    with 2 FMA pipes of 256-bit (AVX2, 16 FLOPs each) or of 512-bit when AVX-512F is
    reported. A boost clock above the reported one would raise it."""
    if not mhz:
        return None
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags or "avx" in flags else 4
    flops_per_cycle = 2 * lanes * (2 if "fma" in flags else 1)  # 2 pipes × lanes × (mul+add)
    return {
        "gflops": round(cores * mhz / 1e3 * flops_per_cycle, 1),
        "cores": cores,
        "mhz": mhz,
        "flops_per_cycle_per_core": flops_per_cycle,
        "simd": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other",
    }


def machine_info(wait_idle_s=0):
    """What the figures were measured on (after waiting for an idle machine if asked)."""
    waited = wait_idle(wait_idle_s) if wait_idle_s else None
    import keras
    import numpy as np
    import tensorflow as tf

    cpu = cpu_info()
    flags, mhz = cpu["flags"], cpu["mhz"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        commit = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu["model"],
        "cpu_family_model": cpu["family_model"],
        "cores": cores,
        "threads_per_core": cpu["threads_per_core"],
        "cpu_mhz": mhz,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "fma": "fma" in flags,
        "hypervisor": cpu["hypervisor"],
        "fma_peak_from_flags": fma_peak(cores, mhz, flags),
        "reference_peak_gflops": REFERENCE_PEAK_GFLOPS,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "TF_ENABLE_ONEDNN_OPTS": onednn if onednn is not None else "(unset: TF default)",
        "warpkeras_commit": commit,
        "wait_idle": waited,
        "load_at_start": load(),
        "uptime_at_start": uptime_text(),
    }


# ----------------------------------------------------------------------------------------
# model and data


def omniglot_model(warp=True, bn="exact", seed=0):
    """The papers' Omniglot network (Leap / WarpGrad App. F), built and seeded.

    Args:
        warp: insert `WarpConv2D(kernel_size=3)` after each block (Warp-Leap).
        bn: ``"exact"`` (`warpkeras.layers.ExactBatchNormalization`, exact second
            derivatives) or ``"keras"`` (`keras.layers.BatchNormalization`).
        seed: weight seed.
    """
    import keras

    from warpkeras.layers import ExactBatchNormalization, WarpConv2D

    keras.utils.set_random_seed(seed)
    layers = [keras.Input(IMAGE_SHAPE)]
    for _ in range(4):
        norm = ExactBatchNormalization() if bn == "exact" else keras.layers.BatchNormalization()
        layers += [
            keras.layers.Conv2D(64, 3, padding="same"),
            keras.layers.MaxPooling2D(2),
            norm,
            keras.layers.ReLU(),
        ]
        if warp:
            layers.append(WarpConv2D(kernel_size=3))
    layers += [keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)]
    return keras.Sequential(layers)


def loss_fn():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def synthetic_arrays(rng, n_per_class=15, n_test_per_class=5):
    """Random 28x28 images in [0, 1] with 20 balanced labels (Omniglot's 15 + 5 per class)."""
    import numpy as np

    def part(k):
        x = rng.random((NUM_CLASSES * k,) + IMAGE_SHAPE, dtype=np.float32)
        y = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), k)
        return x, y

    return part(n_per_class), part(n_test_per_class)


def synthetic_tasks(n, seed=0, batch_size=TASK_BATCH, augment=None):
    """`n` random Omniglot-shaped `warpkeras.Task`s (300 training, 100 test images each)."""
    import numpy as np

    import warpkeras

    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(n):
        train, test = synthetic_arrays(rng)
        tasks.append(
            warpkeras.Task(
                train=train, test=test, batch_size=batch_size, augment=augment, name=f"synthetic{i}"
            )
        )
    return tasks


def conv_flops(warp=True, batch=TASK_BATCH):
    """FLOPs of one forward pass of `omniglot_model` by hand.

    A 3x3 "same" convolution costs 2·H·W·Cin·Cout·9 FLOPs per image (a multiply-add is 2
    FLOPs) at its output size H×W. Sizes: conv 28² (1→64), 14², 7², 3² (64→64); warp convs
    after each pool at 14², 7², 3², 1² (64→64); Dense 64→20. Batch norm, ReLU, pooling
    and the loss are elementwise (< 1% of the total) and not counted.
    """
    task = [(28, 1, 64), (14, 64, 64), (7, 64, 64), (3, 64, 64)]
    warps = [(14, 64, 64), (7, 64, 64), (3, 64, 64), (1, 64, 64)] if warp else []
    per_image_task = sum(2 * s * s * ci * co * 9 for s, ci, co in task) + 2 * 64 * NUM_CLASSES
    per_image_warp = sum(2 * s * s * ci * co * 9 for s, ci, co in warps)
    fwd = batch * (per_image_task + per_image_warp)
    # backward = input gradient + weight gradient, each the cost of the forward (the first
    # conv needs no input gradient: its share is 0.9 MFLOP/image, about 2% of the total)
    first_conv_input_grad = batch * 2 * 28 * 28 * 1 * 64 * 9
    return {
        "forward": fwd,
        "forward_task_layers": batch * per_image_task,
        "forward_warp_layers": batch * per_image_warp,
        "train_step_3x_forward": 3 * fwd,
        "train_step_exact": 3 * fwd - first_conv_input_grad,
        "rule": "conv FLOPs = 2*H*W*Cin*Cout*9 per image per forward; a training step "
        "(forward + input-gradient + weight-gradient) counted as 3x the forward",
    }


# ----------------------------------------------------------------------------------------
# timing


def median(values):
    return statistics.median(values) if values else float("nan")


def time_calls(fn, n, sync=None):
    """Seconds per call of `fn` over `n` back-to-back calls (`sync(result)` at the end waits
    for asynchronous work)."""
    start = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    if sync is not None:
        sync(out)
    return (time.perf_counter() - start) / n


def interleave(variants, rounds, calls, warmup=2, sync=None):
    """Times each variant `calls` times per round, round-robin over `rounds` rounds.

    Args:
        variants: dict name -> zero-argument callable.
        rounds: rounds (each gives one sample per variant).
        calls: calls per sample.
        warmup: untimed calls of each variant first (tracing, compilation).
        sync: called on the last result of a sample (e.g. ``.numpy()``).

    Returns:
        dict name -> {"median_s", "min_s", "samples_s"} (seconds per call).
    """
    for fn in variants.values():
        for _ in range(warmup):
            out = fn()
        if sync is not None:
            sync(out)
    samples = {k: [] for k in variants}
    for r in range(rounds):
        names = list(variants)
        if r % 2:  # alternate the order so that no variant always follows the same one
            names.reverse()
        for name in names:
            samples[name].append(time_calls(variants[name], calls, sync))
    return {
        k: {"median_s": median(v), "min_s": min(v), "samples_s": [round(s, 6) for s in v]}
        for k, v in samples.items()
    }


def sync_numpy(out):
    """Waits for a result: converts the first tensor found in it to numpy."""
    import tensorflow as tf

    stack = [out]
    while stack:
        item = stack.pop(0)
        if isinstance(item, (tf.Tensor, tf.Variable)):
            item.numpy()
            return
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def matmul_rate(seconds=3.0, n=2048):
    """GFLOP/s of a compiled n×n float32 matmul (2n³ FLOPs), median of ~`seconds` of runs."""
    import tensorflow as tf

    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)
    mm = tf.function(lambda a, b: tf.matmul(a, b))
    mm(a, b).numpy()
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(samples) < 3:
        t = time.perf_counter()
        mm(a, b).numpy()
        samples.append(time.perf_counter() - t)
    s = median(samples)
    return {
        "n": n,
        "median_s": s,
        "gflops": 2 * n**3 / s / 1e9,
        "best_gflops": 2 * n**3 / min(samples) / 1e9,
    }


def write_text(path, text):
    """Writes `text` to `path` as a whole or not at all: a temporary file beside it (mode
    0o666 less the umask) replaces it in one rename, so a killed run leaves the earlier
    result intact."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def finish(name, result, out_path, started):
    """Adds load and wall time, writes the JSON file and prints it."""
    result["load_at_end"] = load()
    result["uptime_at_end"] = uptime_text()
    result["wall_seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=1, sort_keys=False, default=_json_default)
    if out_path and out_path != "-":
        write_text(out_path, text + "\n")
    print(text, flush=True)


def _json_default(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def ratio(a, b):
    return round(a / b, 3) if b else None


def min_ratios(timings, pairs):
    """Ratios of the fastest samples: under bursty interference from other jobs (which
    only ever adds time) the minimum over interleaved samples is the steadier estimate."""
    return {
        name: ratio(timings[a]["min_s"], timings[b]["min_s"])
        for name, (a, b) in pairs.items()
        if a in timings and b in timings
    }


# ----------------------------------------------------------------------------------------
# profiling


def _op_type(name):
    """'scope/op_name:OpType' -> 'OpType' for TensorFlow op events of the profiler.

    Op types may start with ``_``: TensorFlow's internal kernels do, among them every
    oneDNN kernel (``_MklNativeConv2D``, ``_MklFusedMatMul``, ...), which do the work when
    oneDNN is on. Other events (``::``-scoped C++ functions, names with spaces) give None.
    """
    if ":" not in name or "::" in name:
        return None
    kind = name.rsplit(":", 1)[1]
    return kind if kind.lstrip("_")[:1].isalpha() and " " not in kind else None


def profile_ops(fn, calls, logdir, sync=None, top=12):
    """Runs `fn` `calls` times under `tf.profiler` and splits the wall time into kernel time
    (per TensorFlow op type) and the rest (Python, dispatch, gaps between kernels).

    Returns a dict: wall per call, busy per call (union of the intervals in which at least
    one op kernel runs), idle share, and per op type the kernel time per call (summed over
    threads; two inter-op threads can overlap, so the sum can exceed the busy time).
    """
    import glob
    import shutil

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    shutil.rmtree(logdir, ignore_errors=True)
    out = fn()
    if sync is not None:
        sync(out)
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(calls):
        out = fn()
    if sync is not None:
        sync(out)
    wall = time.perf_counter() - start
    tf.profiler.experimental.stop()
    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {"error": "no profile written"}
    space = xplane_pb2.XSpace()
    with open(files[0], "rb") as f:
        space.ParseFromString(f.read())
    by_type, by_name, intervals = {}, {}, []
    for plane in space.planes:
        meta = plane.event_metadata
        for line in plane.lines:
            for ev in line.events:
                name = meta[ev.metadata_id].name
                kind = _op_type(name)
                if kind is None:
                    continue
                ms = ev.duration_ps / 1e9
                by_type[kind] = by_type.get(kind, 0.0) + ms
                by_name[name] = by_name.get(name, 0.0) + ms
                begin = line.timestamp_ns + ev.offset_ps / 1e3
                intervals.append((begin, begin + ev.duration_ps / 1e3))
    intervals.sort()
    busy, cur_b, cur_e = 0.0, None, None
    for b, e in intervals:
        if cur_e is None or b > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_b
            cur_b, cur_e = b, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_b
    shutil.rmtree(logdir, ignore_errors=True)
    total = sum(by_type.values())
    wall_ms = wall * 1e3 / calls
    busy_ms = busy / 1e6 / calls
    types = sorted(by_type.items(), key=lambda kv: -kv[1])
    names = sorted(by_name.items(), key=lambda kv: -kv[1])
    return {
        "calls": calls,
        "wall_ms_per_call": round(wall_ms, 3),
        "kernel_busy_ms_per_call": round(busy_ms, 3),
        "not_in_kernels_share": round(1 - busy_ms / wall_ms, 3) if wall_ms else None,
        "kernel_ms_per_call_summed_over_threads": round(total / calls, 3),
        "op_types_ms_per_call": {k: round(v / calls, 3) for k, v in types[:top]},
        "op_types_share": {k: round(v / total, 3) for k, v in types[:top]} if total else {},
        "top_ops_ms_per_call": {k: round(v / calls, 3) for k, v in names[:top]},
    }


# ----------------------------------------------------------------------------------------
# the trainer's compiled per-step functions


class Engine:
    """The compiled per-step functions of a `MetaTrainer`, called as the trainer calls them.

    The engine's private function names have changed as it was optimised; this adapter
    finds the current ones so that the benchmarks keep measuring the same things:

    * ``inner``: one inner step of one task with φ frozen — ``_plain_step`` (what `adapt`,
      `evaluate` and fine-tuning call per step; older engines: ``_inner_step``);
    * ``meta_inner``: one adaptation step as meta-training runs it — ``_group_step`` on a
      group of one task (the carry holds the Leap / online-warp accumulators, updated in the
      same call); `None` on engines without it;
    * ``warp_point``: ∇φ of Eq. 3 at a stored θ — ``_warp_point`` (older: ``_warp_step``);
      `None` without a warp mode.

    Each is a zero-argument callable; `names` records which functions were found.
    """

    def __init__(self, trainer, x, y, meta_batch=None):
        import numpy as np

        self.trainer = tr = trainer
        meta_batch = meta_batch if meta_batch is not None else (x, y)
        self.theta, self.velocity, self.state = tr._start_values()
        t, v, s = self.theta, self.velocity, self.state
        self.names = {}
        if hasattr(tr, "_plain_step"):
            self.inner_function = tr._plain_step
            self.inner_args = (t, v, s, x, y)
            self.names["inner"] = "_plain_step"
        else:
            self.inner_function = tr._inner_step
            self.inner_args = (t, v, s, x, y)
            self.names["inner"] = "_inner_step"
        self.inner = lambda: self.inner_function(*self.inner_args)
        self.meta_inner = None
        if hasattr(tr, "_group_step") and hasattr(tr, "_initial_carry"):
            carry = tr._initial_carry(1)
            gx, gy = np.asarray(x)[None], np.asarray(y)[None]
            online = tr.warp_mode in ("online", "continual")
            gm = tuple(np.asarray(m)[None] for m in meta_batch) if online else ()
            self.meta_inner = lambda: tr._group_step(carry, gx, gy, gm)
            self.names["meta_inner"] = "_group_step"
        self.warp_point = None
        if tr.warp_mode is not None:
            if hasattr(tr, "_warp_point"):
                self.warp_point = lambda: tr._warp_point(t, v, s, x, y, meta_batch)
                self.names["warp_point"] = "_warp_point"
            else:
                self.warp_point = lambda: tr._warp_step(t, v, s, x, y, meta_batch)
                self.names["warp_point"] = "_warp_step"

    def advanced_theta(self, batches, steps):
        """θ after `steps` inner steps from θ0 (a realistic stored point)."""
        theta, velocity, state = self.theta, self.velocity, self.state
        for _ in range(steps):
            x, y = next(batches)
            out = self.inner_function(theta, velocity, state, x, y)
            theta, velocity, state = out[0], out[1], out[2]
        return theta, velocity, state
