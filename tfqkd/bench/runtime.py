"""The edge runtime used to time TFLite models: ai-edge-litert, tflite-runtime, tf.lite.

``ai_edge_litert`` is the maintained successor of
``tflite_runtime``; ``tflite_runtime`` is accepted as a fallback and
``tf.lite.Interpreter`` comes last.
"""

import numpy as np

from tfqkd.errors import TfqkdError

__all__ = ["interpreter_class", "make_interpreter", "runtime_name"]

# Names these benchmarks have always reported (tfqkd.export.runtimes names the runtimes for export checks).
_NAMES = {"litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime", "tensorflow": "tf.lite"}


def interpreter_class():
    """Returns ``(Interpreter class, OpResolverType enum or None, runtime name)`` (first installed runtime)."""
    from tfqkd.export.runtimes import interpreter_class as shared

    Interpreter, resolver, name = shared(None)
    return Interpreter, resolver, _NAMES[name]


def runtime_name():
    """Name of the edge runtime in use."""
    return interpreter_class()[2]


def make_interpreter(model_content, *, batch_size=1, num_threads=None, xnnpack=True, latest_features=False):
    """Builds an interpreter for ``model_content`` with a given batch size.

    Args:
        model_content: TFLite flatbuffer bytes.
        batch_size: first dimension of the (single) input; the input is
            resized with ``resize_tensor_input``.
        num_threads: CPU threads of the interpreter (None: runtime default).
        xnnpack: apply the default XNNPACK delegate (``False`` uses the
            built-in kernels only: ``BUILTIN_WITHOUT_DEFAULT_DELEGATES``).
        latest_features: ``experimental_default_delegate_latest_features``
            of the XNNPACK delegate (where the runtime supports it).

    Returns:
        ``(interpreter, input_detail, output_detail)`` with tensors allocated
        and the input filled with zeros.

    Raises:
        TfqkdError: the model has not exactly one input or cannot be resized.
    """
    from tfqkd.export.runtimes import quiet_interpreter

    Interpreter, resolver, _ = interpreter_class()
    kwargs = {"model_content": bytes(model_content)}
    if num_threads is not None:
        kwargs["num_threads"] = int(num_threads)
    if resolver is not None:
        kwargs["experimental_op_resolver_type"] = (
            resolver.AUTO if xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    if latest_features:
        kwargs["experimental_default_delegate_latest_features"] = True
    try:
        interpreter = quiet_interpreter(Interpreter, **kwargs)
    except TypeError:  # an older runtime without the option
        kwargs.pop("experimental_default_delegate_latest_features", None)
        interpreter = quiet_interpreter(Interpreter, **kwargs)
    inputs = interpreter.get_input_details()
    if len(inputs) != 1:
        raise TfqkdError(f"benchmarks need a single-input model, this TFLite model has {len(inputs)} inputs")
    shape = [int(batch_size)] + [int(d) for d in inputs[0]["shape"][1:]]
    try:
        interpreter.resize_tensor_input(inputs[0]["index"], shape, strict=False)
        interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as err:
        raise TfqkdError(f"cannot run the TFLite model at batch size {batch_size}: {err}") from None
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
    return interpreter, detail, interpreter.get_output_details()[0]
