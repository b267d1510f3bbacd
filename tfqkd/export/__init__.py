"""Export: TFLite (int8 keeping the trained grid, float32, float16), the Xilinx DPU, stock QKeras, validation, size report.

Thesis chapter 6 and table 5.8; docs/architecture.md.
"""

from tfqkd.export.dpu import to_dpu
from tfqkd.export.inspect import float_ops, load_interpreter, read_tflite, weight_codes_per_channel
from tfqkd.export.integer_graph import Grid, IntegerGraph
from tfqkd.export.hls4ml import to_hls4ml
from tfqkd.export.qkeras import to_qkeras, validate_qkeras
from tfqkd.export.size import count_parameters, size_report, write_size_report
from tfqkd.export.tflite import FORMATS, KINDS, convert, to_tflite
from tfqkd.export.validate import format_report, run_tflite, validate_tflite

__all__ = [
    "Grid",
    "FORMATS",
    "IntegerGraph",
    "KINDS",
    "convert",
    "count_parameters",
    "float_ops",
    "format_report",
    "load_interpreter",
    "read_tflite",
    "run_tflite",
    "size_report",
    "to_dpu",
    "to_hls4ml",
    "to_qkeras",
    "to_tflite",
    "validate_qkeras",
    "validate_tflite",
    "weight_codes_per_channel",
    "write_size_report",
]
