"""Helpers shared by the layers of `warpkeras.layers` (not public)."""

import keras
import numpy as np

PACKAGE = "warpkeras"


class IdentityKernel(keras.initializers.Initializer):
    """Identity kernel for dense (2-D) and convolution (4-D) weights.

    A dense kernel of shape ``(in, out)`` becomes ``eye(in, out)``; a convolution kernel of
    shape ``(k, k, in, out)`` (odd ``k``) holds ``eye(in, out)`` at its centre tap and zeros
    elsewhere, so a stride-1 "same" convolution with it copies its input channels. When
    ``in != out`` the rectangular identity is used (extra outputs are zero, extra inputs are
    dropped).
    """

    def __call__(self, shape, dtype=None):
        shape = tuple(int(d) for d in shape)
        if len(shape) == 2:
            value = np.eye(shape[0], shape[1])
        elif len(shape) == 4:
            kh, kw, cin, cout = shape
            if kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(
                    f"An identity convolution kernel needs odd spatial sizes, got {shape}."
                )
            value = np.zeros(shape)
            value[kh // 2, kw // 2] = np.eye(cin, cout)
        else:
            raise ValueError(
                f"An identity kernel must be 2-D (dense) or 4-D (convolution), got shape {shape}."
            )
        return keras.ops.convert_to_tensor(value, dtype=dtype or keras.backend.floatx())

    def get_config(self):
        return {}


def default_name(kwargs, prefix):
    """Fills in a unique default layer name (for class names Keras would mangle, e.g.
    ``FiLM`` -> ``fi_lm``), following Keras's own numbering."""
    if kwargs.get("name") is None:
        uid = keras.backend.get_uid(prefix)
        kwargs["name"] = prefix if uid == 1 else f"{prefix}_{uid - 1}"
    return kwargs


def get_kernel_initializer(initializer):
    """`None` means the identity kernel; anything else goes through Keras."""
    if initializer is None:
        return IdentityKernel()
    return keras.initializers.get(initializer)


def serialize_kernel_initializer(initializer):
    if isinstance(initializer, IdentityKernel):
        return None
    return keras.initializers.serialize(initializer)


def channel_axis_of(data_format):
    """(standardised data format, channel axis) for an image layer."""
    if data_format is None:
        data_format = keras.config.image_data_format()
    data_format = str(data_format).lower()
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(
            f"`data_format` must be 'channels_last', 'channels_first' or None, got {data_format!r}."
        )
    return data_format, (-1 if data_format == "channels_last" else 1)


def check_rank(layer, input_shape, rank=None, min_rank=None, what="inputs"):
    """Raises a ValueError naming `layer` when `input_shape` has the wrong rank."""
    shape = tuple(input_shape)
    if rank is not None and len(shape) != rank:
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}' expects {rank}-D {what}, got an input "
            f"of rank {len(shape)} with shape {shape}."
        )
    if min_rank is not None and len(shape) < min_rank:
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}' expects {what} of rank >= {min_rank}, "
            f"got an input of rank {len(shape)} with shape {shape}."
        )
    return shape


def known_dim(layer, shape, axis, what):
    dim = shape[axis]
    if dim is None:
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}' needs a known number of {what} "
            f"(axis {axis}); got input shape {tuple(shape)}."
        )
    return int(dim)


def check_positive_int(layer_cls, name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{layer_cls.__name__}: `{name}` must be a positive integer"
            f"{' or None' if allow_none else ''}, got {value!r}."
        )
    return int(value)


def channel_broadcast(layer, input_shape, axis):
    """(number of channels, shape that broadcasts a per-channel vector against inputs)."""
    shape = check_rank(layer, input_shape, min_rank=2)
    rank = len(shape)
    if not -rank <= axis < rank or axis % rank == 0:
        raise ValueError(
            f"{type(layer).__name__} '{layer.name}': channel axis {axis} is not a "
            f"non-batch axis of inputs with shape {shape}."
        )
    axis = axis % rank
    channels = known_dim(layer, shape, axis, "channels")
    broadcast = [1] * rank
    broadcast[axis] = channels
    return channels, tuple(broadcast)


def odd_kernel_size(layer_cls, kernel_size):
    if isinstance(kernel_size, (tuple, list)):
        sizes = tuple(kernel_size)
    else:
        sizes = (kernel_size, kernel_size)
    ok = len(sizes) == 2 and all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1 for k in sizes
    )
    if not ok:
        raise ValueError(
            f"{layer_cls.__name__}: `kernel_size` must be an odd positive int or a pair of "
            "them (the identity initialisation and 'same' padding need a centre tap), got "
            f"{kernel_size!r}."
        )
    return sizes


def add_kernel_and_bias(layer, kernel_shape, units):
    """Create ``layer.kernel`` of ``kernel_shape`` and ``layer.bias`` of ``(units,)``.

    Uses the layer's ``kernel_initializer`` / ``kernel_regularizer`` and, when
    ``layer.use_bias``, its ``bias_initializer`` / ``bias_regularizer`` (else ``bias`` is None).
    """
    layer.kernel = layer.add_weight(
        name="kernel",
        shape=tuple(kernel_shape),
        initializer=layer.kernel_initializer,
        regularizer=layer.kernel_regularizer,
    )
    layer.bias = None
    if layer.use_bias:
        layer.bias = layer.add_weight(
            name="bias",
            shape=(units,),
            initializer=layer.bias_initializer,
            regularizer=layer.bias_regularizer,
        )
