"""The integer grid a quantizer puts values on: what exporters and analyses read, whatever the scheme.

``real = (code - zero) * scale`` with ``code`` in ``[qmin, qmax]``, rounded
``half_even`` (LSQ, the thesis's affine scheme, DPU weights) or ``half_up``
(DPU activations). Every tfqkd quantizer states its grid
(:meth:`tfqkd.quant.quantizers.TfqkdQuantizer.grid`), so an exporter never
needs to know which scheme trained a tensor.
"""

__all__ = ["Grid", "ROUNDINGS"]

#: Rounding modes of the grids: ties to even (tf.round) or up (floor(x + 0.5)).
ROUNDINGS = ("half_even", "half_up")


class Grid:
    """A uniform quantization grid: ``real = (code - zero) * scale``, ``code`` in ``[qmin, qmax]``.

    Args:
      scale: the step (float).
      zero: the integer code of real zero.
      qmin, qmax: the inclusive code range.
      rounding: "half_even" or "half_up".
    """

    def __init__(self, scale, zero, qmin, qmax, rounding="half_even"):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.scale = float(scale)
        self.zero = int(zero)
        self.qmin = int(qmin)
        self.qmax = int(qmax)
        self.rounding = rounding

    def __repr__(self):
        return f"Grid(scale={self.scale:g}, zero={self.zero}, codes=[{self.qmin}, {self.qmax}], {self.rounding})"

    def __eq__(self, other):
        return isinstance(other, Grid) and self.as_dict() == other.as_dict()

    @property
    def levels(self):
        """Number of codes."""
        return self.qmax - self.qmin + 1

    def as_dict(self):
        return {"scale": self.scale, "zero": self.zero, "qmin": self.qmin, "qmax": self.qmax, "rounding": self.rounding}

    def int8_window(self):
        """The int8 encoding of this grid.

        Returns:
          ``(low, high, zero_point)``: the shifted codes ``code - zero`` that the
          int8 tensor's 256 values cover (``high = low + 255``) and the TFLite
          zero point. Signed grids that fit are centred (zero point 0);
          otherwise the lowest code maps to -128 (unsigned: zero point -128).
        """
        lo_code, hi_code = self.qmin - self.zero, self.qmax - self.zero
        if lo_code < 0 and lo_code >= -128 and hi_code <= 127:
            low = -128
        else:
            low = lo_code
        return low, low + 255, -128 - low
