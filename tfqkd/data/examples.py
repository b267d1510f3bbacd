"""Input examples from whatever a caller passes: an array, ``(x, y)``, or a tf.data pipeline."""

import numpy as np

from tfqkd.compat import tf
from tfqkd.errors import TfqkdError

__all__ = ["CALIBRATION_EXAMPLES", "calibration_inputs", "take_inputs"]

#: Inputs a quantizer calibration reads at most (activation ranges, signedness).
CALIBRATION_EXAMPLES = 256


def take_inputs(data, limit):
    """Up to ``limit`` input examples, stacked.

    Args:
      data: an array ``(N, ...)`` (or a list of examples), an ``(x, y, ...)`` tuple, or a
        ``tf.data.Dataset`` of batches (``x`` or ``(x, y, ...)``); batches are
        read until ``limit`` examples are collected.
      limit: the most examples to return.

    Returns:
      an ndarray of at most ``limit`` examples (empty, shape ``(0,)``, for an
      empty dataset), or None when ``data`` is None.
    """
    if data is None:
        return None
    if isinstance(data, tf.data.Dataset):
        parts, count = [], 0
        for batch in data:
            x = np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch)
            parts.append(x)
            count += len(x)
            if count >= limit:
                break
        return np.concatenate(parts)[:limit] if parts else np.zeros((0,))
    if isinstance(data, tuple):
        data = data[0]
    return np.asarray(data)[:limit]


def calibration_inputs(data, limit=CALIBRATION_EXAMPLES):
    """The inputs a calibration reads: up to ``limit`` examples of ``data`` (see :func:`take_inputs`).

    Returns:
      an ndarray, or None when ``data`` is None (the caller's defaults apply).

    Raises:
      TfqkdError: ``data`` holds no example.
    """
    x = take_inputs(data, limit)
    if x is not None and (x.ndim < 2 or len(x) == 0):
        raise TfqkdError("calibration data must hold at least one input example with a batch dimension")
    return x
