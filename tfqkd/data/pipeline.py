"""Input pipelines: ``tf.data`` datasets, in-memory arrays and calibration batches.

Batches follow the thesis setup (seed 001, chapter 5.1): float32 images in
[0, 1] with shape ``(H, W, C)``, int64 sparse labels, batch size 64, shuffled
training data and the section 5.1.10 augmentation for CIFAR. With
``with_index=True`` each element also carries its int64 position in the split,
stable across epochs, which the tutor-studying phase (thesis Algorithm 1, TS)
uses to look teacher outputs up in a precomputed cache.
"""

import numpy as np

from tfqkd.compat import tf
from tfqkd.data.augment import resolve_augment
from tfqkd.data.bundled import bundled_arrays
from tfqkd.data.registry import dataset_info
from tfqkd.data.tfds_source import tfds_arrays, tfds_dataset
from tfqkd.errors import TfqkdError

__all__ = ["load", "load_arrays", "calibration_batch"]

_SPLITS = ("train", "test")


def _check_split(split):
    if split not in _SPLITS:
        raise TfqkdError(f"unknown split {split!r}; use 'train' or 'test'")


def _check_positive_int(value, what, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TfqkdError(f"{what} must be a positive integer, got {value!r}")


def _raw_dataset(info, split, data_dir, limit, download):
    """``(x, y, idx)`` elements in split order; x is uint8 (tfds) or float32 (bundled)."""
    if info.source == "bundled":
        x, y = bundled_arrays(info.name, split)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        idx = np.arange(len(y), dtype=np.int64)
        return tf.data.Dataset.from_tensor_slices((x, y, idx)), len(y)
    ds = tfds_dataset(info.name, split, data_dir=data_dir, limit=limit, download=download)
    size = info.train_size if split == "train" else info.test_size
    count = size if limit is None else min(int(limit), size)
    ds = ds.enumerate().map(lambda i, xy: (xy[0], xy[1], i), num_parallel_calls=tf.data.AUTOTUNE)
    return ds, count


def _raw_arrays(info, split, data_dir, limit, download):
    """The split in memory, in split order; x stays uint8 for tfds sets (4x less memory than float)."""
    if info.source == "bundled":
        x, y = bundled_arrays(info.name, split)
        return (x, y) if limit is None else (x[:limit], y[:limit])
    xs, ys = [], []
    ds = tfds_dataset(info.name, split, data_dir=data_dir, limit=limit, download=download)
    for x, y in ds.batch(1024).as_numpy_iterator():
        xs.append(np.asarray(x))
        ys.append(np.asarray(y, np.int64))
    if not xs:
        raise TfqkdError(f"dataset {info.name!r} split {split!r} is empty")
    return np.concatenate(xs), np.concatenate(ys)


# Mixes the epoch into the stateless seeds; any odd constant well above the
# number of epochs keeps (seed, epoch) pairs from colliding.
_EPOCH_STRIDE = 1_000_003


def _epoch_indexed(x, y, *, seed, initial_epoch, shuffle, augment_fn, with_index, batch_size, drop_remainder):
    """Endless pipeline of per-epoch batches; epoch ``e`` depends on ``(seed, e)`` only.

    ``Dataset.shuffle(reshuffle_each_iteration=True)`` draws each epoch's order
    from a generator advanced once per iteration, so a fresh pipeline always
    starts at the first epoch's order. Here the order is a stateless shuffle
    seeded by ``(seed, epoch)`` and each augmentation draw is seeded by
    ``(seed, epoch, sample index)``, which any process can recompute.
    """
    count = len(y)
    if count < 1:
        raise TfqkdError("the dataset split is empty")
    x_all = tf.convert_to_tensor(x)
    y_all = tf.convert_to_tensor(y, tf.int64)
    base = tf.constant(seed, tf.int64)

    def element(epoch, j):
        image, label, idx = _to_float(tf.gather(x_all, j), tf.gather(y_all, j), j)
        if augment_fn is not None:
            image = augment_fn(image, tf.stack([base * _EPOCH_STRIDE + epoch, idx]))
        return (image, label, idx) if with_index else (image, label)

    def epoch_batches(epoch):
        order = tf.range(count, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(order, seed=tf.stack([base, epoch]))
        ds = tf.data.Dataset.from_tensor_slices(order)
        ds = ds.map(lambda j: element(epoch, j), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=drop_remainder)

    epochs = tf.data.Dataset.range(initial_epoch, np.iinfo(np.int64).max)
    return epochs.flat_map(epoch_batches).prefetch(tf.data.AUTOTUNE)


def _to_float(x, y, idx):
    if x.dtype == tf.uint8:
        x = tf.cast(x, tf.float32) / 255.0
    return tf.cast(x, tf.float32), tf.cast(y, tf.int64), tf.cast(idx, tf.int64)


def load(
    name,
    split="train",
    *,
    batch_size=64,
    augment=None,
    shuffle=None,
    with_index=False,
    data_dir=None,
    seed=0,
    limit=None,
    drop_remainder=False,
    download=False,
    initial_epoch=None,
):
    """Build a batched, prefetched ``tf.data`` pipeline for a registered dataset.

    Args:
        name: Dataset name (see :func:`tfqkd.data.list_datasets`).
        split: ``"train"`` or ``"test"``.
        batch_size: Samples per batch (thesis: 64).
        augment: ``None`` for the dataset's default on ``"train"`` (``"cifar"``
            for CIFAR, nothing for digit sets) and nothing on ``"test"``;
            ``"none"`` or ``"cifar"`` to choose explicitly.
        shuffle: Shuffle each epoch; ``None`` means ``True`` for train only.
        with_index: Also yield each sample's int64 position in the split.
        data_dir: Directory with prepared tfds data (tfds sets only).
        seed: Seed of the shuffle order and the augmentation draws; each epoch
            differs, the sequence of epochs is reproducible.
        limit: Use only the first ``limit`` samples of the split.
        drop_remainder: Drop the last incomplete batch.
        download: Let tfds download and prepare missing data (explicit opt-in).
        initial_epoch: ``None`` (default) for the one-epoch pipeline above,
            whose shuffle order depends on how often it was iterated before.
            An integer ``k >= 0`` gives an endless *epoch-indexed* pipeline
            that starts at epoch ``k``: epoch ``e``'s order and augmentation
            draws are a function of ``(seed, e)`` alone, so a run resumed at
            epoch ``k`` sees exactly the batches an uninterrupted run saw.
            Batches never straddle two epochs; pass ``steps_per_epoch =
            ceil(n / batch_size)`` (``n // batch_size`` with
            ``drop_remainder``) and ``initial_epoch=k`` to ``fit``. The split
            is held in memory (as the full-size shuffle buffer does anyway).

    Returns:
        A ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y, idx)`` batches: x float32
        ``(B, H, W, C)`` in [0, 1], y int64 ``(B,)``, idx int64 ``(B,)``.

    Raises:
        TfqkdError: for an unknown dataset, split or augment kind, bad sizes,
            or a tfds dataset that is not prepared.
    """
    info = dataset_info(name)
    _check_split(split)
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(limit, "limit", allow_none=True)
    if augment is None:
        augment = info.augment if split == "train" else None
    augment_fn = resolve_augment(augment)
    if shuffle is None:
        shuffle = split == "train"
    seed = int(seed)
    if initial_epoch is not None:
        if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer)) or initial_epoch < 0:
            raise TfqkdError(f"initial_epoch must be an integer >= 0, got {initial_epoch!r}")
        x, y = _raw_arrays(info, split, data_dir, limit, download)
        return _epoch_indexed(
            x, y, seed=seed, initial_epoch=int(initial_epoch), shuffle=shuffle, augment_fn=augment_fn,
            with_index=with_index, batch_size=batch_size, drop_remainder=drop_remainder,
        )  # fmt: skip

    ds, count = _raw_dataset(info, split, data_dir, limit, download)
    if shuffle:
        ds = ds.shuffle(max(count, 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(_to_float, num_parallel_calls=tf.data.AUTOTUNE)
    if augment_fn is not None:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xyi, s: (augment_fn(xyi[0], s), xyi[1], xyi[2]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if not with_index:
        ds = ds.map(lambda x, y, i: (x, y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def load_arrays(name, split, data_dir=None, limit=None, *, download=False):
    """Load a whole split into memory, in split order (for evaluation and calibration).

    Args:
        name: Dataset name (see :func:`tfqkd.data.list_datasets`).
        split: ``"train"`` or ``"test"``.
        data_dir: Directory with prepared tfds data (tfds sets only).
        limit: Keep only the first ``limit`` samples.
        download: Let tfds download and prepare missing data (explicit opt-in).

    Returns:
        ``(x, y)``: float32 ``(N, H, W, C)`` in [0, 1] and int64 ``(N,)``.

    Raises:
        TfqkdError: for an unknown dataset or split, a bad limit, or a tfds
            dataset that is not prepared.
    """
    info = dataset_info(name)
    _check_split(split)
    _check_positive_int(limit, "limit", allow_none=True)
    if info.source == "bundled":
        x, y = bundled_arrays(name, split)
        return (x, y) if limit is None else (x[:limit], y[:limit])
    return tfds_arrays(name, split, data_dir=data_dir, limit=limit, download=download)


def calibration_batch(name, n=64, seed=0, *, data_dir=None, download=False):
    """A reproducible random sample of un-augmented training images.

    Used to initialise quantization ranges from one batch of activations
    (thesis 5.1.9; QKD self-studying) and for post-training quantization.

    Args:
        name: Dataset name (see :func:`tfqkd.data.list_datasets`).
        n: Number of images.
        seed: Seed of the sample.
        data_dir: Directory with prepared tfds data (tfds sets only).
        download: Let tfds download and prepare missing data (explicit opt-in).

    Returns:
        float32 array ``(n, H, W, C)`` in [0, 1], drawn from the train split
        without replacement.

    Raises:
        TfqkdError: for an unknown dataset, a bad ``n`` or one larger than the
            train split, or a tfds dataset that is not prepared.
    """
    info = dataset_info(name)
    _check_positive_int(n, "n")
    if n > info.train_size:
        raise TfqkdError(f"calibration size n={n} exceeds the {info.train_size} training samples of {name!r}")
    if info.source == "bundled":
        x, _ = bundled_arrays(name, "train")
        pick = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
        return x[np.sort(pick)]
    ds = load(
        name, "train", batch_size=n, augment="none", shuffle=True, seed=seed,
        data_dir=data_dir, download=download,
    )
    for x, _ in ds.take(1):
        return x.numpy()
    raise TfqkdError(f"dataset {name!r} has no training samples in {data_dir}")
