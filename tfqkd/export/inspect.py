"""Reading a .tflite file: operators, tensor types and quantization parameters.

Used by the validation, the size report and the tests to check what the
exporter promises: which operators run, that everything
between the input QUANTIZE and the output DEQUANTIZE is integer, and the
scales and integer codes TFLite actually stores.
"""

import numpy as np

from tfqkd.errors import TfqkdError

__all__ = ["FLOAT_TYPES", "float_ops", "load_interpreter", "read_tflite", "weight_codes_per_channel"]

#: Tensor types that mean float arithmetic.
FLOAT_TYPES = ("float32", "float16", "float64")
# Operators that only convert at the model boundary.
_BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")


def load_interpreter(model_path=None, model_content=None, *, preserve_all_tensors=False):
    """An interpreter from the edge runtime, falling back to TensorFlow's.

    Tries ``ai_edge_litert`` (the maintained successor of tflite-runtime),
    then ``tflite_runtime``, then ``tf.lite``.

    Args:
      model_path: .tflite file, or
      model_content: its bytes.
      preserve_all_tensors: keep intermediate tensors readable after invoke.

    Returns:
      ``(interpreter, runtime_name)``.
    """
    from tfqkd.export.runtimes import RUNTIMES, interpreter_class, quiet_interpreter

    kwargs = {"model_path": None if model_path is None else str(model_path), "model_content": model_content}
    if preserve_all_tensors:
        kwargs["experimental_preserve_all_tensors"] = True
    Interpreter, _, name = interpreter_class(None)
    return quiet_interpreter(Interpreter, **kwargs), RUNTIMES[name][1]


def read_tflite(model_path=None, model_content=None):
    """Operators and tensors of a .tflite model.

    Args:
      model_path: .tflite file, or
      model_content: its bytes.

    Returns:
      dict with ``ops`` (list of ``{"index", "op", "inputs", "outputs"}``),
      ``tensors`` (dict index -> ``{"name", "dtype", "shape", "scales",
      "zero_points", "axis"}``), ``inputs`` / ``outputs`` (tensor indices)
      and the interpreter's ``runtime``.

    Raises:
      TfqkdError: unreadable file.
    """
    try:
        interpreter, runtime = load_interpreter(model_path, model_content)
    except (ValueError, RuntimeError, OSError) as err:
        raise TfqkdError(f"cannot read TFLite model {model_path or '<bytes>'}: {str(err).splitlines()[0]}") from None
    tensors = {}
    for detail in interpreter.get_tensor_details():
        q = detail["quantization_parameters"]
        tensors[detail["index"]] = {
            "name": detail["name"],
            "dtype": np.dtype(detail["dtype"]).name,
            "shape": [int(d) for d in detail["shape"]],
            "scales": [float(s) for s in q["scales"]],
            "zero_points": [int(z) for z in q["zero_points"]],
            "axis": int(q["quantized_dimension"]),
        }
    ops = [
        {
            "index": op["index"],
            "op": op["op_name"],
            "inputs": [int(i) for i in op["inputs"] if i >= 0],
            "outputs": [int(i) for i in op["outputs"]],
        }
        for op in interpreter._get_ops_details()
    ]
    return {
        "ops": ops,
        "tensors": tensors,
        "inputs": [d["index"] for d in interpreter.get_input_details()],
        "outputs": [d["index"] for d in interpreter.get_output_details()],
        "runtime": runtime,
        "_interpreter": interpreter,
    }


def float_ops(info):
    """Operators that compute in float, other than the boundary QUANTIZE / DEQUANTIZE.

    Args:
      info: :func:`read_tflite` output.

    Returns:
      list of ``"OP(tensor name)"`` strings; empty for a full-integer model.
    """
    offending = []
    for op in info["ops"]:
        if op["op"] in _BOUNDARY_OPS:
            continue
        for index in op["inputs"] + op["outputs"]:
            tensor = info["tensors"].get(index)
            if tensor is not None and tensor["dtype"] in FLOAT_TYPES:
                offending.append(f"{op['op']}({tensor['name']})")
                break
    return offending


def weight_codes_per_channel(info, tensor_index, axis=0):
    """Distinct integer codes of a stored weight tensor, per output channel.

    Args:
      info: :func:`read_tflite` output.
      tensor_index: index of a constant int8 weight tensor.
      axis: the output-channel axis: 0 for CONV_2D and FULLY_CONNECTED
        (TFLite stores them output channel first), 3 for DEPTHWISE_CONV_2D.

    Returns:
      list with the number of distinct codes of each output channel.
    """
    values = np.moveaxis(info["_interpreter"].get_tensor(tensor_index), axis, 0)
    flat = values.reshape(values.shape[0], -1)
    return [int(len(np.unique(row))) for row in flat]
