"""Quantization: QKeras layers and quantizers, per-layer bit policies, ``quantize``.

See docs/architecture.md and thesis sections 3.5-3.6 and 5.1.9.
"""

from tfqkd.quant.layers import QActivation, QConv2D, QDense, QDepthwiseConv2D, layer_quantizers, model_quantizers
from tfqkd.quant.policy import QuantPolicy, QuantSpec, Rule, layer_specs, list_presets, resolve_policy
from tfqkd.quant.quantizers import AffineQuantizer, LearnedStepQuantizer, Pof2Quantizer, round_half_up
from tfqkd.quant.transform import custom_objects, is_quantized, quantize

__all__ = [
    "AffineQuantizer",
    "LearnedStepQuantizer",
    "Pof2Quantizer",
    "QActivation",
    "QConv2D",
    "QDense",
    "QDepthwiseConv2D",
    "QuantPolicy",
    "QuantSpec",
    "Rule",
    "custom_objects",
    "is_quantized",
    "layer_quantizers",
    "layer_specs",
    "list_presets",
    "model_quantizers",
    "quantize",
    "resolve_policy",
    "round_half_up",
]
