"""The pieces recipes compose: run directory, training stages, evaluation, results.

A run directory holds::

    config.yaml              the resolved recipe
    runtime.json             how it was started (recipe, --deterministic, --strategy, model files)
    models/<name>.h5         each stage's final model (written atomically)
    stages/<name>/           per-epoch checkpoints, history.csv, TensorBoard logs
    results.json, results.csv, comparison.png

Stage models already present in the run directory are reused, so a recipe
that was interrupted between stages continues from the last finished stage.
With ``resume=True`` (``--resume RUN_DIR``) an unfinished stage also
continues after its last checkpointed epoch (both networks, both optimizers
with their schedule step, the random state); the data order of every epoch
is a function of the seed, the stage and the epoch, so the resumed run sees
the batches the uninterrupted one would have seen.
"""

import json
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

import tfqkd.data as data
from tfqkd import atomic
from tfqkd.compat import keras, tf
from tfqkd.distill import QKD, precompute_teacher_logits
from tfqkd.errors import TfqkdError
from tfqkd.io import load_model
from tfqkd.models import create_model
from tfqkd.quant import custom_objects, quantize
from tfqkd.quant.quantizers import quantizer_state_suffixes
from tfqkd.training import DivergenceGuard, WarmupMultiStep, make_sgd
from tfqkd.training import check as check_divergence
from tfqkd.training.checkpoint import EpochCheckpoint, clean_temporary, latest_checkpoint, list_checkpoints, restore
from tfqkd.training.distribute import is_chief, shard_by_data, worker_count
from tfqkd.plotting import pyplot, save_figure

__all__ = ["Run", "copy_model", "evaluate_top1", "save_model_atomic", "train_baseline", "write_results"]

# Quantizer steps and ranges are excluded from weight decay: decaying a step
# shrinks the quantization interval, which is not a regulariser.
_NO_DECAY = quantizer_state_suffixes()


def copy_model(model):
    """An independent copy (architecture and weights) of a float or quantized model."""
    with keras.utils.custom_object_scope(custom_objects()):
        clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def save_model_atomic(model, path, chief=True):
    """Saves ``model`` to ``path`` via a temporary file and a rename (never half-written).

    Args:
      model: the Keras model.
      path: destination file (.h5 or .keras).
      chief: False on the other workers of a multi-worker run: they must take
        part in saving (reading synchronised variables is a collective
        operation) but write to a private temporary directory, not ``path``.
    """
    path = Path(path)
    if not chief:
        scratch = Path(tempfile.mkdtemp(prefix="tfqkd-worker-"))
        try:
            model.save(scratch / path.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    with atomic.replacing(path, fsync=True) as tmp:  # on disk before the rename makes it visible
        model.save(tmp)


def evaluate_top1(model, x, y, batch_size=256):
    """Top-1 accuracy in percent of a logits model on arrays."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(100.0 * np.mean(np.argmax(logits, axis=-1) == y))


@dataclass
class Run:
    """One recipe run: config, run directory, data and the stage machinery.

    Models and optimizers must be created inside :meth:`scope` (the recipes
    run their whole body in it).

    Args:
      config: validated recipe config.
      run_dir: the run directory (created).
      verbose: Keras fit verbosity (1 progress bar, 2 one line per epoch).
      resume: continue unfinished stages from their last checkpoint; without
        it an unfinished stage starts over (finished stages are reused either way).
      strategy: the ``tf.distribute`` strategy (default: the current one).
      runtime: how the run was started, stored as ``runtime.json`` so that
        ``--resume`` can restart it the same way.
    """

    config: dict
    run_dir: Path
    verbose: int = field(default_factory=lambda: 1 if sys.stdout.isatty() else 2)
    resume: bool = False
    strategy: object = None
    runtime: dict = None

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        if self.strategy is None:
            self.strategy = tf.distribute.get_strategy()
        self.chief = is_chief(self.strategy)
        self.workers = worker_count(self.strategy)
        (self.run_dir / "models").mkdir(parents=True, exist_ok=True)
        if self.chief:
            # Temporary files of writes a killed process never finished
            # (".student_ss.tmp.h5", ".results.tmp.json"); the real files are intact.
            for leftover in [*self.run_dir.glob(".*.tmp.*"), *(self.run_dir / "models").glob(".*.tmp.h5")]:
                leftover.unlink(missing_ok=True)
        self.info = data.dataset_info(self.config["dataset"])
        # Random layers (Dropout) draw from tf.random.Generator variables, whose
        # state a checkpoint holds; the legacy stateful kernels keep theirs
        # hidden and would restart their sequence in a resumed process.
        keras.backend.experimental.enable_tf_random_generator()
        keras.utils.set_random_seed(self.config["seed"])
        # A seeded global generator (its state is checkpointed); with op
        # determinism TensorFlow refuses to create an unseeded one implicitly.
        tf.random.set_global_generator(tf.random.Generator.from_seed(self.config["seed"]))
        cfg, name = self.config, self.config["dataset"]
        common = dict(batch_size=cfg["batch_size"], data_dir=cfg.get("data_dir"))
        self.test_ds = data.load(name, "test", **common)
        self.train_examples = min(self.info.train_size, cfg["train_limit"] or self.info.train_size)
        self.steps_per_epoch = -(-self.train_examples // cfg["batch_size"])
        self.x_test, self.y_test = data.load_arrays(name, "test", data_dir=cfg.get("data_dir"))
        self.x_train_eval, self.y_train_eval = data.load_arrays(
            name, "train", data_dir=cfg.get("data_dir"), limit=cfg["eval_train_limit"] or cfg["train_limit"]
        )
        self.augmented = self.info.augment not in (None, "none")
        self.results = []
        if self.chief:
            self._write_text("config.yaml", yaml.safe_dump(self.config, sort_keys=False))
            if self.runtime is not None:
                self._write_text("runtime.json", json.dumps(self.runtime, indent=2))

    # Bookkeeping ------------------------------------------------------------------------
    def _write_text(self, name, text):
        atomic.write_text(self.run_dir / name, text)

    def scope(self):
        """The strategy scope models and optimizers are created in."""
        return self.strategy.scope()

    def model_path(self, name):
        return self.run_dir / "models" / f"{name}.h5"

    def save_model(self, model, name):
        """Saves the finished stage ``name`` atomically (only the chief writes)."""
        save_model_atomic(model, self.model_path(name), chief=self.chief)

    def train_data(self, stage, initial_epoch):
        """The training pipeline of ``stage`` from ``initial_epoch`` on (epoch-indexed).

        Each stage draws its own epoch orders (seeded by the config seed and
        the stage name), and epoch ``e``'s order does not depend on how many
        epochs this process ran before, which makes resuming exact.
        """
        cfg = self.config
        seed = (cfg["seed"] * 65_537 + zlib.crc32(stage.encode())) % 2**31
        ds = data.load(
            cfg["dataset"], "train", batch_size=cfg["batch_size"], with_index=True, seed=seed,
            limit=cfg["train_limit"], data_dir=cfg.get("data_dir"), initial_epoch=initial_epoch,
        )  # fmt: skip
        return shard_by_data(ds) if self.workers > 1 else ds

    def log(self, message):
        print(f"[tfqkd] {message}", flush=True)

    # Models -----------------------------------------------------------------------------
    def new_model(self, role):
        """A fresh float model for ``role`` ("student" or "teacher")."""
        return create_model(self.config[role], num_classes=self.info.num_classes, input_shape=self.info.input_shape)

    def load_stage(self, name):
        """The saved model of stage ``name`` if this run already finished it, else None."""
        path = self.model_path(name)
        if path.exists():
            self.log(f"reusing {path}")
            return load_model(path)
        return None

    def _stage_checkpoint(self, name, phase, checkpoints):
        """The checkpoint an unfinished stage continues from, or None to start it over."""
        if self.chief:
            clean_temporary(checkpoints)  # left by a writer killed mid-write
        if self.resume:
            state = latest_checkpoint(checkpoints, stage=name)
            if state is not None and state.phase != phase:
                raise TfqkdError(f"{state.path} is of phase {state.phase!r}, stage {name} trains phase {phase!r}")
            return state
        stale = list_checkpoints(checkpoints)
        if stale:
            self.log(f"stage {name}: starting over; pass --resume {self.run_dir} to continue from epoch {stale[-1][0]}")
            if self.chief:
                for _, path in stale:
                    path.unlink(missing_ok=True)
        return None

    def _history_csv(self, path, initial_epoch):
        """CSVLogger for the stage; on resume it keeps the rows of the epochs already done."""
        if initial_epoch > 0 and path.exists():
            lines = path.read_text().splitlines()
            # Header plus one row per finished epoch; a row written after the
            # last checkpoint (killed in between) is dropped and written again.
            atomic.write_text(path, "".join(f"{line}\n" for line in lines[: initial_epoch + 1]))
            return keras.callbacks.CSVLogger(str(path), append=True)
        return keras.callbacks.CSVLogger(str(path))

    def calibration_batch(self, n=256):
        """Training inputs that initialise the quantization intervals (QKD Algorithm 1, line 2)."""
        cfg = self.config
        return data.calibration_batch(cfg["dataset"], n=n, seed=cfg["seed"], data_dir=cfg.get("data_dir"))

    # Training ---------------------------------------------------------------------------
    def _optimizer(self, schedule):
        lr = WarmupMultiStep(
            schedule["lr"], self.steps_per_epoch, schedule["warmup"], schedule["milestones"], schedule["factor"]
        )
        return make_sgd(lr, momentum=self.config["momentum"], weight_decay=self.config["weight_decay"], exclude=_NO_DECAY)

    def _teacher_cache(self, teacher):
        mode = self.config["teacher_cache"]
        if mode == "off" or (mode == "auto" and self.augmented):
            return None
        if mode == "on" and self.augmented:
            self.log("warning: teacher_cache=on with augmented inputs: cached logits are of un-augmented images")
        ordered = data.load(
            self.config["dataset"], "train", batch_size=256, shuffle=False, augment="none", with_index=True,
            limit=self.config["train_limit"], data_dir=self.config.get("data_dir"),
        )  # fmt: skip
        return precompute_teacher_logits(teacher, ordered, self.train_examples)

    def train(self, name, schedule, student, teacher=None, phase="ss"):
        """Runs one compile/fit stage and saves the resulting student.

        Args:
          name: the stage's name in the run directory (``ss``, ``ss_ts``, ``cs``, ...).
          schedule: the key of its schedule in ``config["schedules"]``.
          student: the network being trained (modified in place).
          teacher: the teacher for ``cs``/``ts``.
          phase: "ss", "cs" or "ts".

        Returns:
          the Keras History, or None if a resumed stage had no epoch left.
        """
        schedule = self.config["schedules"][schedule]
        epochs = schedule["epochs"]
        stage_dir = self.run_dir / "stages" / name
        checkpoints = stage_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        state = self._stage_checkpoint(name, phase, checkpoints)
        # The teacher of a ts stage comes from a finished stage's model file,
        # so a resumed stage recomputes the same cache from the same weights.
        cache = self._teacher_cache(teacher) if phase == "ts" else None
        model = QKD(
            student, teacher if phase != "ss" else None, phase=phase, alpha=self.config["alpha"],
            temperature=self.config["temperature"], teacher_logits=cache,
        )  # fmt: skip
        model.compile(self._optimizer(schedule), teacher_optimizer=self._optimizer(schedule) if phase == "cs" else None)
        initial_epoch = 0
        if state is not None:
            restore(model, state)  # both networks, both optimizers (schedule step), random state
            initial_epoch = min(state.epoch, epochs)
            self.log(f"stage {name}: resuming after epoch {state.epoch} from {state.path}")
        if initial_epoch >= epochs:
            return None
        guard = DivergenceGuard(stage=name, num_classes=self.info.num_classes)  # also stops a dead run
        callbacks = [
            guard,  # first: it restores the last good weights before any other callback sees a bad epoch
            guard.protect(EpochCheckpoint(checkpoints, stage=name, phase=phase, write=self.chief)),  # never a diverged epoch
        ]
        if self.chief:  # one writer of the logs per run
            callbacks += [
                self._history_csv(stage_dir / "history.csv", initial_epoch),
                keras.callbacks.TensorBoard(str(stage_dir / "tensorboard"), write_graph=False, profile_batch=0),
            ]
        self.log(f"stage {name}: phase {phase}, {epochs} epoch(s), lr {schedule['lr']}")
        start = time.time()
        history = model.fit(
            self.train_data(name, initial_epoch), epochs=epochs, initial_epoch=initial_epoch,
            steps_per_epoch=self.steps_per_epoch, validation_data=self.test_ds, callbacks=callbacks,
            verbose=self.verbose,
        )  # fmt: skip
        check_divergence(guard)  # one-line TfqkdError; the stage's model is then not saved
        self.log(f"stage {name} done in {time.time() - start:.0f} s")
        return history

    # Results ----------------------------------------------------------------------------
    def record(self, method, model, seconds=None):
        """Evaluates ``model`` (train and test top-1) and adds a results row."""
        row = {
            "method": method,
            "train_top1": round(evaluate_top1(model, self.x_train_eval, self.y_train_eval), 2),
            "test_top1": round(evaluate_top1(model, self.x_test, self.y_test), 2),
        }
        if seconds is not None:
            row["seconds"] = round(seconds, 1)
        self.results.append(row)
        self.log(f"{method}: train {row['train_top1']:.2f}%  test {row['test_top1']:.2f}%")
        return row


def write_results(run, title):
    """Writes results.json, results.csv and comparison.png and prints the table.

    Args:
      run: the Run with its ``results`` rows.
      title: heading of the table and chart.

    Returns:
      the printed table text.
    """
    rows = run.results
    if run.chief:  # one writer per run directory
        payload = {"title": title, "config": run.config, "results": rows}
        run._write_text("results.json", json.dumps(payload, indent=2))
        columns = ["method", "train_top1", "test_top1", "seconds", "exported"]
        atomic.write_csv(run.run_dir / "results.csv", rows, columns)
        _plot(rows, title, run.run_dir / "comparison.png")
    width = max(len(r["method"]) for r in rows) + 2
    lines = [title, f"{'Method':<{width}}{'Train top-1':>12}{'Test top-1':>12}"]
    lines += [
        f"{r['method']:<{width}}{r['train_top1']:>11.2f}%{r['test_top1']:>11.2f}%" + ("   <- exported" if r.get("exported") else "")
        for r in rows
    ]
    lines.append(f"run directory: {run.run_dir}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _plot(rows, title, path):
    plt = pyplot()

    names = [r["method"] for r in rows]
    positions = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    ax.bar(positions - 0.2, [r["train_top1"] for r in rows], 0.4, label="train")
    bars = ax.bar(positions + 0.2, [r["test_top1"] for r in rows], 0.4, label="test")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    low = min(min(r["train_top1"], r["test_top1"]) for r in rows)
    ax.set_ylim(max(0.0, low - 5.0), 100.0)
    ax.set_xticks(positions, names, rotation=15)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def require_file(path, what):
    """Raises a one-line error if ``path`` is not an existing file."""
    if path is not None and not Path(path).is_file():
        raise TfqkdError(f"{what} not found: {path}")


def quantized_baseline(run, policy, reuse_path=None, unsafe=False):
    """The float student (reused or trained, recorded as "Baseline (FP)") quantized with ``policy`` (PTQ).

    Args:
      run: the Run.
      policy: the QuantPolicy.
      reuse_path, unsafe: see :func:`train_baseline`.

    Returns:
      the quantized twin, its steps calibrated on :meth:`Run.calibration_batch`.
    """
    student = train_baseline(run, "student", reuse_path, unsafe)
    run.record("Baseline (FP)", student)
    return quantize(student, policy, run.calibration_batch())


def train_baseline(run, role, reuse_path=None, unsafe=False):
    """The trained float ``role`` ("teacher"/"student"): reused or trained (baseline stage).

    Args:
      run: the Run.
      role: "teacher" or "student".
      reuse_path: a trained model file to use instead of training.
      unsafe: allow Lambda layers in ``reuse_path``.

    Returns:
      the float keras.Model.
    """
    name = f"{role}_fp"
    if reuse_path is not None and not (run.resume and run.model_path(name).exists()):
        run.log(f"using trained {role} {reuse_path}")
        model = load_model(reuse_path, unsafe=unsafe)
        run.save_model(model, name)
        return model
    model = run.load_stage(name)
    if model is None:
        model = run.new_model(role)
        run.train(name, f"{role}_baseline", model, phase="ss")
        run.save_model(model, name)
    return model
