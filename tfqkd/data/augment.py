"""Training-time image augmentation (thesis seed 001, section 5.1.10).

For CIFAR-10/100 the thesis applies, in order: 4 pixels of zero padding on
each side followed by a random crop back to HxW, a random horizontal flip with
p = 0.5, and a random rotation drawn uniformly from [-15, 15] degrees
(torchvision ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``,
``RandomRotation(15)``; the latter uses nearest-neighbour sampling and fills
with zeros, as here). Digit sets get no augmentation: flipping a digit changes
its meaning.

All functions work on one image ``(H, W, C)`` and take an explicit stateless
seed (an int tensor of shape ``[2]``), so they run inside ``tf.data.map`` on
CPU and are reproducible; :func:`tfqkd.data.load` feeds a fresh seed per
element and per epoch.
"""

import math

from tfqkd.compat import tf
from tfqkd.errors import TfqkdError

__all__ = [
    "random_pad_crop",
    "random_flip",
    "random_rotation",
    "rotate",
    "cifar_augment",
    "resolve_augment",
]


def random_pad_crop(image, seed, pad=4):
    """Zero-pad ``pad`` pixels on every side, then crop a random HxW window.

    Args:
        image: Float tensor ``(H, W, C)``.
        seed: Stateless seed, int tensor of shape ``[2]``.
        pad: Padding in pixels (thesis: 4), so the shift is at most ``pad``.

    Returns:
        Tensor with the shape of ``image``.
    """
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    out = tf.image.stateless_random_crop(padded, size=shape, seed=seed)
    return tf.ensure_shape(out, image.shape)


def random_flip(image, seed):
    """Flip left-right with probability 0.5.

    Args:
        image: Tensor ``(H, W, C)``.
        seed: Stateless seed, int tensor of shape ``[2]``.

    Returns:
        The image, mirrored horizontally or unchanged.
    """
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def _rotation_transform(angle, height, width):
    """Projective transform (output -> input coordinates) rotating about the centre."""
    cos, sin = tf.cos(angle), tf.sin(angle)
    w, h = tf.cast(width - 1, tf.float32), tf.cast(height - 1, tf.float32)
    x_offset = (w - (cos * w - sin * h)) / 2.0
    y_offset = (h - (sin * w + cos * h)) / 2.0
    zero = tf.zeros_like(cos)
    return tf.stack([cos, -sin, x_offset, sin, cos, y_offset, zero, zero])[tf.newaxis, :]


def rotate(image, angle, interpolation="NEAREST"):
    """Rotate an image about its centre by ``angle`` radians, filling with zeros.

    Args:
        image: Float tensor ``(H, W, C)``.
        angle: Scalar float tensor, radians (positive: counter-clockwise on screen).
        interpolation: ``"NEAREST"`` (torchvision's default) or ``"BILINEAR"``.

    Returns:
        The rotated image, same shape and dtype.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image[tf.newaxis], tf.float32),
        transforms=_rotation_transform(tf.cast(angle, tf.float32), shape[0], shape[1]),
        output_shape=shape[:2],
        fill_value=tf.constant(0.0, tf.float32),
        interpolation=interpolation,
        fill_mode="CONSTANT",
    )[0]
    return tf.ensure_shape(tf.cast(out, image.dtype), image.shape)


def random_rotation(image, seed, max_degrees=15.0, interpolation="NEAREST"):
    """Rotate by an angle drawn uniformly from ``[-max_degrees, max_degrees]``.

    Args:
        image: Float tensor ``(H, W, C)``.
        seed: Stateless seed, int tensor of shape ``[2]``.
        max_degrees: Largest absolute rotation (thesis: 15 degrees).
        interpolation: ``"NEAREST"`` (torchvision's default) or ``"BILINEAR"``.

    Returns:
        The rotated image, same shape; uncovered corners are zero.
    """
    limit = math.radians(float(max_degrees))
    angle = tf.random.stateless_uniform([], seed=seed, minval=-limit, maxval=limit)
    return rotate(image, angle, interpolation)


def cifar_augment(image, seed):
    """The thesis's CIFAR pipeline: pad-4 random crop, flip p=0.5, rotation within 15 degrees.

    Args:
        image: Float tensor ``(H, W, C)`` in [0, 1].
        seed: Stateless seed, int tensor of shape ``[2]``; split into one seed per step.

    Returns:
        The augmented image, same shape, values still in [0, 1].
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    image = random_pad_crop(image, seeds[0])
    image = random_flip(image, seeds[1])
    return random_rotation(image, seeds[2])


_AUGMENTS = {"none": None, "cifar": cifar_augment}


def resolve_augment(kind):
    """Map an ``augment`` argument to a per-image function.

    Args:
        kind: ``None``, ``"none"`` or ``"cifar"``.

    Returns:
        ``None`` (no augmentation) or a function ``(image, seed) -> image``.

    Raises:
        TfqkdError: for any other value.
    """
    if kind is None:
        return None
    if not isinstance(kind, str) or kind.lower() not in _AUGMENTS:
        raise TfqkdError(f"unknown augment {kind!r}; use one of: none, cifar")
    return _AUGMENTS[kind.lower()]
