"""Test session setup: tfqkd must be imported before TensorFlow (it selects Keras 2)."""

import tfqkd  # noqa: F401  isort: skip

import json
import typing

import numpy as np
import pytest
import yaml

from tfqkd.compat import keras
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


@pytest.fixture(scope="session")
def trained_student(mnist5k):
    """``trained_student(name, policy, **how)``: a quantized student trained on mnist5k, once per session.

    The flow of most users: quantize the fresh float model (its steps calibrated on 256 training
    images, or not at all with ``calibrated=False``, as ``create_model(name, quant=policy)`` does),
    then ``fit`` with cross-entropy. ``how``: ``epochs`` (1), ``optimizer`` ("adam": Adam(1e-3);
    "sgd": SGD(0.05, momentum 0.9)), ``seed`` (0), ``examples`` (the first N training images, 4,000).
    Callers must not train the model further (it is shared).
    """
    cache = {}

    def train(name, policy, *, epochs=1, optimizer="adam", seed=0, examples=4000, calibrated=True):
        key = (name, json.dumps(policy, sort_keys=True), epochs, optimizer, seed, examples, calibrated)
        if key not in cache:
            x, y = mnist5k.x_train[:examples], mnist5k.y_train[:examples]
            keras.utils.set_random_seed(seed)
            float_model = tfqkd.create_model(name, num_classes=10, input_shape=x.shape[1:])
            model = tfqkd.quantize(float_model, policy, x[:256] if calibrated else None)
            opt = keras.optimizers.Adam(1e-3) if optimizer == "adam" else keras.optimizers.SGD(0.05, momentum=0.9)
            model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
            cache[key] = model
        return cache[key]

    return train
