"""Tests of tfqkd.analysis: layerwise statistics, PSMAC latency, bit allocation, HAKD selection."""

import tfqkd  # noqa: F401  isort: skip

import argparse
import math

import numpy as np
import pytest

from tfqkd.compat import keras
from tfqkd.analysis import hakd, layerwise, mixed_precision, psmac
from tfqkd.errors import TfqkdError


def _tiny_model():
    inputs = keras.Input((8, 8, 1), name="input")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(10, name="head")(x)
    return keras.Model(inputs, outputs, name="tiny")


# Layerwise statistics -------------------------------------------------------------------------


def test_sqnr_matches_hand_computation():
    x = np.array([1.0, -0.5, 0.25, 0.1])
    signal = 1.0 + 0.25 + 0.0625 + 0.01
    # 2 bits: codes -1..1, step = max|x| / 1 = 1; q = [1, -0, 0, 0] (round half to even).
    noise2 = 0.0 + 0.25 + 0.0625 + 0.01
    assert layerwise.sqnr_db(x, 2) == pytest.approx(10 * math.log10(signal / noise2))
    # 4 bits: codes -7..7, step 1/7; x/step = [7, -3.5, 1.75, 0.7] -> [7, -4, 2, 1].
    q4 = np.array([7, -4, 2, 1]) / 7.0
    noise4 = float(np.sum((x - q4) ** 2))
    assert layerwise.sqnr_db(x, 4) == pytest.approx(10 * math.log10(signal / noise4))
    assert layerwise.sqnr_db(x, 4) == pytest.approx(22.07, abs=0.01)
    # Exact representation: infinite SQNR; all zeros: undefined.
    assert layerwise.sqnr_db(np.array([1.0, -1.0, 0.0]), 2) == math.inf
    assert math.isnan(layerwise.sqnr_db(np.zeros(3), 8))


def test_sqnr_follows_step_ratio_on_uniform_data():
    # Noise power ~ step**2 / 12, so 8 vs 4 bits gains 20 log10(127 / 7) dB (about 6 dB per bit).
    x = np.random.default_rng(0).uniform(-1, 1, 100_000)
    gain = layerwise.sqnr_db(x, 8) - layerwise.sqnr_db(x, 4)
    assert gain == pytest.approx(20 * math.log10(127 / 7), abs=0.3)


def test_kurtosis():
    assert layerwise.excess_kurtosis([1.0, -1.0, 1.0, -1.0]) == pytest.approx(-2.0)
    gauss = np.random.default_rng(0).normal(size=200_000)
    assert abs(layerwise.excess_kurtosis(gauss)) < 0.05
    laplace = np.random.default_rng(0).laplace(size=200_000)
    assert layerwise.excess_kurtosis(laplace) == pytest.approx(3.0, abs=0.2)
    assert math.isnan(layerwise.excess_kurtosis([2.0, 2.0]))


def test_share_clipped():
    stats = layerwise.tensor_stats(np.array([-2.0, 0.0, 0.5, 3.0]), clip_range=(-1.0, 1.0))
    assert stats["clipped_share"] == 0.5
    assert (stats["min"], stats["max"], stats["mean"]) == (-2.0, 3.0, 0.375)
    # Float tensors: the mean +- 3 std range; one far outlier among 99 zeros is clipped.
    x = np.zeros(100)
    x[0] = 100.0
    stats = layerwise.tensor_stats(x)
    assert stats["clip_hi"] == pytest.approx(1.0 + 3 * np.std(x))
    assert stats["clipped_share"] == pytest.approx(0.01)


def test_analyze_quantized_model_uses_quantizer_ranges():
    model = _tiny_model()
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)).astype("float32")
    qmodel = tfqkd.quantize(model, "w4a4", x)
    rows = layerwise.analyze(qmodel, x)
    assert [(r["layer"], r["tensor"]) for r in rows] == [
        ("conv", "weight"), ("conv", "activation"), ("head", "weight"), ("head", "activation")
    ]  # fmt: skip
    assert all(row["bits"] == 4 for row in rows)
    # Min-max initialised intervals span the weights and the calibration inputs: nothing is
    # clipped there (the head's input comes from the already quantized conv, so it may be).
    assert [row["clipped_share"] for row in rows[:3]] == [0.0, 0.0, 0.0]
    assert rows[3]["clipped_share"] < 0.02
    weight = qmodel.get_layer("conv").kernel.numpy()
    assert rows[0]["clip_hi"] == pytest.approx(np.abs(weight).max(), rel=1e-5)
    assert rows[0]["sqnr4_db"] == pytest.approx(layerwise.sqnr_db(weight, 4))
    # Shrinking the learned step makes the quantizer clip.
    quantizer = qmodel.get_layer("head").kernel_quantizer_internal
    quantizer.assign_step(quantizer.step.numpy()[0] / 4)
    clipped = layerwise.analyze(qmodel, x)[2]["clipped_share"]
    assert clipped > 0.0


def test_analyze_command_writes_csv_and_pngs(tmp_path):
    from tfqkd.analysis.command import add_analyze_arguments, run_analyze

    model = _tiny_model()
    path = tmp_path / "tiny.h5"
    model.save(path)
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    out = tmp_path / "out"
    assert run_analyze(parser.parse_args([str(path), "--data", "digits", "--out", str(out), "--examples", "8"])) == 0
    lines = (out / "layerwise.csv").read_text().splitlines()
    assert lines[0].startswith("layer,tensor,layer_type") and len(lines) == 5
    for png in ("weights_hist.png", "activations_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TfqkdError, match="neither a model name"):
        run_analyze(parser.parse_args(["no_such_thing", "--data", "digits"]))
    with pytest.raises(TfqkdError, match="expects"):
        run_analyze(parser.parse_args([str(path), "--data", "mnist5k", "--out", str(out)]))


def test_tensorboard_callback_logs(tmp_path):
    model = _tiny_model()
    x = np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 10
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = layerwise.LayerwiseTensorBoard(tmp_path, x, every_n_epochs=2)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    assert list((tmp_path / "layerwise").glob("events.out.tfevents.*"))
    with pytest.raises(TfqkdError):
        layerwise.LayerwiseTensorBoard(tmp_path, x, every_n_epochs=0)


# PSMAC latency model --------------------------------------------------------------------------


def test_psmac_hand_example():
    assert [psmac.macs_per_cycle(b) for b in (16, 9, 8, 5, 4, 2, None)] == [1, 1, 2, 2, 4, 4, 1]
    model = psmac.PSMACModel(num_mac_units=10, frequency_hz=1e6)
    assert model.layer_cycles(1000, 16, 16) == 100  # 1000 MACs / (10 units x 1)
    assert model.layer_cycles(1000, 8, 8) == 50  # two 8-bit products per unit and cycle
    assert model.layer_cycles(1000, 4, 4) == 25  # four 4-bit products
    assert model.layer_cycles(1000, 4, 8) == 50  # the wider operand decides
    assert model.layer_cycles(1001, 4, 4) == 26  # partial cycle rounds up
    assert model.layer_cycles(1000, None, None) == 100  # float: 16-bit mode
    with pytest.raises(TfqkdError):
        psmac.macs_per_cycle(17)


def test_psmac_estimate_on_model():
    inputs = keras.Input((784,))
    hidden = keras.layers.Dense(100, name="d1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10, name="d2")(hidden))
    accel = psmac.PSMACModel(num_mac_units=8, frequency_hz=1e6)
    estimate = accel.estimate(model, {"d1": (4, 4), "d2": (8, 8)})
    assert [r["cycles"] for r in estimate["layers"]] == [78400 // 32, math.ceil(1000 / 16)]
    assert estimate["seconds"] == pytest.approx((2450 + 63) / 1e6)
    qmodel = tfqkd.quantize(model, "w4a4")
    assert accel.estimate(qmodel)["cycles"] == math.ceil(78400 / 32) + math.ceil(1000 / 32)


# Mixed precision allocation -------------------------------------------------------------------

COSTS = {
    "a": {"type": "Dense", "params": 1000, "bias": 0, "macs": 1000},
    "b": {"type": "Dense", "params": 500, "bias": 0, "macs": 500},
    "c": {"type": "Dense", "params": 100, "bias": 0, "macs": 100},
}
DROPS = {"a": {4: 0.3, 2: 2.0}, "b": {4: 0.25, 2: 0.4}, "c": {4: 0.0, 2: -0.1}}


def _drop(bits):
    return sum(max(DROPS[n][b], 0.0) for n, b in bits.items() if b != 8)


@pytest.mark.parametrize("method", ["knapsack", "greedy"])
@pytest.mark.parametrize("budget", [0.0, 0.3, 0.5, 0.7, 5.0])
def test_allocation_respects_budget(method, budget):
    bits = mixed_precision.allocate(COSTS, DROPS, budget, method=method)
    assert set(bits) == set(COSTS)
    assert _drop(bits) <= budget + 1e-9
    assert bits["c"] == 2  # free (negative drop counts as zero) and cheaper


def test_knapsack_is_optimal_on_toy_table():
    import itertools

    for budget in (0.0, 0.3, 0.5, 0.7, 5.0):
        bits = mixed_precision.allocate(COSTS, DROPS, budget, method="knapsack")
        best = min(
            mixed_precision.bits_cost(COSTS, dict(zip("abc", combo)))
            for combo in itertools.product((8, 4, 2), repeat=3)
            if _drop(dict(zip("abc", combo))) <= budget + 1e-9
        )
        assert mixed_precision.bits_cost(COSTS, bits) == best
    # Budget 0.5: a at 4 (0.3) plus c at 2 (0) beats b at 2 (0.4): 4000+1000+200 bits.
    assert mixed_precision.allocate(COSTS, DROPS, 0.5) == {"a": 4, "b": 8, "c": 2}
    with pytest.raises(TfqkdError):
        mixed_precision.allocate(COSTS, DROPS, -1)


def test_bitops_and_latency_objectives():
    bits = {"a": 4, "b": 8, "c": 2}
    assert mixed_precision.bits_cost(COSTS, bits, "bitops") == 1000 * 16 + 500 * 64 + 100 * 4
    accel = psmac.PSMACModel(num_mac_units=1)
    assert mixed_precision.bits_cost(COSTS, bits, "latency", accel) == 250 + 250 + 25


def test_policy_from_bits_round_trips_through_yaml(tmp_path):
    policy = mixed_precision.policy_from_bits({"hidden1_dense": 4, "head_dense": (8, 8)})
    path = tmp_path / "policy.yaml"
    policy.to_yaml(path)
    loaded = tfqkd.QuantPolicy.from_yaml(path)
    specs = loaded.resolve([("hidden1_dense", "Dense"), ("hidden2_dense", "Dense"), ("head_dense", "Dense")])
    assert [(s.weight_bits, s.activation_bits) for s in specs.values()] == [(4, 4), (8, 8), (8, 8)]


# HAKD selection -------------------------------------------------------------------------------

TOY = [
    {"name": "s", "latency_ms": 1.0, "macs": 10},
    {"name": "m", "latency_ms": 2.0, "macs": 40},
    {"name": "m_slow", "latency_ms": 2.5, "macs": 30},  # dominated by m
    {"name": "l", "latency_ms": 4.0, "macs": 90},
    {"name": "xl", "latency_ms": 9.0, "macs": 200},
]


def test_hakd_pareto_front_and_selection():
    assert [r["name"] for r in hakd.pareto_front(TOY)] == ["s", "m", "l", "xl"]
    assert hakd.select_student(TOY, 3.0)["name"] == "m"
    assert hakd.select_student(TOY, 4.0)["name"] == "l"
    assert hakd.select_student(TOY, 100)["name"] == "xl"
    with pytest.raises(TfqkdError, match="no candidate student meets"):
        hakd.select_student(TOY, 0.5)


def test_psmac_backend_and_plot(tmp_path):
    backend = hakd.PSMACBackend(bits=4, psmac=psmac.PSMACModel(num_mac_units=4, frequency_hz=1e6))
    rows = hakd.measure_candidates(
        [hakd.Candidate("mobilenet_v1", (("width_multiplier", w),)) for w in (0.25, 0.5)], backend, (32, 32, 3), 10
    )
    assert rows[0]["latency_ms"] < rows[1]["latency_ms"]
    # 4-bit operands on 4 units: 16 MACs per cycle, each layer rounded up to whole cycles.
    assert rows[0]["macs"] / 16 <= rows[0]["cycles"] < rows[0]["macs"] / 16 + 100
    points = [
        {"name": "a", "kind": "hakd (chosen)", "accuracy": 90.0, "latency_ms": 1.0, "size_bytes": 1000},
        {"name": "b", "kind": "pruned (tfmot)", "accuracy": 85.0, "latency_ms": 3.0, "size_bytes": 500},
    ]
    path = hakd.plot_pareto(points, tmp_path / "pareto.png", latency_budget=2.0)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_recalibrate_batchnorm_sets_batch_statistics():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(inputs))
    x = np.random.default_rng(0).normal(3.0, 2.0, (500, 4)).astype("float32")
    hakd.recalibrate_batchnorm(model, x)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(0), rtol=1e-3)
    assert bn.momentum == 0.99
