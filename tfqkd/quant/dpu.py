"""Deprecated alias of :mod:`tfqkd.dpu` (the DPU training model moved there, issue 15).

``quantize_for_dpu``, ``DPUQuantizer``, ``DPUAveragePooling2D``, ``fold_batchnorm`` and the rest
are importable from :mod:`tfqkd.dpu`; ``tfqkd.quantize(model, "dpu")`` is unchanged.
"""

import warnings

from tfqkd.dpu.arithmetic import AVGPOOL_FACTORS, DPU_LEAKY_ALPHA, avgpool_factor, min_diff_pos, non_overflow_pos
from tfqkd.dpu.layers import OUTPUT_QUANTIZER_SUFFIX, DPUAveragePooling2D, DPUQuantizer, dpu_custom_objects, is_dpu_model
from tfqkd.dpu.transform import calibrate_dpu_positions, fold_batchnorm, quantize_for_dpu

__all__ = [
    "AVGPOOL_FACTORS",
    "DPUAveragePooling2D",
    "DPUQuantizer",
    "DPU_LEAKY_ALPHA",
    "OUTPUT_QUANTIZER_SUFFIX",
    "avgpool_factor",
    "calibrate_dpu_positions",
    "dpu_custom_objects",
    "fold_batchnorm",
    "is_dpu_model",
    "min_diff_pos",
    "non_overflow_pos",
    "quantize_for_dpu",
]

warnings.warn("tfqkd.quant.dpu moved to tfqkd.dpu; import from there", DeprecationWarning, stacklevel=2)
