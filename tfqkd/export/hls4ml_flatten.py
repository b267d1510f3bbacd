"""Element-wise activations moved before a Flatten, where hls4ml 1.3's io_stream computes them.

In io_stream hls4ml 1.3 drops a Flatten (the stream is read on as it is) but types the layer after
it on the flattened shape: an activation reading a ``Flatten`` of 4x4x2 reads arrays of 32 values
from a stream of 2-value pixels (``nnet::relu<input_t, layer3_t>`` with ``input_t`` an
``nnet::array<..., 2>`` and ``layer3_t`` an ``nnet::array<..., 32>``), and computes on values past
the end of each read. Measured on Input(4, 4, 2) -> Flatten -> ReLU -> Dense(3): outputs off by
4.2 of 3.1; with QActivation("quantized_relu(8,0)") instead of ReLU, off by 2.7 of 3.7. tfqkd puts
a quantizer before every Dense, so every Flatten -> Dense of a tfqkd CNN meets this. An element-wise
activation commutes with Flatten, so the model handed to hls4ml applies it before the Flatten.
"""

from tfqkd.compat import keras
from tfqkd.export.qkeras import stock_config
from tfqkd.graph import config_consumers, config_outputs
from tfqkd.quant.transform import qkeras_custom_objects, rename_references

__all__ = ["activations_before_flatten"]

#: Layers that act on each value alone (hls4ml types them as activations).
_ELEMENTWISE = ("QActivation", "ReLU", "Activation", "LeakyReLU")


def activations_before_flatten(model):
    """``model`` with each element-wise activation that alone reads a Flatten moved before it.

    Args:
      model: a functional model (the stock QKeras model handed to hls4ml).

    Returns:
      ``(model, moved)``: the same computation, and the names of the moved activation layers.
    """
    config = stock_config(model)
    outputs = config_outputs(config)
    moved = []
    for flatten in [entry for entry in config["layers"] if entry["class_name"] == "Flatten"]:
        by_name = {entry["name"]: entry for entry in config["layers"]}
        readers = [by_name[name] for name in config_consumers(config["layers"]).get(flatten["name"], [])]
        if len(readers) != 1 or flatten["name"] in outputs or readers[0]["class_name"] not in _ELEMENTWISE:
            continue
        activation = readers[0]
        # whatever read the activation now reads the Flatten, which reads the activation,
        # which reads what the Flatten read
        swap = {activation["name"]: flatten["name"]}
        for entry in config["layers"]:
            if entry is not activation:
                entry["inbound_nodes"] = rename_references(entry["inbound_nodes"], swap)
        config["output_layers"] = rename_references(config["output_layers"], swap)
        activation["inbound_nodes"] = flatten["inbound_nodes"]
        flatten["inbound_nodes"] = [[[activation["name"], 0, 0, {}]]]
        layers = config["layers"]
        i, j = layers.index(flatten), layers.index(activation)
        layers[i], layers[j] = activation, flatten
        moved.append(activation["name"])
    if not moved:
        return model, moved
    weights = {layer.name: layer.get_weights() for layer in model.layers}
    rebuilt = keras.Model.from_config(config, custom_objects=qkeras_custom_objects())
    for layer in rebuilt.layers:
        layer.set_weights(weights[layer.name])
    return rebuilt, moved
