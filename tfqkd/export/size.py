"""Model size report in the form of thesis table 5.8.

Parameters and the storage they need at 32, 8 and 4 bits
(``parameters * bits / 8 / 2**20`` MB, as the thesis counts), next to the
real sizes of the exported files.
"""

import json
from pathlib import Path


from tfqkd import atomic
from tfqkd.models.summary import count_params
from tfqkd.quant.quantizers import quantizer_state_suffixes

__all__ = ["count_parameters", "size_report", "write_size_report"]



def count_parameters(model):
    """Trainable parameters, excluding quantizer state (steps, ranges): a quantized model has the
    parameters of its float model.

    Args:
      model: a Keras model (float or quantized).

    Returns:
      int. BN counts gamma and beta (its moving statistics are not trainable),
      as in the thesis's table 5.8.
    """
    return count_params(model, exclude_suffixes=quantizer_state_suffixes())


def _mb(parameters, bits):
    return parameters * bits / 8 / 2**20


def size_report(model, files=None):
    """The table 5.8 row of a model plus the real file sizes.

    Args:
      model: a Keras model.
      files: optional dict label -> path of exported files (missing ones are skipped).

    Returns:
      dict with ``parameters``, ``fp32_mb``, ``int8_mb``, ``int4_mb`` and
      ``files`` (label -> ``{"path", "bytes", "mb"}``); with both an int8 and a
      float32 file, ``int8_to_float32`` (their byte ratio).
    """
    parameters = count_parameters(model)
    report = {
        "model": model.name,
        "parameters": parameters,
        "fp32_mb": _mb(parameters, 32),
        "int8_mb": _mb(parameters, 8),
        "int4_mb": _mb(parameters, 4),
        "files": {},
    }
    for label, path in (files or {}).items():
        path = Path(path)
        if path.is_file():
            size = path.stat().st_size
            report["files"][label] = {"path": str(path), "bytes": size, "mb": size / 2**20}
    if "int8" in report["files"] and "float32" in report["files"]:
        report["int8_to_float32"] = report["files"]["int8"]["bytes"] / report["files"]["float32"]["bytes"]
    return report


def write_size_report(report, path, *, force=True):
    """Writes a size report as JSON (atomically) and returns the path."""
    return atomic.write_bytes(path, (json.dumps(report, indent=2) + "\n").encode(), force=force)
