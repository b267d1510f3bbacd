"""Datasets for tfqkd: registry, tfds and bundled sources, augmentation, calibration.

Thesis reference: seed 001, chapter 3.1 (MNIST, CIFAR-10/100) and section
5.1.10 (CIFAR augmentation). Typical use::

    import tfqkd.data as data
    train = data.load("mnist5k", "train", batch_size=64, with_index=True)
    x_test, y_test = data.load_arrays("mnist5k", "test")
"""

from tfqkd.data.augment import (
    cifar_augment,
    random_flip,
    random_pad_crop,
    random_rotation,
    resolve_augment,
    rotate,
)
from tfqkd.data.examples import take_inputs
from tfqkd.data.pipeline import calibration_batch, load, load_arrays
from tfqkd.data.registry import AUGMENT_KINDS, DatasetInfo, dataset_info, list_datasets

__all__ = [
    "AUGMENT_KINDS",
    "DatasetInfo",
    "calibration_batch",
    "cifar_augment",
    "dataset_info",
    "list_datasets",
    "load",
    "load_arrays",
    "random_flip",
    "random_pad_crop",
    "random_rotation",
    "resolve_augment",
    "rotate",
    "take_inputs",
]
