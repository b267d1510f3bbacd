"""The trained grids of a tfqkd model, read as integer arithmetic: one quantization point at a time.

:class:`tfqkd.export.integer_graph.IntegerGraph` lowers a whole model; this module knows what
each point computes in integers:

* :func:`activation_grid` and :func:`weight_codes` read a quantizer's integer grid
  (:meth:`~tfqkd.quant.quantizers.TfqkdQuantizer.grid`) and check it fits int8;
* :class:`ActivationPoint`: an activation quantizer as an 8-bit fake quant whose grid contains
  the trained one (a clip to the top and bottom code for fewer than 8 bits);
* :class:`WeightedPoint`: a conv/dense layer (and the BatchNormalization folded into it) with its
  codes, int32 bias and, where its output is rounded onto a trained grid, the bias and code
  multiplier fitted so that TFLite's kernels round as the Keras model does (``tune``): a plain
  conversion rounds the bias to ``input step * weight step`` and TFLite's built-in kernels
  requantize with two roundings (gemmlowp), which together moved ~0.1% of the hidden 4-bit codes
  of a kl_mlp_student and 3 output steps of its logits;
* :class:`ChannelAffine`: a BatchNormalization or a requantization between two trained grids
  as one exact per-channel step (a 1x1 depthwise convolution).
"""

import numpy as np

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.quant.layers import IntegerBatchNormalization, QDense, QDepthwiseConv2D, gain_codes
from tfqkd.quant.quantizers import AffineQuantizer, TfqkdQuantizer

__all__ = [
    "OUTPUT_MARGIN", "ActivationPoint", "ChannelAffine", "GlobalMean", "WeightedPoint", "activation_grid", "batchnorm_as_depthwise",
    "bn_affine", "channels_last", "constant_pool", "fake_quant", "threshold_counts", "weight_codes",
]  # fmt: skip

# Largest magnitude of a TFLite int8 weight code: weights are symmetric narrow-range [-127, 127].
_WEIGHT_CODE_MAX = 127
# Integer bias offsets (in int32 bias steps) tried around the ideal bias of an exact requantization.
_BIAS_SEARCH = np.arange(-256, 257, dtype=np.float64)
# Widening of the calibrated logit range, as a fraction of its span.
OUTPUT_MARGIN = 0.1
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
            " (asymmetric affine weights: their zero point shifts the codes; use the 'lsq' scheme or 4-bit affine weights)"
            if isinstance(quantizer, AffineQuantizer)
            else " (use a narrow-range weight quantizer)"
        )
        raise TfqkdError(
            f"layer '{layer_name}': weight codes reach {worst}, outside TFLite's symmetric int8 range "
            f"[-127, 127]{hint}"
        )
    return codes.astype(np.int32), scale


def fake_quant(x, low, high, narrow_range=False):
    return tf.quantization.fake_quant_with_min_max_vars(x, min=low, max=high, num_bits=8, narrow_range=narrow_range)


class ActivationPoint:
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
        x = fake_quant(x, low, high)
        if self.clip_low is None and self.clip_high is None:
            return x
        # Clip on the int8 grid, then pin the result to the same grid again so
        # the clip is an int8 op that keeps scale and zero point.
        if self.clip_high is not None:
            x = tf.minimum(x, self.clip_high)
        if self.clip_low is not None:
            x = tf.maximum(x, self.clip_low)
        return fake_quant(x, low, high)

    def emulate(self, x):
        # Float export: the same grid in float arithmetic.
        g = self.grid
        codes = tf.clip_by_value(tf.round(x / g.scale) + g.zero, float(g.qmin), float(g.qmax))
        return (codes - g.zero) * g.scale


class WeightedPoint:
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
        if layer.use_bias and hasattr(layer, "inference_bias"):
            bias = layer.inference_bias().numpy().astype(np.float64)  # what the Keras layer adds at inference
        elif layer.use_bias:
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

    def pooled_multiplier(self, area, input_grid):
        """Sets and returns the ``k`` of :meth:`pooled`: the largest with codes ``* k`` in [-127, 127] and the
        window's sum in int32 (2**24 kept for the bias)."""
        input_magnitude = 255
        if input_grid is not None:
            low, high, _ = input_grid.int8_window()
            input_magnitude = max(abs(low), abs(high))
        largest = int(np.max(np.abs(self.weight_codes), initial=0))
        k = _WEIGHT_CODE_MAX // largest if largest else 1
        total = area * float(np.max(self._reduction_sums(), initial=0.0)) * input_magnitude
        while k > 1 and total * k >= 2**31 - 2**24:
            k -= 1
        self.code_multiplier = k
        return k

    def pooled(self, x, pool):
        """``pool(self(x))`` as one convolution with the pool's window and stride (see ``IntegerGraph._pooled_first``).

        A 1x1 conv followed by a valid average pool is the conv whose kernel repeats the
        1x1 weights divided by the pool area at every window position: the same codes at
        ``step / area``, summed exactly in the int32 accumulator and rounded once, onto the
        grid of the quantizer after the pool (a sum-pool first would not fit 8-bit codes in
        int8, a pooled int8 tensor rounds twice, and requantizing the conv output onto the
        pool's grid clips the values the pool would average).
        """
        area = int(np.prod(pool.pool_size))
        step = self.step / area
        codes = np.broadcast_to(self.weight_codes[0, 0], (*pool.pool_size, *self.weight_codes.shape[2:]))
        # Stored as codes * k at scale step / k (as tune() does for the other layers): the
        # accumulator unit is k times finer. The layer has no bias to place, but its output is
        # rounded onto an 8-bit grid, and TFLite's built-in kernels round twice (gemmlowp, see
        # gain_codes): each threshold moves by up to one accumulator unit, which catches a
        # reachable accumulator value about once in k thresholds. With k = 1 (the trained codes)
        # that moved 5-13% of the pooled 8-bit codes of a w4a4 densenet21 on tflite-runtime 2.14.
        k = self.code_multiplier  # set by pooled_multiplier()
        step = step / k
        codes = codes * k
        values = (codes.astype(np.float64) * step).astype(np.float32)
        limit = np.float32(_WEIGHT_CODE_MAX * step)
        w = fake_quant(tf.constant(values), -limit, limit, narrow_range=True)
        y = tf.nn.conv2d(x, w, strides=(1, *pool.strides, 1), padding="VALID")
        if self.has_bias:
            y = tf.nn.bias_add(y, tf.constant(self.bias))
        return y

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
        return fake_quant(w, -limit, limit, narrow_range=True)

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


class ChannelAffine:
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
    the code ``+-w_c`` with the per-channel scale ``|gain_c| / w_c`` (the
    runtime then applies the gain as a 32-bit fixed-point or float
    multiplier) and whose int32 bias is chosen so the op returns, for every
    one of the 256 input codes, the code the Keras model returns: first on
    XNNPACK (float32 rescale, one rounding), then on TFLite's built-in
    kernels (gemmlowp, two roundings where the multiplier is below 0.5),
    both computed here as the runtimes do. ``w_c`` is 127 (the finest bias
    grid) unless a smaller code makes the multiplier ``>= 0.5`` (one
    rounding on every runtime, :func:`tfqkd.quant.layers.gain_codes`): for a
    requantization always, for an :class:`IntegerBatchNormalization` where
    the layer says so (its offset is on the same grid).

    Args:
      gain, offset: per-channel ``y = gain * x + offset`` in real units.
      input_grid, output_grid: the :class:`Grid` of the input tensor and of
        the output quantizer.
      relu: a ReLU sits between the affine map and the output quantizer.
      codes: per-channel weight codes ``w_c`` (default 127).
    """

    def __init__(self, gain, offset, input_grid, output_grid, relu=True, codes=None):
        self.gain = np.asarray(gain, np.float64)
        self.offset = np.asarray(offset, np.float64)
        self.relu = relu
        self.input_grid, self.output_grid = input_grid, output_grid
        magnitude = np.maximum(np.abs(self.gain), 1e-12).astype(np.float32)
        self.magnitude = magnitude
        self.codes = np.full(len(self.gain), float(_WEIGHT_CODE_MAX)) if codes is None else np.asarray(codes, np.float64)
        self.weight_scale = (magnitude.astype(np.float64) / self.codes).astype(np.float32)
        self.bias = self._exact_bias()

    @classmethod
    def batchnorm(cls, bn, channels, input_grid, output_grid, relu=True):
        """BN -> ReLU -> quantizer (or BN -> quantizer) on an exact int8 input."""
        return cls(*bn_affine(bn, channels), input_grid, output_grid, relu=relu, codes=bn_gain_codes(bn))

    @classmethod
    def requantization(cls, channels, input_grid, output_grid):
        """The identity from ``input_grid`` onto ``output_grid`` (round to nearest)."""
        ratio = np.full(channels, _file_scale(input_grid) / _file_scale(output_grid))
        return cls(np.ones(channels), np.zeros(channels), input_grid, output_grid, relu=False, codes=gain_codes(ratio))

    def _targets(self, x_codes):
        """``(channels, 256)``: the output code the Keras model gives each input code, in float32 as it computes."""
        x_grid, y_grid = self.input_grid, self.output_grid
        x_real = x_codes.astype(np.float32) * np.float32(x_grid.scale)  # the input quantizer's output
        step = np.float32(y_grid.scale)
        # (A requantization: gain 1, offset 0; the Keras quantizer divides in float32, near-ties included.)
        gain, offset = self.gain.astype(np.float32)[:, None], self.offset.astype(np.float32)[:, None]
        y = x_real[None, :] * gain + offset
        if self.relu:
            y = np.maximum(y, np.float32(0))
        return np.rint(y / step).astype(np.float64)

    def _exact_bias(self):
        x_grid, y_grid = self.input_grid, self.output_grid
        _, _, x_zero = x_grid.int8_window()
        codes = np.arange(-128, 128, dtype=np.int64)  # every int8 input value
        y_low, y_high, _ = y_grid.int8_window()
        # The int8 output window; the ReLU (if any) and the quantizer's own clip are applied on top of it.
        lo_code = max(y_grid.qmin - y_grid.zero, y_low, 0 if self.relu else y_low)
        hi_code = min(y_grid.qmax - y_grid.zero, y_high)
        target = np.clip(self._targets(codes - x_zero), lo_code, hi_code)
        file_x, file_y = _file_scale(x_grid), _file_scale(y_grid)
        weight_scale = self.weight_scale.astype(np.float64)
        unit = file_x * weight_scale  # the real value of one int32 accumulator unit
        sign = np.where(self.gain < 0, -1, 1)
        ideal = self.offset / unit
        candidates = np.rint(ideal)[:, None] + _BIAS_SEARCH[None, :]  # (channels, candidates)
        bias = np.empty(len(self.gain))
        self.missed = np.zeros((len(self.gain), 2), np.int64)  # input codes off per channel: (XNNPACK, built-ins)
        for c in range(len(self.gain)):
            acc = (sign[c] * int(self.codes[c]) * (codes - x_zero))[None, :] + candidates[c].astype(np.int64)[:, None]
            xnn = np.clip(_xnnpack_requantize(acc, file_x, weight_scale[c], file_y), lo_code, hi_code)
            gem = np.clip(_builtin_requantize(acc, file_x * weight_scale[c] / file_y), lo_code, hi_code)
            wrong = np.stack([np.sum(xnn != target[c], axis=1), np.sum(gem != target[c], axis=1)])
            # XNNPACK first (LiteRT's default), then the built-in kernels, then the bias closest to the offset.
            score = wrong[0] * (len(codes) + 1) + wrong[1]
            best = np.flatnonzero(score == score.min())
            pick = best[np.argmin(np.abs(candidates[c, best] - ideal[c]))]
            bias[c] = candidates[c, pick] * unit[c]
            self.missed[c] = wrong[:, pick]
        return bias.astype(np.float32)

    def __call__(self, x):
        channels = len(self.gain)
        values = np.where(self.gain < 0, -self.magnitude, self.magnitude).astype(np.float32).reshape(1, 1, 1, channels)
        # Narrow-range per-channel fake quant over +-127 weight steps: the gain is stored as the code w_c.
        limit = (_WEIGHT_CODE_MAX * self.weight_scale.astype(np.float64)).astype(np.float32)
        w = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            tf.constant(values), min=-limit, max=limit, num_bits=8, narrow_range=True
        )
        w = tf.reshape(w, (1, 1, channels, 1))
        y = tf.nn.depthwise_conv2d(x, w, strides=(1, 1, 1, 1), padding="VALID")
        y = tf.nn.bias_add(y, tf.constant(self.bias))
        if self.relu:
            return y  # the ReLU and the quantizer that follow pin the output grid
        low, high = ActivationPoint(self.output_grid).window
        return fake_quant(y, low, high)


class GlobalMean:
    """A global average pool between two exact int8 grids as one DEPTHWISE_CONV_2D over the whole window.

    The converter's MEAN computes, on TFLite's built-in kernels, the sum of the int8 values
    times one 32-bit multiplier with the zero points folded in separately; on a w8a8
    densenet21 it moved 22% of the 8-bit codes after the head's pool (1.3% at w4a4, 4-bit
    codes). Here each channel's window is summed by a depthwise conv with one weight code
    ``w`` at scale ``1 / (area * w)`` (``w`` as :func:`~tfqkd.quant.layers.gain_codes` chooses
    it for a multiplier ``s_in / (area * s_out)``), and its int32 bias is chosen so that every
    reachable window sum lands on the Keras model's code, on XNNPACK first, then on the
    built-in kernels (both computed here as the runtimes do).

    Args:
      size: the pooled window ``(height, width)`` (the whole feature map).
      input_grid, output_grid: the :class:`Grid` of the pooled tensor and of the quantizer after the pool.
    """

    def __init__(self, size, input_grid, output_grid):
        self.size = tuple(int(v) for v in size)
        self.input_grid, self.output_grid = input_grid, output_grid
        area = int(np.prod(self.size))
        file_x, file_y = _file_scale(input_grid), _file_scale(output_grid)
        self.code = int(gain_codes(np.array([file_x / (area * file_y)]))[0])
        self.weight_scale = np.float32(1.0 / (area * self.code))
        unit = file_x * np.float64(self.weight_scale)
        # Every reachable window sum of the input's trained (shifted) codes.
        sums = np.arange(area * (input_grid.qmin - input_grid.zero), area * (input_grid.qmax - input_grid.zero) + 1)
        exact = sums * np.float64(input_grid.scale) / (area * np.float64(output_grid.scale))
        # Sums within float32 error of a rounding threshold: the Keras model's float mean may round either way.
        care = np.abs(np.abs(exact - np.floor(exact)) - 0.5) > 1e-5 * np.maximum(1.0, np.abs(exact))
        y_low, y_high, _ = output_grid.int8_window()
        lo_code, hi_code = max(output_grid.qmin - output_grid.zero, y_low), min(output_grid.qmax - output_grid.zero, y_high)
        target = np.clip(np.rint(exact), lo_code, hi_code)
        # The Keras model adds no offset: biases within one reachable step (the code) of 0 are enough.
        candidates = np.arange(-self.code - 2, self.code + 3, dtype=np.int64)
        wrong = np.zeros((2, len(candidates)), np.int64)
        for start in range(0, len(candidates), 16):  # bounded memory for large windows
            acc = self.code * sums[None, :].astype(np.int64) + candidates[start : start + 16, None]
            xnn = np.clip(_xnnpack_requantize(acc, file_x, self.weight_scale, file_y), lo_code, hi_code)
            gem = np.clip(_builtin_requantize(acc, file_x * np.float64(self.weight_scale) / file_y), lo_code, hi_code)
            wrong[0, start : start + 16] = np.sum((xnn != target) & care, axis=1)
            wrong[1, start : start + 16] = np.sum((gem != target) & care, axis=1)
        score = wrong[0] * (len(sums) + 1) + wrong[1]
        best = np.flatnonzero(score == score.min())
        pick = best[np.argmin(np.abs(candidates[best]))]
        self.missed = (int(wrong[0, pick]), int(wrong[1, pick]))  # reachable sums off (XNNPACK, built-ins)
        self.bias_units = int(candidates[pick])
        self.bias = np.float32(self.bias_units * unit)

    def __call__(self, x):
        channels = int(x.shape[-1])
        value = np.float32(self.code * np.float64(self.weight_scale))
        limit = np.float32(_WEIGHT_CODE_MAX * np.float64(self.weight_scale))
        w = fake_quant(tf.constant(np.full((*self.size, channels, 1), value, np.float32)), -limit, limit, narrow_range=True)
        y = tf.nn.depthwise_conv2d(x, w, strides=(1, 1, 1, 1), padding="VALID")
        y = tf.nn.bias_add(y, tf.constant(np.full(channels, self.bias, np.float32)))
        y = fake_quant(y, *ActivationPoint(self.output_grid).window)
        return tf.reshape(y, (-1, channels))


def _xnnpack_requantize(acc, input_scale, weight_scale, output_scale):
    """XNNPACK's int8 rescale of int32 accumulators: float32 product with a float32 scale, rounded to nearest even."""
    scale = np.float32(np.float32(np.float32(input_scale) * np.float32(weight_scale)) / np.float32(output_scale))
    return np.rint(acc.astype(np.float32) * scale).astype(np.int64)


def _builtin_requantize(acc, multiplier):
    """TFLite's built-in kernels' rescale (``MultiplyByQuantizedMultiplier``) of int64 ``acc`` by a float64 ``multiplier``.

    ``QuantizeMultiplier`` writes ``multiplier = q * 2**shift`` with a 31-bit ``q``; gemmlowp's
    ``SaturatingRoundingDoublingHighMul`` rounds ``acc * 2**max(shift, 0) * q / 2**31`` (ties
    up), then ``RoundingDivideByPOT`` divides by ``2**-shift`` for a negative shift, rounding
    again (ties away from zero).
    """
    mantissa, shift = np.frexp(np.float64(multiplier))
    q = int(np.floor(mantissa * 2.0**31 + 0.5))
    if q == 2**31:
        q, shift = q // 2, shift + 1
    if shift < -31:
        return np.zeros_like(acc)
    x = acc * (1 << max(int(shift), 0)) * q
    nudged = x + np.where(x >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))  # C++ division: toward zero
    right = max(-int(shift), 0)
    mask = (1 << right) - 1
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + ((high & mask) > threshold)


def _accumulator_unit(k, input_grid, channel_scale):
    """Real value of one int32 accumulator unit per channel, in the float32 scales the file stores."""
    weight_scale = (channel_scale.astype(np.float64) / k).astype(np.float32).astype(np.float64)
    return _file_scale(input_grid) * weight_scale


def _fit_bias(k, input_grid, channel_scale, bias, output, reach, density):
    """The int32 bias per channel that keeps the most rounding thresholds of ``output`` (see ``WeightedPoint.tune``).

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


def threshold_counts(steps, thresholds):
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
    """The scale TFLite stores for a tensor pinned to ``grid`` by :class:`ActivationPoint` (float64 value)."""
    low, high, _ = grid.int8_window()
    s = grid.scale
    return np.float64(np.float32((np.float64(np.float32(high * s)) - np.float64(np.float32(low * s))) / 255.0))


def batchnorm_as_depthwise(gain, offset, x):
    """An inference BN ``gain * x + offset`` on a 4-D tensor as a 1x1 depthwise conv with bias.

    One op, into which the converter fuses a following ReLU. The weights stay
    float: the int8 converter quantizes them per channel.
    """
    w = tf.constant(gain.reshape(1, 1, len(gain), 1))
    y = tf.nn.depthwise_conv2d(x, w, strides=(1, 1, 1, 1), padding="VALID")
    return tf.nn.bias_add(y, tf.constant(offset))


def constant_pool(pool, x, weight, integer):
    """A valid pooling window as a depthwise conv whose weights all equal ``weight`` (int8: code 127, one scale).

    ``weight`` 1 sums the window (pooled-first convs), ``1 / area`` averages it (the "speed" layout).
    """
    w = tf.constant(np.full((*pool.pool_size, int(x.shape[-1]), 1), weight, np.float32))
    if integer:
        w = fake_quant(w, np.float32(-weight), np.float32(weight), narrow_range=True)
    return tf.nn.depthwise_conv2d(x, w, strides=(1, *pool.strides, 1), padding="VALID")


def _bn_parameters(bn, channels):
    def weight_or(value, default):
        return np.asarray(value.numpy(), np.float64) if value is not None else np.full(channels, default)

    return (
        weight_or(bn.gamma, 1.0),
        weight_or(bn.beta, 0.0),
        weight_or(bn.moving_mean, 0.0),
        weight_or(bn.moving_variance, 1.0),
    )


def bn_affine(bn, channels):
    """An inference BN as ``gain * x + offset`` per channel (float64 arrays).

    An :class:`~tfqkd.quant.layers.IntegerBatchNormalization` gives the map it computes: the offset
    on the int32 bias grid of its depthwise lowering.
    """
    step = bn.input_step() if isinstance(bn, IntegerBatchNormalization) else None
    if step is not None:
        gain, offset = bn.integer_affine(step)
        return np.asarray(gain.numpy(), np.float64), np.asarray(offset.numpy(), np.float64)
    gamma, beta, mean, var = _bn_parameters(bn, channels)
    gain = gamma / np.sqrt(var + bn.epsilon)
    return gain, beta - mean * gain


def bn_gain_codes(bn):
    """The per-channel weight codes of an :class:`IntegerBatchNormalization`'s gain in the file (None: 127 each)."""
    step = bn.input_step() if isinstance(bn, IntegerBatchNormalization) else None
    if step is None:
        return None
    return np.asarray(bn.gain_codes(step).numpy(), np.float64)


def channels_last(bn):
    """Whether a BatchNormalization normalizes the last axis of a 4-D (NHWC) tensor only."""
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    return axis in (-1, 3)
