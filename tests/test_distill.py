"""Tests of tfqkd.distill: the KD loss and the three QKD phases (Kim et al. 2019; thesis 3.6, Algorithms 1-4)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tfqkd.compat import keras, tf
from tfqkd.distill import PHASES, QKD, kd_loss, precompute_teacher_logits
from tfqkd.errors import TfqkdError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
NUM_FEATURES, NUM_CLASSES, NUM_EXAMPLES = 6, 3, 48


# -- helpers ----------------------------------------------------------------


def mlp(seed, hidden=8, batchnorm=False, dropout=False, l2=None, name=None):
    """A 2-layer Dense classifier returning logits, deterministically initialised."""
    reg = keras.regularizers.L2(l2) if l2 else None
    inputs = keras.Input((NUM_FEATURES,))
    h = keras.layers.Dense(
        hidden, kernel_initializer=keras.initializers.GlorotUniform(seed=seed), kernel_regularizer=reg
    )(inputs)
    if batchnorm:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    if dropout:
        h = keras.layers.Dropout(0.5, seed=seed)(h)
    outputs = keras.layers.Dense(
        NUM_CLASSES, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 100), kernel_regularizer=reg
    )(h)
    return keras.Model(inputs, outputs, name=name)


def toy_data(n=NUM_EXAMPLES, seed=0):
    """Random features with labels from a fixed linear rule (learnable, deterministic)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
    y = np.argmax(x[:, :NUM_CLASSES] + 0.5 * x[:, NUM_CLASSES:], axis=1).astype(np.int64)
    return x, y


def indexed_dataset(x, y, batch_size=16):
    """(x, y, idx) batches in a fixed order, as the thesis's indexed loader."""
    idx = np.arange(len(x), dtype=np.int64)
    return tf.data.Dataset.from_tensor_slices((x, y, idx)).batch(batch_size)


def snapshot(model):
    """All weights, trainable and not (BN moving statistics included)."""
    return [np.array(w) for w in model.get_weights()]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


# -- kd_loss ------------------------------------------------------------------


def test_kd_loss_matches_hand_computed_fixture():
    # tests/fixtures/kd_loss.json was computed with Python's math module only
    # (its "_how" field gives the formula): per example
    #   kl = sum_c pt_c * log(pt_c / ps_c), pt = softmax(teacher / T), ps = softmax(student / T)
    #   ce = -log(softmax(student)[label])
    #   loss = alpha * T^2 * kl + (1 - alpha) * ce,  expected = mean over the batch.
    fx = json.loads((FIXTURES / "kd_loss.json").read_text())
    args = (fx["student_logits"], fx["teacher_logits"], fx["labels"])
    got = kd_loss(*args, alpha=fx["alpha"], temperature=fx["temperature"]).numpy()
    assert got == pytest.approx(fx["expected"], rel=1e-6)
    per = kd_loss(*args, alpha=fx["alpha"], temperature=fx["temperature"], per_example=True).numpy()
    assert per.shape == (3,)
    np.testing.assert_allclose(per, fx["expected_per_example"], rtol=1e-6)
    assert fx["expected"] == pytest.approx(2.442892087246751)


def test_kd_loss_alpha_zero_is_cross_entropy():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(5, 4)).astype(np.float32)
    t = rng.normal(size=(5, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 1])
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, s).numpy()
    assert kd_loss(s, t, y, alpha=0.0, temperature=8.0).numpy() == pytest.approx(ce, rel=1e-6)
    # With alpha=1 and identical distributions only the KL remains, and it is 0.
    assert kd_loss(s, s, y, alpha=1.0, temperature=3.0).numpy() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_kl_term_scales_with_t_squared():
    # alpha=1: loss = T^2 * KL. At a fixed softened distribution (logits scaled
    # by T) the KL is the same, so the loss ratio is exactly the T^2 ratio.
    s = np.array([[1.0, 0.0, -1.0]], np.float32)
    t = np.array([[0.0, 2.0, 0.0]], np.float32)
    y = np.array([1])
    l2 = kd_loss(2 * s, 2 * t, y, alpha=1.0, temperature=2.0).numpy()
    l4 = kd_loss(4 * s, 4 * t, y, alpha=1.0, temperature=4.0).numpy()
    assert l4 / l2 == pytest.approx(4.0, rel=1e-5)


def test_kd_loss_gradient_never_reaches_teacher_logits():
    s = tf.Variable([[0.3, -0.2, 1.0], [2.0, 0.1, -1.0]])
    t = tf.Variable([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    with tf.GradientTape() as tape:
        loss = kd_loss(s, t, [2, 0], alpha=0.7, temperature=4.0)
    grad_s, grad_t = tape.gradient(loss, [s, t])
    assert grad_t is None or not np.any(grad_t.numpy())
    assert np.abs(grad_s.numpy()).sum() > 1e-3


@pytest.mark.parametrize(
    "alpha,temperature", [(-0.1, 4.0), (1.5, 4.0), (0.5, 0.0), (0.5, -2.0), (float("nan"), 4.0), ("a", 4.0)]
)
def test_kd_loss_rejects_bad_hyperparameters(alpha, temperature):
    with pytest.raises(TfqkdError) as err:
        kd_loss([[0.0, 1.0]], [[1.0, 0.0]], [0], alpha=alpha, temperature=temperature)
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


# -- QKD construction -----------------------------------------------------------


def test_qkd_rejects_bad_configuration():
    student, teacher = mlp(1), mlp(2)
    with pytest.raises(TfqkdError, match="unknown QKD phase"):
        QKD(student, teacher, phase="xx")
    with pytest.raises(TfqkdError, match="'cs'"):
        QKD(student, phase="cs")
    with pytest.raises(TfqkdError, match="'ts'"):
        QKD(student, phase="ts")
    with pytest.raises(TfqkdError, match="alpha"):
        QKD(student, teacher, phase="ts", alpha=2.0)
    with pytest.raises(TfqkdError, match="teacher_logits"):
        QKD(student, teacher, phase="ts", teacher_logits=np.zeros(5))
    with pytest.raises(TfqkdError, match="different"):
        QKD(student, student, phase="cs")
    qkd = QKD(student, teacher, phase="cs")
    with pytest.raises(TfqkdError, match="teacher_optimizer"):
        qkd.compile(keras.optimizers.SGD(0.1))
    opt = keras.optimizers.SGD(0.1)
    with pytest.raises(TfqkdError, match="two optimizer"):
        qkd.compile(opt, teacher_optimizer=opt)
    with pytest.raises(TfqkdError, match="loss"):
        qkd.compile(keras.optimizers.SGD(0.1), teacher_optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with pytest.raises(TfqkdError, match="does not train the teacher"):
        QKD(student, teacher, phase="ts").compile(keras.optimizers.SGD(0.1), teacher_optimizer="sgd")
    assert PHASES == ("ss", "cs", "ts")


def test_call_returns_student_logits_and_config_round_trips():
    keras.utils.set_random_seed(0)
    student, teacher = mlp(1), mlp(2, hidden=12)
    x, _ = toy_data(4)
    qkd = QKD(student, teacher, phase="cs", alpha=0.6, temperature=5.0)
    np.testing.assert_array_equal(qkd(x).numpy(), student(x).numpy())
    config = qkd.get_config()
    assert (config["phase"], config["alpha"], config["temperature"]) == ("cs", 0.6, 5.0)
    clone = QKD.from_config(json.loads(json.dumps(config)))
    assert (clone.phase, clone.alpha, clone.temperature) == ("cs", 0.6, 5.0)
    assert clone.teacher.count_params() == teacher.count_params()
    assert clone.student.count_params() == student.count_params()


# -- the three phases -------------------------------------------------------------


def _fit(qkd, x, y, epochs=2, **compile_kw):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    qkd.compile(keras.optimizers.SGD(0.1, momentum=0.9), **compile_kw)
    return qkd.fit(ds, epochs=epochs, verbose=0)


def test_ts_keeps_teacher_bit_identical_including_batchnorm_statistics():
    keras.utils.set_random_seed(0)
    x, y = toy_data()
    student = mlp(1)
    teacher = mlp(2, batchnorm=True, dropout=True)
    # Non-trivial moving statistics, so "unchanged" is not just "still at init".
    teacher.layers[2].moving_mean.assign(np.linspace(-1, 1, 8).astype(np.float32))
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    history = _fit(QKD(student, teacher, phase="ts", alpha=0.7, temperature=4.0), x, y)
    assert same(snapshot(teacher), teacher_before)
    assert not same(snapshot(student), student_before)
    assert set(history.history) == {"loss", "accuracy", "teacher_accuracy"}
    assert np.all(np.isfinite(history.history["loss"]))
    # The teacher is frozen, so its (inference-mode) accuracy is the same every epoch.
    assert history.history["teacher_accuracy"][0] == history.history["teacher_accuracy"][1]


def test_cs_trains_both_networks():
    keras.utils.set_random_seed(0)
    x, y = toy_data()
    student, teacher = mlp(1), mlp(2, batchnorm=True, hidden=16)
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    qkd = QKD(student, teacher, phase="cs")
    history = _fit(qkd, x, y, teacher_optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    assert not same(snapshot(teacher), teacher_before)
    assert not same(snapshot(student), student_before)
    # BN moving statistics of the teacher are updated in training mode.
    assert not np.array_equal(teacher.layers[2].moving_mean.numpy(), teacher_before[2])
    assert set(history.history) == {"loss", "accuracy", "teacher_loss", "teacher_accuracy"}
    results = qkd.evaluate(x, y, verbose=0, return_dict=True)
    assert set(results) == {"loss", "accuracy", "teacher_loss", "teacher_accuracy"}
    # evaluate reports the student's and the teacher's inference-mode cross-entropy.
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert results["loss"] == pytest.approx(float(ce(y, student(x, training=False))), rel=1e-5)
    assert results["teacher_loss"] == pytest.approx(float(ce(y, teacher(x, training=False))), rel=1e-5)


def test_ss_trains_only_the_student_and_ignores_a_given_teacher():
    keras.utils.set_random_seed(0)
    x, y = toy_data()
    student, teacher = mlp(1), mlp(2, batchnorm=True)
    teacher_before, student_before = snapshot(teacher), snapshot(student)
    history = _fit(QKD(student, teacher, phase="ss"), x, y, epochs=5)
    assert same(snapshot(teacher), teacher_before)
    assert not same(snapshot(student), student_before)
    assert set(history.history) == {"loss", "accuracy"}
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_ss_loss_is_cross_entropy_plus_regularization():
    # One full-batch step: the logged loss is the objective at the initial
    # weights, CE(student(x), y) + sum of the L2 penalties.
    keras.utils.set_random_seed(0)
    x, y = toy_data(16)
    student = mlp(1, l2=0.01)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, student(x, training=True)).numpy()
    reg = 0.01 * sum(float(np.sum(w**2)) for w in (student.layers[1].kernel, student.layers[3].kernel))
    assert reg > 0.01
    qkd = QKD(student, phase="ss")
    qkd.compile(keras.optimizers.SGD(0.1))
    logged = qkd.fit(x, y, batch_size=16, epochs=1, verbose=0).history["loss"][0]
    assert logged == pytest.approx(ce + reg, rel=1e-5)


def test_cs_step_matches_hand_written_gradients():
    # One plain-SGD step of co-studying, recomputed by hand: the student
    # descends kd_loss(student, teacher), the teacher kd_loss(teacher, student),
    # both from the same forward pass.
    keras.utils.set_random_seed(0)
    x, y = toy_data(16)
    student, teacher = mlp(1), mlp(2, hidden=10)
    alpha, temperature, lr = 0.7, 4.0, 0.5
    with tf.GradientTape(persistent=True) as tape:
        s, t = student(x, training=True), teacher(x, training=True)
        ls = kd_loss(s, t, y, alpha=alpha, temperature=temperature)
        lt = kd_loss(t, s, y, alpha=alpha, temperature=temperature)
    expected_s = [w.numpy() - lr * g.numpy() for w, g in zip(student.weights, tape.gradient(ls, student.weights))]
    expected_t = [w.numpy() - lr * g.numpy() for w, g in zip(teacher.weights, tape.gradient(lt, teacher.weights))]
    qkd = QKD(student, teacher, phase="cs", alpha=alpha, temperature=temperature)
    qkd.compile(keras.optimizers.SGD(lr), teacher_optimizer=keras.optimizers.SGD(lr))
    history = qkd.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    assert history["loss"][0] == pytest.approx(float(ls), rel=1e-5)
    assert history["teacher_loss"][0] == pytest.approx(float(lt), rel=1e-5)
    for got, want in zip(student.get_weights(), expected_s):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(teacher.get_weights(), expected_t):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cs_under_mixed_float16_wraps_both_optimizers():
    keras.utils.set_random_seed(0)
    x, y = toy_data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        student, teacher = mlp(1), mlp(2)
        qkd = QKD(student, teacher, phase="cs")
        history = _fit(qkd, x, y, teacher_optimizer=keras.optimizers.SGD(0.1))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(qkd.optimizer, keras.mixed_precision.LossScaleOptimizer)
    assert isinstance(qkd.teacher_optimizer, keras.mixed_precision.LossScaleOptimizer)
    assert np.all(np.isfinite(history.history["loss"])) and np.all(np.isfinite(history.history["teacher_loss"]))
    assert history.history["teacher_loss"][1] < history.history["teacher_loss"][0]


# -- the teacher-logits cache ---------------------------------------------------------


def test_precompute_teacher_logits_by_index():
    keras.utils.set_random_seed(0)
    x, y = toy_data()
    teacher = mlp(2, batchnorm=True)
    # Shuffled order: rows must land by index, not by arrival.
    ds = indexed_dataset(x, y).unbatch().shuffle(NUM_EXAMPLES, seed=3).batch(7)
    cache = QKD.precompute_teacher_logits(teacher, ds, NUM_EXAMPLES)
    assert cache.shape == (NUM_EXAMPLES, NUM_CLASSES) and cache.dtype == np.float32
    np.testing.assert_allclose(cache, teacher(x, training=False).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TfqkdError, match="covered only"):
        precompute_teacher_logits(teacher, indexed_dataset(x[:40], y[:40]), NUM_EXAMPLES)
    with pytest.raises(TfqkdError, match="out of range"):
        precompute_teacher_logits(teacher, indexed_dataset(x, y), NUM_EXAMPLES - 1)
    with pytest.raises(TfqkdError, match="sample_index"):
        precompute_teacher_logits(teacher, tf.data.Dataset.from_tensor_slices((x, y)).batch(8), NUM_EXAMPLES)


def test_ts_cache_gives_the_on_the_fly_loss():
    keras.utils.set_random_seed(0)
    x, y = toy_data()
    teacher = mlp(2, batchnorm=True)
    init = mlp(1).get_weights()
    cache = precompute_teacher_logits(teacher, indexed_dataset(x, y), NUM_EXAMPLES)
    # Reverse order so the gather by index is really exercised.
    order = np.arange(NUM_EXAMPLES)[::-1].copy()
    ds = tf.data.Dataset.from_tensor_slices((x[order], y[order], order)).batch(16)

    def run(**kw):
        student = mlp(1)
        student.set_weights(init)
        qkd = QKD(student, phase="ts", alpha=0.7, temperature=4.0, **kw)
        qkd.compile(keras.optimizers.SGD(0.1))
        history = qkd.fit(ds.take(1), epochs=1, verbose=0).history
        return history, student.get_weights()

    cached, w_cached = run(teacher_logits=cache)
    live, w_live = run(teacher=teacher)
    assert cached["loss"][0] == pytest.approx(live["loss"][0], abs=1e-5)
    assert cached["teacher_accuracy"][0] == live["teacher_accuracy"][0]
    for a, b in zip(w_cached, w_live):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Cache without sample indices and without a teacher model: a clear error.
    no_idx = QKD(mlp(1), phase="ts", teacher_logits=cache)
    no_idx.compile(keras.optimizers.SGD(0.1))
    with pytest.raises(TfqkdError, match="sample_index"):
        no_idx.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)


# -- callbacks ------------------------------------------------------------------------


def test_fit_with_checkpoint_early_stopping_and_tensorboard(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = toy_data()
    xv, yv = toy_data(24, seed=1)
    student, teacher = mlp(1), mlp(2)
    qkd = QKD(student, teacher, phase="cs")
    qkd.compile(keras.optimizers.SGD(0.05), teacher_optimizer=keras.optimizers.SGD(0.05))
    ckpt = tmp_path / "best.weights.h5"
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            str(ckpt), save_weights_only=True, monitor="val_accuracy", mode="max", save_best_only=True
        ),
        # patience 0 with an impossible min_delta: stops after the 2nd epoch.
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=0, min_delta=2.0),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb"), histogram_freq=1),
    ]
    history = qkd.fit(x, y, batch_size=16, epochs=10, validation_data=(xv, yv), callbacks=callbacks, verbose=0)
    assert len(history.history["loss"]) == 2
    assert {"val_loss", "val_accuracy", "val_teacher_loss", "val_teacher_accuracy"} <= set(history.history)
    assert ckpt.is_file()
    assert any((tmp_path / "tb" / "train").iterdir()) and any((tmp_path / "tb" / "validation").iterdir())
    # The checkpoint holds both networks: a fresh pair restored from it
    # evaluates like the best epoch (ModelCheckpoint needs a strict improvement,
    # so ties keep the earlier epoch, as np.argmax does).
    best = int(np.argmax(history.history["val_accuracy"]))
    fresh = QKD(mlp(5), mlp(6), phase="cs")
    fresh(xv[:1])
    fresh.load_weights(str(ckpt))
    fresh.compile(keras.optimizers.SGD(0.05), teacher_optimizer=keras.optimizers.SGD(0.05))
    restored = fresh.evaluate(xv, yv, verbose=0, return_dict=True)
    assert restored["accuracy"] == pytest.approx(history.history["val_accuracy"][best])
    assert restored["teacher_accuracy"] == pytest.approx(history.history["val_teacher_accuracy"][best])
    assert restored["loss"] == pytest.approx(history.history["val_loss"][best], rel=1e-5)


# -- distributed ------------------------------------------------------------------------

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tfqkd.compat import keras, tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfqkd.distill import QKD, precompute_teacher_logits
    from tfqkd.training import WarmupMultiStep, make_sgd

    def mlp(seed, hidden):
        reg = keras.regularizers.L2(1e-3)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(hidden, activation="relu", kernel_regularizer=reg,
                               kernel_initializer=keras.initializers.GlorotUniform(seed=seed))(inputs)
        out = keras.layers.Dense(3, kernel_regularizer=reg,
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(h)
        return keras.Model(inputs, out)

    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = np.argmax(x[:, :3] + 0.5 * x[:, 3:], axis=1).astype(np.int64)
    idx = np.arange(64, dtype=np.int64)

    def run(strategy, phase):
        with strategy.scope():
            student, teacher = mlp(1, 8), mlp(3, 16)
            cache = None
            if phase == "ts":
                ds = tf.data.Dataset.from_tensor_slices((x, y, idx)).batch(16)
                cache = precompute_teacher_logits(teacher, ds, 64)
            qkd = QKD(student, None if cache is not None else teacher, phase=phase,
                      alpha=0.7, temperature=4.0, teacher_logits=cache)
            # The library optimizer and schedule, so their distributed path is covered too.
            schedule = WarmupMultiStep(0.2, steps_per_epoch=4, warmup_epochs=1, milestones=(2,), factor=5)
            qkd.compile(make_sgd(schedule, weight_decay=1e-3),
                        teacher_optimizer=make_sgd(0.1, weight_decay=1e-3) if phase == "cs" else None)
        ds = tf.data.Dataset.from_tensor_slices((x, y, idx)).batch(16)  # global batch 16
        hist = qkd.fit(ds, epochs=3, shuffle=False, verbose=0).history
        weights = [w.tolist() for w in student.get_weights() + teacher.get_weights()]
        return {"replicas": qkd.distribute_strategy.num_replicas_in_sync,
                "loss": hist["loss"], "teacher_loss": hist.get("teacher_loss"), "weights": weights}

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {}
    for phase in ("cs", "ts", "ss"):
        out[phase] = {"single": run(tf.distribute.get_strategy(), phase), "mirrored": run(mirrored, phase)}
    print("RESULT" + json.dumps(out))
    """
)


def test_cs_under_mirrored_strategy_matches_single_device():
    # Logical CPU devices must exist before TensorFlow initialises: own process.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    results = json.loads(line[len("RESULT") :])
    for phase, runs in results.items():
        single, mirrored = runs["single"], runs["mirrored"]
        assert single["replicas"] == 1 and mirrored["replicas"] == 2, phase
        np.testing.assert_allclose(mirrored["loss"], single["loss"], atol=1e-4, err_msg=phase)
        if phase == "cs":
            np.testing.assert_allclose(mirrored["teacher_loss"], single["teacher_loss"], atol=1e-4)
        for a, b in zip(mirrored["weights"], single["weights"]):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, err_msg=phase)
        # Training did something: the 3 epochs' losses are not all equal.
        assert single["loss"][0] != single["loss"][-1]
