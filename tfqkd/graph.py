"""Reading a Keras model as a graph: the functional form, producers and consumers.

Every pass that rewrites or lowers a model (``quantize``, the DPU transform, the TFLite and
QKeras exporters, the DPU compatibility check) walks the same graph; these are its one set of
accessors, for a built model (tensors and layers) and for a functional model's config
(layer names).
"""

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError

__all__ = [
    "as_functional", "config_consumers", "config_outputs", "grid_source", "inbound_names", "is_inference_identity",
    "is_plain_relu", "keeps_grid", "keeps_grid_config", "producer", "single_producer", "tensor_consumers",
]  # fmt: skip


def as_functional(model, what="quantize()"):
    """The functional form of a Sequential or functional model (config rewriting needs it).

    Args:
      model: a Keras model.
      what: the caller, named in the error.

    Returns:
      a functional keras.Model sharing ``model``'s layers.

    Raises:
      TfqkdError: unbuilt Sequential or subclassed model.
    """
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise TfqkdError(f"the Sequential model must be built (give it an input shape) before {what}")
        return keras.Model(model.inputs, model.outputs, name=model.name)
    if not getattr(model, "_is_graph_network", False):
        raise TfqkdError(f"{what} needs a functional or Sequential Keras model, not a subclassed one")
    return model


def _plain_relu_settings(get):
    return not (get("max_value") or get("negative_slope") or get("threshold"))


def is_plain_relu(layer):
    """Whether ``layer`` is a ReLU layer with no cap, slope or threshold (a pass may look through it: it keeps
    every grid, and int8 lowers it as a clamp at the zero point)."""
    return type(layer).__name__ == "ReLU" and _plain_relu_settings(lambda key: getattr(layer, key, None))


def is_inference_identity(layer):
    """Whether ``layer`` passes its input through unchanged at inference (a Dropout): walks of the inference
    graph look through it, as the converters drop it."""
    return isinstance(layer, keras.layers.Dropout)


#: Config class names of :func:`is_inference_identity` layers (Keras' Dropout and its subclasses).
_IDENTITY_CLASSES = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D")


def keeps_grid(layer):
    """Whether every value ``layer`` outputs is on its input's grid (a plain ReLU, a Dropout)."""
    return is_plain_relu(layer) or is_inference_identity(layer)


def keeps_grid_config(entry):
    """:func:`keeps_grid` for one layer entry of a functional model's config."""
    if entry["class_name"] == "ReLU":
        return _plain_relu_settings(entry["config"].get)
    return entry["class_name"] in _IDENTITY_CLASSES


def grid_source(layer):
    """The layer whose output grid ``layer``'s output is on: ``layer`` itself, or the first layer before it
    that is not a plain ReLU or a Dropout (None at a layer with several inputs or none)."""
    while layer is not None and keeps_grid(layer):
        layer = single_producer(layer)
    return layer


def producer(tensor):
    """The layer whose output ``tensor`` (a KerasTensor of a built model) is."""
    return tensor._keras_history.layer


def single_producer(layer):
    """The one layer feeding ``layer`` on its first call, or None (an input layer, or several inputs)."""
    nodes = getattr(layer, "_inbound_nodes", [])
    if not nodes:
        return None
    inbound = nodes[0].inbound_layers
    inbound = inbound if isinstance(inbound, (list, tuple)) else [inbound]
    return inbound[0] if len(inbound) == 1 else None


def tensor_consumers(model, through_identity=False):
    """``{id(KerasTensor): [layers reading it]}`` within ``model`` (its nested models count as layers).

    ``through_identity``: a tensor a Dropout reads lists the Dropout's readers instead (the inference graph).
    """
    consumers = {}
    for depth_nodes in model._nodes_by_depth.values():
        for node in depth_nodes:
            if node.is_input:
                continue
            for tensor_id in node.flat_input_ids:
                consumers.setdefault(int(tensor_id), []).append(node.layer)
    if not through_identity:
        return consumers

    def readers(tensor_id):
        found = []
        for layer in consumers.get(tensor_id, []):
            if is_inference_identity(layer) and len(layer._inbound_nodes) == 1:
                found.extend(readers(id(layer.output)))
            else:
                found.append(layer)
        return found

    return {tensor_id: readers(tensor_id) for tensor_id in consumers}


def inbound_names(entry):
    """Names of the layers feeding one layer entry of a functional model's config (first call)."""
    nodes = entry.get("inbound_nodes") or []
    return [item[0] for item in nodes[0]] if nodes else []


def config_outputs(config):
    """Names of the layers whose outputs are a functional model's outputs (from its config)."""
    return {item[0] for item in config["output_layers"]}


def config_consumers(layers_cfg):
    """``{layer name: [names of the layers reading its output]}`` of a functional model's config."""
    consumers = {}
    for entry in layers_cfg:
        for source in inbound_names(entry):
            consumers.setdefault(source, []).append(entry["name"])
    return consumers
