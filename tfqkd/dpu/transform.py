"""The ``dpu`` training model: a QKeras twin whose forward pass is the Xilinx DPU's arithmetic.

The DPU scheme (Vitis-AI pof2s) and thesis chapter 6: a student trained with QKD must see, during
training, exactly the numbers the DPUCZDX8G will compute, or the board accuracy differs from the
trained one. :func:`quantize_for_dpu` therefore rewrites a float model into the graph the
Vitis-AI TF2 quantizer (``vai_q_tensorflow2``, ``pof2s`` strategy) hands to the compiler and
simulates every rounding the DPU does:

* BatchNormalization directly after a Conv2D / DepthwiseConv2D / Dense is folded into it at
  quantization time (``W * gamma/sqrt(var+eps)`` per output channel,
  ``b <- beta + (b - mean) * gamma/sqrt(var+eps)``); Dropout is removed;
* kernels and biases are 8-bit power-of-two, round half to even (Vitis ``round_mode`` 0);
* every tensor the DPU writes to memory (the network input, each conv/dense output after its
  fused ReLU / ReLU6 / LeakyReLU(26/256), each pooling, Add and Multiply output) is 8-bit
  power-of-two, round half up (``floor(x + 0.5)``, Vitis ``round_mode`` 1), by a
  :class:`~tfqkd.quant.layers.QActivation` named ``<layer>_dpuq``;
* average pooling is the DPU's ``sum * k / 2**n`` (:class:`~tfqkd.dpu.layers.DPUAveragePooling2D`; 3x3: 7/64,
  5x5: 10/256, 6x6: 7/256, 7x7: 21/1024, 14x14: 21/4096, powers of two exact);
* positions obey the DPU's limits: concatenation inputs and output share the minimum position,
  pooling output position = input position, ``shift_cut = wpos + ipos - opos`` in [0, 16] and
  ``shift_bias = wpos + ipos - bpos`` in ``[min(0, -(24 - (8 + shift_cut))), 16]``.

Positions are not running statistics: they are non-trainable layer weights ``<role>_pos``
(``kernel_pos``, ``bias_pos``, ``input_pos``), calibrated once by :func:`calibrate_dpu_positions`
(from the weights and one batch of data, then adjusted to the limits) and kept fixed while
training, as in Vitis-AI quantize-finetuning after calibration. The rounding has a
straight-through gradient, so ``model.fit`` and :class:`tfqkd.QKD` train the model as usual.
The exporter (:func:`tfqkd.export.to_dpu`) reads these positions unchanged, which is what makes the
trained model and the DPU emulator agree.
"""

from __future__ import annotations

import numpy as np

from tfqkd.compat import keras
from tfqkd.data.examples import calibration_inputs
from tfqkd.dpu.arithmetic import DPU_LEAKY_ALPHA
from tfqkd.dpu.compat import check_model
from tfqkd.dpu.graph import WEIGHTED_OPS, graph_from_dpu_model
from tfqkd.dpu.layers import DPUAveragePooling2D, DPUQuantizer, dpu_custom_objects, is_dpu_model, output_quantizer
from tfqkd.dpu.positions import solve_positions
from tfqkd.errors import TfqkdError
from tfqkd.graph import as_functional, config_consumers, inbound_names
from tfqkd.quant.layers import QConv2D, QDense, QDepthwiseConv2D
from tfqkd.quant.policy import QuantSpec
from tfqkd.quant.targets import QuantTarget, register_target

__all__ = ["DPU_SPEC", "DPU_TARGET", "calibrate_dpu_positions", "fold_batchnorm", "quantize_for_dpu"]

#: What the DPU target quantizes every Conv2D / DepthwiseConv2D / Dense with (the ``dpu`` preset).
DPU_SPEC = QuantSpec(8, 8, scheme="pof2")


def fold_batchnorm(kernel, bias, bn_weights, epsilon, depthwise=False):
    """Folds a BatchNormalization into the preceding layer's kernel and bias.

    ``W' = W * gamma / sqrt(var + eps)`` per output channel and
    ``b' = beta + (b - mean) * gamma / sqrt(var + eps)`` (thesis 6.1).

    Args:
      kernel: conv ``(kh, kw, in, out)``, depthwise ``(kh, kw, in, mult)`` or dense ``(in, out)``.
      bias: bias array or None (zeros).
      bn_weights: dict with ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``.
      epsilon: the BN epsilon.
      depthwise: kernel is a depthwise kernel (output channel ``c * mult + m``).

    Returns:
      ``(kernel, bias)`` float32 arrays.
    """
    mean = np.asarray(bn_weights["moving_mean"], np.float64)
    var = np.asarray(bn_weights["moving_variance"], np.float64)
    gamma = np.asarray(bn_weights.get("gamma", np.ones_like(mean)), np.float64)
    beta = np.asarray(bn_weights.get("beta", np.zeros_like(mean)), np.float64)
    scale = gamma / np.sqrt(var + float(epsilon))
    kernel = np.asarray(kernel, np.float64)
    bias = np.zeros_like(mean) if bias is None else np.asarray(bias, np.float64)
    if depthwise:
        folded = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:
        folded = kernel * scale
    return folded.astype(np.float32), (beta + (bias - mean) * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Building the DPU training model
# --------------------------------------------------------------------------------------------

_CONV_TYPES = ("Conv2D", "DepthwiseConv2D", "Dense")
_ACT_TYPES = ("ReLU", "LeakyReLU", "Activation")
_PASS_TYPES = ("Flatten", "Reshape", "ZeroPadding2D", "UpSampling2D", "MaxPooling2D", "Concatenate", "Softmax")


def _act_kind(cls, config):
    """DPU activation kind of an activation layer config, or None if not DPU-fusable."""
    if cls == "ReLU":
        if config.get("negative_slope", 0) not in (0, 0.0) or config.get("threshold", 0) not in (0, 0.0):
            return None
        max_value = config.get("max_value")
        if max_value is None:
            return "relu"
        return "relu6" if float(max_value) == 6.0 else None
    if cls == "LeakyReLU":
        return "leaky_relu"
    if cls == "Activation":
        return {"relu": "relu", "relu6": "relu6", "linear": "linear"}.get(config.get("activation"))
    return None


def _act_layer(kind, name):
    if kind == "relu":
        return keras.layers.ReLU(name=name)
    if kind == "relu6":
        return keras.layers.ReLU(max_value=6.0, name=name)
    return keras.layers.LeakyReLU(alpha=DPU_LEAKY_ALPHA, name=name)


def quantize_for_dpu(model, calibration_data=None, *, name=None):
    """Builds the DPU-exact QKeras training model of a float Keras model.

    Checks the model against the DPUCZDX8G (see :func:`tfqkd.dpu.compat.check_model`),
    folds every BatchNormalization into the conv/dense before it, drops Dropout, fuses
    ReLU / ReLU6 / LeakyReLU into the preceding conv/dense, replaces average pooling by the DPU's
    fixed-point version and quantizes weights, biases and every tensor the DPU writes with fixed
    8-bit power-of-two positions, then calibrates those positions (:func:`calibrate_dpu_positions`).

    Args:
      model: functional or Sequential float model (e.g. ``tfqkd.create_model("densenet21_dpu")``).
      calibration_data: inputs (an array, ``(x, y)`` or a tf.data.Dataset; up to 256 examples
        are read) for the activation positions; without it activations start at position 4.
      name: name of the new model (default: the float model's).

    Returns:
      a new functional keras.Model (the input model is unchanged) whose forward pass is the
      DPU's arithmetic; train it with ``fit`` or :class:`tfqkd.QKD` and export it with
      :func:`tfqkd.export.to_dpu`.

    Raises:
      TfqkdError: listing every layer the DPU cannot run, or for bad calibration data.
    """
    model = as_functional(model, "quantize_for_dpu()")
    report = check_model(model)
    if not report.ok:
        raise TfqkdError(report.one_line())
    config = model.get_config()
    layers_cfg = config["layers"]
    consumers = config_consumers(layers_cfg)
    by_name = {entry["name"]: entry for entry in layers_cfg}

    tensors = {}  # float-model layer name -> new tensor
    folded_into = {}  # BN name -> conv name
    fused_act = {}  # activation layer name -> conv name
    weight_plan = []  # (new layer name, kernel, bias)
    for entry in layers_cfg:
        name_, cls, cfg = entry["name"], entry["class_name"], entry["config"]
        inputs = [tensors[src] for src in inbound_names(entry)]
        if cls == "InputLayer":
            shape = tuple(cfg["batch_input_shape"][1:])
            inp = keras.Input(shape=shape, name=name_, dtype=cfg.get("dtype", "float32"))
            tensors[name_] = inp
            tensors[name_ + "__raw"] = inp
            tensors[name_] = output_quantizer(name_)(inp)
            continue
        if name_ in folded_into or name_ in fused_act:
            continue  # already produced by its conv
        if cls == "Dropout":
            tensors[name_] = inputs[0]
            continue
        if cls in _CONV_TYPES:
            layer = model.get_layer(name_)
            weights = layer.get_weights()
            kernel, bias = weights[0], (weights[1] if cfg.get("use_bias", True) and len(weights) > 1 else None)
            last = name_
            after = consumers.get(name_, [])
            if len(after) == 1 and by_name[after[0]]["class_name"] == "BatchNormalization":
                bn_name = after[0]
                bn = model.get_layer(bn_name)
                bn_w = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in bn.weights}
                kernel, bias = fold_batchnorm(kernel, bias, bn_w, bn.epsilon, depthwise=cls == "DepthwiseConv2D")
                folded_into[bn_name] = name_
                last = bn_name
            if bias is None:
                outputs_ = kernel.shape[2] * kernel.shape[3] if cls == "DepthwiseConv2D" else kernel.shape[-1]
                bias = np.zeros(outputs_, np.float32)
            conv_act = cfg.get("activation", "linear")
            act_kind = {"linear": None, "relu": "relu", "relu6": "relu6", "softmax": "softmax"}[conv_act]
            act_name = name_ + "_act"
            after = consumers.get(last, [])
            if act_kind is None and len(after) == 1:
                nxt = by_name[after[0]]
                kind = _act_kind(nxt["class_name"], nxt["config"])
                if kind not in (None, "linear"):
                    act_kind, act_name = kind, nxt["name"]
                    fused_act[act_name] = name_
            common = dict(
                kernel_quantizer=DPUQuantizer(rounding="even"),
                bias_quantizer=DPUQuantizer(rounding="even"),
                use_bias=True,
                name=name_,
            )
            if cls == "Conv2D":
                new = QConv2D(
                    cfg["filters"], cfg["kernel_size"], strides=cfg["strides"], padding=cfg["padding"],
                    dilation_rate=cfg["dilation_rate"], **common,
                )
            elif cls == "DepthwiseConv2D":
                common["depthwise_quantizer"] = common.pop("kernel_quantizer")
                new = QDepthwiseConv2D(
                    cfg["kernel_size"], strides=cfg["strides"], padding=cfg["padding"],
                    depth_multiplier=cfg["depth_multiplier"], dilation_rate=cfg["dilation_rate"], **common,
                )
            else:
                new = QDense(cfg["units"], **common)
            y = new(inputs[0])
            weight_plan.append((name_, kernel, bias))
            if act_kind == "softmax":
                y = output_quantizer(name_)(y)
                tensors[name_] = tensors[last] = keras.layers.Softmax(name=name_ + "_softmax")(y)
                continue
            if act_kind is not None:
                y = _act_layer(act_kind, act_name)(y)
            y = output_quantizer(act_name if act_kind else name_)(y)
            tensors[name_] = tensors[last] = y
            if act_name in fused_act:
                tensors[act_name] = y
            continue
        if cls in ("AveragePooling2D", "GlobalAveragePooling2D"):
            if cls == "GlobalAveragePooling2D":
                new = DPUAveragePooling2D(global_pool=True, keepdims=bool(cfg.get("keepdims", False)), name=name_)
            else:
                new = DPUAveragePooling2D(cfg["pool_size"][0], cfg["strides"][0], name=name_)
            tensors[name_] = output_quantizer(name_)(new(inputs[0]))
            continue
        if cls in ("Add", "Multiply"):
            new = getattr(keras.layers, cls)(name=name_)
            tensors[name_] = output_quantizer(name_)(new(inputs))
            continue
        if cls in _PASS_TYPES:
            new = keras.layers.deserialize({"class_name": cls, "config": dict(cfg)})
            tensors[name_] = new(inputs if cls == "Concatenate" else inputs[0])
            continue
        if cls == "Activation" and cfg.get("activation") == "linear":
            tensors[name_] = inputs[0]
            continue
        raise TfqkdError(f"layer '{name_}' ({cls}) is not supported by the DPU exporter")

    outputs = [tensors[item[0]] for item in config["output_layers"]]
    inputs = [tensors[item[0] + "__raw"] for item in config["input_layers"]]
    dpu_model = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=name or model.name)
    for layer_name, kernel, bias in weight_plan:
        layer = dpu_model.get_layer(layer_name)
        current = layer.get_weights()
        layer.set_weights([kernel, bias] + current[2:])
    calibrate_dpu_positions(dpu_model, calibration_data)
    return dpu_model


def calibrate_dpu_positions(model, calibration_data=None):
    """(Re)computes every position of a DPU training model and enforces the DPU's limits.

    Weights and biases get the position with the least squared error (Vitis ``method`` 1);
    activations the non-overflow position of the float activations of ``calibration_data``;
    then concatenation groups share their minimum, pooling keeps its input position and the
    kernel/bias positions are moved into the shift limits
    (:func:`tfqkd.dpu.positions.solve_positions`).

    Args:
      model: a model from :func:`quantize_for_dpu`.
      calibration_data: one batch of inputs, a tf.data.Dataset, or None to keep the current
        activation positions.

    Returns:
      dict node name -> positions, as assigned.

    Raises:
      TfqkdError: not a DPU model, or calibration data that does not fit.
    """
    if not is_dpu_model(model):
        raise TfqkdError("calibrate_dpu_positions() needs a model built by quantize_for_dpu()")
    graph = graph_from_dpu_model(model, read_positions=False)
    batch = calibration_inputs(calibration_data)
    act_absmax = {}
    if batch is not None:
        quantizers = [getattr(layer, "quantizer", None) for layer in model.layers]
        quantizers = [q for q in quantizers if isinstance(q, DPUQuantizer)]
        probes = {node.name: model.get_layer(node.out_layer).output for node in graph.nodes if node.out_layer}
        for q in quantizers:
            q.bypass = True
        try:
            values = keras.Model(model.inputs, list(probes.values()))(batch, training=False)
        except (ValueError, TypeError) as err:
            raise TfqkdError(f"calibration data does not fit the model input: {str(err).splitlines()[0]}") from None
        finally:
            for q in quantizers:
                q.bypass = False
        values = values if isinstance(values, (list, tuple)) else [values]
        act_absmax = {n: float(np.max(np.abs(np.asarray(v)))) for n, v in zip(probes, values)}
    current = {
        node.name: model.get_layer(node.out_layer).quantizer.position()
        for node in graph.nodes
        if node.out_layer
    }
    solved = solve_positions(graph, act_absmax=act_absmax, act_default=current)
    for node in graph.nodes:
        pos = solved[node.name]
        if node.out_layer:
            model.get_layer(node.out_layer).quantizer.pos.assign([float(pos["output"])])
        if node.op in WEIGHTED_OPS:
            layer = model.get_layer(node.name)
            wq = layer.depthwise_quantizer_internal if node.op == "depthwise_conv2d" else layer.kernel_quantizer_internal
            wq.pos.assign([float(pos["kernel"])])
            layer.bias_quantizer_internal.pos.assign([float(pos["bias"])])
    return solved


#: The DPU as a quantization target: ``quantize(model, "dpu")`` (or any policy with
#: ``target: dpu``) builds :func:`quantize_for_dpu`'s model.
DPU_TARGET = register_target(
    QuantTarget(
        name="dpu",
        spec=DPU_SPEC,
        build=quantize_for_dpu,
        custom_objects=dpu_custom_objects,
        description="Xilinx DPUCZDX8G (Vitis-AI pof2s): BN folded, every tensor the DPU writes on an 8-bit power-of-two grid",
    )
)
