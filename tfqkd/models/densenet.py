"""DenseNet-BC for CIFAR and ImageNet, and its DPU-friendly variant.

Huang et al., "Densely Connected Convolutional Networks" (CVPR 2017), BC form: growth rate
k=32, bottleneck width 4k, compression 0.5. Depths and block configurations follow the thesis
(seed 001, section 5.2.1, table 5.2): DenseNet-21/-37/-63 are its custom small variants, the
others are from the paper. With 100 classes the trainable parameter counts equal the thesis's
figures (e.g. DenseNet-21 419,420), which are the PyTorch counts: BN contributes gamma and
beta, its moving statistics are not trainable.

The ``*_dpu`` models implement the modification of thesis chapter 6.1 for the Xilinx DPU:
pre-activation BN-ReLU-Conv cannot have its BN folded and its ReLU runs in software on the
DPU, so dense layers become Conv-BN-ReLU and transitions Conv-BN, letting Vitis-AI fold every
BN into the preceding conv and fuse every ReLU into it.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.models._checks import require_image_shape
from tfqkd.models.registry import register_variant

__all__ = ["BLOCK_CONFIGS", "build_densenet", "build_densenet_dpu"]

layers = keras.layers

GROWTH_RATE = 32
BOTTLENECK_FACTOR = 4
COMPRESSION = 0.5
# Keras uses 1e-3 by default; 1e-5 matches PyTorch, in which the thesis models were trained.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

BLOCK_CONFIGS = {
    "densenet21": (1, 2, 3, 2),
    "densenet37": (2, 4, 6, 4),
    "densenet63": (3, 6, 12, 8),
    "densenet121": (6, 12, 24, 16),
    "densenet169": (6, 12, 32, 32),
    "densenet201": (6, 12, 48, 32),
    "densenet264": (6, 12, 64, 48),
}
DPU_MODELS = ("densenet21", "densenet37", "densenet63")
STEMS = ("cifar", "imagenet")


def _conv(filters: int, kernel: int, name: str, strides: int = 1) -> layers.Layer:
    # No bias: every conv is next to a BN, whose beta makes a bias redundant.
    return layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=name,
    )


def _bn(name: str) -> layers.Layer:
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _min_input_size(stem: str) -> int:
    # Three 2x2 transition pools, plus the stride-4 ImageNet stem.
    return 8 if stem == "cifar" else 32


def _check_stem(model_name: str, stem: str, input_shape: Tuple[int, ...]) -> None:
    if stem not in STEMS:
        raise TfqkdError(f"unknown stem '{stem}' for model '{model_name}'; known stems: {', '.join(STEMS)}")
    require_image_shape(model_name, input_shape, min_size=_min_input_size(stem))


def _imagenet_stem(x, filters: int):
    """7x7/2 conv, BN, ReLU, 3x3/2 max pool (paper table 1); also DPU-friendly as written."""
    x = _conv(filters, 7, "stem_conv", strides=2)(x)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    return layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)


def _stem(inputs, stem: str, channels: int, activated: bool):
    """The CIFAR stem (a 3x3 conv, with BN-ReLU after it when ``activated``) or the ImageNet one."""
    if stem != "cifar":
        return _imagenet_stem(inputs, channels)
    x = _conv(channels, 3, "stem_conv")(inputs)
    if activated:
        x = _bn("stem_bn")(x)
        x = layers.ReLU(name="stem_relu")(x)
    return x


def build_densenet(
    model_name: str, blocks: Sequence[int], num_classes: int, input_shape: Tuple[int, ...], stem: str = "cifar"
) -> keras.Model:
    """Builds a pre-activation DenseNet-BC.

    Args:
        model_name: Name given to the Keras model.
        blocks: Number of dense layers in each of the four dense blocks.
        num_classes: Number of output logits.
        input_shape: ``(height, width, channels)``.
        stem: ``"cifar"`` (one 3x3 stride-1 conv to 2k channels, nothing after it, since the
            first dense layer starts with BN-ReLU) or ``"imagenet"`` (7x7/2 conv, BN, ReLU,
            3x3/2 max pool, for 224x224 inputs).

    Returns:
        Functional ``keras.Model`` outputting logits.
    """
    _check_stem(model_name, stem, input_shape)
    inputs = keras.Input(shape=input_shape, name="input")
    channels = 2 * GROWTH_RATE
    x = _stem(inputs, stem, channels, activated=False)
    for b, num_layers in enumerate(blocks, start=1):
        for i in range(1, num_layers + 1):
            prefix = f"block{b}_layer{i}"
            y = _bn(f"{prefix}_bn1")(x)
            y = layers.ReLU(name=f"{prefix}_relu1")(y)
            y = _conv(BOTTLENECK_FACTOR * GROWTH_RATE, 1, f"{prefix}_conv1")(y)
            y = _bn(f"{prefix}_bn2")(y)
            y = layers.ReLU(name=f"{prefix}_relu2")(y)
            y = _conv(GROWTH_RATE, 3, f"{prefix}_conv2")(y)
            x = layers.Concatenate(name=f"{prefix}_concat")([x, y])
            channels += GROWTH_RATE
        if b < len(blocks):
            # floor(theta * c), as in the reference implementations (int() of a positive float).
            channels = int(COMPRESSION * channels)
            x = _bn(f"transition{b}_bn")(x)
            x = layers.ReLU(name=f"transition{b}_relu")(x)
            x = _conv(channels, 1, f"transition{b}_conv")(x)
            x = layers.AveragePooling2D(2, strides=2, name=f"transition{b}_pool")(x)
    x = _bn("head_bn")(x)
    x = layers.ReLU(name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(num_classes, name="head_dense")(x)
    return keras.Model(inputs, outputs, name=model_name)


def build_densenet_dpu(
    model_name: str, blocks: Sequence[int], num_classes: int, input_shape: Tuple[int, ...], stem: str = "cifar"
) -> keras.Model:
    """Builds the DPU-friendly post-activation DenseNet-BC of thesis chapter 6.1.

    Dense layer = Conv1x1(4k)-BN-ReLU-Conv3x3(k)-BN-ReLU, transition = Conv1x1(c/2)-BN then
    2x2 average pool, stem conv followed by BN-ReLU, head = global average pool then dense.
    Every ReLU directly follows a BN that directly follows a conv, so after BN folding each
    ReLU fuses into its conv and no standalone activation is left for the DPU.

    Args:
        model_name: Name given to the Keras model.
        blocks: Number of dense layers in each of the four dense blocks.
        num_classes: Number of output logits.
        input_shape: ``(height, width, channels)``.
        stem: ``"cifar"`` (3x3 conv-BN-ReLU) or ``"imagenet"`` (7x7/2 conv-BN-ReLU, max pool).

    Returns:
        Functional ``keras.Model`` outputting logits.
    """
    _check_stem(model_name, stem, input_shape)
    inputs = keras.Input(shape=input_shape, name="input")
    channels = 2 * GROWTH_RATE
    x = _stem(inputs, stem, channels, activated=True)
    for b, num_layers in enumerate(blocks, start=1):
        for i in range(1, num_layers + 1):
            prefix = f"block{b}_layer{i}"
            y = _conv(BOTTLENECK_FACTOR * GROWTH_RATE, 1, f"{prefix}_conv1")(x)
            y = _bn(f"{prefix}_bn1")(y)
            y = layers.ReLU(name=f"{prefix}_relu1")(y)
            y = _conv(GROWTH_RATE, 3, f"{prefix}_conv2")(y)
            y = _bn(f"{prefix}_bn2")(y)
            y = layers.ReLU(name=f"{prefix}_relu2")(y)
            x = layers.Concatenate(name=f"{prefix}_concat")([x, y])
            channels += GROWTH_RATE
        if b < len(blocks):
            channels = int(COMPRESSION * channels)
            x = _conv(channels, 1, f"transition{b}_conv")(x)
            x = _bn(f"transition{b}_bn")(x)
            x = layers.AveragePooling2D(2, strides=2, name=f"transition{b}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(num_classes, name="head_dense")(x)
    return keras.Model(inputs, outputs, name=model_name)


def _register(model_name: str, blocks: Tuple[int, ...]) -> None:
    depth = model_name[len("densenet"):]

    cifar = dict(family="densenet", default_input_shape=(32, 32, 3), default_num_classes=10)

    def builder(num_classes: int, input_shape: Tuple[int, ...], stem: str = "cifar") -> keras.Model:
        return build_densenet(model_name, blocks, num_classes, input_shape, stem=stem)

    description = f"DenseNet-BC-{depth}, k=32, blocks {list(blocks)} (thesis table 5.2)"
    register_variant(model_name, builder, description=description, **cifar)
    if model_name not in DPU_MODELS:
        return
    dpu_name = f"{model_name}_dpu"

    def dpu_builder(num_classes: int, input_shape: Tuple[int, ...], stem: str = "cifar") -> keras.Model:
        return build_densenet_dpu(dpu_name, blocks, num_classes, input_shape, stem=stem)

    description = f"DenseNet-BC-{depth} with Conv-BN-ReLU layers for the Xilinx DPU (thesis 6.1)"
    register_variant(dpu_name, dpu_builder, description=description, **cifar)


for _name, _blocks in BLOCK_CONFIGS.items():
    _register(_name, _blocks)
