"""bfloat16 compute where the hardware has it, float32 everywhere else.

Meta-training a model built under Keras's ``"mixed_bfloat16"`` dtype policy runs the inner
loops' convolutions and matmuls in bfloat16 while every variable stays float32: the
trainers pack θ0, the adapted θ, the warp parameters φ, the Leap and warp meta-gradient
accumulators and the optimiser slots from the model's variables, so all of those are
float32 master values, and only the layers' forward and backward computations round to
bfloat16 (Keras casts each variable to the compute dtype when a layer reads it; gradients
come back to the float32 values through the cast).

bfloat16 only pays where the hardware computes in it: x86 CPUs with AVX512_BF16 or AMX
(through TensorFlow's oneDNN kernels, on by default there) and NVIDIA GPUs of compute
capability 8.0 or newer. Elsewhere TensorFlow emulates it, several times slower than
float32, so `compute_policy` falls back to float32 with a `Bfloat16UnsupportedWarning`.

Example:

```python
import warpkeras
import keras
from warpkeras import precision

with precision.precision_scope("auto") as policy:   # "mixed_bfloat16" or "float32"
    model = build_model()                           # layers pick up the policy
trainer = warpkeras.LeapTrainer(model, loss, inner_steps=100, meta_batch_size=5)
```
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Iterator

import keras

PRECISIONS = ("auto", "float32", "bfloat16")

# /proc/cpuinfo flags of x86 CPUs that compute in bfloat16 (AVX512_BF16: Cooper Lake,
# Sapphire Rapids, AMD Zen 4 and later; AMX-BF16: Sapphire Rapids and later).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_CPUINFO = "/proc/cpuinfo"


class Bfloat16UnsupportedWarning(UserWarning):
    """bfloat16 was asked for on hardware that would only emulate it; float32 is used."""


def _read_cpuinfo():
    """Text of ``/proc/cpuinfo``, or None where there is none (macOS, Windows)."""
    try:
        with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def cpu_bf16_flags() -> tuple[str, ...]:
    """The bfloat16 instruction-set flags the CPU reports.

    Read from the ``flags`` lines of ``/proc/cpuinfo`` (Linux); elsewhere nothing is
    reported, so no CPU bfloat16 support is assumed.

    Returns:
        A sorted tuple of the flags of `CPU_BF16_FLAGS` that the CPU reports, e.g.
        ``("avx512_bf16",)``; empty when none (or no ``/proc/cpuinfo``).
    """
    text = _read_cpuinfo()
    if not text:
        return ()
    found: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            found.update(f for f in value.split() if f in CPU_BF16_FLAGS)
    return tuple(sorted(found))


def _onednn_enabled():
    """Whether TensorFlow's oneDNN CPU kernels (which run bfloat16 natively) are on."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # pragma: no cover - TensorFlow always ships it
        return False
    return bool(_pywrap_util_port.IsMklEnabled())


def _gpus_bf16():
    """None without a visible GPU; else whether every visible GPU computes in bfloat16
    (NVIDIA compute capability >= 8.0, from TensorFlow's device details)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability is None or tuple(capability) < (8, 0):
            return False
    return True


def bf16_supported() -> bool:
    """Whether this machine computes in bfloat16 natively, so bfloat16 layers are faster.

    With a visible GPU, the answer is about the GPUs (where TensorFlow places the layers):
    True when all have NVIDIA compute capability 8.0 or more (Ampere and later). Without
    one, it is about the CPU: True on x86-64 when the CPU reports ``avx512_bf16`` or
    ``amx_bf16`` in ``/proc/cpuinfo`` *and* TensorFlow's oneDNN kernels are on (they are by
    default on such CPUs; ``TF_ENABLE_ONEDNN_OPTS=0`` turns them off, and TensorFlow's own
    kernels then emulate bfloat16). TensorFlow has no public check of its own for this
    (its C++ ``IsBF16SupportedByOneDNNOnThisCPU`` is not exposed to Python), hence the
    flags. Other CPUs (ARM, older x86) and systems without ``/proc/cpuinfo`` give False.

    Returns:
        bool.

    Example:

    >>> from warpkeras import precision
    >>> precision.bf16_supported()   # on an AMD Zen 4 or Intel Sapphire Rapids CPU
    True
    """
    gpus = _gpus_bf16()
    if gpus is not None:
        return gpus
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return bool(cpu_bf16_flags()) and _onednn_enabled()


def compute_policy(precision: str = "auto") -> str:
    """The Keras dtype policy name to build a model under for `precision`.

    Args:
        precision: ``"float32"``: ``"float32"``. ``"bfloat16"``: ``"mixed_bfloat16"``
            (float32 variables, bfloat16 layer computations) when `bf16_supported`, else
            ``"float32"`` with a `Bfloat16UnsupportedWarning`. ``"auto"`` (default):
            ``"mixed_bfloat16"`` when `bf16_supported`, else ``"float32"`` silently.

    Returns:
        ``"float32"`` or ``"mixed_bfloat16"``, for ``keras.config.set_dtype_policy`` or a
        layer's ``dtype=`` argument.

    Raises:
        ValueError: `precision` is not one of ``"auto"``, ``"float32"``, ``"bfloat16"``.

    Example:

    >>> keras.config.set_dtype_policy(precision.compute_policy("auto"))
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r} is not valid: use one of {', '.join(map(repr, PRECISIONS))}."
        )
    if precision == "float32":
        return "float32"
    if bf16_supported():
        return "mixed_bfloat16"
    if precision == "bfloat16":
        flags = cpu_bf16_flags()
        warnings.warn(
            "precision='bfloat16' was asked for, but this machine has no native bfloat16 "
            f"compute (GPU: none of compute capability >= 8.0; CPU flags: "
            f"{', '.join(flags) if flags else 'no avx512_bf16/amx_bf16'}; TensorFlow oneDNN "
            f"kernels: {'on' if _onednn_enabled() else 'off'}), so bfloat16 would only be "
            "emulated, slower than float32. Falling back to float32; use precision='auto' "
            "to choose silently.",
            Bfloat16UnsupportedWarning,
            stacklevel=2,
        )
    return "float32"


@contextlib.contextmanager
def policy_scope(policy: str | keras.DTypePolicy) -> Iterator[str]:
    """Builds the layers created inside under the Keras dtype policy `policy`.

    Sets Keras's global dtype policy and restores the previous one on exit (also on
    error). Layers keep the policy they were created with, so a model built inside trains
    and runs under it afterwards.

    Args:
        policy: a Keras dtype policy or its name, e.g. ``compute_policy("auto")``.

    Yields:
        The policy name in force.

    Raises:
        ValueError: `policy` is not a Keras dtype policy (raised by Keras).
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield keras.config.dtype_policy().name
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def precision_scope(precision: str = "auto") -> Iterator[str]:
    """Builds the layers created inside under the dtype policy of `precision`.

    ``policy_scope(compute_policy(precision))``: Keras's global dtype policy is set for the
    duration of the block and the previous one restored on exit.

    Args:
        precision: ``"auto"``, ``"float32"`` or ``"bfloat16"``; see `compute_policy`.

    Yields:
        The policy name in force (``"float32"`` or ``"mixed_bfloat16"``).

    Raises:
        ValueError: as `compute_policy`.

    Example:

    >>> with precision.precision_scope("bfloat16") as policy:
    ...     model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    """
    with policy_scope(compute_policy(precision)) as policy:
        yield policy


__all__ = [
    "Bfloat16UnsupportedWarning",
    "CPU_BF16_FLAGS",
    "PRECISIONS",
    "bf16_supported",
    "compute_policy",
    "cpu_bf16_flags",
    "policy_scope",
    "precision_scope",
]
