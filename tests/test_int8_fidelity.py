"""Issue 17: the int8 TFLite file computes what the trained Keras model computes, on every runtime.

Models are trained as a user would (``create_model(name, quant=policy)``, 3
epochs at batch 64 on mnist5k). Measured before the fix (kl_mlp_student w4a4,
Adam, seed 0): 256 (XNNPACK) / 1,016 (TFLite's built-in kernels) of 300,000
first-hidden-layer codes moved, largest logit error 2.64 / 3.63 output steps;
after: 0 / 0 codes, 0.62 / 0.87 steps (benchmarks/results/int8_fidelity.json
has the full grid).
"""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.export import to_tflite
from tfqkd.export.command import add_tflite_arguments, run_tflite_export
from tfqkd.export.runtimes import Runtime, RuntimeUnavailable, parse_runtimes, run_codes
from tfqkd.export.validate import quantize_inputs


def _builtin_outputs(path, x, tensors=()):
    """Outputs (and ``tensors``) with TFLite's built-in kernels (gemmlowp requantization, as tflite-runtime 2.14)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], quantize_inputs(x, detail))
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    return interpreter.get_tensor(out["index"]).astype(np.int64), out, interpreter


def _litert_outputs(path, x):
    """Outputs with LiteRT's default kernels (XNNPACK), in the output tensor's dtype."""
    from tfqkd.export.inspect import load_interpreter

    interpreter, _ = load_interpreter(path)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], quantize_inputs(x, detail))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def _keras_steps(model, x, path):
    from tfqkd.export.inspect import load_interpreter

    interpreter, _ = load_interpreter(path)
    scale, zero = interpreter.get_output_details()[0]["quantization"]
    return model.predict(x, verbose=0).astype(np.float64) / scale + zero


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_w4a4_mlp_int8_reproduces_keras_on_xnnpack_and_builtin_kernels(tmp_path, mnist5k, optimizer, trained_student):
    """Hidden 4-bit codes exact on both kinds of kernels; logits within one output step."""
    x_train, _, x_test, y_test = mnist5k
    model = trained_student("kl_mlp_student", "w4a4", epochs=3, optimizer=optimizer, calibrated=False)
    path = tmp_path / "mlp.tflite"
    result = to_tflite(model, path, calibration_data=x_train[:512], evaluation=(x_test, y_test), runtimes="litert",
                       logits="int8")  # fmt: skip
    report = result["validation"]
    # XNNPACK (LiteRT's default): measured 0.62 (Adam) / 0.85 (SGD) output steps; before: 2.64 / 3.73.
    assert report["max_output_steps"] <= 1.0, report
    assert result["weight_code_multipliers"]["hidden1_dense"] >= 9  # 4-bit codes stored times k
    # Every disagreement is an int8 tie of the output: no more than rounding Keras' own logits gives.
    keras_grid = np.clip(np.rint(_keras_steps(model, x_test, path)), -128, 127)
    ceiling = 100.0 * np.mean(keras_grid.argmax(-1) == model.predict(x_test, verbose=0).argmax(-1))
    assert report["agreement"] >= ceiling - 0.1, (report["agreement"], ceiling)
    # Built-in kernels (two roundings): measured 0.87 / 0.85 steps; before 3.63 / 3.28.
    codes, out, interpreter = _builtin_outputs(path, x_test)
    steps = np.abs(codes - _keras_steps(model, x_test, path))
    assert steps.max() <= 1.5, steps.max()
    # The first hidden layer's 4-bit codes: identical to Keras on the built-in kernels (before: 1,016 moved).
    probe = keras.Model(model.inputs, model.get_layer("hidden2_dense_qin").output)
    keras_codes = np.rint(np.asarray(probe(x_test, training=False), np.float64) / model.get_layer(
        "hidden2_dense_qin").quantizer.grid().scale)
    fc = [op for op in interpreter._get_ops_details() if op["op_name"] == "FULLY_CONNECTED"][0]
    after = [op for op in interpreter._get_ops_details() if op["op_name"] == "MINIMUM" and fc["outputs"][0] in op["inputs"]]
    index = after[0]["outputs"][0]
    zero = {d["index"]: d for d in interpreter.get_tensor_details()}[index]["quantization"][1]
    lite_codes = interpreter.get_tensor(index).astype(np.int64) - zero
    assert int(np.sum(lite_codes != keras_codes)) <= 3  # measured 0 of 300,000


def test_validation_reports_each_runtime_and_one_line_for_a_missing_one(tmp_path, mnist5k, capsys, trained_student):
    x_train, _, x_test, y_test = mnist5k
    model = trained_student("kl_mlp_student", "w4a4", epochs=3, optimizer="adam", calibrated=False)
    model_file = tmp_path / "student.h5"
    model.save(model_file)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    add_tflite_arguments(parser)
    missing = "tflite-runtime=" + str(tmp_path / "no-such-venv" / "bin" / "python")
    args = parser.parse_args([str(model_file), "--dataset", "mnist5k", "--kind", "int8", "--out", str(tmp_path / "x"),
                              "--runtimes", f"litert,tensorflow,{missing}"])  # fmt: skip
    assert run_tflite_export(args) == 0
    report = json.loads((tmp_path / "x" / "student_int8.tflite.validation.json").read_text())
    assert list(report["runtimes"]) == ["ai-edge-litert", "tf.lite"]
    for figures in report["runtimes"].values():
        assert figures["max_output_steps"] <= 1.0 and figures["agreement"] >= 99.0
    between = report["between_runtimes"]["tf.lite"]
    assert between["max_difference"] == 0 and between["identical_outputs"] == 100.0  # both XNNPACK
    assert list(report["unavailable"]) == [f"tflite-runtime ({tmp_path / 'no-such-venv' / 'bin' / 'python'})"]
    printed = capsys.readouterr().out
    not_run = [line for line in printed.splitlines() if "not run" in line]
    assert len(not_run) == 1 and "no Python interpreter" in not_run[0]
    assert "Traceback" not in printed
    with pytest.raises(TfqkdError, match="unknown TFLite runtime 'bogus'"):
        parse_runtimes("litert,bogus")


def test_missing_runtime_in_process_is_one_line():
    try:
        import tflite_runtime  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeUnavailable, match="not installed here.*--runtimes tflite-runtime="):
            run_codes("unused.tflite", np.zeros((1, 2), np.int8), Runtime("tflite-runtime"))
    else:  # pragma: no cover
        pytest.skip("tflite_runtime is installed in this interpreter")


def test_tf_lite_fallback_interpreter_is_quiet():
    """Without LiteRT, validation and benchmarks read files with tf.lite.Interpreter, whose constructor
    warns in five lines that it is deprecated; a user of `pip install .` saw them after every export."""
    import warnings

    from tfqkd.compat import tf
    from tfqkd.export.runtimes import quiet_interpreter

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    content = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    with warnings.catch_warnings(record=True) as plain:
        warnings.simplefilter("always")
        tf.lite.Interpreter(model_content=content)
    assert any("LiteRT" in str(w.message) for w in plain)  # what is silenced exists in this TensorFlow
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        interpreter = quiet_interpreter(tf.lite.Interpreter, model_content=content)
    assert not quiet
    interpreter.allocate_tensors()
    assert interpreter.get_output_details()[0]["shape"].tolist() == [1, 2]


# -- tflite-runtime 2.14 in its own virtual environment ------------------------------------------

_VENV = Path(os.environ.get("TFQKD_TFLITE_RUNTIME_VENV", Path.home() / ".cache" / "tfqkd" / "venv-tflite-runtime-2.14"))


def _tflite_runtime_214():
    """The Python of a venv with tflite-runtime 2.14 and numpy < 2 (made once with pip), or pytest.skip."""
    python = _VENV / "bin" / "python"
    check = [str(python), "-c", "import tflite_runtime, numpy; print(tflite_runtime.__version__, numpy.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(_VENV)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "tflite-runtime==2.14.0", "numpy<2"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        pytest.skip(f"pip cannot install tflite-runtime==2.14.0 for Python {sys.version_info.major}."
                    f"{sys.version_info.minor} on this platform: {lines[-1] if lines else done.returncode}")  # fmt: skip
    return python


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["w4a4", "w8a8"])
def test_exported_file_on_tflite_runtime_214_and_litert(tmp_path, mnist5k, policy, trained_student):
    """The same file on tflite-runtime 2.14 (numpy<2 venv) and on LiteRT: both close to Keras and to each other.

    Measured (kl_mlp_student, Adam, seed 0): w4a4 0.87 / 0.62 output steps from Keras, at most 1 step
    between the runtimes, 99.1% identical outputs (before the fix: 3.6 / 2.6 steps, 4 steps, 65%).
    """
    python = _tflite_runtime_214()
    x_train, _, x_test, y_test = mnist5k
    model = trained_student("kl_mlp_student", policy, epochs=3, optimizer="adam", calibrated=False)
    path = tmp_path / "mlp.tflite"
    result = to_tflite(model, path, calibration_data=x_train[:512], evaluation=(x_test, y_test),
                       runtimes=f"litert,tflite-runtime={python}", logits="int8")  # fmt: skip
    report = result["validation"]
    assert set(report["runtimes"]) == {"ai-edge-litert", f"tflite-runtime ({python})"}, report
    old = report["runtimes"][f"tflite-runtime ({python})"]
    assert old["version"] == "2.14.0" and old["numpy"].startswith("1.")
    for figures in report["runtimes"].values():
        assert figures["max_output_steps"] <= 1.5, report
        assert figures["agreement"] >= 99.3, report
    between = report["between_runtimes"][f"tflite-runtime ({python})"]
    assert between["max_difference"] <= 1 and between["identical_outputs"] >= 98.0, between
    # The default file (float logits): issue 17's goal on both runtimes (measured 100.0%, <= 0.64 steps).
    default = to_tflite(model, tmp_path / "default.tflite", calibration_data=x_train[:512], evaluation=(x_test, y_test),
                        runtimes=f"litert,tflite-runtime={python}")["validation"]  # fmt: skip
    for figures in default["runtimes"].values():
        assert figures["agreement"] >= 99.9 and figures["max_output_steps"] <= 2.0, default


def test_one_input_quantization_rounds_half_away_from_zero_like_tflite():
    """The validator and the hardware-aware analysis feed int8 inputs through the same function."""
    import tfqkd.analysis.hakd as hakd

    detail = {"dtype": np.int8, "quantization": (0.5, 0)}
    codes = quantize_inputs(np.array([0.25, -0.25, 0.75, -0.75, 1.25, 100.0], np.float32), detail)
    np.testing.assert_array_equal(codes, [1, -1, 2, -2, 3, 127])  # np.round would give 0, -0, 2, -2, 2
    assert hakd.quantize_inputs is quantize_inputs


# -- logits="float": the int8 body with the output Dense layer in float32 ---------------------------


def test_float_logits_close_the_int8_output_grid_gap(tmp_path, mnist5k, trained_student):
    """Issue 17's goal where the int8 output cannot reach it: >= 99.9% agreement and <= 2 output steps.

    Measured (kl_mlp_student w4a4, Adam, seed 0): int8 logits 99.5% agreement (the Keras logits
    rounded onto the same grid: 99.5%); float logits (the default for a Dense output) 100.0%, 0.28
    steps (XNNPACK) and 0.64 (built-in kernels).
    """
    from tfqkd.export.inspect import float_ops, read_tflite

    x_train, _, x_test, y_test = mnist5k
    model = trained_student("kl_mlp_student", "w4a4", epochs=3, optimizer="adam", calibrated=False)
    integer = to_tflite(model, tmp_path / "int8.tflite", calibration_data=x_train[:512], evaluation=(x_test, y_test),
                        runtimes="litert", logits="int8")  # fmt: skip
    assert integer["logits"] == "int8"
    assert integer["validation"]["agreement"] < 99.9  # the int8 output grid's ties (see the benchmark's output_grid_agreement)
    result = to_tflite(model, tmp_path / "head.tflite", calibration_data=x_train[:512], evaluation=(x_test, y_test),
                       runtimes="litert,tensorflow,litert-builtin")  # fmt: skip
    assert result["logits"] == "float"  # logits="auto": a Dense output layer
    report = result["validation"]
    assert list(report["runtimes"]) == ["ai-edge-litert", "tf.lite", "ai-edge-litert built-in kernels"]
    for figures in report["runtimes"].values():
        assert figures["agreement"] >= 99.9 and figures["max_output_steps"] <= 2.0, figures
    # The built-in kernels requantize otherwise than XNNPACK (gemmlowp): some logits differ.
    assert report["between_runtimes"]["ai-edge-litert built-in kernels"]["max_difference"] > 0
    step = report["max_logit_difference"] / report["max_output_steps"]
    np.testing.assert_allclose(step, read_tflite(integer["path"])["tensors"][read_tflite(integer["path"])["outputs"][0]]["scales"][0])
    # What the file is: int8 input, the int8 body, then DEQUANTIZE and one float FULLY_CONNECTED.
    info, base = read_tflite(result["path"]), read_tflite(integer["path"])
    assert [op["op"] for op in info["ops"]] == [op["op"] for op in base["ops"]][:-1] + ["DEQUANTIZE", "FULLY_CONNECTED"]
    assert info["tensors"][info["inputs"][0]]["dtype"] == "int8"
    assert info["tensors"][info["outputs"][0]]["dtype"] == "float32"
    assert len(float_ops(info)) == 1 and float_ops(info)[0].startswith("FULLY_CONNECTED")
    # The float weights are the Keras layer's quantized kernel, bit for bit; the body's weights are unchanged.
    head = model.get_layer("head_dense")
    kernel = head.kernel_quantizer_internal(head.kernel, training=False).numpy()
    fc = info["ops"][-1]
    stored = [info["_interpreter"].get_tensor(i) for i in fc["inputs"] if info["tensors"][i]["shape"] == [10, 300]]
    np.testing.assert_array_equal(stored[0], kernel.T)
    body = [op for op in info["ops"] if op["op"] == "FULLY_CONNECTED"][:-1]
    for op, ref in zip(body, [op for op in base["ops"] if op["op"] == "FULLY_CONNECTED"]):
        np.testing.assert_array_equal(info["_interpreter"].get_tensor(op["inputs"][1]),
                                      base["_interpreter"].get_tensor(ref["inputs"][1]))  # fmt: skip


def test_float_logits_option_plumbing_and_one_line_errors(tmp_path, mnist5k, capsys, trained_student):
    import argparse

    from tfqkd.cli import main

    x_train, _, x_test, y_test = mnist5k
    model = trained_student("kl_mlp_student", "w4a4", epochs=3, optimizer="adam", calibrated=False)
    with pytest.raises(TfqkdError, match=r"^unknown logits 'int16'; use one of auto, int8, float$"):
        to_tflite(model, tmp_path / "x.tflite", calibration_data=x_train[:64], logits="int16")
    assert not (tmp_path / "x.tflite").exists()
    softmax = keras.Model(model.inputs, keras.layers.Softmax()(model.outputs[0]))
    with pytest.raises(TfqkdError, match="output layer is a Dense layer"):
        to_tflite(softmax, tmp_path / "s.tflite", calibration_data=x_train[:64], logits="float")
    assert not (tmp_path / "s.tflite").exists()
    # logits="auto" (the default) keeps the int8 logits of a model whose output is not a Dense layer.
    assert to_tflite(softmax, tmp_path / "s.tflite", calibration_data=x_train[:64])["logits"] == "int8"
    # CLI: --logits float reaches the int8 file and its report; a bad value is one line, exit 2.
    model_file = tmp_path / "student.h5"
    model.save(model_file)
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    add_tflite_arguments(parser)
    args = parser.parse_args([str(model_file), "--dataset", "mnist5k", "--format", "int8", "--logits", "float",
                              "--out", str(tmp_path / "cli"), "--runtimes", "litert"])  # fmt: skip
    assert run_tflite_export(args) == 0
    assert "int8 with float32 logits" in capsys.readouterr().out
    report = json.loads((tmp_path / "cli" / "student_int8.tflite.validation.json").read_text())
    assert report["agreement"] >= 99.9 and report["max_output_steps"] <= 2.0, report
    for bad in ("int4", ""):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "--target", "tflite", str(model_file), "--logits", bad])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--logits" in err[0] and "invalid choice" in err[0], err


# -- integer_intermediates at 8 bits: BN requantizations exact -------------------------------------


def _float_small_densenet(mnist5k, seed):
    """The miniature pre-activation DenseNet of test_export_tflite, one float epoch on 1,024 digits."""
    from test_export_tflite import _small_densenet

    keras.utils.set_random_seed(seed)
    model = _small_densenet()
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(mnist5k.x_train[:1024], mnist5k.y_train[:1024], epochs=1, batch_size=64, verbose=0)
    return model


def _every_code(model, path, x, builtin=False):
    """``{quantizer name: (Keras codes, file codes)}`` for every 8-bit QActivation whose tensor the file holds."""
    from tfqkd.export.inspect import load_interpreter
    from tfqkd.quant.layers import QActivation

    if builtin:
        _, _, interpreter = _builtin_outputs(path, x)
    else:
        interpreter, _ = load_interpreter(path, preserve_all_tensors=True)
        detail = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(detail["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(detail["index"], quantize_inputs(x, detail))
        interpreter.invoke()
    tensors = [t for t in interpreter.get_tensor_details() if t["dtype"] == np.int8]
    quantizers = [layer for layer in model.layers if isinstance(layer, QActivation)]
    probe = keras.Model(model.inputs, [layer.output for layer in quantizers])
    found = {}
    for layer, value in zip(quantizers, probe(x, training=False)):
        step = layer.quantizer.grid().scale
        codes = np.rint(np.asarray(value, np.float64) / step)
        best = None
        for t in tensors:
            scale, zero = t["quantization"]
            if tuple(t["shape"]) != codes.shape or not np.isclose(scale, step, rtol=1e-5):
                continue
            try:
                lite = interpreter.get_tensor(t["index"]).astype(np.int64) - zero
            except ValueError:
                continue
            if best is None or np.sum(lite != codes) < np.sum(best != codes):
                best = lite
        if best is not None:
            found[layer.name] = (codes, best)
    return found


def test_w8a8_integer_intermediates_batchnorms_are_exact_in_int8(tmp_path, mnist5k):
    """8-bit BN input and output: the BN's offset sits on its int8 lowering's bias grid (IntegerBatchNormalization).

    A 1x1 DEPTHWISE_CONV_2D computes BN -> ReLU -> quantizer with weight code 127, so its int32
    bias moves in 1/127 of an input code times the gain; a float offset between two of those moved
    some of the 256 codes per channel (densenet21 w8a8: 8,155 of 10M codes after the first BN on
    XNNPACK, then amplified to 4.08 output steps). Each conv also sums integer codes at inference
    (integer_accumulation), so no float32 near-tie of its sum is rounded otherwise than the int32
    accumulator. Measured here on XNNPACK: 148,257 of 27.8M 8-bit codes moved before, 6 with the
    BN offsets only (near-ties of float sums), 0 with both. TFLite's built-in kernels moved 0.3% of
    the BN outputs: with the gain at code 127 the multiplier is ~1/127 and gemmlowp's two roundings
    shift every threshold by up to one accumulator unit, which no int32 bias undoes for 8-bit
    outputs. The gain is now stored at the largest code that keeps the multiplier >= 0.5 (one
    rounding on every runtime), with the Keras offset on that coarser grid: 0 moved.
    """
    import tfqkd.io
    from tfqkd.quant.layers import IntegerBatchNormalization

    x_train, y_train, x_test, _ = mnist5k
    float_model = _float_small_densenet(mnist5k, seed=1)
    model = tfqkd.quantize(float_model, "w8a8", x_train[:128], integer_intermediates=True)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(type(layer) is IntegerBatchNormalization for layer in bns)
    assert all(model.get_layer(name).integer_accumulation for name in ("stem_conv", "l1_conv1", "t_conv", "head_dense"))
    plain = tfqkd.quantize(float_model, "w8a8", x_train[:128])  # the default transform is unchanged
    assert all(type(layer) is keras.layers.BatchNormalization for layer in plain.layers if "bn" in layer.name)
    assert not any(getattr(layer, "integer_accumulation", False) or "integer_accumulation" in layer.get_config()
                   for layer in plain.layers)  # fmt: skip
    # Saved and loaded: the same classes, flags and logits.
    model.save(tmp_path / "ii.h5")
    loaded = tfqkd.io.load_model(tmp_path / "ii.h5")
    assert type(loaded.get_layer("l1_bn2")) is IntegerBatchNormalization and loaded.get_layer("l1_conv1").integer_accumulation
    np.testing.assert_array_equal(loaded.predict(x_test[:64], verbose=0), model.predict(x_test[:64], verbose=0))
    # What the Keras model computes at inference: offsets on the grid s_in * |gain| / w, w the gain's
    # weight code in the file: the largest that keeps the multiplier s_in * |gain| / (w * s_out) >= 0.5.
    bn = model.get_layer("l1_bn2")
    step = bn.input_step()
    gain, offset = (t.numpy().astype(np.float64) for t in bn.integer_affine(step))
    weight_codes = bn.gain_codes(step).numpy().astype(np.float64)
    s_in, s_out = model.get_layer("l1_conv1_q8").quantizer.grid().scale, model.get_layer("l1_conv2_qin").quantizer.grid().scale
    ratio = s_in * np.abs(gain) / s_out
    np.testing.assert_array_equal(weight_codes, np.where(ratio >= 0.5, np.minimum(np.floor(2 * ratio * (1 - 1e-5)), 127), 127))
    assert np.mean(weight_codes < 127) > 0.5  # most 8-bit -> 8-bit BN channels
    multiplier = ratio / weight_codes
    assert np.all((multiplier >= 0.5) | (weight_codes == 127))
    unit = s_in * np.abs(gain) / weight_codes
    np.testing.assert_allclose(offset / unit, np.rint(offset / unit), atol=1e-3)
    path = tmp_path / "dn.tflite"
    result = to_tflite(model, path, calibration_data=x_train[:256], logits="float")
    assert result["rounded_batchnorm"] == []
    x = x_test[:200]
    codes = _every_code(model, path, x)
    assert {"l1_conv1_qin", "l1_conv2_qin", "l2_conv1_qin", "head_relu_q8"} <= set(codes)  # BN outputs
    moved = {name: int(np.sum(k != lite)) for name, (k, lite) in codes.items()}
    total = sum(k.size for k, _ in codes.values())
    # Measured 0 of 27.8M codes (before: 148,257); a few float32 near-ties of the requantizations allowed.
    assert sum(moved.values()) <= 5 and total > 2e7, moved
    # TFLite's built-in kernels (tflite-runtime 2.14's arithmetic): every BN output code is the one the
    # Keras BN computes from the file's own input codes. With the gain at code 127 the multiplier was
    # ~1/127, gemmlowp rounded twice and 41,720 of the 13.8M BN output codes here (0.3%) moved; now 0.
    builtin = _every_code(model, path, x, builtin=True)
    fresh, compared = _batchnorm_misses(model, builtin)
    assert compared > 2e6 and fresh <= 5, (fresh, compared)
    # The head's global average pool (a depthwise conv over the 14x14 map, its bias fitted for both
    # kernels): the codes after it are the Keras pool's of the file's own input codes.
    pooled_in, pooled_out = builtin["head_relu_q8"][1], builtin["head_dense_qin"][1]
    mean = model.get_layer("head_pool")((pooled_in * model.get_layer("head_relu_q8").quantizer.grid().scale).astype(np.float32))
    keras_codes = np.rint(np.asarray(mean, np.float64) / model.get_layer("head_dense_qin").quantizer.grid().scale)
    moved = int(np.sum(keras_codes != pooled_out))
    assert keras_codes.size == 4000 and moved <= 2, moved  # measured 0; the converter's MEAN: 23 of 4,000
    # The float head then sees the Keras model's codes: the same logits up to float32 sums.
    lite = _litert_outputs(path, x).astype(np.float64)
    keras_logits = model.predict(x, verbose=0).astype(np.float64)
    assert np.abs(lite - keras_logits).max() <= 1e-4 * np.abs(keras_logits).max(), np.abs(lite - keras_logits).max()


def _batchnorm_misses(model, codes):
    """``(moved, compared)``: BN -> ReLU -> quantizer output codes of the file that differ from what the Keras
    layers compute from the file's own BN input codes (``codes``: :func:`_every_code`), over every BN."""
    from tfqkd.quant.layers import IntegerBatchNormalization

    moved = compared = 0
    for bn in model.layers:
        if not isinstance(bn, IntegerBatchNormalization):
            continue
        source = bn._inbound_nodes[0].inbound_layers
        relu = bn._outbound_nodes[0].layer
        target = relu._outbound_nodes[0].layer
        if source.name not in codes or target.name not in codes:
            continue
        x = (codes[source.name][1] * source.quantizer.grid().scale).astype(np.float32)
        y = target(relu(bn(x, training=False)), training=False)
        keras_codes = np.rint(np.asarray(y, np.float64) / target.quantizer.grid().scale)
        moved += int(np.sum(keras_codes != codes[target.name][1]))
        compared += keras_codes.size
    return moved, compared


# -- integer_intermediates: grids whose thresholds no reachable value comes near (odd_ratio) --------


@pytest.mark.parametrize("optimizer, seed", [("sgd", 5), ("adam", 0)])
def test_integer_intermediate_w4a4_mlp_is_exact_on_xnnpack_and_builtin_kernels(tmp_path, mnist5k, optimizer, seed, trained_student):
    """With ``integer_intermediates`` (integer sums, the hidden kernel steps and biases on their lattices)
    the int8 logits are the Keras logits rounded, on XNNPACK and on the built-in kernels. The default
    policy's file of this SGD seed-5 trajectory is 2.13 output steps off on the built-in kernels."""
    from tfqkd.quant import resolve_policy

    x_train, _, x_test, _ = mnist5k
    policy = {**resolve_policy("w4a4").to_dict(), "integer_intermediates": True}
    model = trained_student("kl_mlp_student", policy, epochs=3, optimizer=optimizer, seed=seed, calibrated=False)
    assert model.get_layer("hidden1_dense").midway_thresholds and model.get_layer("hidden1_dense").integer_accumulation
    path = tmp_path / "mlp.tflite"
    to_tflite(model, path, calibration_data=x_train[:512], logits="int8")
    expected = _keras_steps(model, x_test, path)
    # The logits' own requantization has no grid to snap to: on the built-in kernels its first rounding can
    # add a fraction of an accumulator unit (measured 0.504 steps; XNNPACK 0.50).
    for kernels, codes, bound in (("xnnpack", _litert_outputs(path, x_test).astype(np.int64), 0.501),
                                  ("built-in", _builtin_outputs(path, x_test)[0], 0.52)):  # fmt: skip
        assert np.abs(codes - expected).max() <= bound, (kernels, np.abs(codes - expected).max())


def test_integer_intermediate_w4a4_densenet_is_exact_on_xnnpack_and_builtin_kernels(tmp_path, mnist5k):
    """Every 4- and 8-bit code of a trained w4a4 ``integer_intermediates`` DenseNet, on both kinds of kernels,
    is the Keras model's: conv sums, concat requantizations and BNs keep a margin from every rounding
    threshold that float noise and gemmlowp's first rounding cannot cross. densenet21 before (the same
    short schedule): 14.65 output steps and 99.0% agreement on tflite-runtime 2.14, 2.50 steps on LiteRT."""
    import tfqkd

    x_train, y_train, x_test, _ = mnist5k
    model = tfqkd.quantize(_float_small_densenet(mnist5k, seed=2), "w4a4", x_train[:128], integer_intermediates=True)
    model.compile(keras.optimizers.Adam(2e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:1024], y_train[:1024], epochs=1, batch_size=64, verbose=0)
    path = tmp_path / "dn.tflite"
    to_tflite(model, path, calibration_data=x_train[:256], logits="int8")
    x = x_test[:200]
    for builtin in (False, True):
        codes = _every_code(model, path, x, builtin=builtin)
        assert {"l1_conv1_q8", "l1_concat_q8", "t_pool_q8", "l2_concat_q8", "l1_conv2_qin", "head_dense_qin"} <= set(codes)
        moved = {name: int(np.sum(k != lite)) for name, (k, lite) in codes.items() if np.any(k != lite)}
        assert moved == {}, (builtin, moved)
    expected = _keras_steps(model, x, path)
    for codes, bound in ((_litert_outputs(path, x).astype(np.int64), 0.501), (_builtin_outputs(path, x)[0], 0.52)):
        assert np.abs(codes - expected).max() <= bound


@pytest.mark.parametrize("policy", ["w4a4", "w8a8"])
def test_integer_intermediate_resnet_adds_are_exact_in_int8(tmp_path, mnist5k, policy):
    """A ResNet's Adds sum two tensors on one 8-bit grid, the learned grid of the Add's output (after its
    ReLU), so the file's ADD adds codes exactly, and the quantizers after it requantize those codes as the
    int8 file does. Every code of a w4a4 resnet8 is the Keras model's on both kinds of kernels; at w8a8 on
    XNNPACK (8-bit weight codes leave the built-in kernels' double rounding of a conv, README). Before,
    int8_fidelity.json: resnet8 w4a4 70.4% agreement, 39.93 output steps; its Adds were not covered."""
    import tfqkd

    x_train, y_train, x_test, _ = mnist5k
    keras.utils.set_random_seed(3)
    float_model = tfqkd.create_model("resnet8", num_classes=10, input_shape=(28, 28, 1))
    float_model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    float_model.fit(x_train[:1024], y_train[:1024], epochs=1, batch_size=64, verbose=0)
    model = tfqkd.quantize(float_model, policy, x_train[:128], integer_intermediates=True)
    model.compile(keras.optimizers.Adam(2e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:1024], y_train[:1024], epochs=1, batch_size=64, verbose=0)
    steps = {name: model.get_layer(name).quantizer.grid().scale
             for name in ("stem_relu_q8", "stack1_bn2_q8", "stack1_relu2_q8")}  # fmt: skip
    assert len(set(steps.values())) == 1, steps  # both inputs and the output of stack1_add: one grid
    path = tmp_path / "resnet8.tflite"
    assert to_tflite(model, path, calibration_data=x_train[:256], logits="int8")["rounded_add_inputs"] == []
    x = x_test[:200]
    for builtin in (False, True) if policy == "w4a4" else (False,):
        codes = _every_code(model, path, x, builtin=builtin)
        assert {"stem_relu_q8", "stack1_bn2_q8", "stack1_relu2_q8", "stack2_shortcut_conv_q8", "stack2_conv1_qin",
                "stack3_relu2_q8", "head_dense_qin"} <= set(codes), sorted(codes)  # fmt: skip
        moved = {name: int(np.sum(k != lite)) for name, (k, lite) in codes.items() if np.any(k != lite)}
        assert moved == {}, (builtin, moved)
    expected = _keras_steps(model, x, path)
    assert np.abs(_litert_outputs(path, x).astype(np.int64) - expected).max() <= 0.501


def test_integer_intermediate_depthwise_separable_net_is_exact_in_int8(tmp_path, mnist5k):
    """ds_cnn (MLPerf Tiny: depthwise-separable blocks, Dropouts after the stem and before the pool) with
    ``integer_intermediates`` at w4a4: its depthwise convs sum integer codes as its convs do, and the
    walks look through the Dropouts (the int8 file has none), so every code is the Keras model's on both
    kinds of kernels. Before 0.8.0 the depthwise convs summed in float and the stem's BN, read through a
    Dropout, was not lowered exactly (3.71 output steps on the built-in kernels)."""
    import tfqkd

    x_train, y_train, x_test, _ = mnist5k
    keras.utils.set_random_seed(1)
    float_model = tfqkd.create_model("ds_cnn", num_classes=10, input_shape=(28, 28, 1))
    float_model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    float_model.fit(x_train[:1024], y_train[:1024], epochs=1, batch_size=64, verbose=0)
    model = tfqkd.quantize(float_model, "w4a4", x_train[:128], integer_intermediates=True)
    model.compile(keras.optimizers.Adam(2e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:1024], y_train[:1024], epochs=1, batch_size=64, verbose=0)
    assert model.get_layer("block1_dwconv").integer_accumulation
    path = tmp_path / "ds_cnn.tflite"
    to_tflite(model, path, calibration_data=x_train[:256], logits="int8")
    x = x_test[:200]
    for builtin in (False, True):
        codes = _every_code(model, path, x, builtin=builtin)
        assert {"stem_conv_q8", "block1_dwconv_qin", "block1_dwconv_q8", "block4_pwconv_q8", "head_dropout_q8",
                "head_dense_qin"} <= set(codes), sorted(codes)  # fmt: skip
        moved = {name: int(np.sum(k != lite)) for name, (k, lite) in codes.items() if np.any(k != lite)}
        assert moved == {}, (builtin, moved)
