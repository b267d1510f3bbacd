"""QKeras layers whose quantizers keep their state in Keras weights.

These subclass QKeras' ``QConv2D``, ``QDepthwiseConv2D``, ``QDense`` and
``QActivation`` and keep their class names, so they *are* QKeras layers to
``isinstance`` checks, ``print_qstats``, QTools and hls4ml. They add three
things QKeras 0.9 lacks for trainable quantizers:

* ``build`` creates each tfqkd quantizer's state (learned steps, running
  ranges, DPU positions) with ``add_weight``, so it is trained, saved in .h5 /
  .keras files, restored and mirrored by tf.distribute like any weight;
* ``QActivation`` passes ``training`` to its quantizer (running statistics
  update only while training) and serializes the quantizer object;
* the float weights are left unconstrained: QKeras would otherwise clip
  kernels to ``[-1, 1]`` and re-scale initializers, which changes the float
  model being quantized.
"""

import contextlib
import functools
import math
import weakref

import numpy as np

import qkeras

from tfqkd.compat import keras, tf
from tfqkd.graph import grid_source, is_inference_identity, is_plain_relu, producer, single_producer
from tfqkd.quant.quantizers import LearnedStepQuantizer, TfqkdQuantizer, get_quantizer, odd_ratio, odd_ratio_parts

__all__ = [
    "INPUT_QUANTIZER_SUFFIX", "IntegerBatchNormalization", "QActivation", "QConv2D", "QDense", "QDepthwiseConv2D", "input_quantizer_of", "layer_quantizers",
    "model_quantizers", "quantized_layer_classes", "weight_quantizers",
]  # fmt: skip

#: Suffix of the QActivation ``quantize()`` puts in front of a layer to quantize its input.
INPUT_QUANTIZER_SUFFIX = "_qin"


def _resolve_quantizers(kwargs, keys=("kernel_quantizer", "bias_quantizer", "depthwise_quantizer")):
    """Deserializes tfqkd quantizers before QKeras sees them (it only knows its own)."""
    for key in keys:
        if isinstance(kwargs.get(key), dict):
            kwargs[key] = get_quantizer(kwargs[key])
    return kwargs


def _build_quantizer(layer, quantizer, role, shape):
    if isinstance(quantizer, TfqkdQuantizer):
        quantizer.build_variables(layer, role, shape)


#: (attribute holding a weight quantizer, the weight it quantizes, role in state names).
WEIGHT_SLOTS = (
    ("kernel_quantizer_internal", "kernel", "kernel"),
    ("depthwise_quantizer_internal", "depthwise_kernel", "depthwise"),
    ("bias_quantizer_internal", "bias", "bias"),
)


class _WeightQuantizedMixin:
    """Shared by the conv and dense layers: build state, drop QKeras' clipping, serialize quantizers."""

    #: (attribute holding the weight quantizer, name of the weight, role).
    _weight_roles = (("kernel_quantizer_internal", "kernel", "kernel"),)
    def get_config(self):
        # QKeras writes quantizers with keras.constraints.serialize(), which warns
        # on every save that they are not Constraints. Hide them from QKeras'
        # get_config (bypassing Keras' attribute tracking) and serialize them as
        # the Keras objects they are.
        held = {attr: getattr(self, attr) for attr, _, _ in WEIGHT_SLOTS if getattr(self, attr, None) is not None}
        for attr in held:
            object.__setattr__(self, attr, None)
        try:
            config = super().get_config()
        finally:
            for attr, quantizer in held.items():
                object.__setattr__(self, attr, quantizer)
        for attr, quantizer in held.items():
            config[config_key(attr)] = keras.utils.serialize_keras_object(quantizer)
        return config

    def _restore_float_behaviour(self, kernel_initializer, kernel_constraint, bias_constraint):
        init_attr = "depthwise_initializer" if hasattr(self, "depthwise_initializer") else "kernel_initializer"
        constraint_attr = "depthwise_constraint" if hasattr(self, "depthwise_constraint") else "kernel_constraint"
        setattr(self, init_attr, keras.initializers.get(kernel_initializer))
        setattr(self, constraint_attr, keras.constraints.get(kernel_constraint))
        self.bias_constraint = keras.constraints.get(bias_constraint)

    def set_weights(self, weights):
        """Like Keras' ``set_weights``, but a list of only the float weights
        (kernel, bias) keeps the quantizer state: QKeras' tools
        (``model_save_quantized_weights``, used by ``print_qstats``) pass that."""
        current = self.get_weights()
        if len(weights) < len(current):
            weights = list(weights) + current[len(weights) :]
        super().set_weights(weights)

    def build(self, input_shape):
        # Keras builds layers restored by from_config() outside their name scope,
        # which leaves weights named "kernel:0"; inside a nested model saved to
        # .h5 those names collide. Scope them as a functional call would.
        scope = tf.name_scope(self.name) if not tf.get_current_name_scope() else contextlib.nullcontext()
        with scope:
            super().build(input_shape)
            for attr, weight, role in self._weight_roles:
                _build_quantizer(self, getattr(self, attr), role, getattr(self, weight).shape)
            if self.use_bias:
                _build_quantizer(self, self.bias_quantizer_internal, "bias", self.bias.shape)


def _learned_quantizer(layer):
    """The quantizer of ``layer`` if it is a learned-step QActivation (in the current parametrization), else None."""
    quantizer = getattr(layer, "quantizer", None)
    if not isinstance(layer, QActivation) or not isinstance(quantizer, LearnedStepQuantizer) or quantizer.legacy_linear:
        return None
    return quantizer


def _learned_input_quantizer(layer):
    """The learned-step quantizer of the QActivation whose output ``layer`` reads, or None."""
    if len(getattr(layer, "_inbound_nodes", [])) != 1:
        return None  # a shared layer reads more than one tensor
    return _learned_quantizer(single_producer(layer))


def _single_consumer(layer):
    """The one layer reading ``layer``'s output at inference (through a Dropout), or None (none yet, or several)."""
    consumers = {id(node.layer): node.layer for node in getattr(layer, "_outbound_nodes", [])}
    consumer = next(iter(consumers.values())) if len(consumers) == 1 else None
    return _single_consumer(consumer) if is_inference_identity(consumer) else consumer


def _reader_after_relu(layer):
    """:func:`_single_consumer` of ``layer``, or of the plain ReLU that is it."""
    consumer = _single_consumer(layer)
    return _single_consumer(consumer) if is_plain_relu(consumer) else consumer


def _rounding_quantizer(layer):
    """``(quantizer, area)``: the learned-step QActivation that rounds ``layer``'s output, straight or
    through a plain ReLU, a Concatenate or a non-overlapping average pool of ``area`` values; or None."""
    area, consumer = 1, _single_consumer(layer)
    if isinstance(consumer, keras.layers.Concatenate) or is_plain_relu(consumer):
        consumer = _single_consumer(consumer)
    elif isinstance(consumer, keras.layers.AveragePooling2D):
        if consumer.padding != "valid" or tuple(consumer.strides) != tuple(consumer.pool_size):
            return None
        area, consumer = int(np.prod(consumer.pool_size)), _single_consumer(consumer)
    quantizer = _learned_quantizer(consumer)
    return None if quantizer is None else (quantizer, area)


#: Smallest odd number over a power of two (``odd_ratio``) for a conv's ``area * s_out / (s_in * s_w)``:
#: the weight step moves by at most 1/8, and 4-bit weight codes stored times 18 make even the built-in
#: kernels' two roundings exact (``WeightedPoint.tune``).
_CONV_MIN_ODD = 8
#: ... for a requantization between two 8-bit grids or a BN's multiplier >= 0.5 (one rounding on every
#: runtime): the step or gain moves by at most 2/1024.
_REQUANTIZE_MIN_ODD = 1024
#: ... for one below 0.5 (one input code is ``2**j / k`` output steps, ``2**j <= 32``): with the value
#: stored at gain code ``w > 2**(j+1)`` (127 for a requantization, 96 = 3 * 32 for a BN, whose offset
#: must be a whole number ``w / 2**j`` of accumulator units), the built-in kernels' first rounding
#: (finer than the multiplier) cannot cross a threshold; the step or gain moves by at most 1/64.
_SPLIT_MIN_ODD = 64
_SPLIT_GAIN_CODE = 96


def _log_step(quantizer):
    return tf.cast(quantizer.effective_log_step(), tf.float64)


def _snap_conv_step(layer_ref, log_step):
    """The weak-referenced conv's kernel log step with ``area * s_out / (s_in * s_w)`` an odd number over a
    power of two (``odd_ratio``), or None while its graph does not show both grids."""
    layer = layer_ref()
    if layer is None or not layer.integer_accumulation:
        return None  # float sums (and a float bias) would move values off the lattice
    source, rounding = _learned_input_quantizer(layer), _rounding_quantizer(layer)
    if source is None or rounding is None:
        return None
    output, area = rounding
    log_span = math.log(area) + _log_step(output) - _log_step(source)
    return tf.cast(log_span - odd_ratio(log_span - tf.cast(log_step, tf.float64), _CONV_MIN_ODD), log_step.dtype)


def _requantized_grids(layer):
    """The learned grids whose codes the quantizer ``layer`` requantizes: those among a Concatenate's inputs,
    or the one learned-step QActivation it reads, straight or through plain ReLUs (a residual Add's output)."""
    source = single_producer(layer) if layer is not None else None
    if isinstance(source, keras.layers.Concatenate):
        return [q for q in (_learned_quantizer(producer(t)) for t in source.input) if q is not None]
    quantizer = _learned_quantizer(grid_source(source))
    return [] if quantizer is None else [quantizer]


def _snap_requantized_step(layer_ref, log_step):
    """The weak-referenced quantizer's log step with ``step / s_in`` an odd number over a power of two,
    ``s_in`` the one learned grid it requantizes (:func:`_requantized_grids`), or None."""
    grids = _requantized_grids(layer_ref())
    if len(grids) != 1:
        return None
    log_in = _log_step(grids[0])
    log_ratio = tf.cast(log_step, tf.float64) - log_in  # one input code is 1 / ratio steps
    snapped = tf.where(log_ratio > math.log(2.0), odd_ratio(log_ratio, _SPLIT_MIN_ODD), odd_ratio(log_ratio, _REQUANTIZE_MIN_ODD))
    return tf.cast(log_in + snapped, log_step.dtype)


def _snap_add_input(layer_ref, log_step):
    """The log step of the learned quantizer after the residual Add (and its ReLU) the weak-referenced quantizer
    feeds, or None.

    Both inputs of the Add and its sum then share one grid, and the int8 file's ADD adds their codes
    exactly (its multipliers are powers of two), as the Keras model does. Straight-through: this
    quantizer's own step keeps learning but is not used.
    """
    layer = layer_ref()
    adds = {id(node.layer): node.layer for node in getattr(layer, "_outbound_nodes", []) if isinstance(node.layer, keras.layers.Add)}
    if len(adds) != 1:
        return None
    quantizer = _learned_quantizer(_reader_after_relu(next(iter(adds.values()))))
    return None if quantizer is None else tf.cast(quantizer.effective_log_step(), log_step.dtype)


def _link_snap(layer, quantizer, snap):
    if layer.midway_thresholds and isinstance(quantizer, LearnedStepQuantizer) and not quantizer.power_of_two:
        quantizer.snap = functools.partial(snap, weakref.ref(layer))


class _IntegerAccumulationMixin:
    """``integer_accumulation``: at inference, the conv / depthwise conv / dense sums integer codes, as int8 does.

    Set by ``quantize(..., integer_intermediates=True)``. With a learned-step input and kernel, the
    layer computes ``(sum of input code * weight code) * s_in * s_w``: the float32 sum of integer
    codes is exact (below 2**24), so an output rounded by the next quantizer lands where the int8
    file's int32 accumulator and requantization put it, also when it sits within float32 error of
    a rounding threshold (the float sum of ``x * w`` puts such a value on either side, depending on
    the order of the sum). Training, and layers without those quantizers, compute QKeras' call.
    """

    def _pop_integer_accumulation(self, kwargs):
        self.integer_accumulation = bool(kwargs.pop("integer_accumulation", False))
        self.midway_thresholds = bool(kwargs.pop("midway_thresholds", False))
        return kwargs

    def _link_midway_step(self):
        """``midway_thresholds``: the learned kernel step keeps ``area * s_out / (s_in * s_w)`` an odd
        number over a power of two, so every rounding threshold of the output grid lies midway between
        two reachable integer sums (``odd_ratio``); the grids are read from the graph when used."""
        _link_snap(self, self._kernel_quantizer(), _snap_conv_step)

    def _kernel_quantizer(self):
        """The kernel's quantizer (a depthwise conv's depthwise kernel's)."""
        return getattr(self, self._weight_roles[0][0])

    def get_config(self):
        config = super().get_config()
        for flag in ("integer_accumulation", "midway_thresholds"):
            if getattr(self, flag):
                config[flag] = True
        return config

    def _integer_steps(self):
        """``(s_in, s_w)`` (float32 scalars) when this layer sums integer codes at inference, else None."""
        if not self.integer_accumulation or not isinstance(self._kernel_quantizer(), LearnedStepQuantizer):
            return None
        source = _learned_input_quantizer(self)
        if source is None:
            return None
        return source.step[0], self._kernel_quantizer().step[0]

    def inference_bias(self, steps=None):
        """The bias this layer adds at inference (None without one). With ``midway_thresholds`` and integer
        sums, a multiple of ``s_in * s_w``, so the sums stay on their lattice (``odd_ratio``); it moves
        by at most half that unit (1/16 of an output step), as an IntegerBatchNormalization's offset.

        ``steps``: :meth:`_integer_steps`, when the caller has them.
        """
        if not self.use_bias:
            return None
        bias = self.bias_quantizer_internal(self.bias) if self.bias_quantizer else tf.convert_to_tensor(self.bias)
        if not self.midway_thresholds:
            return bias
        steps = steps if steps is not None else self._integer_steps()
        if steps is None:
            return bias
        unit = tf.cast(steps[0] * steps[1], bias.dtype)
        return tf.round(bias / unit) * unit

    def call(self, inputs, training=None):
        steps = self._integer_steps() if training is not True else None
        if steps is None or training is None and keras.backend.learning_phase() == 1:
            return super().call(inputs)
        input_step, weight_step = (tf.cast(s, inputs.dtype) for s in steps)
        kernel = self._kernel_quantizer()(getattr(self, self._weight_roles[0][1]), training=False)
        outputs = self._linear(tf.round(inputs / input_step), tf.round(kernel / weight_step)) * (input_step * weight_step)
        if self.use_bias:
            bias = self.inference_bias(steps)
            outputs = keras.backend.bias_add(outputs, bias, data_format=getattr(self, "data_format", "channels_last"))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="tfqkd", name="QConv2D")
class QConv2D(_IntegerAccumulationMixin, _WeightQuantizedMixin, qkeras.QConv2D):
    """``qkeras.QConv2D`` with tfqkd quantizer state (see module docstring)."""

    def __init__(self, *args, kernel_initializer="he_normal", kernel_constraint=None, bias_constraint=None, **kwargs):
        kwargs = self._pop_integer_accumulation(kwargs)
        super().__init__(*args, kernel_initializer=kernel_initializer, **_resolve_quantizers(kwargs))
        self._restore_float_behaviour(kernel_initializer, kernel_constraint, bias_constraint)
        self._link_midway_step()

    def _linear(self, x, w):
        return keras.backend.conv2d(x, w, strides=self.strides, padding=self.padding, data_format=self.data_format,
                                    dilation_rate=self.dilation_rate)  # fmt: skip


@keras.saving.register_keras_serializable(package="tfqkd", name="QDepthwiseConv2D")
class QDepthwiseConv2D(_IntegerAccumulationMixin, _WeightQuantizedMixin, qkeras.QDepthwiseConv2D):
    """``qkeras.QDepthwiseConv2D`` with tfqkd quantizer state."""

    _weight_roles = (("depthwise_quantizer_internal", "depthwise_kernel", "depthwise"),)

    def __init__(self, *args, depthwise_initializer="he_normal", depthwise_constraint=None, bias_constraint=None, **kwargs):
        kwargs = self._pop_integer_accumulation(kwargs)
        super().__init__(*args, depthwise_initializer=depthwise_initializer, **_resolve_quantizers(kwargs))
        self._restore_float_behaviour(depthwise_initializer, depthwise_constraint, bias_constraint)
        self._link_midway_step()

    def _linear(self, x, w):
        return keras.backend.depthwise_conv2d(x, w, strides=self.strides, padding=self.padding,
                                              data_format=self.data_format, dilation_rate=self.dilation_rate)  # fmt: skip


@keras.saving.register_keras_serializable(package="tfqkd", name="QDense")
class QDense(_IntegerAccumulationMixin, _WeightQuantizedMixin, qkeras.QDense):
    """``qkeras.QDense`` with tfqkd quantizer state."""

    def __init__(self, *args, kernel_initializer="he_normal", kernel_constraint=None, bias_constraint=None, **kwargs):
        kwargs = self._pop_integer_accumulation(kwargs)
        super().__init__(*args, kernel_initializer=kernel_initializer, **_resolve_quantizers(kwargs))
        self._restore_float_behaviour(kernel_initializer, kernel_constraint, bias_constraint)
        self._link_midway_step()

    def _linear(self, x, w):
        return keras.backend.dot(x, w)


@keras.saving.register_keras_serializable(package="tfqkd", name="QActivation")
class QActivation(qkeras.QActivation):
    """``qkeras.QActivation`` that serializes quantizer objects and passes ``training``.

    Args:
      activation: a quantizer object, its serialized dict, or a QKeras string
        such as ``"quantized_relu(4)"``.
    """

    def __init__(self, activation, midway_thresholds=False, add_input=False, **kwargs):
        if isinstance(activation, dict):
            activation = get_quantizer(activation)
        super().__init__(activation, **kwargs)
        # ``integer_intermediates``: after a concat or a residual Add's output, the step keeps ``step / s_in``
        # an odd number over a power of two for the one input on another learned grid, whose codes the int8
        # file requantizes.
        self.midway_thresholds = bool(midway_thresholds)
        # ``integer_intermediates`` on a residual Add's input: the step of the quantizer after the Add.
        self.add_input = bool(add_input)
        if self.add_input and isinstance(self.quantizer, LearnedStepQuantizer):
            self.quantizer.snap = functools.partial(_snap_add_input, weakref.ref(self))
        else:
            _link_snap(self, self.quantizer, _snap_requantized_step)

    def build(self, input_shape):
        _build_quantizer(self, self.quantizer, "input", tuple(input_shape)[1:])
        super().build(input_shape)

    def call(self, inputs, training=None):
        if isinstance(self.quantizer, TfqkdQuantizer):
            return self.quantizer(inputs, training=training)
        return self.quantizer(inputs)

    def get_config(self):
        config = super().get_config()
        if not isinstance(self.activation, str):
            config["activation"] = keras.utils.serialize_keras_object(self.quantizer)
        for flag in ("midway_thresholds", "add_input"):
            if getattr(self, flag):
                config[flag] = True
        return config


#: Largest int8 weight code: :class:`IntegerBatchNormalization` puts its gain on code 127 unless a smaller one
#: gives the int8 file one rounding (see :func:`gain_codes`).
_GAIN_CODE = 127
#: Relative margin keeping a requantization multiplier of 0.5 above 0.5 whatever float32 rounding the runtime does.
_SINGLE_ROUNDING_MARGIN = 1e-5


def gain_codes(ratio, split=False):
    """Per channel, the int8 weight code that stores a gain whose requantization multiplier is ``ratio`` at code 1.

    ``ratio`` is ``input step * |gain| / output step``; with the gain stored as
    code ``w`` the runtime multiplies the int32 accumulator by ``M = ratio / w``.
    TFLite's built-in kernels requantize as gemmlowp does: ``M = m * 2**e`` with
    ``m`` in [0.5, 1), one rounding of ``acc * m``, then for ``e < 0`` a second
    rounding of the division by ``2**-e``, which moves each rounding threshold
    of the output by up to one accumulator unit; XNNPACK rounds once. No int32
    bias serves both for an 8-bit output. With ``w <= 2 * ratio``, ``M >= 0.5``,
    ``e >= 0`` and both runtimes round once: the largest such ``w`` (at most
    127, the finest bias grid) where ``ratio >= 0.5``; 127 (two roundings on the
    built-in kernels) where not, or with ``split`` 96 (see ``_SPLIT_GAIN_CODE``).
    Works on numpy arrays and on tensors alike.
    """
    below = float(_SPLIT_GAIN_CODE if split else _GAIN_CODE)
    codes = ratio * (2.0 * (1.0 - _SINGLE_ROUNDING_MARGIN))
    if tf.is_tensor(codes):
        codes = tf.floor(codes)
        return tf.where(codes >= 1.0, tf.minimum(codes, float(_GAIN_CODE)), below)
    codes = np.floor(codes)
    return np.where(codes >= 1.0, np.minimum(codes, float(_GAIN_CODE)), below)


def _learned_output_step(layer):
    """The step tensor of the learned-step QActivation that reads ``layer``'s output, through one plain ReLU
    or straight (a residual Add's input), or None."""
    quantizer = _learned_quantizer(_reader_after_relu(layer))
    return None if quantizer is None else quantizer.step


@keras.saving.register_keras_serializable(package="tfqkd", name="IntegerBatchNormalization")
class IntegerBatchNormalization(keras.layers.BatchNormalization):
    """A BatchNormalization whose inference map an int8 runtime computes exactly (``integer_intermediates``).

    Its input is an activation quantizer's output ``X * s`` (integer codes
    ``X``). The int8 file computes the inference BN ``gain * x + offset`` as a
    1x1 depthwise convolution: weight code ``w`` at the per-channel scale
    ``|gain| / w``, so its int32 bias can only add multiples of
    ``s * |gain| / w`` (1/w of an input code, times the gain). A float
    offset between two of those moves some of the 256 input codes to a
    neighbouring output code, which the layers after it amplify. At inference
    this layer therefore rounds the offset onto that grid (at most half a unit
    away); training (batch statistics) is BatchNormalization's.

    ``w`` is 127 (the finest grid), except where the BN feeds a learned-step
    quantizer (through a ReLU, or straight: a residual Add's input) and ``s * |gain| / output step >= 0.5``: then ``w``
    is the largest code that keeps the runtime's multiplier ``>= 0.5``
    (:func:`gain_codes`), so TFLite's built-in kernels round once, as XNNPACK
    does, and one int32 bias gives every input code the Keras model's output
    code on both (with 127, their second rounding moved 0.3% of the 8-bit BN
    outputs of a small pre-activation DenseNet, tests/test_int8_fidelity.py).
    The offset moves by less than half an output step. Without a
    learned-step quantizer in front of it, it is BatchNormalization.
    """

    def __init__(self, *args, midway_thresholds=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.midway_thresholds = bool(midway_thresholds)

    def get_config(self):
        config = super().get_config()
        if self.midway_thresholds:
            config["midway_thresholds"] = True
        return config

    def build(self, input_shape):
        # As _WeightQuantizedMixin.build: weights scoped by the layer name (unique .h5 names).
        scope = tf.name_scope(self.name) if not tf.get_current_name_scope() else contextlib.nullcontext()
        with scope:
            super().build(input_shape)

    def input_step(self):
        """The step tensor of the learned-step quantizer whose output this layer normalizes, or None."""
        source = _learned_input_quantizer(self)
        return None if source is None else source.step

    def output_step(self):
        """The step tensor of the learned-step quantizer after this layer (and its ReLU, if any), or None."""
        return _learned_output_step(self)

    def _gain(self):
        gamma = self.gamma if self.gamma is not None else tf.ones_like(self.moving_mean)
        return tf.cast(gamma, tf.float32) * tf.math.rsqrt(tf.cast(self.moving_variance, tf.float32) + self.epsilon)

    def gain_codes(self, step):
        """Per channel, the int8 weight code of the gain in the file (float32 tensor; see :func:`gain_codes`)."""
        gain = self._gain()
        out = self.output_step()
        if out is None:
            return tf.fill(tf.shape(gain), float(_GAIN_CODE))
        ratio = tf.cast(step, tf.float32) * tf.abs(gain) / tf.cast(out, tf.float32)
        return gain_codes(ratio, split=self.midway_thresholds)

    def integer_affine(self, step):
        """``(gain, offset)``: the inference map with the offset on the int32 bias grid of the int8 file.

        With ``midway_thresholds``, the gain and offset are placed so that no input code lands within
        float noise of a rounding threshold of the output grid, nor within the built-in kernels' first
        rounding (``odd_ratio``): where the file's multiplier ``M = s_in * |gain| / (w * s_out)`` is at
        least 0.5, ``M`` is moved up (by at most 2/1024) to a power of two over an odd number; where
        not, ``w`` is 96 and one input code's value ``s_in * |gain| / s_out`` is moved (by at most 1/64)
        to ``2**j / k`` with ``2**j <= 32``, and the offset to a multiple of ``s_out / k`` (3 * 2**(5-j)
        accumulator units).
        """
        beta = self.beta if self.beta is not None else tf.zeros_like(self.moving_mean)
        gain = self._gain()
        offset = tf.cast(beta, tf.float32) - tf.cast(self.moving_mean, tf.float32) * gain
        codes = self.gain_codes(step)
        out = self.output_step() if self.midway_thresholds else None
        if out is None:
            unit = tf.cast(step, tf.float32) * tf.abs(gain) / codes
        else:
            s_in, s_out, w = tf.cast(step, tf.float64), tf.cast(out, tf.float64), tf.cast(codes, tf.float64)
            code_value = s_in * tf.maximum(tf.cast(tf.abs(gain), tf.float64), 1e-30) / s_out  # output steps per input code
            single = code_value / w >= 0.5 * (1.0 - _SINGLE_ROUNDING_MARGIN)
            k_one, j_one = odd_ratio_parts(tf.math.log(w / code_value), _REQUANTIZE_MIN_ODD, round_down=True)
            k_split, j_split = odd_ratio_parts(-tf.math.log(code_value), _SPLIT_MIN_ODD)
            two = tf.constant(2.0, tf.float64)
            snapped = tf.where(single, w * tf.pow(two, j_one) / k_one, tf.pow(two, j_split) / k_split)
            gain = tf.where(gain != 0, tf.cast(tf.sign(gain), tf.float32) * tf.cast(snapped * s_out / s_in, tf.float32), gain)
            unit_out = tf.where(single, snapped / w, 1.0 / k_split)  # the offset grid in output steps
            unit = tf.cast(unit_out * s_out, tf.float32)
        safe = tf.where(unit > 0, unit, tf.ones_like(unit))
        return gain, tf.where(unit > 0, tf.round(offset / safe) * safe, offset)

    def call(self, inputs, training=None, mask=None):
        step = self.input_step()
        if step is None or not tf.is_tensor(inputs) or len(self.axis) != 1 or self.axis[0] != inputs.shape.rank - 1:
            return super().call(inputs, training=training, mask=mask)
        if self._get_training_value(training) is not False:
            return super().call(inputs, training=training, mask=mask)
        gain, offset = self.integer_affine(step)
        return tf.cast(tf.cast(inputs, tf.float32) * gain + offset, self.compute_dtype)


def input_quantizer_of(layer):
    """The ``*_qin`` QActivation that ``quantize()`` put in front of ``layer`` (shared by the layers reading one tensor), or None."""
    source = single_producer(layer)
    if isinstance(source, QActivation) and source.name.endswith(INPUT_QUANTIZER_SUFFIX):
        return source if isinstance(source.quantizer, TfqkdQuantizer) else None
    return None


def quantized_layer_classes():
    """Maps QKeras class names to the tfqkd subclasses (for deserialization)."""
    return {cls.__name__: cls for cls in (QConv2D, QDepthwiseConv2D, QDense, QActivation)}


def config_key(attr):
    """The layer-config key of a quantizer attribute (``kernel_quantizer_internal`` -> ``kernel_quantizer``)."""
    return attr.removesuffix("_internal")


def weight_quantizers(layer):
    """The tfqkd weight quantizers of one layer as ``[(attribute, role, quantizer, weight)]``."""
    found = []
    for attr, weight_name, role in WEIGHT_SLOTS:
        quantizer, weight = getattr(layer, attr, None), getattr(layer, weight_name, None)
        if isinstance(quantizer, TfqkdQuantizer) and weight is not None:
            found.append((attr, role, quantizer, weight))
    return found


def layer_quantizers(layer):
    """The tfqkd quantizers of one layer as ``[(role, quantizer)]`` (role: kernel, depthwise, bias, input)."""
    found = [(role, quantizer) for _, role, quantizer, _ in weight_quantizers(layer)]
    if isinstance(layer, QActivation) and isinstance(layer.quantizer, TfqkdQuantizer):
        found.append(("input", layer.quantizer))
    return found


def model_quantizers(model):
    """Every tfqkd quantizer of ``model`` as ``[(layer, role, quantizer)]``, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += model_quantizers(layer)
        else:
            found += [(layer, role, quantizer) for role, quantizer in layer_quantizers(layer)]
    return found
