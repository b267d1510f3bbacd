"""The stock QKeras depthwise convolutions in a form hls4ml 1.3 computes as QKeras does.

hls4ml 1.3 mis-lowers a ``QDepthwiseConv2D`` in two ways, both measured on a lone layer (8x8x4
input, 3x3 kernel, Vitis backend, io_parallel and io_stream alike; stride and padding make no
difference):

* ``QKerasFactorizeAlpha`` (hls4ml/model/optimizer/passes/qkeras.py) moves a quantizer's ``alpha``
  into an ApplyAlpha layer only for Dense and Conv layers. A depthwise kernel keeps its alpha
  folded into the weights, which are then cast to the quantizer's fixed-point type
  ``fixed<bits, integer + 1>``: truncated (alpha 0.37: outputs off by 0.025 of 1.2) or wrapped
  (alpha 2.5: off by 3.9 of 5). tfqkd exports every learned, non-power-of-two weight step as an alpha.
* ``FuseBatchNormalization`` (hls4ml/model/optimizer/passes/bn_fuse.py) refuses to fold a
  BatchNormalization into a layer with a ``weight_quantizer``, but a depthwise layer names its
  quantizer ``depthwise_quantizer``: the BN is folded in and the scaled weights are cast to the
  quantizer's 8-bit type (alpha 1: off by 3.6 of 5.6).

So the model handed to hls4ml carries each depthwise alpha outside the layer, where the
following BatchNormalization takes it exactly (``gamma * alpha``, ``moving_mean / alpha``), or a
BatchNormalization added for it; and :func:`quantized_depthwise_layers` names the layers whose
output type must be set explicitly, which is what keeps hls4ml's BN fusion away from them.
"""

import numpy as np

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.export.qkeras import stock_config
from tfqkd.graph import config_consumers, config_outputs
from tfqkd.quant.transform import qkeras_custom_objects, rename_references

__all__ = ["factor_depthwise_alpha", "quantized_depthwise_layers"]

_SCALE_SUFFIX = "_alpha"
#: Activations f with f(x / alpha) * alpha == f(x) for alpha > 0.
_HOMOGENEOUS = (None, "linear", "relu")


def quantized_depthwise_layers(model):
    """Names of the ``QDepthwiseConv2D`` layers of ``model`` with a depthwise quantizer."""
    return [
        layer.name
        for layer in model.layers
        if type(layer).__name__ == "QDepthwiseConv2D" and getattr(layer, "depthwise_quantizer", None)
    ]


def _alpha(entry):
    quantizer = entry["config"].get("depthwise_quantizer") or {}
    alpha = quantizer.get("config", {}).get("alpha")
    return float(alpha) if isinstance(alpha, (int, float)) and alpha != 1 else None


def _consumers(config, name):
    """The config entries of the layers reading layer ``name``."""
    by_name = {entry["name"]: entry for entry in config["layers"]}
    return [by_name[reader] for reader in config_consumers(config["layers"]).get(name, [])]


def _foldable_bn(config, name, outputs):
    """The BatchNormalization that alone reads layer ``name`` and can take a scale, or None."""
    consumers = _consumers(config, name)
    if len(consumers) != 1 or name in outputs:
        return None
    bn = consumers[0]
    if bn["class_name"] != "BatchNormalization" or not bn["config"].get("scale", True):
        return None
    return bn


def factor_depthwise_alpha(model):
    """``model`` with every depthwise quantizer's alpha applied after its layer instead of inside it.

    Args:
      model: a functional model of stock QKeras layers (:func:`tfqkd.export.qkeras.stock_qkeras_model`),
        whose depthwise kernels are stored divided by their quantizer's alpha.

    Returns:
      ``(model, moved)``: the same computation with each such quantizer at ``alpha=1``, the layer's
      bias divided by alpha and alpha multiplied in after the layer; ``moved`` maps each layer
      name to where alpha went (the following BatchNormalization, or one added for it).

    Raises:
      TfqkdError: a depthwise layer with an alpha and an activation of its own other than relu.
    """
    config = stock_config(model)
    weights = {layer.name: layer.get_weights() for layer in model.layers}
    outputs = config_outputs(config)
    moved = {}
    for entry in list(config["layers"]):
        if entry["class_name"] != "QDepthwiseConv2D" or _alpha(entry) is None:
            continue
        name, alpha = entry["name"], _alpha(entry)
        # alpha=1, not None: QKeras turns a weight quantizer's alpha=None into "auto_po2".
        entry["config"]["depthwise_quantizer"]["config"]["alpha"] = 1.0
        if entry["config"].get("use_bias"):
            weights[name][1] = weights[name][1] / alpha
        if entry["config"].get("activation") not in _HOMOGENEOUS:
            # alpha > 0 commutes with linear and relu, not with a quantizer or a squashing function
            raise TfqkdError(
                f"layer '{name}': a quantized depthwise conv with alpha {alpha:.6g} and activation "
                f"{entry['config']['activation']!r} inside has no exact hls4ml form"
            )
        bn = _foldable_bn(config, name, outputs)
        if bn is not None:
            bn_weights = dict(zip(_bn_slots(bn["config"]), weights[bn["name"]]))
            bn_weights["gamma"] = bn_weights["gamma"] * alpha
            bn_weights["moving_mean"] = bn_weights["moving_mean"] / alpha
            weights[bn["name"]] = [bn_weights[slot] for slot in _bn_slots(bn["config"])]
            moved[name] = bn["name"]
            continue
        moved[name] = _add_scale(config, weights, entry, alpha)
    if not moved:
        return model, moved
    rebuilt = keras.Model.from_config(config, custom_objects=qkeras_custom_objects())
    for layer in rebuilt.layers:
        layer.set_weights(weights[layer.name])
    return rebuilt, moved


def _bn_slots(bn_config):
    slots = ["gamma"] if bn_config.get("scale", True) else []
    if bn_config.get("center", True):
        slots.append("beta")
    return slots + ["moving_mean", "moving_variance"]


def _add_scale(config, weights, entry, alpha):
    """Inserts after ``entry`` a BatchNormalization that multiplies by ``alpha``; returns its name."""
    name = entry["name"]
    scale_name = f"{name}{_SCALE_SUFFIX}"
    channels = weights[name][0].shape[2] * weights[name][0].shape[3]  # (h, w, in, depth_multiplier)
    epsilon = 1e-3
    for other in config["layers"]:
        other["inbound_nodes"] = rename_references(other["inbound_nodes"], {name: scale_name})
    config["output_layers"] = rename_references(config["output_layers"], {name: scale_name})
    bn = keras.layers.BatchNormalization(epsilon=epsilon, name=scale_name)
    config["layers"].insert(
        config["layers"].index(entry) + 1,
        {
            "class_name": "BatchNormalization",
            "config": bn.get_config(),
            "name": scale_name,
            "inbound_nodes": [[[name, 0, 0, {}]]],
        },
    )
    ones = np.ones(channels, np.float32)
    # (x - 0) / sqrt((1 - eps) + eps) * alpha + 0
    weights[scale_name] = [ones * alpha, 0 * ones, 0 * ones, ones - epsilon]
    return scale_name
