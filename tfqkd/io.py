"""Loading model files safely.

Keras model files can carry code: a ``Lambda`` layer stores Python bytecode
(.h5) or a function reference, which runs when the model is loaded or called.
:func:`load_model` refuses such files unless the caller opts in with
``unsafe=True`` (``--unsafe`` on the command line), and turns unreadable or
corrupt files into one-line :class:`~tfqkd.errors.TfqkdError` messages.

Before Keras sees a file, its architecture JSON is checked (:func:`scan_model_config`):

* no layer that runs stored code or calls TensorFlow ops by name (``Lambda``,
  ``TFOpLambda``, ``SlicingOpLambda``, ``ClassMethod``, ``InstanceMethod``,
  ``InstanceProperty``) and no serialized lambda (``__lambda__``);
* every ``module`` a .keras config names is Keras, QKeras or tfqkd: the
  native format otherwise imports any module the file names (``os``,
  ``builtins``, a module planted next to the file) and looks a name up in it;
* a quantizer or activation given as a string (QKeras' ``"quantized_bits(4,0,1)"``
  form, which QKeras hands to its ``safe_eval``: a look-up of the name in
  ``qkeras.quantizers``' globals, called with the literal arguments) names a
  QKeras quantizer or a Keras activation and has only literal arguments.
"""

import json
import re
import zipfile
from pathlib import Path

import h5py

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.quant import custom_objects, model_quantizers

__all__ = ["UNSAFE_LAYER_TYPES", "load_model", "read_model_config", "scan_model_config"]

#: Layer classes whose config holds executable code or names a TensorFlow op to call.
UNSAFE_LAYER_TYPES = ("Lambda", "TFOpLambda", "SlicingOpLambda", "ClassMethod", "InstanceMethod", "InstanceProperty")

#: Modules a .keras config may name (the module itself or a submodule).
SAFE_MODULES = ("keras", "tf_keras", "qkeras", "tfqkd")

#: Largest architecture JSON read (a model config is kilobytes to a few megabytes).
MAX_CONFIG_BYTES = 64 << 20

#: Keys whose string values QKeras evaluates with ``safe_eval`` (quantizers) or Keras looks up (activations).
_EVALUATED_KEY = re.compile(r"(^|_)(quantizer|activation)$")
_CALL = re.compile(
    r"""^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\((?:\s*(?:[A-Za-z_][A-Za-z0-9_]*\s*=\s*)?"""
    r"""(?:[-+]?[0-9.eE+-]+|True|False|None|'[^'(),=]*'|"[^"(),=]*")\s*,?)*\))?\s*$"""
)
_QKERAS_FUNCTIONS = ("binary_sigmoid", "binary_tanh", "hard_sigmoid", "hard_tanh", "smooth_sigmoid", "smooth_tanh")
_KERAS_ACTIVATIONS = (
    "elu", "exponential", "gelu", "hard_sigmoid", "linear", "mish", "relu", "relu6", "selu", "sigmoid", "silu",
    "softmax", "softplus", "softsign", "swish", "tanh", "leaky_relu",
)  # fmt: skip


def _string_quantizer_names():
    """Names a string quantizer/activation may call: QKeras quantizers and Keras activations."""
    import inspect

    import qkeras.quantizers as qq

    names = {
        name
        for name, obj in vars(qq).items()
        if inspect.isclass(obj) and issubclass(obj, qq.BaseQuantizer) and obj is not qq.BaseQuantizer
    }
    return names | set(_QKERAS_FUNCTIONS) | set(_KERAS_ACTIVATIONS) | {"quantized_relu", "quantized_bits"}


def _known_quantizer_class(node, allowed):
    cls, registered = node.get("class_name"), node.get("registered_name")
    if not isinstance(cls, str):
        return False
    if cls in allowed:
        return True
    for name in (registered, cls):
        if isinstance(name, str) and name.startswith("tfqkd>"):
            return keras.saving.get_registered_object(name) is not None
    layer = getattr(keras.layers, cls, None)
    return isinstance(layer, type) and issubclass(layer, keras.layers.Layer) and cls not in UNSAFE_LAYER_TYPES


def _safe_module(module):
    return isinstance(module, str) and any(module == m or module.startswith(m + ".") for m in SAFE_MODULES)


def scan_model_config(config):
    """Lists what in a model's architecture JSON could run code when loaded or called.

    Args:
      config: the ``{"class_name": ..., "config": ...}`` mapping of a .h5 or .keras file.

    Returns:
      a list of one-line findings (empty: nothing found).
    """
    findings, allowed = [], None
    stack = [(config, None, 0)]
    while stack:
        node, key, depth = stack.pop()
        if depth > 200:
            findings.append("the config is nested more than 200 levels deep")
            break
        if isinstance(node, list):
            stack.extend((item, key, depth + 1) for item in node)
            continue
        if isinstance(node, str):
            if key is not None and _EVALUATED_KEY.search(key):
                allowed = allowed if allowed is not None else _string_quantizer_names()
                match = _CALL.match(node)
                if match is None or match.group(1) not in allowed:
                    findings.append(f"{key} {node[:60]!r} (not a known quantizer or activation)")
            continue
        if not isinstance(node, dict):
            continue
        cls = node.get("class_name")
        if key is not None and _EVALUATED_KEY.search(key) and "class_name" in node:
            # A quantizer dict: QKeras' legacy loader looks class_name up among
            # qkeras.quantizers' globals (functions included) and calls it.
            allowed = allowed if allowed is not None else _string_quantizer_names()
            if not _known_quantizer_class(node, allowed):
                findings.append(f"{key} of class {str(cls)[:60]!r} (not a known quantizer or activation)")
        if isinstance(cls, str):
            inner = node.get("config")
            name = inner.get("name", "?") if isinstance(inner, dict) else "?"
            if cls in UNSAFE_LAYER_TYPES or cls.split(">")[-1] in UNSAFE_LAYER_TYPES:
                findings.append(f"layer {str(name)[:60]} ({cls})")
            elif cls == "__lambda__":
                findings.append(f"serialized lambda function in {key or 'the config'}")
        if "module" in node and node["module"] is not None and not _safe_module(node["module"]):
            findings.append(f"object {str(cls)[:60]!r} from module {str(node['module'])[:60]!r}")
        for child_key, child in node.items():
            if isinstance(child, (dict, list, str)):
                stack.append((child, child_key if isinstance(child_key, str) else None, depth + 1))
    return findings


def read_model_config(path):
    """Reads the architecture JSON of a .h5 or .keras file without building it.

    Args:
      path: model file.

    Returns:
      the ``{"class_name": ..., "config": ...}`` mapping.

    Raises:
      TfqkdError: missing, unreadable or not a Keras model file.
    """
    path = Path(path)
    if path.is_dir():
        raise TfqkdError(f"model file {str(path)!r} is a directory, not a .h5 or .keras file")
    if not path.is_file():
        raise TfqkdError(f"model file not found: {str(path)!r}")
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("config.json")
                if info.file_size > MAX_CONFIG_BYTES:
                    raise TfqkdError(f"{path} has a config.json of {info.file_size} bytes; refusing to read it")
                config = json.loads(archive.read(info))
        else:
            with h5py.File(path, "r") as handle:
                raw = handle.attrs.get("model_config")
                if raw is None:
                    raise TfqkdError(f"{path} holds no Keras model (no model_config; weights-only file?)")
                if isinstance(raw, bytes):
                    raw = raw.decode()
                if not isinstance(raw, str):
                    raise TfqkdError(f"{path} has a model_config that is not JSON text")
                config = json.loads(raw)
    except TfqkdError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError, RecursionError, zipfile.BadZipFile) as err:
        raise TfqkdError(f"{path} is not a readable Keras model file ({type(err).__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise TfqkdError(f"{path} is not a Keras model file (its config is not a model description)")
    return config


def load_model(path, *, unsafe=False):
    """Loads a tfqkd/QKeras/Keras model file (.h5 or .keras), refusing code.

    Args:
      path: the model file.
      unsafe: allow Lambda layers (they execute code stored in the file).

    Returns:
      the uncompiled keras.Model.

    Raises:
      TfqkdError: missing or corrupt file, or a file with code while ``unsafe`` is False.
    """
    config = read_model_config(path)
    findings = scan_model_config(config)
    if findings and not unsafe:
        more = f" and {len(findings) - 3} more" if len(findings) > 3 else ""
        raise TfqkdError(
            f"{path} contains layers or objects that execute code: {'; '.join(findings[:3])}{more}; pass --unsafe "
            "(unsafe=True) only if you trust the file"
        )
    try:
        model = keras.models.load_model(path, custom_objects=custom_objects(), compile=False, safe_mode=not unsafe)
    except TfqkdError:
        raise
    except Exception as err:  # Keras raises many types for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TfqkdError(f"cannot load model {path}: {first[:200]}") from None
    for layer, _, quantizer in model_quantizers(model):
        upgrade = getattr(quantizer, "upgrade_legacy", None)
        if upgrade is not None:
            upgrade(f"layer '{layer.name}' of {path}")  # tfqkd 0.1 stored learned steps unparametrized
    return model
