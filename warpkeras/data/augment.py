"""Random affine image augmentation built from TensorFlow ops (usable inside tf.data).

The transform scales by ``s``, rotates counter-clockwise by ``angle`` degrees about
the image centre and then translates by ``(dx, dy)`` pixels (``dx`` to the right,
``dy`` downwards). Pixels that come from outside the source image get
``fill_value``. Randomness is stateless: the same ``seed`` gives the same output.
"""

import math

import tensorflow as tf

_INTERPOLATIONS = {"bilinear": "BILINEAR", "nearest": "NEAREST"}


def _as_batch(images):
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype.name}")
    rank = images.shape.rank
    if rank == 3:
        return images[tf.newaxis], True
    if rank == 4:
        return images, False
    raise ValueError(f"images must have shape (H, W, C) or (B, H, W, C), got shape {images.shape}")


def affine_transform(images, scale, angle, translation, fill_value=0.0, interpolation="bilinear"):
    """Apply a per-image scale / rotation / translation to a batch of images.

    Args:
        images: float tensor of shape ``(B, H, W, C)`` or ``(H, W, C)``.
        scale: scale factor per image, shape ``(B,)`` (or a scalar); values > 1 enlarge.
        angle: counter-clockwise rotation in degrees per image, shape ``(B,)`` or scalar.
        translation: shift in pixels per image, shape ``(B, 2)`` as ``(dx, dy)`` with
            ``dx`` to the right and ``dy`` downwards (or shape ``(2,)``).
        fill_value: value given to pixels that map outside the input image.
        interpolation: ``"bilinear"`` or ``"nearest"``.

    Returns:
        A tensor with the shape and dtype of ``images``.

    Example:
        >>> import numpy as np
        >>> x = np.random.rand(2, 28, 28, 1).astype("float32")
        >>> y = affine_transform(x, scale=[1.0, 1.0], angle=[90.0, 0.0],
        ...                      translation=[[0, 0], [3, 0]])
        >>> y.shape
        TensorShape([2, 28, 28, 1])
    """
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}"
        )
    batch, single = _as_batch(images)
    dtype = batch.dtype
    work = tf.cast(batch, tf.float32)
    shape = tf.shape(work)
    num, height, width = shape[0], shape[1], shape[2]

    scale = tf.broadcast_to(tf.cast(scale, tf.float32), [num])
    angle = tf.broadcast_to(tf.cast(angle, tf.float32), [num])
    translation = tf.broadcast_to(tf.cast(translation, tf.float32), [num, 2])
    tf.debugging.assert_positive(scale, message="affine_transform: scale must be positive")

    theta = angle * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    inv = 1.0 / scale
    # Inverse map (output pixel -> input pixel): in = c + M (out - c - t), M = R(theta) / s
    # with image coordinates (x to the right, y downwards).
    m00, m01 = inv * cos, -inv * sin
    m10, m11 = inv * sin, inv * cos
    cx = (tf.cast(width, tf.float32) - 1.0) / 2.0
    cy = (tf.cast(height, tf.float32) - 1.0) / 2.0
    px = cx + translation[:, 0]
    py = cy + translation[:, 1]
    a2 = cx - (m00 * px + m01 * py)
    b2 = cy - (m10 * px + m11 * py)
    zeros = tf.zeros_like(m00)
    transforms = tf.stack([m00, m01, a2, m10, m11, b2, zeros, zeros], axis=1)

    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=work,
        transforms=transforms,
        output_shape=tf.stack([height, width]),
        fill_value=tf.cast(fill_value, tf.float32),
        interpolation=_INTERPOLATIONS[interpolation],
        fill_mode="CONSTANT",
    )
    out = tf.cast(out, dtype)
    if single:
        out = out[0]
    return out


def _pair(value, name):
    if isinstance(value, (int, float)):
        return float(value), float(value)
    value = tuple(float(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be a number or a pair, got {value}")
    return value


def random_affine(
    images,
    seed,
    scale_range=(0.8, 1.2),
    rotation_range=(0.0, 360.0),
    translation_range=0.2,
    fill_value=0.0,
    interpolation="bilinear",
):
    """Randomly scale, rotate and translate each image (stateless, seeded).

    Each image gets its own scale ``~ U(scale_range)``, angle ``~ U(rotation_range)``
    degrees and shift ``dx ~ U(-fx, fx) * W``, ``dy ~ U(-fy, fy) * H``, where
    ``translation_range = (fx, fy)`` (a single number is used for both).

    Args:
        images: float tensor ``(B, H, W, C)`` or ``(H, W, C)``.
        seed: shape-``[2]`` integer tensor/list; the same seed gives the same output.
        scale_range: ``(low, high)`` scale factors.
        rotation_range: ``(low, high)`` angles in degrees.
        translation_range: maximal shift as a fraction of width/height; number or ``(fx, fy)``.
        fill_value: value for pixels coming from outside the image (the background).
        interpolation: ``"bilinear"`` or ``"nearest"``.

    Returns:
        A tensor with the shape and dtype of ``images``.

    Example:
        >>> import numpy as np
        >>> x = np.zeros((4, 28, 28, 1), "float32"); x[:, 10:18, 12:16] = 1.0
        >>> y = random_affine(x, seed=[0, 1])
        >>> bool((random_affine(x, seed=[0, 1]) == y).numpy().all())
        True
    """
    batch, single = _as_batch(images)
    scale_lo, scale_hi = _pair(scale_range, "scale_range")
    rot_lo, rot_hi = _pair(rotation_range, "rotation_range")
    frac_x, frac_y = _pair(translation_range, "translation_range")
    if scale_lo <= 0 or scale_hi < scale_lo:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    if frac_x < 0 or frac_y < 0:
        raise ValueError(f"translation_range must be non-negative, got {translation_range}")
    shape = tf.shape(batch)
    num = shape[0]
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    u = tf.random.stateless_uniform(tf.stack([num, 4]), seed=seed, dtype=tf.float32)
    scale = scale_lo + (scale_hi - scale_lo) * u[:, 0]
    angle = rot_lo + (rot_hi - rot_lo) * u[:, 1]
    dx = (2.0 * u[:, 2] - 1.0) * frac_x * tf.cast(shape[2], tf.float32)
    dy = (2.0 * u[:, 3] - 1.0) * frac_y * tf.cast(shape[1], tf.float32)
    out = affine_transform(
        batch,
        scale,
        angle,
        tf.stack([dx, dy], axis=1),
        fill_value=fill_value,
        interpolation=interpolation,
    )
    if single:
        out = out[0]
    return out
