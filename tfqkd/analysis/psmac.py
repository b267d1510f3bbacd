"""Latency model of a precision-scalable MAC accelerator (seed 004: Terlizzi 2023,
"Mixed-precision Quantization and Inference of MLPerf Tiny DNNs on Precision-Scalable
Hardware Accelerators").

The accelerator's MAC units hold reconfigurable Sum-Together multipliers that compute
``N = 1, 2, 4`` multiplications per cycle with ``16/N``-bit operands: one 16-bit, two 8-bit or
four 4-bit products. A layer whose operands (weights and input activations) need at most
``b`` bits therefore runs ``N(b)`` MACs per unit and cycle::

    N(b) = 4 if b <= 4,  2 if b <= 8,  1 if b <= 16
    cycles(layer) = ceil(MACs(layer) / (num_mac_units * N(max(weight_bits, activation_bits))))

Float layers (no quantizer) and layers above 16 bits are not supported by the hardware; the
model charges float layers as 16-bit (N = 1), the widest mode, and rejects bits > 16.
Only Conv2D, DepthwiseConv2D and Dense layers cost cycles (as in
:func:`tfqkd.models.count_macs`); everything else is assumed fused or negligible.
"""

import dataclasses
import math

from tfqkd.errors import TfqkdError

__all__ = ["PSMACModel", "macs_per_cycle", "layer_macs"]

#: (largest operand bits, multiplications per MAC unit and cycle).
_MODES = ((4, 4), (8, 2), (16, 1))


def macs_per_cycle(bits):
    """Multiplications per MAC unit and cycle at an operand precision (N = 4, 2, 1).

    Args:
      bits: operand bit width, 1-16, or None for a float layer (charged as 16 bits).

    Returns:
      4 for <= 4 bits, 2 for <= 8 bits, 1 for <= 16 bits.

    Raises:
      TfqkdError: bits outside 1-16.
    """
    if bits is None:
        return 1
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise TfqkdError(f"the precision-scalable MAC supports 1-16 bit operands, got {bits!r}")
    for limit, n in _MODES:
        if bits <= limit:
            return n
    raise AssertionError("unreachable")


def layer_macs(model):
    """MACs per conv/dense layer of a built model, batch size 1.

    Args:
      model: float or quantized Keras model with a fixed input shape.

    Returns:
      dict layer name -> MACs (layers with zero MACs omitted), in layer order.
    """
    from tfqkd.models.summary import _layer_macs

    out = {}
    for layer in model.layers:
        macs = _layer_macs(model.name, layer)
        if macs:
            out[layer.name] = macs
    return out


@dataclasses.dataclass(frozen=True)
class PSMACModel:
    """The precision-scalable accelerator as a latency backend.

    Attributes:
      num_mac_units: parallel MAC units (each computes N(bits) products per cycle).
      frequency_hz: clock, to turn cycles into seconds; None reports cycles only.
    """

    num_mac_units: int = 16
    frequency_hz: float | None = 100e6

    def __post_init__(self):
        if isinstance(self.num_mac_units, bool) or not isinstance(self.num_mac_units, int) or self.num_mac_units < 1:
            raise TfqkdError(f"num_mac_units must be a positive integer, got {self.num_mac_units!r}")
        if self.frequency_hz is not None and not self.frequency_hz > 0:
            raise TfqkdError(f"frequency_hz must be positive, got {self.frequency_hz!r}")

    def layer_cycles(self, macs, weight_bits=None, activation_bits=None):
        """Cycles of one layer.

        Args:
          macs: multiply-accumulates of the layer.
          weight_bits: kernel bits (None: float).
          activation_bits: input-activation bits (None: float).

        Returns:
          ``ceil(macs / (num_mac_units * N))`` with N from the wider operand.
        """
        widths = [b for b in (weight_bits, activation_bits) if b is not None]
        if len(widths) < 2:
            bits = None  # a float operand runs in the 16-bit mode
        else:
            bits = max(widths)
        return math.ceil(macs / (self.num_mac_units * macs_per_cycle(bits)))

    def estimate(self, model, bits=None):
        """Per-layer and total latency of a model.

        Args:
          model: Keras model; if quantized (tfqkd/QKeras), its per-layer bits are used.
          bits: optional override: dict layer name -> (weight_bits, activation_bits), or one
            ``(weight_bits, activation_bits)`` pair for every layer (for a float model whose
            quantized deployment is being estimated).

        Returns:
          dict with ``layers`` (list of {layer, macs, weight_bits, activation_bits, n,
          cycles}), ``cycles`` (total) and ``seconds`` (None without a frequency).
        """
        from tfqkd.quant.transform import layer_specs

        specs = layer_specs(model)
        rows, total = [], 0
        for name, macs in layer_macs(model).items():
            if isinstance(bits, tuple):
                wb, ab = bits
            elif isinstance(bits, dict) and name in bits:
                wb, ab = bits[name]
            elif name in specs:
                wb, ab = specs[name].weight_bits, specs[name].activation_bits
            else:
                wb = ab = None
            cycles = self.layer_cycles(macs, wb, ab)
            n = macs_per_cycle(None if wb is None or ab is None else max(wb, ab))
            rows.append(
                {"layer": name, "macs": macs, "weight_bits": wb, "activation_bits": ab, "n": n, "cycles": cycles}
            )
            total += cycles
        seconds = None if self.frequency_hz is None else total / self.frequency_hz
        return {"layers": rows, "cycles": total, "seconds": seconds}

    def latency_ms(self, model, bits=None):
        """Total latency in milliseconds (needs ``frequency_hz``)."""
        if self.frequency_hz is None:
            raise TfqkdError("PSMACModel needs frequency_hz to report milliseconds")
        return 1e3 * self.estimate(model, bits)["seconds"]
