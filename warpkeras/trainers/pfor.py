"""`tf.vectorized_map` (pfor) support for the vectorised executor: per-task convolutions
batched as grouped convolutions, and a record of the ops pfor runs in a while loop.

Used by `warpkeras.trainers.parallel.VectorizedExecutor` while a vectorised step is traced.
"""

import contextlib
import logging
import re
import threading

import tensorflow as tf

# --------------------------------------------------------------------------------------
# Batched convolutions with per-task kernels.
#
# `tf.vectorized_map` ("pfor") batches Conv2D only over its input: with a per-task kernel
# (every task has its own θ) it falls back to a while loop over the tasks, for the forward
# pass and for both gradients. T convolutions of the same shape with their own kernels are
# one grouped convolution with T groups: the task axis is merged into the channel axis
# (input [T, B, H, W, C] -> [B, H, W, T·C], kernel [T, kh, kw, C, O] -> [kh, kw, C, T·O]),
# and TF's own Conv2D / Conv2DBackpropInput / Conv2DBackpropFilter kernels (oneDNN, cuDNN,
# XLA's feature_group_count) compute all tasks in one call. The converters below are
# used by pfor only while a vectorised step is traced (`_batched_converters`); every other
# case is passed on to pfor's own converter.


def _pfor():
    try:
        from tensorflow.python.ops.parallel_for import pfor
    except ImportError:  # pragma: no cover - a TensorFlow without pfor's internals
        return None
    needed = ("_pfor_converter_registry", "_create_op", "wrap")
    return pfor if all(hasattr(pfor, n) for n in needed) else None


def _channel_axis(pfor_input):
    fmt = pfor_input.get_attr("data_format")
    fmt = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
    return 1 if fmt.startswith("NC") else 3


def _to_groups(x, axis):
    """[T, B, ..., C, ...] (channels at `axis` of one task's tensor) -> [B, ..., T·C, ...]."""
    rank = x.shape.rank
    a = axis + 1  # the channel axis of the stacked tensor
    perm = list(range(1, a)) + [0] + list(range(a, rank))
    y = tf.transpose(x, perm)  # [B, ..., T, C, ...]
    shape = tf.shape(y)
    new = tf.concat([shape[: a - 1], [-1], shape[a + 1 :]], axis=0)
    return tf.reshape(y, new)


def _from_groups(y, axis, n):
    """Inverse of `_to_groups`: [B, ..., T·C, ...] -> [T, B, ..., C, ...] for `n` = [T]."""
    shape = tf.shape(y)
    new = tf.concat([shape[:axis], tf.cast(n, shape.dtype), [-1], shape[axis + 1 :]], axis=0)
    y = tf.reshape(y, new)  # [B, ..., T, C, ...]
    rank = y.shape.rank
    perm = [axis] + list(range(axis)) + list(range(axis + 1, rank))
    return tf.transpose(y, perm)


def _kernel_to_groups(w):
    """[T, kh, kw, C, O] -> [kh, kw, C, T·O] (output channels grouped task-major)."""
    y = tf.transpose(w, [1, 2, 3, 0, 4])
    shape = tf.shape(y)
    return tf.reshape(y, tf.concat([shape[:3], [-1]], axis=0))


def _kernel_from_groups(w, n):
    """Inverse of `_kernel_to_groups` for `n` = [T]."""
    shape = tf.shape(w)
    y = tf.reshape(w, tf.concat([shape[:3], tf.cast(n, shape.dtype), [-1]], axis=0))
    return tf.transpose(y, [3, 0, 1, 2, 4])


def _grouped():
    """Whether this trace batches per-task convolutions as one grouped convolution (True)
    or as one convolution per task side by side in the graph (False). Auto (`None`): grouped
    when TensorFlow sees a GPU. On CPUs oneDNN's grouped convolution was measured about 2x
    slower than the same convolutions run one per task (bench/README.md), and TF runs the
    per-task kernels concurrently on its inter-op threads."""
    grouped = getattr(_tracing, "grouped", None)
    if grouped is None:
        grouped = bool(tf.config.list_logical_devices("GPU"))
    return grouped


def _per_task(pfor_input, op_type, per_task_inputs):
    """One `op_type` op per task (inputs: a list over the tasks), stacked on the task axis."""
    pfor = _pfor()
    attrs = pfor_input.op.node_def.attr
    dtype = pfor_input.outputs[0].dtype
    outs = [
        pfor._create_op(op_type, list(ins), [dtype], attrs=attrs).outputs[0]
        for ins in per_task_inputs
    ]
    return pfor.wrap(tf.stack(outs), True)


def _static_tasks(pfor_input):
    n = tf.get_static_value(pfor_input.pfor.loop_len_vector)
    return None if n is None else int(n[0])


def _conv2d(pfor_input, original):
    if not pfor_input.input(1).is_stacked:  # one kernel for all tasks: pfor's own path
        return original(pfor_input)
    pfor = _pfor()
    pfor_input.stack_inputs([0, 1])
    tasks = _static_tasks(pfor_input)
    if tasks is not None and not _grouped():
        xs = tf.unstack(pfor_input.stacked_input(0), tasks)
        ws = tf.unstack(pfor_input.stacked_input(1), tasks)
        return _per_task(pfor_input, "Conv2D", zip(xs, ws))
    axis = _channel_axis(pfor_input)
    x = _to_groups(pfor_input.stacked_input(0), axis)
    w = _kernel_to_groups(pfor_input.stacked_input(1))
    out = pfor._create_op("Conv2D", [x, w], [x.dtype], attrs=pfor_input.op.node_def.attr).outputs[0]
    return pfor.wrap(_from_groups(out, axis, pfor_input.pfor.loop_len_vector), True)


def _conv2d_backprop_input(pfor_input, original):
    if not pfor_input.input(1).is_stacked or pfor_input.input(0).is_stacked:
        return original(pfor_input)
    pfor = _pfor()
    pfor_input.stack_inputs([1, 2])
    tasks = _static_tasks(pfor_input)
    if tasks is not None and not _grouped():
        sizes = pfor_input.unstacked_input(0)
        ws = tf.unstack(pfor_input.stacked_input(1), tasks)
        dys = tf.unstack(pfor_input.stacked_input(2), tasks)
        return _per_task(
            pfor_input, "Conv2DBackpropInput", [(sizes, w, dy) for w, dy in zip(ws, dys)]
        )
    axis = _channel_axis(pfor_input)
    n = pfor_input.pfor.loop_len_vector
    sizes = pfor_input.unstacked_input(0)  # one task's input shape
    sizes = tf.tensor_scatter_nd_update(
        sizes, [[axis]], sizes[axis : axis + 1] * tf.cast(n, sizes.dtype)
    )
    w = _kernel_to_groups(pfor_input.stacked_input(1))
    dy = _to_groups(pfor_input.stacked_input(2), axis)
    out = pfor._create_op(
        "Conv2DBackpropInput", [sizes, w, dy], [dy.dtype], attrs=pfor_input.op.node_def.attr
    ).outputs[0]
    return pfor.wrap(_from_groups(out, axis, n), True)


def _conv2d_backprop_filter(pfor_input, original):
    if not pfor_input.input(0).is_stacked or pfor_input.input(1).is_stacked:
        return original(pfor_input)  # pfor batches a shared input without a loop
    pfor = _pfor()
    pfor_input.stack_inputs([0, 2])
    tasks = _static_tasks(pfor_input)
    if tasks is not None and not _grouped():
        sizes = pfor_input.unstacked_input(1)
        xs = tf.unstack(pfor_input.stacked_input(0), tasks)
        dys = tf.unstack(pfor_input.stacked_input(2), tasks)
        return _per_task(
            pfor_input, "Conv2DBackpropFilter", [(x, sizes, dy) for x, dy in zip(xs, dys)]
        )
    axis = _channel_axis(pfor_input)
    n = pfor_input.pfor.loop_len_vector
    sizes = pfor_input.unstacked_input(1)  # one task's kernel shape [kh, kw, C, O]
    sizes = tf.concat([sizes[:3], sizes[3:] * tf.cast(n, sizes.dtype)], axis=0)
    x = _to_groups(pfor_input.stacked_input(0), axis)
    dy = _to_groups(pfor_input.stacked_input(2), axis)
    out = pfor._create_op(
        "Conv2DBackpropFilter", [x, sizes, dy], [dy.dtype], attrs=pfor_input.op.node_def.attr
    ).outputs[0]
    return pfor.wrap(_kernel_from_groups(out, n), True)


def _bitcast(pfor_input, original):
    # Bitcast acts on the trailing axis only, so it maps over the task axis unchanged
    # (Keras' `signbit`, used by some metrics, emits one; pfor has no converter for it).
    pfor = _pfor()
    x = pfor_input.stacked_input(0)
    return pfor.wrap(tf.bitcast(x, pfor_input.get_attr("type")), True)


_CONVERTERS = {
    "Conv2D": _conv2d,
    "Conv2DBackpropInput": _conv2d_backprop_input,
    "Conv2DBackpropFilter": _conv2d_backprop_filter,
    "Bitcast": _bitcast,
}
_CONVERTED_OPS = tuple(_CONVERTERS)
# Per thread: whether a vectorised step is being traced (the converters above apply only
# then), and the ops pfor fell back on meanwhile. Thread-local rather than a lock held over
# the trace: a strategy's replica threads trace their steps concurrently.
_tracing = threading.local()
_SETUP_LOCK = threading.Lock()
_installed: list = []


def _install_converters(pfor):
    """Puts delegating converters for `_CONVERTERS` into pfor's registry (once). Outside
    `_batched_converters` they behave exactly as pfor's own (or as no converter)."""
    registry = pfor._pfor_converter_registry
    with _SETUP_LOCK:
        if _installed:
            return
        for name in _CONVERTED_OPS:
            original = registry.get(name)

            def run(pfor_input, name=name, original=original):
                converter = _CONVERTERS.get(name) if getattr(_tracing, "depth", 0) else None
                if converter is not None:
                    return converter(pfor_input, original)
                if original is None:  # pfor's own answer to an op it has no converter for
                    raise pfor.ConversionNotImplementedError(
                        f"there is no registered converter for {name}."
                    )
                return original(pfor_input)

            registry[name] = run
        _installed.append(True)


@contextlib.contextmanager
def _batched_converters(grouped=None):
    """Within this context (in this thread), pfor batches convolutions with per-task kernels
    without a while loop (one grouped convolution, or with ``grouped=False`` one
    convolution per task; `None`: see `_grouped`) and maps Bitcast over the task axis
    (`_CONVERTERS`)."""
    pfor = _pfor()
    if pfor is not None:
        _install_converters(pfor)
    _tracing.depth = getattr(_tracing, "depth", 0) + 1
    outer, _tracing.grouped = getattr(_tracing, "grouped", None), grouped
    try:
        yield
    finally:
        _tracing.depth -= 1
        _tracing.grouped = outer


# pfor logs every op it cannot batch ("Using a while_loop for converting <op> cause ...",
# or "<op> uses a while_loop"), some at DEBUG level. While a step is traced, TensorFlow's
# logger is opened to DEBUG and a filter collects these records for the tracing thread;
# records below the level the logger had are still kept from the console.
_FALLBACK = re.compile(r"while_loop for converting (\w+)|^(\w+) uses a while_loop")


class _FallbackRecorder(logging.Filter):
    def __init__(self):
        super().__init__()
        self.users = 0
        self.saved_level = None  # the logger's own level, restored by the last user
        self.threshold = logging.WARNING  # its effective level: what still gets printed

    def filter(self, record):
        ops = getattr(_tracing, "fallbacks", None)
        if ops is not None:
            match = _FALLBACK.search(record.getMessage())
            if match:
                ops.append(match.group(1) or match.group(2))
        return record.levelno >= self.threshold


_RECORDER = _FallbackRecorder()


@contextlib.contextmanager
def _recording_fallbacks():
    logger = tf.get_logger()
    rec = _RECORDER
    with _SETUP_LOCK:
        if rec.users == 0:
            rec.saved_level, rec.threshold = logger.level, logger.getEffectiveLevel()
            logger.addFilter(rec)
            logger.setLevel(logging.DEBUG)
        rec.users += 1
    outer = getattr(_tracing, "fallbacks", None)
    _tracing.fallbacks = ops = [] if outer is None else outer
    try:
        yield ops
    finally:
        _tracing.fallbacks = outer
        with _SETUP_LOCK:
            rec.users -= 1
            if rec.users == 0:
                logger.setLevel(rec.saved_level)
                logger.removeFilter(rec)
