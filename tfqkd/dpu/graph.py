"""The DPU graph: the layers the DPU runs, with folded float weights and 8-bit positions.

Thesis 6.1: BatchNormalization folded into the conv/dense before it, Dropout removed, only
DPU layer types. A :class:`DPUGraph` is what the Vitis-AI HDF5 writer
(:mod:`tfqkd.export.dpu.vitis_h5`) serialises, what its reader rebuilds from the file alone,
and what the emulator (:mod:`tfqkd.dpu.emulator`) executes. It is built from the DPU
training model of :func:`tfqkd.dpu.quantize_for_dpu`, in which the folding already
happened (thesis 6.1: the DPU variants put each BN right after its conv so it folds).

Node operations: ``input``, ``conv2d``, ``depthwise_conv2d``, ``dense`` (with a fused
``relu`` / ``relu6`` / ``leaky_relu`` activation or none), ``avgpool``, ``gap``, ``maxpool``,
``concat``, ``add``, ``multiply``, ``flatten``, ``reshape``, ``zeropad``, ``upsampling``,
``softmax``. Positions: ``output`` for every tensor the DPU writes; ``kernel`` and ``bias`` for
weighted nodes.
"""

from __future__ import annotations

import dataclasses

from tfqkd.compat import keras
from tfqkd.dpu.arithmetic import codes
from tfqkd.dpu.layers import DPUAveragePooling2D, DPUQuantizer
from tfqkd.errors import TfqkdError
from tfqkd.graph import inbound_names

__all__ = [
    "PASS_OPS",
    "QUANTIZED_OUTPUT_OPS",
    "WEIGHTED_OPS",
    "DPUGraph",
    "DPUNode",
    "bias_codes",
    "graph_from_dpu_model",
    "kernel_codes",
    "pair",
]

WEIGHTED_OPS = ("conv2d", "depthwise_conv2d", "dense")
#: Ops whose output tensor carries its own quantizer (others inherit the input position).
QUANTIZED_OUTPUT_OPS = ("input",) + WEIGHTED_OPS + ("avgpool", "gap", "add", "multiply")
PASS_OPS = ("maxpool", "concat", "flatten", "reshape", "zeropad", "upsampling", "softmax")

_KERAS_OP = {
    "QConv2D": "conv2d",
    "QDepthwiseConv2D": "depthwise_conv2d",
    "QDense": "dense",
    "MaxPooling2D": "maxpool",
    "Concatenate": "concat",
    "Add": "add",
    "Multiply": "multiply",
    "Flatten": "flatten",
    "Reshape": "reshape",
    "ZeroPadding2D": "zeropad",
    "UpSampling2D": "upsampling",
    "Softmax": "softmax",
}


@dataclasses.dataclass
class DPUNode:
    """One DPU layer.

    Attributes:
      name: the layer name (the Keras layer of the float model; ``quant_<name>`` in the .h5).
      op: operation (see module docstring).
      inputs: names of the input nodes.
      config: the plain Keras layer config written into the .h5.
      weights: float ``kernel`` / ``bias`` (weighted ops, BN already folded).
      pos: positions: ``output`` and, for weighted ops, ``kernel`` and ``bias``.
      act: fused activation ``relu`` / ``relu6`` / ``leaky_relu`` or None.
      act_name: layer name of the fused activation (its own wrapper in the .h5).
      out_layer: name of the training-model layer holding the output quantizer (in memory only).
      shape: input shape ``(H, W, C)`` for the input node.
    """

    name: str
    op: str
    inputs: list
    config: dict = dataclasses.field(default_factory=dict)
    weights: dict = dataclasses.field(default_factory=dict)
    pos: dict = dataclasses.field(default_factory=dict)
    act: str | None = None
    act_name: str | None = None
    out_layer: str | None = None
    shape: tuple | None = None


@dataclasses.dataclass
class DPUGraph:
    """Topologically ordered DPU nodes and the output node names."""

    name: str
    nodes: list
    outputs: list

    def node(self, name):
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def by_name(self):
        return {node.name: node for node in self.nodes}

    def output_pos(self, name):
        """Position of the tensor produced by node ``name`` (pass-through ops inherit it)."""
        nodes = self.by_name()
        node = nodes[name]
        while "output" not in node.pos:
            if not node.inputs:
                raise TfqkdError(f"DPU node '{name}' has no position")
            node = nodes[node.inputs[0]]
        return int(node.pos["output"])


def pair(value):
    """A Keras size argument (``3`` or ``(3, 3)``) as a tuple of two ints."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _plain_config(keras_cls, **kwargs):
    return getattr(keras.layers, keras_cls)(**kwargs).get_config()


def graph_from_dpu_model(model, *, read_positions=True):
    """Builds the DPU graph of a model from :func:`tfqkd.dpu.quantize_for_dpu`.

    Args:
      model: the DPU training model (trained or not).
      read_positions: read the positions from the model's quantizers (False while calibrating).

    Returns:
      a :class:`DPUGraph`.

    Raises:
      TfqkdError: the model holds layers that are not part of a DPU training model.
    """
    config = model.get_config()
    alias = {}
    nodes = {}
    order = []

    def src(name):
        return alias.get(name, name)

    for entry in config["layers"]:
        name, cls, cfg = entry["name"], entry["class_name"], entry["config"]
        inputs = [src(s) for s in inbound_names(entry)]
        layer = model.get_layer(name)
        node = None
        if cls == "InputLayer":
            shape = tuple(int(d) for d in cfg["batch_input_shape"][1:])
            node = DPUNode(name, "input", [], config=dict(cfg), shape=shape)
        elif cls == "QActivation" and isinstance(getattr(layer, "quantizer", None), DPUQuantizer):
            target = nodes[inputs[0]]
            if target.out_layer is not None:
                raise TfqkdError(f"tensor of '{target.name}' is quantized twice ({target.out_layer}, {name})")
            target.out_layer = name
            if read_positions:
                target.pos["output"] = layer.quantizer.position()
            alias[name] = target.name
            continue
        elif cls in ("QConv2D", "QDepthwiseConv2D", "QDense"):
            op = _KERAS_OP[cls]
            weights = layer.get_weights()
            kernel_q = layer.depthwise_quantizer_internal if op == "depthwise_conv2d" else layer.kernel_quantizer_internal
            if not isinstance(kernel_q, DPUQuantizer) or not isinstance(layer.bias_quantizer_internal, DPUQuantizer):
                raise TfqkdError(f"layer '{name}' is not quantized with the DPU quantizer; build the model with quantize_for_dpu()")
            if op == "conv2d":
                plain = _plain_config(
                    "Conv2D", filters=cfg["filters"], kernel_size=cfg["kernel_size"], strides=cfg["strides"],
                    padding=cfg["padding"], dilation_rate=cfg["dilation_rate"], use_bias=True, name=name,
                )
            elif op == "depthwise_conv2d":
                plain = _plain_config(
                    "DepthwiseConv2D", kernel_size=cfg["kernel_size"], strides=cfg["strides"], padding=cfg["padding"],
                    depth_multiplier=cfg["depth_multiplier"], dilation_rate=cfg["dilation_rate"], use_bias=True, name=name,
                )
            else:
                plain = _plain_config("Dense", units=cfg["units"], use_bias=True, name=name)
            node = DPUNode(name, op, inputs, config=plain, weights={"kernel": weights[0], "bias": weights[1]})
            if read_positions:
                node.pos["kernel"] = kernel_q.position()
                node.pos["bias"] = layer.bias_quantizer_internal.position()
        elif cls in ("ReLU", "LeakyReLU"):
            target = nodes[inputs[0]]
            if target.op not in WEIGHTED_OPS or target.act is not None or target.out_layer is not None:
                raise TfqkdError(f"activation '{name}' does not directly follow a conv/dense in the DPU model")
            if cls == "LeakyReLU":
                target.act = "leaky_relu"
            else:
                target.act = "relu6" if cfg.get("max_value") is not None else "relu"
            target.act_name = name
            alias[name] = target.name
            continue
        elif isinstance(layer, DPUAveragePooling2D):
            if layer.global_pool:
                node = DPUNode(name, "gap", inputs, config=_plain_config("GlobalAveragePooling2D", keepdims=layer.keepdims, name=name))
            else:
                node = DPUNode(
                    name, "avgpool", inputs,
                    config=_plain_config("AveragePooling2D", pool_size=layer.pool_size, strides=layer.strides, padding="valid", name=name),
                )
        elif cls in _KERAS_OP:
            plain = layer.get_config()
            node = DPUNode(name, _KERAS_OP[cls], inputs, config=plain)
        else:
            raise TfqkdError(f"layer '{name}' ({cls}) is not part of a DPU training model")
        nodes[name] = node
        order.append(node)
    outputs = [src(item[0]) for item in config["output_layers"]]
    return DPUGraph(model.name, order, outputs)


def kernel_codes(node):
    """Integer kernel codes (half-to-even rounding, int8 range) of a weighted node."""
    return codes(node.weights["kernel"], node.pos["kernel"], "even")


def bias_codes(node):
    """Integer bias codes (half-to-even rounding, int8 range) of a weighted node."""
    return codes(node.weights["bias"], node.pos["bias"], "even")
