"""Resume after a crash (issue 8): atomic stage checkpoints, --resume, --deterministic.

The kill tests run the qkd recipe as a subprocess, SIGKILL it at seeded
random moments, check that every checkpoint and stage model on disk still
loads, and ``--resume`` until it finishes; the final results and models must
be bit-identical to an uninterrupted ``--deterministic`` run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import tfqkd
import tfqkd.data as data
from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.training import make_sgd
from tfqkd.training.checkpoint import (
    EpochCheckpoint,
    capture,
    checkpoint_path,
    clean_temporary,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    restore,
    write_checkpoint,
)

#: The shared tiny recipe (conftest), with more epochs, a warm-up and milestones to resume across.
TINY_RESUME = dict(
    name="tiny-resume", seed=3, batch_size=32, train_limit=512,
    schedules={
        "teacher_baseline": {"epochs": 2, "lr": 0.05, "warmup": 1},
        "student_baseline": {"epochs": 2, "lr": 0.05, "milestones": [1]},
        "ss": {"epochs": 2, "lr": 0.01},
        "cs": {"epochs": 3, "lr": 0.01, "milestones": [2]},
        "ts": {"epochs": 2, "lr": 0.01},
    },
)  # fmt: skip

_TF_CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] )")


def _stderr(text):
    """stderr without TensorFlow's C++ start-up lines."""
    return "\n".join(line for line in text.splitlines() if not _TF_CHATTER.match(line))


def _command(*args):
    return [sys.executable, "-m", "tfqkd.recipes.qkd", *[str(a) for a in args]]


def _env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, write_recipe):
    """A tiny but complete QKD pipeline (6 stages, 13 epochs): ~25 s uninterrupted on 2 CPU cores."""
    return write_recipe(tmp_path_factory.mktemp("resume-config") / "tiny.yaml", **TINY_RESUME)


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """An uninterrupted --deterministic run: (run_dir, seconds)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    start = time.monotonic()
    done = subprocess.run(
        _command("--config", config_file, "--run-dir", run_dir, "--deterministic"),
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, _stderr(done.stderr)[-3000:]
    return run_dir, time.monotonic() - start


def _metrics(run_dir):
    rows = json.loads((run_dir / "results.json").read_text())["results"]
    return [(r["method"], r["train_top1"], r["test_top1"]) for r in rows]


def _h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def _check_everything_on_disk_loads(run_dir):
    """Every checkpoint and every stage model in the run directory reads; returns their count."""
    from tfqkd.io import load_model

    count = 0
    for directory in sorted((run_dir / "stages").glob("*/checkpoints")):
        for _, path in list_checkpoints(directory):
            state = read_checkpoint(path)  # raises TfqkdError if unreadable
            assert state.networks and all(np.isfinite(a).all() for entries in state.networks.values() for _, a in entries)
            count += 1
    # Hidden ".name.tmp.h5" files are writes in progress, never read by a run.
    for path in sorted(p for p in (run_dir / "models").glob("*.h5") if not p.name.startswith(".")):
        load_model(path)
        count += 1
    return count


def _kill_and_resume(config_file, run_root, kills, seed, horizon):
    """Runs the recipe, SIGKILLs it ``kills`` times at random moments, resumes to the end.

    Returns:
      a list of finished run directories and a log of what happened.
    """
    rng = np.random.default_rng(seed)
    log, finished, killed, trial = [], [], 0, 0
    while killed < kills:
        run_dir = run_root / f"trial{trial}"
        trial += 1
        args = ("--config", config_file, "--run-dir", run_dir, "--deterministic")
        while True:
            delay = float(rng.uniform(0.5, horizon))
            process = subprocess.Popen(
                _command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()
            )  # fmt: skip
            try:
                process.wait(timeout=delay if killed < kills else 600)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                process.stderr.close()
                killed += 1
                loaded = _check_everything_on_disk_loads(run_dir) if run_dir.exists() else 0
                # Killed before the run directory had its config.yaml: there is
                # nothing to resume (--resume says so), so start it again.
                started = (run_dir / "config.yaml").exists()
                log.append(
                    f"{run_dir.name}: killed after {delay:.1f} s; {loaded} checkpoint/model files load"
                    + ("" if started else "; no config.yaml yet, restarting")
                )
                args = ("--resume", run_dir) if started else args
                continue
            err = process.stderr.read()
            process.stderr.close()
            assert process.returncode == 0, f"{run_dir.name} {args[0]}: exit {process.returncode}\n{_stderr(err)[-3000:]}"
            log.append(f"{run_dir.name}: finished ({args[0]})")
            finished.append(run_dir)
            break
    return finished, log


def _assert_same_as_reference(run_dir, reference_dir):
    assert _metrics(run_dir) == _metrics(reference_dir)
    names = sorted(p.name for p in (reference_dir / "models").glob("*.h5"))
    assert sorted(p.name for p in (run_dir / "models").glob("*.h5")) == names
    for name in names:
        ours, theirs = _h5_arrays(run_dir / "models" / name), _h5_arrays(reference_dir / "models" / name)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert np.array_equal(ours[key], theirs[key]), f"{name}:{key} differs"  # bit-identical weights


def _kill_test(config_file, reference, tmp_path, kills, seed):
    reference_dir, seconds = reference
    finished, log = _kill_and_resume(config_file, tmp_path, kills, seed, horizon=seconds)
    print("\n".join(log))
    assert len([line for line in log if "killed" in line]) == kills
    for run_dir in finished:
        _assert_same_as_reference(run_dir, reference_dir)
        assert not list(run_dir.glob("stages/*/checkpoints/.*.tmp-*"))


def test_qkd_killed_3_times_resumes_to_bit_identical_results(config_file, reference, tmp_path):
    _kill_test(config_file, reference, tmp_path, kills=3, seed=8)


@pytest.mark.slow
def test_qkd_killed_10_times_resumes_to_bit_identical_results(config_file, reference, tmp_path):
    _kill_test(config_file, reference, tmp_path, kills=10, seed=2024)


@pytest.mark.slow
def test_deterministic_run_repeats_bit_identically(config_file, reference, tmp_path):
    # A second uninterrupted run, same seed: same metrics and bit-identical models.
    run_dir = tmp_path / "again"
    done = subprocess.run(
        _command("--config", config_file, "--run-dir", run_dir, "--deterministic"),
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, _stderr(done.stderr)[-3000:]
    _assert_same_as_reference(run_dir, reference[0])
    runtime = json.loads((run_dir / "runtime.json").read_text())
    assert runtime["deterministic"] is True and runtime["recipe"] == "qkd"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resume", "{tmp}/missing"], "not a run directory"),
        (["--resume", "{tmp}", "--config", "{config}"], "drop --config"),
        (["--resume", "{tmp}", "--seed", "3"], "drop --seed"),
        (["--resume", ""], "needs a run directory"),
    ],
)
def test_resume_refuses_bad_run_directories_with_one_line(argv, message, config_file, tmp_path, capsys):
    from tfqkd.recipes import qkd

    argv = [a.format(tmp=tmp_path, config=config_file) for a in argv]
    assert qkd.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_resume_refuses_a_run_of_another_recipe(tmp_path, capsys, write_recipe):
    from tfqkd.recipes import baseline

    write_recipe(tmp_path / "config.yaml", **TINY_RESUME)
    (tmp_path / "runtime.json").write_text(json.dumps({"recipe": "qkd"}))
    assert baseline.main(["--resume", str(tmp_path)]) == 2
    assert "is a run of recipe 'qkd', not 'baseline'" in capsys.readouterr().err


# Checkpoint files --------------------------------------------------------------------------------


def _pair(seed=0):
    # Dropout on tf.random.Generator (as the recipes set it): its state is a
    # variable the checkpoint can hold; legacy stateful kernels keep theirs hidden.
    keras.backend.experimental.enable_tf_random_generator()
    keras.utils.set_random_seed(seed)

    def net(width, name):
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(width, activation="relu")(inputs)
        hidden = keras.layers.BatchNormalization()(hidden)
        hidden = keras.layers.Dropout(0.3)(hidden)
        return keras.Model(inputs, keras.layers.Dense(3)(hidden), name=name)

    model = tfqkd.QKD(net(8, "student"), net(16, "teacher"), phase="cs", alpha=0.5, temperature=2.0)
    model.compile(make_sgd(0.05), teacher_optimizer=make_sgd(0.05))
    return model


def _batches(epoch_seed):
    rng = np.random.default_rng(epoch_seed)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)
    return x, y


def _all_state(model):
    arrays = [w.copy() for w in model.student.get_weights() + model.teacher.get_weights()]
    for opt in (model.optimizer, model.teacher_optimizer):
        arrays += [np.array(v.numpy()) for v in opt.variables]
    return arrays


def test_checkpoint_round_trip_continues_co_studying_exactly(tmp_path):
    x, y = _batches(0)
    straight = _pair()
    straight.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    saved = capture(straight, epoch=2, stage="cs", phase="cs")
    write_checkpoint(checkpoint_path(tmp_path, 2), saved)
    straight.fit(x, y, batch_size=8, epochs=3, initial_epoch=2, shuffle=False, verbose=0)

    resumed = _pair(seed=1)  # other initial weights: everything must come from the file
    state = latest_checkpoint(tmp_path, stage="cs")
    assert state.epoch == 2 and state.phase == "cs" and set(state.networks) == {"student", "teacher"}
    assert set(state.optimizers) == {"optimizer", "teacher_optimizer"}
    restore(resumed, state)
    assert int(resumed.optimizer.iterations.numpy()) == 8  # the schedule step: 2 epochs x 4 batches
    assert int(resumed.teacher_optimizer.iterations.numpy()) == 8
    resumed.fit(x, y, batch_size=8, epochs=3, initial_epoch=2, shuffle=False, verbose=0)
    for a, b in zip(_all_state(straight), _all_state(resumed)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_restores_the_random_state(tmp_path):
    import random

    model = _pair()
    random.seed(5)
    np.random.seed(5)
    state = capture(model, epoch=1, stage="cs", phase="cs")
    write_checkpoint(tmp_path / "epoch_001.weights.h5", state)
    expected = (random.random(), np.random.rand())
    random.seed(99)
    np.random.seed(99)
    restore(model, read_checkpoint(tmp_path / "epoch_001.weights.h5"))
    assert (random.random(), np.random.rand()) == expected


def test_checkpoint_callback_keeps_the_newest_and_never_leaves_temporary_files(tmp_path):
    x, y = _batches(1)
    model = _pair()
    callback = EpochCheckpoint(tmp_path, stage="cs", phase="cs", keep=2)
    model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[callback])
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_003.weights.h5", "epoch_004.weights.h5"]
    assert latest_checkpoint(tmp_path).epoch == 4


def test_damaged_or_foreign_checkpoints_give_one_line_errors(tmp_path):
    model = _pair()
    good = write_checkpoint(tmp_path / "epoch_001.weights.h5", capture(model, epoch=1, stage="cs", phase="cs"))
    truncated = tmp_path / "epoch_002.weights.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TfqkdError, match="unreadable") as err:
        read_checkpoint(truncated)
    assert "\n" not in str(err.value)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle.create_dataset("w", data=np.zeros(3))
    with pytest.raises(TfqkdError, match="not a tfqkd stage checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(TfqkdError, match="belongs to stage"):
        latest_checkpoint(_only(tmp_path, good), stage="ss")
    other = _pair()
    other_ss = tfqkd.QKD(other.student, phase="ss")
    other_ss.compile(make_sgd(0.1))
    with pytest.raises(TfqkdError, match="networks"):
        restore(other_ss, read_checkpoint(good))


def _only(tmp_path, path):
    directory = tmp_path / "only"
    directory.mkdir()
    (directory / path.name).write_bytes(path.read_bytes())
    return directory


_WRITER = """
import sys, time
import numpy as np
from tfqkd.training.checkpoint import CheckpointState, checkpoint_path, write_checkpoint
directory = sys.argv[1]
rng = np.random.default_rng(0)
big = [("w%d" % i, rng.normal(size=(256, 256)).astype("float32")) for i in range(16)]  # 4 MiB per file
epoch = 0
print("ready", flush=True)
while True:
    epoch += 1
    state = CheckpointState(epoch=epoch, stage="s", phase="ss", networks={"student": big})
    write_checkpoint(checkpoint_path(directory, epoch), state)
"""


@pytest.mark.parametrize("kills", [3, pytest.param(10, marks=pytest.mark.slow)])
def test_writer_killed_at_random_moments_never_leaves_a_broken_checkpoint(kills, tmp_path):
    """SIGKILL a process that writes 4 MiB checkpoints back to back: whatever is named epoch_*.h5 reads."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    rng = np.random.default_rng(7 + kills)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for _ in range(kills):
        process = subprocess.Popen(
            [sys.executable, str(script), str(directory)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=_env(),
        )  # fmt: skip
        assert process.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.6)))
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        for _, path in list_checkpoints(directory):
            read_checkpoint(path)
        clean_temporary(directory)
        for _, path in list_checkpoints(directory):  # start the next round with an empty directory
            path.unlink()
    assert not list(directory.iterdir())


# Epoch-indexed data ------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", ["none", "cifar"])
def test_epoch_indexed_pipeline_resumes_with_the_same_batches(augment):
    common = dict(batch_size=48, with_index=True, seed=11, limit=200, augment=augment)
    steps = -(-200 // 48)
    straight = data.load("digits", "train", initial_epoch=0, **common)
    epochs = list(straight.take(3 * steps).as_numpy_iterator())
    resumed = list(data.load("digits", "train", initial_epoch=2, **common).take(steps).as_numpy_iterator())
    for a, b in zip(epochs[2 * steps :], resumed):
        for part_a, part_b in zip(a, b):
            np.testing.assert_array_equal(part_a, part_b)
    # Every epoch is a permutation of the split, and epochs differ in order.
    first = np.concatenate([b[2] for b in epochs[:steps]])
    second = np.concatenate([b[2] for b in epochs[steps : 2 * steps]])
    assert sorted(first) == list(range(200)) and sorted(second) == list(range(200))
    assert not np.array_equal(first, second)
    assert [len(b[0]) for b in epochs[:steps]] == [48, 48, 48, 48, 8]  # no batch straddles two epochs


def test_epoch_indexed_pipeline_rejects_a_bad_initial_epoch():
    with pytest.raises(TfqkdError, match="initial_epoch"):
        data.load("digits", "train", initial_epoch=-1)
