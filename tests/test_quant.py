"""Quantizer numerics, policies, the quantize() transform and QKeras compatibility."""

import io
import json
import os
import warnings
from contextlib import redirect_stdout

import h5py
import numpy as np
import pytest
import qkeras  # after tfqkd (conftest), which selects Keras 2

import tfqkd
import tfqkd.io
from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.quant import (
    AffineQuantizer,
    LearnedStepQuantizer,
    Pof2Quantizer,
    QActivation,
    QuantPolicy,
    QuantSpec,
    custom_objects,
    layer_specs,
    quantize,
    resolve_policy,
)


def _bound(quantizer, shape=(4,)):
    """Gives a quantizer its state by building it inside a QActivation layer."""
    layer = QActivation(quantizer)
    layer.build((None, *shape))
    return quantizer


def _small_cnn():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(5, name="head_dense")(x)
    return keras.Model(inputs, outputs)


# Quantizer numerics -------------------------------------------------------------------------


@pytest.mark.parametrize("bits,limit", [(4, 16), (8, 256)])
def test_weight_tensor_holds_at_most_2_to_the_bits_values(bits, limit):
    values = np.random.default_rng(0).normal(size=4096).astype("float32")
    for quantizer in (
        _bound(LearnedStepQuantizer(bits, signed=True)),
        _bound(AffineQuantizer(bits, signed=True)),
    ):
        quantizer.initialize(values)
        out = quantizer(values).numpy()
        assert 2 < len(np.unique(out)) <= limit


def test_learned_step_hand_picked_values():
    q = _bound(LearnedStepQuantizer(4, signed=True))  # codes [-8, 7]
    q.assign_step(0.5)
    x = np.array([-10.0, -1.26, -0.24, 0.0, 0.26, 0.74, 1.25, 3.4, 99.0], "float32")
    # x/s = -20, -2.52, -0.48, 0, 0.52, 1.48, 2.5, 6.8, 198 -> round half even, clip [-8, 7]
    expected = np.array([-8, -3, 0, 0, 1, 1, 2, 7, 7], "float32") * 0.5
    np.testing.assert_array_equal(q(x).numpy(), expected)


def test_activations_are_unsigned_and_narrow_weights_symmetric():
    act = _bound(LearnedStepQuantizer(4, signed=False))
    act.assign_step(0.1)
    out = act(np.array([-3.0, -0.01, 0.3, 2.0], "float32")).numpy()
    np.testing.assert_allclose(out, [0.0, 0.0, 0.3, 1.5], rtol=1e-6)
    assert (act.qmin, act.qmax) == (0, 15)
    weight = LearnedStepQuantizer(4, signed=True, narrow_range=True)
    assert (weight.qmin, weight.qmax) == (-7, 7)
    thesis = AffineQuantizer(8, signed=True)
    assert (thesis.qmin, thesis.qmax) == (-128, 127)
    assert (AffineQuantizer(4, signed=False).qmin, AffineQuantizer(4, signed=False).qmax) == (0, 15)


def test_straight_through_gradient_inside_range_zero_outside():
    q = _bound(LearnedStepQuantizer(4, signed=False))
    q.assign_step(0.1)  # range [0, 1.5]
    x = tf.constant([-0.5, 0.05, 0.77, 1.4, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x)
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), [0, 1, 1, 1, 0])

    affine = AffineQuantizer(8, signed=True)
    w = tf.constant([-1.0, 0.2, 1.0])
    with tf.GradientTape() as tape:
        tape.watch(w)
        y = affine(w)
    np.testing.assert_array_equal(tape.gradient(y, w).numpy(), [1, 1, 1])


def _log_step_gradient(q, x):
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(q(tf.constant(x)))
    return tape.gradient(y, q.log_step).numpy()[0]


def test_learned_step_receives_lsq_gradient_in_log_space():
    q = _bound(LearnedStepQuantizer(4, signed=True, narrow_range=True), shape=(3,))
    q.assign_step(0.5)
    # x/s = 1.2, 1.8, -0.6: rounding errors -0.2, 0.2, -0.4. LSQ's d/ds, scaled by
    # 1/sqrt(N*Q_P), divided by s (the relative change of s that LSQ makes).
    expected = (-0.2 + 0.2 - 0.4) / np.sqrt(3 * 7) / 0.5
    grad = _log_step_gradient(q, [0.6, 0.9, -0.3])
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
    # Two codes clipped at Q_P: LSQ would grow s by (0.4 + 7 + 7) / sqrt(21) / 0.1 = 31x in
    # relative terms; the relative change is bounded by the tensor's, ||dL/dx_hat|| / ||x||.
    q.assign_step(0.1)
    x = [0.06, 10.0, 5.0]
    np.testing.assert_allclose(_log_step_gradient(q, x), np.sqrt(3) / np.linalg.norm(x), rtol=1e-5)


@pytest.mark.parametrize("signed,bits", [(False, 8), (True, 4)])
def test_fused_and_plain_learned_step_kernels_compute_the_same_bits(monkeypatch, signed, bits):
    """Activation-sized tensors take XLA-fused kernels, small ones plain ops: same output and gradients."""
    from tfqkd.quant import quantizers as Q

    rng = np.random.default_rng(7)
    x = tf.constant((rng.standard_normal((4, 9, 9, 8)) * 2 + (0 if signed else 1)).astype("float32"))
    upstream = tf.constant(rng.standard_normal(x.shape).astype("float32"))
    q = _bound(LearnedStepQuantizer(bits, signed=signed), shape=x.shape[1:])
    q.assign_step(3.0 / q.qmax)  # some values clip, most do not

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = q(x)
        return [y.numpy(), *(g.numpy() for g in tape.gradient(y, [x, q.log_step], output_gradients=upstream))]

    results = {}
    for threshold, path in [(0, "fused"), (10**9, "plain")]:
        monkeypatch.setattr(Q, "_FUSE_MIN_ELEMENTS", threshold)
        results[path] = run()
    for fused, plain in zip(results["fused"], results["plain"]):
        np.testing.assert_array_equal(fused, plain)
    # and they are what the formula says
    step = q.step.numpy()[0]
    codes = np.clip(np.round(x.numpy() / step), q.qmin, q.qmax)
    np.testing.assert_array_equal(results["fused"][0], (codes * step).astype("float32"))
    inside = (x.numpy() / step >= q.qmin) & (x.numpy() / step <= q.qmax)
    assert 0 < inside.mean() < 1
    np.testing.assert_array_equal(results["fused"][1], upstream.numpy() * inside)


@pytest.mark.parametrize(
    "make", [lambda: AffineQuantizer(8, signed=False, running=True), lambda: AffineQuantizer(4, signed=True),
             lambda: Pof2Quantizer(8, rounding="half_up", running=True), lambda: Pof2Quantizer(8)],
    ids=["affine_running", "affine_weights", "pof2_half_up", "pof2_even"],
)  # fmt: skip
def test_fused_and_plain_affine_and_pof2_kernels_compute_the_same_bits(monkeypatch, make):
    from tfqkd.quant import quantizers as Q

    rng = np.random.default_rng(8)
    x = tf.constant((rng.standard_normal((4, 9, 9, 8)) * 2).astype("float32"))
    upstream = tf.constant(rng.standard_normal(x.shape).astype("float32"))
    q = _bound(make(), shape=x.shape[1:])
    q.initialize(x.numpy() * 0.6)  # running ranges narrower than x: some values clip

    def run():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = q(x)
        return [y.numpy(), tape.gradient(y, x, output_gradients=upstream).numpy()]

    results = {}
    for threshold, path in [(0, "fused"), (10**9, "plain")]:
        monkeypatch.setattr(Q, "_FUSE_MIN_ELEMENTS", threshold)
        results[path] = run()
    # the reference: TensorFlow's autodiff of the plain forward
    monkeypatch.setattr(Q, "_affine_straight_through", Q._affine_fake_quant)
    monkeypatch.setattr(Q, "_pof2_straight_through", lambda *a: Q._pof2_fake_quant(*a[:5], bool(a[5].numpy())))
    results["autodiff"] = run()
    for path in ("fused", "plain"):
        np.testing.assert_array_equal(results[path][0], results["autodiff"][0])
        np.testing.assert_array_equal(results[path][1], results["autodiff"][1])
    assert 0 < np.mean(results["fused"][1] == 0) < 0.9 or not q.running  # clipped values get no gradient
    assert len(np.unique(results["fused"][0])) <= 2**q.bits


def _needs_a_compiler():
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler: the fused kernels cannot be built here")


@pytest.mark.parametrize("signed,bits,step_range", [(False, 8, 3.0), (True, 4, 3.0), (False, 4, 0.5)])
def test_fused_training_kernels_compute_what_tensorflow_ops_compute(signed, bits, step_range):
    """In training, activation-sized tensors take the compiled kernels: same output and input gradient bits,
    the same step gradient up to summation order, and the formula's values; in inference, TensorFlow's ops."""
    from tfqkd.quant import kernels

    _needs_a_compiler()
    assert kernels.fake_quant_ops() is not None
    rng = np.random.default_rng(3)
    x = tf.constant((rng.standard_normal((4, 16, 16, 80)) * 2 + (0 if signed else 1)).astype("float32"))
    upstream = tf.constant(rng.standard_normal(x.shape).astype("float32"))
    q = _bound(LearnedStepQuantizer(bits, signed=signed), shape=x.shape[1:])
    q.assign_step(step_range / q.qmax)  # 0.5: most values clip, so the step gradient hits its bound

    def run(training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = q(x, training=training)
        return [y.numpy(), *(g.numpy() for g in tape.gradient(y, [x, q.log_step], output_gradients=upstream))]

    fused, stock = run(True), run(False)
    np.testing.assert_array_equal(fused[0], stock[0])
    np.testing.assert_array_equal(fused[1], stock[1])
    np.testing.assert_allclose(fused[2], stock[2], rtol=1e-5)
    step = q.step.numpy()[0]
    scaled = x.numpy().astype("float64") / step
    inside = (scaled >= q.qmin) & (scaled <= q.qmax)
    assert 0 < inside.mean() < 1
    np.testing.assert_array_equal(fused[0], (np.clip(np.round(x.numpy() / step), q.qmin, q.qmax) * step).astype("float32"))
    # LSQ's step gradient in log space (float64 reference), within its bound ||u|| / ||x||
    u = upstream.numpy().astype("float64")
    terms = np.where(inside, np.round(np.clip(scaled, q.qmin, q.qmax)) - scaled, np.clip(scaled, q.qmin, q.qmax))
    relative = np.sum(u * terms) / np.sqrt(np.prod(x.shape[1:]) * q.qmax) / step
    bound = np.linalg.norm(u) / np.linalg.norm(x.numpy().astype("float64"))
    np.testing.assert_allclose(fused[2][0], np.clip(relative, -bound, bound), rtol=1e-5)
    # Which graph each mode builds: the TFLite converter and SavedModels read the inference one.
    ops = {mode: {op.type for op in tf.function(lambda t, m=mode: q(t, training=m)).get_concrete_function(x).graph.get_operations()}
           for mode in (True, False)}  # fmt: skip
    assert "TfqkdLearnedStepFakeQuant" in ops[True]
    assert not any(op.startswith("Tfqkd") for op in ops[False])


@pytest.mark.parametrize(
    "make", [lambda: AffineQuantizer(8, signed=False, running=True), lambda: AffineQuantizer(4, signed=True),
             lambda: Pof2Quantizer(8, rounding="half_up", running=True), lambda: Pof2Quantizer(8),
             lambda: tfqkd.dpu.DPUQuantizer(rounding="half_up")],
    ids=["affine_running", "affine_weights", "pof2_half_up", "pof2_even", "dpu"],
)  # fmt: skip
def test_fused_training_kernels_of_the_fixed_scale_schemes_compute_the_same_bits(make):
    """Affine, power-of-two and DPU quantizers in a training step: the compiled kernels (one pass for the
    running min/max too) give the output, input gradient and updated statistics of TensorFlow's ops, bit for bit."""
    from tfqkd.quant import kernels

    _needs_a_compiler()
    rng = np.random.default_rng(9)
    x = tf.constant((rng.standard_normal((4, 16, 16, 80)) * 2).astype("float32"))
    x = tf.tensor_scatter_nd_update(x, [[0, 0, 0, 0], [1, 0, 0, 0]], [24.5 / 32, -8.5 / 32])  # exact ties at step 2**-5
    upstream = tf.constant(rng.standard_normal(x.shape).astype("float32"))
    q = _bound(make(), shape=x.shape[1:])
    q.initialize(x.numpy() * 0.6)  # running ranges narrower than x: some values clip
    if isinstance(q, tfqkd.dpu.DPUQuantizer):
        q.pos.assign([5.0])  # a step of 1/32 (the ties above round half up), a range of +-4: some values clip
    initial = [v.numpy() for v in q.state_variables()]

    def train_step():
        for variable, value in zip(q.state_variables(), initial):
            variable.assign(value)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = q(x, training=True)
        graph_ops = {op.type for op in tf.function(lambda t: q(t, training=True)).get_concrete_function(x).graph.get_operations()}
        state = [v.numpy() for v in q.state_variables()]
        return [y.numpy(), tape.gradient(y, x, output_gradients=upstream).numpy(), *state], graph_ops

    fused, fused_ops = train_step()
    with kernels.tensorflow_ops_only():
        stock, stock_ops = train_step()
    assert any(op.startswith("Tfqkd") for op in fused_ops) and not any(op.startswith("Tfqkd") for op in stock_ops)
    for a, b in zip(fused, stock):
        np.testing.assert_array_equal(a, b)
    if getattr(q, "running", True):  # (a range from the tensor itself clips nothing)
        assert 0 < np.mean(fused[1] == 0) < 0.9  # clipped values get no gradient
    if getattr(q, "running", False):
        assert not np.array_equal(fused[2], initial[0])  # the statistics moved


def test_without_a_compiler_training_warns_once_and_uses_tensorflow_ops(monkeypatch, tmp_path):
    from tfqkd.quant import kernels

    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("TFQKD_KERNEL_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler \\(no-such-compiler-xyz\\)"):
        assert kernels.fake_quant_ops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.fake_quant_ops() is None  # once per process
        q = _bound(LearnedStepQuantizer(8, signed=False), shape=(64, 64, 4))
        x = tf.random.uniform((2, 64, 64, 4))
        np.testing.assert_array_equal(q(x, training=True).numpy(), q(x, training=False).numpy())
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("TFQKD_FUSED_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.fake_quant_ops() is None  # turned off: no warning


def test_a_kernel_that_does_not_compile_is_reported_with_the_compiler_error(monkeypatch, tmp_path):
    from tfqkd.quant import kernels

    _needs_a_compiler()
    broken = tmp_path / "fake_quant.cc"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_SOURCE", broken)
    monkeypatch.setenv("TFQKD_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="the build failed: .*error"):
        assert kernels.fake_quant_ops() is None
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind


def test_a_damaged_cached_kernel_is_rebuilt(tmp_path):
    """A cached library that does not load (a damaged file) is compiled afresh, not reported as missing."""
    import subprocess
    import sys

    _needs_a_compiler()
    script = (
        "import shutil, warnings\n"
        "from tfqkd.quant import kernels\n"
        "warnings.simplefilter('error', RuntimeWarning)  # the kernel-unavailable warning fails the run\n"
        "path = kernels._build(shutil.which('g++'))\n"
        "path.write_bytes(b'not a shared library')\n"
        "ops = kernels.fake_quant_ops()\n"
        "print('loaded', hasattr(ops, 'tfqkd_learned_step_fake_quant'), path.stat().st_size > 1000)\n"
    )
    env = {**os.environ, "TFQKD_KERNEL_CACHE": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded True True" in result.stdout


def test_learned_step_stays_positive_after_a_huge_update():
    """A step driven towards zero by a huge update stays positive, and the model still trains."""
    rng = np.random.default_rng(4)
    labels = np.arange(96) % 3
    data = rng.random((96, 8, 8, 3)).astype("float32")
    data[np.arange(96), :, :, labels] += 0.5  # the class is the brightest channel
    keras.utils.set_random_seed(0)
    qmodel = quantize(_small_cnn(), "w8a8", data)
    quantizers = [q for _, _, q in tfqkd.quant.model_quantizers(qmodel)]
    initial = np.array([q.step.numpy()[0] for q in quantizers])
    # One Adam update of learning rate 0.5 against the steps: as linear steps of 1e-3 to 1e-2
    # they would all be negative now (the dead w8a8 runs); as log-steps they shrink by e**-0.5.
    keras.optimizers.Adam(0.5).apply_gradients([(tf.ones((1,)), q.log_step) for q in quantizers])
    steps = np.array([q.step.numpy()[0] for q in quantizers])
    np.testing.assert_allclose(steps, initial * np.exp(-0.5), rtol=1e-3)
    qmodel.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = qmodel.fit(data, labels, epochs=15, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < 0.6 * history[0]
    assert all(q.step.numpy()[0] > 0 for q in quantizers)
    # A gradient of 1e9 in one SGD update (a linear step would land near -1e9): the step
    # stops a factor STEP_BAND below its initial value, positive and finite.
    keras.optimizers.SGD(1.0).apply_gradients([(tf.fill((1,), 1e9), q.log_step) for q in quantizers])
    steps = np.array([q.step.numpy()[0] for q in quantizers])
    np.testing.assert_allclose(steps, initial / tfqkd.quant.quantizers.STEP_BAND, rtol=1e-4)
    after = qmodel.fit(data, labels, epochs=3, batch_size=16, verbose=0).history["loss"]
    assert np.all(np.isfinite(after))


def test_affine_scale_and_zero_point_match_thesis_formula():
    q = AffineQuantizer(8, signed=False)
    scale, zero_point = q.scale_and_zero_point(tf.constant(-1.0), tf.constant(3.0))
    # s = (beta - alpha) / (b_q - a_q) = 4 / 255; z = round((beta*a_q - alpha*b_q)/(beta - alpha)) = round(255/4)
    np.testing.assert_allclose(scale.numpy(), 4 / 255, rtol=1e-6)
    assert zero_point.numpy() == round(255 / 4)


def test_affine_running_minmax_updates_only_in_training():
    q = _bound(AffineQuantizer(8, signed=False, running=True))
    q.initialize(np.array([0.0, 1.0]))
    q(tf.constant([0.0, 5.0]), training=False)
    assert q.variable("max").numpy()[0] == pytest.approx(1.0)
    q(tf.constant([0.0, 5.0]), training=True)
    assert q.variable("max").numpy()[0] == pytest.approx(1.0 + 0.01 * 4.0)


def test_dpu_rounding_weights_half_even_activations_half_up():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5], "float32") / 4  # at pos 2 these are exact halves
    weights = Pof2Quantizer(8, rounding="even")
    acts = _bound(Pof2Quantizer(8, rounding="half_up", running=True), shape=(5,))
    acts.variable("absmax").assign([31.0])  # pos = floor(log2(127/31)) = 2
    weights_out = weights(tf.constant(np.append(x, 31.0).astype("float32"))).numpy()[:5] * 4
    np.testing.assert_array_equal(weights_out, [0, 2, 2, -0, -2])
    np.testing.assert_array_equal(acts(x).numpy() * 4, [1, 2, 3, 0, -1])


def test_dpu_position_is_power_of_two_scale():
    q = Pof2Quantizer(8)
    assert q.position_for(1.0).numpy() == 6  # 1 * 2**6 = 64 <= 127 < 128
    assert q.position_for(0.2).numpy() == 9


# Policies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, "8"])
def test_bits_out_of_range_rejected(bits):
    with pytest.raises(TfqkdError, match="bits"):
        QuantSpec(weight_bits=bits)
    with pytest.raises(TfqkdError, match="bits"):
        QuantPolicy.from_dict({"default": {"activation_bits": bits}})


@pytest.mark.parametrize(
    "data,match",
    [
        ([1, 2], "mapping"),
        ({"defualt": {}}, "unknown key"),
        ({"default": {"weight_bit": 4}}, "unknown key"),
        ({"rules": [{"weight_bits": 4}]}, "match"),
        ({"rules": [{"match": "re:(", "weight_bits": 4}]}, "regex"),
        ({"rules": [{"layer_type": "BatchNormalization"}]}, "not quantizable"),
        ({"default": {"scheme": "fancy"}}, "unknown quantizer scheme 'fancy'"),
        ({"default": {"kind": "fancy"}}, "unknown quantizer scheme 'fancy'"),  # the key's old name
        ({"rules": "conv*"}, "list"),
    ],
)
def test_malformed_policy_names_the_problem(data, match):
    with pytest.raises(TfqkdError, match=match):
        QuantPolicy.from_dict(data)


def test_policy_keys_of_the_old_vocabulary_still_read():
    """``kind`` / ``activation_kind`` (tfqkd 0.2) are ``scheme`` / ``activation_scheme``: old YAML keeps working."""
    old = QuantPolicy.from_dict({
        "default": {"weight_bits": 4, "activation_bits": 4, "kind": "affine"},
        "rules": [{"match": "head*", "activation_kind": "lsq_pof2"}],
    })  # fmt: skip
    new = QuantPolicy.from_dict({
        "default": {"weight_bits": 4, "activation_bits": 4, "scheme": "affine"},
        "rules": [{"match": "head*", "activation_scheme": "lsq_pof2"}],
    })  # fmt: skip
    assert old == new
    assert new.default.scheme == "affine" and new.to_dict()["default"]["scheme"] == "affine"
    assert "kind" not in new.to_dict()["default"]


def test_uniform_learned_step_policies_by_name():
    for name, bits in (("w3a3", (3, 3)), ("w2a2", (2, 2)), ("w8a4", (8, 4))):
        spec = resolve_policy(name).default
        assert (spec.weight_bits, spec.activation_bits, spec.scheme) == (*bits, "lsq")
    with pytest.raises(TfqkdError, match="activation_bits must be an integer in"):
        resolve_policy("w4a17")


def test_policy_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("default: {weight_bits: 4\n")
    with pytest.raises(TfqkdError, match="not valid YAML"):
        resolve_policy(str(bad))
    with pytest.raises(TfqkdError, match="not found"):
        resolve_policy(str(tmp_path / "missing.yaml"))
    with pytest.raises(TfqkdError, match="unknown quantization policy"):
        resolve_policy("w3b3")


def test_policy_rules_glob_regex_type_and_first_last():
    policy = QuantPolicy.from_dict(
        {
            "default": {"weight_bits": 4, "activation_bits": 4},
            "first_last_bits": 8,
            "rules": [{"match": "re:d.", "weight_bits": 2}, {"layer_type": "Dense", "weight_bits": 6}],
        }
    )
    layers = [("stem_conv", "Conv2D"), ("bn", "BatchNormalization"), ("dw", "DepthwiseConv2D"), ("dx", "Dense")]
    specs = policy.resolve(layers + [("head_dense", "Dense")])
    assert specs["stem_conv"] == QuantSpec(8, 8)
    assert specs["dw"].weight_bits == 2 and specs["dw"].activation_bits == 4
    assert specs["dx"].weight_bits == 2  # first matching rule wins
    assert specs["head_dense"] == QuantSpec(8, 8)  # last layer, the Dense rule then first/last override
    assert "bn" not in specs


def test_unmatched_rule_warns():
    policy = QuantPolicy.from_dict({"rules": [{"match": "nothing_*", "weight_bits": 4}]})
    with pytest.warns(UserWarning, match="matches no layer"):
        policy.resolve([("conv", "Conv2D")])


def test_policy_yaml_round_trip(tmp_path):
    policy = resolve_policy("w4a8")
    path = tmp_path / "p.yaml"
    policy.to_yaml(path)
    assert resolve_policy(str(path)).default == policy.default


# quantize() ---------------------------------------------------------------------------------


def test_quantize_carries_float_weights_and_inits_intervals():
    model = _small_cnn()
    data = np.random.default_rng(1).random((32, 8, 8, 3)).astype("float32")
    qmodel = quantize(model, "w8a8", data)
    np.testing.assert_array_equal(qmodel.get_layer("stem_conv").kernel.numpy(), model.get_layer("stem_conv").kernel.numpy())
    step = qmodel.get_layer("stem_conv").kernel_quantizer_internal.step.numpy()[0]
    assert step == pytest.approx(np.abs(model.get_layer("stem_conv").kernel.numpy()).max() / 127, rel=1e-6)
    # Input interval from the min-max of one batch; the image input in [0, 1] is unsigned.
    qin = qmodel.get_layer("stem_conv_qin").quantizer
    assert not qin.signed
    assert qin.step.numpy()[0] == pytest.approx(data.max() / 255, rel=1e-5)
    # 8-bit fake quantization stays close to the float model.
    ref, out = model(data).numpy(), qmodel(data).numpy()
    assert np.abs(ref - out).max() < 0.05 * np.abs(ref).max() + 1e-3
    assert all(type(qmodel.get_layer(n)).__name__.startswith("Q") for n in ("stem_conv", "dw", "head_dense"))
    assert isinstance(qmodel.get_layer("stem_conv"), qkeras.QConv2D)


def test_quantize_without_data_uses_structure_for_sign():
    qmodel = quantize(_small_cnn(), "w4a4")
    assert qmodel.get_layer("stem_conv_qin").quantizer.signed  # raw input: unknown sign
    assert not qmodel.get_layer("dw_qin").quantizer.signed  # after ReLU
    assert not qmodel.get_layer("head_dense_qin").quantizer.signed  # ReLU -> GAP


def test_fp32_policy_is_identity_copy():
    model = _small_cnn()
    copy = quantize(model, "fp32")
    data = np.ones((2, 8, 8, 3), "float32")
    np.testing.assert_array_equal(copy(data).numpy(), model(data).numpy())
    assert not tfqkd.quant.is_quantized(copy)


def test_quantized_model_saves_and_loads(tmp_path):
    data = np.random.default_rng(2).random((8, 8, 8, 3)).astype("float32")
    qmodel = quantize(_small_cnn(), "w4a4", data)
    qmodel.get_layer("dw").depthwise_quantizer_internal.assign_step(0.0123)
    expected = qmodel(data).numpy()
    for name in ("m.h5", "m.keras"):
        qmodel.save(tmp_path / name)
        loaded = keras.models.load_model(tmp_path / name, custom_objects=custom_objects(), compile=False)
        np.testing.assert_array_equal(loaded(data).numpy(), expected)
        assert loaded.get_layer("dw").depthwise_quantizer_internal.step.numpy()[0] == pytest.approx(0.0123)
        assert layer_specs(loaded) == layer_specs(qmodel)
    config = json.loads(json.dumps(qmodel.get_config()))
    clone = keras.Model.from_config(config, custom_objects=custom_objects())
    clone.set_weights(qmodel.get_weights())
    np.testing.assert_array_equal(clone(data).numpy(), expected)


def test_layers_reading_one_tensor_share_its_input_quantizer(tmp_path):
    """ResNet's shortcut and first conv read one tensor: with the same spec they share one quantizer (one grid
    per tensor, as an int8 runtime keeps, and one pass in training); with different specs each has its own."""
    float_model = tfqkd.create_model("resnet8", num_classes=10)
    x = np.random.default_rng(0).random((16, 32, 32, 3)).astype("float32")
    model = quantize(float_model, "w8a8", x)
    qins = [layer for layer in model.layers if isinstance(layer, QActivation)]
    assert len(qins) == 8  # 10 quantized layers, two pairs reading one tensor
    for conv, shortcut in (("stack2_conv1", "stack2_shortcut_conv"), ("stack3_conv1", "stack3_shortcut_conv")):
        assert tfqkd.quant.layers.input_quantizer_of(model.get_layer(shortcut)).name == conv + "_qin"
        assert layer_specs(model)[shortcut].activation_bits == 8  # read back through the shared quantizer
    path = tmp_path / "resnet8.keras"
    model.save(path)
    np.testing.assert_array_equal(tfqkd.load_model(path)(x[:4]), model(x[:4]))
    policy = {"default": {"weight_bits": 8, "activation_bits": 8}, "rules": [{"match": "*shortcut*", "activation_bits": 4}]}
    mixed = quantize(float_model, policy, x)
    assert len([layer for layer in mixed.layers if isinstance(layer, QActivation)]) == 10
    assert layer_specs(mixed)["stack2_shortcut_conv"].activation_bits == 4
    assert layer_specs(mixed)["stack2_conv1"].activation_bits == 8


def test_policy_serializes_with_model():
    qmodel = quantize(_small_cnn(), {"default": {"weight_bits": 4, "activation_bits": 4}, "first_last_bits": 8})
    policy = QuantPolicy.from_model(qmodel)
    specs = policy.resolve([(layer.name, "Conv2D") for layer in qmodel.layers if layer.name in layer_specs(qmodel)])
    assert specs["stem_conv"].weight_bits == 8 and specs["dw"].weight_bits == 4 and specs["head_dense"].weight_bits == 8


def test_print_qstats_shows_mixed_policy_bits():
    qmodel = quantize(_small_cnn(), {"default": {"weight_bits": 4, "activation_bits": 4}, "first_last_bits": 8})
    buffer = io.StringIO()
    with redirect_stdout(buffer), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qkeras.print_qstats(qmodel)
    text = buffer.getvalue()
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if "-bit unit" in line}
    assert "(8-bit unit)" in lines["stem_conv_weights"]
    assert "(4-bit unit)" in lines["dw_weights"]
    assert "(8-bit unit)" in lines["head_dense_weights"]
    assert "smult_8_8" in text and "smult_4_4" in text


def test_quantized_layers_train_steps():
    data = np.random.default_rng(3).random((16, 8, 8, 3)).astype("float32")
    labels = np.arange(16) % 5
    qmodel = quantize(_small_cnn(), "w4a4", data)
    before = qmodel.get_layer("dw_qin").quantizer.step.numpy().copy()
    qmodel.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qmodel.fit(data, labels, epochs=2, batch_size=8, verbose=0)
    assert qmodel.get_layer("dw_qin").quantizer.step.numpy()[0] != before[0]


def test_policy_flag_turns_on_integer_intermediates():
    policy = QuantPolicy.from_dict({"default": {"weight_bits": 4, "activation_bits": 4}, "integer_intermediates": True})
    assert QuantPolicy.from_dict(policy.to_dict()).integer_intermediates
    qmodel = quantize(_small_cnn(), policy)
    # The stem conv's output feeds a BN and relu2's feeds the global pool: int8 tensors in TFLite.
    assert [layer.name for layer in qmodel.layers if layer.name.endswith("_q8")] == ["stem_conv_q8", "relu2_q8"]
    plain = quantize(_small_cnn(), "w4a4")
    assert not any(layer.name.endswith("_q8") for layer in plain.layers)
    with pytest.raises(TfqkdError, match="integer_intermediates"):
        QuantPolicy.from_dict({"integer_intermediates": "yes"})


def test_the_dpu_is_a_target_chosen_by_name_not_by_equal_specs(tmp_path):
    """Issue 15: ``target: dpu`` (or the ``dpu`` preset) builds the DPU model; a policy that only
    has the DPU's specs builds the generic power-of-two twin, and says so."""
    from tfqkd.dpu import is_dpu_model

    data = np.random.default_rng(3).random((8, 8, 8, 3)).astype("float32")
    preset = resolve_policy("dpu")
    assert preset.target == "dpu" and "dpu" in tfqkd.quant.list_presets()
    assert is_dpu_model(quantize(_small_cnn(), "dpu", data))

    named = tmp_path / "board.yaml"
    named.write_text("target: dpu\n")  # another name, the target chosen explicitly
    policy = resolve_policy(str(named))
    assert (policy.name, policy.target, policy.default) == ("board", "dpu", preset.default)
    assert QuantPolicy.from_dict(policy.to_dict()) == policy
    assert is_dpu_model(quantize(_small_cnn(), str(named), data))

    lookalike = tmp_path / "my_pof2.yaml"
    lookalike.write_text("default: {weight_bits: 8, activation_bits: 8, kind: pof2}\n")
    assert resolve_policy(str(lookalike)).default == preset.default
    with pytest.warns(UserWarning, match="target: dpu"):
        generic = quantize(_small_cnn(), str(lookalike), data)
    assert not is_dpu_model(generic)
    assert isinstance(generic.get_layer("stem_conv").kernel_quantizer_internal, Pof2Quantizer)
    assert "bn" in {layer.name for layer in generic.layers}  # not folded: the generic twin

    for bad, match in (
        ({"target": "dpu", "rules": [{"match": "stem*", "bias_bits": 8}]}, "remove rules"),
        ({"target": "dpu", "first_last_bits": 8}, "remove first_last_bits"),
        ({"target": "dpu", "default": {"weight_bits": 4, "activation_bits": 4}}, "leave 'default' out"),
        ({"target": "tpu"}, "unknown quantization target 'tpu'; known: dpu"),
    ):
        with pytest.raises(TfqkdError, match=match):
            QuantPolicy.from_dict(bad)
    with pytest.raises(TfqkdError, match="leave 'default' out"):
        quantize(_small_cnn(), QuantPolicy(QuantSpec(4, 4), name="odd", target="dpu"))


def _make_legacy_h5(path, qmodel, step_of=lambda step: step):
    """Rewrites a saved .h5 as tfqkd 0.1 wrote it: no 'parametrization' key, the step itself stored."""
    qmodel.save(path)
    with h5py.File(path, "r+") as handle:
        config = handle.attrs["model_config"]
        config = json.loads(config.decode() if isinstance(config, bytes) else config)

        def strip(node):
            if isinstance(node, dict):
                node.pop("parametrization", None)
                for child in node.values():
                    strip(child)
            elif isinstance(node, list):
                for child in node:
                    strip(child)

        strip(config)
        handle.attrs["model_config"] = json.dumps(config)
        weights = handle["model_weights"]
        names = []
        weights.visit(names.append)
        for name in names:
            if name.endswith("_log_step:0"):
                weights[name][...] = step_of(np.exp(weights[name][...]))


def test_files_of_tfqkd_0_1_with_linear_steps_load_converted(tmp_path):
    data = np.random.default_rng(2).random((8, 8, 8, 3)).astype("float32")
    qmodel = quantize(_small_cnn(), "w4a4", data)
    expected = qmodel(data).numpy()
    legacy = tmp_path / "legacy.h5"
    _make_legacy_h5(legacy, qmodel)
    np.testing.assert_allclose(tfqkd.load_model(legacy)(data).numpy(), expected, rtol=1e-5, atol=1e-6)
    # Keras' own loader gives the model as tfqkd 0.1 computed it.
    raw = keras.models.load_model(legacy, custom_objects=custom_objects(), compile=False)
    np.testing.assert_allclose(raw(data).numpy(), expected, rtol=1e-5, atol=1e-6)
    # A run that died in tfqkd 0.1 (a negative step) fails in one line naming the layer.
    _make_legacy_h5(legacy, qmodel, step_of=lambda step: -step)
    with pytest.raises(TfqkdError, match=r"layer '\w+' of .*legacy.h5 has a learned step of -[0-9.e-]+: .*train it again"):
        tfqkd.load_model(legacy)


def test_saving_a_quantized_model_warns_nothing_about_serialization(tmp_path):
    data = np.random.default_rng(2).random((8, 8, 8, 3)).astype("float32")
    qmodel = quantize(_small_cnn(), {"default": {"weight_bits": 4, "activation_bits": 4, "bias_bits": 8}}, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("m.h5", "m.keras"):
            qmodel.save(tmp_path / name)
        config = qmodel.get_config()
    assert not [w for w in caught if "serialize" in str(w.message)], [str(w.message)[:100] for w in caught]
    layer = next(entry for entry in config["layers"] if entry["name"] == "dw")["config"]
    assert layer["depthwise_quantizer"]["registered_name"] == "tfqkd>LearnedStepQuantizer"
    assert layer["bias_quantizer"]["config"]["bits"] == 8
    for name in ("m.h5", "m.keras"):
        np.testing.assert_array_equal(tfqkd.load_model(tmp_path / name)(data).numpy(), qmodel(data).numpy())


def test_every_quantizer_states_the_grid_its_outputs_lie_on():
    """The quantizer contract: exporters read grid(), never the quantizer's class."""
    from tfqkd.dpu import DPUQuantizer
    from tfqkd.quant.grid import Grid

    rng = np.random.default_rng(7)
    x = (rng.standard_normal(64) * 0.7).astype("float32")
    cases = [
        (LearnedStepQuantizer(4, signed=True, narrow_range=True), True),
        (LearnedStepQuantizer(3, signed=False), True),
        (AffineQuantizer(8, signed=True), False),  # weights: the scale follows the tensor
        (AffineQuantizer(4, signed=False, running=True), True),
        (tfqkd.quant.Pof2Quantizer(8, rounding="even"), False),
        (tfqkd.quant.Pof2Quantizer(8, rounding="half_up", running=True), True),
        (DPUQuantizer(rounding="half_up"), True),
    ]
    for quantizer, stored in cases:
        _bound(quantizer, shape=x.shape)
        quantizer.initialize(x)
        out = quantizer(tf.constant(x), training=False).numpy().astype(np.float64)
        grid = quantizer.grid(None if stored else x)
        assert isinstance(grid, Grid)
        codes = out / grid.scale + grid.zero
        np.testing.assert_allclose(codes, np.rint(codes), atol=1e-3, err_msg=repr(quantizer))
        assert codes.min() >= grid.qmin - 1e-3 and codes.max() <= grid.qmax + 1e-3, repr(grid)
        assert len(quantizer.state_variables()) == len(quantizer.variable_specs())
    assert DPUQuantizer(rounding="half_up").grid is not None
    with pytest.raises(TfqkdError, match="data-dependent scale"):
        _bound(AffineQuantizer(8)).grid()


def test_one_list_of_quantizer_state_for_decay_and_parameter_counts():
    from tfqkd.export.size import count_parameters
    from tfqkd.quant.quantizers import quantizer_state_suffixes
    from tfqkd.recipes import runner

    suffixes = quantizer_state_suffixes()
    assert {"_log_step", "_min", "_max", "_absmax", "_pos"} <= set(suffixes)
    assert runner._NO_DECAY == suffixes
    float_model = _small_cnn()
    qmodel = quantize(float_model, "w4a4", np.random.default_rng(0).random((4, 8, 8, 3)).astype("float32"))
    assert count_parameters(qmodel) == count_parameters(float_model)
    assert tfqkd.export.Grid is tfqkd.quant.grid.Grid


def test_a_quantizer_rebuilt_from_its_config_computes_what_its_layer_computes():
    """QKeras' tools and hls4ml rebuild a layer's quantizer from its config and call it on their own."""
    from tfqkd.dpu import DPUQuantizer

    data = np.random.default_rng(5).random((8, 8, 8, 3)).astype("float32")
    qmodel = quantize(_small_cnn(), "w4a4", data)
    qmodel.get_layer("dw").depthwise_quantizer_internal.assign_step(0.0123)
    x = tf.constant(np.random.default_rng(6).standard_normal((3, 3, 8, 1)).astype("float32"))
    for layer, role, quantizer in tfqkd.quant.model_quantizers(qmodel):
        rebuilt = tfqkd.quant.quantizers.get_quantizer(keras.utils.serialize_keras_object(quantizer))
        np.testing.assert_array_equal(rebuilt(x).numpy(), quantizer(x, training=False).numpy(), err_msg=layer.name)
    for quantizer in (AffineQuantizer(4, signed=False, running=True), DPUQuantizer(rounding="half_up")):
        _bound(quantizer)
        quantizer.initialize(np.array([0.0, 0.37, 2.9], "float32"))
        rebuilt = tfqkd.quant.quantizers.get_quantizer(keras.utils.serialize_keras_object(quantizer))
        np.testing.assert_array_equal(rebuilt(x).numpy(), quantizer(x, training=False).numpy())
    with pytest.raises(TfqkdError, match="has no state"):
        LearnedStepQuantizer(4)(x)  # never bound nor saved: no trained state to use


@pytest.mark.parametrize("name", ["kl_mlp_student", "resnet8", "densenet21"])
def test_quantizing_adds_no_parameters_by_either_count(name):
    """models.count_params and export.count_parameters agree: quantizer state is not a parameter."""
    from tfqkd.export import count_parameters
    from tfqkd.models import count_params

    float_model = tfqkd.create_model(name, num_classes=10)
    quantized = quantize(float_model, "w4a4")
    state = sum(len(q.state_variables()) for _, _, q in tfqkd.quant.model_quantizers(quantized))
    assert count_params(quantized) == count_params(float_model) + state  # every weight, steps included
    assert count_parameters(quantized) == count_parameters(float_model) == count_params(float_model)
    assert count_params(quantized, exclude_suffixes=tfqkd.quant.quantizers.quantizer_state_suffixes()) == count_params(float_model)


def _odd_over_power_of_two(ratio):
    """``(k, j)`` with ``ratio == k / 2**j``, ``k`` odd (to float32 precision), or None."""
    for j in range(24):
        k = ratio * 2**j
        if abs(k - round(k)) < 1e-4 * k and round(k) % 2 == 1:
            return round(k), j
    return None


@pytest.mark.parametrize("min_odd, round_down", [(8, False), (1024, False), (1024, True)])
def test_odd_ratio_is_an_odd_number_over_a_power_of_two_near_the_ratio(min_odd, round_down):
    from tfqkd.quant.quantizers import odd_ratio

    rng = np.random.default_rng(3)
    log_ratio = rng.uniform(-4, 9, 2000).astype("float32")  # ratios 0.02 to 8000
    snapped = odd_ratio(tf.constant(log_ratio), min_odd, round_down).numpy().astype(np.float64)
    found = [_odd_over_power_of_two(r) for r in np.exp(snapped)]
    assert all(f is not None for f in found)
    k, j = np.array(found).T
    assert np.all(k >= min_odd - 1) and np.all((j == 0) | (k <= 2 * min_odd + 1))
    moved = np.exp(snapped - log_ratio) - 1
    assert np.max(np.abs(moved)) <= (2 if round_down else 1) / min_odd + 1e-6
    if round_down:
        assert np.all(moved <= 3e-6)
    again = odd_ratio(tf.constant(snapped.astype("float32")), min_odd, round_down).numpy()
    np.testing.assert_allclose(again, snapped, atol=1e-6)  # a snapped ratio stays


def test_integer_intermediate_convs_round_no_sum_near_a_threshold(tmp_path):
    """``integer_intermediates``: each conv's learned kernel step keeps ``area * s_out / (s_in * s_w)``
    an odd number over a power of two (``odd_ratio``), so no integer sum is within float noise of a
    rounding threshold of the grid it is rounded onto (directly, through a concat or an average pool)."""
    from test_export_tflite import _small_densenet

    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 64)
    model = quantize(_small_densenet(), "w4a4", x[:32], integer_intermediates=True)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # steps move; the relation holds

    def steps_of(m):
        def step(name):
            return float(m.get_layer(name).quantizer.step.numpy()[0])

        out = {}
        for name, source, target, area in (("stem_conv", "stem_conv_qin", "stem_conv_q8", 1),
                                           ("l1_conv1", "l1_conv1_qin", "l1_conv1_q8", 1),
                                           ("l1_conv2", "l1_conv2_qin", "l1_concat_q8", 1),
                                           ("t_conv", "t_conv_qin", "t_pool_q8", 4)):  # fmt: skip
            s_w = float(m.get_layer(name).kernel_quantizer_internal.step.numpy()[0])
            out[name] = (area * step(target) / (step(source) * s_w), step(source), s_w, step(target))
        return out

    steps = steps_of(model)
    for name, (ratio, *_) in steps.items():
        assert _odd_over_power_of_two(ratio) is not None, (name, ratio)
    # A concat's grid and the other learned grid it requantizes, and each BN: one input code is
    # 2**j / k output steps, k odd. With a file multiplier >= 0.5 (one rounding), k >= 1024; below,
    # 2**j <= 32, which keeps the built-in kernels' first rounding off the thresholds (a BN's gain
    # code is then 96 = 3 * 32 and its offset a multiple of 1 / k output steps).
    def check_code_value(value, multiplier, what):
        k, j = _odd_over_power_of_two(1 / value)  # the value 2**j / k, inverted
        assert (k >= 1023) if multiplier >= 0.5 else (j <= 5 and k >= 63), (what, value, k, j)
        return k

    for concat, source in (("l1_concat_q8", "stem_conv_q8"), ("l2_concat_q8", "t_pool_q8")):
        value = float(model.get_layer(source).quantizer.step.numpy()[0] / model.get_layer(concat).quantizer.step.numpy()[0])
        check_code_value(value, value / (127 if value < 0.5 else np.floor(2 * value * (1 - 1e-5))), concat)
    for name in ("l1_bn2", "t_bn"):
        bn = model.get_layer(name)
        step, s_out = bn.input_step(), bn.output_step().numpy()[0]
        gain, offset = (t.numpy().astype(np.float64) for t in bn.integer_affine(step))
        codes = bn.gain_codes(step).numpy()
        values = step.numpy()[0] * np.abs(gain) / s_out
        assert np.all((codes == 96) == (values / codes < 0.5)), name
        for c in range(len(values)):
            k = check_code_value(values[c], values[c] / codes[c], f"{name}[{c}]")
            unit = 1 / k if values[c] < 0.5 else values[c] / codes[c]  # the offset grid, in output steps
            assert abs(offset[c] / s_out / unit - round(offset[c] / s_out / unit)) < 1e-3, (name, c)
    raw = np.exp(model.get_layer("l1_conv1").kernel_quantizer_internal.log_step.numpy()[0])
    assert raw != pytest.approx(steps["l1_conv1"][2], rel=1e-6)  # the trained value is kept, the snapped one used
    # A tf.function computes the step eager execution does, to the bit (in float32, Grappler's
    # log1p rewrite moved it by 1e-6, and with it weight codes of predict()).
    for name in steps:
        quantizer = model.get_layer(name).kernel_quantizer_internal
        assert tf.function(lambda q=quantizer: q.step)().numpy()[0] == quantizer.step.numpy()[0], name
    # The Keras model's conv sums, in output steps, keep 1 / (2k) from every threshold (eager and predict()).
    names = ("l1_conv1", "stem_conv", "l1_conv2")
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in names])
    for values in (probe(x, training=False), probe.predict(x, batch_size=32, verbose=0)):
        for value, name in zip(values, names):
            ratio, _, _, s_out = steps[name]
            k, _ = _odd_over_power_of_two(ratio)
            distance = np.abs((np.asarray(value, np.float64) / s_out) % 1.0 - 0.5)
            assert distance.min() >= 0.5 / k - 1e-4, (name, distance.min(), k)
    # Saved and loaded (.h5 and .keras): the same link, the same steps and logits; a copy of the
    # quantizer rebuilt from its config (QKeras' tools, hls4ml) uses the step the layer uses.
    for suffix in ("h5", "keras"):
        model.save(tmp_path / f"m.{suffix}")
        loaded = tfqkd.io.load_model(tmp_path / f"m.{suffix}")
        np.testing.assert_allclose(list(steps_of(loaded).values()), list(steps.values()), rtol=1e-6)
        np.testing.assert_array_equal(loaded.predict(x[:8], verbose=0), model.predict(x[:8], verbose=0))
    quantizer = model.get_layer("l1_conv1").kernel_quantizer_internal
    rebuilt = tfqkd.quant.quantizers.get_quantizer(keras.utils.serialize_keras_object(quantizer))
    kernel = model.get_layer("l1_conv1").kernel
    np.testing.assert_array_equal(rebuilt(kernel).numpy(), quantizer(kernel, training=False).numpy())
    # A model of tfqkd 0.4 (no flag in its config) keeps the steps it was trained with.
    config = model.get_config()
    for entry in config["layers"]:
        entry["config"].pop("midway_thresholds", None)
    old = keras.Model.from_config(config, custom_objects=custom_objects())
    old.set_weights(model.get_weights())
    assert float(old.get_layer("l1_conv1").kernel_quantizer_internal.step.numpy()[0]) == pytest.approx(raw, rel=1e-6)


def test_integer_intermediate_residual_adds_share_one_grid(tmp_path):
    """``integer_intermediates`` on residual Adds: each Add's inputs and its sum (after its ReLU, else
    straight) are on one learned 8-bit grid; in a chain of Adds (MobileNetV2's linear bottlenecks) the
    earlier Add's output quantizer takes the later one's grid; the quantizers reading such a grid keep an
    odd ratio to it (requantized codes off the thresholds). Saving and loading keeps the ties."""
    layers = keras.layers
    inputs = keras.Input((12, 12, 1), name="input")
    stem = layers.Conv2D(8, 3, padding="same", name="stem_conv")(inputs)
    stem = layers.ReLU(name="stem_relu")(layers.BatchNormalization(name="stem_bn")(stem))
    y = layers.BatchNormalization(name="b1_bn")(layers.Conv2D(8, 3, padding="same", name="b1_conv")(stem))
    a1 = layers.Add(name="add1")([stem, y])  # linear: no ReLU after it
    y = layers.BatchNormalization(name="b2_bn")(layers.Conv2D(8, 1, name="b2_conv")(a1))
    a2 = layers.ReLU(name="add2_relu")(layers.Add(name="add2")([a1, y]))
    outputs = layers.Dense(3, name="head")(layers.GlobalAveragePooling2D(name="pool")(a2))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).random((32, 12, 12, 1)).astype("float32")
    qmodel = quantize(model, "w4a4", x, integer_intermediates=True)

    def step(m, name):
        return float(np.exp(m.get_layer(name).quantizer.effective_log_step().numpy()[0]))

    grid = {"stem_relu_q8", "b1_bn_q8", "add1_q8", "b2_bn_q8", "add2_relu_q8"}
    assert {layer.name for layer in qmodel.layers if layer.name.endswith("_q8")} >= grid
    assert "add2_q8" not in [layer.name for layer in qmodel.layers]  # quantized after its ReLU
    for m in (qmodel, keras.models.load_model(_saved(qmodel, tmp_path / "r.keras"), compile=False)):
        steps = {name: step(m, name) for name in grid}
        assert len(set(steps.values())) == 1, steps
        assert not m.get_layer("add2_relu_q8").add_input and m.get_layer("add1_q8").add_input
        for reader in ("b2_conv_qin", "b1_conv_qin"):  # read add1_q8's and stem_relu_q8's codes
            ratio = step(m, reader) / steps["add1_q8"]
            assert m.get_layer(reader).midway_thresholds
            assert _odd_over_power_of_two(ratio) is not None, (reader, ratio)
    from tfqkd.export import to_tflite

    assert to_tflite(qmodel, tmp_path / "r.tflite", calibration_data=x)["rounded_add_inputs"] == []


def _saved(model, path):
    model.save(path)
    return path
