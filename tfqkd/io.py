"""Loading model files safely.

Keras model files can carry code: a ``Lambda`` layer stores Python bytecode
(.h5) or a function reference, which runs when the model is loaded or called.
:func:`load_model` refuses such files unless the caller opts in with
``unsafe=True`` (``--unsafe`` on the command line), and turns unreadable or
corrupt files into one-line :class:`~tfqkd.errors.TfqkdError` messages.
"""

import json
import zipfile
from pathlib import Path

import h5py

from tfqkd._keras import keras
from tfqkd.errors import TfqkdError
from tfqkd.quant import custom_objects

__all__ = ["UNSAFE_LAYER_TYPES", "load_model", "read_model_config"]

#: Layer classes whose config holds executable code.
UNSAFE_LAYER_TYPES = ("Lambda", "TFOpLambda")


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
    if not path.is_file():
        raise TfqkdError(f"model file not found: {path}")
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
            if raw is None:
                raise TfqkdError(f"{path} holds no Keras model (no model_config; weights-only file?)")
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except TfqkdError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise TfqkdError(f"{path} is not a readable Keras model file ({type(err).__name__})") from None


def _layer_classes(config):
    """Yields (class_name, name) of every layer, descending into nested models."""
    inner = config.get("config", {}) if isinstance(config, dict) else {}
    for layer in inner.get("layers", []) if isinstance(inner, dict) else []:
        yield layer.get("class_name"), layer.get("config", {}).get("name", "?")
        if isinstance(layer.get("config"), dict) and "layers" in layer["config"]:
            yield from _layer_classes(layer)


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
    offending = [f"{name} ({cls})" for cls, name in _layer_classes(config) if cls in UNSAFE_LAYER_TYPES]
    if offending and not unsafe:
        raise TfqkdError(
            f"{path} contains layers that execute code: {', '.join(offending)}; pass --unsafe (unsafe=True) "
            "only if you trust the file"
        )
    try:
        return keras.models.load_model(path, custom_objects=custom_objects(), compile=False, safe_mode=not unsafe)
    except TfqkdError:
        raise
    except Exception as err:  # Keras raises many types for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TfqkdError(f"cannot load model {path}: {first[:200]}") from None
