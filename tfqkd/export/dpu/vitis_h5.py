"""``quantized.h5`` in the Vitis-AI TF2 quantizer format, written and read with h5py.

The layout is what ``vai_q_tensorflow2`` saves after quantization and what
``vai_c_tensorflow2 -m quantized.h5 -a arch.json`` compiles. Sources relied on
(Xilinx/Vitis-AI, ``src/vai_quantizer/vai_q_tensorflow2.x/.../quantization/keras/vitis``):

* ``common/vitis_quantize_wrapper.py``: ``Vitis>QuantizeWrapper`` named ``quant_<layer>``,
  config ``{layer, quantize_config, mode}``; quantizer state is built on the wrapper with the
  weight's short name (``kernel_pos``, ``bias_pos``, ``output_0_pos``) next to an int32
  ``optimizer_step``; the inner layer's weights keep the inner name (``<layer>/kernel:0``);
* ``common/vitis_quantize_configs.py``: ``Vitis>VitisQuantizeConfig`` with
  ``quantizable_weights`` / ``weight_quantizers``, ``quantizable_biases`` / ``bias_quantizers``,
  ``quantizable_activations`` / ``activation_quantizers``, ``quantizable_outputs`` /
  ``output_quantizers``; quantizers are dicts ``{quantizer_type, quantizer_params}``;
* ``common/vitis_quantizers.py``: ``Pof2SQuantizer(bit_width, method, round_mode, symmetry,
  per_channel, channel_axis, unsigned, narrow_range)`` with weights ``<name>_min``, ``_max``,
  ``_pos``;
* ``common/vitis_quantize_aware_activation.py``: a conv's fused activation is a
  ``Vitis>QuantizeAwareActivation`` holding ``linear`` (quantized after: ``post_activation_pos``)
  or ``Vitis>NoQuantizeActivation`` when a ReLU layer follows (``ConvActivationQuantize``);
* ``layers/vitis_quantize.py``: the input is a ``Vitis>VitisQuantize`` layer ``quant_<input>``
  whose quantizer is built under its own name (``quant_<input>_pos``);
* ``layers/vitis_pooling.py`` and ``vitis_pof2s_quantize_transforms.py``
  (``ConvertAveragePooling2DToDpuVersion``, ``ConvertGlobalAveragePooling2DToDpuVersion``): the
  pof2s strategy replaces average pools by the DPU's versions, which multiply Keras' mean by
  ``k*k * num / 2**shift`` so that it is the DPU's ``sum * num / 2**shift``
  (:func:`tfqkd.dpu.arithmetic.avgpool_factor`). They keep the Keras config (the factor follows
  from the class and the window; an extra config key would break Vitis' ``from_config``) and are
  registered as ``Vitis>AveragePooling2D`` (``register_keras_serializable(package='Vitis',
  name='AveragePooling2D')``: the class ``VitisAveragePooling2D`` saves under that name) and
  ``Vitis>VitisGlobalAveragePooling2D``; the pof2s pattern transforms match them by these
  names, and the registry wraps them with an output quantizer. tfqkd writes these names;
  the reader also takes the plain Keras names (tfqkd's files before) and
  ``Vitis>VitisAveragePooling2D``;
* ``quantize_strategy/pof2s/vitis_pof2s_quantize_strategy.json``: 8-bit, weights
  ``method 1, round_mode 0`` (half even), activations ``method 1, round_mode 1`` (half up),
  input ``method 0, round_mode 1``.

The compiler's reader (xnnc ``tensorflow_translator.py``, TF2 branch) strips ``Vitis>``, reads
``kernel:0`` / ``bias:0`` under the inner layer name and ``kernel_pos:0``, ``bias_pos:0``,
``post_activation_pos:0``, ``output_0_pos:0`` under the wrapper name, and the input shape from
the InputLayer's ``batch_input_shape``. Files are written to a temporary name and renamed, so a
failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from tfqkd.dpu.graph import WEIGHTED_OPS, DPUGraph, DPUNode
from tfqkd.errors import TfqkdError
from tfqkd.graph import inbound_names

__all__ = ["QUANTIZE_MODE", "read_quantized_h5", "write_quantized_h5"]

#: Wrapper mode of a finished (calibrated, evaluated) Vitis quantized model.
QUANTIZE_MODE = "QCBEV"
_KERAS_VERSION = "2.12.0"  # the tf.keras of the Vitis-AI 3.5 TF2 container


def _pof2s(method, round_mode):
    return {
        "quantizer_type": "Pof2SQuantizer",
        "quantizer_params": {
            "bit_width": 8, "method": method, "round_mode": round_mode, "symmetry": True,
            "per_channel": False, "channel_axis": -1, "unsigned": False, "narrow_range": False,
        },
    }


_WEIGHT_Q = _pof2s(1, 0)
_ACT_Q = _pof2s(1, 1)
_INPUT_Q = _pof2s(0, 1)
#: The class names written for the inner layers (the pools: Vitis-AI's DPU versions).
_KERAS_CLASS = {
    "conv2d": "Conv2D", "depthwise_conv2d": "DepthwiseConv2D", "dense": "Dense",
    "avgpool": "Vitis>AveragePooling2D", "gap": "Vitis>VitisGlobalAveragePooling2D", "maxpool": "MaxPooling2D",
    "concat": "Concatenate", "add": "Add", "multiply": "Multiply", "flatten": "Flatten", "reshape": "Reshape",
    "zeropad": "ZeroPadding2D", "upsampling": "UpSampling2D", "softmax": "Softmax",
}  # fmt: skip
#: Every inner class name the reader takes: the written ones, the plain Keras pools (tfqkd's
#: files before it wrote Vitis' names) and the Python class name of Vitis' average pool.
_OP_OF = {
    **{v: k for k, v in _KERAS_CLASS.items()},
    "AveragePooling2D": "avgpool",
    "Vitis>VitisAveragePooling2D": "avgpool",
    "GlobalAveragePooling2D": "gap",
}
_ACT_CLASS = {"relu": "ReLU", "relu6": "ReLU", "leaky_relu": "LeakyReLU"}
_NO_OUTPUT_QUANT = ("flatten", "reshape", "zeropad", "softmax")


def _quantize_config(weights=(), biases=(), activations=(), outputs=()):
    return {
        "class_name": "Vitis>VitisQuantizeConfig",
        "config": {
            "quantizable_weights": [w for w, _ in weights],
            "weight_quantizers": [q for _, q in weights],
            "quantizable_biases": [b for b, _ in biases],
            "bias_quantizers": [q for _, q in biases],
            "quantizable_activations": [a for a, _ in activations],
            "activation_quantizers": [q for _, q in activations],
            "quantizable_outputs": [o for o, _ in outputs],
            "output_quantizers": [q for _, q in outputs],
        },
    }


def _pos_weights(prefix, role, pos):
    """The three Pof2SQuantizer weights ``<role>_min/_max/_pos`` of a quantizer at ``pos``."""
    step = 2.0 ** -int(pos)
    return [
        (f"{prefix}/{role}_min:0", np.float32(-128 * step)),
        (f"{prefix}/{role}_max:0", np.float32(127 * step)),
        (f"{prefix}/{role}_pos:0", np.float32(pos)),
    ]


def _wrapper(name, inner_cls, inner_cfg, quantize_config, inbound):
    wrapper_name = f"quant_{name}"
    return {
        "class_name": "Vitis>QuantizeWrapper",
        "config": {
            "name": wrapper_name,
            "trainable": True,
            "dtype": "float32",
            "layer": {"class_name": inner_cls, "config": inner_cfg},
            "quantize_config": quantize_config,
            "mode": QUANTIZE_MODE,
        },
        "name": wrapper_name,
        "inbound_nodes": [[[src, 0, 0, {}] for src in inbound]],
    }


def _layers_and_weights(graph):
    """Model-config layers and ``{layer: [(weight name, array)]}`` of a DPU graph."""
    layers, weights = [], {}
    h5_name = {}  # node name -> name of the .h5 layer producing its tensor
    for node in graph.nodes:
        if node.op == "input":
            h, w, c = node.shape
            layers.append({
                "class_name": "InputLayer",
                "config": {"batch_input_shape": [None, h, w, c], "dtype": "float32", "sparse": False, "ragged": False, "name": node.name},
                "name": node.name,
                "inbound_nodes": [],
            })
            weights[node.name] = []
            qname = f"quant_{node.name}"
            layers.append({
                "class_name": "Vitis>VitisQuantize",
                "config": {
                    "name": qname, "trainable": True, "dtype": "float32",
                    "quantizer": {"class_name": "Vitis>Pof2SQuantizer", "config": dict(_INPUT_Q["quantizer_params"])},
                    "mode": QUANTIZE_MODE,
                },
                "name": qname,
                "inbound_nodes": [[[node.name, 0, 0, {}]]],
            })
            weights[qname] = _pos_weights(qname, qname, node.pos["output"]) + [(f"{qname}/optimizer_step:0", np.int32(-1))]
            h5_name[node.name] = qname
            continue
        inbound = [h5_name[s] for s in node.inputs]
        wname = f"quant_{node.name}"
        step = [(f"{wname}/optimizer_step:0", np.int32(-1))]
        if node.op in WEIGHTED_OPS:
            role = "depthwise_kernel" if node.op == "depthwise_conv2d" else "kernel"
            inner = dict(node.config)
            fused = node.act is not None
            inner["activation"] = {
                "class_name": "Vitis>QuantizeAwareActivation",
                "config": {"activation": {"class_name": "Vitis>NoQuantizeActivation", "config": {}} if fused else "linear"},
            }
            inner["use_bias"] = True
            qc = _quantize_config([(role, _WEIGHT_Q)], [("bias", _WEIGHT_Q)], [("activation", _ACT_Q)])
            layers.append(_wrapper(node.name, _KERAS_CLASS[node.op], inner, qc, inbound))
            ws = [
                (f"{node.name}/{role}:0", np.asarray(node.weights["kernel"], np.float32)),
                (f"{node.name}/bias:0", np.asarray(node.weights["bias"], np.float32)),
            ] + step + _pos_weights(wname, role, node.pos["kernel"]) + _pos_weights(wname, "bias", node.pos["bias"])
            if not fused:
                ws += _pos_weights(wname, "post_activation", node.pos["output"])
            weights[wname] = ws
            h5_name[node.name] = wname
            if fused:
                aname = f"quant_{node.act_name}"
                if node.act == "leaky_relu":
                    act_cfg = {"name": node.act_name, "trainable": True, "dtype": "float32", "alpha": 26.0 / 256.0}
                else:
                    act_cfg = {
                        "name": node.act_name, "trainable": True, "dtype": "float32",
                        "max_value": 6.0 if node.act == "relu6" else None, "negative_slope": 0.0, "threshold": 0.0,
                    }
                layers.append(_wrapper(node.act_name, _ACT_CLASS[node.act], act_cfg, _quantize_config(outputs=[(0, _ACT_Q)]), [wname]))
                weights[aname] = [(f"{aname}/optimizer_step:0", np.int32(-1))] + _pos_weights(aname, "output_0", node.pos["output"])
                h5_name[node.name] = aname
            continue
        inner = dict(node.config)
        if node.op in _NO_OUTPUT_QUANT:
            layers.append(_wrapper(node.name, _KERAS_CLASS[node.op], inner, _quantize_config(), inbound))
            weights[wname] = step
        else:
            layers.append(_wrapper(node.name, _KERAS_CLASS[node.op], inner, _quantize_config(outputs=[(0, _ACT_Q)]), inbound))
            weights[wname] = step + _pos_weights(wname, "output_0", graph.output_pos(node.name))
        h5_name[node.name] = wname
    outputs = [[h5_name[name], 0, 0] for name in graph.outputs]
    return layers, weights, outputs


def write_quantized_h5(graph, path):
    """Writes a positioned DPU graph as a Vitis-AI TF2 quantized Keras HDF5 model.

    Args:
      graph: a :class:`~tfqkd.dpu.graph.DPUGraph` meeting the DPU limits.
      path: destination (``quantized.h5``); written atomically (temp file + rename).

    Returns:
      the Path written.
    """
    path = Path(path)
    layers, weights, outputs = _layers_and_weights(graph)
    model_config = {
        "class_name": "Functional",
        "config": {
            "name": graph.name,
            "layers": layers,
            "input_layers": [[graph.nodes[0].name, 0, 0]],
            "output_layers": outputs,
        },
        "keras_version": _KERAS_VERSION,
        "backend": "tensorflow",
    }
    fd, tmp = tempfile.mkstemp(prefix=".quantized-", suffix=".h5", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["keras_version"] = _KERAS_VERSION
            handle.attrs["backend"] = "tensorflow"
            handle.attrs["model_config"] = json.dumps(model_config)
            group = handle.create_group("model_weights")
            group.attrs["layer_names"] = [layer["name"].encode("utf8") for layer in layers]
            group.attrs["backend"] = "tensorflow"
            group.attrs["keras_version"] = _KERAS_VERSION
            for layer in layers:
                lgroup = group.create_group(layer["name"])
                entries = weights.get(layer["name"], [])
                lgroup.attrs["weight_names"] = [n.encode("utf8") for n, _ in entries]
                for weight_name, value in entries:
                    lgroup.create_dataset(weight_name, data=value)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _weight_table(handle):
    """``{h5 layer: {short weight name ("kernel_pos:0"): array}}`` and inner-layer weights."""
    table = {}
    group = handle["model_weights"]
    for lname in group.attrs["layer_names"]:
        lname = lname.decode() if isinstance(lname, bytes) else lname
        for wname in group[lname].attrs["weight_names"]:
            wname = wname.decode() if isinstance(wname, bytes) else wname
            owner, short = wname.split("/", 1)
            table.setdefault(owner, {})[short] = np.asarray(group[lname][wname])
    return table


def read_quantized_h5(path):
    """Rebuilds the DPU graph from a ``quantized.h5`` alone (h5py + its JSON config).

    Args:
      path: a file written by :func:`write_quantized_h5` (or a Vitis-AI TF2 quantized model
        made of the same layer types).

    Returns:
      a :class:`~tfqkd.dpu.graph.DPUGraph` for the emulator.

    Raises:
      TfqkdError: unreadable file or an unsupported layer.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            raw = handle.attrs["model_config"]
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            table = _weight_table(handle)
    except (OSError, KeyError, ValueError) as err:
        raise TfqkdError(f"{path} is not a readable Vitis-AI quantized model ({type(err).__name__})") from None
    nodes, order, alias = {}, [], {}

    def pos_of(owner, role):
        return int(round(float(table[owner][f"{role}_pos:0"])))

    for layer in config["config"]["layers"]:
        cls, name = layer["class_name"], layer["name"]
        inbound = [alias.get(source, source) for source in inbound_names(layer)]
        if cls == "InputLayer":
            shape = tuple(int(d) for d in layer["config"]["batch_input_shape"][1:])
            node = DPUNode(name, "input", [], config=dict(layer["config"]), shape=shape)
        elif cls == "Vitis>VitisQuantize":
            nodes[inbound[0]].pos["output"] = pos_of(name, name)
            alias[name] = inbound[0]
            continue
        elif cls == "Vitis>QuantizeWrapper":
            inner = layer["config"]["layer"]
            inner_cls, inner_cfg = inner["class_name"], dict(inner["config"])
            inner_name = inner_cfg["name"]
            if inner_cls in ("ReLU", "LeakyReLU"):
                target = nodes[inbound[0]]
                if inner_cls == "LeakyReLU":
                    target.act = "leaky_relu"
                else:
                    target.act = "relu6" if inner_cfg.get("max_value") is not None else "relu"
                target.act_name = inner_name
                target.pos["output"] = pos_of(name, "output_0")
                alias[name] = target.name
                continue
            op = _OP_OF.get(inner_cls)
            if op is None:
                raise TfqkdError(f"{path}: layer '{name}' ({inner_cls}) is not supported by the DPU emulator")
            node = DPUNode(inner_name, op, inbound, config=inner_cfg)
            if op in WEIGHTED_OPS:
                role = "depthwise_kernel" if op == "depthwise_conv2d" else "kernel"
                node.weights = {"kernel": table[inner_name][f"{role}:0"], "bias": table[inner_name]["bias:0"]}
                node.pos["kernel"] = pos_of(name, role)
                node.pos["bias"] = pos_of(name, "bias")
                if "post_activation_pos:0" in table.get(name, {}):
                    node.pos["output"] = pos_of(name, "post_activation")
            elif "output_0_pos:0" in table.get(name, {}):
                node.pos["output"] = pos_of(name, "output_0")
            alias[name] = inner_name
            name = inner_name
        else:
            raise TfqkdError(f"{path}: layer '{name}' ({cls}) is not a Vitis-AI quantized layer")
        nodes[name] = node
        order.append(node)
    outputs = [alias.get(item[0], item[0]) for item in config["config"]["output_layers"]]
    return DPUGraph(config["config"]["name"], order, outputs)
