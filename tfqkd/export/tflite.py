"""TFLite export: full-integer int8 that keeps the trained grid, plus float32 / float16.

Thesis chapter 6 (deployment of the quantized student) and
table 7.1 (the "QCPU" int8 row). The int8 model is converted from the twin
built by :class:`tfqkd.export.integer_graph.IntegerGraph`: trained weight
codes and activation steps are pinned with fake-quant nodes, the remaining
float tensors get calibrated 8-bit ranges, and the converter runs with
``TFLITE_BUILTINS_INT8`` only, so every operator between the input and the
output is integer.
"""

import warnings
from pathlib import Path

import numpy as np

from tfqkd import atomic
from tfqkd.compat import tf
from tfqkd.data.examples import calibration_inputs
from tfqkd.errors import TfqkdError
from tfqkd.export.compact import compact_tflite
from tfqkd.export.float_head import apply_logits, check_logits
from tfqkd.export.integer_graph import IntegerGraph

__all__ = ["FORMATS", "calibration_batches", "convert", "to_tflite", "use_int8_builtins"]

#: TFLite formats: the integer model and the two float references.
FORMATS = ("int8", "float32", "float16")
KINDS = FORMATS  # the name before "kind" was split into scheme (quantizers) and format (files)
# Calibration images used at most (ranges of BN/concat/add/logit tensors).
_MAX_CALIBRATION = 512
_CALIBRATION_BATCH = 64


def calibration_batches(calibration_data, limit=_MAX_CALIBRATION):
    """Normalises calibration data to a list of float32 input batches.

    Args:
      calibration_data: an array ``(N, ...)`` of inputs, an ``(x, y)`` tuple,
        or a ``tf.data.Dataset`` of batches (``x`` or ``(x, y, ...)``).
      limit: use at most this many examples.

    Returns:
      list of float32 arrays of at most 64 examples each.

    Raises:
      TfqkdError: empty or malformed data.
    """
    x = calibration_inputs(calibration_data, limit)
    if x is None:
        raise TfqkdError("int8 export needs calibration_data (a few hundred training inputs)")
    x = x.astype(np.float32)
    return [x[i : i + _CALIBRATION_BATCH] for i in range(0, len(x), _CALIBRATION_BATCH)]


def _check_input_shape(model, batches):
    expected = tuple(model.inputs[0].shape[1:])
    got = tuple(batches[0].shape[1:])
    if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
        raise TfqkdError(f"calibration data has shape {got} per example, the model expects {expected}")


def use_int8_builtins(converter, batches, int8_io=True):
    """Sets a ``tf.lite.TFLiteConverter`` up for a full-integer int8 file.

    Args:
      converter: the converter (from a concrete function or a float Keras model).
      batches: calibration input batches (:func:`calibration_batches`), fed one example at a time.
      int8_io: int8 input and output tensors, else float32 with QUANTIZE/DEQUANTIZE at the ends.
    """

    def representative():
        for batch in batches:
            for i in range(len(batch)):
                yield [batch[i : i + 1]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    # Only integer builtins: the conversion fails rather than leave a float op behind.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    io_type = tf.int8 if int8_io else tf.float32
    converter.inference_input_type = io_type
    converter.inference_output_type = io_type


def _format(format, kind):
    """The ``format`` argument, or the deprecated ``kind`` one; checked."""
    if kind is not None:
        warnings.warn("TFLite export: kind= is deprecated, use format=", DeprecationWarning, stacklevel=3)
        format = kind
    if format not in FORMATS:
        raise TfqkdError(f"unknown TFLite format {format!r}; use one of {', '.join(FORMATS)}")
    return format


def convert(
    model, *, calibration_data=None, format="int8", int8_io=True, unsafe=False, layout="speed", logits="auto", kind=None
):
    """Converts a (quantized) Keras model to TFLite bytes.

    Args:
      model: functional Keras model, usually from :func:`tfqkd.quantize`.
      calibration_data: inputs for the ranges of tensors the model keeps in
        float (required for ``int8``).
      format: "int8" (full integer, trained grid kept), "float32" or "float16"
        (weights stored as float16); the float formats compute the trained
        grids in float arithmetic, so they predict what the Keras model predicts.
      int8_io: int8 only: an int8 input tensor, and an int8 output where the
        logits are int8 (True), or float32 with a QUANTIZE/DEQUANTIZE at the ends (False).
      unsafe: allow Lambda layers.
      layout: "speed" (BNs and average pools as depthwise convs, the fast int8
        graph) or "compact" (the converter's MUL/ADD and AVERAGE_POOL_2D: a
        smaller file); see :data:`tfqkd.export.integer_graph.LAYOUTS`.
      logits: int8 only: "float": the int8 body and the output Dense layer in
        float32 (DEQUANTIZE + float FULLY_CONNECTED of the trained weights), so
        the logits are not rounded onto an int8 grid; "int8": full integer;
        "auto" (default): "float" for a Dense output layer, else "int8".
        See :mod:`tfqkd.export.float_head`.
      kind: the old name of ``format`` (deprecated).

    Returns:
      ``(tflite_bytes, graph)``: the flatbuffer and the
      :class:`~tfqkd.export.integer_graph.IntegerGraph` it came from (its
      ``activation_grids`` and ``weight_grids`` are the trained scales; with
      float logits, ``graph.int8_logit_step`` is the step of the int8 logits replaced, else None).

    Raises:
      TfqkdError: unsupported model, format or data, or a converter failure.
    """
    format = _format(format, kind)
    check_logits(logits)
    graph = IntegerGraph(model, unsafe=unsafe, layout=layout)
    batches = None
    if format == "int8":
        batches = calibration_batches(calibration_data)
        _check_input_shape(model, batches)
        graph.calibrate(batches)
    integer = format == "int8"
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="input")
    # autograph off: the twin is plain Python over the layer graph, nothing to convert.
    fn = tf.function(lambda x: graph(x, integer=integer), input_signature=[spec], autograph=False)
    holder = tf.Module()
    holder.fn = fn
    try:
        concrete = fn.get_concrete_function()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
        if format == "int8":
            use_int8_builtins(converter, batches, int8_io)
        elif format == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        data = converter.convert()
    except TfqkdError:
        raise
    except Exception as err:  # the converter raises ConverterError, RuntimeError, ValueError ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TfqkdError(f"TFLite {format} conversion failed: {first[:300]}") from None
    if format == "int8":  # the float formats compute their logits in float already
        data = apply_logits(data, graph, logits)
    # Same lossless clean-up for every format (names, unused tensors, duplicate buffers).
    return compact_tflite(data), graph


def to_tflite(
    model, out_path, *, calibration_data=None, format="int8", int8_io=True, evaluation=None, force=False, unsafe=False,
    layout="speed", runtimes=None, logits="auto", kind=None,
):
    """Exports a quantized Keras model to a .tflite file.

    The int8 model is full-integer and reproduces the trained fake-quant
    arithmetic: weights keep their trained integer codes (4-bit codes
    -7..7 in int8 storage, scale = the learned step), activation quantizers
    become int8 tensors whose scale is the trained step (zero point -128 for
    unsigned), per layer, so mixed policies export layer by layer; a
    BatchNormalization directly after a conv is folded into it.

    Args:
      model: functional Keras model (``tfqkd.quantize`` output or a float model).
      out_path: destination .tflite file; written atomically.
      calibration_data: training inputs (array, (x, y) or tf.data.Dataset) for
        the ranges of tensors the model keeps in float; required for int8.
      format: "int8", "float32" or "float16".
      int8_io: an int8 input tensor and, with int8 logits, an int8 output (else
        float32 with QUANTIZE/DEQUANTIZE).
      evaluation: optional ``(x, y)`` arrays: validate the file with the edge
        runtime and write ``<out_path>.validation.json``.
      force: overwrite an existing file.
      unsafe: allow Lambda layers (they run code).
      layout: "speed" or "compact" graph (see :func:`convert`).
      runtimes: with ``evaluation``: the runtimes to validate on (e.g. ``"litert,tflite-runtime"``,
        see :func:`tfqkd.export.runtimes.parse_runtimes`; None: the first installed).
      logits: int8 only: "auto" (default: "float" for a Dense output layer, else
        "int8"), "float" (int8 body, float32 output Dense layer: no int8 rounding of
        the logits, whose near ties otherwise cost 0.1-0.6% top-1 agreement on an
        mnist MLP) or "int8" (full integer, for integer-only targets).
      kind: the old name of ``format`` (deprecated).

    Returns:
      dict with ``path``, ``format``, ``layout``, ``logits``, ``bytes``, ``activation_scales`` (trained
      steps of each activation quantizer), ``weight_scales``, ``weight_code_multipliers``,
      ``rounded_batchnorm`` (BNs the int8 model rounds and the Keras model
      does not: train with ``integer_intermediates`` to make it exact),
      ``rounded_add_inputs`` (tensors a residual Add sums in float in the Keras model
      and the int8 model rounds first: train with ``integer_intermediates``) and, with
      ``evaluation``, ``validation`` (see :func:`tfqkd.export.validate.validate_tflite`).

    Raises:
      TfqkdError: existing output without ``force``, unsupported model, bad
        data or conversion failure; nothing is written then.
    """
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise TfqkdError(f"{out_path} exists; pass --force (force=True) to overwrite it")
    format = _format(format, kind)
    data, graph = convert(
        model, calibration_data=calibration_data, format=format, int8_io=int8_io, unsafe=unsafe, layout=layout,
        logits=logits,
    )
    atomic.write_bytes(out_path, data, force=force)
    result = {
        "path": str(out_path),
        "format": format,
        "layout": layout,
        "logits": "int8" if format == "int8" and graph.int8_logit_step is None else "float",
        "int8_io": bool(int8_io) if format == "int8" else False,
        "bytes": out_path.stat().st_size,
        "activation_scales": {name: grid.scale for name, grid in graph.activation_grids.items()},
        "weight_scales": {name: step for name, (step, _) in graph.weight_grids.items()},
        # int8 weights store code * k at scale step / k (the same real weights; finer bias unit)
        "weight_code_multipliers": graph.code_multipliers() if format == "int8" else {},
        "folded_batchnorm": {name: bn for name, (_, bn) in graph.weight_grids.items() if bn},
        "rounded_batchnorm": list(graph.rounded_batchnorms) if format == "int8" else [],
        "rounded_add_inputs": list(graph.rounded_add_inputs) if format == "int8" else [],
    }
    if evaluation is not None:
        from tfqkd.export.validate import validate_tflite

        result["validation"] = validate_tflite(
            out_path, model, evaluation, force=force, runtimes=runtimes, output_step=graph.int8_logit_step
        )
    return result
