"""Datasets read through ``tensorflow_datasets`` (MNIST, Fashion-MNIST, CIFAR).

The thesis trains on MNIST and CIFAR-10/100 (seed 001, chapters 3.1, 5.3-5.7).
Nothing is fetched implicitly: data must already be prepared by tfds under
``data_dir`` unless the caller passes ``download=True``. A missing dataset
raises :class:`~tfqkd.errors.TfqkdError` pointing at ``--data-dir`` and the
bundled offline sets.
"""

import numpy as np

from tfqkd.compat import tf  # noqa: F401  (selects Keras 2 before tfds imports TensorFlow)
from tfqkd.errors import TfqkdError

__all__ = ["tfds_dataset", "tfds_arrays", "default_data_dir"]


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def default_data_dir():
    """The directory tfds reads when no ``data_dir`` is given.

    Returns:
        ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` as tfds resolves it.
    """
    return _tfds().core.constants.DATA_DIR


def _split_spec(split, limit):
    return split if limit is None else f"{split}[:{int(limit)}]"


def _not_prepared(name, data_dir):
    where = data_dir or default_data_dir()
    return TfqkdError(
        f"dataset {name!r} is not prepared in {where}; pass --data-dir to a directory where tfds "
        "has prepared it, or use a bundled set: mnist5k, digits"
    )


def tfds_dataset(name, split, *, data_dir=None, limit=None, download=False):
    """Open one split of a tfds dataset as ``(uint8 image, int64 label)`` pairs.

    Files are read in a fixed order (no file shuffling), so the position of an
    element is a stable sample index across epochs and runs.

    Args:
        name: tfds name, e.g. ``"cifar10"``.
        split: ``"train"`` or ``"test"``.
        data_dir: Directory holding prepared tfds data (``None``: tfds default).
        limit: Keep only the first ``limit`` samples of the split.
        download: Download and prepare the data if missing (explicit opt-in).

    Returns:
        A ``tf.data.Dataset`` of ``(image, label)``.

    Raises:
        TfqkdError: if the dataset is not prepared and ``download`` is false.
    """
    tfds = _tfds()
    try:
        return tfds.load(
            name,
            split=_split_spec(split, limit),
            data_dir=data_dir,
            download=download,
            as_supervised=True,
            shuffle_files=False,
        )
    except AssertionError as exc:  # tfds signals "not prepared" with an assertion
        raise _not_prepared(name, data_dir) from exc


def tfds_arrays(name, split, *, data_dir=None, limit=None, download=False):
    """Read one split of a tfds dataset into memory.

    Args:
        name: tfds name, e.g. ``"mnist"``.
        split: ``"train"`` or ``"test"``.
        data_dir: Directory holding prepared tfds data (``None``: tfds default).
        limit: Keep only the first ``limit`` samples of the split.
        download: Download and prepare the data if missing (explicit opt-in).

    Returns:
        ``(x, y)``: float32 images in [0, 1] ``(N, H, W, C)`` and int64 labels.

    Raises:
        TfqkdError: if the dataset is not prepared and ``download`` is false.
    """
    ds = tfds_dataset(name, split, data_dir=data_dir, limit=limit, download=download)
    xs, ys = [], []
    for x, y in ds.batch(1024).as_numpy_iterator():
        xs.append(np.asarray(x, np.float32) / 255.0)
        ys.append(np.asarray(y, np.int64))
    if not xs:
        raise TfqkdError(f"dataset {name!r} split {split!r} is empty in {data_dir or default_data_dir()}")
    return np.concatenate(xs), np.concatenate(ys)
