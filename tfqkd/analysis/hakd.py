"""Hardware-aware knowledge distillation, HAKD (seed 002: Radu et al., "HAKD: Hardware Aware
Knowledge Distillation"; Turner et al., "Characterising Across-Stack Optimisations for Deep
Convolutional Neural Networks").

HAKD designs the student from measurements of the target hardware instead of parameter counts:

1. build a grid of candidate students (width/depth variants of MobileNet or DenseNet);
2. measure each candidate's latency on the target backend: :class:`TFLiteBackend` (the
   int8 TFLite interpreter on this CPU) or :class:`PSMACBackend` (the precision-scalable MAC
   model of seed 004);
3. keep the Pareto front of latency against capacity (MACs by default: at equal latency, the
   candidate with more MACs has more capacity) and pick the highest-capacity candidate on the
   front that meets the latency budget;
4. distill it from the teacher (tutor-studying KD with :class:`tfqkd.QKD`).

:func:`plot_pareto` draws accuracy against latency and against size for the distilled
student, the other candidates, magnitude-pruned models (tfmot ``prune_low_magnitude``;
their size counts non-zero weights, their TFLite latency is that of the dense kernels, the
across-stack paper's point) and int8-quantized models.
"""

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from tfqkd import atomic
from tfqkd.compat import keras, tf
from tfqkd.errors import TfqkdError
from tfqkd.export.runtimes import interpreter_class, quiet_interpreter
from tfqkd.export.tflite import calibration_batches, to_tflite, use_int8_builtins
from tfqkd.export.validate import quantize_inputs, run_tflite
from tfqkd.plotting import pyplot, save_figure

__all__ = [
    "Candidate",
    "PSMACBackend",
    "TFLiteBackend",
    "default_grid",
    "distill",
    "hakd_search",
    "measure_candidates",
    "pareto_front",
    "plot_pareto",
    "prune",
    "recalibrate_batchnorm",
    "select_student",
    "tflite_accuracy",
]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One candidate student: a registered model name and its options.

    Attributes:
      model_name: name for :func:`tfqkd.create_model`.
      options: builder options, e.g. ``{"width_multiplier": 0.5}``.
      label: display name (defaults to ``model_name`` plus options).
    """

    model_name: str
    options: tuple = ()
    label: str = ""

    @property
    def name(self):
        if self.label:
            return self.label
        suffix = "".join(f"_{k[0]}{v}" for k, v in self.options)
        return f"{self.model_name}{suffix}"

    def build(self, input_shape, num_classes):
        """The untrained float model of this candidate."""
        from tfqkd.models import create_model

        return create_model(self.model_name, num_classes=num_classes, input_shape=tuple(input_shape), **dict(self.options))


def default_grid(family="mobilenet"):
    """A small width/depth grid of candidate students.

    Args:
      family: "mobilenet" (MobileNetV1 widths 0.25-1.0 and MobileNetV2 widths 0.35-0.75) or
        "densenet" (DenseNet-BC 21 and 37).

    Returns:
      list of :class:`Candidate`.
    """
    if family == "mobilenet":
        grid = [Candidate("mobilenet_v1", (("width_multiplier", w),), f"mnv1_w{w}") for w in (0.25, 0.5, 0.75, 1.0)]
        grid += [Candidate("mobilenet_v2", (("width_multiplier", w),), f"mnv2_w{w}") for w in (0.35, 0.75)]
        return grid
    if family == "densenet":
        return [Candidate("densenet21"), Candidate("densenet37")]
    raise TfqkdError(f"unknown candidate family {family!r}; expected 'mobilenet' or 'densenet'")


# Backends ------------------------------------------------------------------------------------


def convert_tflite_int8(model, path, calibration):
    """Converts a Keras model to a full-integer int8 .tflite file.

    Uses the project exporter ``tfqkd.export.tflite.to_tflite`` when it accepts the model,
    else TensorFlow's ``TFLiteConverter`` with a representative dataset.

    Args:
      model: float or quantized Keras model.
      path: output file.
      calibration: input array for the activation ranges.

    Returns:
      ``(path, converter)`` where converter names the tool used.
    """
    path = Path(path)
    try:
        to_tflite(model, path, calibration_data=np.asarray(calibration)[:256], format="int8", int8_io=False, force=True,
                  logits="int8")
        return path, "tfqkd.export.tflite"
    except TfqkdError as err:  # a float model the exporter does not take: TensorFlow's own converter
        tool = f"tf.lite.TFLiteConverter (tfqkd exporter: {str(err)[:100]})"
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    use_int8_builtins(converter, calibration_batches(calibration, limit=64), int8_io=False)
    atomic.write_bytes(path, converter.convert(), force=True)
    return path, tool


def _interpreter(path, threads=1):
    Interpreter, _, _ = interpreter_class("tensorflow")  # the runtime tflite_accuracy reads with
    interpreter = quiet_interpreter(Interpreter, model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def tflite_accuracy(path, x, y, batch_size=100):
    """Top-1 accuracy (percent) of a .tflite classifier on arrays (TensorFlow's interpreter, as the timing)."""
    outputs, _ = run_tflite(path, x, batch_size, runtime="tensorflow")
    return 100.0 * float(np.mean(np.argmax(outputs, axis=-1) == np.asarray(y)))


@dataclasses.dataclass
class TFLiteBackend:
    """Latency of the int8 TFLite model on this CPU (batch 1, median of ``runs`` invokes).

    Attributes:
      calibration: input array for int8 conversion (activation ranges).
      runs: timed invocations.
      warmup: untimed invocations first.
      threads: interpreter threads.
      workdir: where .tflite files go (a temporary directory if None).
    """

    calibration: np.ndarray
    runs: int = 50
    warmup: int = 5
    threads: int = 1
    workdir: str | None = None
    name: str = "tflite-int8-cpu"

    def measure(self, model, label="model"):
        """Converts and times ``model``.

        Returns:
          dict ``latency_ms`` (median), ``latency_p90_ms``, ``size_bytes`` (.tflite file),
          ``path`` and ``converter``.
        """
        workdir = Path(self.workdir or tempfile.mkdtemp(prefix="tfqkd_hakd_"))
        workdir.mkdir(parents=True, exist_ok=True)
        path, converter = convert_tflite_int8(model, workdir / f"{label}.tflite", self.calibration)
        interpreter = _interpreter(path, self.threads)
        detail = interpreter.get_input_details()[0]
        interpreter.set_tensor(detail["index"], quantize_inputs(self.calibration[:1], detail))
        for _ in range(self.warmup):
            interpreter.invoke()
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            interpreter.invoke()
            times.append(1e3 * (time.perf_counter() - start))
        return {
            "latency_ms": float(np.median(times)),
            "latency_p90_ms": float(np.percentile(times, 90)),
            "size_bytes": path.stat().st_size,
            "path": str(path),
            "converter": converter,
        }


@dataclasses.dataclass
class PSMACBackend:
    """Latency from the precision-scalable MAC model (seed 004) at uniform ``bits``.

    Attributes:
      bits: operand bits of every layer (weights and activations), or None to read a quantized
        model's own bits.
      psmac: the :class:`tfqkd.analysis.psmac.PSMACModel` (default 16 units at 100 MHz).
    """

    bits: int | None = 8
    psmac: object = None
    name: str = "psmac"

    def measure(self, model, label="model"):
        """Returns dict ``latency_ms``, ``cycles`` and ``size_bytes`` (params x bits / 8)."""
        from tfqkd.analysis.psmac import PSMACModel
        from tfqkd.models import count_params

        psmac = self.psmac or PSMACModel()
        estimate = psmac.estimate(model, None if self.bits is None else (self.bits, self.bits))
        bits = 16 if self.bits is None else self.bits
        return {
            "latency_ms": 1e3 * estimate["seconds"],
            "cycles": estimate["cycles"],
            "size_bytes": int(math.ceil(count_params(model) * bits / 8)),
        }


def measure_candidates(candidates, backend, input_shape, num_classes):
    """Builds every candidate and measures it on ``backend``.

    Args:
      candidates: list of :class:`Candidate`.
      backend: :class:`TFLiteBackend` or :class:`PSMACBackend` (anything with ``measure``).
      input_shape: input shape without batch.
      num_classes: classes.

    Returns:
      list of dict rows: ``name``, ``candidate``, ``params``, ``macs`` and the backend's
      measurements (``latency_ms``, ``size_bytes``, ...).
    """
    from tfqkd.models import count_macs, count_params

    rows = []
    for candidate in candidates:
        model = candidate.build(input_shape, num_classes)
        row = {"name": candidate.name, "candidate": candidate, "params": count_params(model), "macs": count_macs(model)}
        row.update(backend.measure(model, candidate.name))
        rows.append(row)
        del model
    return rows


def pareto_front(rows, cost="latency_ms", value="macs"):
    """Rows not dominated in (lower ``cost``, higher ``value``).

    Args:
      rows: dict rows.
      cost: key to minimise.
      value: key to maximise.

    Returns:
      the non-dominated rows sorted by cost.
    """
    front = []
    for row in rows:
        dominated = any(
            other is not row
            and other[cost] <= row[cost]
            and other[value] >= row[value]
            and (other[cost] < row[cost] or other[value] > row[value])
            for other in rows
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: r[cost])


def select_student(rows, latency_budget, cost="latency_ms", value="macs"):
    """The Pareto-best candidate under a latency budget.

    Args:
      rows: measured rows (see :func:`measure_candidates`).
      latency_budget: the largest allowed ``cost``.
      cost: the latency key.
      value: capacity (or accuracy) key to maximise.

    Returns:
      the row on the Pareto front with ``cost <= latency_budget`` and the highest ``value``.

    Raises:
      TfqkdError: if no candidate meets the budget.
    """
    feasible = [r for r in pareto_front(rows, cost, value) if r[cost] <= latency_budget]
    if not feasible:
        fastest = min(rows, key=lambda r: r[cost]) if rows else None
        hint = f"; the fastest candidate, {fastest['name']}, takes {fastest[cost]:.4g}" if fastest else ""
        raise TfqkdError(f"no candidate student meets the latency budget {latency_budget:.4g}{hint}")
    return max(feasible, key=lambda r: (r[value], -r[cost]))


# Training ------------------------------------------------------------------------------------


def _fit_plain(model, x, y, epochs, learning_rate, batch_size, callbacks=()):
    from tfqkd.training import make_sgd

    model.compile(optimizer=make_sgd(learning_rate), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0, callbacks=list(callbacks))
    return model


def distill(student, teacher, train, epochs=2, alpha=0.7, temperature=8.0, learning_rate=0.05, batch_size=64):
    """Tutor-studying KD of ``student`` from a frozen ``teacher`` with :class:`tfqkd.QKD`.

    Args:
      student: float (or quantized) student, trained in place.
      teacher: trained teacher returning logits.
      train: ``(x, y)`` arrays.
      epochs, alpha, temperature, learning_rate, batch_size: KD schedule (QKD ``ts`` phase,
        Kim et al. 2019 / Hinton et al. 2015 loss).

    Returns:
      ``student``.
    """
    from tfqkd.distill import QKD
    from tfqkd.training import make_sgd

    trainer = QKD(student, teacher, phase="ts", alpha=alpha, temperature=temperature)
    trainer.compile(optimizer=make_sgd(learning_rate))
    trainer.fit(*train, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    recalibrate_batchnorm(student, train[0])
    return student


def recalibrate_batchnorm(model, x, examples=1000):
    """Re-estimates BatchNormalization moving statistics from one large batch.

    A short schedule (a few hundred steps at momentum 0.99) leaves the moving mean and
    variance far from the trained network's statistics, so inference-mode accuracy is near
    chance. With momentum set to 0, one training-mode forward pass over ``examples`` inputs
    makes them that batch's statistics; weights are not changed.

    Args:
      model: Keras model (modified in place).
      x: input array.
      examples: inputs in the batch.

    Returns:
      ``model``.
    """
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return model
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        # Eager call: the momentum attribute is read when the update is built.
        model(np.asarray(x[:examples], np.float32), training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return model


def prune(model, train, sparsity=0.8, epochs=2, learning_rate=0.01, batch_size=64):
    """Magnitude pruning with tfmot (``prune_low_magnitude``), fine-tuned and stripped.

    Args:
      model: trained float model (not modified).
      train: ``(x, y)`` arrays.
      sparsity: final share of zero weights (polynomial schedule over the fine-tuning).
      epochs, learning_rate, batch_size: fine-tuning.

    Returns:
      ``(pruned_model, nonzero_params)``: the stripped Keras model and its non-zero
      trainable parameter count.
    """
    import tensorflow_model_optimization as tfmot

    if not 0.0 < sparsity < 1.0:
        raise TfqkdError(f"sparsity must be in (0, 1), got {sparsity!r}")
    x, y = train
    steps = max(1, epochs * math.ceil(len(x) / batch_size))
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0, end_step=max(1, int(0.8 * steps)), frequency=10
    )
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(clone, pruning_schedule=schedule)
    _fit_plain(wrapped, x, y, epochs, learning_rate, batch_size, [tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    # strip_pruning re-calls the layers, so they carry two inbound nodes; a clean copy has one
    # (MAC counting and TFLite conversion see one call per layer).
    clean = keras.models.clone_model(stripped)
    clean.set_weights(stripped.get_weights())
    stripped = clean
    nonzero = int(sum(np.count_nonzero(w.numpy()) for w in stripped.trainable_weights))
    return stripped, nonzero


# Search --------------------------------------------------------------------------------------


def _accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return 100.0 * float(np.mean(np.argmax(logits, -1) == np.asarray(y)))


def hakd_search(
    teacher, candidates, train, test, backend, latency_budget, epochs=2, alpha=0.7, temperature=8.0,
    learning_rate=0.05, batch_size=64, value="macs", compare_candidates=True, prune_sparsity=0.8, seed=0,
):  # fmt: skip
    """The HAKD loop: measure, pick the Pareto-best student under the budget, distill it.

    Args:
      teacher: trained float teacher (logits).
      candidates: list of :class:`Candidate`.
      train, test: ``(x, y)`` arrays.
      backend: :class:`TFLiteBackend` or :class:`PSMACBackend`.
      latency_budget: milliseconds on ``backend``.
      epochs, alpha, temperature, learning_rate, batch_size: distillation schedule.
      value: capacity key for the Pareto front ("macs" or "params").
      compare_candidates: also distill the other feasible candidates (same schedule) so the
        plot shows their accuracy, and prune the chosen student's undistilled twin.
      prune_sparsity: tfmot sparsity of the pruning comparison (None skips it).
      seed: random seed.

    Returns:
      dict with ``chosen`` (row incl. ``accuracy`` and the trained ``model``), ``rows`` (all
      measured candidates), ``points`` (for :func:`plot_pareto`) and ``seconds``.
    """
    from tfqkd.models import count_params

    start = time.time()
    x_train, _ = train
    input_shape, num_classes = x_train.shape[1:], int(teacher.output_shape[-1])
    rows = measure_candidates(candidates, backend, input_shape, num_classes)
    chosen = select_student(rows, latency_budget, value=value)
    points = []
    teacher_acc = _accuracy(teacher, *test)
    teacher_m = backend.measure(teacher, "teacher")
    points.append({"name": "teacher (float)", "kind": "teacher", "accuracy": teacher_acc,
                   "latency_ms": teacher_m["latency_ms"], "size_bytes": 4 * count_params(teacher)})  # fmt: skip
    feasible = {r["name"] for r in rows if r["latency_ms"] <= latency_budget}
    for row in rows:
        if row is not chosen and not (compare_candidates and row["name"] in feasible):
            row["accuracy"] = None
            continue
        keras.utils.set_random_seed(seed)
        model = row["candidate"].build(input_shape, num_classes)
        distill(model, teacher, train, epochs, alpha, temperature, learning_rate, batch_size)
        row["accuracy"] = _accuracy(model, *test)
        row["model"] = model
        kind = "hakd (chosen)" if row is chosen else "candidate (KD)"
        points.append({"name": row["name"], "kind": kind, "accuracy": row["accuracy"],
                       "latency_ms": row["latency_ms"], "size_bytes": 4 * row["params"]})  # fmt: skip
    student = chosen["model"]
    if isinstance(backend, TFLiteBackend):
        measured = backend.measure(student, chosen["name"] + "_int8")
        points.append({"name": chosen["name"] + " int8", "kind": "quantized (int8 PTQ)",
                       "accuracy": tflite_accuracy(measured["path"], *test), "latency_ms": measured["latency_ms"],
                       "size_bytes": measured["size_bytes"]})  # fmt: skip
        teacher_q = backend.measure(teacher, "teacher_int8")
        points.append({"name": "teacher int8", "kind": "quantized (int8 PTQ)",
                       "accuracy": tflite_accuracy(teacher_q["path"], *test), "latency_ms": teacher_q["latency_ms"],
                       "size_bytes": teacher_q["size_bytes"]})  # fmt: skip
    if prune_sparsity:
        keras.utils.set_random_seed(seed)
        pruned, nonzero = prune(teacher, train, prune_sparsity, epochs, batch_size=batch_size)
        measured = backend.measure(pruned, "teacher_pruned")
        points.append({"name": f"teacher pruned {int(100 * prune_sparsity)}%", "kind": "pruned (tfmot)",
                       "accuracy": _accuracy(pruned, *test), "latency_ms": measured["latency_ms"],
                       "size_bytes": 4 * nonzero})  # fmt: skip
    return {"chosen": chosen, "rows": rows, "points": points, "teacher_accuracy": teacher_acc,
            "latency_budget_ms": latency_budget, "backend": getattr(backend, "name", type(backend).__name__),
            "seconds": time.time() - start}  # fmt: skip


def plot_pareto(points, path, latency_budget=None, title="HAKD: accuracy vs latency and size"):
    """Accuracy against latency and against size, one marker per method.

    Args:
      points: dicts with ``name``, ``kind``, ``accuracy``, ``latency_ms``, ``size_bytes``.
      path: PNG file.
      latency_budget: draws the budget line on the latency panel.
      title: figure title.

    Returns:
      the path written.
    """
    plt = pyplot()

    points = [p for p in points if p.get("accuracy") is not None]
    if not points:
        raise TfqkdError("no points with an accuracy to plot")
    markers = {"teacher": "s", "hakd (chosen)": "*", "candidate (KD)": "o", "quantized (int8 PTQ)": "D", "pruned (tfmot)": "v"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "latency_ms", "latency (ms)"), (axes[1], "size_bytes", "size (KiB)")):
        scale = 1 / 1024 if key == "size_bytes" else 1.0
        for kind in dict.fromkeys(p["kind"] for p in points):
            sel = [p for p in points if p["kind"] == kind]
            ax.scatter([p[key] * scale for p in sel], [p["accuracy"] for p in sel], marker=markers.get(kind, "x"),
                       s=120 if kind == "hakd (chosen)" else 45, label=kind)  # fmt: skip
            for p in sel:
                ax.annotate(p["name"], (p[key] * scale, p["accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([{**p, "_x": p[key]} for p in points], cost="_x", value="accuracy")
        ax.plot([p["_x"] * scale for p in front], [p["accuracy"] for p in front], "k--", linewidth=0.7, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    if latency_budget is not None:
        axes[0].axvline(latency_budget, color="red", linewidth=0.8, label="latency budget")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
