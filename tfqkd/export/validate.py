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

from tfqkd import atomic
from tfqkd.errors import TfqkdError
from tfqkd.export.inspect import load_interpreter
from tfqkd.export.runtimes import RuntimeRefused, RuntimeUnavailable, parse_runtimes, run_codes

__all__ = ["compare_logits", "dequantize_outputs", "format_report", "quantize_inputs", "run_tflite", "validate_tflite"]

_BATCH = 100


def _io(model_path):
    """``(input detail, output detail)`` of a .tflite (read with the first installed runtime)."""
    interpreter, _ = load_interpreter(model_path)
    return interpreter.get_input_details()[0], interpreter.get_output_details()[0]


def quantize_inputs(x, detail):
    """Float inputs in the model's input type: int8 codes round half away from zero, as TFLite's QUANTIZE."""
    x = np.asarray(x, np.float32)
    if not np.issubdtype(detail["dtype"], np.integer):
        return x
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    scaled = x / scale
    codes = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5) + zero
    return np.clip(codes, info.min, info.max).astype(detail["dtype"])


def dequantize_outputs(values, detail):
    """Raw output values as float32 (integer outputs dequantized with the output scale)."""
    if np.issubdtype(detail["dtype"], np.integer):
        scale, zero = detail["quantization"]
        return ((values.astype(np.float32) - zero) * scale).astype(np.float32)
    return np.asarray(values, np.float32)


def run_tflite(model_path, x, batch_size=_BATCH, runtime=None):
    """Runs a .tflite classifier on float inputs; returns float outputs.

    Integer inputs are quantized with the model's input scale and zero point
    (round half away from zero, as TFLite's QUANTIZE does) and integer outputs
    dequantized, so int8-io and float-io models are called the same way.

    Args:
      model_path: the .tflite file.
      x: float32 inputs ``(N, ...)``.
      batch_size: examples per invoke.
      runtime: a :class:`tfqkd.export.runtimes.Runtime` or name (None: the first installed).

    Returns:
      ``(outputs, runtime_name)``: float32 ``(N, classes)`` and the runtime used.
    """
    if runtime is None or isinstance(runtime, str):
        runtime = parse_runtimes(runtime)[0]
    inp, out = _io(model_path)
    values, info = run_codes(model_path, quantize_inputs(x, inp), runtime, batch_size)
    return dequantize_outputs(values, out), info["label"]


def validate_tflite(model_path, keras_model, evaluation, *, report_path=None, force=True, runtimes=None,
                    output_step=None):
    """Compares a .tflite model with its Keras fake-quant source on labelled data, on one or more runtimes.

    Args:
      model_path: the exported .tflite.
      keras_model: the Keras model it was exported from.
      evaluation: ``(x, y)`` arrays (e.g. the 1,000 mnist5k test images).
      report_path: where to write the JSON (default ``<model_path>.validation.json``).
      force: overwrite an existing report (the export decided already).
      runtimes: runtimes to run the file on: a string such as ``"litert,tflite-runtime"``
        (see :func:`tfqkd.export.runtimes.parse_runtimes`), a list of ``Runtime``, or None
        (the first installed). A requested runtime that is not installed, or that cannot
        run the file, is reported under ``unavailable`` (one line each); at least one must run.
      output_step: for a float output, the step to count ``max_output_steps`` in (a
        ``logits="float"`` file: the step of the int8 logits it replaced); None: none.

    Returns:
      dict: ``examples``, ``keras_top1`` and ``tflite_top1`` (percent),
      ``accuracy_difference`` (points), ``agreement`` (percent of identical
      top-1 predictions), ``max_logit_difference``, ``mean_logit_difference``,
      ``max_output_steps`` (the largest difference in steps of an integer output),
      ``runtime``, ``seconds`` (all of the first runtime that ran), ``runtimes`` (the
      same figures per runtime label), ``unavailable`` (runtime -> message),
      ``between_runtimes`` (with two or more: largest difference in output steps and
      the share of identical outputs, against the first) and ``report`` (the JSON path).

    Raises:
      TfqkdError: malformed evaluation data, or none of the runtimes is installed.
    """

    try:
        x, y = evaluation
    except (TypeError, ValueError):
        raise TfqkdError("evaluation must be an (x, y) pair of arrays") from None
    x, y = np.asarray(x, np.float32), np.asarray(y).reshape(-1)
    if len(x) == 0 or len(x) != len(y):
        raise TfqkdError(f"evaluation data needs as many labels as inputs, got {len(x)} inputs and {len(y)} labels")
    if runtimes is None or isinstance(runtimes, str):
        runtimes = parse_runtimes(runtimes)
    model_path = Path(model_path)
    keras_logits = np.asarray(keras_model.predict(x, batch_size=256, verbose=0), np.float32)
    inp, out = _io(model_path)
    codes = quantize_inputs(x, inp)
    step = float(out["quantization"][0]) if np.issubdtype(out["dtype"], np.integer) else float(output_step or 0.0)
    per_runtime, unavailable, raw = {}, {}, {}
    for runtime in runtimes:
        start = time.time()
        try:
            values, info = run_codes(model_path, codes, runtime)
        except (RuntimeUnavailable, RuntimeRefused) as err:
            unavailable[runtime.label] = str(err)
            continue
        seconds = time.time() - start
        raw[info["label"]] = values
        per_runtime[info["label"]] = _figures(keras_logits, dequantize_outputs(values, out), y, step, seconds, info)
    if not per_runtime:
        raise TfqkdError("; ".join(unavailable.values()))
    first = next(iter(per_runtime))
    report = {"model": str(model_path), "examples": int(len(x)), **per_runtime[first], "runtime": first}
    report["runtimes"] = per_runtime
    report["unavailable"] = unavailable
    if len(raw) > 1:
        base = raw[first].astype(np.float64)
        report["between_runtimes"] = {
            label: {
                "against": first,
                # raw outputs: output steps for an integer output, logits for a float one
                "max_difference": float(np.max(np.abs(values.astype(np.float64) - base))),
                "unit": "output steps" if np.issubdtype(out["dtype"], np.integer) else "logits",
                "identical_outputs": float(100.0 * np.mean(values == raw[first])),
                "top1_agreement": float(100.0 * np.mean(values.argmax(-1) == raw[first].argmax(-1))),
            }
            for label, values in raw.items()
            if label != first
        }
    report_path = Path(report_path) if report_path else model_path.with_name(model_path.name + ".validation.json")
    atomic.write_bytes(report_path, (json.dumps(report, indent=2) + "\n").encode(), force=force)
    report["report"] = str(report_path)
    return report


def _figures(keras_logits, tflite_logits, y, step, seconds, info):
    keras_pred, tflite_pred = keras_logits.argmax(-1), tflite_logits.argmax(-1)
    difference = np.abs(keras_logits.astype(np.float64) - tflite_logits.astype(np.float64))
    figures = {
        "keras_top1": float(100.0 * np.mean(keras_pred == y)),
        "tflite_top1": float(100.0 * np.mean(tflite_pred == y)),
        "agreement": float(100.0 * np.mean(_agrees(keras_logits, tflite_pred))),
        "max_logit_difference": float(difference.max()),
        "mean_logit_difference": float(difference.mean()),
        "max_output_steps": float(difference.max() / step) if step else None,
        "seconds": float(seconds),
    }
    figures["accuracy_difference"] = abs(figures["keras_top1"] - figures["tflite_top1"])
    figures.update({key: value for key, value in info.items() if key in ("version", "numpy")})
    return figures


def _agrees(keras_logits, tflite_pred):
    """Per example, whether the file's class has the Keras model's highest logit. An exact tie there (integer
    sums make them: two classes 3.1070194 on an mnist5k digit) has no Keras answer to differ from."""
    rows = np.arange(len(tflite_pred))
    return keras_logits[rows, tflite_pred] == keras_logits.max(-1)


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
    """One short paragraph for the terminal (one line per further runtime, and per missing one)."""
    lines = [_format_first(report)]
    for label, figures in list(report.get("runtimes", {}).items())[1:]:
        between = report.get("between_runtimes", {}).get(label, {})
        lines.append(
            f"  {label}: agreement {figures['agreement']:.2f}%, max |logit diff| {figures['max_logit_difference']:.4f}"
            + (f" ({figures['max_output_steps']:.2f} output steps)" if figures.get("max_output_steps") is not None else "")
            + (f"; vs {between['against']}: largest difference {between['max_difference']:g} {between['unit']}, "
               f"{between['identical_outputs']:.1f}% identical outputs" if between else "")  # fmt: skip
        )
    for label, message in report.get("unavailable", {}).items():
        lines.append(f"  {label}: not run ({message.splitlines()[0]})")
    return "\n".join(lines)


def _format_first(report):
    steps = report.get("max_output_steps")
    return (
        f"{report['model']}: top-1 keras {report['keras_top1']:.2f}% / tflite {report['tflite_top1']:.2f}% "
        f"(diff {report['accuracy_difference']:.2f} pt), agreement {report['agreement']:.2f}% on "
        f"{report['examples']} examples, max |logit diff| {report['max_logit_difference']:.4f}"
        + (f" ({steps:.2f} output steps)" if steps is not None else "")
        + f" [{report['runtime']}]"
    )
