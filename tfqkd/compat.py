"""The one place that selects Keras 2 (``tf_keras``) for TensorFlow.

QKeras and tfmot only work with the Keras-2 API: under Keras 3 ``QDense.call``
raises ``NotImplementedError`` and tfmot refuses Keras-3 models. TensorFlow
decides which Keras ``tf.keras`` means when it is first imported, from the
``TF_USE_LEGACY_KERAS`` environment variable, so this module must run before
TensorFlow is imported. Every other module imports Keras from here::

    from tfqkd.compat import keras, tf
"""

import contextlib
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _quiet_native_stderr():
    """Hides what TensorFlow's C++ runtime prints to fd 2 while it starts.

    TF 2.21 writes oneDNN, CPU-feature and CUDA-probing notices through absl
    before ``TF_CPP_MIN_LOG_LEVEL`` takes effect, so a command's one-line error
    would arrive after half a dozen lines of noise. Python exceptions are not
    affected (they are printed after the descriptor is restored). Setting
    ``TF_CPP_MIN_LOG_LEVEL=0`` keeps the notices.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0" or "tensorflow" in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _quiet_native_stderr():
    import tensorflow as tf  # noqa: E402
    import tf_keras as keras  # noqa: E402

    # Probing devices here triggers the CUDA driver check (and its error on
    # CPU-only machines) inside the quiet window rather than at the first op.
    tf.config.list_physical_devices()

__all__ = ["keras", "tf"]
