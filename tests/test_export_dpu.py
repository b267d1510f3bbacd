"""DPU export (issue 5): DPU-exact training model, Vitis-AI .h5, emulator, bundle, runner."""

import json
import threading
import time

import h5py
import numpy as np
import pytest

import tfqkd
from tfqkd.compat import keras
from tfqkd.data import load_arrays
from tfqkd.errors import TfqkdError
from tfqkd.dpu import avgpool_factor, check_model, fold_batchnorm, quantize_for_dpu
from tfqkd.dpu.arithmetic import shift_bias_range
from tfqkd.dpu.emulator import DPUEmulator, round_shift
from tfqkd.dpu.graph import graph_from_dpu_model
from tfqkd.dpu.positions import check_limits
from tfqkd.export.dpu import emulate_h5, read_quantized_h5, to_dpu
from tfqkd.export.dpu.runner_template import quantize_images, run_threads, split_ranges

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _small_dpu_style(name="small_dpu"):
    """A DenseNet-like DPU model: Conv-BN-ReLU, concat, Conv-BN + 2x2 avgpool, 3x3 GAP, dense."""
    i = keras.Input((28, 28, 1), name="input")
    a = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(i)
    a = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(a))
    b = L.Conv2D(16, 3, padding="same", use_bias=False, name="b_conv")(a)
    b = L.ReLU(name="b_relu")(L.BatchNormalization(name="b_bn")(b))
    c = L.Concatenate(name="b_concat")([a, b])
    c = L.BatchNormalization(name="t_bn")(L.Conv2D(16, 1, use_bias=False, name="t_conv")(c))
    c = L.AveragePooling2D(2, name="t_pool")(c)  # 14x14
    c = L.MaxPooling2D(2, name="t_max")(c)  # 7x7
    d = L.Conv2D(24, 3, strides=2, activation="relu", name="d_conv")(c)  # 3x3: GAP factor 7/64
    d = L.Dropout(0.1, name="drop")(L.GlobalAveragePooling2D(name="gap")(d))
    return keras.Model(i, L.Dense(10, name="fc")(d), name=name)


@pytest.fixture(scope="module")
def trained(mnist5k):
    x, y, _, _ = mnist5k
    keras.utils.set_random_seed(0)
    model = _small_dpu_style()
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    dpu = quantize_for_dpu(model, x[:256])
    dpu.compile(keras.optimizers.SGD(0.01, momentum=0.9), LOSS, metrics=["accuracy"])
    dpu.fit(x, y, epochs=1, batch_size=64, verbose=0)  # QAT through the STE
    return model, dpu


@pytest.fixture(scope="module")
def exported(trained, mnist5k, tmp_path_factory):
    _, dpu = trained
    _, _, xt, yt = mnist5k
    out = tmp_path_factory.mktemp("dpu") / "bundle"
    start = time.perf_counter()
    report = to_dpu(dpu, out, evaluation=(xt, yt))
    report["seconds"] = time.perf_counter() - start
    return out, report


def test_fold_batchnorm_matches_keras():
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(3, 3, 4, 5)), rng.normal(size=5)
    bn = {"gamma": rng.uniform(0.5, 2, 5), "beta": rng.normal(size=5), "moving_mean": rng.normal(size=5), "moving_variance": rng.uniform(0.1, 2, 5)}
    k, b = fold_batchnorm(kernel, bias, bn, 1e-5)
    x = rng.normal(size=(7, 3 * 3 * 4))
    conv = x @ kernel.reshape(-1, 5) + bias
    expected = (conv - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-5) * bn["gamma"] + bn["beta"]
    np.testing.assert_allclose(x @ k.reshape(-1, 5) + b, expected, rtol=1e-4, atol=1e-4)


def test_avgpool_factors_and_rounding():
    assert avgpool_factor(2) == (1, 2) and avgpool_factor(4) == (1, 4)
    assert avgpool_factor(3) == (7, 6) and avgpool_factor(7) == (21, 10)
    assert avgpool_factor(14) == (21, 12) and avgpool_factor(5) == (10, 8) and avgpool_factor(6) == (7, 8)
    with pytest.raises(TfqkdError):
        avgpool_factor(9)
    # floor(v / 2**s + 0.5): half up, also for negatives
    np.testing.assert_array_equal(round_shift(np.array([3, 2, -2, -3, -1]), 1), [2, 1, -1, -1, 0])


def test_dpu_model_trains_and_keeps_structure(trained):
    _, dpu = trained
    names = {layer.name for layer in dpu.layers}
    assert "stem_bn" not in names and "drop" not in names  # BN folded, Dropout removed
    assert {"input_dpuq", "stem_relu_dpuq", "t_pool_dpuq", "gap_dpuq", "fc_dpuq"} <= names
    assert type(dpu.get_layer("stem_conv")).__name__ == "QConv2D"
    graph = graph_from_dpu_model(dpu)
    assert check_limits(graph) == []
    assert dpu.evaluate(*load_arrays("mnist5k", "test"), verbose=0)[1] > 0.6


def test_emulator_agrees_with_keras_fake_quant(trained, exported, mnist5k):
    _, dpu = trained
    _, _, xt, yt = mnist5k
    _, report = exported
    print(f"small DPU model: emulator {report['emulator_accuracy']:.4f}, keras {report['keras_accuracy']:.4f}, "
          f"agreement {report['agreement']:.4f}, export+emulation {report['seconds']:.1f}s")
    assert report["evaluation_images"] == 1000
    assert report["agreement"] >= 0.995
    keras_logits = dpu.predict(xt, verbose=0)
    emu_logits = DPUEmulator(graph_from_dpu_model(dpu)).predict_logits(xt)
    assert np.mean(np.all(keras_logits == emu_logits, axis=1)) >= 0.995  # mostly bit-identical logits


def test_quantized_h5_layout(exported):
    out, _ = exported
    with h5py.File(out / "quantized.h5", "r") as handle:
        config = json.loads(handle.attrs["model_config"])
        layers = {layer["name"]: layer for layer in config["config"]["layers"]}
        weights = handle["model_weights"]
        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        names = {text(n): [text(w) for w in weights[text(n)].attrs["weight_names"]] for n in weights.attrs["layer_names"]}
        assert layers["input"]["class_name"] == "InputLayer"
        assert layers["input"]["config"]["batch_input_shape"] == [None, 28, 28, 1]
        quant_input = layers["quant_input"]
        assert quant_input["class_name"] == "Vitis>VitisQuantize"
        assert quant_input["config"]["quantizer"]["class_name"] == "Vitis>Pof2SQuantizer"
        assert quant_input["config"]["quantizer"]["config"]["bit_width"] == 8
        for name, layer in layers.items():
            if name in ("input", "quant_input"):
                continue
            assert layer["class_name"] == "Vitis>QuantizeWrapper" and name.startswith("quant_")
            inner = layer["config"]["layer"]
            assert inner["class_name"] in (
                "Conv2D", "Dense", "ReLU", "Concatenate", "Vitis>AveragePooling2D", "MaxPooling2D",
                "Vitis>VitisGlobalAveragePooling2D",
            )
            assert inner["config"]["name"] == name[len("quant_"):]
            qc = layer["config"]["quantize_config"]
            assert qc["class_name"] == "Vitis>VitisQuantizeConfig"
            for key in ("weight_quantizers", "bias_quantizers", "activation_quantizers", "output_quantizers"):
                for q in qc["config"][key]:
                    assert q["quantizer_type"] == "Pof2SQuantizer" and q["quantizer_params"]["bit_width"] == 8
        assert not any(l["config"]["layer"]["class_name"] in ("BatchNormalization", "Dropout") for n, l in layers.items() if n.startswith("quant_") and n != "quant_input")
        # Vitis-AI pof2s' DPU pools (registered names of VitisAveragePooling2D / VitisGlobalAveragePooling2D),
        # with the plain Keras config and an output quantizer
        t_pool, gap = layers["quant_t_pool"]["config"]["layer"], layers["quant_gap"]["config"]["layer"]
        assert t_pool["class_name"] == "Vitis>AveragePooling2D" and gap["class_name"] == "Vitis>VitisGlobalAveragePooling2D"
        assert t_pool["config"] == json.loads(json.dumps(keras.layers.AveragePooling2D(2, 2, name="t_pool").get_config()))
        assert set(gap["config"]) == set(keras.layers.GlobalAveragePooling2D(name="gap").get_config())
        assert "quant_t_pool/output_0_pos:0" in names["quant_t_pool"] and "quant_gap/output_0_pos:0" in names["quant_gap"]
        assert names["quant_stem_conv"][:2] == ["stem_conv/kernel:0", "stem_conv/bias:0"]
        assert "quant_stem_conv/kernel_pos:0" in names["quant_stem_conv"] and "quant_stem_conv/bias_pos:0" in names["quant_stem_conv"]
        assert "quant_stem_relu/output_0_pos:0" in names["quant_stem_relu"]
        assert "quant_t_conv/post_activation_pos:0" in names["quant_t_conv"]  # linear conv
        assert "quant_fc/post_activation_pos:0" in names["quant_fc"]
        assert "quant_input/quant_input_pos:0" in names["quant_input"]
        positions = {}
        for layer_name, wnames in names.items():
            for wname in wnames:
                if wname.endswith("_pos:0"):
                    value = weights[layer_name][wname][()]
                    assert value.dtype == np.float32 and float(value).is_integer()
                    positions[wname] = int(value)
    p = lambda w: positions[f"quant_{w}_pos:0"]  # noqa: E731
    # concatenation: inputs and output share the minimum position; pools keep their input's
    assert p("stem_relu/output_0") == p("b_relu/output_0") == p("b_concat/output_0")
    assert p("t_pool/output_0") == p("t_conv/post_activation") == p("t_max/output_0")
    assert p("gap/output_0") == p("d_conv_act/output_0")
    ipos = {"stem_conv": p("input/quant_input"), "b_conv": p("stem_relu/output_0"), "t_conv": p("b_concat/output_0"),
            "d_conv": p("t_max/output_0"), "fc": p("gap/output_0")}
    opos = {"stem_conv": p("stem_relu/output_0"), "b_conv": p("b_relu/output_0"), "t_conv": p("t_conv/post_activation"),
            "d_conv": p("d_conv_act/output_0"), "fc": p("fc/post_activation")}
    for conv in ipos:
        shift_cut = p(f"{conv}/kernel") + ipos[conv] - opos[conv]
        shift_bias = p(f"{conv}/kernel") + ipos[conv] - p(f"{conv}/bias")
        low, high = shift_bias_range(shift_cut)
        assert 0 <= shift_cut <= 16 and low <= shift_bias <= high, conv


def test_emulator_from_file_equals_memory(trained, exported, mnist5k):
    _, dpu = trained
    _, _, xt, _ = mnist5k
    out, _ = exported
    from_file = emulate_h5(out / "quantized.h5", xt[:300])
    from_memory = DPUEmulator(graph_from_dpu_model(dpu)).predict_logits(xt[:300])
    np.testing.assert_array_equal(from_file, from_memory)
    graph = read_quantized_h5(out / "quantized.h5")
    assert [n.name for n in graph.nodes] == [n.name for n in graph_from_dpu_model(dpu).nodes]


def _rename_pools(src, dst, avgpool, gap):
    """A copy of a quantized.h5 whose average pools carry other class names."""
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        for layer in config["config"]["layers"]:
            inner = layer["config"].get("layer", {})
            if inner.get("class_name") == "Vitis>AveragePooling2D":
                inner["class_name"] = avgpool
            elif inner.get("class_name") == "Vitis>VitisGlobalAveragePooling2D":
                inner["class_name"] = gap
        handle.attrs["model_config"] = json.dumps(config)
    return dst


def test_reader_takes_vitis_and_plain_average_pools(exported, mnist5k, tmp_path):
    """The reader takes Vitis-AI's pool names (what tfqkd writes) and the plain Keras ones (its files before)."""
    out, _ = exported
    _, _, xt, _ = mnist5k
    written = read_quantized_h5(out / "quantized.h5")
    assert [n.op for n in written.nodes if n.name in ("t_pool", "gap")] == ["avgpool", "gap"]
    expected = emulate_h5(out / "quantized.h5", xt[:200])
    for avgpool, gap in (("AveragePooling2D", "GlobalAveragePooling2D"), ("Vitis>VitisAveragePooling2D", "Vitis>VitisGlobalAveragePooling2D")):
        other = _rename_pools(out / "quantized.h5", tmp_path / f"{avgpool[-20:]}.h5", avgpool, gap)
        graph = read_quantized_h5(other)
        assert [(n.name, n.op, n.pos) for n in graph.nodes] == [(n.name, n.op, n.pos) for n in written.nodes]
        np.testing.assert_array_equal(emulate_h5(other, xt[:200]), expected)
    with pytest.raises(TfqkdError, match="VitisMaxPool"):
        read_quantized_h5(_rename_pools(out / "quantized.h5", tmp_path / "bad.h5", "Vitis>VitisMaxPool", "Vitis>VitisMaxPool"))


def test_bundle_contents(exported):
    out, report = exported
    files = {p.name for p in out.iterdir()}
    assert {"quantized.h5", "compile_zcu102.sh", "compile_zcu104.sh", "dpu_runner.py", "README.md", "eval_data.npz", "dpu_report.json"} <= files
    for board, arch in (("zcu102", "ZCU102"), ("zcu104", "ZCU104")):
        script = (out / f"compile_{board}.sh").read_text()
        assert f"vai_c_tensorflow2 -m quantized.h5 -a /opt/vitis_ai/compiler/arch/DPUCZDX8G/{arch}/arch.json" in script
        assert f"-o compiled_{board} -n small_dpu" in script
    saved = json.loads((out / "dpu_report.json").read_text())
    assert saved["agreement"] == report["agreement"] and saved["positions_from"] == "trained"
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no staging left over


def test_float_model_is_calibrated(trained, mnist5k, tmp_path):
    model, _ = trained
    x, _, xt, yt = mnist5k
    report = to_dpu(model, tmp_path / "f", calibration_data=x[:256], arch="zcu104", evaluation=(xt[:200], yt[:200]))
    assert report["positions_from"] == "calibrated" and report["agreement"] >= 0.99
    with pytest.raises(TfqkdError, match="calibration_data"):
        to_dpu(model, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def _swish_17x17():
    i = keras.Input((32, 32, 3), name="input")
    a = L.Conv2D(8, 17, padding="same", name="big_conv")(i)
    a = L.Activation("swish", name="swish_act")(a)
    b = L.Conv2D(8, 3, padding="same", activation="gelu", name="gelu_conv")(a)
    return keras.Model(i, L.Dense(10, name="fc")(L.GlobalAveragePooling2D(name="gap")(b)), name="bad")


def test_unsupported_models_report_every_layer_and_write_nothing(tmp_path):
    report = check_model(_swish_17x17())
    offending = {issue.layer for issue in report.issues}
    assert {"big_conv", "swish_act", "gelu_conv"} <= offending
    assert "17x17" in report.format() and "swish" in report.format() and "gelu" in report.format()
    with pytest.raises(TfqkdError) as err:
        to_dpu(_swish_17x17(), tmp_path / "bad", calibration_data=np.zeros((2, 32, 32, 3), np.float32))
    assert "\n" not in str(err.value) and "big_conv" in str(err.value) and "gelu_conv" in str(err.value)
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []

    pre = tfqkd.create_model("densenet21", num_classes=10, input_shape=(32, 32, 3))
    report = check_model(pre)
    reasons = {issue.layer: issue.reason for issue in report.issues}
    assert "block1_layer1_bn1" in reasons and "cannot be folded" in reasons["block1_layer1_bn1"]
    assert "block1_layer1_relu1" in reasons and "standalone" in reasons["block1_layer1_relu1"]
    assert "head_bn" in reasons
    with pytest.raises(TfqkdError, match="block1_layer1_bn1"):
        to_dpu(pre, tmp_path / "pre", calibration_data=np.zeros((2, 32, 32, 3), np.float32))
    assert not (tmp_path / "pre").exists()
    assert check_model(tfqkd.create_model("densenet21_dpu", num_classes=10, input_shape=(28, 28, 1))).ok


def test_cli_exit_code_for_unsupported(tmp_path):
    from tfqkd.export.dpu.command import add_dpu_arguments, run_dpu_export
    import argparse

    path = tmp_path / "bad.h5"
    _swish_17x17().save(path)
    parser = add_dpu_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(path), "--out", str(tmp_path / "out"), "--calibration-data", "mnist5k"])
    with pytest.raises(TfqkdError, match="big_conv"):
        run_dpu_export(args)
    assert not (tmp_path / "out").exists()


class _Tensor:
    def __init__(self, dims):
        self.dims = dims


class _StandInRunner:
    """Mimics vart.Runner: batch 3, 'predicts' the class stored in the first pixel."""

    def __init__(self):
        self.seen = []
        self.threads = set()
        self._jobs = {}

    def get_input_tensors(self):
        return [_Tensor([3, 2, 2, 1])]

    def get_output_tensors(self):
        return [_Tensor([3, 10])]

    def execute_async(self, inputs, outputs):
        self.threads.add(threading.get_ident())
        batch = inputs[0]
        self.seen.append(batch.copy())
        for k in range(batch.shape[0]):
            outputs[0][k, :] = 0
            outputs[0][k, int(batch[k, 0, 0, 0]) % 10] = 100
        time.sleep(0.01)
        self._jobs[len(self._jobs)] = True
        return len(self._jobs) - 1

    def wait(self, job):
        assert self._jobs[job]


def test_runner_split_and_threads():
    assert split_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    for total in range(0, 30):
        for threads in range(1, 6):
            ranges = split_ranges(total, threads)
            assert ranges[0][0] == 0 and ranges[-1][1] == total and len(ranges) == threads
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    labels = np.arange(11) % 10
    images = np.zeros((11, 2, 2, 1), np.int8)
    images[:, 0, 0, 0] = labels
    labels_wrong = labels.copy()
    labels_wrong[0] = 5
    runners = [_StandInRunner() for _ in range(3)]
    report = run_threads(runners, images, labels_wrong)
    np.testing.assert_array_equal(report["predictions"], labels)  # image order preserved
    assert report["accuracy"] == pytest.approx(10 / 11) and report["threads"] == 3 and report["images"] == 11
    assert report["throughput_fps"] > 0 and report["latency_ms"] > 0
    # each runner saw only its contiguous subset (4, 4, 3 images), in its own thread
    seen = [np.concatenate([b[:, 0, 0, 0] for b in r.seen]) for r in runners]
    assert [len(r.seen) for r in runners] == [2, 2, 1]
    np.testing.assert_array_equal(seen[0][:4], labels[:4])
    np.testing.assert_array_equal(seen[1][:4], labels[4:8])
    np.testing.assert_array_equal(seen[2][:3], labels[8:])
    assert len({t for r in runners for t in r.threads}) == 3
    np.testing.assert_array_equal(quantize_images(np.array([0.5, 0.25, -2.0, 0.999]), 3), [4, 2, -16, 8])


@pytest.mark.slow
def test_densenet21_dpu_emulator_agreement(tmp_path, mnist5k):
    """densenet21_dpu, trained briefly with the DPU policy on mnist5k: agreement >= 99.5 %."""
    x, y, xt, yt = mnist5k
    keras.utils.set_random_seed(0)
    model = tfqkd.create_model("densenet21_dpu", num_classes=10, input_shape=(28, 28, 1))
    model.compile(keras.optimizers.Adam(2e-3), LOSS)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    dpu = quantize_for_dpu(model, x[:256])
    dpu.compile(keras.optimizers.SGD(0.005, momentum=0.9), LOSS, metrics=["accuracy"])
    dpu.fit(x, y, epochs=1, batch_size=64, verbose=0)
    report = to_dpu(dpu, tmp_path / "densenet21", evaluation=(xt, yt))
    print(f"densenet21_dpu: emulator {report['emulator_accuracy']:.4f} keras {report['keras_accuracy']:.4f} "
          f"agreement {report['agreement']:.4f}")
    assert report["evaluation_images"] == 1000 and report["agreement"] >= 0.995
    np.testing.assert_array_equal(
        emulate_h5(tmp_path / "densenet21" / "quantized.h5", xt[:100]),
        DPUEmulator(graph_from_dpu_model(dpu)).predict_logits(xt[:100]),
    )
