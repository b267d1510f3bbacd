"""Model size and cost: parameter counts, multiply-accumulates, and the ``tfqkd models`` table.

MACs are counted for one input (batch size 1) of the model's own input shape, over the layers
that dominate inference cost on CPUs and the DPU: Conv2D (including Conv2DTranspose),
DepthwiseConv2D and Dense. QKeras' QConv2D, QDepthwiseConv2D and QDense subclass these Keras
layers, so quantized models are counted the same way. Batch norm, pooling, additions and
activations are ignored (BN folds into the conv on deployment; the rest are cheap).
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.models.registry import create_model, list_models, model_info

__all__ = ["ModelRow", "count_params", "count_macs", "model_table"]

layers = keras.layers


class ModelRow(NamedTuple):
    """One row of :func:`model_table`."""

    name: str
    family: str
    input_shape: Tuple[int, ...]
    params: int
    macs: int


def count_params(model: keras.Model, trainable_only: bool = True, exclude_suffixes: Tuple[str, ...] = ()) -> int:
    """Counts the parameters of a model.

    Args:
        model: A built Keras model.
        trainable_only: Count only trainable weights (the convention of the thesis's table 5.8
            and of PyTorch: BN gamma/beta count, BN moving statistics do not). With ``False``
            every weight counts, as in Keras' ``model.count_params()``.
        exclude_suffixes: weight-name endings not to count (``tfqkd.export.count_parameters``
            passes the quantizers' state: learned steps and ranges are not parameters).

    Returns:
        Number of scalar parameters.
    """
    weights = model.trainable_weights if trainable_only else model.weights
    # Shared variables (e.g. a layer used twice) must be counted once.
    unique = {id(w): w for w in weights}.values()
    exclude_suffixes = tuple(exclude_suffixes)
    counted = [w for w in unique if not w.name.split(":")[0].endswith(exclude_suffixes)]
    return int(sum(math.prod(int(d) for d in w.shape) for w in counted))


def _static_shape(model_name: str, layer: layers.Layer, tensor) -> Tuple[int, ...]:
    shape = tuple(tensor.shape)[1:]
    if any(d is None for d in shape):
        raise TfqkdError(
            f"cannot count MACs of model '{model_name}': layer '{layer.name}' has an unknown "
            f"dimension in {shape}; build the model with a fixed input_shape"
        )
    return tuple(int(d) for d in shape)


def _layer_macs(model_name: str, layer: layers.Layer) -> int:
    # Order matters below: Conv2DTranspose subclasses Conv2D. DepthwiseConv2D does not (it
    # derives from Keras' private DepthwiseConv base), so it is listed on its own.
    if not isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D, layers.Dense)):
        return 0
    total = 0
    # A layer called several times (shared) costs MACs on every call.
    for node_index in range(len(layer.inbound_nodes)):
        in_shape = _static_shape(model_name, layer, layer.get_input_at(node_index))
        out_shape = _static_shape(model_name, layer, layer.get_output_at(node_index))
        if isinstance(layer, layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            total += math.prod(out_shape) * kh * kw
        elif isinstance(layer, layers.Conv2DTranspose):
            kh, kw = layer.kernel_size
            total += math.prod(in_shape) * kh * kw * out_shape[-1]
        elif isinstance(layer, layers.Conv2D):
            kh, kw = layer.kernel_size
            total += math.prod(out_shape) * kh * kw * in_shape[-1] // layer.groups
        else:
            total += math.prod(in_shape) * out_shape[-1]
    return total


def count_macs(model: keras.Model) -> int:
    """Counts multiply-accumulates of one forward pass with batch size 1.

    Args:
        model: A built Keras model with a fully known input shape. Nested models are
            counted recursively.

    Returns:
        Total MACs of the Conv2D, DepthwiseConv2D and Dense layers (and their QKeras
        subclasses).

    Raises:
        TfqkdError: If a counted layer has an unknown (``None``) non-batch dimension.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
        else:
            total += _layer_macs(model.name, layer)
    return total


def model_table(family: Optional[str] = None, names: Optional[Sequence[str]] = None) -> List[ModelRow]:
    """Builds each registered model with its defaults and reports its size and cost.

    Used by the ``tfqkd models`` command. Building all models takes tens of seconds on a CPU
    (the large DenseNets dominate), so pass ``family`` or ``names`` to narrow it.

    Args:
        family: Only models of this family.
        names: Only these models (checked against the registry).

    Returns:
        One :class:`ModelRow` per model, sorted by name: name, family, default input shape,
        trainable parameters and MACs per input.

    Raises:
        TfqkdError: Unknown family or model name.
    """
    selected = list_models(family)
    if names is not None:
        for name in names:
            model_info(name)  # raises with the list of known models
        selected = [n for n in selected if n in set(names)]
    rows = []
    for name in selected:
        info = model_info(name)
        model = create_model(name)
        rows.append(ModelRow(name, info.family, info.default_input_shape, count_params(model), count_macs(model)))
        del model
    return rows
