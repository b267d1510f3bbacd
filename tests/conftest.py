"""Test session setup: tfqkd must be imported before TensorFlow (it selects Keras 2)."""

import tfqkd  # noqa: F401  isort: skip
