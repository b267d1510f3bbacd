"""Validation of an exported .tflite against the Keras fake-quant model it came from.

The exported model is run with the edge runtime
(ai-edge-litert, else tflite-runtime, else tf.lite) on evaluation data; the
report gives both top-1 accuracies, their top-1 agreement and the largest
(dequantized) logit difference, and is written next to the model as
``<model>.validation.json``.
"""

import json
import time
from pathlib import Path

import numpy as np

from tfqkd.errors import TfqkdError
from tfqkd.export.inspect import load_interpreter

__all__ = ["compare_logits", "format_report", "run_tflite", "validate_tflite"]

_BATCH = 100


def run_tflite(model_path, x, batch_size=_BATCH):
    """Runs a .tflite classifier on float inputs; returns float outputs.

    Integer inputs are quantized with the model's input scale and zero point
    (round half away from zero, as TFLite's QUANTIZE does) and integer outputs
    dequantized, so int8-io and float-io models are called the same way.

    Args:
      model_path: the .tflite file.
      x: float32 inputs ``(N, ...)``.
      batch_size: examples per invoke.

    Returns:
      ``(outputs, runtime_name)``: float32 ``(N, classes)`` and the runtime used.
    """
    interpreter, runtime = load_interpreter(model_path)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    x = np.asarray(x, np.float32)
    results = []
    current = None
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        if current != len(chunk):
            interpreter.resize_tensor_input(inp["index"], (len(chunk), *x.shape[1:]))
            interpreter.allocate_tensors()
            current = len(chunk)
        if np.issubdtype(inp["dtype"], np.integer):
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            scaled = chunk / scale
            codes = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5) + zero
            chunk = np.clip(codes, info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], chunk)
        interpreter.invoke()
        values = interpreter.get_tensor(out["index"])
        if np.issubdtype(out["dtype"], np.integer):
            scale, zero = out["quantization"]
            values = (values.astype(np.float32) - zero) * scale
        results.append(np.asarray(values, np.float32))
    return np.concatenate(results), runtime


def validate_tflite(model_path, keras_model, evaluation, *, report_path=None, force=True):
    """Compares a .tflite model with its Keras fake-quant source on labelled data.

    Args:
      model_path: the exported .tflite.
      keras_model: the Keras model it was exported from.
      evaluation: ``(x, y)`` arrays (e.g. the 1,000 mnist5k test images).
      report_path: where to write the JSON (default ``<model_path>.validation.json``).
      force: overwrite an existing report (the export decided already).

    Returns:
      dict: ``examples``, ``keras_top1`` and ``tflite_top1`` (percent),
      ``accuracy_difference`` (points), ``agreement`` (percent of identical
      top-1 predictions), ``max_logit_difference``, ``mean_logit_difference``,
      ``runtime``, ``seconds`` and ``report`` (the JSON path).

    Raises:
      TfqkdError: malformed evaluation data.
    """
    from tfqkd.export.tflite import atomic_write

    try:
        x, y = evaluation
    except (TypeError, ValueError):
        raise TfqkdError("evaluation must be an (x, y) pair of arrays") from None
    x, y = np.asarray(x, np.float32), np.asarray(y).reshape(-1)
    if len(x) == 0 or len(x) != len(y):
        raise TfqkdError(f"evaluation data needs as many labels as inputs, got {len(x)} inputs and {len(y)} labels")
    model_path = Path(model_path)
    keras_logits = np.asarray(keras_model.predict(x, batch_size=256, verbose=0), np.float32)
    start = time.time()
    tflite_logits, runtime = run_tflite(model_path, x)
    seconds = time.time() - start
    keras_pred, tflite_pred = keras_logits.argmax(-1), tflite_logits.argmax(-1)
    difference = np.abs(keras_logits - tflite_logits)
    report = {
        "model": str(model_path),
        "examples": int(len(x)),
        "keras_top1": float(100.0 * np.mean(keras_pred == y)),
        "tflite_top1": float(100.0 * np.mean(tflite_pred == y)),
        "agreement": float(100.0 * np.mean(keras_pred == tflite_pred)),
        "max_logit_difference": float(difference.max()),
        "mean_logit_difference": float(difference.mean()),
        "runtime": runtime,
        "seconds": float(seconds),
    }
    report["accuracy_difference"] = abs(report["keras_top1"] - report["tflite_top1"])
    report_path = Path(report_path) if report_path else model_path.with_name(model_path.name + ".validation.json")
    atomic_write(report_path, (json.dumps(report, indent=2) + "\n").encode(), force=force)
    report["report"] = str(report_path)
    return report


def compare_logits(got, expected):
    """How an exported model's logits ``got`` agree with the Keras model's ``expected``.

    Returns:
      dict with ``examples``, ``top1_agreement`` (%) and ``max_abs_logit_difference``.
    """
    got, expected = np.asarray(got), np.asarray(expected)
    return {
        "examples": int(len(expected)),
        "top1_agreement": float(100.0 * np.mean(np.argmax(got, -1) == np.argmax(expected, -1))),
        "max_abs_logit_difference": float(np.max(np.abs(got - expected))),
    }


def format_report(report):
    """One short paragraph for the terminal."""
    return (
        f"{report['model']}: top-1 keras {report['keras_top1']:.2f}% / tflite {report['tflite_top1']:.2f}% "
        f"(diff {report['accuracy_difference']:.2f} pt), agreement {report['agreement']:.2f}% on "
        f"{report['examples']} examples, max |logit diff| {report['max_logit_difference']:.4f} [{report['runtime']}]"
    )
