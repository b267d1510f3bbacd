"""Analysis and design tools (the mixed-precision, hardware-aware and precision-scalable studies the thesis builds on).

* :mod:`tfqkd.analysis.layerwise`: per-layer weight/activation statistics, SQNR, CSV,
  histogram PNGs and a TensorBoard callback (seed 003, Yun 2022).
* :mod:`tfqkd.analysis.mixed_precision`: sensitivity-based per-layer bit allocation under an
  accuracy budget, and the AutoQKeras comparison (seed 004, Terlizzi 2023).
* :mod:`tfqkd.analysis.psmac`: the precision-scalable MAC latency model (seed 004).
* :mod:`tfqkd.analysis.hakd`: hardware-aware student selection and distillation, with pruning
  and quantization on the Pareto plot (seed 002, Radu et al.).
"""

from tfqkd.analysis.hakd import (
    Candidate,
    PSMACBackend,
    TFLiteBackend,
    default_grid,
    hakd_search,
    measure_candidates,
    pareto_front,
    plot_pareto,
    select_student,
)
from tfqkd.analysis.layerwise import (
    LayerwiseTensorBoard,
    analyze,
    excess_kurtosis,
    plot_histograms,
    sqnr_db,
    tensor_stats,
)
from tfqkd.analysis.mixed_precision import (
    MixedPrecisionResult,
    allocate,
    bits_cost,
    layer_costs,
    policy_from_bits,
    run_autoqkeras,
    search,
    sensitivity,
)
from tfqkd.analysis.psmac import PSMACModel, macs_per_cycle

__all__ = [
    "Candidate",
    "LayerwiseTensorBoard",
    "MixedPrecisionResult",
    "PSMACBackend",
    "PSMACModel",
    "TFLiteBackend",
    "allocate",
    "analyze",
    "bits_cost",
    "default_grid",
    "excess_kurtosis",
    "hakd_search",
    "layer_costs",
    "macs_per_cycle",
    "measure_candidates",
    "pareto_front",
    "plot_pareto",
    "plot_histograms",
    "policy_from_bits",
    "run_autoqkeras",
    "search",
    "select_student",
    "sensitivity",
    "sqnr_db",
    "tensor_stats",
]
