"""TensorFlow thread pools that do not oversubscribe a small CPU.

By default TensorFlow gives a CPU process one inter-op thread per core (independent ops of
a graph run at once) and one intra-op thread per core (each oneDNN / Eigen kernel splits
its work over them). On a CPU with few cores, the adaptation step of a convolutional
network then runs a layer's input-gradient and weight-gradient convolutions at the same
time, each wanting every core: the cores are oversubscribed and the kernels take longer
than they would one after the other.

`import warpkeras` therefore sets, on machines with at most `MAX_CORES` usable cores,

* ``tf.config.threading.set_inter_op_parallelism_threads(INTER_OP)``

and leaves the intra-op pool at TensorFlow's default (one thread per core). Measured on a
2-core CPU with ``bench/threads.py`` (see ``bench/README.md``, "Threads").

It does so only when all of these hold, so that a choice of the user always wins:

* ``WARPKERAS_SET_THREADS`` is not ``0`` (also ``false``, ``no``, ``off``): the opt-out;
* none of ``TF_NUM_INTEROP_THREADS``, ``TF_NUM_INTRAOP_THREADS``, ``OMP_NUM_THREADS`` is
  set in the environment;
* neither ``tf.config.threading`` value was set before warpkeras was imported;
* TensorFlow's runtime is not initialised yet (thread pools are fixed when the first op
  runs; afterwards warpkeras changes nothing).

A ``tf.config.threading.set_*`` call after ``import warpkeras`` (before the first op)
replaces warpkeras's value as usual. `applied` records what was set, `reason` why not.
"""

import os

# the setting and where it applies (see the module docstring)
INTER_OP = 1
MAX_CORES = 4
OPT_OUT = "WARPKERAS_SET_THREADS"
USER_ENV = ("TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS")

applied = None  # dict of what warpkeras set, or None
reason = "not yet run"


def usable_cores():
    """The number of CPUs this process may run on (its affinity mask where known)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def apply_default(environ=None):
    """Sets warpkeras's default thread pools when the user has not chosen any.

    Called once by ``warpkeras/__init__.py`` at import, after TensorFlow is imported.

    Args:
        environ: the environment to read (default ``os.environ``; for tests).

    Returns:
        A dict ``{"inter_op_parallelism_threads": int}`` of what was set, or None when
        nothing was (the reason is left in `reason`).
    """
    global applied, reason
    environ = os.environ if environ is None else environ
    applied = None
    if environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        reason = f"{OPT_OUT}={environ[OPT_OUT]} (opt-out)"
        return None
    user_env = [k for k in USER_ENV if k in environ]
    if user_env:
        reason = f"the environment sets {', '.join(user_env)}"
        return None
    cores = usable_cores()
    if cores > MAX_CORES:
        reason = f"{cores} usable cores (> {MAX_CORES}): TensorFlow's defaults kept"
        return None
    if cores < 2:
        reason = "1 usable core: TensorFlow already runs one op at a time"
        return None
    import tensorflow as tf

    threading = tf.config.threading
    if (threading.get_inter_op_parallelism_threads()
            or threading.get_intra_op_parallelism_threads()):
        reason = "tf.config.threading was set before warpkeras was imported"
        return None
    try:
        threading.set_inter_op_parallelism_threads(INTER_OP)
    except RuntimeError:
        reason = "TensorFlow's runtime was already initialised"
        return None
    applied = {"inter_op_parallelism_threads": INTER_OP}
    reason = f"set on {cores} usable cores"
    return applied
