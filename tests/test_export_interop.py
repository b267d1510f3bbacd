"""The QKeras ecosystem takes our students: stock QKeras export and an hls4ml project (issue 14)."""

import json
import warnings

import numpy as np
import pytest

import tfqkd
from tfqkd.compat import keras
from tfqkd.cli import main
from tfqkd.export.qkeras import to_qkeras

POF2 = {"default": {"weight_bits": 4, "activation_bits": 4, "activation_scheme": "lsq_pof2"}}
POF2_ALL = {"default": {"weight_bits": 4, "activation_bits": 4, "scheme": "lsq_pof2"}}


@pytest.mark.parametrize("name", ["kl_mlp_student", "resnet8"])
@pytest.mark.parametrize("bits", [8, 4])
def test_power_of_two_activation_students_export_exactly(tmp_path, mnist5k, name, bits, trained_student):
    policy = {"default": {"weight_bits": bits, "activation_bits": bits, "activation_scheme": "lsq_pof2"}}
    model = trained_student(name, policy, epochs=3)
    # well past chance (10%), so that agreement is not measured between near-constant predictors
    assert np.mean(model.predict(mnist5k.x_test, verbose=0).argmax(1) == mnist5k.y_test) > 0.3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = to_qkeras(model, tmp_path / "stock.h5", evaluation=mnist5k.x_test)
    # the export prints no serialization warning (nor "HDF5 is legacy": load_qmodel reads HDF5)
    assert not [str(w.message)[:80] for w in caught if "serializ" in str(w.message) or "HDF5" in str(w.message)]
    assert report["inexact"] == []
    assert all(row["ratio"] == 1.0 for row in report["activations"])
    check = report["validation"]
    assert check["examples"] == 1000 and check["top1_agreement"] >= 99.5, check
    assert json.loads((tmp_path / "stock.qkeras.json").read_text())["validation"] == check


def test_power_of_two_weight_steps_on_qkeras_own_grid_keep_it(mnist5k):
    """A 4-bit power-of-two weight step of 1/8 is quantized_bits(4, 0) at alpha 1; with alpha None
    a QKeras layer would pick "auto_po2" scales per channel (this model: logits off by 0.22)."""
    from tfqkd.export.qkeras import stock_qkeras_model

    keras.utils.set_random_seed(0)
    model = tfqkd.quantize(tfqkd.create_model("resnet8", num_classes=10, input_shape=(28, 28, 1)), POF2_ALL,
                           mnist5k.x_train[:256])  # fmt: skip
    stock, _ = stock_qkeras_model(model)
    alphas = [layer.kernel_quantizer_internal.alpha for layer in stock.layers if hasattr(layer, "kernel_quantizer_internal")]
    assert 1.0 in alphas and "auto_po2" not in alphas, alphas
    x = mnist5k.x_test[:64]
    np.testing.assert_allclose(stock.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_learned_steps_off_powers_of_two_are_reported_by_layer_and_ratio(tmp_path, mnist5k, trained_student):
    model = trained_student("kl_mlp_student", "w8a8")
    report = to_qkeras(model, tmp_path / "stock.h5", evaluation=mnist5k.x_test)
    assert {row["layer"] for row in report["activations"]} == {
        "hidden1_dense_qin", "hidden2_dense_qin", "head_dense_qin"
    }  # fmt: skip
    assert report["inexact"] and all("exported as 2**" in line for line in report["inexact"])
    # Weights are exact (alpha carries the learned step); the activation rounding moves few predictions.
    assert report["validation"]["top1_agreement"] >= 98.0
    with pytest.raises(tfqkd.TfqkdError, match="exists; pass --force"):
        to_qkeras(model, tmp_path / "stock.h5")


def test_qkeras_tools_read_the_trained_model(mnist5k, trained_student):
    import qkeras.utils

    model = trained_student("kl_mlp_student", POF2)
    before = model.predict(mnist5k.x_test[:64], verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = qkeras.utils.model_save_quantized_weights(model)
    assert set(saved) == {"hidden1_dense", "hidden2_dense", "head_dense"}
    step = model.get_layer("hidden1_dense").kernel_quantizer_internal.step.numpy()[0]
    codes = saved["hidden1_dense"]["weights"][0] / step
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3)  # the trained 4-bit codes
    assert np.abs(np.rint(codes)).max() <= 7
    np.testing.assert_allclose(model.predict(mnist5k.x_test[:64], verbose=0), before, atol=1e-5)


def test_cli_export_target_qkeras(tmp_path, mnist5k, capsys, trained_student):
    path = tmp_path / "student.h5"
    trained_student("kl_mlp_student", POF2).save(path)
    assert main(["export", "--target", "qkeras", str(path), "--dataset", "mnist5k"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement 100.00% with the Keras model" in out and (tmp_path / "student_qkeras.h5").is_file()
    assert main(["export", "--target", "qkeras", str(path), "--dataset", "mnist5k"]) == 2  # exists, no --force


# hls4ml --------------------------------------------------------------------------------------


def test_hls4ml_emulation_of_a_power_of_two_mlp_agrees(tmp_path, mnist5k, trained_student):
    pytest.importorskip("hls4ml")
    from tfqkd.export.hls4ml import to_hls4ml

    model = trained_student("kl_mlp_student", POF2_ALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = to_hls4ml(model, tmp_path / "project", evaluation=mnist5k.x_test)
    assert not [str(w.message)[:80] for w in caught if "serializ" in str(w.message)]
    assert result["renamed"] == {"input": "input_1"} and result["inexact"] == []
    # Precisions come from the trained quantizers: 4-bit unsigned activations on their trained step.
    step = model.get_layer("hidden1_dense_qin").quantizer.step.numpy()[0]
    integer = round(np.log2(step)) + 4
    assert result["precisions"]["hidden1_dense_qin"]["result"].startswith(f"ufixed<4,{integer},")
    check = result["validation"]
    assert check["examples"] == 1000 and check["top1_agreement"] >= 99.0, check
    assert (tmp_path / "project" / "hls4ml_report.json").is_file()
    assert list((tmp_path / "project").rglob("*.so")), "the C++ emulation was not compiled"


def test_hls4ml_emulation_of_a_residual_cnn_agrees_in_io_stream(tmp_path, mnist5k, trained_student):
    """resnet8 (MLPerf Tiny): BatchNormalization and the residual additions run at the exporter's
    default precision, not hls4ml's ap_fixed<16,6>, which overflows there (58.5% agreement)."""
    pytest.importorskip("hls4ml")
    from tfqkd.export.hls4ml import DEFAULT_PRECISION, to_hls4ml

    policy = {"default": {"weight_bits": 8, "activation_bits": 8, "activation_scheme": "lsq_pof2"}}
    model = trained_student("resnet8", policy, epochs=3)
    assert np.mean(model.predict(mnist5k.x_test[:300], verbose=0).argmax(1) == mnist5k.y_test[:300]) > 0.3
    result = to_hls4ml(model, tmp_path / "project", io_type="io_stream", evaluation=mnist5k.x_test[:300])
    assert result["default_precision"] == DEFAULT_PRECISION and result["inexact"] == []
    # the activations keep the trained 8 bits; only what no quantizer fixes takes the default
    assert result["precisions"]["stack1_conv2_qin"]["result"].startswith("ufixed<8,")
    check = result["validation"]
    assert check["top1_agreement"] >= 99.0 and check["max_abs_logit_difference"] < 0.1, check


def _depthwise_cnn():
    """Depthwise-separable blocks as in ds_cnn and MobileNet: one depthwise conv before a BN, one
    (stride 2) without."""
    layers = keras.layers
    x = inputs = keras.Input((28, 28, 1), name="input")
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="stem_conv")(x)
    x = layers.ReLU(name="stem_relu")(layers.BatchNormalization(momentum=0.9, name="stem_bn")(x))
    x = layers.DepthwiseConv2D(3, padding="same", name="dw1")(x)
    x = layers.ReLU(name="dw1_relu")(layers.BatchNormalization(momentum=0.9, name="dw1_bn")(x))
    x = layers.Conv2D(32, 1, name="pw1")(x)
    x = layers.ReLU(name="pw1_relu")(layers.BatchNormalization(momentum=0.9, name="pw1_bn")(x))
    x = layers.ReLU(name="dw2_relu")(layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw2")(x))
    x = layers.Conv2D(32, 1, name="pw2")(x)
    x = layers.ReLU(name="pw2_relu")(layers.BatchNormalization(momentum=0.9, name="pw2_bn")(x))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(10, name="head")(x))


def _trained_model(model, policy, x, y, epochs):
    model = tfqkd.quantize(model, policy, x[:256])
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


def test_stock_depthwise_alpha_moves_out_of_the_layer_exactly(mnist5k):
    """The Keras-level rewrite hls4ml gets: same outputs, each depthwise quantizer at alpha 1."""
    from tfqkd.export.hls4ml_depthwise import factor_depthwise_alpha
    from tfqkd.export.qkeras import stock_qkeras_model

    keras.utils.set_random_seed(0)
    model = tfqkd.quantize(_depthwise_cnn(), "w8a8", mnist5k.x_train[:256])
    stock, _ = stock_qkeras_model(model, rename={"input": "input_1"})
    moved_model, moved = factor_depthwise_alpha(stock)
    assert moved == {"dw1": "dw1_bn", "dw2": "dw2_alpha"}
    assert all(moved_model.get_layer(name).depthwise_quantizer_internal.alpha == 1.0 for name in moved)
    x = mnist5k.x_test[:64]
    np.testing.assert_allclose(moved_model.predict(x, verbose=0), stock.predict(x, verbose=0), atol=1e-4)


def test_hls4ml_emulation_of_quantized_depthwise_convolutions_agrees(tmp_path, mnist5k):
    """hls4ml 1.3 leaves a QDepthwiseConv2D's alpha in its weights and folds the BN after it into
    the quantizer's type (this model: 25.3% top-1 agreement, logits off by 4.1 without the
    workaround in tfqkd.export.hls4ml_depthwise)."""
    pytest.importorskip("hls4ml")
    from tfqkd.export.hls4ml import to_hls4ml

    keras.utils.set_random_seed(0)
    policy = {"default": {"weight_bits": 8, "activation_bits": 8, "activation_scheme": "lsq_pof2"}}
    model = _trained_model(_depthwise_cnn(), policy, mnist5k.x_train[:2000], mnist5k.y_train[:2000], epochs=3)
    x, y = mnist5k.x_test[:300], mnist5k.y_test[:300]
    assert np.mean(model.predict(x, verbose=0).argmax(1) == y) > 0.3
    result = to_hls4ml(model, tmp_path / "project", io_type="io_stream", evaluation=x)
    assert result["depthwise_alpha"] == {"dw1": "dw1_bn", "dw2": "dw2_alpha"} and result["inexact"] == []
    check = result["validation"]
    assert check["top1_agreement"] >= 99.0 and check["max_abs_logit_difference"] < 0.05, check


def test_hls4ml_emulation_of_a_flatten_before_dense_agrees_in_io_stream(tmp_path, mnist5k):
    """tfqkd quantizes the Flatten's output before the Dense; hls4ml 1.3's io_stream computes an
    activation after a Flatten on the wrong values (this model: 8.7% top-1 agreement, logits off
    by 26.6 without the workaround in tfqkd.export.hls4ml_flatten)."""
    pytest.importorskip("hls4ml")
    from tfqkd.export.hls4ml import to_hls4ml

    layers = keras.layers
    x = inputs = keras.Input((28, 28, 1), name="input")
    x = layers.Conv2D(8, 3, strides=2, padding="same", name="conv")(x)
    x = layers.ReLU(name="relu")(layers.BatchNormalization(momentum=0.9, name="bn")(x))
    float_model = keras.Model(inputs, layers.Dense(10, name="head")(layers.Flatten(name="flatten")(x)))
    keras.utils.set_random_seed(0)
    policy = {"default": {"weight_bits": 8, "activation_bits": 8, "activation_scheme": "lsq_pof2"}}
    model = _trained_model(float_model, policy, mnist5k.x_train[:2000], mnist5k.y_train[:2000], epochs=2)
    x, y = mnist5k.x_test[:300], mnist5k.y_test[:300]
    assert np.mean(model.predict(x, verbose=0).argmax(1) == y) > 0.3
    result = to_hls4ml(model, tmp_path / "project", io_type="io_stream", evaluation=x)
    assert result["activations_before_flatten"] == ["head_qin"]
    check = result["validation"]
    assert check["top1_agreement"] >= 99.0 and check["max_abs_logit_difference"] < 0.05, check


def test_hls4ml_emulation_of_activation_steps_of_one_and_more_agrees(tmp_path, mnist5k):
    """Inputs in [0, 32]: 4-bit activation steps of 2 and 4, which hls4ml 1.3 would type as
    ap_uint (truncating, wrapping, step 1: 92.1% agreement, logits off by 26.7)."""
    pytest.importorskip("hls4ml")
    from tfqkd.export.hls4ml import to_hls4ml

    digits = mnist5k._replace(x_train=mnist5k.x_train * 32, x_test=mnist5k.x_test * 32)
    keras.utils.set_random_seed(0)
    float_model = tfqkd.create_model("kl_mlp_student", num_classes=10, input_shape=(28, 28, 1))
    model = _trained_model(float_model, POF2_ALL, digits.x_train[:2000], digits.y_train[:2000], epochs=1)
    steps = [layer.quantizer.step.numpy()[0] for layer in model.layers if layer.name.endswith("_qin")]
    assert min(steps) >= 2.0, steps
    result = to_hls4ml(model, tmp_path / "project", evaluation=digits.x_test)
    assert result["precisions"]["hidden1_dense_qin"]["result"].startswith("ufixed<4,")
    check = result["validation"]
    assert check["top1_agreement"] == 100.0 and check["max_abs_logit_difference"] < 1e-3, check


def test_activation_steps_below_two_to_the_minus_bits_export_in_a_form_stock_qkeras_runs(tmp_path, mnist5k):
    """Inputs in [0, 1/32]: 4-bit activation steps of 2**-9 and less, i.e. quantized_relu(4, -5). Stock
    QKeras computes 2**integer in int32; TensorFlow's graph optimizer makes an int32 Reciprocal of the
    negative power, which has no CPU kernel, so such a file loaded but failed in predict()."""
    from tfqkd.export.qkeras import stock_qkeras_model

    faint = mnist5k._replace(x_train=mnist5k.x_train / 32, x_test=mnist5k.x_test / 32)
    keras.utils.set_random_seed(0)
    float_model = tfqkd.create_model("kl_mlp_student", num_classes=10, input_shape=(28, 28, 1))
    model = _trained_model(float_model, POF2_ALL, faint.x_train[:2000], faint.y_train[:2000], epochs=1)
    steps = {layer.name: float(layer.quantizer.step.numpy()[0]) for layer in model.layers if layer.name.endswith("_qin")}
    assert steps["hidden1_dense_qin"] <= 2.0**-8, steps
    report = to_qkeras(model, tmp_path / "stock.h5", evaluation=faint.x_test)
    written = json.loads((tmp_path / "stock.qkeras.json").read_text())
    assert report["inexact"] == [] and written["validation"] == report["validation"]
    check = report["validation"]
    assert check["top1_agreement"] == 100.0 and check["max_abs_logit_difference"] < 1e-4, check
    stock, _ = stock_qkeras_model(model)
    first = stock.get_layer("hidden1_dense_qin").quantizer
    exponent = round(np.log2(steps["hidden1_dense_qin"]))
    assert (first.bits, first.integer, first.is_quantized_clip) == (4 - exponent - 4, 0, False)
    assert first.relu_upper_bound == 15 * 2.0**exponent
    # hls4ml reads (bits, integer), not relu_upper_bound: it keeps the negative integer.
    plain, _ = stock_qkeras_model(model, runnable=False)
    assert plain.get_layer("hidden1_dense_qin").quantizer.integer == exponent + 4 < 0


def test_hls4ml_target_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "hls4ml", None)  # import hls4ml -> ImportError
    model = tfqkd.create_model("kl_mlp_student", num_classes=10, quant="w8a8")
    path = tmp_path / "m.h5"
    model.save(path)
    assert main(["export", "--target", "hls4ml", str(path), "--dataset", "mnist5k"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and 'pip install "tfqkd[hls]"' in err[0]
