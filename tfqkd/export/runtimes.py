"""The TFLite runtimes a file is checked on: LiteRT, tflite-runtime and TensorFlow's own interpreter.

One place that knows how to load each of them (``tfqkd.export.inspect``,
``tfqkd.export.validate`` and ``tfqkd.bench.runtime`` all come here):

* ``litert``: ``ai_edge_litert`` (the maintained runtime, XNNPACK by default);
* ``tflite-runtime``: ``tflite_runtime``, the runtime small ARM boards install
  (2.14 needs numpy < 2, so it usually lives in a virtual environment of its own);
* ``tensorflow``: ``tf.lite.Interpreter``;
* ``litert-builtin``: LiteRT without its default XNNPACK delegate, i.e. TFLite's built-in
  kernels (gemmlowp's two roundings of a requantization, as tflite-runtime 2.14 and any build
  without XNNPACK's int8 path compute).

A runtime may be given as ``NAME=PYTHON``: the file then runs in a subprocess
of that Python interpreter (e.g. a venv with ``tflite-runtime==2.14`` and
``numpy<2``), which needs only numpy and the runtime, not tfqkd.
"""

import json
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tfqkd.errors import TfqkdError

__all__ = ["RUNTIMES", "RuntimeRefused", "RuntimeUnavailable", "Runtime", "available", "interpreter_class", "parse_runtimes", "run_codes"]

#: Runtime name -> (module with ``Interpreter``, label used in reports). First available is the default.
RUNTIMES = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
    "tensorflow": ("tensorflow.lite", "tf.lite"),
    "litert-builtin": ("ai_edge_litert.interpreter", "ai-edge-litert built-in kernels"),
}
_DISTRIBUTIONS = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime", "tensorflow": "tensorflow",
                  "litert-builtin": "ai-edge-litert"}  # fmt: skip
#: Runtimes that run without their default delegates (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES).
_BUILTIN_KERNELS = ("litert-builtin",)


class RuntimeUnavailable(TfqkdError):
    """A requested runtime is not installed (or its Python cannot run it)."""


class RuntimeRefused(TfqkdError):
    """A TFLite runtime cannot run the file (it refuses an op's parameters, or fails on it)."""


class Runtime:
    """A runtime by name, in this process or in the Python interpreter ``python``."""

    def __init__(self, name, python=None):
        if name not in RUNTIMES:
            raise TfqkdError(f"unknown TFLite runtime {name!r}; use {', '.join(RUNTIMES)} (optionally NAME=PYTHON)")
        self.name, self.python = name, python

    @property
    def label(self):
        return RUNTIMES[self.name][1] + (f" ({self.python})" if self.python else "")

    def __repr__(self):
        return f"Runtime({self.label})"


def parse_runtimes(text):
    """``"litert,tflite-runtime=/venv/bin/python"`` -> list of :class:`Runtime` (``auto``: the first installed)."""
    if text is None or str(text).strip() in ("", "auto"):
        return [Runtime(_first_available())]
    result = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        name, _, python = item.partition("=")
        result.append(Runtime(name.strip(), python.strip() or None))
    if not result:
        raise TfqkdError(f"no runtime in {text!r}")
    return result


def interpreter_class(name=None):
    """``(Interpreter class, OpResolverType or None, name)`` of runtime ``name`` (None: the first installed).

    Raises:
      RuntimeUnavailable: the runtime's package is not importable here.
    """
    name = name or _first_available()
    if name not in RUNTIMES:
        raise TfqkdError(f"unknown TFLite runtime {name!r}; use one of {', '.join(RUNTIMES)}")
    try:
        if name in ("litert", "litert-builtin"):
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        elif name == "tflite-runtime":
            from tflite_runtime.interpreter import Interpreter, OpResolverType
        else:
            from tfqkd.compat import tf

            Interpreter = tf.lite.Interpreter
            OpResolverType = getattr(tf.lite.experimental, "OpResolverType", None)
    except ImportError as err:
        raise RuntimeUnavailable(
            f"TFLite runtime '{name}' is not installed here ({err}); install it, or name a Python that has it: "
            f"--runtimes {name}=/path/to/venv/bin/python"
        ) from None
    return Interpreter, OpResolverType, name


def quiet_interpreter(Interpreter, **kwargs):  # noqa: N803 - a class
    """``Interpreter(**kwargs)`` without tf.lite.Interpreter's five-line deprecation notice (the fallback
    runtime where LiteRT is not installed: ``pip install "tfqkd[edge]"`` gets it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Interpreter(**kwargs)


def available(name):
    """Whether runtime ``name`` can be imported in this process."""
    try:
        interpreter_class(name)
    except RuntimeUnavailable:
        return False
    return True


def _version(name):
    import importlib.metadata as metadata

    try:
        return metadata.version(_DISTRIBUTIONS[name])
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "?"


def _first_available():
    for name in RUNTIMES:
        if name == "tensorflow" or available(name):
            return name
    return "tensorflow"  # pragma: no cover


# Runs in the other interpreter: numpy and the runtime only.
_CHILD = r"""
import json, sys
import numpy as np
module, dist, model_path, inputs_path, outputs_path, batch, builtin = sys.argv[1:8]
if module == "tensorflow.lite":
    import tensorflow as tf
    Interpreter = tf.lite.Interpreter
else:
    Interpreter = __import__(module, fromlist=["Interpreter"]).Interpreter
options = {}
if builtin == "1":
    resolver = __import__(module, fromlist=["OpResolverType"]).OpResolverType
    options["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
import importlib.metadata as md
try:
    version = md.version(dist)
except md.PackageNotFoundError:
    version = "?"
x = np.load(inputs_path)
interpreter = Interpreter(model_path=model_path, **options)
detail = interpreter.get_input_details()[0]
out = []
for start in range(0, len(x), int(batch)):
    chunk = x[start : start + int(batch)]
    interpreter.resize_tensor_input(detail["index"], chunk.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], chunk)
    interpreter.invoke()
    out.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
np.save(outputs_path, np.concatenate(out))
print(json.dumps({"version": version, "numpy": np.__version__}))
"""


def _run_in_process(interpreter, inputs, batch_size):
    """The outputs of ``interpreter`` on ``inputs``, ``batch_size`` at a time."""
    detail = interpreter.get_input_details()[0]
    results, current = [], None
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        if current != len(chunk):
            interpreter.resize_tensor_input(detail["index"], chunk.shape)
            interpreter.allocate_tensors()
            current = len(chunk)
        interpreter.set_tensor(detail["index"], chunk)
        interpreter.invoke()
        results.append(np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])))
    return np.concatenate(results)


def _last_sentence(err):
    """The runtime's own reason, without the line it repeats per delegate partition
    ("failed to create XNNPACK runtime" once per partition, then "Node number N ... failed to prepare.")."""
    text = str(err).replace("failed to create XNNPACK runtime", "").strip()
    return (text or str(err)).splitlines()[-1][:300]


def run_codes(model_path, inputs, runtime, batch_size=100):
    """Runs a .tflite on inputs already in the model's input type; returns its raw outputs.

    Args:
      model_path: the .tflite file.
      inputs: array in the input tensor's dtype (int8 codes for int8-io models).
      runtime: a :class:`Runtime`.
      batch_size: examples per invoke.

    Returns:
      ``(outputs, info)``: the output tensor's values (its own dtype) and a dict with the
      runtime's ``label`` (and ``version`` and ``numpy`` for a subprocess).

    Raises:
      RuntimeUnavailable: the runtime is not installed (here, or in the given Python).
      RuntimeRefused: the runtime refuses or fails on the file (XNNPACK, for one, refuses a requantization
        multiplier of 256 or more, which a model whose steps collapsed in training can need).
    """
    inputs = np.asarray(inputs)
    builtin = runtime.name in _BUILTIN_KERNELS
    if runtime.python is None:
        Interpreter, OpResolverType, _ = interpreter_class(runtime.name)
        options = {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if builtin else {}
        try:
            return _run_in_process(quiet_interpreter(Interpreter, model_path=str(model_path), **options), inputs,
                                   batch_size), {"label": runtime.label, "version": _version(runtime.name)}  # fmt: skip
        except (RuntimeError, ValueError) as err:
            raise RuntimeRefused(f"TFLite runtime '{runtime.label}' cannot run {model_path}: {_last_sentence(err)}"
                             + ("" if builtin else " (TFLite's built-in kernels may: --runtimes litert-builtin)")) from None  # fmt: skip
    python = Path(runtime.python)
    if not python.exists():
        raise RuntimeUnavailable(f"TFLite runtime '{runtime.name}': no Python interpreter at {python}")
    with tempfile.TemporaryDirectory(prefix="tfqkd_runtime_") as tmp:
        inputs_path, outputs_path = Path(tmp) / "inputs.npy", Path(tmp) / "outputs.npy"
        np.save(inputs_path, inputs)
        command = [str(python), "-c", _CHILD, RUNTIMES[runtime.name][0], _DISTRIBUTIONS[runtime.name], str(model_path), str(inputs_path),
                   str(outputs_path), str(batch_size), "1" if builtin else "0"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit code {done.returncode}"
            if "ModuleNotFoundError" in last or "ImportError" in last:
                raise RuntimeUnavailable(f"TFLite runtime '{runtime.name}' is not installed in {python}: {last}")
            raise RuntimeRefused(f"TFLite runtime '{runtime.label}' failed on {model_path}: {last[:300]}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        return np.load(outputs_path), {"label": runtime.label, **info}
