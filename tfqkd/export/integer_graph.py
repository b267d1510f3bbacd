"""Rebuild a quantized tfqkd model as a float graph the TFLite converter turns into integers.

The TFLite converter does not understand QKeras quantizers: handed a QKeras
model it keeps their clip/round arithmetic as float ops, and plain
post-training quantization re-derives every scale from calibration data, which
throws away the grid the model was trained on (QKD, Kim et al. 2019; thesis
sections 5.1.9 and 6). What the converter *does* understand is TensorFlow's
``FakeQuantWithMinMaxVars`` op (the QAT path of tfmot): a fake-quant node fixes
the scale and zero point of the tensor it produces.

This module therefore re-expresses each trained quantization point as
fake-quant nodes whose 8-bit grid *contains* the trained grid:

* a weight tensor on a b-bit grid with step ``s`` (codes ``-7..7`` at 4 bits)
  becomes the constant ``codes * s`` behind a narrow-range 8-bit fake quant
  with range ``+-127 s``, so TFLite stores exactly those codes with scale
  ``s``; a BatchNormalization that directly follows the conv is folded in
  with a per-output-channel scale ``s * gamma / sqrt(var + eps)``, which
  leaves the integer codes unchanged;
* an activation quantizer with step ``s`` and ``2**b`` codes becomes an
  8-bit fake quant whose scale is ``s`` (unsigned: range ``[0, 255 s]``, i.e.
  zero point -128), and for ``b < 8`` a clip to the top (and bottom) code
  followed by the same fake quant, so the int8 tensor carries exactly the
  ``2**b`` trained codes.

Where a weighted layer's output is rounded onto a trained grid, the int32 bias
and a power of the stored codes are fitted to that grid (``_WeightedPoint.tune``):
a plain conversion rounds the bias to ``input step * weight step`` and TFLite's
built-in kernels requantize with two roundings (gemmlowp), which together moved
~0.1% of the hidden 4-bit codes of a kl_mlp_student and 3 output steps of its
logits; the fitted file computes the Keras model's hidden codes exactly in
integer arithmetic where a bias can (all thresholds of 4-bit outputs but a few
in a hundred channels) and on both XNNPACK and the built-in kernels.

Tensors the trained model keeps in float (BatchNormalization, Add,
Concatenate, pooling and logits) get 8-bit scales from the converter's
calibration with a representative dataset; that rounding is what the float
fake-quant model does not see, and at 4 bits it moves codes (a pre-activation
DenseNet: ~98.8% top-1 agreement). A model made with
``tfqkd.quantize(..., integer_intermediates=True)`` quantizes those tensors
itself (8-bit learned steps), and the export then reproduces it: a conv
feeding a concat or pool is requantized straight onto the concat's trained
grid, each BN -> ReLU -> quantizer on such a tensor is one per-channel
requantization (1x1 DEPTHWISE_CONV_2D, bias chosen so all 256 input codes map
as in the float model), a concat input on another trained grid than the
concat's is requantized by the same kind of op (the converter's QUANTIZE runs
on XNNPACK's 8-bit fixed-point multiplier and moves codes), and a 1x1 conv ->
average pool is computed pool-first as an exact sum. Measured on densenet21
(mnist5k): w4a4 100.0% top-1 agreement; the 4-bit codes entering the convs
differ only where a float32 near-tie in the Keras model propagates (none in
the first three blocks, < 0.5% in the last).
"""

import numpy as np

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.io import UNSAFE_LAYER_TYPES
from tfqkd.quant.layers import QActivation, QConv2D, QDense, QDepthwiseConv2D
from tfqkd.quant.grid import Grid
from tfqkd.quant.quantizers import AffineQuantizer, TfqkdQuantizer

__all__ = ["LAYOUTS", "Grid", "IntegerGraph", "activation_grid", "weight_codes"]

# Largest magnitude of a TFLite int8 weight code: weights are symmetric narrow-range [-127, 127].
_WEIGHT_CODE_MAX = 127
_FOLDABLE_PRODUCERS = (QConv2D,)
#: Graph layouts. "speed": every unfolded BatchNormalization and every valid
#: average pool becomes a DEPTHWISE_CONV_2D (int8 MUL/ADD and AVERAGE_POOL_2D
#: run 1.3-23x slower than their float versions under XNNPACK on x86, which
#: runs int8 depthwise convs well); "compact": the converter's MUL/ADD and
#: AVERAGE_POOL_2D, a smaller file (no per-channel parameters for the BNs).
LAYOUTS = ("speed", "compact")
# Integer bias offsets (in int32 bias steps) tried around the ideal bias of an exact requantization.
_BIAS_SEARCH = np.arange(-256, 257, dtype=np.float64)
# Widening of the calibrated logit range, as a fraction of its span.
_OUTPUT_MARGIN = 0.1
# For outputs of at most 16 codes: how much more a threshold missed by exact integer arithmetic
# counts than one missed only by gemmlowp's two roundings (see _fit_bias).
_EXACT_WEIGHT = 4.0


def activation_grid(quantizer, layer_name):
    """The trained grid of an activation quantizer (its state after training).

    Args:
      quantizer: a tfqkd quantizer held by a QActivation.
      layer_name: for error messages.

    Returns:
      a :class:`Grid`.

    Raises:
      TfqkdError: quantizers that cannot be expressed as one int8 tensor.
    """
    if not isinstance(quantizer, TfqkdQuantizer):
        raise TfqkdError(f"layer '{layer_name}': unsupported activation quantizer {type(quantizer).__name__}")
    grid = quantizer.grid()  # TfqkdError when the scale follows each batch (no running statistics)
    if grid.levels > 256:
        raise TfqkdError(
            f"layer '{layer_name}': {quantizer.bits}-bit activations do not fit an int8 TFLite tensor (at most 8 bits)"
        )
    return grid


def weight_codes(quantizer, weight, layer_name):
    """The integer codes and step of a fake-quantized weight tensor.

    Args:
      quantizer: the layer's tfqkd weight quantizer.
      weight: the float weight variable.
      layer_name: for error messages.

    Returns:
      ``(codes, scale)``: int32 array with ``codes * scale`` equal to the
      quantizer's output, and the float step. The codes are the trained
      codes shifted by the zero point, so they fit TFLite's symmetric weights.

    Raises:
      TfqkdError: when the trained codes cannot be stored as symmetric int8
        weights (asymmetric 8-bit weights whose shifted codes exceed +-127).
    """
    if not isinstance(quantizer, TfqkdQuantizer):
        raise TfqkdError(f"layer '{layer_name}': unsupported weight quantizer {type(quantizer).__name__}")
    fake = quantizer(tf.convert_to_tensor(weight), training=False).numpy().astype(np.float64)
    scale = quantizer.grid(np.asarray(weight, dtype=np.float32)).scale
    codes = np.rint(fake / scale)
    if np.max(np.abs(fake - codes * scale), initial=0.0) > 1e-3 * scale:
        raise TfqkdError(f"layer '{layer_name}': fake-quantized weights are not on the grid of step {scale:g}")
    worst = int(np.max(np.abs(codes), initial=0))
    if worst > _WEIGHT_CODE_MAX:
        hint = (
            " (asymmetric affine weights: their zero point shifts the codes; use the 'lsq' kind or 4-bit affine weights)"
            if isinstance(quantizer, AffineQuantizer)
            else " (use a narrow-range weight quantizer)"
        )
        raise TfqkdError(
            f"layer '{layer_name}': weight codes reach {worst}, outside TFLite's symmetric int8 range "
            f"[-127, 127]{hint}"
        )
    return codes.astype(np.int32), scale


def _fake_quant(x, low, high, narrow_range=False):
    return tf.quantization.fake_quant_with_min_max_vars(x, min=low, max=high, num_bits=8, narrow_range=narrow_range)


class _ActivationPoint:
    """An activation quantizer as fake-quant nodes (or, for float export, as float arithmetic)."""

    def __init__(self, grid):
        self.grid = grid
        low, high, _ = grid.int8_window()
        s = grid.scale
        self.window = (np.float32(low * s), np.float32(high * s))
        lo_code, hi_code = grid.qmin - grid.zero, grid.qmax - grid.zero
        self.clip_low = np.float32(lo_code * s) if lo_code > low else None
        self.clip_high = np.float32(hi_code * s) if hi_code < high else None

    def integer(self, x):
        low, high = self.window
        x = _fake_quant(x, low, high)
        if self.clip_low is None and self.clip_high is None:
            return x
        # Clip on the int8 grid, then pin the result to the same grid again so
        # the clip is an int8 op that keeps scale and zero point.
        if self.clip_high is not None:
            x = tf.minimum(x, self.clip_high)
        if self.clip_low is not None:
            x = tf.maximum(x, self.clip_low)
        return _fake_quant(x, low, high)

    def emulate(self, x):
        # Float export: the same grid in float arithmetic.
        g = self.grid
        codes = tf.clip_by_value(tf.round(x / g.scale) + g.zero, float(g.qmin), float(g.qmax))
        return (codes - g.zero) * g.scale


class _WeightedPoint:
    """A quantized Conv2D / DepthwiseConv2D / Dense with constant (optionally BN-folded) weights."""

    def __init__(self, layer, bn=None):
        self.layer = layer
        if isinstance(layer, QDepthwiseConv2D):
            quantizer, weight = layer.depthwise_quantizer_internal, layer.depthwise_kernel
        else:
            quantizer, weight = layer.kernel_quantizer_internal, layer.kernel
        if not isinstance(quantizer, TfqkdQuantizer):
            raise TfqkdError(
                f"layer '{layer.name}': weight quantizer {quantizer!r} is not a tfqkd quantizer; only models made by "
                "tfqkd.quantize() can be exported with their trained grid"
            )
        self.codes, self.step = weight_codes(quantizer, weight.numpy(), layer.name)
        out_channels = self.codes.shape[-1]
        bias = np.zeros(out_channels, np.float64)
        if layer.use_bias:
            bias_q = layer.bias_quantizer_internal
            b = layer.bias
            bias = (bias_q(b, training=False) if isinstance(bias_q, TfqkdQuantizer) else b).numpy().astype(np.float64)
        gain = np.ones(out_channels, np.float64)
        if bn is not None:
            gamma, beta, mean, var = _bn_parameters(bn, out_channels)
            gain = gamma / np.sqrt(var + bn.epsilon)
            bias = beta + (bias - mean) * gain
        # A per-channel gain keeps the integer codes: a negative gain flips
        # their sign, a zero gain (dead channel) gets a tiny scale.
        sign = np.where(gain < 0, -1.0, 1.0)
        magnitude = np.maximum(np.abs(gain), 1e-12)
        self.channel_scale = (self.step * magnitude).astype(np.float32)
        self.folded = bn is not None
        self.weight_codes = (self.codes * sign.astype(np.int32)).astype(np.int32)
        self.bias = bias.astype(np.float32)
        self.has_bias = layer.use_bias or bn is not None
        # Set by :meth:`tune`: the stored int8 weights are ``code_multiplier * codes`` at scale
        # ``channel_scale / code_multiplier`` (same real weights), and ``int_bias`` is the int32 bias
        # the runtime adds (None: the converter rounds ``bias`` itself).
        self.code_multiplier = 1
        self.int_bias = None
        self.matched_thresholds = None

    def _reduction_sums(self):
        """Per output channel, the sum of |weight code| over everything one output value adds up."""
        codes = np.abs(self.weight_codes.astype(np.int64))
        if isinstance(self.layer, QDepthwiseConv2D):
            return codes.reshape(-1, codes.shape[-2] * codes.shape[-1]).sum(0)
        return codes.reshape(-1, codes.shape[-1]).sum(0)

    def tune(self, input_grid, output=None, density=None):
        """Chooses the int8 storage of the weights and the int32 bias for the runtimes' arithmetic.

        Two departures of a plain conversion from the Keras model are closed here:

        * the bias is stored as an int32 multiple of ``input step * weight step``,
          which moves each pre-activation by up to half that unit: with 4-bit
          weights and activations about 0.4% of the step of the next quantizer,
          enough to move ~0.1% of the hidden codes of an MLP. Low-bit codes are
          therefore stored multiplied by an integer ``k`` that keeps them in
          [-127, 127] (up to 18 for 4-bit codes; the same real weights at scale
          ``step / k``, a ``k`` times finer accumulator and bias unit);
        * where the layer's output is rounded onto a trained grid (a following
          activation quantizer, optionally after a ReLU, or a concat's
          quantizer), ``k`` and the int32 bias are chosen so that every rounding
          threshold of that grid falls between the same two reachable
          accumulator values as in the Keras model, both for a runtime that
          requantizes with one rounding (XNNPACK, float multiplier) and for
          TFLite's built-in kernels (gemmlowp's two roundings, which move each
          threshold by up to one accumulator unit). Where no bias does that for
          every threshold (8-bit outputs with 8-bit weights), the one that
          misses the fewest is kept, weighted by how often calibration data
          comes near each threshold.

        Args:
          input_grid: the :class:`Grid` of the input tensor, or None (float/calibrated input).
          output: ``(grid, relu)``: the trained grid the output is rounded onto in the Keras
            model and whether a ReLU comes first; None for a float output (logits, BN inputs).
          density: optional ``(channels, thresholds)`` counts of calibration values within one
            step of each threshold of ``output``.
        """
        depthwise = isinstance(self.layer, QDepthwiseConv2D)
        shape = self.weight_codes.shape
        channels = shape[-2] * shape[-1] if depthwise else shape[-1]
        largest = int(np.max(np.abs(self.weight_codes), initial=0))
        if input_grid is not None:
            low, high, _ = input_grid.int8_window()
            input_magnitude = max(abs(low), abs(high))
        else:
            input_magnitude = 255
        sums = self._reduction_sums().astype(np.float64)
        # Largest multiplier: codes stay in [-127, 127] and the int32 accumulator keeps 2**24 for the bias.
        limit = _WEIGHT_CODE_MAX // largest if largest else 1
        while limit > 1 and input_magnitude * np.max(sums, initial=0.0) * limit >= 2**31 - 2**24:
            limit -= 1
        self.code_multiplier = limit
        if input_grid is None:
            return
        channel_scale = self.channel_scale if self.channel_scale.size == channels else np.full(
            channels, self.channel_scale.flat[0], np.float32
        )  # depthwise kernels: one step for all channels
        bias = np.broadcast_to(self.bias.astype(np.float64), (channels,))
        self.has_bias = True
        if output is None:
            self._set_bias(limit, input_grid, channel_scale, bias)
            return
        best = None
        for k in range(limit, 0, -1):
            fit = _fit_bias(k, input_grid, channel_scale, bias, output, input_magnitude * sums * k, density)
            if best is None or fit["score"] < best["score"]:
                best = fit
            if best["score"] == 0:
                break
        self.code_multiplier = best["k"]
        self._unit, self.int_bias = best["unit"], best["bias"]
        self.output_thresholds = best["thresholds"]
        self.missed_thresholds = best["missed"]
        # (threshold checks passed, made): two per reachable threshold and channel (one per rounding).
        self.matched_thresholds = (int(best["checks"] - np.sum(best["missed"])), int(best["checks"]))

    def _set_bias(self, k, input_grid, channel_scale, bias):
        self.code_multiplier = k
        self._unit = _accumulator_unit(k, input_grid, channel_scale)
        self.int_bias = np.rint(bias / self._unit)

    def pooled(self, x, pool, source):
        """``pool(self(x))`` computed as ``self(sum-pool(x)) / area`` (see ``IntegerGraph._pooled_first``)."""
        area = int(np.prod(pool.pool_size))
        summed = _constant_pool(pool, x, 1.0, integer=True)
        summed = _fake_quant(summed, *source.window)  # the sums of the codes, on the input's grid
        step = self.step / area
        values = (self.weight_codes.astype(np.float64) * step).astype(np.float32)
        limit = np.float32(_WEIGHT_CODE_MAX * step)
        w = _fake_quant(tf.constant(values), -limit, limit, narrow_range=True)
        return tf.nn.conv2d(summed, w, strides=(1, 1, 1, 1), padding="VALID")

    def _weights(self, integer):
        values = (self.weight_codes.astype(np.float64) * self.channel_scale.astype(np.float64)).astype(np.float32)
        w = tf.constant(values)
        if not integer:
            return w
        k = self.code_multiplier  # a power of two: the same real weights, codes * k at scale / k
        if self.folded:
            limit = (_WEIGHT_CODE_MAX * self.channel_scale.astype(np.float64) / k).astype(np.float32)
            return tf.quantization.fake_quant_with_min_max_vars_per_channel(
                w, min=-limit, max=limit, num_bits=8, narrow_range=True
            )
        limit = np.float32(_WEIGHT_CODE_MAX * self.step / k)
        return _fake_quant(w, -limit, limit, narrow_range=True)

    def _bias(self, integer):
        if integer and self.int_bias is not None:
            # The converter divides by the same unit and rounds: it stores exactly these integers.
            return (self.int_bias * self._unit).astype(np.float32)
        return self.bias

    def __call__(self, x, integer):
        layer, w = self.layer, self._weights(integer)
        if isinstance(layer, QDense):
            y = tf.tensordot(x, w, axes=1) if x.shape.rank > 2 else tf.matmul(x, w)
        elif isinstance(layer, QDepthwiseConv2D):
            y = tf.nn.depthwise_conv2d(
                x, w, strides=(1, *layer.strides, 1), padding=layer.padding.upper(), dilations=layer.dilation_rate
            )
        else:
            if layer.groups != 1:
                raise TfqkdError(f"layer '{layer.name}': grouped convolutions are not supported by the TFLite exporter")
            y = tf.nn.conv2d(
                x, w, strides=(1, *layer.strides, 1), padding=layer.padding.upper(), dilations=layer.dilation_rate
            )
        if self.has_bias:
            y = tf.nn.bias_add(y, tf.constant(self._bias(integer)))
        activation = getattr(layer, "activation", None)
        if activation is not None and activation is not keras.activations.linear:
            y = activation(y)
        return y


class _ChannelAffine:
    """A per-channel affine map between two exact int8 grids, as one requantization.

    Two uses, both exact in int8 where the converter's own lowering is not:

    * a BatchNormalization on an exact int8 tensor, followed by ReLU and a
      quantizer (``integer_intermediates``). TFLite lowers an inference BN
      to MUL and ADD with int8 constants (one 8-bit scale for all channels'
      gains, another for the offsets) and two requantizations, which moves
      activation codes;
    * a plain requantization from one trained grid onto another (gain 1,
      offset 0, no ReLU): a concat input whose grid is not the concat's.
      The converter would insert an int8 -> int8 QUANTIZE there, which
      XNNPACK computes with an 8-bit fixed-point multiplier (a code 25 at
      scale ratio 0.1808 lands on 4, not round(4.52) = 5).

    The chain maps each integer input code ``X`` of channel ``c`` to
    ``clip(round(g_c * X + h_c))``: a 1x1 DEPTHWISE_CONV_2D whose weight is
    the code +-127 with the per-channel scale ``|gain_c| / 127`` (the runtime
    then applies the gain as a 32-bit fixed-point or float multiplier) and
    whose int32 bias is chosen so the op returns, for every one of the 256
    input codes, the code the float model returns.

    Args:
      gain, offset: per-channel ``y = gain * x + offset`` in real units.
      input_grid, output_grid: the :class:`Grid` of the input tensor and of
        the output quantizer.
      relu: a ReLU sits between the affine map and the output quantizer.
    """

    def __init__(self, gain, offset, input_grid, output_grid, relu=True):
        self.gain = np.asarray(gain, np.float64)
        self.offset = np.asarray(offset, np.float64)
        self.relu = relu
        self.input_grid, self.output_grid = input_grid, output_grid
        magnitude = np.maximum(np.abs(self.gain), 1e-12).astype(np.float32)
        self.magnitude = magnitude
        self.weight_scale = (magnitude.astype(np.float64) / _WEIGHT_CODE_MAX).astype(np.float32)
        self.bias = self._exact_bias()

    @classmethod
    def batchnorm(cls, bn, channels, input_grid, output_grid):
        """BN -> ReLU -> quantizer on an exact int8 input."""
        return cls(*_bn_affine(bn, channels), input_grid, output_grid, relu=True)

    @classmethod
    def requantization(cls, channels, input_grid, output_grid):
        """The identity from ``input_grid`` onto ``output_grid`` (round to nearest)."""
        return cls(np.ones(channels), np.zeros(channels), input_grid, output_grid, relu=False)

    def _exact_bias(self):
        x_grid, y_grid = self.input_grid, self.output_grid
        low, high, x_zero = x_grid.int8_window()
        # Real input of every int8 code, and the code the float model gives it.
        codes = np.arange(-128, 128, dtype=np.float64)
        x_real = (codes - x_zero) * np.float32(x_grid.scale)
        y_low, y_high, y_zero = y_grid.int8_window()
        # The int8 output window; the ReLU (if any) and the quantizer's own clip are applied on top of it.
        lo_code = max(y_grid.qmin - y_grid.zero, y_low, 0 if self.relu else y_low)
        hi_code = min(y_grid.qmax - y_grid.zero, y_high)
        unit = np.float64(np.float32(x_grid.scale)) * self.weight_scale.astype(np.float64)  # bias int32 step
        multiplier = unit * _WEIGHT_CODE_MAX / np.float64(np.float32(y_grid.scale))  # per accumulator unit
        sign = np.where(self.gain < 0, -1.0, 1.0)
        bias = np.empty(len(self.gain))
        for c in range(len(self.gain)):
            if self.relu:
                y = (self.gain[c] * x_real + self.offset[c]) / y_grid.scale
            else:  # a requantization: the Keras quantizer divides in float32, near-ties included
                y = x_real.astype(np.float32) / np.float32(y_grid.scale)
            target = np.clip(np.rint(y), lo_code, hi_code)
            acc = sign[c] * _WEIGHT_CODE_MAX * (codes - x_zero)  # integer accumulator without the bias
            # round(m * (acc + B)) == target, with the clipped ends one-sided.
            m = multiplier[c] / _WEIGHT_CODE_MAX
            lower = np.where(target > lo_code, (target - 0.5) / m - acc, -np.inf)
            upper = np.where(target < hi_code, (target + 0.5) / m - acc, np.inf)
            # The integer bias closest to the ideal offset among those that get the most codes
            # right: all 256 when the int32 bias step is fine enough (4-bit outputs); an 8-bit
            # output can need a finer step than int8 weights allow, and then a few codes are one off.
            ideal = self.offset[c] / unit[c]
            candidates = np.rint(ideal) + _BIAS_SEARCH
            too_low = candidates[:, None] <= lower[None] + 1e-6
            too_high = candidates[:, None] >= upper[None] - 1e-6
            wrong = np.sum(too_low | too_high, axis=1)
            best = np.flatnonzero(wrong == wrong.min())
            bias[c] = candidates[best[np.argmin(np.abs(candidates[best] - ideal))]] * unit[c]
        return bias.astype(np.float32)

    def __call__(self, x):
        channels = len(self.gain)
        values = np.where(self.gain < 0, -self.magnitude, self.magnitude).astype(np.float32).reshape(1, 1, 1, channels)
        w = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.constant(values), min=-self.magnitude, max=self.magnitude, num_bits=8, narrow_range=True
        )
        w = tf.reshape(w, (1, 1, channels, 1))
        y = tf.nn.depthwise_conv2d(x, w, strides=(1, 1, 1, 1), padding="VALID")
        y = tf.nn.bias_add(y, tf.constant(self.bias))
        if self.relu:
            return y  # the ReLU and the quantizer that follow pin the output grid
        low, high = _ActivationPoint(self.output_grid).window
        return _fake_quant(y, low, high)


def _accumulator_unit(k, input_grid, channel_scale):
    """Real value of one int32 accumulator unit per channel, in the float32 scales the file stores."""
    weight_scale = (channel_scale.astype(np.float64) / k).astype(np.float32).astype(np.float64)
    return _file_scale(input_grid) * weight_scale


def _fit_bias(k, input_grid, channel_scale, bias, output, reach, density):
    """The int32 bias per channel that keeps the most rounding thresholds of ``output`` (see ``_WeightedPoint.tune``).

    Returns a dict with ``k``, ``unit``, ``bias`` (float64 integers), ``thresholds`` (``j + 0.5`` in
    output steps), ``missed`` (``(channels, thresholds)``: 0, 1 or 2 roundings that move the code),
    ``checks`` (reachable thresholds times 2) and ``score`` (missed, weighted by ``density``).
    """
    grid, relu = output
    unit = _accumulator_unit(k, input_grid, channel_scale)
    ideal = bias / unit
    low, high, _ = grid.int8_window()
    lo_code = max(grid.qmin - grid.zero, low, 0 if relu else low)
    hi_code = min(grid.qmax - grid.zero, high)
    j = np.arange(lo_code, hi_code, dtype=np.float64) + 0.5  # thresholds between codes, in steps
    # Keras: the code passes j iff acc * unit + bias >= j * step; acc takes multiples of k only.
    keras_t = (j[None, :] * np.float64(np.float32(grid.scale)) - bias[:, None]) / unit[:, None]
    keras_gap = np.ceil(keras_t / k)
    multiplier = unit / _file_scale(grid)  # one accumulator unit in output steps
    mantissa, exponent = np.frexp(multiplier)
    # gemmlowp rounds acc * mantissa first, then divides by 2**-exponent: each threshold moves by
    # half a unit of the first rounding, towards the zero code (when there is a second rounding).
    double_shift = np.where(exponent < 0, 0.5 / mantissa, 0.0)[:, None] * np.where(j > 0, 1.0, -1.0)[None, :]
    runtime_t = j[None, :] / multiplier[:, None]  # the runtime's threshold before the bias
    relevant = np.abs(keras_t) <= reach[:, None] + k
    weight = np.ones_like(keras_t) if density is None else 1.0 + np.asarray(density, np.float64)
    tolerance = 0.01 + 1e-6 * np.abs(runtime_t)
    base = np.rint(ideal)
    offsets = np.arange(-k - 2, k + 3, dtype=np.float64)

    def missed(candidate, shift):
        t = runtime_t - candidate[:, None] - shift
        out = (np.ceil((t - tolerance) / k) != keras_gap) | (np.ceil((t + tolerance) / k) != keras_gap)
        return np.where(relevant, out, False)

    # Exact integer arithmetic (one rounding) first: a miss there counts as much as every
    # threshold a two-rounding runtime could miss; then the fewest two-rounding misses; then the
    # bias closest to the trained one. Each weighted by how often data comes near the threshold.
    # Few-code outputs: a two-rounding miss moves a code by a large step, worth trading for; 8-bit
    # outputs have too many thresholds to keep for both roundings: exact arithmetic comes first.
    heavy = _EXACT_WEIGHT if grid.levels <= 16 else 1.0 + np.sum(np.where(relevant, weight, 0.0), axis=1)
    scores = []
    for offset in offsets:
        candidate = base + offset
        scores.append(
            heavy * np.sum(missed(candidate, 0.0) * weight, axis=1) + np.sum(missed(candidate, double_shift) * weight, axis=1)
        )
    scores = np.stack(scores)
    distance = np.abs(base[None, :] + offsets[:, None] - ideal[None, :])
    choice = np.argmin(scores + distance / (4.0 * (k + 3)), axis=0)
    chosen = base + offsets[choice]
    single, double = missed(chosen, 0.0), missed(chosen, double_shift)
    return {
        "k": k, "unit": unit, "bias": chosen, "thresholds": j, "missed": single.astype(float) + double,
        "checks": 2 * int(np.sum(relevant)),
        "score": float(np.sum(heavy * np.sum(single * weight, axis=1) + np.sum(double * weight, axis=1))),
        "exact_misses": int(np.sum(single)),
    }


def _threshold_counts(steps, thresholds):
    """``(channels, thresholds)`` counts of the values ``steps`` ``(N, channels)`` within one step of each threshold.

    ``thresholds`` are consecutive ``j + 0.5``; a value ``v`` is within one step of the two thresholds
    around it, ``floor(v - 0.5) + 0.5`` and the next.
    """
    channels, count = steps.shape[1], len(thresholds)
    first = np.floor(steps - 0.5) - (thresholds[0] - 0.5)  # index of the threshold just below
    column = np.broadcast_to(np.arange(channels), steps.shape)
    counts = np.zeros(channels * count, np.int64)
    for index in (first, first + 1):
        ok = (index >= 0) & (index < count)
        counts += np.bincount((column[ok] * count + index[ok]).astype(np.int64), minlength=channels * count)
    return counts.reshape(channels, count)


def _file_scale(grid):
    """The scale TFLite stores for a tensor pinned to ``grid`` by :class:`_ActivationPoint` (float64 value)."""
    low, high, _ = grid.int8_window()
    s = grid.scale
    return np.float64(np.float32((np.float64(np.float32(high * s)) - np.float64(np.float32(low * s))) / 255.0))


def _batchnorm_as_depthwise(gain, offset, x):
    """An inference BN ``gain * x + offset`` on a 4-D tensor as a 1x1 depthwise conv with bias.

    One op, into which the converter fuses a following ReLU. The weights stay
    float: the int8 converter quantizes them per channel.
    """
    w = tf.constant(gain.reshape(1, 1, len(gain), 1))
    y = tf.nn.depthwise_conv2d(x, w, strides=(1, 1, 1, 1), padding="VALID")
    return tf.nn.bias_add(y, tf.constant(offset))


def _constant_pool(pool, x, weight, integer):
    """A valid pooling window as a depthwise conv whose weights all equal ``weight`` (int8: code 127, one scale).

    ``weight`` 1 sums the window (pooled-first convs), ``1 / area`` averages it (the "speed" layout).
    """
    w = tf.constant(np.full((*pool.pool_size, int(x.shape[-1]), 1), weight, np.float32))
    if integer:
        w = _fake_quant(w, np.float32(-weight), np.float32(weight), narrow_range=True)
    return tf.nn.depthwise_conv2d(x, w, strides=(1, *pool.strides, 1), padding="VALID")


def _plain_relu(layer):
    return not getattr(layer, "max_value", None) and not getattr(layer, "negative_slope", 0) and not getattr(layer, "threshold", 0)


class _Reusable:
    """A computed tensor that Keras' ``Node.map_arguments`` may ``pop()`` any number of times."""

    def __init__(self, value):
        self.value = value

    def pop(self):
        return self.value


def _bn_parameters(bn, channels):
    def weight_or(value, default):
        return np.asarray(value.numpy(), np.float64) if value is not None else np.full(channels, default)

    return (
        weight_or(bn.gamma, 1.0),
        weight_or(bn.beta, 0.0),
        weight_or(bn.moving_mean, 0.0),
        weight_or(bn.moving_variance, 1.0),
    )


def _bn_affine(bn, channels):
    """An inference BN as ``gain * x + offset`` per channel (float64 arrays)."""
    gamma, beta, mean, var = _bn_parameters(bn, channels)
    gain = gamma / np.sqrt(var + bn.epsilon)
    return gain, beta - mean * gain


def _channels_last(bn):
    """Whether a BatchNormalization normalizes the last axis of a 4-D (NHWC) tensor only."""
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    return axis in (-1, 3)


class IntegerGraph:
    """The exportable twin of a quantized (or float) functional Keras model.

    Args:
      model: a functional Keras model, typically from :func:`tfqkd.quantize`.
      unsafe: allow Lambda layers (their code runs while tracing).
      layout: "speed" or "compact" (see :data:`LAYOUTS`).

    Attributes:
      activation_grids: dict QActivation name -> :class:`Grid` (the trained
        activation scales, which the int8 export keeps).
      weight_grids: dict layer name -> (step, folded BN name or None).
      rounded_batchnorms: BN layers that the Keras model computes in float
        and the int8 model rounds (neither folded nor exact); empty for a
        model quantized with ``integer_intermediates``.
    """

    def __init__(self, model, unsafe=False, layout="speed"):
        if layout not in LAYOUTS:
            raise TfqkdError(f"unknown TFLite layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        self.layout = layout
        if not getattr(model, "_is_graph_network", False):
            raise TfqkdError("TFLite export needs a functional or Sequential Keras model, not a subclassed one")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise TfqkdError("TFLite export supports models with one input and one output")
        offending = [f"{layer.name} ({type(layer).__name__})" for layer in model.layers if type(layer).__name__ in UNSAFE_LAYER_TYPES]
        if offending and not unsafe:
            raise TfqkdError(
                f"model contains layers that execute code: {', '.join(offending)}; pass --unsafe (unsafe=True) "
                "only if you trust it"
            )
        self.model = model
        self.points = {}
        self.activation_grids = {}
        self.weight_grids = {}
        self._identity = set()
        self.output_ranges = {}
        consumers = self._consumers()
        self._consumer_map = consumers
        for layer in model.layers:
            if isinstance(layer, QActivation):
                if not isinstance(layer.quantizer, TfqkdQuantizer):
                    raise TfqkdError(
                        f"layer '{layer.name}': QKeras quantizer {layer.quantizer} is not a tfqkd quantizer; only "
                        "models made by tfqkd.quantize() can be exported with their trained grid"
                    )
                point = _ActivationPoint(activation_grid(layer.quantizer, layer.name))
                self.points[layer.name] = point
                self.activation_grids[layer.name] = point.grid
            elif isinstance(layer, (QConv2D, QDepthwiseConv2D, QDense)):
                bn = self._foldable_bn(layer, consumers)
                self.points[layer.name] = _WeightedPoint(layer, bn)
                self.weight_grids[layer.name] = (self.points[layer.name].step, None if bn is None else bn.name)
                if bn is not None:
                    self._identity.add(bn.name)
            elif type(layer).__module__.startswith("qkeras"):
                raise TfqkdError(f"layer '{layer.name}': QKeras layer {type(layer).__name__} is not supported by the exporter")
        self.channel_affines = self._exact_batchnorms(consumers)
        self.pooled_first = self._pooled_first(consumers)
        self._pool_identity = {pool.name for pool, _ in self.pooled_first.values()}
        self.concat_windows = self._concat_windows(consumers)
        self.concat_requantizations = self._concat_requantizations(consumers)
        self._tuned = {}
        self._tune_weighted(consumers)
        self._depthwise_batchnorms, self._depthwise_pools = self._depthwise_lowerings(consumers)
        # BNs the Keras model computes in float and int8 must round (on calibrated scales).
        self.rounded_batchnorms = [
            layer.name for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
            and layer.name not in self._identity and layer.name not in self.channel_affines
        ]
        self.range_layers = [
            name
            for name in self._layers_needing_ranges(consumers)
            if name not in self.pooled_first and name not in self.concat_windows
        ]

    def code_multipliers(self):
        """``{layer name: k}``: the int8 file stores each weighted layer's trained codes times ``k``."""
        return {name: p.code_multiplier for name, p in self.points.items() if isinstance(p, _WeightedPoint)}

    def _tune_weighted(self, consumers):
        """Fits each weighted layer's int8 weights and int32 bias to the grid its output is rounded onto."""
        for layer in self.model.layers:
            point = self.points.get(layer.name)
            if not isinstance(point, _WeightedPoint) or layer.name in self.pooled_first:
                continue
            source = self._producer_of(layer.input)
            input_grid = self.activation_grids.get(source.name)
            output = None
            activation = getattr(layer, "activation", None)
            own_relu = activation is keras.activations.relu
            plain = activation is None or activation is keras.activations.linear or own_relu
            if layer.name in self.concat_windows:
                if plain and not own_relu:
                    output = (self.activation_grids[self.concat_windows[layer.name]], False)
            elif plain:
                users = consumers.get(str(id(layer.output)), [])
                if len(users) == 1 and users[0].name in self._identity:
                    users = consumers.get(str(id(users[0].output)), [])
                relu = own_relu
                if not relu and len(users) == 1 and type(users[0]).__name__ == "ReLU" and _plain_relu(users[0]):
                    relu = True
                    users = consumers.get(str(id(users[0].output)), [])
                grid = self._shared_grid(users)
                if grid is not None:
                    output = (grid, relu)
            point.tune(input_grid, output)
            if output is not None and input_grid is not None:
                # The tensor before the ReLU and the rounding: calibration data weights its thresholds.
                before = layer
                following = consumers.get(str(id(layer.output)), [])
                if len(following) == 1 and following[0].name in self._identity:
                    before = following[0]
                self._tuned[layer.name] = (input_grid, output, before.name)

    def _producer_of(self, tensor):
        return tensor._keras_history.layer

    def _shared_grid(self, layers):
        """The trained grid of ``layers`` when they are all activation quantizers on one grid, else None."""
        if not layers or not all(isinstance(q, QActivation) and q.name in self.activation_grids for q in layers):
            return None
        if len({repr(self.activation_grids[q.name].as_dict()) for q in layers}) != 1:
            return None
        return self.activation_grids[layers[0].name]

    def _exact_batchnorms(self, consumers):
        """Unfolded BNs whose input is an activation quantizer's output and whose output feeds
        only a ReLU that feeds only activation quantizers of one grid (``integer_intermediates``)."""
        found = {}
        for layer in self.model.layers:
            if not isinstance(layer, keras.layers.BatchNormalization) or layer.name in self._identity:
                continue
            shape = layer.input.shape
            if shape.rank != 4 or not _channels_last(layer):
                continue
            source = self._producer_of(layer.input)
            if source.name not in self.activation_grids:
                continue
            users = consumers.get(str(id(layer.output)), [])
            if len(users) != 1 or type(users[0]).__name__ != "ReLU" or not _plain_relu(users[0]):
                continue
            target = self._shared_grid(consumers.get(str(id(users[0].output)), []))
            if target is None:
                continue
            found[layer.name] = _ChannelAffine.batchnorm(layer, int(shape[-1]), self.activation_grids[source.name], target)
        return found

    def _pooled_first(self, consumers):
        """1x1 convs followed by a 2-D average pool whose output feeds one activation quantizer.

        Both are linear, so ``pool(conv(x)) == conv(pool(x))``; pooling first
        keeps the arithmetic exact in int8: the pool becomes a depthwise sum
        of the input codes (which still fit int8), the conv's weights are
        divided by the pool area (same codes, smaller step), and the result is
        rounded once, onto the quantizer's grid. Returns
        ``{conv name: (pool layer, quantizer name)}``.
        """
        found = {}
        for layer in self.model.layers:
            point = self.points.get(layer.name)
            if not isinstance(point, _WeightedPoint) or point.folded or not isinstance(layer, QConv2D):
                continue
            if tuple(layer.kernel_size) != (1, 1) or tuple(layer.strides) != (1, 1) or tuple(layer.dilation_rate) != (1, 1):
                continue
            activation = getattr(layer, "activation", None)
            if activation is not None and activation is not keras.activations.linear:
                continue
            source = self._producer_of(layer.input)
            if source.name not in self.activation_grids:
                continue
            users = consumers.get(str(id(layer.output)), [])
            if len(users) != 1 or not isinstance(users[0], keras.layers.AveragePooling2D):
                continue
            pool = users[0]
            if tuple(pool.pool_size) != tuple(pool.strides) or pool.padding != "valid":
                continue
            after = consumers.get(str(id(pool.output)), [])
            if len(after) != 1 or after[0].name not in self.activation_grids:
                continue
            grid = self.activation_grids[source.name]
            low, high, _ = grid.int8_window()
            area = int(np.prod(pool.pool_size))
            if area * (grid.qmax - grid.zero) > high or area * (grid.qmin - grid.zero) < low:
                continue  # the sums of the codes would not fit the int8 window
            found[layer.name] = (pool, after[0].name)
        return found

    def _concat_windows(self, consumers):
        """Weighted layers whose output goes only into a Concatenate (or a pooling layer, which
        keeps the scale) whose output goes only into an activation quantizer: they are
        requantized straight onto that quantizer's grid."""
        found = {}
        for layer in self.model.layers:
            if not isinstance(self.points.get(layer.name), _WeightedPoint):
                continue
            users = consumers.get(str(id(layer.output)), [])
            joins = (keras.layers.Concatenate, keras.layers.AveragePooling2D, keras.layers.MaxPooling2D)
            if layer.name in self.pooled_first or len(users) != 1 or not isinstance(users[0], joins):
                continue
            after = consumers.get(str(id(users[0].output)), [])
            if len(after) == 1 and after[0].name in self.activation_grids:
                found[layer.name] = after[0].name
        return found

    def _depthwise_lowerings(self, consumers):
        """The BNs and average pools the "speed" layout computes as depthwise convs.

        Returns ``({bn name: (gain, offset)}, {pool name: name of the quantizer it feeds or None})``;
        a pool that feeds one activation quantizer is pinned to its grid, as
        AVERAGE_POOL_2D (which keeps its input's scale) would be.
        """
        if self.layout != "speed":
            return {}, {}
        bns, pools = {}, {}
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.BatchNormalization) and layer.name not in self._identity:
                producer = self._producer_of(layer.input)
                if isinstance(producer, (keras.layers.Conv2D, keras.layers.Dense)) and len(
                    consumers.get(str(id(producer.output)), [])
                ) == 1:
                    continue  # the converter folds it into the conv's weights and bias
                if layer.input.shape.rank == 4 and _channels_last(layer):
                    gain, offset = _bn_affine(layer, int(layer.input.shape[-1]))
                    bns[layer.name] = (gain.astype(np.float32), offset.astype(np.float32))
            elif (
                type(layer) is keras.layers.AveragePooling2D
                and layer.padding == "valid"
                and layer.data_format == "channels_last"
            ):
                users = consumers.get(str(id(layer.output)), [])
                target = users[0].name if len(users) == 1 and users[0].name in self.activation_grids else None
                pools[layer.name] = target
        return bns, pools

    def _concat_requantizations(self, consumers):
        """Concat inputs on a trained grid other than the grid of the quantizer after the concat.

        In the Keras model such an input is rounded twice (its own quantizer,
        then the concat's); the int8 graph must repeat that second rounding
        exactly, which the converter's QUANTIZE does not do under XNNPACK
        (see :class:`_ChannelAffine`). Returns ``{concat name: {input index:
        _ChannelAffine}}``.
        """
        found = {}
        for layer in self.model.layers:
            if not isinstance(layer, keras.layers.Concatenate) or layer.axis not in (-1, 3):
                continue
            target = self._shared_grid(consumers.get(str(id(layer.output)), []))
            if target is None:
                continue
            inputs = {}
            for index, tensor in enumerate(layer.input):
                source = self._producer_of(tensor).name
                grid = self.activation_grids.get(source)
                if tensor.shape.rank != 4 or grid is None or grid.as_dict() == target.as_dict():
                    continue
                inputs[index] = _ChannelAffine.requantization(int(tensor.shape[-1]), grid, target)
            if inputs:
                found[layer.name] = inputs
        return found

    def _layers_needing_ranges(self, consumers):
        """Layers whose float output gets a calibrated fake-quant range.

        The converter keeps a fake-quantized weight only when the op's output
        is annotated too; an unannotated output makes it re-quantize the
        weights per channel from their float values, which loses the trained
        codes. So every weighted layer's output (after a folded BN) gets a range,
        except where it flows only through a ReLU into an activation quantizer,
        whose trained range the converter then fuses into the op. The model
        output is always annotated (the logits' int8 scale).
        """
        names = []
        for layer in self.model.layers:
            if layer.name not in self.points or not isinstance(self.points[layer.name], _WeightedPoint):
                continue
            last = layer
            users = consumers.get(str(id(layer.output)), [])
            if len(users) == 1 and users[0].name in self._identity:
                last = users[0]
                users = consumers.get(str(id(last.output)), [])
            if len(users) == 1 and type(users[0]).__name__ == "ReLU" and _plain_relu(users[0]):
                users = consumers.get(str(id(users[0].output)), [])
            if users and all(isinstance(u, QActivation) for u in users):
                continue
            names.append(last.name)
        out_layer = self.model.outputs[0]._keras_history.layer
        if out_layer.name not in names and out_layer.name not in self.activation_grids:
            names.append(out_layer.name)
        return names

    def calibrate(self, batches):
        """Sets the ranges of :attr:`range_layers` from the trained model's outputs.

        Args:
          batches: iterable of input arrays (the calibration data). The range
            of each tensor is the min-max over all of them, widened to contain 0.
        """
        tuned = list(self._tuned.items())
        if not self.range_layers and not tuned:
            return
        outputs = [self.model.get_layer(name).output for name in self.range_layers]
        outputs += [self.model.get_layer(before).output for _, (_, _, before) in tuned]
        probe = keras.Model(self.model.inputs, outputs)
        lows = np.zeros(len(self.range_layers))
        highs = np.zeros(len(self.range_layers))
        density = [None] * len(tuned)
        for batch in batches:
            values = probe(batch, training=False)
            values = values if isinstance(values, (list, tuple)) else [values]
            for i, v in enumerate(values[: len(self.range_layers)]):
                lows[i] = min(lows[i], float(tf.reduce_min(v)))
                highs[i] = max(highs[i], float(tf.reduce_max(v)))
            for i, (name, (_, (grid, _), _)) in enumerate(tuned):
                # Calibration values within one step of each rounding threshold, per channel.
                point = self.points[name]
                steps = np.asarray(values[len(self.range_layers) + i], np.float64) / grid.scale
                counts = _threshold_counts(steps.reshape(-1, steps.shape[-1]), point.output_thresholds)
                density[i] = counts if density[i] is None else density[i] + counts
        for (name, (input_grid, output, _)), counts in zip(tuned, density):
            self.points[name].tune(input_grid, output, density=counts)
        out_name = self.model.outputs[0]._keras_history.layer.name
        for name, lo, hi in zip(self.range_layers, lows, highs):
            if name == out_name:
                # Logits of unseen inputs exceed the calibration extremes more often than
                # hidden features, and a clipped top logit can tie with the runner-up.
                margin = _OUTPUT_MARGIN * (hi - lo)
                lo, hi = (lo - margin if lo < 0 else lo), hi + margin
            if hi - lo < 1e-6:
                hi = lo + 1e-6
            self.output_ranges[name] = (np.float32(lo), np.float32(hi))

    def _consumers(self):
        """Maps id(output KerasTensor) -> list of consuming layers, within this model."""
        consumers = {}
        for depth_nodes in self.model._nodes_by_depth.values():
            for node in depth_nodes:
                if node.is_input:
                    continue
                for tensor_id in node.flat_input_ids:
                    consumers.setdefault(tensor_id, []).append(node.layer)
        return consumers

    def _foldable_bn(self, layer, consumers):
        # Fold only when the conv's output feeds nothing but the BN and the conv has no activation of its own.
        if not isinstance(layer, _FOLDABLE_PRODUCERS):
            return None
        activation = getattr(layer, "activation", None)
        if activation is not None and activation is not keras.activations.linear:
            return None
        users = consumers.get(str(id(layer.output)), [])
        if len(users) != 1 or not isinstance(users[0], keras.layers.BatchNormalization):
            return None
        bn = users[0]
        return bn if _channels_last(bn) else None

    def __call__(self, inputs, integer=True):
        """Runs the twin on ``inputs`` (inside a tf.function for export).

        Args:
          inputs: the input tensor.
          integer: True: fake-quant nodes for the int8 converter; False: the
            same grids in float arithmetic (float32/float16 export).

        Returns:
          the output tensor.
        """
        model = self.model
        tensor_dict = {str(id(model.inputs[0])): _Reusable(inputs)}
        depth_keys = sorted(model._nodes_by_depth.keys(), reverse=True)
        for depth in depth_keys:
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                if any(t_id not in tensor_dict for t_id in node.flat_input_ids):
                    continue
                layer = node.layer
                args, kwargs = node.map_arguments(tensor_dict)
                if layer.name in self._identity or (integer and layer.name in self._pool_identity):
                    outputs = args[0]
                elif integer and layer.name in self.channel_affines:
                    outputs = self.channel_affines[layer.name](args[0])
                elif integer and layer.name in self.pooled_first:
                    pool, target = self.pooled_first[layer.name]
                    outputs = self.points[layer.name].pooled(args[0], pool, self.points[self._producer_of(layer.input).name])
                    outputs = _fake_quant(outputs, *self.points[target].window)
                elif integer and layer.name in self.concat_windows:
                    outputs = self.points[layer.name](args[0], integer)
                    outputs = _fake_quant(outputs, *self.points[self.concat_windows[layer.name]].window)
                elif layer.name in self._depthwise_batchnorms:
                    outputs = _batchnorm_as_depthwise(*self._depthwise_batchnorms[layer.name], args[0])
                elif layer.name in self._depthwise_pools:
                    outputs = _constant_pool(layer, args[0], 1.0 / int(np.prod(layer.pool_size)), integer)
                    target = self._depthwise_pools[layer.name]
                    if integer and target is not None:
                        outputs = _fake_quant(outputs, *self.points[target].window)
                elif layer.name in self.points:
                    point = self.points[layer.name]
                    if isinstance(point, _ActivationPoint):
                        outputs = point.integer(args[0]) if integer else point.emulate(args[0])
                    else:
                        outputs = point(args[0], integer)
                else:
                    if integer and layer.name in self.concat_requantizations:
                        requantize = self.concat_requantizations[layer.name]
                        args = ([requantize[i](x) if i in requantize else x for i, x in enumerate(args[0])], *args[1:])
                    if "training" in layer._call_spec.arg_names:
                        kwargs = {**kwargs, "training": False}
                    outputs = layer(*args, **kwargs)
                if integer and layer.name in self.output_ranges:
                    low, high = self.output_ranges[layer.name]
                    outputs = _fake_quant(outputs, low, high)
                for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    tensor_dict[x_id] = _Reusable(y)
        return tensor_dict[str(id(model.outputs[0]))].value
