"""TFLite flatbuffers to benchmark: float32, float16 and int8.

The project's exporter :func:`tfqkd.export.tflite.convert` is used when it
is importable (it keeps the trained grid of a quantized QKeras model).
Otherwise, and only for *float* Keras models, a **fallback** calls
``tf.lite.TFLiteConverter`` directly: float32, float16 weights, or full-integer
post-training quantization calibrated on ``calibration_data``. That fallback is
fine for timing (the arithmetic and graph are the same), not for accuracy of a
trained quantized model.
"""

import numpy as np

from tfqkd.compat import tf
from tfqkd.errors import TfqkdError

__all__ = ["KINDS", "convert", "exporter_available"]

KINDS = ("float32", "float16", "int8")


def exporter_available():
    """Whether the project exporter ``tfqkd.export.tflite`` can be imported."""
    try:
        from tfqkd.export.tflite import convert as _convert  # noqa: F401
    except ImportError:
        return False
    return True


def _fallback(model, kind, calibration_data, int8_io):
    """``tf.lite.TFLiteConverter`` for a float Keras model (fallback path)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        data = np.asarray(calibration_data, dtype=np.float32)

        def representative():
            for i in range(min(len(data), 64)):
                yield [data[i : i + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    return converter.convert()


def convert(model, kind, calibration_data, *, int8_io=True, use_exporter=True, unsafe=False, layout="speed"):
    """Converts ``model`` to a TFLite flatbuffer of one kind.

    Args:
        model: Keras model (float, or quantized when the exporter exists).
        kind: ``"float32"``, ``"float16"`` or ``"int8"``.
        calibration_data: ``[n, ...]`` float inputs for int8 calibration.
        int8_io: int8 input/output tensors (else float io with quantize /
            dequantize ops at the ends); int8 only.
        use_exporter: use ``tfqkd.export.tflite`` when available.
        unsafe: allow Lambda layers (exporter only).
        layout: the exporter's graph layout, "speed" or "compact" (exporter only).

    Returns:
        ``(flatbuffer bytes, converter name)``; the name is ``"tfqkd.export.tflite"``
        or ``"TFLiteConverter (fallback)"``.

    Raises:
        TfqkdError: unknown kind, or a quantized model without the exporter.
    """
    if kind not in KINDS:
        raise TfqkdError(f"unknown TFLite kind {kind!r}; expected one of {', '.join(KINDS)}")
    if use_exporter and exporter_available():
        from tfqkd.export.tflite import convert as export_convert

        content, _ = export_convert(
            model, calibration_data=calibration_data if kind == "int8" else None, kind=kind, int8_io=int8_io,
            unsafe=unsafe, layout=layout,
        )
        return content, "tfqkd.export.tflite"
    from tfqkd.quant.transform import is_quantized

    if is_quantized(model):
        raise TfqkdError(
            "benchmarking a quantized QKeras model needs tfqkd.export.tflite (not importable here); "
            "pass the float model instead"
        )
    return _fallback(model, kind, calibration_data, int8_io), "TFLiteConverter (fallback)"
