"""Helpers shared by the example scripts in this folder (not part of the warpkeras API).

Each example is a script, ``python examples/<example>.py --help``, with the same basics:

* ``--output-dir`` (default ``results/<example>/`` under the repository root) receives a
  results JSON and PNG plots (matplotlib, Agg backend: no display needed);
* ``--export-dir`` (default ``saved_models/<example>/``) receives the exported SavedModel,
  ``--no-export`` skips it;
* ``--seeds 0,1,2`` repeats the experiment over seeds, ``--smoke`` runs a tiny
  configuration in seconds, ``--verbose 0|1|2`` controls progress output.

Importing this module makes ``import warpkeras`` work from a source checkout (it puts the
repository root on ``sys.path``), selects the TensorFlow backend of Keras, quietens
TensorFlow's C++ information and warning logs unless ``TF_CPP_MIN_LOG_LEVEL`` is set (errors
still show) and selects matplotlib's Agg backend. It
imports neither TensorFlow nor warpkeras, so that an example can answer ``--help`` before
loading them; examples import warpkeras before TensorFlow (it chooses TensorFlow's CPU
kernels when it is first).
"""

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
"""The repository root (the folder holding ``warpkeras/`` and ``examples/``)."""

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402


# -- command line --------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows defaults in ``--help`` (unless the
    default is None or False, or the help text already talks about its default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


def make_parser(example, description):
    """An `argparse.ArgumentParser` for an example, with the common arguments added.

    Args:
        example: the example's name (``"omniglot"``); names the default output folders.
        description: the text shown by ``--help`` (line breaks are kept).

    Returns:
        The parser; add the example's own arguments to it.
    """
    parser = argparse.ArgumentParser(
        prog=f"python examples/{example}.py",
        description=description,
        formatter_class=HelpFormatter,
    )
    common = parser.add_argument_group("output and run control")
    common.add_argument(
        "--output-dir",
        default=None,
        help=f"folder for the results JSON and plots (default: <repo>/results/{example})",
    )
    common.add_argument(
        "--export-dir",
        default=None,
        help=f"folder of the exported SavedModel (default: <repo>/saved_models/{example})",
    )
    common.add_argument("--no-export", action="store_true", help="do not export a SavedModel")
    common.add_argument(
        "--seeds",
        type=int_list,
        default=None,
        help="comma-separated seeds; each seed repeats the whole experiment "
        "(default: the preset's)",
    )
    common.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny configuration that runs end-to-end in seconds (for tests)",
    )
    common.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="0: quiet, 1: progress bars, 2: one line per meta step",
    )
    return parser


def demo_parser(
    example,
    description,
    meta_steps,
    inner_steps,
    inner_lr,
    meta_lr,
    inner_steps_help=None,
    inner_lr_help=None,
    meta_lr_help=None,
    maml_help=None,
):
    """An `argparse.ArgumentParser` for a small one-seed demo of a meta-objective against
    MAML (``examples/meta_sgd.py``, ``examples/anil.py``), with its default sizes.

    Unlike `make_parser`, it has one ``--seed``, no export and a quiet default; the demo
    prints one JSON line and writes it with `finish_demo`.

    Args:
        example: the demo's name (``"anil"``).
        description: the text shown by ``--help``.
        meta_steps, inner_steps: default meta steps and adaptation steps K (ints).
        inner_lr, meta_lr: default inner learning rate α and meta (Adam) learning rate.
        inner_steps_help, inner_lr_help, meta_lr_help, maml_help: help texts (str or None).

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog=f"python examples/{example}.py", description=description, formatter_class=HelpFormatter
    )
    parser.add_argument("--meta-steps", type=int, default=meta_steps)
    parser.add_argument("--inner-steps", type=int, default=inner_steps, help=inner_steps_help)
    parser.add_argument("--inner-lr", type=float, default=inner_lr, help=inner_lr_help)
    parser.add_argument("--meta-lr", type=float, default=meta_lr, help=meta_lr_help)
    parser.add_argument("--meta-batch-size", type=int, default=4)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--test-tasks", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maml", action="store_true", help=maml_help)
    parser.add_argument("--smoke", action="store_true", help="5 meta steps, 5 test tasks")
    parser.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="meta-training progress: 0 quiet, 1 bar, 2 a line per step",
    )
    parser.add_argument(
        "--output-dir", default=None, help=f"also write the result to <output-dir>/{example}.json"
    )
    return parser


def finish_demo(example, args, result, start):
    """Adds the elapsed seconds to `result` (a JSON-able dict), writes it to
    ``<args.output_dir>/<example>.json`` when an output folder was given, prints it as one
    JSON line and returns it. `start` is a `time.perf_counter()` reading, in seconds."""
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.output_dir:
        write_json(os.path.join(args.output_dir, f"{example}.json"), result)
    print(json.dumps(result))
    return result


def fit_epochs(meta_steps, lines=50):
    """Keras-style ``fit`` arguments for exactly `meta_steps` meta steps in at most about
    `lines` epochs (one progress bar each): ``{"epochs": E, "steps_per_epoch": S}`` with
    E * S == `meta_steps`, S the smallest divisor of `meta_steps` that is at least
    ``meta_steps / lines`` (``{"epochs": 0}`` for no meta step)."""
    if meta_steps <= 0:
        return {"epochs": 0}
    for size in range(max(1, math.ceil(meta_steps / lines)), meta_steps + 1):
        if meta_steps % size == 0:
            return {"epochs": meta_steps // size, "steps_per_epoch": size}


def int_list(text):
    """Parses ``"0,1,2"`` into ``[0, 1, 2]`` (an argparse ``type``)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def choice_list(choices):
    """An argparse ``type`` parsing a comma-separated list of names from `choices`."""

    def parse(text):
        values = [v.strip() for v in str(text).split(",") if v.strip()]
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}"
            )
        return values

    return parse


def output_dirs(args, example):
    """``(output_dir, export_dir)`` as `pathlib.Path`s; the output folder is created.

    Args:
        args: parsed arguments with ``output_dir`` and ``export_dir`` (either may be None).
        example: the example's name, for the default folders.
    """
    out = pathlib.Path(args.output_dir) if args.output_dir else REPO_ROOT / "results" / example
    export = (
        pathlib.Path(args.export_dir) if args.export_dir else REPO_ROOT / "saved_models" / example
    )
    out.mkdir(parents=True, exist_ok=True)
    return out, export


# -- numbers and files --------------------------------------------------------------------
def stats(values):
    """``{"mean", "std", "n", "values"}`` of a list of numbers (NaNs dropped)."""
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "n": len(values),
        "values": values,
    }


def confidence95(values):
    """Half-width of the normal-approximation 95% confidence interval of the mean.

    ``z * s / sqrt(n)`` with z the standard normal's 97.5% quantile
    (`statistics.NormalDist`) and s the sample standard deviation (`statistics.stdev`);
    NaNs and Nones are dropped. None for fewer than 2 values.
    """
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    if len(values) < 2:
        return None
    z = statistics.NormalDist().inv_cdf(0.975)
    return z * statistics.stdev(values) / math.sqrt(len(values))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return repr(obj)


def replace_file(path, write, mode="w"):
    """Writes a file as a whole or not at all: `write(f)` fills a temporary file beside
    `path` (mode ``0o666`` less the umask, as `open` would create it), which then replaces
    `path` in one rename. A process killed part-way leaves the earlier file intact (and,
    at worst, a hidden ``.<name>.*.tmp`` file beside it).

    Args:
        path: the file (str or `os.PathLike`); its folder is created if needed.
        write: a function of the open file object.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).

    Returns:
        The path written, as a `pathlib.Path`.
    """
    import tempfile

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def write_json(path, data):
    """Writes `data` as indented JSON (numpy values converted, NaN/inf written as null),
    replacing the file in one rename (`replace_file`).

    Returns:
        The path written.
    """
    text = json.dumps(_jsonable(data), indent=2) + "\n"
    return replace_file(path, lambda f: f.write(text))


def environment():
    """Versions and machine facts worth keeping next to results."""
    import keras
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "command": " ".join(sys.argv),
    }


class Stopwatch:
    """A context manager measuring wall time: ``with Stopwatch() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


def format_stat(stat, scale=100.0, digits=1):
    """``"59.6 ± 3.1"`` from a `stats` dict (values scaled, e.g. to percent)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def print_table(headers, rows):
    """Prints rows of strings as an aligned plain-text table."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
        for i, h in enumerate(headers)
    ]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


# -- plots -----------------------------------------------------------------------------------
def print_written(json_path, plots, export_info, seconds):
    """The closing line of an example: where its JSON, plots and SavedModel went, and its time.

    Args:
        json_path: path of the results JSON.
        plots: list of written plot paths.
        export_info: the dict `export_model` returned, or ``None`` when nothing was exported.
        seconds: wall time of the whole run.
    """
    print(
        "\nWrote "
        + ", ".join(str(p) for p in [json_path, *plots])
        + (f"; SavedModel in {export_info['path']}" if export_info else "")
        + f" ({seconds:.0f}s)"
    )


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (writes files, needs no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, rect=(0, 0, 1, 1)):
    """Saves a figure as PNG (tight layout, 120 dpi; the file replaced in one rename, see
    `replace_file`), closes it, and returns the path.

    Args:
        fig: the figure.
        path: the PNG file.
        rect: the part of the figure (left, bottom, right, top, in figure fractions) the
            axes are laid out in; leave room for a figure legend, e.g. ``(0, 0.08, 1, 1)``.
    """
    fig.tight_layout(rect=rect)
    try:
        path = replace_file(path, lambda f: fig.savefig(f, dpi=120, format="png"), mode="wb")
    finally:
        pyplot().close(fig)
    return path


def plot_band(ax, x, mean, std=None, label=None, **kwargs):
    """A line with a shaded ±std band on `ax`."""
    x = np.asarray(x, dtype=float)
    mean = np.asarray(mean, dtype=float)
    (line,) = ax.plot(x, mean, label=label, **kwargs)
    if std is not None:
        std = np.asarray(std, dtype=float)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def integer_ticks(ax, axis="x"):
    """Whole-number tick labels on `ax`'s `axis` ("x", "y" or "both"), for counts such as
    steps (`matplotlib.ticker.MaxNLocator` with ``integer=True``)."""
    from matplotlib.ticker import MaxNLocator

    for name in ("x", "y") if axis == "both" else (axis,):
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))


def moving_average(values, window):
    """Trailing mean over `window` values (fewer at the start); NaNs are skipped.

    Returns:
        A float array of the same length as `values`.
    """
    values = np.asarray(values, dtype=float)
    window = max(1, int(window))
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))
    counts = np.cumsum(finite)
    sums = sums - np.concatenate([np.zeros(window), sums[:-window]])[: len(values)]
    counts = counts - np.concatenate([np.zeros(window), counts[:-window]])[: len(values)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def plot_smoothed(ax, x, values, label=None, window=None, color=None):
    """A noisy series as a faint raw line and a bold trailing moving average.

    Args:
        ax: the matplotlib axes.
        x, values: the series.
        label: legend label of the smoothed line (the raw line gets none).
        window: moving-average length (default: an eighth of the series, at least 2
            values and at most a quarter of them; 1 for very short series).
        color: line colour (default: the axes' next colour).

    Returns:
        The window used.
    """
    values = np.asarray(values, dtype=float)
    window = window or max(1, min(len(values) // 4, max(2, len(values) // 8)))
    (raw,) = ax.plot(x, values, color=color, lw=0.8, alpha=0.3)
    ax.plot(x, moving_average(values, window), color=raw.get_color(), lw=1.8, label=label)
    return window


def _label_bars(ax, bars):
    """Writes each bar's value at its foot, beside the error bar's centre line."""
    for bar in bars:
        ax.annotate(
            f"{bar.get_height():.1f}",
            (bar.get_x() + bar.get_width() * 0.5, 0),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color="white",
            fontweight="bold",
        )


def bar_plot(path, labels, means, errors=None, ylabel="", title="", groups=None):
    """A bar chart with error bars and each bar's value written on it, saved as PNG.

    Args:
        path: the PNG file.
        labels: one label per bar, or (with `groups`) one per series.
        means: bar heights; with `groups`, a list (one per series) of lists (one per group).
        errors: error-bar half-widths in the same layout as `means` (or None).
        ylabel, title: axis label and title.
        groups: optional group names along the x axis (grouped bars, one colour per series).

    Returns:
        The path written.
    """
    plt = pyplot()
    if groups is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(labels) + 2), 4.5))
        x = np.arange(len(labels))
        bars = ax.bar(x, means, yerr=errors, capsize=4, color="tab:blue", alpha=0.85)
        _label_bars(ax, bars)
        ax.set_xticks(x)
        ax.set_xticklabels(
            labels,
            rotation=30 if len(labels) > 4 else 0,
            ha="right" if len(labels) > 4 else "center",
        )
    else:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 2), 4.5))
        width = 0.8 / max(1, len(labels))
        x = np.arange(len(groups))
        for i, label in enumerate(labels):
            err = None if errors is None else errors[i]
            bars = ax.bar(
                x + (i - (len(labels) - 1) / 2) * width,
                means[i],
                width,
                yerr=err,
                capsize=4,
                label=label,
                alpha=0.85,
            )
            _label_bars(ax, bars)
        ax.set_xticks(x)
        ax.set_xticklabels(groups)
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=min(len(labels), 4), frameon=False
        )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


# -- export -----------------------------------------------------------------------------------
def export_model(model, path, **adaptive_kwargs):
    """Exports a meta-learned model as a TensorFlow SavedModel.

    Uses `warpkeras.export.export_adaptive` (signatures ``serving_default``, ``adapt`` and
    ``adapt_and_predict``: the SavedModel adapts itself to a new task) with
    `adaptive_kwargs` (``loss``, ``learning_rate``, ``steps``, ...). If that module is not
    available, falls back to Keras's ``model.export(path)`` (a ``serve`` endpoint only).

    Returns:
        A dict describing what was written: ``path``, ``format`` and ``signatures``.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from warpkeras.export import SIGNATURES, export_adaptive
    except ImportError:
        model.export(str(path), verbose=False)
        return {"path": str(path), "format": "keras_export", "signatures": ["serve"]}
    # An example owns its folder under saved_models/: a re-run replaces its own export.
    adaptive_kwargs.setdefault("overwrite", True)
    export_adaptive(model, str(path), **adaptive_kwargs)
    return {
        "path": str(path),
        "format": "warpkeras.export_adaptive",
        "signatures": list(SIGNATURES),
        "settings": dict(adaptive_kwargs),
    }
