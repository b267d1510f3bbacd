"""Benchmarks: latency, throughput and energy per image on CPU (TensorFlow, TFLite), and a DPU model.

Thesis chapter 7: latency is the time of one image, throughput images per
second, energy per image ``min(P * latency, P / throughput)`` (eq. 7.4).
:mod:`tfqkd.dpu.performance` estimates DPUCZDX8G latency and throughput from
the architecture (thesis table 6.4).
"""

from tfqkd.bench.latency import (
    DEFAULT_BATCH_SIZES,
    Backend,
    energy_per_image,
    keras_backend,
    summarize,
    sweep,
    tflite_backend,
)
from tfqkd.bench.report import THESIS_DPU_LATENCY_MS, THESIS_TABLE_7_1, THESIS_THROUGHPUT, format_table

__all__ = [
    "Backend",
    "DEFAULT_BATCH_SIZES",
    "THESIS_DPU_LATENCY_MS",
    "THESIS_TABLE_7_1",
    "THESIS_THROUGHPUT",
    "energy_per_image",
    "format_table",
    "keras_backend",
    "summarize",
    "sweep",
    "tflite_backend",
]
