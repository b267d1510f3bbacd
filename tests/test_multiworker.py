"""Multi-worker training (issue 8): co-studying on two processes equals one process.

Two worker processes on 127.0.0.1 run the QKD co-studying phase under
``MultiWorkerMirroredStrategy`` (TF_CONFIG, DATA sharding: each worker takes
half of every global batch). After N steps their per-step losses and the
trained weights must match a single-process run with the same global batch.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from tfqkd.errors import TfqkdError
from tfqkd.training.distribute import is_chief, make_strategy

_TF_CHATTER = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] )")

STEPS = 6
GLOBAL_BATCH = 16

# Dense-only networks: batch-norm statistics would be per replica and differ by design.
_WORKER = """
import json, sys
import numpy as np
import tfqkd
from tfqkd.compat import keras, tf
from tfqkd.training import make_sgd, make_strategy, shard_by_data

mode, out, steps, global_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
strategy = make_strategy("multiworker" if mode == "multi" else "default")
rng = np.random.default_rng(0)
x = rng.normal(size=(global_batch * steps, 10)).astype("float32")
y = rng.integers(0, 4, size=global_batch * steps).astype("int64")
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
if mode == "multi":
    ds = shard_by_data(ds)


def net(width, seed):
    inputs = keras.Input((10,))
    hidden = keras.layers.Dense(width, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed))(inputs)
    logits = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(seed + 1))(hidden)
    return keras.Model(inputs, logits)


with strategy.scope():
    model = tfqkd.QKD(net(12, 1), net(24, 3), phase="cs", alpha=0.7, temperature=4.0)
    model.compile(make_sgd(0.1), teacher_optimizer=make_sgd(0.1))
# Keras's default "auto" sums each replica's copy of the (already global)
# metric results in batch logs; "first" takes one copy (as tfqkd's Run does).
model.distribute_reduction_method = "first"
logs, metrics = [], []


def on_batch_end(batch, batch_logs):
    logs.append({k: float(v) for k, v in batch_logs.items()})
    # Read in cross-replica context: the metric variables summed over all replicas.
    metrics.append({m.name: float(m.result()) for m in model.metrics})


model.fit(ds, epochs=1, steps_per_epoch=steps, callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)], verbose=0)
result = {
    "replicas": int(strategy.num_replicas_in_sync),
    "logs": logs,
    "metrics": metrics,
    "student": [w.tolist() for w in model.student.get_weights()],
    "teacher": [w.tolist() for w in model.teacher.get_weights()],
}
with open(out, "w") as handle:
    json.dump(result, handle)
"""


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _clean(text):
    return "\n".join(line for line in text.splitlines() if not _TF_CHATTER.match(line))


def _env(tf_config=None):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "1"
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def test_two_workers_co_study_like_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    args = [str(STEPS), str(GLOBAL_BATCH)]
    single = subprocess.run(
        [sys.executable, str(script), "single", str(tmp_path / "single.json"), *args],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, _clean(single.stderr)[-3000:]

    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), "multi", str(tmp_path / f"worker{index}.json"), *args],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(config),
            )  # fmt: skip
        )
    for process in processes:
        try:
            _, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        assert process.returncode == 0, _clean(err)[-3000:]

    reference = json.loads((tmp_path / "single.json").read_text())
    assert reference["replicas"] == 1 and len(reference["logs"]) == STEPS
    for index in range(2):
        result = json.loads((tmp_path / f"worker{index}.json").read_text())
        assert result["replicas"] == 2 and len(result["logs"]) == STEPS
        for source in ("metrics", "logs"):
            for step, (ours, theirs) in enumerate(zip(result[source], reference[source])):
                for key in ("loss", "teacher_loss", "accuracy", "teacher_accuracy"):
                    difference = abs(ours[key] - theirs[key])
                    print(f"worker {index} {source} step {step + 1} {key}: {ours[key]:.6f} vs {theirs[key]:.6f} (|diff| {difference:.2e})")
                    assert difference <= 1e-3, (index, source, step, key)
        for role in ("student", "teacher"):
            for ours, theirs in zip(result[role], reference[role]):
                np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5)


def test_multiworker_needs_a_valid_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(TfqkdError, match="needs TF_CONFIG"):
        make_strategy("multiworker")
    for bad, message in [
        ("{not json", "not valid JSON"),
        ('{"cluster": {"worker": ["a:1"]}}', "'task' mapping"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 2}}', "outside"),
        ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ]:
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(TfqkdError, match=message):
            make_strategy("multiworker")
    with pytest.raises(TfqkdError, match="unknown strategy"):
        make_strategy("tpu")


def test_single_process_strategies_are_chief():
    assert is_chief(make_strategy("default"))


def test_recipe_runs_under_mirrored_strategy_and_records_it(tmp_path, capsys, write_recipe):
    from tfqkd.recipes import baseline

    config = write_recipe(tmp_path / "baseline.yaml", student="dnn30", quant="w8a8", batch_size=32,
                          schedules={"student_baseline": {"epochs": 2, "lr": 0.05}})  # fmt: skip
    run_dir = tmp_path / "run"
    assert baseline.main(["--config", str(config), "--run-dir", str(run_dir), "--strategy", "mirrored"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert json.loads((run_dir / "runtime.json").read_text())["strategy"] == "mirrored"
    rows = json.loads((run_dir / "results.json").read_text())["results"]
    assert [row["method"] for row in rows] == ["Baseline (FP)"] and rows[0]["test_top1"] > 20.0
    checkpoints = sorted(p.name for p in (run_dir / "stages" / "student_fp" / "checkpoints").iterdir())
    assert checkpoints == ["epoch_001.weights.h5", "epoch_002.weights.h5"]
