"""The one place that selects Keras 2 (``tf_keras``) for TensorFlow.

QKeras and tfmot only work with the Keras-2 API: under Keras 3 ``QDense.call``
raises ``NotImplementedError`` and tfmot refuses Keras-3 models. TensorFlow
decides which Keras ``tf.keras`` means when it is first imported, from the
``TF_USE_LEGACY_KERAS`` environment variable, so this module must run before
TensorFlow is imported. Every other module imports Keras from here::

    from tfqkd._keras import keras, tf
"""

import os
import sys

_KERAS3_ERROR = (
    "tfqkd needs Keras 2 (tf_keras), but TensorFlow was already imported with Keras 3 active; "
    "import tfqkd before tensorflow, or set TF_USE_LEGACY_KERAS=1 in the environment"
)


def _tensorflow_uses_keras3():
    """True if an already imported TensorFlow resolves ``tf.keras`` to Keras 3."""
    tf_module = sys.modules.get("tensorflow")
    if tf_module is None:
        return False
    try:
        return not tf_module.keras.layers.Layer.__module__.startswith("tf_keras")
    except (AttributeError, ImportError):
        return True


if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") not in ("1", "true", "True"):
    raise ImportError(_KERAS3_ERROR)
os.environ["TF_USE_LEGACY_KERAS"] = "1"
if _tensorflow_uses_keras3():
    raise ImportError(_KERAS3_ERROR)
# TensorFlow's C++ start-up chatter (CUDA probing, CPU feature notices) is noise on CPU machines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["keras", "tf"]
