"""MobileNetV1 and MobileNetV2 with width multipliers, written layer by layer.

Howard et al., "MobileNets" (arXiv:1704.04861) and Sandler et al., "MobileNetV2" (CVPR 2018).
They serve the hardware-aware distillation and depth-factorization studies.
Channel rounding follows the Keras/TF-slim references so that width 1.0 reproduces their
parameter counts (V1 4,253,864; V2 3,538,984 at 1000 classes). Activations are ReLU6 layers
(both references use ReLU6), convs have no bias because a BN follows each, and padding is
``same`` instead of explicit zero padding, which changes no parameter count.
"""

from __future__ import annotations

from typing import Tuple

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.models._checks import require_image_shape
from tfqkd.models.blocks import depthwise_separable
from tfqkd.models.registry import register_model

__all__ = ["build_mobilenet_v1", "build_mobilenet_v2"]

layers = keras.layers

# Keras-applications defaults (momentum 0.99 for V1, 0.999 for V2 in Keras; 0.99 here for both).
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

# (pointwise filters, depthwise stride) of the 13 depthwise-separable layers at width 1.0.
_V1_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
# (expansion t, output channels c, repeats n, first stride s), paper table 2.
_V2_BLOCKS = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def _check_width(model_name: str, width_multiplier: float) -> float:
    if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) or width_multiplier <= 0:
        raise TfqkdError(
            f"width_multiplier for model '{model_name}' must be a positive number, got {width_multiplier!r}"
        )
    return float(width_multiplier)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to a multiple of ``divisor``, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv(filters: int, kernel: int, name: str, strides: int = 1) -> layers.Layer:
    return layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=name,
    )


def _depthwise(name: str, strides: int) -> layers.Layer:
    return layers.DepthwiseConv2D(
        3, strides=strides, padding="same", use_bias=False, depthwise_initializer="he_normal", name=name
    )


def _bn(name: str) -> layers.Layer:
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _relu6(name: str) -> layers.Layer:
    return layers.ReLU(max_value=6.0, name=name)


@register_model(
    "mobilenet_v1",
    family="mobilenet",
    default_input_shape=(224, 224, 3),
    default_num_classes=1000,
    description="MobileNetV1 (Howard et al. 2017), width_multiplier option",
)
def build_mobilenet_v1(num_classes: int, input_shape: Tuple[int, ...], width_multiplier: float = 1.0) -> keras.Model:
    """Builds MobileNetV1.

    Args:
        num_classes: Number of output logits.
        input_shape: ``(height, width, channels)``; 224x224x3 for ImageNet.
        width_multiplier: Channel multiplier alpha; layer widths are ``int(alpha * filters)``.

    Returns:
        Functional ``keras.Model`` outputting logits.

    Raises:
        TfqkdError: If ``width_multiplier`` is not positive.
    """
    alpha = _check_width("mobilenet_v1", width_multiplier)
    require_image_shape("mobilenet_v1", input_shape)
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv(max(1, int(32 * alpha)), 3, "stem_conv", strides=2)(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)
    for b, (filters, strides) in enumerate(_V1_BLOCKS, start=1):
        x = depthwise_separable(
            x, f"block{b}", max(1, int(filters * alpha)), strides, conv=_conv, depthwise=_depthwise, bn=_bn, act=_relu6
        )
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(num_classes, name="head_dense")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v1")


@register_model(
    "mobilenet_v2",
    family="mobilenet",
    default_input_shape=(224, 224, 3),
    default_num_classes=1000,
    description="MobileNetV2 (Sandler et al. 2018), width_multiplier option",
)
def build_mobilenet_v2(num_classes: int, input_shape: Tuple[int, ...], width_multiplier: float = 1.0) -> keras.Model:
    """Builds MobileNetV2 with inverted residual blocks and linear bottlenecks.

    Args:
        num_classes: Number of output logits.
        input_shape: ``(height, width, channels)``; 224x224x3 for ImageNet.
        width_multiplier: Channel multiplier alpha; widths are rounded to multiples of 8 and
            the last conv keeps 1280 channels for alpha <= 1, as in the paper.

    Returns:
        Functional ``keras.Model`` outputting logits.

    Raises:
        TfqkdError: If ``width_multiplier`` is not positive.
    """
    alpha = _check_width("mobilenet_v2", width_multiplier)
    require_image_shape("mobilenet_v2", input_shape)
    inputs = keras.Input(shape=input_shape, name="input")
    channels = _make_divisible(32 * alpha)
    x = _conv(channels, 3, "stem_conv", strides=2)(inputs)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_relu")(x)
    b = 0
    for expansion, out_channels, repeats, first_stride in _V2_BLOCKS:
        out_channels = _make_divisible(out_channels * alpha)
        for r in range(repeats):
            b += 1
            strides = first_stride if r == 0 else 1
            prefix = f"block{b}"
            y = x
            if expansion != 1:
                y = _conv(channels * expansion, 1, f"{prefix}_expand_conv")(y)
                y = _bn(f"{prefix}_expand_bn")(y)
                y = _relu6(f"{prefix}_expand_relu")(y)
            y = _depthwise(f"{prefix}_dwconv", strides)(y)
            y = _bn(f"{prefix}_dw_bn")(y)
            y = _relu6(f"{prefix}_dw_relu")(y)
            # Linear bottleneck: no activation after the projection (paper section 3.2).
            y = _conv(out_channels, 1, f"{prefix}_project_conv")(y)
            y = _bn(f"{prefix}_project_bn")(y)
            if strides == 1 and channels == out_channels:
                y = layers.Add(name=f"{prefix}_add")([x, y])
            x = y
            channels = out_channels
    last_channels = _make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = _conv(last_channels, 1, "head_conv")(x)
    x = _bn("head_bn")(x)
    x = _relu6("head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(num_classes, name="head_dense")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v2")
