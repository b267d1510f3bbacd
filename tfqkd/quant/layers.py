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
from tfqkd.graph import single_producer
from tfqkd.quant.quantizers import LearnedStepQuantizer, TfqkdQuantizer, get_quantizer

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
    """The one layer reading ``layer``'s output, or None (none yet, or several)."""
    consumers = {id(node.layer): node.layer for node in getattr(layer, "_outbound_nodes", [])}
    return next(iter(consumers.values())) if len(consumers) == 1 else None


def _rounding_quantizer(layer):
    """``(quantizer, area)``: the learned-step QActivation that rounds ``layer``'s output, straight or
    through a Concatenate or a non-overlapping average pool of ``area`` values; or None."""
    area, consumer = 1, _single_consumer(layer)
    if isinstance(consumer, keras.layers.Concatenate):
        consumer = _single_consumer(consumer)
    elif isinstance(consumer, keras.layers.AveragePooling2D):
        if consumer.padding != "valid" or tuple(consumer.strides) != tuple(consumer.pool_size):
            return None
        area, consumer = int(np.prod(consumer.pool_size)), _single_consumer(consumer)
    quantizer = _learned_quantizer(consumer)
    return None if quantizer is None else (quantizer, area)


def _output_log_span(layer_ref):
    """``log(area * s_out / s_in)`` of the weak-referenced layer's midway weight step (see
    ``midway_log_step``), or None while its graph does not show both grids."""
    layer = layer_ref()
    if layer is None or layer.use_bias:
        return None  # a float bias would move every threshold off the midpoints
    source, rounding = _learned_input_quantizer(layer), _rounding_quantizer(layer)
    if source is None or rounding is None:
        return None
    output, area = rounding
    log_steps = (tf.cast(q.effective_log_step(), tf.float64) for q in (output, source))
    return math.log(area) + next(log_steps) - next(log_steps)


class _IntegerAccumulationMixin:
    """``integer_accumulation``: at inference, the conv / dense sums integer codes, as an int8 runtime does.

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
        two reachable integer sums (``midway_log_step``); the link is read from the graph when used."""
        quantizer = self.kernel_quantizer_internal
        if self.midway_thresholds and isinstance(quantizer, LearnedStepQuantizer) and not quantizer.power_of_two:
            quantizer.log_span = functools.partial(_output_log_span, weakref.ref(self))

    def get_config(self):
        config = super().get_config()
        for flag in ("integer_accumulation", "midway_thresholds"):
            if getattr(self, flag):
                config[flag] = True
        return config

    def call(self, inputs, training=None):
        steps = None
        if self.integer_accumulation and training is not True and isinstance(self.kernel_quantizer_internal, LearnedStepQuantizer):
            source = _learned_input_quantizer(self)
            if source is not None:
                steps = (source.step, self.kernel_quantizer_internal.step)
        if steps is None or training is None and keras.backend.learning_phase() == 1:
            return super().call(inputs)
        input_step, weight_step = (tf.cast(s[0], inputs.dtype) for s in steps)
        kernel = self.kernel_quantizer_internal(self.kernel, training=False)
        outputs = self._linear(tf.round(inputs / input_step), tf.round(kernel / weight_step)) * (input_step * weight_step)
        if self.use_bias:
            bias = self.bias_quantizer_internal(self.bias) if self.bias_quantizer else self.bias
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
class QDepthwiseConv2D(_WeightQuantizedMixin, qkeras.QDepthwiseConv2D):
    """``qkeras.QDepthwiseConv2D`` with tfqkd quantizer state."""

    _weight_roles = (("depthwise_quantizer_internal", "depthwise_kernel", "depthwise"),)

    def __init__(self, *args, depthwise_initializer="he_normal", depthwise_constraint=None, bias_constraint=None, **kwargs):
        super().__init__(*args, depthwise_initializer=depthwise_initializer, **_resolve_quantizers(kwargs))
        self._restore_float_behaviour(depthwise_initializer, depthwise_constraint, bias_constraint)


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

    def __init__(self, activation, **kwargs):
        if isinstance(activation, dict):
            activation = get_quantizer(activation)
        super().__init__(activation, **kwargs)

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
        return config


#: Largest int8 weight code: :class:`IntegerBatchNormalization` puts its gain on code 127 unless a smaller one
#: gives the int8 file one rounding (see :func:`gain_codes`).
_GAIN_CODE = 127
#: Relative margin keeping a requantization multiplier of 0.5 above 0.5 whatever float32 rounding the runtime does.
_SINGLE_ROUNDING_MARGIN = 1e-5


def gain_codes(ratio):
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
    built-in kernels) where not. Works on numpy arrays and on tensors alike.
    """
    codes = ratio * (2.0 * (1.0 - _SINGLE_ROUNDING_MARGIN))
    if tf.is_tensor(codes):
        codes = tf.floor(codes)
        return tf.where(codes >= 1.0, tf.minimum(codes, float(_GAIN_CODE)), float(_GAIN_CODE))
    codes = np.floor(codes)
    return np.where(codes >= 1.0, np.minimum(codes, float(_GAIN_CODE)), float(_GAIN_CODE))


def _learned_output_step(layer):
    """The step tensor of the learned-step QActivation that reads ``layer``'s output through one plain ReLU, or None."""
    users = [node.layer for node in getattr(layer, "_outbound_nodes", [])]
    if len(users) != 1 or type(users[0]).__name__ != "ReLU":
        return None
    relu = users[0]
    if getattr(relu, "max_value", None) or getattr(relu, "negative_slope", 0) or getattr(relu, "threshold", 0):
        return None
    users = [node.layer for node in getattr(relu, "_outbound_nodes", [])]
    if len(users) != 1 or not isinstance(users[0], QActivation):
        return None
    quantizer = users[0].quantizer
    if not isinstance(quantizer, LearnedStepQuantizer) or quantizer.legacy_linear:
        return None
    return quantizer.step


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

    ``w`` is 127 (the finest grid), except where the BN feeds a ReLU and a
    learned-step quantizer and ``s * |gain| / output step >= 0.5``: then ``w``
    is the largest code that keeps the runtime's multiplier ``>= 0.5``
    (:func:`gain_codes`), so TFLite's built-in kernels round once, as XNNPACK
    does, and one int32 bias gives every input code the Keras model's output
    code on both (with 127, their second rounding moved 0.3% of the 8-bit BN
    outputs of a small pre-activation DenseNet, tests/test_int8_fidelity.py).
    The offset moves by less than half an output step. Without a
    learned-step quantizer in front of it, it is BatchNormalization.
    """

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
        """The step tensor of the learned-step quantizer after this layer's ReLU, or None."""
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
        return gain_codes(ratio)

    def integer_affine(self, step):
        """``(gain, offset)``: the inference map with the offset on the int32 bias grid of the int8 file."""
        beta = self.beta if self.beta is not None else tf.zeros_like(self.moving_mean)
        gain = self._gain()
        offset = tf.cast(beta, tf.float32) - tf.cast(self.moving_mean, tf.float32) * gain
        unit = tf.cast(step, tf.float32) * tf.abs(gain) / self.gain_codes(step)
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
