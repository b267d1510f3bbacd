"""MNIST multi-layer perceptrons of the thesis (seed 001, section 5.2.1, table 5.8).

Every model has two hidden layers of the same width W (Dense-ReLU, Dense-ReLU) and a linear
output layer. The thesis text describes DNN as single-hidden-layer, but the parameter counts
it reports (DNN-1200 2,395,210; DNN-30 24,790) are only reached with two hidden layers, so the
counts decide: 784*W + W + W*W + W + W*10 + 10.
"""

from __future__ import annotations

from typing import Tuple

from tfqkd.compat import keras
from tfqkd.models.registry import register_variant

__all__ = ["MLP_WIDTHS", "build_mlp"]

layers = keras.layers

MLP_WIDTHS = {
    "dnn1200": 1200,
    "dnn800": 800,
    "dnn300": 300,
    "dnn30": 30,
    "kl_mlp_teacher": 1200,
    "kl_mlp_student": 300,
}
NUM_HIDDEN = 2


def build_mlp(model_name: str, width: int, num_classes: int, input_shape: Tuple[int, ...]) -> keras.Model:
    """Builds an MLP with two hidden ReLU layers of ``width`` units.

    Args:
        model_name: Name given to the Keras model.
        width: Hidden layer width W.
        num_classes: Number of output logits.
        input_shape: ``(28, 28, 1)``-like images (flattened by a leading ``flatten`` layer) or
            an already flat ``(784,)`` vector (no flatten layer).

    Returns:
        Functional ``keras.Model`` outputting logits.
    """
    inputs = keras.Input(shape=input_shape, name="input")
    x = inputs
    if len(input_shape) > 1:
        x = layers.Flatten(name="input_flatten")(x)
    for i in range(1, NUM_HIDDEN + 1):
        x = layers.Dense(width, name=f"hidden{i}_dense")(x)
        # Separate ReLU layers: the quantizer inserts activation quantizers at these points.
        x = layers.ReLU(name=f"hidden{i}_relu")(x)
    outputs = layers.Dense(num_classes, name="head_dense")(x)
    return keras.Model(inputs, outputs, name=model_name)


def _register(model_name: str, width: int) -> None:
    def builder(num_classes: int, input_shape: Tuple[int, ...]) -> keras.Model:
        return build_mlp(model_name, width, num_classes, input_shape)

    register_variant(
        model_name, builder, family="mlp", default_input_shape=(28, 28, 1), default_num_classes=10,
        description=f"MNIST MLP, two hidden layers of {width} (thesis 5.2.1)",
    )


for _name, _width in MLP_WIDTHS.items():
    _register(_name, _width)
