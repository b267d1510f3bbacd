"""``quantize(float_model, policy)``: the quantized QKeras twin of a float model.

QKD Algorithm 1, line 2 (Kim et al. 2019; thesis section 3.6): the low-bit
student starts from its float weights, and the quantization intervals start
from the min-max of the weights and of one batch of activations.

The twin is built by rewriting the functional model's config: every
``Conv2D`` / ``DepthwiseConv2D`` / ``Dense`` the policy selects becomes its
QKeras counterpart with weight (and bias) quantizers, and a ``QActivation``
named ``<layer>_qin`` is inserted in front of it to quantize its input (the
activation interval I_X); layers that read one tensor with the same input spec (a
ResNet's shortcut and first convolution) share the first one's. Everything else (BatchNormalization, pooling,
concatenation) is copied unchanged, weights included.
"""

import copy
import json
import warnings

import numpy as np

from tfqkd.compat import keras
from tfqkd.data.examples import calibration_inputs
from tfqkd.errors import TfqkdError
from tfqkd.graph import as_functional, grid_source, inbound_names, is_plain_relu, keeps_grid_config, producer, tensor_consumers
from tfqkd.quant.layers import (
    INPUT_QUANTIZER_SUFFIX, IntegerBatchNormalization, quantized_layer_classes, weight_quantizers,
)  # fmt: skip
from tfqkd.quant.policy import (
    QUANTIZABLE_TYPES,
    QuantSpec,
    check_target_policy,
    layer_specs,
    lookalike_target,
    resolve_policy,
)
from tfqkd.quant.quantizers import (
    AffineQuantizer,
    LearnedStepQuantizer,
    Pof2Quantizer,
    registered_quantizers,
)
from tfqkd.quant.targets import list_targets

__all__ = [
    "INPUT_QUANTIZER_SUFFIX",
    "INTERMEDIATE_QUANTIZER_SUFFIX",
    "custom_objects",
    "is_quantized",
    "layer_specs",
    "make_input_quantizer",
    "make_weight_quantizer",
    "quantize",
]

#: Suffix of the 8-bit quantizers ``quantize(..., integer_intermediates=True)`` inserts.
INTERMEDIATE_QUANTIZER_SUFFIX = "_q8"
_Q_CLASS = {"Conv2D": "QConv2D", "DepthwiseConv2D": "QDepthwiseConv2D", "Dense": "QDense"}
_WEIGHT_QUANTIZER_KEY = {"Conv2D": "kernel_quantizer", "DepthwiseConv2D": "depthwise_quantizer", "Dense": "kernel_quantizer"}
# Layers whose output is non-negative when their inputs are (sign propagation).
_SIGN_PRESERVING = {
    "Flatten", "Reshape", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
    "ZeroPadding2D", "Dropout", "Concatenate", "Add", "UpSampling2D",
}  # fmt: skip
_NON_NEGATIVE_ACTIVATIONS = {"relu", "relu6", "sigmoid", "softmax"}


def custom_objects():
    """Everything needed to deserialize tfqkd/QKeras models.

    Returns:
      dict for ``keras.models.load_model(..., custom_objects=...)``: QKeras'
      objects with the QKeras layer names mapped to the tfqkd subclasses, every
      registered quantizer and what the registered targets' models use
      (:mod:`tfqkd.quant.targets`; the DPU's pooling layer).
    """
    objects = qkeras_custom_objects()
    objects.update(quantized_layer_classes())
    objects["IntegerBatchNormalization"] = IntegerBatchNormalization
    for target in list_targets().values():
        objects.update(target.custom_objects())
    objects.update(registered_quantizers())
    return objects


def qkeras_custom_objects():
    """The custom objects stock QKeras registers (``qkeras.utils.load_qmodel`` uses the same)."""
    import qkeras.utils

    objects = {}
    qkeras.utils._add_supported_quantized_objects(objects)
    return objects


def rename_references(value, renamed):
    """``inbound_nodes``-style config ``value`` with references to layers in ``renamed`` replaced."""
    if isinstance(value, list):
        if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int) and value[0] in renamed:
            return [renamed[value[0]], *value[1:]]
        return [rename_references(v, renamed) for v in value]
    return value


def make_weight_quantizer(spec, bits=None):
    """Quantizer for a kernel (or, with ``bits``, a bias) under ``spec``.

    Args:
      spec: QuantSpec of the layer.
      bits: override the bit width (biases); None uses ``spec.weight_bits``.

    Returns:
      a tfqkd quantizer; LSQ weights use the narrow symmetric range so their
      codes are the symmetric integers TFLite stores.
    """
    bits = spec.weight_bits if bits is None else bits
    if spec.scheme in ("lsq", "lsq_pof2"):
        return LearnedStepQuantizer(bits, signed=True, narrow_range=True, power_of_two=spec.scheme == "lsq_pof2")
    if spec.scheme == "affine":
        return AffineQuantizer(bits, signed=True)
    return Pof2Quantizer(bits, rounding="even")


def make_input_quantizer(spec, signed, initial_range=None):
    """Quantizer for a layer's input activations under ``spec``.

    Args:
      spec: QuantSpec of the layer.
      signed: whether the input can be negative (else unsigned codes, as the
        thesis uses after ReLU).
      initial_range: largest value the learned step's codes reach before
        calibration (None: the default activation range).

    Returns:
      a tfqkd quantizer.
    """
    if spec.input_scheme in ("lsq", "lsq_pof2"):
        quantizer = LearnedStepQuantizer(spec.activation_bits, signed=signed, power_of_two=spec.input_scheme == "lsq_pof2")
        if initial_range is not None:
            quantizer.initial_step = initial_range / quantizer.qmax  # before the layer builds the state from it
        return quantizer
    if spec.input_scheme == "affine":
        return AffineQuantizer(spec.activation_bits, signed=signed, running=True)
    return Pof2Quantizer(spec.activation_bits, rounding="half_up", running=True)


def _is_non_negative(tensor, depth=0):
    """Structural guess: is this tensor the output of a ReLU-like layer?"""
    if depth > 50:
        return False
    layer = producer(tensor)
    cls = type(layer).__name__
    if cls == "ReLU":
        return getattr(layer, "negative_slope", 0) == 0 and getattr(layer, "threshold", 0) >= 0
    if cls == "Activation":
        return getattr(layer.activation, "__name__", "") in _NON_NEGATIVE_ACTIVATIONS
    if cls in _SIGN_PRESERVING:
        inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        return all(_is_non_negative(t, depth + 1) for t in inputs)
    return False


# tfqkd.data scales images to [0, 1]: the range of a model input before calibration.
_MODEL_INPUT_RANGE = 1.0


def _reads_model_input(tensor, depth=0):
    """Whether ``tensor`` is the model's input, possibly reshaped or padded on the way."""
    layer = producer(tensor)
    if isinstance(layer, keras.layers.InputLayer):
        return True
    if depth > 20 or type(layer).__name__ not in _SIGN_PRESERVING or isinstance(layer.input, (list, tuple)):
        return False
    return _reads_model_input(layer.input, depth + 1)


def _single_input(layer):
    if len(layer._inbound_nodes) != 1:
        raise TfqkdError(f"layer '{layer.name}' is shared (called more than once); quantize() cannot rewrite it")
    return layer.input


def _untrained_batchnorms(model):
    """The BatchNormalization layers of ``model`` if none has moved its statistics from the initial 0 and 1."""
    layers = [layer for layer in model.submodules if isinstance(layer, keras.layers.BatchNormalization)]
    fresh = all(
        np.all(layer.moving_mean.numpy() == 0) and np.all(layer.moving_variance.numpy() == 1) for layer in layers
    )
    return layers if fresh else []


def _calibration_outputs(model, tensors, batch):
    """``tensors`` of ``model`` on one calibration batch, as training will see them.

    A trained model runs in inference mode. In a model whose BatchNormalizations were never
    trained, inference mode divides by the initial variance 1, not by the batch's: activations
    shrink layer after layer (ds_cnn's 4th block: about 1e-3 of what training sees), the steps
    calibrated on them are that small, every code clips once training starts, no gradient
    passes, and the run is dead. Such a model is calibrated on batch statistics, as training
    normalises; its BN statistics are left as they were.
    """
    untrained = _untrained_batchnorms(model)
    saved = [layer.get_weights() for layer in untrained]
    try:
        return keras.Model(model.inputs, tensors)(batch, training=bool(untrained))
    finally:
        for layer, weights in zip(untrained, saved):
            layer.set_weights(weights)


def _intermediate_sources(model, specs):
    """Tensors an int8 runtime must hold with a scale of its own (for ``integer_intermediates``).

    The input of every BatchNormalization (pre-activation BN after a concat,
    the stem or a pooling layer, and also a BN right after a conv: folding
    it would leave its offset as an int32 bias on a grid the float model
    does not share, which moves low-bit codes), and the input of every
    GlobalAveragePooling2D, except a residual Add's output (straight or after a
    ReLU), which :func:`_residual_sources` quantizes. Returns ``{producer layer name: signed}`` for
    producers with a single output, when the policy quantizes activations.
    """
    if not any(spec.activation_bits is not None for spec in specs.values()):
        return {}
    sources = {}
    for layer in model.layers:
        cls = type(layer).__name__
        if cls not in ("BatchNormalization", "GlobalAveragePooling2D") or len(layer._inbound_nodes) != 1:
            continue
        tensor = layer.input
        if isinstance(tensor, (list, tuple)):
            continue
        source = producer(tensor)
        if isinstance(source, keras.layers.InputLayer) or len(source._inbound_nodes) != 1:
            continue
        if isinstance(grid_source(source), keras.layers.Add):
            continue  # on the Add's 8-bit grid already (_residual_sources)
        sources[source.name] = not _is_non_negative(tensor)
    return sources


def _residual_sources(model, specs):
    """The tensors of each residual Add, for ``integer_intermediates``: ``({producer name: signed}, add inputs)``.

    An int8 runtime adds two int8 tensors and rounds the sum onto the output's
    scale; with one scale for both inputs and the sum its ADD is exact (every
    multiplier a power of two). So each Add's output (after its ReLU, if
    any) and the inputs it sums get 8-bit quantizers on one grid: the
    output's learned step, which the input quantizers (``add_input``) take.
    An input that is another Add's output is that Add's quantizer, which
    then takes this grid too (a chain of Adds shares the last one's).
    """
    if not any(spec.activation_bits is not None for spec in specs.values()):
        return {}, set()
    consumers = tensor_consumers(model)

    def quantized_output(add):
        # After the Add's ReLU, if it has one: the int8 ADD fuses it, and its output scale is then the
        # quantizer's; a signed grid before the ReLU would make the converter halve it (a rounding).
        users = consumers.get(id(add.output), [])
        return users[0] if len(users) == 1 and is_plain_relu(users[0]) else add

    sources, inputs = {}, set()
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Add) or len(layer._inbound_nodes) != 1:
            continue
        output = quantized_output(layer)
        sources[output.name] = not _is_non_negative(output.output)
        for tensor in layer.input:
            source = producer(tensor)
            if isinstance(source, keras.layers.InputLayer) or len(source._inbound_nodes) != 1:
                continue
            through = grid_source(source)
            if isinstance(through, keras.layers.Add):
                if quantized_output(through) is source:
                    inputs.add(source.name)  # a chain of Adds: one grid, the last one's
                continue
            sources[source.name] = not _is_non_negative(tensor)
            inputs.add(source.name)
    return sources, inputs


def quantize(
    model,
    policy="w8a8",
    calibration_data=None,
    *,
    init="minmax",
    warn_unused_rules=True,
    integer_intermediates=False,
):
    """Returns the quantized QKeras twin of a float model.

    Args:
      model: functional or Sequential float Keras model.
      policy: preset name, YAML path, dict or QuantPolicy (see
        :mod:`tfqkd.quant.policy`). A policy with a ``target`` (the ``dpu``
        preset, or ``target: dpu`` in YAML) builds that target's model: for
        the DPU, the DPU-exact model of :func:`tfqkd.dpu.quantize_for_dpu`
        (DPU variants only). A policy without one builds the generic twin,
        and warns when its specs equal a target's.
      calibration_data: inputs (an array, ``(x, y)`` or a tf.data.Dataset; up to
        256 examples are read); it initialises the activation intervals from the
        min-max of the float model's activations and decides which inputs are
        signed. Without it, inputs after a ReLU are unsigned, others signed,
        and activation intervals start at [0, 4].
      init: step initialisation of the learned-step quantizers, "minmax"
        (QKD Algorithm 1) or "lsq" (Esser et al. 2020).
      warn_unused_rules: warn about policy rules that match no layer.
      integer_intermediates: also quantize, at 8 bits with a learned step, the
        tensors a full-integer runtime must store at 8 bits although the
        float model keeps them in float: the input of each BatchNormalization
        (concat, stem, pooling and conv outputs in a pre-activation DenseNet),
        of each global average pool, and both inputs and the output of each
        residual Add (on one grid, see :func:`_residual_sources`). A layer
        ``<producer>_q8`` is inserted after each such producer, so the trained
        model computes what the int8 TFLite export computes (opt-in; off by
        default).

    Returns:
      a new functional keras.Model; the input model is not modified. For the
      ``fp32`` policy, an identical float copy.

    Raises:
      TfqkdError: bad policy, model type or calibration data.
    """
    policy = resolve_policy(policy)
    if policy.target is not None:
        # The target is chosen explicitly and builds its own model (the DPU: BN folded, every
        # written tensor on a power-of-two grid).
        return check_target_policy(policy).build(model, calibration_data)
    lookalike = lookalike_target(policy)
    if lookalike is not None:
        warnings.warn(
            f"policy {policy.name!r} has the specs of target {lookalike.name!r} but does not name it: it builds "
            f"the generic QKeras twin, not the {lookalike.name} model; add 'target: {lookalike.name}' "
            f"(or use the {lookalike.name!r} preset) for that",
            stacklevel=2,
        )
    model = as_functional(model)
    layers = [(layer.name, type(layer).__name__) for layer in model.layers]
    specs = policy.resolve(layers, warn=warn_unused_rules)

    integer_intermediates = integer_intermediates or policy.integer_intermediates
    intermediates, add_inputs = {}, set()
    if integer_intermediates:
        residual, add_inputs = _residual_sources(model, specs)
        intermediates = {**_intermediate_sources(model, specs), **residual}
    batch = calibration_inputs(calibration_data)
    probe_values = {}
    intermediate_values = {}
    if batch is not None and specs:
        probe_names = [name for name in specs if specs[name].activation_bits is not None]
        if probe_names:
            inputs = [_single_input(model.get_layer(name)) for name in probe_names]
            inputs += [model.get_layer(name).output for name in intermediates]
            try:
                outputs = _calibration_outputs(model, inputs, batch)
            except (ValueError, TypeError) as err:
                raise TfqkdError(f"calibration data does not fit the model input: {str(err).splitlines()[0]}") from None
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            probe_values = {name: np.asarray(value) for name, value in zip(probe_names, outputs)}
            intermediate_values = {
                name: np.asarray(value) for name, value in zip(intermediates, outputs[len(probe_names) :])
            }

    config = copy.deepcopy(model.get_config())
    new_layers = []
    input_quantizers = {}
    # One input quantizer per tensor and quantizer: layers reading the same tensor with the same
    # spec (a ResNet's shortcut and first conv) share it, as an integer runtime keeps one grid
    # per tensor, and training quantizes it once.
    shared_quantizers = {}
    for entry in config["layers"]:
        name, cls = entry["name"], entry["class_name"]
        spec = specs.get(name)
        if spec is None or cls not in QUANTIZABLE_TYPES:
            new_layers.append(entry)
            continue
        layer_config = entry["config"]
        if cls == "DepthwiseConv2D":
            # Keras' config carries a convolution 'groups' that QDepthwiseConv2D does not accept.
            layer_config.pop("groups", None)
        weight_q = make_weight_quantizer(spec)
        layer_config[_WEIGHT_QUANTIZER_KEY[cls]] = keras.utils.serialize_keras_object(weight_q)
        if spec.bias_bits < 32:
            layer_config["bias_quantizer"] = keras.utils.serialize_keras_object(make_weight_quantizer(spec, spec.bias_bits))
        if spec.activation_bits is not None:
            source = _single_input(model.get_layer(name))
            if name in probe_values:
                signed = bool(probe_values[name].min() < 0)
            else:
                signed = not _is_non_negative(source)
            # Uncalibrated, a model input gets the data range, not the activation default:
            # with 2-bit codes a step of 4 would round every pixel to zero.
            initial_range = _MODEL_INPUT_RANGE if batch is None and _reads_model_input(source) else None
            serialized = keras.utils.serialize_keras_object(make_input_quantizer(spec, signed, initial_range))
            key = json.dumps([entry["inbound_nodes"], serialized], sort_keys=True, default=str)
            qin_name = shared_quantizers.get(key)
            if qin_name is None:
                qin_name = shared_quantizers[key] = name + INPUT_QUANTIZER_SUFFIX
                input_quantizers[qin_name] = name
                new_layers.append(
                    {
                        "class_name": "QActivation",
                        "name": qin_name,
                        "config": {
                            "name": qin_name,
                            "trainable": True,
                            "dtype": layer_config.get("dtype", "float32"),
                            "activation": serialized,
                        },
                        "inbound_nodes": entry["inbound_nodes"],
                    }
                )
            entry["inbound_nodes"] = [[[qin_name, 0, 0, {}]]]
            if integer_intermediates and cls in ("Conv2D", "DepthwiseConv2D", "Dense"):
                layer_config["integer_accumulation"] = True  # sums codes at inference, as int8 does
                layer_config["midway_thresholds"] = True  # no sum within float noise of a rounding threshold
        entry["class_name"] = _Q_CLASS[cls]
        entry.pop("module", None)
        entry.pop("registered_name", None)
        new_layers.append(entry)
    if intermediates:
        new_layers = _insert_intermediate_quantizers(new_layers, intermediates, add_inputs, specs)
    config["layers"] = new_layers
    config["name"] = f"{model.name}"

    qmodel = keras.Model.from_config(config, custom_objects=custom_objects())

    for layer in model.layers:
        qlayer = qmodel.get_layer(layer.name)
        float_weights = layer.get_weights()
        if float_weights:
            qlayer.set_weights(float_weights + qlayer.get_weights()[len(float_weights) :])
        for _, _, quantizer, weight in weight_quantizers(qlayer):
            quantizer.initialize(weight.numpy(), method=init)
    for qin_name, target in input_quantizers.items():
        if target in probe_values:
            qmodel.get_layer(qin_name).quantizer.initialize(probe_values[target], method=init)
    for name, values in intermediate_values.items():
        add = grid_source(model.get_layer(name))
        if isinstance(add, keras.layers.Add) and name not in add_inputs:
            # Its grid is its inputs' too (add_input): the range of all three tensors.
            values = np.concatenate([values.ravel()] + [intermediate_values[producer(t).name].ravel()
                                                        for t in add.input if producer(t).name in add_inputs])  # fmt: skip
        # Min-max (not LSQ's mean-based init): an 8-bit intermediate should not clip.
        qmodel.get_layer(name + INTERMEDIATE_QUANTIZER_SUFFIX).quantizer.initialize(values, method="minmax")
    return qmodel


def _insert_intermediate_quantizers(layers, intermediates, add_inputs, specs):
    """Puts ``<producer>_q8`` (8-bit learned step) after each producer and re-wires its consumers.

    Those of ``add_inputs`` take the step of the quantizer after the residual Add they feed; a
    quantizer reading another's codes (after a concat, or a residual Add's output) requantizes them.
    """
    schemes = {spec.scheme for spec in specs.values()}
    scheme = schemes.pop() if len(schemes) == 1 else "lsq"
    renamed = {name: name + INTERMEDIATE_QUANTIZER_SUFFIX for name in intermediates}

    inserted = set(renamed.values())
    result = []
    for entry in layers:
        entry["inbound_nodes"] = rename_references(entry["inbound_nodes"], renamed)
        sources = set(inbound_names(entry))
        if entry["class_name"] == "BatchNormalization" and sources and sources <= inserted:
            # Its inference offset on the int32 bias grid of the int8 file's depthwise lowering.
            entry["class_name"] = "IntegerBatchNormalization"
            entry["config"]["midway_thresholds"] = True  # no input code within float noise of a threshold
            entry.pop("module", None)
            entry.pop("registered_name", None)
        result.append(entry)
        name = entry["name"]
        if name in intermediates:
            quantizer = make_input_quantizer(QuantSpec(8, 8, 32, scheme), intermediates[name])
            result.append(
                {
                    "class_name": "QActivation",
                    "name": renamed[name],
                    "config": {
                        "name": renamed[name],
                        "trainable": True,
                        "dtype": entry["config"].get("dtype", "float32"),
                        "activation": keras.utils.serialize_keras_object(quantizer),
                        # After a concat: requantized codes off the thresholds; before an Add: its grid.
                        ("add_input" if name in add_inputs else "midway_thresholds"): True,
                    },
                    "inbound_nodes": [[[name, 0, 0, {}]]],
                }
            )
    # Quantizers reading an inserted one's codes (through plain ReLUs and Dropouts, which keep its grid)
    # requantize them. The config lists layers in graph order, so one pass finds them.
    on_grid = set(inserted)
    for entry in result:
        sources = set(inbound_names(entry))
        if not sources or not sources <= on_grid:
            continue
        if entry["class_name"] == "QActivation" and entry["name"] not in inserted:
            entry["config"]["midway_thresholds"] = True
        elif keeps_grid_config(entry):
            on_grid.add(entry["name"])
    return result


def is_quantized(model):
    """Whether ``model`` contains tfqkd/QKeras quantized layers."""
    classes = set(quantized_layer_classes())
    return any(type(layer).__name__ in classes for layer in model.layers)
