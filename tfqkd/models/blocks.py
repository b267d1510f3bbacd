"""Building blocks several model families share, with the layer names policies match."""

from __future__ import annotations

from typing import Callable

from tfqkd.compat import keras

__all__ = ["depthwise_separable"]

#: ``factory(name)`` (or ``factory(filters, kernel, name)`` for convs) -> a Keras layer.
LayerFactory = Callable[..., keras.layers.Layer]


def depthwise_separable(
    x, prefix: str, filters: int, strides: int, *, conv: LayerFactory, depthwise: LayerFactory, bn: LayerFactory,
    act: LayerFactory,
):  # fmt: skip
    """Depthwise 3x3 - BN - act - pointwise 1x1 - BN - act (MobileNetV1, DS-CNN).

    The layers are ``<prefix>_dwconv``, ``_dw_bn``, ``_dw_relu``, ``_pwconv``, ``_pw_bn`` and
    ``_pw_relu``; each family passes its own factories (initializers, bias, BN momentum, ReLU6).

    Args:
        x: the input tensor.
        prefix: name prefix, e.g. ``block3``.
        filters: pointwise output channels.
        strides: depthwise stride.
        conv: ``conv(filters, kernel, name)``.
        depthwise: ``depthwise(name, strides)``.
        bn, act: ``bn(name)``, ``act(name)``.

    Returns:
        the block's output tensor.
    """
    x = depthwise(f"{prefix}_dwconv", strides)(x)
    x = bn(f"{prefix}_dw_bn")(x)
    x = act(f"{prefix}_dw_relu")(x)
    x = conv(filters, 1, f"{prefix}_pwconv")(x)
    x = bn(f"{prefix}_pw_bn")(x)
    return act(f"{prefix}_pw_relu")(x)
