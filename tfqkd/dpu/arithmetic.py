"""The DPU's integer arithmetic, in NumPy: codes, rounding, shifts, average-pooling factors, positions.

The DPUCZDX8G under Vitis-AI's pof2s strategy (thesis chapter 6) computes on 8-bit codes with
power-of-two scales: a tensor at position ``pos`` holds ``q = clip(round(x * 2**pos), -128, 127)``
and stands for ``q * 2**-pos``. Weights and biases round half to even (Vitis ``round_mode`` 0),
everything the DPU computes rounds half up (``floor(x + 0.5)``, ``round_mode`` 1). This module is
the one place these rules are written down; the training model (:mod:`tfqkd.dpu.layers`), the
position solver (:mod:`tfqkd.dpu.positions`) and the emulator (:mod:`tfqkd.dpu.emulator`) use it.

Sources (Xilinx/Vitis-AI, ``src/vai_quantizer/vai_q_tensorflow2.x``): ``vitis_quantize_ops.py``
(rounding, ``get_quantize_pos_non_overflow`` / ``_min_diffs``), ``layers/vitis_pooling.py``
(``_get_avgpool_scale``: the average-pooling factors), ``vitis_pof2s_refine_transforms.py``
(``adjust_dpu_shift_cut`` / ``adjust_dpu_shift_bias``: the shift limits),
``vitis_pof2s_quantize_transforms.py`` (``ConvertLeakyReLUToDpuVersion``: alpha 26/256).
"""

from __future__ import annotations

import math

import numpy as np

from tfqkd.errors import TfqkdError

__all__ = [
    "AVGPOOL_FACTORS",
    "DPU_LEAKY_ALPHA",
    "LEAKY_ALPHAS",
    "QMAX",
    "QMIN",
    "SHIFT_BIAS_MAX",
    "SHIFT_CUT_RANGE",
    "avgpool_factor",
    "codes",
    "has_avgpool_factor",
    "min_diff_pos",
    "non_overflow_pos",
    "round_shift",
    "saturate",
    "shift_bias_range",
]

#: The int8 code range of every DPU tensor.
QMIN, QMAX = -128, 127
#: LeakyReLU slope the DPU implements (Vitis-AI ``convert_leaky_relu_to_dpu_version``).
DPU_LEAKY_ALPHA = 26.0 / 256.0
#: LeakyReLU slopes a float model may use: the DPU's, and 0.1, which Vitis-AI converts to it.
LEAKY_ALPHAS = (0.1, DPU_LEAKY_ALPHA)
#: Average-pooling factors ``k -> (numerator, shift)``: the DPU computes ``sum * num / 2**shift``
#: (Vitis-AI ``_get_avgpool_scale``; windows whose area is a power of two are exact).
AVGPOOL_FACTORS = {3: (7, 6), 5: (10, 8), 6: (7, 8), 7: (21, 10), 14: (21, 12)}
#: ``shift_cut = wpos + ipos - opos`` must lie in this interval.
SHIFT_CUT_RANGE = (0, 16)
#: Upper limit of ``shift_bias = wpos + ipos - bpos``; the lower one depends on ``shift_cut``.
SHIFT_BIAS_MAX = 16


def has_avgpool_factor(kernel):
    """Whether the DPU can average-pool a ``kernel x kernel`` window."""
    area = int(kernel) * int(kernel)
    return area & (area - 1) == 0 or int(kernel) in AVGPOOL_FACTORS


def avgpool_factor(kernel):
    """The DPU's average-pooling multiplier for a square ``kernel x kernel`` window.

    Args:
      kernel: window side (the DPU only pools square windows).

    Returns:
      ``(num, shift)``: the DPU computes ``sum * num / 2**shift``. Windows whose area is a power
      of two are exact (``(1, log2(k*k))``).

    Raises:
      TfqkdError: for a window the DPU has no factor for.
    """
    kernel = int(kernel)
    area = kernel * kernel
    if area & (area - 1) == 0:
        return 1, area.bit_length() - 1
    if kernel in AVGPOOL_FACTORS:
        return AVGPOOL_FACTORS[kernel]
    raise TfqkdError(
        f"the DPU has no average-pooling factor for a {kernel}x{kernel} window "
        f"(supported: powers of two and {', '.join(f'{k}x{k}' for k in sorted(AVGPOOL_FACTORS))})"
    )


def saturate(values):
    """Clips integer values to the int8 code range (as int64)."""
    return np.clip(values, QMIN, QMAX).astype(np.int64)


def round_shift(values, shift):
    """``floor(values / 2**shift + 0.5)`` on integers (a left shift when ``shift < 0``)."""
    values = np.asarray(values, np.int64)
    if shift > 0:
        return (values + (1 << (shift - 1))) >> shift
    return values << (-shift)


def codes(values, pos, rounding="even"):
    """int8 codes of float ``values`` at position ``pos``.

    Args:
      values: array-like (taken as float32, as the training model holds it; ``x * 2**pos`` is
        then exact in float64).
      pos: the position.
      rounding: ``"even"`` (weights, biases) or ``"half_up"`` (activations, the input).

    Returns:
      int64 array of codes in [-128, 127].
    """
    scaled = np.asarray(values, np.float32).astype(np.float64) * 2.0 ** int(pos)
    rounded = np.round(scaled) if rounding == "even" else np.floor(scaled + 0.5)
    return saturate(rounded)


def non_overflow_pos(values, qmax=QMAX):
    """Largest position with ``max|values| * 2**pos <= qmax`` (Vitis ``method`` 0).

    Args:
      values: array-like.
      qmax: largest code.

    Returns:
      int position (8 for an all-zero tensor).
    """
    absmax = float(np.max(np.abs(np.asarray(values, dtype=np.float64)))) if np.size(values) else 0.0
    if absmax <= 0.0:
        return 8
    return int(math.floor(math.log2(qmax / absmax)))


def min_diff_pos(values, rounding="even"):
    """Position minimising the squared quantization error, searched from the non-overflow
    position upwards (Vitis ``method`` 1, ``get_quantize_pos_min_diffs``).

    Args:
      values: array-like.
      rounding: "even" or "half_up".

    Returns:
      int position.
    """
    values = np.asarray(values, dtype=np.float64)
    start = non_overflow_pos(values)
    best, best_err = start, None
    for pos in range(start, start + 5):
        scaled = values * 2.0**pos
        rounded = np.round(scaled) if rounding == "even" else np.floor(scaled + 0.5)
        err = float(np.sum((np.clip(rounded, QMIN, QMAX) * 2.0**-pos - values) ** 2))
        if best_err is None or err < best_err:
            best, best_err = pos, err
    return best


def shift_bias_range(shift_cut):
    """Allowed ``shift_bias`` interval for a given ``shift_cut`` (Vitis-AI pof2s)."""
    return min(0, -(24 - (8 + shift_cut))), SHIFT_BIAS_MAX
