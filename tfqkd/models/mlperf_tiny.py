"""MLPerf Tiny reference models (seed 004; github.com/mlcommons/tiny, benchmark/training).

Architectures follow the reference Keras code: convs and dense layers keep their biases (the
reference uses Keras defaults) and he_normal initializers; the references' L2 kernel
regularizers are left to the optimizer's weight decay, and the softmax is dropped because every
tfqkd model outputs logits.

* ``resnet8``: image classification, CIFAR-10 32x32x3.
* ``ds_cnn``: keyword spotting, 49x10x1 MFCC, 12 classes.
* ``mobilenet_v1_025``: visual wake words, 96x96x3, 2 classes, width 0.25, ReLU.
* ``fc_autoencoder``: anomaly detection (ToyADMOS), 640 log-mel features in and out; it has
  no classes, so ``create_model`` takes ``num_classes=None`` for it.
"""

from __future__ import annotations

from typing import Optional, Tuple

from tfqkd.compat import keras
from tfqkd.models._checks import require_image_shape, require_vector_shape
from tfqkd.models.blocks import depthwise_separable
from tfqkd.models.registry import register_model

__all__ = ["build_resnet8", "build_ds_cnn", "build_mobilenet_v1_025", "build_fc_autoencoder"]

layers = keras.layers


def _conv(filters: int, kernel, name: str, strides: int = 1) -> layers.Layer:
    return layers.Conv2D(
        filters, kernel, strides=strides, padding="same", kernel_initializer="he_normal", name=name
    )


def _depthwise(name: str, strides: int = 1) -> layers.Layer:
    return layers.DepthwiseConv2D(
        3, strides=strides, padding="same", depthwise_initializer="he_normal", name=name
    )


# The reference models' depthwise-separable blocks: he_normal convs with biases, default BN, ReLU.
_SEPARABLE = dict(
    conv=_conv, depthwise=_depthwise, bn=lambda name: layers.BatchNormalization(name=name),
    act=lambda name: layers.ReLU(name=name),
)  # fmt: skip


@register_model(
    "resnet8",
    family="mlperf_tiny",
    default_input_shape=(32, 32, 3),
    default_num_classes=10,
    description="MLPerf Tiny image classification ResNet-8 (CIFAR-10)",
)
def build_resnet8(num_classes: int, input_shape: Tuple[int, ...]) -> keras.Model:
    """Builds the MLPerf Tiny ResNet-8 (``resnet_v1_eembc`` with 16 base filters).

    Args:
        num_classes: Number of output logits.
        input_shape: ``(height, width, channels)``, 32x32x3 in the benchmark.

    Returns:
        Functional ``keras.Model`` outputting logits.
    """
    require_image_shape("resnet8", input_shape, min_size=4)
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv(16, 3, "stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for s, filters in enumerate((16, 32, 64), start=1):
        strides = 1 if s == 1 else 2
        y = _conv(filters, 3, f"stack{s}_conv1", strides=strides)(x)
        y = layers.BatchNormalization(name=f"stack{s}_bn1")(y)
        y = layers.ReLU(name=f"stack{s}_relu1")(y)
        y = _conv(filters, 3, f"stack{s}_conv2")(y)
        y = layers.BatchNormalization(name=f"stack{s}_bn2")(y)
        if strides != 1:
            # The identity path must match the halved resolution and doubled width.
            x = _conv(filters, 1, f"stack{s}_shortcut_conv", strides=strides)(x)
        x = layers.Add(name=f"stack{s}_add")([x, y])
        x = layers.ReLU(name=f"stack{s}_relu2")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(num_classes, kernel_initializer="he_normal", name="head_dense")(x)
    return keras.Model(inputs, outputs, name="resnet8")


@register_model(
    "ds_cnn",
    family="mlperf_tiny",
    default_input_shape=(49, 10, 1),
    default_num_classes=12,
    description="MLPerf Tiny keyword spotting DS-CNN (49x10 MFCC, 12 classes)",
)
def build_ds_cnn(num_classes: int, input_shape: Tuple[int, ...]) -> keras.Model:
    """Builds the MLPerf Tiny DS-CNN keyword-spotting model.

    Conv 10x4 stride 2 (64) - BN - ReLU, four depthwise-separable blocks (depthwise 3x3 - BN -
    ReLU - pointwise 64 - BN - ReLU), global average pool, dense. The reference's dropout (0.2
    after the stem, 0.4 before the pool) is kept, as its accuracy target was reached with it.

    Args:
        num_classes: Number of output logits (12 in the benchmark).
        input_shape: ``(frames, mfcc, 1)``, 49x10x1 in the benchmark.

    Returns:
        Functional ``keras.Model`` outputting logits.
    """
    require_image_shape("ds_cnn", input_shape, min_size=2)
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv(64, (10, 4), "stem_conv", strides=2)(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.Dropout(0.2, name="stem_dropout")(x)
    for b in range(1, 5):
        x = depthwise_separable(x, f"block{b}", 64, 1, **_SEPARABLE)
    x = layers.Dropout(0.4, name="head_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(num_classes, name="head_dense")(x)
    return keras.Model(inputs, outputs, name="ds_cnn")


# (pointwise filters, depthwise stride) of the 13 depthwise-separable layers at width 0.25.
_VWW_BLOCKS = (
    (16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2),
    (128, 1), (128, 1), (128, 1), (128, 1), (128, 1), (256, 2), (256, 1),
)


@register_model(
    "mobilenet_v1_025",
    family="mlperf_tiny",
    default_input_shape=(96, 96, 3),
    default_num_classes=2,
    description="MLPerf Tiny visual wake words MobileNetV1 width 0.25 (96x96, 2 classes)",
)
def build_mobilenet_v1_025(num_classes: int, input_shape: Tuple[int, ...]) -> keras.Model:
    """Builds the MLPerf Tiny visual-wake-words MobileNetV1 (width 0.25, plain ReLU).

    Args:
        num_classes: Number of output logits (2 in the benchmark).
        input_shape: ``(height, width, channels)``, 96x96x3 in the benchmark.

    Returns:
        Functional ``keras.Model`` outputting logits.
    """
    require_image_shape("mobilenet_v1_025", input_shape, min_size=1)
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv(8, 3, "stem_conv", strides=2)(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for b, (filters, strides) in enumerate(_VWW_BLOCKS, start=1):
        x = depthwise_separable(x, f"block{b}", filters, strides, **_SEPARABLE)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(num_classes, name="head_dense")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v1_025")


_AE_HIDDEN = (128, 128, 128, 128, 8, 128, 128, 128, 128)


@register_model(
    "fc_autoencoder",
    family="mlperf_tiny",
    default_input_shape=(640,),
    default_num_classes=None,
    description="MLPerf Tiny anomaly detection FC autoencoder (640 -> 8 -> 640, no classes)",
)
def build_fc_autoencoder(num_classes: Optional[int], input_shape: Tuple[int, ...]) -> keras.Model:
    """Builds the MLPerf Tiny anomaly-detection fully connected autoencoder.

    Dense128-BN-ReLU x4, bottleneck Dense8-BN-ReLU, Dense128-BN-ReLU x4, linear Dense back to
    the input width. The output is a reconstruction, not logits, so there is no class count.

    Args:
        num_classes: Must be ``None`` (checked by ``create_model``); kept for the builder
            signature shared by all models.
        input_shape: ``(features,)``, 640 (5 frames x 128 mel bins) in the benchmark.

    Returns:
        Functional ``keras.Model`` whose output has the input's shape.
    """
    del num_classes  # No classification head; the output width is the input width.
    require_vector_shape("fc_autoencoder", input_shape)
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    for i, units in enumerate(_AE_HIDDEN, start=1):
        # Name the bottleneck so it is easy to find (e.g. for per-layer bit policies).
        prefix = "bottleneck" if units == 8 else f"dense{i}"
        x = layers.Dense(units, name=f"{prefix}_dense")(x)
        x = layers.BatchNormalization(name=f"{prefix}_bn")(x)
        x = layers.ReLU(name=f"{prefix}_relu")(x)
    outputs = layers.Dense(input_shape[0], name="output_dense")(x)
    return keras.Model(inputs, outputs, name="fc_autoencoder")
