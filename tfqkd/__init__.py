"""tfqkd: Quantization-Aware Knowledge Distillation with QKeras, to TFLite int8 and the Xilinx DPU.

Typical use (thesis Algorithm 1; docs/architecture.md)::

    import tfqkd
    student = tfqkd.create_model("densenet21", num_classes=10, quant="w4a4")
    qkd = tfqkd.QKD(student, teacher, phase="cs", alpha=0.7, temperature=8)
"""

# Must come first: selects Keras 2 before anything imports TensorFlow.
from tfqkd import compat  # noqa: F401  isort: skip

from tfqkd.distill import QKD, kd_loss, precompute_teacher_logits
from tfqkd.errors import TfqkdError
from tfqkd.io import load_model
from tfqkd.models import create_model, list_models, register_model
from tfqkd.quant import QuantPolicy, custom_objects, quantize
from tfqkd import dpu  # noqa: F401  isort: skip  (registers the ``dpu`` quantization target)
from tfqkd.training import DeadRunAlarm, WarmupMultiStep, make_sgd

# 0.2: learned steps are stored as log-steps (0.1 files convert in load_model).
__version__ = "0.8.0"

#: Subpackages reachable as attributes after ``import tfqkd`` (``tfqkd.export.to_tflite``), imported
#: on first use: the exporters, benchmarks and analyses pull in TFLite and plotting.
_SUBPACKAGES = ("analysis", "bench", "data", "distill", "dpu", "export", "io", "models", "quant", "recipes", "training")


def __getattr__(name):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"tfqkd.{name}")
    raise AttributeError(f"module 'tfqkd' has no attribute {name!r}")

__all__ = [
    "DeadRunAlarm",
    "QKD",
    "QuantPolicy",
    "TfqkdError",
    "WarmupMultiStep",
    "create_model",
    "custom_objects",
    "kd_loss",
    "list_models",
    "load_model",
    "make_sgd",
    "precompute_teacher_logits",
    "quantize",
    "register_model",
]
