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
and a power of the stored codes are fitted to that grid
(:meth:`tfqkd.export.integer_points.WeightedPoint.tune`): the file computes the
Keras model's hidden codes exactly in integer arithmetic where a bias can (all
thresholds of 4-bit outputs but a few in a hundred channels) and on both XNNPACK
and the built-in kernels. What each point computes lives in
:mod:`tfqkd.export.integer_points`; this module lowers the graph.

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
on XNNPACK's 8-bit fixed-point multiplier and moves codes), a 1x1 conv ->
average pool is one convolution with the pool's window and stride, rounded
once, and a global average pool into a quantizer is one depthwise conv over
the whole map (the converter's MEAN moves codes on TFLite's built-in
kernels). The Keras side puts each BN offset on its lowering's bias grid
(IntegerBatchNormalization) and sums integer codes in its convs.

Two runtimes, one file: XNNPACK (LiteRT) requantizes with one float32
rounding, TFLite's built-in kernels (tflite-runtime) with gemmlowp's two
roundings where the multiplier is below 0.5. The BN and requantization ops
store their gain at a weight code that makes the multiplier >= 0.5 where the
scales allow it, and their biases are fitted on both runtimes' arithmetic.
A conv whose output is rounded onto an 8-bit grid keeps a multiplier below
0.5 (its weight codes are the trained ones), so the built-in kernels still
move ~0.02-2% of those codes by one, and the errors add up over a densenet21
(measured figures per runtime: benchmarks/results/int8_fidelity.json).
"""

import numpy as np

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.export.integer_points import (
    OUTPUT_MARGIN, ActivationPoint, ChannelAffine, GlobalMean, WeightedPoint, activation_grid, batchnorm_as_depthwise, bn_affine,
    channels_last, constant_pool, fake_quant, threshold_counts, weight_codes,
)  # fmt: skip
from tfqkd.graph import as_functional, grid_source, is_plain_relu, producer, tensor_consumers
from tfqkd.io import UNSAFE_LAYER_TYPES
from tfqkd.quant.grid import Grid
from tfqkd.quant.layers import QActivation, QConv2D, QDense, QDepthwiseConv2D
from tfqkd.quant.quantizers import TfqkdQuantizer

__all__ = ["LAYOUTS", "Grid", "IntegerGraph", "activation_grid", "weight_codes"]

#: Graph layouts. "speed": every unfolded BatchNormalization and every valid
#: average pool becomes a DEPTHWISE_CONV_2D (int8 MUL/ADD and AVERAGE_POOL_2D
#: run 1.3-23x slower than their float versions under XNNPACK on x86, which
#: runs int8 depthwise convs well); "compact": the converter's MUL/ADD and
#: AVERAGE_POOL_2D, a smaller file (no per-channel parameters for the BNs).
LAYOUTS = ("speed", "compact")

_FOLDABLE_PRODUCERS = (QConv2D,)


class _Reusable:
    """A computed tensor that Keras' ``Node.map_arguments`` may ``pop()`` any number of times."""

    def __init__(self, value):
        self.value = value

    def pop(self):
        return self.value


def _feeds_add(layer, consumers):
    """Whether ``layer``'s output reaches a keras Add layer, directly or through a plain ReLU."""
    users = consumers.get(id(layer.output), [])
    relus = [u for u in users if is_plain_relu(u)]
    users = users + [v for relu in relus for v in consumers.get(id(relu.output), [])]
    return any(isinstance(u, keras.layers.Add) for u in users)


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
      rounded_add_inputs: layers whose float output a residual Add sums in the
        Keras model and the int8 model rounds onto calibrated 8-bit grids first
        (empty for a model quantized with ``integer_intermediates``).
    """

    def __init__(self, model, unsafe=False, layout="speed"):
        if layout not in LAYOUTS:
            raise TfqkdError(f"unknown TFLite layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        self.layout = layout
        model = as_functional(model, "TFLite export")
        # The step of the int8 logits a float head replaced (tflite.convert(logits="float")), else None.
        self.int8_logit_step = None
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
        consumers = tensor_consumers(self.model, through_identity=True)  # the inference graph: no Dropout
        for layer in model.layers:
            if isinstance(layer, QActivation):
                if not isinstance(layer.quantizer, TfqkdQuantizer):
                    raise TfqkdError(
                        f"layer '{layer.name}': QKeras quantizer {layer.quantizer} is not a tfqkd quantizer; only "
                        "models made by tfqkd.quantize() can be exported with their trained grid"
                    )
                point = ActivationPoint(activation_grid(layer.quantizer, layer.name))
                self.points[layer.name] = point
                self.activation_grids[layer.name] = point.grid
            elif isinstance(layer, (QConv2D, QDepthwiseConv2D, QDense)):
                bn = self._foldable_bn(layer, consumers)
                self.points[layer.name] = WeightedPoint(layer, bn)
                self.weight_grids[layer.name] = (self.points[layer.name].step, None if bn is None else bn.name)
                if bn is not None:
                    self._identity.add(bn.name)
            elif type(layer).__module__.startswith("qkeras"):
                raise TfqkdError(f"layer '{layer.name}': QKeras layer {type(layer).__name__} is not supported by the exporter")
        self.channel_affines = self._exact_batchnorms(consumers)
        self.requantizations = self._requantizations()
        self.global_means = self._global_means(consumers)
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
        # Before anything reads range_layers: it adds the joined tensors that had no range.
        self.shared_ranges = self._shared_range_groups()
        self.rounded_add_inputs = [name for name in self.range_layers if _feeds_add(model.get_layer(name), consumers)]

    def code_multipliers(self):
        """``{layer name: k}``: the int8 file stores each weighted layer's trained codes times ``k``."""
        return {name: p.code_multiplier for name, p in self.points.items() if isinstance(p, WeightedPoint)}

    def _tune_weighted(self, consumers):
        """Fits each weighted layer's int8 weights and int32 bias to the grid its output is rounded onto."""
        for layer in self.model.layers:
            point = self.points.get(layer.name)
            if not isinstance(point, WeightedPoint):
                continue
            source = producer(layer.input)
            input_grid = self.activation_grids.get(source.name)
            if layer.name in self.pooled_first:
                point.pooled_multiplier(int(np.prod(self.pooled_first[layer.name][0].pool_size)), input_grid)
                continue
            output = None
            activation = getattr(layer, "activation", None)
            own_relu = activation is keras.activations.relu
            plain = activation is None or activation is keras.activations.linear or own_relu
            if layer.name in self.concat_windows:
                if plain and not own_relu:
                    output = (self.activation_grids[self.concat_windows[layer.name]], False)
            elif plain:
                users = consumers.get(id(layer.output), [])
                if len(users) == 1 and users[0].name in self._identity:
                    users = consumers.get(id(users[0].output), [])
                relu = own_relu
                if not relu and len(users) == 1 and is_plain_relu(users[0]):
                    relu = True
                    users = consumers.get(id(users[0].output), [])
                grid = self._shared_grid(users)
                if grid is not None:
                    output = (grid, relu)
            point.tune(input_grid, output)
            if output is not None and input_grid is not None:
                # The tensor before the ReLU and the rounding: calibration data weights its thresholds.
                before = layer
                following = consumers.get(id(layer.output), [])
                if len(following) == 1 and following[0].name in self._identity:
                    before = following[0]
                self._tuned[layer.name] = (input_grid, output, before.name)

    def _shared_grid(self, layers):
        """The trained grid of ``layers`` when they are all activation quantizers on one grid, else None."""
        if not layers or not all(isinstance(q, QActivation) and q.name in self.activation_grids for q in layers):
            return None
        if len({repr(self.activation_grids[q.name].as_dict()) for q in layers}) != 1:
            return None
        return self.activation_grids[layers[0].name]

    def _exact_batchnorms(self, consumers):
        """Unfolded BNs whose input is an activation quantizer's output and whose output feeds only
        activation quantizers of one grid, through a ReLU or straight (``integer_intermediates``)."""
        found = {}
        for layer in self.model.layers:
            if not isinstance(layer, keras.layers.BatchNormalization) or layer.name in self._identity:
                continue
            shape = layer.input.shape
            if shape.rank != 4 or not channels_last(layer):
                continue
            source = producer(layer.input)
            if source.name not in self.activation_grids:
                continue
            users = consumers.get(id(layer.output), [])
            relu = len(users) == 1 and is_plain_relu(users[0])
            target = self._shared_grid(consumers.get(id(users[0].output), []) if relu else users)
            if target is None:
                continue
            found[layer.name] = ChannelAffine.batchnorm(
                layer, int(shape[-1]), self.activation_grids[source.name], target, relu=relu
            )
        return found

    def _requantizations(self):
        """Activation quantizers reading another trained grid, straight or through plain ReLUs and
        Dropouts (after a residual Add, ``integer_intermediates``): ``{quantizer name: ChannelAffine}``, exact where
        the converter's QUANTIZE is not (see :class:`ChannelAffine`)."""
        found = {}
        for layer in self.model.layers:
            if layer.name not in self.activation_grids or len(layer._inbound_nodes) != 1 or layer.input.shape.rank != 4:
                continue
            source = grid_source(producer(layer.input))
            grid = self.activation_grids.get(getattr(source, "name", None))
            target = self.activation_grids[layer.name]
            if grid is not None and grid.as_dict() != target.as_dict():
                found[layer.name] = ChannelAffine.requantization(int(layer.input.shape[-1]), grid, target)
        return found

    def _global_means(self, consumers):
        """Global average pools of a trained int8 grid whose output feeds one activation quantizer
        (the head of an ``integer_intermediates`` DenseNet): ``{pool name: GlobalMean}``."""
        found = {}
        for layer in self.model.layers:
            if type(layer) is not keras.layers.GlobalAveragePooling2D or layer.data_format != "channels_last":
                continue
            if getattr(layer, "keepdims", False) or layer.input.shape.rank != 4 or None in layer.input.shape[1:3]:
                continue
            source = grid_source(producer(layer.input))  # after a ReLU: a residual Add's quantized output
            users = consumers.get(id(layer.output), [])
            if getattr(source, "name", None) not in self.activation_grids or len(users) != 1 or users[0].name not in self.activation_grids:
                continue
            found[layer.name] = GlobalMean(
                layer.input.shape[1:3], self.activation_grids[source.name], self.activation_grids[users[0].name]
            )
        return found

    def _pooled_first(self, consumers):
        """1x1 convs followed by a 2-D average pool whose output feeds one activation quantizer.

        Both are linear, so the pair is one convolution with the pool's window
        and stride whose weights are the 1x1 weights divided by the pool area
        (same codes, smaller step): its int32 accumulator sums the window
        exactly, and the result is rounded once, onto the quantizer's grid, as
        the Keras model rounds the pooled float values. Returns
        ``{conv name: (pool layer, quantizer name)}``.
        """
        found = {}
        for layer in self.model.layers:
            point = self.points.get(layer.name)
            if not isinstance(point, WeightedPoint) or point.folded or not isinstance(layer, QConv2D):
                continue
            if tuple(layer.kernel_size) != (1, 1) or tuple(layer.strides) != (1, 1) or tuple(layer.dilation_rate) != (1, 1):
                continue
            activation = getattr(layer, "activation", None)
            if activation is not None and activation is not keras.activations.linear:
                continue
            source = producer(layer.input)
            if source.name not in self.activation_grids:
                continue
            users = consumers.get(id(layer.output), [])
            if len(users) != 1 or not isinstance(users[0], keras.layers.AveragePooling2D):
                continue
            pool = users[0]
            if tuple(pool.pool_size) != tuple(pool.strides) or pool.padding != "valid":
                continue
            after = consumers.get(id(pool.output), [])
            if len(after) != 1 or after[0].name not in self.activation_grids:
                continue
            found[layer.name] = (pool, after[0].name)
        return found

    def _concat_windows(self, consumers):
        """Weighted layers whose output goes only into a Concatenate (or a pooling layer, which
        keeps the scale) whose output goes only into an activation quantizer: they are
        requantized straight onto that quantizer's grid."""
        found = {}
        for layer in self.model.layers:
            if not isinstance(self.points.get(layer.name), WeightedPoint):
                continue
            users = consumers.get(id(layer.output), [])
            joins = (keras.layers.Concatenate, keras.layers.AveragePooling2D, keras.layers.MaxPooling2D)
            if layer.name in self.pooled_first or len(users) != 1 or not isinstance(users[0], joins):
                continue
            after = consumers.get(id(users[0].output), [])
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
                source = producer(layer.input)
                if isinstance(source, (keras.layers.Conv2D, keras.layers.Dense)) and len(
                    consumers.get(id(source.output), [])
                ) == 1:
                    continue  # the converter folds it into the conv's weights and bias
                if layer.input.shape.rank == 4 and channels_last(layer):
                    gain, offset = bn_affine(layer, int(layer.input.shape[-1]))
                    bns[layer.name] = (gain.astype(np.float32), offset.astype(np.float32))
            elif (
                type(layer) is keras.layers.AveragePooling2D
                and layer.padding == "valid"
                and layer.data_format == "channels_last"
            ):
                users = consumers.get(id(layer.output), [])
                target = users[0].name if len(users) == 1 and users[0].name in self.activation_grids else None
                pools[layer.name] = target
        return bns, pools

    def _concat_requantizations(self, consumers):
        """Concat inputs on a trained grid other than the grid of the quantizer after the concat.

        In the Keras model such an input is rounded twice (its own quantizer,
        then the concat's); the int8 graph must repeat that second rounding
        exactly, which the converter's QUANTIZE does not do under XNNPACK
        (see :class:`ChannelAffine`). Returns ``{concat name: {input index:
        ChannelAffine}}``.
        """
        found = {}
        for layer in self.model.layers:
            if not isinstance(layer, keras.layers.Concatenate) or layer.axis not in (-1, 3):
                continue
            target = self._shared_grid(consumers.get(id(layer.output), []))
            if target is None:
                continue
            inputs = {}
            for index, tensor in enumerate(layer.input):
                source = producer(tensor).name
                grid = self.activation_grids.get(source)
                if tensor.shape.rank != 4 or grid is None or grid.as_dict() == target.as_dict():
                    continue
                inputs[index] = ChannelAffine.requantization(int(tensor.shape[-1]), grid, target)
            if inputs:
                found[layer.name] = inputs
        return found

    def _shared_range_groups(self):
        """Groups of :attr:`range_layers` whose tensors a Concatenate (or a pool) joins: one range each.

        TFLite's CONCATENATION, MAX_POOL_2D and AVERAGE_POOL_2D compute on one scale. Joined
        tensors calibrated to different ranges are requantized by the converter with QUANTIZE:
        a rounding the Keras model (float there) does not have, which XNNPACK computes with an
        8-bit multiplier and TFLite's built-in kernels with a 31-bit one, so the runtimes
        disagreed by a code on many requantized values (the README student's file: outputs up to
        8 steps apart between them, TensorFlow's own file 5). The converter, calibrating a float
        model itself, gives a DenseNet's concat chain one scale; so does this: each group gets
        the union of its calibrated ranges. A joined tensor without a range of its own (a pool
        lowered as a depthwise conv) gets one here, so the union covers its values too.
        """
        joins = (keras.layers.Concatenate, keras.layers.MaxPooling2D) + (
            (keras.layers.AveragePooling2D,) if self.layout == "compact" else ()
        )
        on_grid = set(self.activation_grids) | set(self.concat_windows) | self._pool_identity
        parent = {}

        def root(name):
            while parent.get(name, name) != name:
                name = parent[name]
            return name

        def join(a, b):
            parent[root(a)] = root(b)

        for layer in self.model.layers:
            if not isinstance(layer, joins):
                continue
            for tensor in tf.nest.flatten(layer.input):
                source = producer(tensor)
                if is_plain_relu(source) and producer(source.input).name in self.range_layers:
                    source = producer(source.input)
                if isinstance(source, joins) or source.name in self.range_layers:
                    join(source.name, layer.name)
                elif source.name not in on_grid and not isinstance(source, keras.layers.InputLayer):
                    self.range_layers.append(source.name)
                    join(source.name, layer.name)
        groups = {}
        for name in self.range_layers:
            groups.setdefault(root(name), []).append(name)
        return [group for group in groups.values() if len(group) > 1]

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
            if layer.name not in self.points or not isinstance(self.points[layer.name], WeightedPoint):
                continue
            last = layer
            users = consumers.get(id(layer.output), [])
            if len(users) == 1 and users[0].name in self._identity:
                last = users[0]
                users = consumers.get(id(last.output), [])
            if len(users) == 1 and is_plain_relu(users[0]):
                users = consumers.get(id(users[0].output), [])
            if users and all(isinstance(u, QActivation) for u in users):
                continue
            names.append(last.name)
        out_layer = producer(self.model.outputs[0])
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
                counts = threshold_counts(steps.reshape(-1, steps.shape[-1]), point.output_thresholds)
                density[i] = counts if density[i] is None else density[i] + counts
        for (name, (input_grid, output, _)), counts in zip(tuned, density):
            self.points[name].tune(input_grid, output, density=counts)
        out_name = producer(self.model.outputs[0]).name
        for group in self.shared_ranges:
            members = [self.range_layers.index(name) for name in group]
            lows[members], highs[members] = lows[members].min(), highs[members].max()
        for name, lo, hi in zip(self.range_layers, lows, highs):
            if name == out_name:
                # Logits of unseen inputs exceed the calibration extremes more often than
                # hidden features, and a clipped top logit can tie with the runner-up.
                margin = OUTPUT_MARGIN * (hi - lo)
                lo, hi = (lo - margin if lo < 0 else lo), hi + margin
            if hi - lo < 1e-6:
                hi = lo + 1e-6
            self.output_ranges[name] = (np.float32(lo), np.float32(hi))

    def _foldable_bn(self, layer, consumers):
        # Fold only when the conv's output feeds nothing but the BN and the conv has no activation of its own.
        if not isinstance(layer, _FOLDABLE_PRODUCERS):
            return None
        activation = getattr(layer, "activation", None)
        if activation is not None and activation is not keras.activations.linear:
            return None
        users = consumers.get(id(layer.output), [])
        if len(users) != 1 or not isinstance(users[0], keras.layers.BatchNormalization):
            return None
        bn = users[0]
        return bn if channels_last(bn) else None

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
                elif integer and layer.name in self.global_means:
                    outputs = self.global_means[layer.name](args[0])
                elif integer and layer.name in self.pooled_first:
                    pool, target = self.pooled_first[layer.name]
                    outputs = self.points[layer.name].pooled(args[0], pool)
                    outputs = fake_quant(outputs, *self.points[target].window)
                elif integer and layer.name in self.concat_windows:
                    outputs = self.points[layer.name](args[0], integer)
                    outputs = fake_quant(outputs, *self.points[self.concat_windows[layer.name]].window)
                elif layer.name in self._depthwise_batchnorms:
                    outputs = batchnorm_as_depthwise(*self._depthwise_batchnorms[layer.name], args[0])
                elif layer.name in self._depthwise_pools:
                    outputs = constant_pool(layer, args[0], 1.0 / int(np.prod(layer.pool_size)), integer)
                    target = self._depthwise_pools[layer.name]
                    if integer and target is not None:
                        outputs = fake_quant(outputs, *self.points[target].window)
                elif layer.name in self.points:
                    point = self.points[layer.name]
                    if isinstance(point, ActivationPoint):
                        if integer and layer.name in self.requantizations:
                            args = (self.requantizations[layer.name](args[0]), *args[1:])  # then the code clip
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
                    outputs = fake_quant(outputs, low, high)
                for x_id, y in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                    tensor_dict[x_id] = _Reusable(y)
        return tensor_dict[str(id(model.outputs[0]))].value
