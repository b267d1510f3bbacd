"""An int8 TFLite file whose last layer (the logits) is computed in float32: ``logits="float"``.

The full-integer file rounds the logits onto an int8 grid whose step is the
calibrated logit range / 255 (about 0.13 for an mnist MLP). Even exact int8
arithmetic then loses near ties: the Keras logits merely rounded onto that
grid agree with the Keras argmax on only 99.4-99.8% of the mnist5k test
images (``output_grid_agreement`` in ``benchmarks/results/int8_fidelity.json``).
That is a property of an int8 output, not of the body. The CPU file a user
gets by default (``logits="auto"``) therefore computes a Dense output layer in
float32: it predicts what the Keras model predicts (100.0% top-1 agreement on
every runtime and training flow of that benchmark). ``logits="int8"`` keeps the
full-integer file (integer-only targets: microcontrollers, the int8 comparison
with TensorFlow's converter in ``benchmarks/``); a model whose output is not a
Dense layer gets it under ``auto`` too.

:func:`float_logits` rewrites the converted full-integer file: the body stays
byte for byte the same; the final int8 ``FULLY_CONNECTED`` becomes
``DEQUANTIZE`` (the int8 codes of the last activation quantizer times their
scale: exactly the Keras fake-quant tensor) followed by a float32
``FULLY_CONNECTED`` whose weights are the trained codes times their step and
whose bias is the Keras bias, i.e. the Keras layer itself. Both are float
builtins every runtime has run since TFLite 1.x, and XNNPACK delegates both.

An integer head with a finer output would not do: TFLite's FULLY_CONNECTED
kernel (``tensorflow/lite/kernels/fully_connected.cc``) takes int8 inputs to
int8 outputs only (its int16 output is the 16x8 mode, int16 *inputs*), XNNPACK
delegates neither int16 variant, and any integer output still rounds.
"""

import numpy as np

from tfqkd.errors import TfqkdError
from tfqkd.export.compact import pack_tflite, tflite_schema, unpack_tflite
from tfqkd.graph import producer

__all__ = ["LOGITS", "apply_logits", "check_logits", "float_logits", "head_parameters"]

#: How the last layer is computed: "auto" (the default: "float" for a Dense output layer, else "int8"),
#: "int8" (full integer) or "float" (int8 body, float32 logits).
LOGITS = ("auto", "int8", "float")


def check_logits(logits):
    """Raises a one-line TfqkdError for an unknown ``logits`` value."""
    if logits not in LOGITS:
        raise TfqkdError(f"unknown logits {logits!r}; use one of {', '.join(LOGITS)}")


def apply_logits(data, graph, logits):
    """The converted full-integer file ``data`` with its last layer computed as ``logits`` asks.

    "auto" takes the float head where the model has one to take (a Dense output
    layer) and keeps the int8 logits otherwise; "float" raises there instead.
    Sets ``graph.int8_logit_step`` (the step of the int8 logits replaced) when
    the head is float, so ``graph.int8_logit_step is None`` means int8 logits.

    Raises:
      TfqkdError: ``logits="float"`` for a model without a Dense output layer.
    """
    check_logits(logits)
    if logits == "int8":
        return data
    try:
        data, graph.int8_logit_step = float_logits(data, *head_parameters(graph))
    except TfqkdError:
        if logits == "float":
            raise
    return data


def head_parameters(graph):
    """``(kernel, bias or None)`` of the model's output layer as the Keras model computes it (float32).

    Args:
      graph: the :class:`~tfqkd.export.integer_graph.IntegerGraph` the file was converted from.

    Raises:
      TfqkdError: the output layer is not a Dense layer.
    """
    from tfqkd.compat import keras
    from tfqkd.export.integer_points import WeightedPoint

    layer = producer(graph.model.outputs[0])
    point = graph.points.get(layer.name)
    if isinstance(point, WeightedPoint) and isinstance(layer, keras.layers.Dense):
        # The trained codes times their step: what the Keras kernel quantizer returns.
        kernel = (point.weight_codes.astype(np.float64) * point.channel_scale.astype(np.float64)).astype(np.float32)
        return kernel, (point.bias if layer.use_bias else None)
    if type(layer) is keras.layers.Dense:  # a float model: its own weights
        return layer.kernel.numpy(), (layer.bias.numpy() if layer.use_bias else None)
    raise TfqkdError(f"logits='float' needs a model whose output layer is a Dense layer, not "
                     f"'{layer.name}' ({type(layer).__name__})")  # fmt: skip


def _opcode(model, schema, builtin, version):
    """Index of the operator code ``builtin`` in ``model`` (appended if absent)."""
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            code.version = max(code.version, version)
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)  # the int8 field of schema < 3a holds codes below 127
    code.version = version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _constant(model, graph, schema, values, name):
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(values, np.float32).tobytes(), np.uint8)
    model.buffers.append(buffer)
    return _tensor(graph, schema, values.shape, name, buffer=len(model.buffers) - 1)


def _tensor(graph, schema, shape, name, buffer=0, signature=None):
    tensor = schema.TensorT()
    tensor.shape = np.asarray(shape, np.int32)
    if signature is not None:
        tensor.shapeSignature = np.asarray(signature, np.int32)
    tensor.type = schema.TensorType.FLOAT32
    tensor.buffer = buffer
    tensor.name = name
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def float_logits(data, weights, bias):
    """Replaces the final int8 FULLY_CONNECTED of a converted file by DEQUANTIZE + float32 FULLY_CONNECTED.

    Args:
      data: full-integer .tflite bytes whose output is produced by a FULLY_CONNECTED
        (optionally followed by the output DEQUANTIZE of a float-io file).
      weights: the Keras layer's float32 kernel ``(inputs, outputs)`` (trained codes times step).
      bias: its float32 bias ``(outputs,)`` or None.

    Returns:
      ``(bytes, step)``: the rewritten model (float32 output) and the scale of the int8
      output it replaced (the step ``max_output_steps`` is counted in).

    Raises:
      TfqkdError: the model's output does not come from a FULLY_CONNECTED of these weights.
    """
    schema = tflite_schema()
    ops = schema.BuiltinOperator
    model = unpack_tflite(data)
    graph = model.subgraphs[0]

    def builtin(op):
        code = model.operatorCodes[op.opcodeIndex]
        return max(code.builtinCode, code.deprecatedBuiltinCode)

    producer = {int(out): index for index, op in enumerate(graph.operators) for out in op.outputs}
    output = int(graph.outputs[0])
    head_index = producer.get(output)
    dequantize_out = None
    if head_index is not None and builtin(graph.operators[head_index]) == ops.DEQUANTIZE:  # float-io file
        dequantize_out = head_index
        head_index = producer.get(int(graph.operators[head_index].inputs[0]))
    if head_index is None or builtin(graph.operators[head_index]) != ops.FULLY_CONNECTED:
        raise TfqkdError("logits='float' needs a model whose output is a Dense layer (an int8 FULLY_CONNECTED)")
    head = graph.operators[head_index]
    kernel = np.asarray(weights, np.float32).T  # TFLite stores (outputs, inputs)
    stored = graph.tensors[int(head.inputs[1])]
    if tuple(stored.shape) != kernel.shape or stored.type != schema.TensorType.INT8:
        raise TfqkdError(f"logits='float': the last FULLY_CONNECTED holds {tuple(stored.shape)} weights, "
                         f"the Keras output layer {kernel.shape}")  # fmt: skip
    old_out = graph.tensors[int(head.outputs[0])]
    step = float(old_out.quantization.scale[0])
    source = graph.tensors[int(head.inputs[0])]
    # DEQUANTIZE: (code - zero point) * scale in float32, the Keras fake-quant tensor itself.
    features = _tensor(graph, schema, source.shape, None, signature=source.shapeSignature)
    dequantize = schema.OperatorT()
    dequantize.opcodeIndex = _opcode(model, schema, ops.DEQUANTIZE, 2)  # version 2: int8 input
    dequantize.inputs = np.asarray([int(head.inputs[0])], np.int32)
    dequantize.outputs = np.asarray([features], np.int32)
    w = _constant(model, graph, schema, kernel, None)
    b = -1 if bias is None else _constant(model, graph, schema, np.asarray(bias, np.float32).reshape(-1), None)
    final = graph.tensors[output]
    logits = _tensor(graph, schema, old_out.shape, final.name, signature=old_out.shapeSignature)
    head.inputs = np.asarray([features, w, b], np.int32)
    head.outputs = np.asarray([logits], np.int32)
    # The same FULLY_CONNECTED code serves int8 and float32 (the kernel dispatches on the tensor types).
    head.builtinOptions.asymmetricQuantizeInputs = False
    graph.operators.insert(head_index, dequantize)
    if dequantize_out is not None:
        graph.operators = [op for op in graph.operators if int(op.outputs[0]) != output]
    graph.outputs = np.asarray([logits], np.int32)
    for signature in model.signatureDefs or []:
        for entry in signature.outputs or []:
            if entry.tensorIndex == output:
                entry.tensorIndex = logits
    return pack_tflite(model), step
