"""Test session setup: tfqkd must be imported before TensorFlow (it selects Keras 2)."""

import tfqkd  # noqa: F401  isort: skip

import typing

import numpy as np
import pytest
import yaml

from tfqkd.data import load_arrays


class Digits(typing.NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def mnist5k():
    """The bundled real digits: 4,000 training and 1,000 test images (28x28x1 in [0, 1])."""
    return Digits(*load_arrays("mnist5k", "train"), *load_arrays("mnist5k", "test"))


#: A complete QKD recipe small enough for a test: sklearn's 8x8 digits, MLPs, one epoch a stage.
TINY_RECIPE = {
    "name": "tiny",
    "dataset": "digits",
    "student": "kl_mlp_student",
    "teacher": "kl_mlp_teacher",
    "quant": "w4a4",
    "seed": 0,
    "batch_size": 64,
    "alpha": 0.7,
    "temperature": 4.0,
    "train_limit": 256,
    "eval_train_limit": 256,
    "schedules": {stage: {"epochs": 1, "lr": 0.05 if stage.endswith("baseline") else 0.01}
               for stage in ("teacher_baseline", "student_baseline", "ss", "cs", "ts")},
}  # fmt: skip


@pytest.fixture(scope="session")
def write_recipe():
    """``write_recipe(path, schedules={...}, **fields)``: :data:`TINY_RECIPE` with changes, as YAML at ``path``."""

    def write(path, schedules=None, **fields):
        config = {**TINY_RECIPE, **fields, "schedules": {**TINY_RECIPE["schedules"], **(schedules or {})}}
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return write
