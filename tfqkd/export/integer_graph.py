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

Tensors the trained model keeps in float (BatchNormalization, Add,
Concatenate, pooling and logits) get 8-bit scales from the converter's
calibration with a representative dataset.
"""

import numpy as np

from tfqkd._keras import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.io import UNSAFE_LAYER_TYPES
from tfqkd.quant.layers import QActivation, QConv2D, QDense, QDepthwiseConv2D
from tfqkd.quant.quantizers import AffineQuantizer, LearnedStepQuantizer, Pof2Quantizer, TfqkdQuantizer

__all__ = ["Grid", "IntegerGraph", "activation_grid", "weight_codes"]

# Largest magnitude of a TFLite int8 weight code: weights are symmetric narrow-range [-127, 127].
_WEIGHT_CODE_MAX = 127
_FOLDABLE_PRODUCERS = (QConv2D,)
# Widening of the calibrated logit range, as a fraction of its span.
_OUTPUT_MARGIN = 0.1


class Grid:
    """A uniform quantization grid: ``real = (code - zero) * scale``, ``code`` in ``[qmin, qmax]``.

    Args:
      scale: the step (float).
      zero: the integer code of real zero.
      qmin, qmax: the inclusive code range.
    """

    def __init__(self, scale, zero, qmin, qmax):
        self.scale = float(scale)
        self.zero = int(zero)
        self.qmin = int(qmin)
        self.qmax = int(qmax)

    @property
    def levels(self):
        """Number of codes."""
        return self.qmax - self.qmin + 1

    def as_dict(self):
        return {"scale": self.scale, "zero": self.zero, "qmin": self.qmin, "qmax": self.qmax}

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


def _scalar(variable):
    return float(np.asarray(variable).reshape(-1)[0])


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
    if isinstance(quantizer, LearnedStepQuantizer):
        # The forward pass uses max(step, 1e-8); mirror it.
        grid = Grid(max(_scalar(quantizer.step.numpy()), 1e-8), 0, quantizer.qmin, quantizer.qmax)
    elif isinstance(quantizer, AffineQuantizer):
        if not quantizer.running:
            raise TfqkdError(
                f"layer '{layer_name}': an affine activation quantizer without running min/max has a "
                "data-dependent scale per batch, which a TFLite int8 tensor cannot represent"
            )
        lo = tf.constant(_scalar(quantizer.variable("min").numpy()), tf.float32)
        hi = tf.constant(_scalar(quantizer.variable("max").numpy()), tf.float32)
        scale, zero = quantizer.scale_and_zero_point(lo, hi)
        grid = Grid(float(scale.numpy()), int(zero.numpy()), quantizer.qmin, quantizer.qmax)
    elif isinstance(quantizer, Pof2Quantizer):
        if not quantizer.running:
            raise TfqkdError(
                f"layer '{layer_name}': a power-of-two activation quantizer without a running maximum has a "
                "data-dependent scale per batch, which a TFLite int8 tensor cannot represent"
            )
        pos = float(quantizer.position_for(quantizer.variable("absmax")[0]).numpy())
        grid = Grid(2.0**-pos, 0, quantizer.qmin, quantizer.qmax)
    else:
        raise TfqkdError(f"layer '{layer_name}': unsupported activation quantizer {type(quantizer).__name__}")
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
    fake = quantizer(tf.convert_to_tensor(weight), training=False).numpy().astype(np.float64)
    w = np.asarray(weight, dtype=np.float32)
    if isinstance(quantizer, LearnedStepQuantizer):
        scale = max(_scalar(quantizer.step.numpy()), 1e-8)
    elif isinstance(quantizer, AffineQuantizer):
        s, _ = quantizer.scale_and_zero_point(tf.reduce_min(w), tf.reduce_max(w))
        scale = float(s.numpy())
    elif isinstance(quantizer, Pof2Quantizer):
        scale = 2.0 ** -float(quantizer.position_for(tf.reduce_max(tf.abs(w))).numpy())
    else:
        raise TfqkdError(f"layer '{layer_name}': unsupported weight quantizer {type(quantizer).__name__}")
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

    def _weights(self, integer):
        values = (self.weight_codes.astype(np.float64) * self.channel_scale.astype(np.float64)).astype(np.float32)
        w = tf.constant(values)
        if not integer:
            return w
        if self.folded:
            limit = (_WEIGHT_CODE_MAX * self.channel_scale.astype(np.float64)).astype(np.float32)
            return tf.quantization.fake_quant_with_min_max_vars_per_channel(
                w, min=-limit, max=limit, num_bits=8, narrow_range=True
            )
        limit = np.float32(_WEIGHT_CODE_MAX * self.step)
        return _fake_quant(w, -limit, limit, narrow_range=True)

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
            y = tf.nn.bias_add(y, tf.constant(self.bias))
        activation = getattr(layer, "activation", None)
        if activation is not None and activation is not keras.activations.linear:
            y = activation(y)
        return y


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


class IntegerGraph:
    """The exportable twin of a quantized (or float) functional Keras model.

    Args:
      model: a functional Keras model, typically from :func:`tfqkd.quantize`.
      unsafe: allow Lambda layers (their code runs while tracing).

    Attributes:
      activation_grids: dict QActivation name -> :class:`Grid` (the trained
        activation scales, which the int8 export keeps).
      weight_grids: dict layer name -> (step, folded BN name or None).
    """

    def __init__(self, model, unsafe=False):
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
        self.range_layers = self._layers_needing_ranges(consumers)

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
        if not self.range_layers:
            return
        outputs = [self.model.get_layer(name).output for name in self.range_layers]
        probe = keras.Model(self.model.inputs, outputs)
        lows = np.zeros(len(outputs))
        highs = np.zeros(len(outputs))
        for batch in batches:
            values = probe(batch, training=False)
            values = values if isinstance(values, (list, tuple)) else [values]
            for i, v in enumerate(values):
                lows[i] = min(lows[i], float(tf.reduce_min(v)))
                highs[i] = max(highs[i], float(tf.reduce_max(v)))
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
        axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
        if axis not in (-1, 3):
            return None
        return bn

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
                if layer.name in self._identity:
                    outputs = args[0]
                elif layer.name in self.points:
                    point = self.points[layer.name]
                    if isinstance(point, _ActivationPoint):
                        outputs = point.integer(args[0]) if integer else point.emulate(args[0])
                    else:
                        outputs = point(args[0], integer)
                else:
                    if "training" in layer._call_spec.arg_names:
                        kwargs = {**kwargs, "training": False}
                    outputs = layer(*args, **kwargs)
                if integer and layer.name in self.output_ranges:
                    low, high = self.output_ranges[layer.name]
                    outputs = _fake_quant(outputs, low, high)
                for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    tensor_dict[x_id] = _Reusable(y)
        return tensor_dict[str(id(model.outputs[0]))].value
