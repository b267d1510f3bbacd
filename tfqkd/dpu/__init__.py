"""The Xilinx DPUCZDX8G: its arithmetic, the DPU-exact training model, its graph, and models of it.

Thesis chapter 6 (and table 6.4 for the performance model). Everything tfqkd knows about the
DPU lives here; the exporter (:func:`tfqkd.export.to_dpu`, :mod:`tfqkd.export.dpu`) only writes
files from it. In the order a DPU model is made:

* :mod:`.arithmetic`: 8-bit power-of-two codes, the DPU's rounding and shifts, average-pooling
  factors, position rules (NumPy);
* :mod:`.compat`: which float models the DPU runs (:func:`check_model` names every offending layer);
* :mod:`.layers`: :class:`DPUQuantizer` and :class:`DPUAveragePooling2D`;
* :mod:`.transform`: :func:`quantize_for_dpu` (the DPU-exact QKeras training model; also
  ``tfqkd.quantize(model, "dpu")``, the ``dpu`` target) and :func:`calibrate_dpu_positions`;
* :mod:`.graph` / :mod:`.positions`: the DPU graph (BN folded, activations fused) and the
  positions adjusted to the DPU's limits;
* :mod:`.emulator`: the bit-accurate integer emulator;
* :mod:`.performance`: an analytical latency / throughput model of the DPU cores.

This package builds on :mod:`tfqkd.quant` and is below :mod:`tfqkd.export`; importing it
registers the ``dpu`` quantization target (:mod:`tfqkd.quant.targets`).
"""

from tfqkd.dpu.arithmetic import AVGPOOL_FACTORS, DPU_LEAKY_ALPHA, avgpool_factor, round_shift
from tfqkd.dpu.compat import CompatIssue, CompatReport, check_model, require_compatible
from tfqkd.dpu.emulator import DPUEmulator, emulate
from tfqkd.dpu.graph import DPUGraph, DPUNode, graph_from_dpu_model
from tfqkd.dpu.layers import OUTPUT_QUANTIZER_SUFFIX, DPUAveragePooling2D, DPUQuantizer, dpu_custom_objects, is_dpu_model
from tfqkd.dpu.positions import check_limits, solve_positions
from tfqkd.dpu.transform import DPU_SPEC, DPU_TARGET, calibrate_dpu_positions, fold_batchnorm, quantize_for_dpu

__all__ = [
    "AVGPOOL_FACTORS",
    "CompatIssue",
    "CompatReport",
    "DPUAveragePooling2D",
    "DPUEmulator",
    "DPUGraph",
    "DPUNode",
    "DPUQuantizer",
    "DPU_LEAKY_ALPHA",
    "DPU_SPEC",
    "DPU_TARGET",
    "OUTPUT_QUANTIZER_SUFFIX",
    "avgpool_factor",
    "calibrate_dpu_positions",
    "check_limits",
    "check_model",
    "dpu_custom_objects",
    "emulate",
    "fold_batchnorm",
    "graph_from_dpu_model",
    "is_dpu_model",
    "quantize_for_dpu",
    "require_compatible",
    "round_shift",
    "solve_positions",
]
