"""The building blocks of the DPU training model: its quantizer and its average pooling.

:class:`DPUQuantizer` is Vitis-AI's ``Pof2SQuantizer`` with a fixed position stored as a layer
weight; :class:`DPUAveragePooling2D` multiplies the window sum by the DPU's factor. Both are
registered for loading (``tfqkd>DPUQuantizer``, ``tfqkd>DPUAveragePooling2D``), and the DPU
quantizer in the quantizer registry of :mod:`tfqkd.quant.quantizers`, so QKeras' tools read it.
"""

from __future__ import annotations

import qkeras

from tfqkd.compat import keras, tf
from tfqkd.dpu.arithmetic import QMAX, QMIN, avgpool_factor, non_overflow_pos
from tfqkd.errors import TfqkdError
from tfqkd.quant.grid import Grid
from tfqkd.quant.layers import QActivation, weight_quantizers
from tfqkd.quant.quantizers import TfqkdQuantizer, power_of_two_fake_quant, register_quantizer

__all__ = [
    "DPUAveragePooling2D",
    "DPUQuantizer",
    "OUTPUT_QUANTIZER_SUFFIX",
    "dpu_custom_objects",
    "is_dpu_model",
    "output_quantizer",
]

#: Suffix of the QActivation layers quantizing what the DPU writes to memory.
OUTPUT_QUANTIZER_SUFFIX = "_dpuq"


@register_quantizer
@keras.saving.register_keras_serializable(package="tfqkd", name="DPUQuantizer")
class DPUQuantizer(TfqkdQuantizer, qkeras.quantized_bits):
    """8-bit power-of-two quantizer with a fixed position stored as a layer weight.

    ``x_hat = clip(round(x * 2**pos), -128, 127) * 2**-pos`` with the DPU's rounding: half to
    even for weights and biases, half up for activations (Vitis-AI ``Pof2SQuantizer``,
    ``vitis_quantize_ops.dpu_round``). The position is the owning layer's weight
    ``<role>_pos`` (``kernel_pos``, ``bias_pos``, ``input_pos``), set by
    :func:`tfqkd.dpu.calibrate_dpu_positions`; the straight-through estimator passes gradients
    inside the representable range.

    Args:
      rounding: ``"even"`` (weights, bias) or ``"half_up"`` (activations).
      initial_pos: position until calibrated.
    """

    scheme = "pof2"
    STATE_NAMES = ("pos",)

    def __init__(self, bits=8, signed=True, narrow_range=False, rounding="half_up", initial_pos=4):
        if bits != 8:
            raise TfqkdError("the DPU quantizer is 8-bit only")
        if rounding not in ("even", "half_up"):
            raise TfqkdError(f"rounding must be 'even' or 'half_up', got {rounding!r}")
        self._init_common(8, True, False)
        self.rounding = rounding
        self.initial_pos = int(initial_pos)
        #: Calibration switch (eager only): pass values through unquantized.
        self.bypass = False

    def variable_specs(self):
        return {"pos": (float(self.initial_pos), False)}

    @property
    def pos(self):
        """The position weight (shape (1,))."""
        return self.variable("pos")

    def position(self):
        """The position as a Python int."""
        return int(round(float(self.pos.numpy()[0])))

    def __call__(self, x, training=None):
        x = tf.convert_to_tensor(x)
        if self.bypass:
            return x
        pos = tf.stop_gradient(tf.cast(self.pos[0], x.dtype))
        return power_of_two_fake_quant(x, pos, QMIN, QMAX, half_up=self.rounding == "half_up", training=training)

    def initialize(self, values, method="minmax"):
        """Sets the position so that ``max|values|`` does not overflow (Vitis ``method`` 0)."""
        self.pos.assign([float(non_overflow_pos(values))])

    def scale(self):
        return tf.pow(2.0, -self.pos[0])

    def grid(self, values=None):
        pos = float(self.pos.numpy()[0])
        return Grid(2.0**-pos, 0, QMIN, QMAX, "half_even" if self.rounding == "even" else "half_up")

    def max(self):
        return float(QMAX * 2.0**-self.initial_pos)

    def min(self):
        return float(QMIN * 2.0**-self.initial_pos)

    def __str__(self):
        return f"dpu_pof2(8,{self.rounding})"

    def get_config(self):
        return {**super().get_config(), "rounding": self.rounding, "initial_pos": self.initial_pos}


@keras.saving.register_keras_serializable(package="tfqkd", name="DPUAveragePooling2D")
class DPUAveragePooling2D(keras.layers.Layer):
    """Average pooling as the DPU computes it: ``sum * num / 2**shift`` over the window.

    Keras divides by ``k*k``; the DPU multiplies the window sum by a fixed-point factor
    (Vitis-AI ``VitisAveragePooling2D`` / ``VitisGlobalAveragePooling2D``,
    :func:`tfqkd.dpu.arithmetic.avgpool_factor`). The sum is computed exactly (a depthwise
    convolution with ones, or a reduction), so values on the power-of-two grid stay exact in
    float32.

    Args:
      pool_size: square window side (ignored when ``global_pool``).
      strides: stride (defaults to ``pool_size``).
      global_pool: pool the whole feature map (``GlobalAveragePooling2D``), which must be square.
      keepdims: keep the spatial dimensions (global pooling only).
    """

    def __init__(self, pool_size=2, strides=None, global_pool=False, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size if not isinstance(pool_size, (list, tuple)) else pool_size[0])
        self.strides = int(self.pool_size if strides is None else (strides if not isinstance(strides, (list, tuple)) else strides[0]))
        self.global_pool = bool(global_pool)
        self.keepdims = bool(keepdims)

    def build(self, input_shape):
        if self.global_pool:
            height, width = input_shape[1], input_shape[2]
            if height is None or height != width:
                raise TfqkdError(f"layer '{self.name}': the DPU pools square windows only, got {height}x{width}")
            self.pool_size = int(height)
        self.num, self.shift = avgpool_factor(self.pool_size)
        super().build(input_shape)

    def call(self, inputs):
        factor = self.num / float(2**self.shift)
        if self.global_pool:
            summed = tf.reduce_sum(inputs, axis=[1, 2], keepdims=self.keepdims)
        else:
            channels = inputs.shape[-1]
            ones = tf.ones((self.pool_size, self.pool_size, channels, 1), dtype=inputs.dtype)
            summed = tf.nn.depthwise_conv2d(inputs, ones, [1, self.strides, self.strides, 1], "VALID")
        return summed * factor

    def compute_output_shape(self, input_shape):
        if self.global_pool:
            return (input_shape[0], 1, 1, input_shape[3]) if self.keepdims else (input_shape[0], input_shape[3])
        size = lambda n: None if n is None else (n - self.pool_size) // self.strides + 1  # noqa: E731
        return (input_shape[0], size(input_shape[1]), size(input_shape[2]), input_shape[3])

    def get_config(self):
        return {
            **super().get_config(),
            "pool_size": self.pool_size,
            "strides": self.strides,
            "global_pool": self.global_pool,
            "keepdims": self.keepdims,
        }


def output_quantizer(name):
    """The ``<name>_dpuq`` layer quantizing a tensor the DPU writes (8 bits, half up)."""
    return QActivation(DPUQuantizer(rounding="half_up"), name=name + OUTPUT_QUANTIZER_SUFFIX)


def dpu_custom_objects():
    """The DPU's objects for loading a saved DPU training model (:func:`tfqkd.quant.custom_objects` includes them)."""
    return {
        "DPUAveragePooling2D": DPUAveragePooling2D,
        keras.saving.get_registered_name(DPUAveragePooling2D): DPUAveragePooling2D,
        keras.saving.get_registered_name(DPUQuantizer): DPUQuantizer,
    }


def is_dpu_model(model):
    """Whether ``model`` was built by :func:`tfqkd.dpu.quantize_for_dpu` (has DPU quantizers)."""
    return any(
        isinstance(getattr(layer, "quantizer", None), DPUQuantizer)
        or any(isinstance(q, DPUQuantizer) for _, _, q, _ in weight_quantizers(layer))
        for layer in model.layers
    )
