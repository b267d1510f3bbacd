"""Export to the Xilinx DPUCZDX8G: Vitis-AI TF2 quantized .h5 and deploy bundle.

Thesis chapter 6. :func:`to_dpu` checks the model against the DPU
(:mod:`tfqkd.dpu.compat`), builds the DPU graph (BN folded, Dropout removed;
:mod:`tfqkd.dpu.graph`), takes the power-of-two positions from the trained DPU quantizers or
calibrates them, adjusted to the DPU's limits (:mod:`tfqkd.dpu.positions`), writes
``quantized.h5`` in the Vitis-AI format (:mod:`.vitis_h5`), predicts the board's accuracy with
the bit-accurate emulator (:mod:`tfqkd.dpu.emulator`) run from that file and writes the deploy
bundle (:mod:`.bundle`, :mod:`.runner_template`); :mod:`.command` is ``tfqkd export --target dpu``.

Train for the DPU with ``tfqkd.quantize(model, "dpu")`` (:func:`tfqkd.dpu.quantize_for_dpu`) so
that the trained model *is* the DPU arithmetic; a float model is quantized (calibrated) here.
Everything about the DPU itself is in :mod:`tfqkd.dpu`; the names that used to be re-exported
here (``check_model``, ``CompatReport``, ``DPUEmulator``, ``DPUGraph``) still are, with a
DeprecationWarning.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tfqkd import atomic
from tfqkd import dpu as _dpu
from tfqkd.dpu.graph import graph_from_dpu_model
from tfqkd.dpu.layers import is_dpu_model
from tfqkd.dpu.positions import check_limits, shifts
from tfqkd.dpu.transform import quantize_for_dpu
from tfqkd.errors import TfqkdError
from tfqkd.export.dpu.bundle import ARCHS, BOARDS, compile_command, write_bundle  # noqa: F401  (ARCHS: the name before 0.2)
from tfqkd.export.dpu.vitis_h5 import read_quantized_h5, write_quantized_h5
from tfqkd.quant.transform import is_quantized

__all__ = [
    "BOARDS",
    "compile_command",
    "emulate_h5",
    "read_quantized_h5",
    "to_dpu",
    "write_quantized_h5",
]

#: Names that moved to tfqkd.dpu and are still served here, with a DeprecationWarning.
_MOVED = ("CompatReport", "DPUEmulator", "DPUGraph", "check_model")


def __getattr__(name):
    if name in _MOVED:
        warnings.warn(f"tfqkd.export.dpu.{name} moved to tfqkd.dpu.{name}; import from there", DeprecationWarning, stacklevel=2)
        return getattr(_dpu, name)
    raise AttributeError(f"module 'tfqkd.export.dpu' has no attribute {name!r}")


def emulate_h5(path, x, batch_size=100):
    """Dequantized DPU outputs for inputs ``x``, computed from a ``quantized.h5`` alone."""
    return _dpu.DPUEmulator(read_quantized_h5(path)).predict_logits(np.asarray(x), batch_size)


def _dpu_training_model(model, calibration_data):
    if is_dpu_model(model):
        return model, "trained"
    if is_quantized(model):
        raise TfqkdError(
            "the model is quantized with a non-DPU policy; export its float model, or train with "
            "tfqkd.quantize(model, 'dpu') (tfqkd.dpu.quantize_for_dpu) so the DPU positions are learned"
        )
    report = _dpu.check_model(model)
    if not report.ok:
        raise TfqkdError(report.one_line())
    if calibration_data is None:
        raise TfqkdError("a float model needs calibration_data to set the DPU positions")
    return quantize_for_dpu(model, calibration_data), "calibrated"


def _node_report(graph):
    rows = []
    for node in graph.nodes:
        row = {"name": node.name, "op": node.op, "output_pos": graph.output_pos(node.name)}
        if node.act:
            row["activation"] = node.act
        if "kernel" in node.pos:
            cut, bias = shifts(graph, node)
            row.update(kernel_pos=node.pos["kernel"], bias_pos=node.pos["bias"], shift_cut=cut, shift_bias=bias)
        rows.append(row)
    return rows


def to_dpu(model, out_dir, *, calibration_data=None, arch="zcu102", evaluation=None, name=None, batch_size=100):
    """Exports a model for the DPUCZDX8G: quantized.h5, emulator report and deploy bundle.

    Args:
      model: a DPU training model from :func:`tfqkd.dpu.quantize_for_dpu` (its trained
        positions are used) or a float Keras model (quantized and calibrated here).
      out_dir: output directory; created, or files replaced inside it. Nothing is written when
        the model is not DPU-compatible or anything fails.
      calibration_data: one batch of inputs; required for a float model.
      arch: default board, "zcu102" or "zcu104" (both compile scripts are written).
      evaluation: optional ``(x, y)``; the emulator (run from the written .h5) predicts the board
        accuracy, compared with the Keras fake-quant model; saved for the board runner.
      name: network name (default: the model's name).
      batch_size: emulator batch size.

    Returns:
      dict report: paths, positions per node, compatibility and, with ``evaluation``,
      ``emulator_accuracy``, ``keras_accuracy`` and ``agreement`` (top-1).

    Raises:
      TfqkdError: unsupported model (naming every offending layer), bad arguments, or a graph
        violating the DPU limits.
    """
    if arch not in BOARDS:
        raise TfqkdError(f"unknown DPU target '{arch}'; known: {', '.join(BOARDS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TfqkdError(f"output path {out_dir} exists and is not a directory")
    atomic.ensure_directory(out_dir.parent, "the directory of the DPU output")  # the bundle is staged there
    dpu_model, source = _dpu_training_model(model, calibration_data)
    graph = graph_from_dpu_model(dpu_model)
    problems = check_limits(graph)
    if problems:
        raise TfqkdError(f"DPU positions violate the limits ({len(problems)}): " + "; ".join(problems))
    name = name or dpu_model.name
    graph.name = name
    report = {
        "model": name,
        "positions_from": source,
        "arch": arch,
        "compile_command": compile_command(arch, name),
        "nodes": _node_report(graph),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        h5_path = write_quantized_h5(graph, staging / "quantized.h5")
        files = [h5_path] + write_bundle(staging, name, arch, evaluation)
        if evaluation is not None:
            x, y = np.asarray(evaluation[0]), np.asarray(evaluation[1]).reshape(-1)
            emu = _dpu.DPUEmulator(read_quantized_h5(h5_path)).predict(x, batch_size)
            keras_pred = np.argmax(dpu_model.predict(x, batch_size=batch_size, verbose=0), axis=-1)
            report.update(
                evaluation_images=int(len(x)),
                emulator_accuracy=float(np.mean(emu == y)),
                keras_accuracy=float(np.mean(keras_pred == y)),
                agreement=float(np.mean(emu == keras_pred)),
            )
        (staging / "dpu_report.json").write_text(json.dumps(report, indent=2))
        files.append(staging / "dpu_report.json")
        out_dir.mkdir(exist_ok=True)
        for path in files:
            path.replace(out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report["out_dir"] = str(out_dir)
    report["files"] = sorted(p.name for p in files)
    return report
