"""Tests for tfqkd.data: registry, bundled sets, pipelines, augmentation, tfds path."""

import math

import numpy as np
import pytest

import tfqkd.data as data
from tfqkd.compat import tf
from tfqkd.data import bundled
from tfqkd.errors import TfqkdError


def _collect(ds):
    parts = list(zip(*[tuple(t.numpy() for t in el) for el in ds]))
    return [np.concatenate(p) for p in parts]


# --- registry ---------------------------------------------------------------


def test_registry_lists_all_sets():
    names = data.list_datasets()
    assert set(names) >= {"mnist", "fashion_mnist", "cifar10", "cifar100", "mnist5k", "digits"}
    info = data.dataset_info("cifar100")
    assert (info.num_classes, info.input_shape) == (100, (32, 32, 3))
    assert (info.source, info.augment) == ("tfds", "cifar")
    assert data.dataset_info("mnist5k").source == "bundled"
    for name in ("mnist", "fashion_mnist", "mnist5k", "digits"):
        assert data.dataset_info(name).augment is None
    with pytest.raises(Exception):
        info.num_classes = 3  # frozen


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(TfqkdError) as exc:
        data.load("imagenet7")
    msg = str(exc.value)
    assert "imagenet7" in msg and "mnist5k" in msg and "cifar10" in msg and "\n" not in msg
    with pytest.raises(TfqkdError):
        data.dataset_info("nope")
    with pytest.raises(TfqkdError):
        data.load_arrays("nope", "train")


@pytest.mark.parametrize(
    "kwargs",
    [dict(split="val"), dict(batch_size=0), dict(augment="mixup"), dict(limit=-1), dict(batch_size=True)],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(TfqkdError):
        data.load("digits", **kwargs)


# --- bundled sets -----------------------------------------------------------


def test_mnist5k_split_sizes_classes_and_range():
    x_tr, y_tr = data.load_arrays("mnist5k", "train")
    x_te, y_te = data.load_arrays("mnist5k", "test")
    assert x_tr.shape == (4000, 28, 28, 1) and x_te.shape == (1000, 28, 28, 1)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert np.bincount(y_tr).tolist() == [400] * 10
    assert np.bincount(y_te).tolist() == [100] * 10
    assert x_tr.min() == 0.0 and x_tr.max() == 1.0 and 0.05 < x_tr.mean() < 0.3
    info = data.dataset_info("mnist5k")
    assert (info.train_size, info.test_size) == (4000, 1000)


def test_mnist5k_split_is_deterministic():
    x1, y1 = data.load_arrays("mnist5k", "test")
    bundled._mnist5k.cache_clear()
    x2, y2 = data.load_arrays("mnist5k", "test")
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x1[0] = 7.0  # callers get copies; the cache is not corrupted
    assert data.load_arrays("mnist5k", "test")[0].max() == 1.0


def test_digits_set():
    x_tr, y_tr = data.load_arrays("digits", "train")
    x_te, y_te = data.load_arrays("digits", "test")
    assert x_tr.shape == (1437, 8, 8, 1) and x_te.shape == (360, 8, 8, 1)
    assert x_tr.min() == 0.0 and x_tr.max() == 1.0
    assert set(np.unique(y_te)) == set(range(10))
    assert np.all(np.abs(np.bincount(y_te) - 36) <= 1)
    assert data.load_arrays("digits", "train", limit=10)[0].shape == (10, 8, 8, 1)


# --- pipelines --------------------------------------------------------------


def test_with_index_is_stable_unique_and_covering():
    x_all, y_all = data.load_arrays("digits", "train")
    ds = data.load("digits", "train", batch_size=100, with_index=True, seed=3)
    x1, y1, i1 = _collect(ds)
    x2, y2, i2 = _collect(ds)  # second epoch
    assert i1.dtype == np.int64
    assert sorted(i1.tolist()) == list(range(1437)) and sorted(i2.tolist()) == list(range(1437))
    assert not np.array_equal(i1, i2), "train order should reshuffle each epoch"
    np.testing.assert_array_equal(x1, x_all[i1])  # index points at the same sample every epoch
    np.testing.assert_array_equal(y2, y_all[i2])
    # Same seed, new pipeline: same first-epoch order.
    _, _, i3 = _collect(data.load("digits", "train", batch_size=100, with_index=True, seed=3))
    np.testing.assert_array_equal(i1, i3)


def test_test_split_is_ordered_and_unaugmented():
    x_all, y_all = data.load_arrays("mnist5k", "test", limit=200)
    x, y, i = _collect(data.load("mnist5k", "test", batch_size=64, with_index=True, limit=200))
    np.testing.assert_array_equal(i, np.arange(200))
    np.testing.assert_array_equal(x, x_all)
    np.testing.assert_array_equal(y, y_all)


def test_batching_and_limit():
    ds = data.load("mnist5k", "train", batch_size=32, limit=100)
    sizes = [int(x.shape[0]) for x, _ in ds]
    assert sizes == [32, 32, 32, 4]
    ds = data.load("mnist5k", "train", batch_size=32, limit=100, drop_remainder=True)
    assert [int(x.shape[0]) for x, _ in ds] == [32, 32, 32]
    assert ds.element_spec[0].shape.as_list() == [32, 28, 28, 1]
    x, y = next(iter(ds))
    assert x.dtype == tf.float32 and y.dtype == tf.int64


def test_digit_sets_default_to_no_augmentation():
    x_all, _ = data.load_arrays("mnist5k", "train", limit=64)
    x, _ = _collect(data.load("mnist5k", "train", limit=64, shuffle=False))
    np.testing.assert_array_equal(x, x_all)


def test_explicit_cifar_augment_in_pipeline():
    x_all, _ = data.load_arrays("mnist5k", "train", limit=64)
    ds = data.load("mnist5k", "train", limit=64, shuffle=False, augment="cifar", seed=1)
    x1, _ = _collect(ds)
    x2, _ = _collect(ds)
    assert x1.shape == x_all.shape and x1.min() >= 0.0 and x1.max() <= 1.0
    assert not np.array_equal(x1, x_all)
    assert not np.array_equal(x1, x2), "augmentation should differ between epochs"
    x3, _ = _collect(data.load("mnist5k", "train", limit=64, shuffle=False, augment="cifar", seed=1))
    np.testing.assert_array_equal(x1, x3)


def test_calibration_batch():
    x = data.calibration_batch("mnist5k", n=50, seed=1)
    assert x.shape == (50, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x, data.calibration_batch("mnist5k", n=50, seed=1))
    assert not np.array_equal(x, data.calibration_batch("mnist5k", n=50, seed=2))
    with pytest.raises(TfqkdError):
        data.calibration_batch("digits", n=10_000)


# --- augmentation -----------------------------------------------------------


def _seed(i):
    return tf.constant([i, 12345], tf.int64)


def test_flip_flips_about_half_the_time():
    img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    flipped = 0
    for i in range(200):
        out = data.random_flip(tf.constant(img), _seed(i)).numpy()
        if np.array_equal(out, img[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, img)
    assert 70 < flipped < 130


def _shift(img, dy, dx):
    h, w = img.shape[:2]
    out = np.zeros_like(img)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = img[ys, xs]
    return out


def test_pad_crop_shifts_at_most_four_pixels():
    img = np.random.default_rng(1).uniform(0.1, 1.0, (16, 16, 3)).astype(np.float32)
    shifts = set()
    for i in range(60):
        out = data.random_pad_crop(tf.constant(img), _seed(i)).numpy()
        assert out.shape == img.shape
        found = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if np.array_equal(out, _shift(img, dy, dx))
        ]
        assert len(found) == 1, "crop must be the image shifted by at most 4 px with zero fill"
        shifts.add(found[0])
    assert len(shifts) > 10


def test_rotate_ninety_degrees_moves_pixel_exactly():
    img = np.zeros((9, 9, 1), np.float32)
    img[4, 7] = 1.0  # right of the centre (4, 4)
    out = data.rotate(tf.constant(img), tf.constant(math.pi / 2)).numpy()
    assert out.sum() == 1.0
    r, c = np.argwhere(out[..., 0] == 1.0)[0]
    assert (abs(r - 4), c) == (3, 4)  # moved onto the vertical axis, same radius


def test_rotation_stays_within_fifteen_degrees():
    size, radius = 65, 26
    img = np.zeros((size, size, 1), np.float32)
    c = size // 2
    img[c - 2 : c + 3, c + radius - 2 : c + radius + 3] = 1.0  # 5x5 blob right of the centre
    angles = []
    for i in range(100):
        out = data.random_rotation(tf.constant(img), _seed(i)).numpy()[..., 0]
        assert out.shape == (size, size) and out.min() >= 0.0 and out.max() <= 1.0
        assert out.sum() > 15, "the blob must stay inside the image"
        rows, cols = np.nonzero(out)
        angles.append(math.degrees(math.atan2(rows.mean() - c, cols.mean() - c)))
    angles = np.abs(np.array(angles))
    assert angles.max() <= 15.0 + 1.0  # centroid of a nearest-sampled blob: well under 1 degree off
    assert angles.max() > 10.0 and (angles > 2.0).mean() > 0.5


def test_cifar_augment_keeps_shape_and_range():
    img = tf.constant(np.random.default_rng(2).random((32, 32, 3)).astype(np.float32))
    out = data.cifar_augment(img, _seed(5))
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 1.0
    np.testing.assert_array_equal(out.numpy(), data.cifar_augment(img, _seed(5)).numpy())
    assert data.resolve_augment("none") is None and data.resolve_augment(None) is None
    with pytest.raises(TfqkdError):
        data.resolve_augment("autoaugment")


# --- tfds path --------------------------------------------------------------


def test_tfds_cifar10_through_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        ds = data.load("cifar10", "train", batch_size=8, with_index=True, data_dir=str(tmp_path))
        x, y, i = _collect(ds)
        assert x.shape == (20, 32, 32, 3) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert y.dtype == np.int64 and set(y.tolist()) <= set(range(10))
        assert sorted(i.tolist()) == list(range(20))
        xa, ya = data.load_arrays("cifar10", "test", data_dir=str(tmp_path))
        assert xa.shape[1:] == (32, 32, 3) and xa.dtype == np.float32 and ya.dtype == np.int64
        assert data.calibration_batch("cifar10", n=4, data_dir=str(tmp_path)).shape == (4, 32, 32, 3)
    assert data.dataset_info("cifar10").num_classes == 10


def test_unprepared_tfds_dataset_gives_one_line_error(tmp_path):
    for call in (
        lambda: data.load("cifar10", "train", data_dir=str(tmp_path)),
        lambda: data.load_arrays("mnist", "test", data_dir=str(tmp_path)),
    ):
        with pytest.raises(TfqkdError) as exc:
            call()
        msg = str(exc.value)
        assert "--data-dir" in msg and "mnist5k" in msg and str(tmp_path) in msg
        assert "is not prepared" in msg and "\n" not in msg
