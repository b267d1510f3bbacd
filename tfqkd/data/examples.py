"""Input examples from whatever a caller passes: an array, ``(x, y)``, or a tf.data pipeline."""

import numpy as np

from tfqkd.compat import tf

__all__ = ["take_inputs"]


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
