"""Reliability: the divergence guard and safe loading of model files (issue 8)."""

import ast
import json
import math
import shutil
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import tfqkd
from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.io import load_model, read_model_config, scan_model_config
from tfqkd.training import DivergenceGuard, check

PACKAGE = Path(tfqkd.__file__).parent


# Divergence guard -----------------------------------------------------------------------------


def _tiny_student(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden), name="tiny")


def _dataset():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 3, size=64).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


def _fit(tmp_path, lr_of_epoch, epochs=4):
    model = tfqkd.QKD(_tiny_student(), phase="ss")
    model.compile(keras.optimizers.SGD(learning_rate=lr_of_epoch(0)))
    model(np.zeros((1, 4), "float32"))  # build, so the start-of-stage snapshot holds real weights
    start = model.get_weights()
    guard = DivergenceGuard(stage="ss")
    ends = []
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "epoch_{epoch:03d}.weights.h5"), save_weights_only=True
    )
    callbacks = [
        guard,
        guard.protect(checkpoint),
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr_of_epoch(epoch)),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: ends.append(model.get_weights())),
    ]
    history = model.fit(_dataset(), epochs=epochs, callbacks=callbacks, verbose=0)
    return model, guard, start, ends, history


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_guard_stops_restores_last_good_epoch_and_keeps_its_checkpoint(tmp_path):
    # Epoch 1 trains at a sane rate; from epoch 2 the learning rate is 1e6.
    model, guard, _, ends, history = _fit(tmp_path, lambda epoch: 1e-2 if epoch == 0 else 1e6)
    assert guard.diverged is not None
    message = guard.diverged
    assert "\n" not in message
    assert "stage ss" in message and "epoch 2" in message and "batch" in message
    assert "is nan" in message or "is inf" in message
    assert "restored the weights of epoch 1" in message
    assert len(history.history["loss"]) == 2  # stopped in epoch 2, no epoch 3
    weights = model.get_weights()
    assert all(np.isfinite(w).all() for w in weights)
    assert _same(weights, ends[0])  # the weights at the end of epoch 1
    # The diverged epoch left no checkpoint; the good one is intact and loads.
    assert sorted(p.name for p in tmp_path.glob("*.weights.h5")) == ["epoch_001.weights.h5"]
    fresh = tfqkd.QKD(_tiny_student(seed=1), phase="ss")
    fresh(np.zeros((1, 4), "float32"))
    fresh.load_weights(str(tmp_path / "epoch_001.weights.h5"))
    assert _same(fresh.get_weights(), ends[0])
    with pytest.raises(TfqkdError, match="training diverged in stage ss at epoch 2") as err:
        check(guard)
    assert str(err.value) == message


def test_guard_restores_the_start_of_the_stage_when_the_first_epoch_diverges(tmp_path):
    model, guard, start, _, history = _fit(tmp_path, lambda epoch: 1e6)
    assert "epoch 1" in guard.diverged and "from the start of the stage" in guard.diverged
    assert len(history.history["loss"]) == 1
    assert _same(model.get_weights(), start)
    assert list(tmp_path.glob("*.weights.h5")) == []
    # The restored model still predicts finite logits.
    assert np.isfinite(model.predict(np.ones((2, 4), "float32"), verbose=0)).all()


def test_guard_is_silent_on_healthy_training(tmp_path):
    _, guard, _, _, history = _fit(tmp_path, lambda epoch: 1e-2, epochs=2)
    assert guard.diverged is None and guard.good_epoch == 2
    check(guard)  # no error
    assert len(history.history["loss"]) == 2
    assert sorted(p.name for p in tmp_path.glob("*.weights.h5")) == ["epoch_001.weights.h5", "epoch_002.weights.h5"]


def test_guard_watches_the_teacher_loss_of_co_studying():
    model = tfqkd.QKD(_tiny_student(), _tiny_student(seed=1), phase="cs")
    model.compile(keras.optimizers.SGD(0.01), teacher_optimizer=keras.optimizers.SGD(0.01))
    model(np.zeros((1, 4), "float32"))
    guard = DivergenceGuard(stage="cs")
    guard.set_model(model)
    guard.on_train_begin()
    guard.on_epoch_begin(0)
    guard.on_train_batch_end(0, {"loss": 1.0, "teacher_loss": 2.0})
    assert guard.diverged is None
    good = model.get_weights()
    model.set_weights([w + np.float32(np.inf) for w in good])
    guard.on_train_batch_end(1, {"loss": np.float32(1.0), "teacher_loss": np.float32(math.inf)})
    assert model.stop_training
    assert "teacher_loss is inf" in guard.diverged and "batch 2" in guard.diverged
    assert _same(model.get_weights(), good)  # student and teacher weights both restored


# Safe loading -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A plain Dense model, a model with a Lambda layer, and a QKeras model with string quantizers."""
    import qkeras

    root = tmp_path_factory.mktemp("models")
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    doubled = keras.layers.Lambda(lambda t: t * 2.0, name="double_it")(inputs)
    with_lambda = keras.Model(inputs, keras.layers.Dense(2)(doubled))
    qdense = qkeras.QDense(
        3, kernel_quantizer="quantized_bits(4,0,1)", bias_quantizer="quantized_bits(4,0,1)", name="qdense"
    )(inputs)
    with_strings = keras.Model(inputs, qkeras.QActivation("quantized_relu(4)", name="qact")(qdense))
    out = {}
    for name, model in (("plain", plain), ("lambda", with_lambda), ("strings", with_strings)):
        for suffix in (".h5", ".keras"):
            path = root / f"{name}{suffix}"
            model.save(path)
            out[f"{name}{suffix}"] = path
    return out


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_lambda_layers_are_refused_unless_unsafe(files, suffix):
    path = files[f"lambda{suffix}"]
    with pytest.raises(TfqkdError, match=r"double_it \(Lambda\)") as err:
        load_model(path)
    assert "--unsafe" in str(err.value) and "\n" not in str(err.value)
    model = load_model(path, unsafe=True)
    assert any(type(layer).__name__ == "Lambda" for layer in model.layers)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_qkeras_string_quantizers_load(files, suffix):
    model = load_model(files[f"strings{suffix}"])
    assert [layer.name for layer in model.layers][-2:] == ["qdense", "qact"]


def _corrupt_cases(files, root):
    h5_bytes = files["plain.h5"].read_bytes()
    keras_bytes = files["plain.keras"].read_bytes()
    cases = {
        "truncated.h5": h5_bytes[: len(h5_bytes) // 2],
        "truncated.keras": keras_bytes[: len(keras_bytes) // 2],
        "random.keras": np.random.default_rng(0).bytes(4096),
        "random.h5": np.random.default_rng(1).bytes(4096),
        "empty.h5": b"",
        "empty.keras": b"",
        "text.keras": "hello".encode(),
    }
    paths = []
    for name, payload in cases.items():
        (root / name).write_bytes(payload)
        paths.append(root / name)
    for name, member in (
        ("no_config.keras", None),
        ("bad_json.keras", b"{not json"),
        ("list_json.keras", b"[1, 2, 3]"),
        ("latin1.keras", "{\"class_name\": \"\xe9\"}".encode("latin-1")),
        ("deep.keras", b"[" * 100000 + b"]" * 100000),
    ):
        with zipfile.ZipFile(root / name, "w") as archive:
            archive.writestr("metadata.json", "{}")
            if member is not None:
                archive.writestr("config.json", member)
        paths.append(root / name)
    with h5py.File(root / "weights_only.h5", "w") as handle:
        handle.create_dataset("w", data=np.zeros(3))
    with h5py.File(root / "not_text.h5", "w") as handle:
        handle.attrs["model_config"] = np.arange(3)
    paths += [root / "weights_only.h5", root / "not_text.h5"]
    (root / "a_directory.keras").mkdir()
    paths += [root / "a_directory.keras", root / "missing.h5", root]
    return paths


def test_corrupt_files_give_a_tfqkd_error(files, tmp_path):
    for path in _corrupt_cases(files, tmp_path):
        with pytest.raises(TfqkdError) as err:
            load_model(path)
        assert "\n" not in str(err.value), path
        assert err.type is TfqkdError, path


def _keras_with_config(source, target, mutate):
    """Copies a .keras archive with its config.json changed by ``mutate(config)``."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    mutate(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return target


def _dense(config):
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")


def _hostile_mutations(canary):
    command = f"touch {canary}"
    return {
        "os_system_class": lambda c: c.update(module="os", class_name="system", config={"command": command}),
        "os_system_initializer": lambda c: _dense(c)["config"].update(
            kernel_initializer={"module": "os", "class_name": "function", "config": "system", "registered_name": None}
        ),
        "builtins_eval": lambda c: _dense(c)["config"].update(
            activation={"module": "builtins", "class_name": "function", "config": "eval", "registered_name": None}
        ),
        "layer_from_os": lambda c: _dense(c).update(module="os", class_name="system"),
        "planted_module": lambda c: c.update(module="planted_evil", class_name="Boom"),
        "planted_initializer": lambda c: _dense(c)["config"].update(
            kernel_initializer={"module": "planted_evil", "class_name": "Boom", "config": {}, "registered_name": None}
        ),
        "tf_op_lambda": lambda c: _dense(c).update(class_name="TFOpLambda"),
        "serialized_lambda": lambda c: _dense(c)["config"].update(
            activation={"class_name": "__lambda__", "config": {"code": "x", "defaults": None, "closure": None}}
        ),
        "string_eval_activation": lambda c: _dense(c)["config"].update(activation=f"eval('{command}')"),
        "string_safe_eval_global": lambda c: _dense(c)["config"].update(activation="get_quantizer('relu')"),
    }


def test_hostile_keras_configs_are_refused_without_running_anything(files, tmp_path, monkeypatch):
    canary = tmp_path / "canary"
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "planted_evil.py").write_text(f"open({str(canary)!r}, 'w').write('imported')\nclass Boom: pass\n")
    monkeypatch.syspath_prepend(str(planted))
    for name, mutate in _hostile_mutations(canary).items():
        path = _keras_with_config(files["plain.keras"], tmp_path / f"{name}.keras", mutate)
        with pytest.raises(TfqkdError, match="execute code") as err:
            load_model(path)
        assert "\n" not in str(err.value)
        assert not canary.exists(), name
        assert "planted_evil" not in sys.modules, name
    # The check is what protects: Keras, even in its safe mode, imports the module a .keras file names.
    with pytest.raises(TypeError):
        keras.models.load_model(tmp_path / "planted_module.keras", safe_mode=True)
    assert canary.exists()
    sys.modules.pop("planted_evil", None)


def _h5_with_config(source, target, mutate):
    shutil.copy(source, target)
    with h5py.File(target, "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        mutate(config)
        handle.attrs["model_config"] = json.dumps(config)
    return target


@pytest.mark.parametrize(
    "quantizer",
    [
        "set_internal_sigmoid('hard')",  # a qkeras.quantizers global that is not a quantizer
        "get_quantizer('quantized_bits(4)')",
        "safe_eval('x', 1)",
        "np",
        "quantized_bits(4, __import__('os'))",
        {"class_name": "set_internal_sigmoid", "config": {"mode": "hard"}},
        {"class_name": "safe_eval", "config": {"eval_str": "x", "op_dict": {}}},
    ],
)
def test_string_and_dict_quantizers_naming_non_quantizers_are_refused(files, tmp_path, quantizer):
    def mutate(config):
        layer = next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == "qdense")
        layer["config"]["kernel_quantizer"] = quantizer

    path = _h5_with_config(files["strings.h5"], tmp_path / "hostile.h5", mutate)
    import qkeras.quantizers as qq

    sigmoid = qq._default_sigmoid_type
    with pytest.raises(TfqkdError, match="kernel_quantizer"):
        load_model(path)
    assert qq._default_sigmoid_type == sigmoid  # nothing was called


def test_scan_accepts_the_model_zoo_serializations():
    for name, quant in (("dnn30", "w4a4"), ("resnet8", "thesis4"), ("kl_mlp_student", "dpu")):
        model = tfqkd.create_model(name, quant=quant)
        assert scan_model_config(json.loads(model.to_json())) == [], name


def test_read_model_config_of_plain_files(files):
    for key in ("plain.h5", "plain.keras"):
        assert read_model_config(files[key])["class_name"] in ("Functional", "Model")


def test_no_evaluator_in_the_package():
    """No eval/exec/compile/__import__ call anywhere in tfqkd, and no direct use of QKeras' safe_eval."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                # Builtins called by name (re.compile and Model.compile are attributes, not evaluators).
                if isinstance(func, ast.Name) and func.id in ("eval", "exec", "compile", "__import__", "safe_eval"):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {func.id}")
                if isinstance(func, ast.Attribute) and func.attr in ("safe_eval") or (
                    isinstance(func, ast.Attribute) and func.attr in ("eval", "exec")
                    and isinstance(func.value, ast.Name) and func.value.id == "builtins"
                ):  # fmt: skip
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {func.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names]
                if "safe_eval" in names or (isinstance(node, ast.ImportFrom) and "safe_eval" in (node.module or "")):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports safe_eval")
    assert offenders == []


# The guard in the recipes ---------------------------------------------------------------------

def _lr_1e6(write_recipe, path, **fields):
    """Epoch 1 of SS at 0.01; the milestone "divides" by 1e-8: a learning rate of 1e6 from epoch 2."""
    ss = {"epochs": 4, "lr": 0.01, "milestones": [1], "factor": 1.0e-8}
    return write_recipe(path, batch_size=16, schedules={"ss": ss}, **fields)


def _runner_has_guard():
    import inspect

    import tfqkd.recipes.runner as runner

    return "DivergenceGuard" in inspect.getsource(runner)


@pytest.mark.skipif(not _runner_has_guard(), reason="tfqkd.recipes.runner does not install the DivergenceGuard yet")
def test_recipe_with_learning_rate_1e6_stops_with_one_line_and_keeps_the_good_checkpoint(tmp_path, capsys, write_recipe):
    import tfqkd.recipes.qkd as qkd

    config = _lr_1e6(write_recipe, tmp_path / "lr1e6.yaml")
    run_dir = tmp_path / "run"
    assert qkd.main(["--config", str(config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert "training diverged in stage ss at epoch 2" in lines[0] and "restored the weights of epoch 1" in lines[0]
    checkpoints = run_dir / "stages" / "ss" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_001.weights.h5"]
    with h5py.File(checkpoints / "epoch_001.weights.h5", "r") as handle:
        arrays = []
        handle.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    assert arrays and all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in arrays)
    assert not (run_dir / "models" / "student_ss.h5").exists()


# Dead runs ------------------------------------------------------------------------------------


def _dead_mlp(num_classes=10, input_shape=(8, 8, 1)):
    """An MLP whose output cannot depend on its input (a frozen all-zero layer): a dead run by construction."""
    inputs = keras.Input(input_shape, name="x")
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, kernel_initializer="zeros", use_bias=False, trainable=False)(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def _digits():
    from tfqkd.data import load_arrays

    x, y = load_arrays("digits", "train", limit=512)
    return x, y


def test_dead_run_alarm_stops_a_dead_fit_in_its_first_epoch_and_says_why(capsys):
    x, y = _digits()
    keras.utils.set_random_seed(0)
    model = _dead_mlp()
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    alarm = tfqkd.training.DeadRunAlarm(num_classes=10)
    history = model.fit(x, y, epochs=5, batch_size=32, verbose=0, callbacks=[alarm])
    assert len(history.history["loss"]) == 1  # stopped after the first epoch
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training is dead in stage training: in epoch 1 the training accuracy" in err[0]
    assert "(ln 10 = 2.303)" in err[0] and "restored the weights from the start of the stage" in err[0]
    with pytest.raises(TfqkdError, match="training is dead"):
        alarm.check()
    # Without an accuracy metric the loss at ln(classes) decides.
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    quiet = tfqkd.training.DeadRunAlarm(num_classes=10, verbose=False)
    assert len(model.fit(x, y, epochs=5, batch_size=32, verbose=0, callbacks=[quiet]).history["loss"]) == 1
    assert quiet.diverged is not None and "loss flat at 2.30" in quiet.diverged


def test_dead_run_alarm_is_silent_on_live_runs_slow_or_fast():
    x, y = _digits()
    for lr in (1e-2, 1e-4):  # 1e-4: near chance after one epoch, but the loss falls
        keras.utils.set_random_seed(0)
        model = tfqkd.create_model("kl_mlp_student", num_classes=10, input_shape=x.shape[1:], quant="w8a8")
        model.compile(keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
        alarm = tfqkd.training.DeadRunAlarm(num_classes=10)
        history = model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[alarm])
        assert alarm.diverged is None and len(history.history["loss"]) == 3


def test_is_dead_epoch_rules():
    from tfqkd.training.guard import is_dead_epoch

    assert is_dead_epoch(10, accuracy=0.11, early_loss=2.31, late_loss=2.303)
    assert not is_dead_epoch(10, accuracy=0.11, early_loss=2.35, late_loss=2.20)  # slow but learning
    assert not is_dead_epoch(10, accuracy=0.40, early_loss=1.20, late_loss=1.20)  # a plateau above chance
    assert is_dead_epoch(100, accuracy=None, early_loss=4.61, late_loss=4.605)
    assert not is_dead_epoch(100, accuracy=None, early_loss=3.0, late_loss=3.0)  # flat, but far below ln 100
    assert not is_dead_epoch(10, accuracy=0.1, early_loss=float("nan"), late_loss=2.3)
    with pytest.raises(TfqkdError, match="num_classes"):
        tfqkd.training.DeadRunAlarm(num_classes=1)


def test_recipe_stops_a_dead_stage_with_one_line(tmp_path, capsys, monkeypatch, write_recipe):
    import dataclasses

    import tfqkd.recipes.qkd as qkd
    from tfqkd.models import registry

    dead = dataclasses.replace(registry._REGISTRY["kl_mlp_student"], name="test_dead_mlp", builder=_dead_mlp)
    monkeypatch.setitem(registry._REGISTRY, "test_dead_mlp", dead)
    config = _lr_1e6(write_recipe, tmp_path / "dead.yaml", student="test_dead_mlp")
    run_dir = tmp_path / "run"
    assert qkd.main(["--config", str(config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert "training is dead in stage student_fp: in epoch 1" in lines[0]
    assert not (run_dir / "models" / "student_fp.h5").exists()


@pytest.mark.parametrize("run_dir", ["/proc/tfqkd-nope", "/proc/tfqkd-nope/deeper", "/sys/tfqkd-nope"])
def test_unwritable_run_directory_is_one_line_before_training(tmp_path, capsys, run_dir, write_recipe):
    import tfqkd.recipes.qkd as qkd

    config = _lr_1e6(write_recipe, tmp_path / "tiny.yaml")
    assert qkd.main(["--config", str(config), "--run-dir", run_dir]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot be written" in lines[0] and run_dir in lines[0], lines
    assert "[tfqkd] stage" not in captured.out  # nothing trained
    assert not Path(run_dir).exists()


def test_dead_run_alarm_with_patience_restores_the_last_live_epoch():
    x, y = _digits()
    keras.utils.set_random_seed(0)
    model = _dead_mlp()
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    start = [w.copy() for w in model.get_weights()]
    alarm = tfqkd.training.DeadRunAlarm(num_classes=10, patience=2, verbose=False)
    history = model.fit(x, y, epochs=5, batch_size=32, verbose=0, callbacks=[alarm])
    assert len(history.history["loss"]) == 2 and "in epochs 1-2" in alarm.diverged
    assert "restored the weights from the start of the stage" in alarm.diverged
    for before, after in zip(start, model.get_weights()):
        np.testing.assert_array_equal(before, after)
