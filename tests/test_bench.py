"""tfqkd.bench: energy (thesis eq. 7.4), the table, the DPU model, and a tiny end-to-end sweep."""

import csv
import json

import pytest

from tfqkd.compat import keras
from tfqkd.dpu import performance as D
from tfqkd.bench.command import add_bench_arguments, resolve_target, run_bench
from tfqkd.bench.latency import Backend, Measurement, energy_per_image, summarize, sweep
from tfqkd.bench.report import THESIS_TABLE_7_1, format_table
from tfqkd.console import ArgumentParser
from tfqkd.errors import TfqkdError


def test_energy_is_the_smaller_of_power_times_latency_and_power_over_throughput():
    # P = 10 W, latency 2 ms -> 20 mJ; throughput 1000 img/s -> 10 mJ: eq. 7.4 takes the minimum.
    assert energy_per_image(10.0, 0.002, 1000.0) == pytest.approx(0.010)
    assert energy_per_image(10.0, 0.0005, 1000.0) == pytest.approx(0.005)
    assert energy_per_image(10.0, None, 500.0) == pytest.approx(0.020)
    assert energy_per_image(None, 0.001, 1000.0) is None
    # The thesis DPU: 22.8 W, 0.69 ms, 3674 img/s -> 22.8/3674 = 6.21 mJ.
    assert energy_per_image(22.8, 0.69e-3, 3674.0) == pytest.approx(22.8 / 3674.0)
    for bad in ((0.0, 0.001, 10.0), (5.0, -1.0, 10.0), (5.0, 0.001, 0.0)):
        with pytest.raises(TfqkdError):
            energy_per_image(*bad)


def _fake_backend(name):
    return Backend(name, name.upper(), lambda batch: (lambda: None))


def test_summary_table_has_thesis_form_and_speedups():
    ms = [
        Measurement("keras_fp32", 1, [0.010, 0.012, 0.011]),
        Measurement("keras_fp32", 8, [0.040]),
        Measurement("tflite_fp32", 1, [0.005]),
        Measurement("tflite_fp32", 8, [0.020]),
        Measurement("tflite_int8", 1, [0.001]),
        Measurement("tflite_int8", 8, [0.004]),
    ]
    backends = [_fake_backend(n) for n in ("keras_fp32", "tflite_fp32", "tflite_int8")]
    rows = summarize(ms, backends, power_watts=10.0)
    assert [r["backend"] for r in rows] == ["keras_fp32", "tflite_fp32", "tflite_int8"]
    keras_row, fp32, int8 = rows
    assert keras_row["latency_ms"] == pytest.approx(11.0)
    assert keras_row["throughput"] == pytest.approx(200.0) and keras_row["best_batch"] == 8
    assert keras_row["energy_mj"] == pytest.approx(min(10 * 11.0, 10 / 200.0 * 1e3))
    assert int8["speedup"] == pytest.approx(2000.0 / 200.0)
    assert int8["speedup_vs_tflite_fp32"] == pytest.approx(2000.0 / 400.0)
    text = format_table(rows, "title")
    lines = text.splitlines()
    assert lines[0] == "title" and "img/s" in lines[1] and "latency ms" in lines[1] and "energy mJ/img" in lines[1]
    assert sum("(thesis)" in line for line in lines) == len(THESIS_TABLE_7_1)
    assert "3674.0" in text and "0.690" in text


def test_sweep_stops_a_slow_backend_and_interleaves():
    calls = []

    def make(name, seconds):
        def builder(batch):
            def run():
                calls.append(name)
                if batch >= 4:
                    import time

                    time.sleep(seconds)
            return run
        return builder

    fast, slow = Backend("fast", "f", make("fast", 0.0)), Backend("slow", "s", make("slow", 0.03))
    out = sweep([fast, slow], [1, 4, 8], repeats=2, min_sample_s=0.0, max_batch_s=0.02, log=None)
    got = {(m.backend, m.batch_size) for m in out}
    assert got == {("fast", 1), ("slow", 1), ("fast", 4), ("slow", 4), ("fast", 8)}
    assert all(len(m.samples) == 2 and len(m.cpu_samples) == 2 for m in out)


def test_dpu_conv_cycles_by_hand():
    b4096, b512 = D.CORES["B4096"], D.CORES["B512"]
    assert b4096.ops_per_cycle == 4096 and b512.ops_per_cycle == 512
    assert [D.CORES[n].ops_per_cycle for n in ("B800", "B1024", "B1152", "B1600", "B2304", "B3136")] == [
        800, 1024, 1152, 1600, 2304, 3136]
    # 5x9 output, 20 -> 33 channels, 3x3 kernel:
    # B4096: ceil(9/8)=2 x 5 rows x 9 taps x ceil(20/16)=2 x ceil(33/16)=3 = 540 cycles.
    assert D.conv_cycles(b4096, 5, 9, 20, 33, 3, 3) == 540
    # B512: ceil(9/4)=3 x 5 x 9 x ceil(20/8)=3 x ceil(33/8)=5 = 2025.
    assert D.conv_cycles(b512, 5, 9, 20, 33, 3, 3) == 2025
    with pytest.raises(TfqkdError):
        D.conv_cycles(b512, 0, 9, 20, 33)

    x = keras.Input((5, 9, 20))
    model = keras.Model(x, keras.layers.Conv2D(33, 3, padding="same", use_bias=False)(x))
    (cost,) = D.layer_costs(model, b4096)
    assert cost.compute_cycles == 540 and cost.macs == 5 * 9 * 33 * 9 * 20
    assert cost.bytes == 5 * 9 * 20 + 5 * 9 * 33 + 9 * 20 * 33
    ideal = D.DPUConfig(overhead_cycles=0.0, memory_bound=False)
    est = D.estimate(model, ideal)
    assert est["latency_ms"] == pytest.approx(1e3 * 540 / 300e6)
    assert est["throughput"] == pytest.approx(3 * 300e6 / 540)
    # A 100-cycle per-layer overhead adds exactly 100 cycles; a slow DDR makes the layer memory bound.
    assert D.estimate(model, D.DPUConfig(overhead_cycles=100.0, memory_bound=False))["latency_ms"] == pytest.approx(
        1e3 * 640 / 300e6)
    slow = D.DPUConfig(overhead_cycles=0.0, ddr_bytes_per_s=1e6)
    assert D.estimate(model, slow)["latency_ms"] == pytest.approx(1e3 * cost.bytes / 1e6)
    assert D.estimate(model, slow)["throughput"] == pytest.approx(3 / (3 * cost.bytes / 1e6))


def test_dpu_flags_layers_it_cannot_fuse():
    x = keras.Input((8, 8, 16))
    y = keras.layers.BatchNormalization()(x)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(16, 1)(y)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    est = D.estimate(keras.Model(x, y))
    assert len(est["cpu_layers"]) == 2  # the leading BN and ReLU; conv-BN-ReLU folds and fuses


@pytest.mark.parametrize("name", ["densenet21", "densenet37", "densenet63"])
def test_dpu_model_within_35_percent_of_the_thesis(name):
    from tfqkd.models import create_model

    est = D.estimate(create_model(f"{name}_dpu", num_classes=10))
    measured = D.THESIS_DPU[name]["latency_ms"]
    assert abs(est["latency_ms"] / measured - 1) < 0.35
    assert est["cpu_layers"] == []


def _tiny(path):
    x = keras.Input((8, 8, 3), name="input")
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = keras.layers.GlobalAveragePooling2D()(y)
    model = keras.Model(x, keras.layers.Dense(4)(y), name="tiny")
    model.save(path)
    return path


def test_tiny_sweep_writes_json_csv_and_pngs(tmp_path, capsys):
    model_path = _tiny(tmp_path / "tiny.h5")
    parser = add_bench_arguments(ArgumentParser(prog="tfqkd bench"))
    out = tmp_path / "out"
    args = parser.parse_args([
        str(model_path), "--batch-sizes", "1", "2", "4", "--threads", "1", "--power-watts", "15",
        "--repeats", "2", "--backends", "keras_fp32", "tflite_fp32", "tflite_int8", "--out", str(out),
    ])
    assert run_bench(args) == 0
    payload = json.loads((out / "bench.json").read_text())
    assert [r["backend"] for r in payload["table"]] == ["keras_fp32", "tflite_fp32", "tflite_int8"]
    assert {r["batch_size"] for r in payload["sweep"]} == {1, 2, 4}
    for r in payload["table"]:
        assert r["energy_mj"] == pytest.approx(
            1e3 * min(15 * r["latency_ms"] / 1e3, 15 / r["throughput"]), rel=1e-9)
    with open(out / "bench.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and "throughput" in rows[0]
    assert (out / "table.csv").is_file()
    for png in ("latency.png", "throughput.png", "energy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "thesis" in printed
    assert "thesis DPU" not in printed  # the thesis measured DenseNets on the DPU, not this model
    assert "int8_vs_tflite_fp32_best_throughput" in payload["ratios"]
    assert payload["layout"] == "speed"


def test_bad_target_and_arguments_are_user_errors(tmp_path):
    with pytest.raises(TfqkdError):
        resolve_target("no_such_model_or_dir")
    with pytest.raises(TfqkdError):
        resolve_target(str(tmp_path))  # a directory without models
    parser = add_bench_arguments(ArgumentParser(prog="tfqkd bench"))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["densenet21", "--power-watts", "-3"])
    assert info.value.code == 2
