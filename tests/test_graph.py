"""The shared graph and calibration-input helpers (issue 15: one home each, one behaviour)."""

import numpy as np
import pytest

from tfqkd.compat import keras, tf
from tfqkd.data.examples import calibration_inputs
from tfqkd.errors import TfqkdError
from tfqkd.graph import (
    as_functional, config_consumers, grid_source, inbound_names, keeps_grid_config, producer, single_producer,
    tensor_consumers,
)  # fmt: skip


def _diamond():
    inputs = keras.Input((4,), name="input")
    a = keras.layers.Dense(3, name="a")(inputs)
    b = keras.layers.ReLU(name="b")(a)
    c = keras.layers.Activation("tanh", name="c")(a)
    out = keras.layers.Add(name="add")([b, c])
    return keras.Model(inputs, out)


def test_producers_and_consumers_of_a_built_model_and_of_its_config():
    model = _diamond()
    a, add = model.get_layer("a"), model.get_layer("add")
    consumers = tensor_consumers(model)
    assert sorted(layer.name for layer in consumers[id(a.output)]) == ["b", "c"]
    assert [layer.name for layer in consumers[id(model.get_layer("b").output)]] == ["add"]
    assert producer(add.input[1]).name == "c"
    assert single_producer(model.get_layer("b")).name == "a" and single_producer(add) is None
    layers_cfg = model.get_config()["layers"]
    assert sorted(config_consumers(layers_cfg)["a"]) == ["b", "c"]
    assert inbound_names(next(e for e in layers_cfg if e["name"] == "add")) == ["b", "c"]


def test_consumers_of_the_inference_graph_look_through_dropouts():
    inputs = keras.Input((4,), name="input")
    a = keras.layers.Dense(3, name="a")(inputs)
    d = keras.layers.Dropout(0.5, name="d2")(keras.layers.Dropout(0.5, name="d1")(a))
    out = keras.layers.Add(name="add")([keras.layers.ReLU(name="r")(d), a])
    model = keras.Model(inputs, out)
    assert sorted(layer.name for layer in tensor_consumers(model)[id(a)]) == ["add", "d1"]
    assert sorted(layer.name for layer in tensor_consumers(model, through_identity=True)[id(a)]) == ["add", "r"]
    # The grid a value is on: back through plain ReLUs and Dropouts, in the model and in its config.
    assert grid_source(model.get_layer("r")).name == "a" and grid_source(model.get_layer("add")).name == "add"
    keeping = {e["name"] for e in model.get_config()["layers"] if keeps_grid_config(e)}
    assert keeping == {"d1", "d2", "r"}


def test_as_functional_takes_sequential_and_refuses_what_it_cannot_rewrite():
    seq = keras.Sequential([keras.layers.Dense(2, input_shape=(3,), name="d")])
    functional = as_functional(seq, "export")
    assert functional.layers[-1] is seq.layers[-1] and as_functional(functional) is functional
    with pytest.raises(TfqkdError, match="must be built .* before export"):
        as_functional(keras.Sequential([keras.layers.Dense(2)]), "export")

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TfqkdError, match="not a subclassed one"):
        as_functional(Sub(), "export")


def test_calibration_reads_the_same_inputs_from_an_array_a_pair_or_a_dataset():
    x = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    batches = tf.data.Dataset.from_tensor_slices((x, np.zeros(40))).batch(8)  # batches smaller than the limit
    for data in (x, (x, np.zeros(40)), batches, tf.data.Dataset.from_tensor_slices(x).batch(16)):
        np.testing.assert_array_equal(calibration_inputs(data, limit=20), x[:20])
    assert calibration_inputs(None) is None
    with pytest.raises(TfqkdError, match="at least one input example"):
        calibration_inputs(tf.data.Dataset.from_tensor_slices(x).take(0).batch(8))
