"""Tests for the tfqkd model zoo (tfqkd.models)."""

import functools
import json
import re

import numpy as np
import pytest

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.models import (
    count_macs,
    count_params,
    create_model,
    list_models,
    model_info,
    model_table,
    register_model,
)

ALL_MODELS = list_models()
DPU_MODELS = [n for n in ALL_MODELS if n.endswith("_dpu")]
# ImageNet-size models are exercised at a small input so the file stays fast on 2 CPU cores.
SMALL_SHAPES = {"mobilenet_v1": (32, 32, 3), "mobilenet_v2": (32, 32, 3)}

# Trainable parameters, thesis table 5.8 (DenseNets at 100 classes, MLPs at 10).
THESIS_COUNTS = {
    ("densenet21", 100): 419_420,
    ("densenet37", 100): 1_008_964,
    ("densenet63", 100): 2_353_676,
    ("densenet121", 100): 7_048_548,
    ("densenet201", 100): 18_277_220,
    ("dnn1200", 10): 2_395_210,
    ("dnn800", 10): 1_276_810,
    ("dnn300", 10): 328_810,
    ("dnn30", 10): 24_790,
    ("kl_mlp_teacher", 10): 2_395_210,
    ("kl_mlp_student", 10): 328_810,
}
# All weights including BN statistics: hand counts of the MLPerf Tiny reference models,
# and the Keras-applications counts of MobileNetV1/V2 at width 1.0.
TOTAL_COUNTS = {
    "resnet8": 78_666,
    "ds_cnn": 24_908,
    "mobilenet_v1_025": 221_794,
    "fc_autoencoder": 269_992,
    "mobilenet_v1": 4_253_864,
    "mobilenet_v2": 3_538_984,
}


def _num_classes(name):
    return None if model_info(name).default_num_classes is None else 3


@functools.lru_cache(maxsize=None)
def _small_model(name):
    """One cheap instance per model, shared by the forward / config / save tests."""
    return create_model(name, num_classes=_num_classes(name), input_shape=SMALL_SHAPES.get(name))


def _random_input(model, seed=0):
    shape = (1,) + tuple(int(d) for d in model.input_shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


def _round_trip_params(names):
    # The deepest DenseNets differ from densenet21..121 only in depth, and saving 12-30M
    # parameters takes most of a minute on CPU, so their round trips only run with -m slow.
    big = {"densenet169", "densenet201", "densenet264"}
    return [pytest.param(n, marks=pytest.mark.slow) if n in big else n for n in names]


def _expected_output_shape(name, model):
    if model_info(name).default_num_classes is None:
        return (1,) + tuple(model.input_shape[1:])
    return (1, 3)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_default_build(name):
    info = model_info(name)
    model = create_model(name)
    assert tuple(model.input_shape[1:]) == info.default_input_shape
    if info.default_num_classes is not None:
        assert model.output_shape == (None, info.default_num_classes)
    assert count_params(model) > 0
    assert count_macs(model) > 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_shape_and_logits(name):
    model = _small_model(name)
    out = model(_random_input(model), training=False).numpy()
    assert out.shape == _expected_output_shape(name, model)
    assert np.all(np.isfinite(out))
    # Logits, not probabilities: no softmax anywhere, no activations hidden in conv/dense.
    for layer in model.layers:
        assert not isinstance(layer, keras.layers.Softmax), layer.name
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            assert layer.activation is keras.activations.linear, layer.name


# Keras' generated names: the snake-cased class name, optionally with a "_<n>" suffix.
_AUTO_NAME = re.compile(
    r"(conv2d|depthwise_conv2d|dense|batch_normalization|re_lu|activation|concatenate|add"
    r"|average_pooling2d|max_pooling2d|global_average_pooling2d|flatten|dropout)(_\d+)?|input_\d+"
)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_layers_explicitly_named(name):
    model = _small_model(name)
    assert model.name == name
    for layer in model.layers:
        assert not _AUTO_NAME.fullmatch(layer.name), f"auto-generated layer name {layer.name}"


@pytest.mark.parametrize("name", _round_trip_params(ALL_MODELS))
def test_config_json_round_trip(name):
    model = _small_model(name)
    config = json.loads(json.dumps(model.get_config()))
    clone = keras.Model.from_config(config)
    clone.set_weights(model.get_weights())
    x = _random_input(model, seed=1)
    np.testing.assert_allclose(
        clone(x, training=False).numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("fmt", ["h5", "keras"])
@pytest.mark.parametrize("name", _round_trip_params(ALL_MODELS))
def test_save_load_round_trip(name, fmt, tmp_path):
    model = _small_model(name)
    path = tmp_path / f"{name}.{fmt}"
    model.save(path)
    loaded = keras.models.load_model(path, compile=False)
    x = _random_input(model, seed=2)
    np.testing.assert_allclose(
        loaded(x, training=False).numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(("name", "num_classes"), sorted(THESIS_COUNTS))
def test_thesis_trainable_param_counts(name, num_classes):
    model = create_model(name, num_classes=num_classes)
    assert count_params(model) == THESIS_COUNTS[(name, num_classes)]


@pytest.mark.parametrize("name", sorted(TOTAL_COUNTS))
def test_reference_total_param_counts(name):
    model = create_model(name)
    assert count_params(model, trainable_only=False) == TOTAL_COUNTS[name]


def test_mlp_accepts_flat_input_without_flatten():
    model = create_model("dnn300", input_shape=(784,))
    assert not any(isinstance(layer, keras.layers.Flatten) for layer in model.layers)
    assert count_params(model) == 328_810
    assert model(np.zeros((2, 784), "float32")).shape == (2, 10)


def test_densenet121_imagenet_stem():
    model = create_model("densenet121", num_classes=1000, input_shape=(224, 224, 3), stem="imagenet")
    # Same as keras.applications.DenseNet121 (trainable weights).
    assert count_params(model) == 7_978_856
    assert model.get_layer("stem_conv").kernel_size == (7, 7)
    assert model.get_layer("stem_pool").output_shape == (None, 56, 56, 64)
    assert model(np.zeros((1, 224, 224, 3), "float32")).shape == (1, 1000)


@pytest.mark.parametrize("name", DPU_MODELS)
def test_dpu_variant_has_only_fusable_activations(name):
    model = _small_model(name)
    relus = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    assert relus
    for relu in relus:
        bn = relu.inbound_nodes[0].inbound_layers
        assert isinstance(bn, keras.layers.BatchNormalization), f"{relu.name} follows {bn.name}"
        conv = bn.inbound_nodes[0].inbound_layers
        assert isinstance(conv, keras.layers.Conv2D), f"{bn.name} follows {conv.name}"
    # Transitions are Conv-BN then pool; no BN may come before a conv (unfoldable).
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert isinstance(layer.inbound_nodes[0].inbound_layers, keras.layers.Conv2D), layer.name


def test_pre_activation_densenet_starts_layers_with_bn_relu():
    model = _small_model("densenet21")
    conv1 = model.get_layer("block1_layer1_conv1")
    relu = conv1.inbound_nodes[0].inbound_layers
    assert isinstance(relu, keras.layers.ReLU)
    assert isinstance(relu.inbound_nodes[0].inbound_layers, keras.layers.BatchNormalization)
    # CIFAR stem: a lone 3x3 conv to 2k = 64 channels, straight into the first BN.
    stem = model.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3) and stem.filters == 64 and stem.strides == (1, 1)
    assert model.get_layer("transition1_conv").filters == 48  # floor(0.5 * (64 + 1 * 32))


def test_unknown_model_name():
    with pytest.raises(TfqkdError, match="no_such_net") as err:
        create_model("no_such_net")
    assert "densenet21" in str(err.value)
    with pytest.raises(TfqkdError, match="no_such_net"):
        model_info("no_such_net")


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, "10", True])
def test_bad_num_classes(bad):
    with pytest.raises(TfqkdError, match="num_classes"):
        create_model("dnn30", num_classes=bad)


@pytest.mark.parametrize("bad", [(0, 28, 1), (28, -1, 1), (), "28x28", (28.0, 28, 1)])
def test_bad_input_shape(bad):
    with pytest.raises(TfqkdError, match="input_shape"):
        create_model("dnn30", input_shape=bad)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("densenet21", {"input_shape": (32, 32)}, "image input_shape"),
        ("densenet21", {"input_shape": (4, 4, 3)}, "at least 8x8"),
        ("densenet21", {"input_shape": (16, 16, 3), "stem": "imagenet"}, "at least 32x32"),
        ("densenet21", {"stem": "tiny"}, "unknown stem 'tiny'"),
        ("densenet21", {"growth": 12}, "unknown option"),
        ("mobilenet_v2", {"width_multiplier": -1.0}, "width_multiplier"),
        ("fc_autoencoder", {"num_classes": 10}, "no classification head"),
        ("fc_autoencoder", {"input_shape": (32, 20)}, "flat input_shape"),
    ],
)
def test_bad_model_options(name, kwargs, match):
    with pytest.raises(TfqkdError, match=match):
        create_model(name, **kwargs)


def test_list_models_and_info():
    assert ALL_MODELS == sorted(ALL_MODELS)
    for expected in ["densenet21", "densenet264", "densenet63_dpu", "dnn30", "kl_mlp_student",
                     "resnet8", "ds_cnn", "mobilenet_v1_025", "fc_autoencoder", "mobilenet_v2"]:
        assert expected in ALL_MODELS
    assert list_models(family="mlp") == sorted(
        ["dnn1200", "dnn800", "dnn300", "dnn30", "kl_mlp_teacher", "kl_mlp_student"]
    )
    with pytest.raises(TfqkdError, match="unknown model family 'nope'"):
        list_models(family="nope")
    info = model_info("resnet8")
    assert (info.family, info.default_input_shape, info.default_num_classes) == ("mlperf_tiny", (32, 32, 3), 10)
    assert json.loads(json.dumps(info.to_dict()))["name"] == "resnet8"


def test_register_model_rejects_clash():
    def other_builder(num_classes, input_shape):
        raise AssertionError("never built")

    with pytest.raises(TfqkdError, match="already registered"):
        register_model(
            "dnn30", family="mlp", default_input_shape=(784,), default_num_classes=10, description="clash"
        )(other_builder)


def test_count_macs_known_model():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c")(inputs)  # 8*8*4 * 3*3*2
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)  # 4*4*4 * 3*3
    x = keras.layers.Flatten(name="f")(x)
    x = keras.layers.Dense(5, name="d")(x)  # 64 * 5
    model = keras.Model(inputs, x)
    assert count_macs(model) == 8 * 8 * 4 * 9 * 2 + 4 * 4 * 4 * 9 + 64 * 5
    assert count_params(model, trainable_only=False) == model.count_params()


def test_count_macs_needs_static_shape():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="c")(inputs))
    with pytest.raises(TfqkdError, match="unknown dimension"):
        count_macs(model)


def test_count_macs_recognises_qkeras_layers():
    qkeras = pytest.importorskip("qkeras")
    inputs = keras.Input((8, 8, 2))
    x = qkeras.QConv2D(4, 3, padding="same", name="qc")(inputs)
    x = keras.layers.Flatten(name="f")(x)
    x = qkeras.QDense(5, name="qd")(x)
    assert count_macs(keras.Model(inputs, x)) == 8 * 8 * 4 * 9 * 2 + 256 * 5


def test_model_table_rows():
    rows = model_table(names=["dnn30", "resnet8"])
    assert [r.name for r in rows] == ["dnn30", "resnet8"]
    assert rows[0].params == 24_790 and rows[0].macs == 784 * 30 + 30 * 30 + 30 * 10
    assert rows[1].family == "mlperf_tiny" and rows[1].input_shape == (32, 32, 3)
    with pytest.raises(TfqkdError, match="unknown model 'nope'"):
        model_table(names=["nope"])


def _quantize_or_skip():
    quant = pytest.importorskip("tfqkd.quant")
    if not hasattr(quant, "quantize"):
        pytest.skip("tfqkd.quant.quantize is not written yet")
    return quant.quantize


def test_create_model_with_quant_returns_quantized_model():
    quantize = _quantize_or_skip()
    model = create_model("dnn30", quant="w4a4")
    reference = quantize(create_model("dnn30"), "w4a4")
    assert [type(layer).__name__ for layer in model.layers] == [type(layer).__name__ for layer in reference.layers]
    assert model(np.zeros((1, 28, 28, 1), "float32")).shape == (1, 10)
