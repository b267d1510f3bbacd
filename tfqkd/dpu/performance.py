"""An analytical performance model of the Xilinx DPUCZDX8G (Zynq UltraScale+ MPSoC DPU).

The DPUCZDX8G convolution engine computes, every clock cycle, ``PP`` output
pixels of one row x ``ICP`` input channels x ``OCP`` output channels, i.e.
``PP * ICP * OCP`` multiply-accumulates (``2 * PP * ICP * OCP`` ops/cycle; Xilinx
PG338, thesis table 6.4: B512 = PP4 ICP8 OCP8 ... B4096 = PP8 ICP16 OCP16).
A layer therefore costs

    compute cycles = ceil(W_out / PP) * H_out * K_h * K_w * ceil(C_in / ICP) * ceil(C_out / OCP)

(channels padded to multiples of ICP/OCP, pixels of a row to a multiple of PP).
A DenseNet-BC on 32x32 inputs is small enough that every layer also moves its
int8 input/output feature maps and weights through DDR, so each layer takes

    t_layer = max(compute cycles / (f * eta), bytes / BW) + overhead_cycles / f

and the network latency is the sum over layers on one core. With ``n`` cores
running images in parallel the DDR bandwidth is shared, so throughput is
``n / latency(BW / n)``. Concatenation is free (layers write into one buffer
at channel offsets), BatchNormalization folds into the preceding conv and ReLU
fuses into it (the DPU variant of thesis 6.1); average / global pooling run in
the pooling engine at ``PP * ICP`` elements per cycle.

Constants that are *not* fitted: the architecture (PP/ICP/OCP), the clock (300
MHz), the number of cores (3), and the ZCU102 PS DDR4 peak bandwidth (64-bit
DDR4-2666: 21.3 GB/s). One global parameter is fitted, the same for every
model (:data:`CALIBRATION`): ``overhead_cycles``, a fixed cost per layer
(instruction fetch, pipeline fill and drain, DDR access latency), fitted to the
thesis's three measured latencies by minimising the largest relative error.
``eta``, the sustained fraction of the engine's peak, is kept at 1: fitting it
together with the overhead gives 0.98-1.0, i.e. no evidence of a lower efficiency
(``benchmarks/bench_dpu_model.py`` reports both fits and a leave-one-out test).

Layers the DPU cannot run (a BatchNormalization not directly after a conv,
an activation not fused into one: the pre-activation DenseNet of thesis 6.1)
are listed in ``cpu_layers`` of :func:`estimate` and not costed: model the
``*_dpu`` variants.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.graph import single_producer

__all__ = [
    "CORES",
    "CALIBRATION",
    "DPUArch",
    "DPUConfig",
    "LayerCost",
    "THESIS_DPU",
    "calibrate",
    "conv_cycles",
    "cpu_layers",
    "estimate",
    "layer_costs",
]


@dataclass(frozen=True)
class DPUArch:
    """One DPUCZDX8G size: pixel, input-channel and output-channel parallelism."""

    name: str
    pp: int
    icp: int
    ocp: int

    @property
    def ops_per_cycle(self):
        """Peak operations per cycle (1 MAC = 2 ops): ``2 * PP * ICP * OCP``."""
        return 2 * self.pp * self.icp * self.ocp

    @property
    def macs_per_cycle(self):
        return self.pp * self.icp * self.ocp


#: DPUCZDX8G core sizes (Xilinx PG338; thesis table 6.4), by name (B512 ... B4096); boards are
#: :data:`tfqkd.export.dpu.BOARDS`.
CORES = {
    a.name: a
    for a in (
        DPUArch("B512", 4, 8, 8),
        DPUArch("B800", 4, 10, 10),
        DPUArch("B1024", 8, 8, 8),
        DPUArch("B1152", 4, 12, 12),
        DPUArch("B1600", 8, 10, 10),
        DPUArch("B2304", 8, 12, 12),
        DPUArch("B3136", 8, 14, 14),
        DPUArch("B4096", 8, 16, 16),
    )
}
ARCHES = CORES  # the name before 0.2

#: ZCU102 processing-system DDR4: 64 bit x 2666 MT/s.
ZCU102_DDR_BYTES_PER_S = 8 * 2666e6

#: The two global parameters, fitted once to the three thesis latencies (see benchmarks/bench_dpu_model.py).
CALIBRATION = {"eta": 1.0, "overhead_cycles": 5800.0}


@dataclass(frozen=True)
class DPUConfig:
    """A DPU system: architecture, clock, cores, DDR bandwidth and the calibrated globals."""

    arch: DPUArch = CORES["B4096"]
    clock_hz: float = 300e6
    cores: int = 3
    ddr_bytes_per_s: float = ZCU102_DDR_BYTES_PER_S
    eta: float = CALIBRATION["eta"]
    overhead_cycles: float = CALIBRATION["overhead_cycles"]
    memory_bound: bool = True

    def __post_init__(self):
        if self.clock_hz <= 0 or self.cores < 1 or self.ddr_bytes_per_s <= 0:
            raise TfqkdError("DPU clock, cores and bandwidth must be positive")
        if not 0 < self.eta <= 1:
            raise TfqkdError(f"eta must be in (0, 1], got {self.eta}")
        if self.overhead_cycles < 0:
            raise TfqkdError(f"overhead_cycles must be >= 0, got {self.overhead_cycles}")


#: Thesis measurements on a ZCU102 with three B4096 cores at 300 MHz (thesis chapter 7).
THESIS_DPU = {
    "densenet21": {"latency_ms": 0.69, "throughput": 3674.0},
    "densenet37": {"latency_ms": 1.11, "throughput": 2251.0},
    "densenet63": {"latency_ms": 1.78, "throughput": 1318.0},
}


def conv_cycles(arch, out_h, out_w, c_in, c_out, k_h=1, k_w=1):
    """Compute cycles of one convolution on ``arch``: padded pixels x kernel x padded channel groups.

    ``ceil(W_out/PP) * H_out * K_h * K_w * ceil(C_in/ICP) * ceil(C_out/OCP)``.
    """
    for v in (out_h, out_w, c_in, c_out, k_h, k_w):
        if int(v) < 1:
            raise TfqkdError(f"conv dimensions must be positive, got {(out_h, out_w, c_in, c_out, k_h, k_w)}")
    return (
        math.ceil(out_w / arch.pp) * out_h * k_h * k_w * math.ceil(c_in / arch.icp) * math.ceil(c_out / arch.ocp)
    )


@dataclass
class LayerCost:
    """The modelled cost of one DPU layer."""

    name: str
    kind: str
    macs: int
    compute_cycles: int
    bytes: int
    details: Dict[str, int] = field(default_factory=dict)

    def seconds(self, config: DPUConfig, bandwidth: Optional[float] = None):
        bandwidth = config.ddr_bytes_per_s if bandwidth is None else bandwidth
        compute = self.compute_cycles / (config.clock_hz * config.eta)
        memory = self.bytes / bandwidth if config.memory_bound else 0.0
        return max(compute, memory) + config.overhead_cycles / config.clock_hz


def _hw(shape):
    return int(shape[1]), int(shape[2]), int(shape[3])


def layer_costs(model, arch=CORES["B4096"]):
    """Per-layer DPU costs of a Keras model (batch 1, int8 tensors).

    Conv2D / DepthwiseConv2D / Dense map to the conv engine, pooling to the
    pooling engine; BatchNormalization directly after a conv, ReLU, Concatenate,
    Flatten, Dropout and the input are free (folded, fused, or addressing).

    Args:
        model: a built Keras model with a fully known input shape (its
            QKeras subclasses count like the Keras layers).
        arch: :class:`DPUArch`.

    Returns:
        list of :class:`LayerCost`.
    """
    L = keras.layers
    costs = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            costs += layer_costs(layer, arch)
            continue
        out_shape = layer.output_shape
        if isinstance(layer, L.DepthwiseConv2D):
            hi, wi, c = _hw(layer.input_shape)
            ho, wo, co = _hw(out_shape)
            kh, kw = layer.kernel_size
            cyc = math.ceil(wo / arch.pp) * ho * kh * kw * math.ceil(co / arch.ocp)
            nbytes = hi * wi * c + ho * wo * co + kh * kw * c
            costs.append(LayerCost(layer.name, "dwconv", ho * wo * co * kh * kw, cyc, nbytes))
        elif isinstance(layer, L.Conv2D):
            hi, wi, ci = _hw(layer.input_shape)
            ho, wo, co = _hw(out_shape)
            kh, kw = layer.kernel_size
            groups = getattr(layer, "groups", 1)
            cyc = conv_cycles(arch, ho, wo, ci // groups, co, kh, kw)
            nbytes = hi * wi * ci + ho * wo * co + kh * kw * ci * co // groups
            costs.append(
                LayerCost(layer.name, "conv", ho * wo * co * kh * kw * ci // groups, cyc, nbytes,
                          {"out_h": ho, "out_w": wo, "c_in": ci, "c_out": co, "k": kh})
            )
        elif isinstance(layer, L.Dense):
            ci, co = int(layer.input_shape[-1]), int(out_shape[-1])
            cyc = conv_cycles(arch, 1, 1, ci, co)
            costs.append(LayerCost(layer.name, "dense", ci * co, cyc, ci + co + ci * co))
        elif isinstance(layer, (L.AveragePooling2D, L.MaxPooling2D, L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)):
            hi, wi, c = _hw(layer.input_shape)
            cyc = math.ceil(wi / arch.pp) * hi * math.ceil(c / arch.icp)
            out_elems = int(math.prod(int(d) for d in out_shape[1:]))
            costs.append(LayerCost(layer.name, "pool", 0, cyc, hi * wi * c + out_elems))
    return costs


def cpu_layers(model):
    """Names of layers the DPU cannot fold or fuse: BN not right after a conv, activations not after conv(+BN)."""
    L = keras.layers
    conv_types = (L.Conv2D, L.DepthwiseConv2D, L.Dense)

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += cpu_layers(layer)
        elif isinstance(layer, L.BatchNormalization):
            if not isinstance(single_producer(layer), conv_types):
                out.append(layer.name)
        elif isinstance(layer, (L.ReLU, L.Activation, L.LeakyReLU)):
            p = single_producer(layer)
            if isinstance(p, L.BatchNormalization):
                p = single_producer(p)
            if not isinstance(p, conv_types):
                out.append(layer.name)
    return out


def estimate(model_or_costs, config: Optional[DPUConfig] = None):
    """Latency and throughput of one model on a DPU system.

    Args:
        model_or_costs: a Keras model or the output of :func:`layer_costs`.
        config: :class:`DPUConfig` (default: ZCU102, three B4096 at 300 MHz).

    Returns:
        dict with ``latency_ms`` (one image on one core, whole DDR bandwidth),
        ``throughput`` (img/s, all cores busy, bandwidth shared),
        ``compute_only_ms`` (ideal engine, no overheads), ``macs``,
        ``peak_efficiency`` (MAC utilisation at the modelled latency), the
        share of memory-bound layers, and the config.
    """
    config = config or DPUConfig()
    if isinstance(model_or_costs, list):
        costs, on_cpu = model_or_costs, []
    else:
        costs, on_cpu = layer_costs(model_or_costs, config.arch), cpu_layers(model_or_costs)
    latency = sum(c.seconds(config) for c in costs)
    shared = sum(c.seconds(config, config.ddr_bytes_per_s / config.cores) for c in costs)
    macs = sum(c.macs for c in costs)
    ideal = macs / (config.arch.macs_per_cycle * config.clock_hz)
    memory_bound = sum(
        1 for c in costs
        if config.memory_bound and c.bytes / config.ddr_bytes_per_s > c.compute_cycles / (config.clock_hz * config.eta)
    )
    return {
        "latency_ms": 1e3 * latency,
        "throughput": config.cores / shared,
        "compute_only_ms": 1e3 * ideal,
        "padded_compute_ms": 1e3 * sum(c.compute_cycles for c in costs) / config.clock_hz,
        "macs": macs,
        "layers": len(costs),
        "memory_bound_layers": memory_bound,
        "peak_efficiency": ideal / latency,
        "cpu_layers": on_cpu,
        "config": {**asdict(config), "arch": asdict(config.arch)},
    }


def calibrate(costs_by_model, measured_ms, *, config: Optional[DPUConfig] = None,
              etas=None, overheads=None):
    """Fits the two global parameters ``eta`` and ``overhead_cycles`` to measured latencies.

    Grid search minimising the largest relative latency error over all
    models (one pair of numbers for every model, no per-model parameter).

    Args:
        costs_by_model: ``{name: layer_costs(...)}``.
        measured_ms: ``{name: measured latency in ms}``.
        config: the fixed part of the system (arch, clock, cores, bandwidth).
        etas, overheads: candidate grids.

    Returns:
        ``(eta, overhead_cycles, max_relative_error)``.
    """
    config = config or DPUConfig()
    etas = etas if etas is not None else [i / 100 for i in range(10, 101)]
    overheads = overheads if overheads is not None else range(0, 20001, 100)
    best = None
    for eta in etas:
        for over in overheads:
            cfg = DPUConfig(config.arch, config.clock_hz, config.cores, config.ddr_bytes_per_s, eta, float(over),
                            config.memory_bound)
            err = max(
                abs(estimate(costs_by_model[n], cfg)["latency_ms"] / measured_ms[n] - 1) for n in measured_ms
            )
            if best is None or err < best[2]:
                best = (eta, float(over), err)
    return best
