"""Tests of tfqkd.training: PyTorch-style SGD and the warmup/multi-step schedule (thesis 5.1.2, 5.1.3)."""

import json

import numpy as np
import pytest

from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.training import TorchSGD, WarmupMultiStep, make_sgd

# -- optimizer --------------------------------------------------------------------

# A quadratic with a known gradient: loss(w) = 0.5 * sum(a * w^2) + sum(b * w),
# so grad(w) = a * w + b.
A = np.array([1.0, 2.0, 0.5], np.float64)
B = np.array([0.3, -0.1, 0.2], np.float64)
W0 = np.array([1.0, -2.0, 0.5], np.float64)


def torch_sgd_reference(w, lrs, momentum, weight_decay, nesterov):
    """PyTorch's documented SGD update (dampening 0), written out by hand in float64.

    for each step t:  g = grad(w) + wd * w
                      b = g if t == 0 else momentum * b + g
                      d = g + momentum * b if nesterov else b
                      w = w - lr_t * d
    """
    w = w.copy()
    buf = None
    for lr in lrs:
        g = A * w + B + weight_decay * w
        buf = g.copy() if buf is None else momentum * buf + g
        d = g + momentum * buf if nesterov else buf
        w = w - lr * d
    return w


def run_keras(optimizer, steps, w0=W0, name="w"):
    var = tf.Variable(w0.astype(np.float32), name=name)
    a, b = tf.constant(A, tf.float32), tf.constant(B, tf.float32)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = 0.5 * tf.reduce_sum(a * var * var) + tf.reduce_sum(b * var)
        optimizer.apply_gradients([(tape.gradient(loss, var), var)])
    return var.numpy()


@pytest.mark.parametrize("nesterov", [True, False])
def test_two_steps_match_pytorch_sgd_by_hand(nesterov):
    opt = TorchSGD(0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.05)
    got = run_keras(opt, 2)
    want = torch_sgd_reference(W0, [0.1, 0.1], 0.9, 0.05, nesterov)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Concrete numbers for the Nesterov case, so a wrong reference cannot hide:
    # g1 = [1.35, -4.2, 0.475], w1 = w0 - 0.1*1.9*g1 = [0.7435, -1.202, 0.40975];
    # g2 = [1.080675, -2.5641, 0.4253625], b2 = 0.9*g1 + g2, w2 = w1 - 0.1*(g2 + 0.9*b2).
    if nesterov:
        np.testing.assert_allclose(got, [0.42882175, -0.374621, 0.290456125], rtol=1e-5)


def test_lr_change_uses_pytorch_buffer_not_keras_velocity():
    # Warmup makes lr 0.05 then 0.1. PyTorch multiplies the lr-free buffer by the
    # current lr; Keras' velocity keeps the old lr inside. TorchSGD follows PyTorch.
    schedule = WarmupMultiStep(0.1, steps_per_epoch=1, warmup_epochs=2)
    got = run_keras(TorchSGD(schedule, momentum=0.9, nesterov=True, weight_decay=5e-4), 2)
    want = torch_sgd_reference(W0, [0.05, 0.1], 0.9, 5e-4, True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    keras_way = run_keras(keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True), 2)
    no_decay = torch_sgd_reference(W0, [0.05, 0.1], 0.9, 0.0, True)
    assert np.abs(keras_way - no_decay).max() > 1e-3


def test_without_weight_decay_equals_keras_nesterov_sgd():
    # At a constant lr and no decay both formulations are the same algorithm:
    # an independent cross-check of the update against Keras' own SGD.
    ours = run_keras(TorchSGD(0.05, momentum=0.9, nesterov=True, weight_decay=0.0), 3)
    theirs = run_keras(keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True), 3)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_excluded_variable_gets_no_weight_decay():
    # Zero gradient: only weight decay can move a variable.
    opt = make_sgd(0.1, weight_decay=0.01, exclude=("_step",))
    decayed = tf.Variable([2.0, -4.0], name="conv/kernel")
    kept = tf.Variable([0.25], name="conv/act_step")
    for _ in range(2):
        opt.apply_gradients([(tf.zeros(2), decayed), (tf.zeros(1), kept)])
    np.testing.assert_array_equal(kept.numpy(), [0.25])
    # By hand: g1 = wd*w0, b1 = g1, w1 = w0 - lr*(g1 + m*b1) = w0*(1 - 0.1*0.01*1.9)
    #          g2 = wd*w1, b2 = m*b1 + g2, w2 = w1 - lr*(g2 + m*b2)
    w0 = np.array([2.0, -4.0])
    g1 = 0.01 * w0
    w1 = w0 - 0.1 * (g1 + 0.9 * g1)
    g2 = 0.01 * w1
    b2 = 0.9 * g1 + g2
    np.testing.assert_allclose(decayed.numpy(), w1 - 0.1 * (g2 + 0.9 * b2), rtol=1e-6)
    # Keras' decoupled decay stays off.
    assert opt.weight_decay is None


def test_optimizer_config_round_trips():
    schedule = WarmupMultiStep(0.1, steps_per_epoch=782, warmup_epochs=2, milestones=(60, 120, 160), factor=5)
    opt = make_sgd(schedule, weight_decay=5e-4, exclude=("_step", "alpha"))
    cfg = opt.get_config()
    assert cfg["weight_decay"] == 5e-4 and cfg["exclude"] == ["_step", "alpha"]
    assert cfg["momentum"] == 0.9 and cfg["nesterov"] is True
    serialized = json.loads(json.dumps(keras.optimizers.serialize(opt)))
    clone = keras.optimizers.deserialize(serialized)
    assert isinstance(clone, TorchSGD)
    assert clone.coupled_weight_decay == 5e-4 and clone.exclude == ("_step", "alpha")
    assert float(clone._learning_rate(60 * 782)) == pytest.approx(0.02)
    assert make_sgd(0.1).get_config()["learning_rate"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"learning_rate": 0.0}, "learning rate"),
        ({"learning_rate": "fast"}, "learning rate"),
        ({"learning_rate": 0.1, "weight_decay": -1.0}, "weight_decay"),
        ({"learning_rate": 0.1, "momentum": 1.0}, "momentum"),
        ({"learning_rate": 0.1, "momentum": 0.0}, "nesterov"),
    ],
)
def test_make_sgd_rejects_bad_arguments(kwargs, match):
    with pytest.raises(TfqkdError, match=match):
        make_sgd(**kwargs)


def test_torch_sgd_trains_a_model_with_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)]
    )
    schedule = WarmupMultiStep(0.1, steps_per_epoch=4, warmup_epochs=1, milestones=(3,), factor=5)
    model.compile(make_sgd(schedule), keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert int(model.optimizer.iterations) == 16
    # 16 steps done: epoch 4 (index 4 >= milestone 3) -> 0.1 / 5.
    assert float(model.optimizer.learning_rate) == pytest.approx(0.02)


# -- schedule -------------------------------------------------------------------------


def test_schedule_values_through_warmup_and_milestones():
    sched = WarmupMultiStep(0.1, steps_per_epoch=10, warmup_epochs=2, milestones=(3, 5), factor=5)
    values = {step: float(sched(step)) for step in (0, 1, 9, 19, 20, 29, 30, 49, 50, 1000)}
    expected = {
        0: 0.1 / 20,  # first batch: base_lr * 1 / warmup_steps
        1: 0.1 * 2 / 20,
        9: 0.1 * 10 / 20,
        19: 0.1,  # last warmup batch reaches base_lr
        20: 0.1,
        29: 0.1,
        30: 0.02,  # epoch 3: first milestone
        49: 0.02,
        50: 0.004,  # epoch 5: second milestone
        1000: 0.004,
    }
    for step, want in expected.items():
        assert values[step] == pytest.approx(want, rel=1e-6), step


def test_schedule_thesis_densenet_recipe():
    # DenseNet baselines: lr 0.1, warmup 2, /5 at 60/120/160, 782 batches of 64 per CIFAR epoch.
    sched = WarmupMultiStep(0.1, steps_per_epoch=782, warmup_epochs=2, milestones=(60, 120, 160), factor=5)
    at = lambda epoch: float(sched(epoch * 782))  # noqa: E731
    assert [at(e) for e in (2, 59, 60, 119, 120, 160, 199)] == pytest.approx(
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008], rel=1e-6
    )
    assert sched.warmup_steps == 1564


def test_schedule_without_warmup_and_config_round_trip():
    sched = WarmupMultiStep(1e-3, steps_per_epoch=5, milestones=[1, 2], factor=2.0)
    assert [float(sched(s)) for s in (0, 4, 5, 10)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4], rel=1e-6)
    cfg = json.loads(json.dumps(keras.optimizers.schedules.serialize(sched)))
    clone = keras.optimizers.schedules.deserialize(cfg)
    assert isinstance(clone, WarmupMultiStep)
    assert clone.get_config() == sched.get_config()
    assert float(clone(7)) == pytest.approx(5e-4)
    # Works in graph mode with the optimizer's int64 step counter.
    assert float(tf.function(sched)(tf.constant(10, tf.int64))) == pytest.approx(2.5e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"base_lr": 0.0, "steps_per_epoch": 10}, "base_lr"),
        ({"base_lr": 0.1, "steps_per_epoch": 0}, "steps_per_epoch"),
        ({"base_lr": 0.1, "steps_per_epoch": 2.5}, "steps_per_epoch"),
        ({"base_lr": 0.1, "steps_per_epoch": 10, "warmup_epochs": -1}, "warmup_epochs"),
        ({"base_lr": 0.1, "steps_per_epoch": 10, "milestones": (20, 10)}, "increasing"),
        ({"base_lr": 0.1, "steps_per_epoch": 10, "factor": 0}, "factor"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(TfqkdError, match=match):
        WarmupMultiStep(**kwargs)
