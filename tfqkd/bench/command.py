"""``tfqkd bench MODEL_OR_RUN_DIR``: the thesis's platform comparison (table 7.1) on this CPU.

Times the Keras model in TensorFlow (FP32) and its TFLite float32, float16 and
int8 conversions through the edge runtime over batch sizes 1..1024, then
writes ``bench.json``, ``bench.csv`` (one row per backend and batch),
``table.csv`` and ``latency.png`` / ``throughput.png`` / ``energy.png``.

``MODEL_OR_RUN_DIR`` is a registered model name (an untrained model: fine for
speed), a model file (.h5/.keras), or a run directory of a recipe (the float
``models/student_fp.h5`` for the FP rows, the latest quantized student stage,
e.g. ``student_qkd.h5``, for int8 through ``tfqkd.export.tflite``).
"""

import os
import platform
import time
from pathlib import Path

import numpy as np

from tfqkd import atomic
from tfqkd.errors import TfqkdError
from tfqkd.rundir import quantized_student

__all__ = ["BACKENDS", "add_bench_arguments", "benchmark", "resolve_target", "run_bench"]

#: Backends in table order.
BACKENDS = ("keras_fp32", "tflite_fp32", "tflite_fp16", "tflite_int8")
#: Float student files of a run directory (the qkd/ptq recipes write student_fp.h5).
FLOAT_STAGES = ("student_fp.h5", "student.h5")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_bench_arguments(parser):
    """Adds the ``tfqkd bench`` arguments to an argparse parser."""
    parser.add_argument("target", metavar="MODEL_OR_RUN_DIR", help="model name, model file or recipe run directory")
    parser.add_argument(
        "--batch-sizes", type=_positive_int, nargs="+", default=[2**i for i in range(11)],
        help="batch sizes to sweep (default 1 2 4 ... 1024)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=None,
        help=f"CPU threads for TFLite and TensorFlow (default: all, {os.cpu_count()})",
    )
    parser.add_argument(
        "--power-watts", type=_positive_float, default=None,
        help="platform power P in watts for energy per image, eq. 7.4 (default: not reported)",
    )
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/bench or ./bench-MODEL)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="what to time")
    parser.add_argument("--repeats", type=_positive_int, default=5, help="timed samples per backend and batch")
    parser.add_argument(
        "--max-batch-seconds", type=_positive_float, default=2.0,
        help="a backend stops its sweep after a batch slower than this (default 2)",
    )
    parser.add_argument(
        "--time-budget", type=_positive_float, default=180.0,
        help="seconds of sweeping after which no larger batch starts (default 180)",
    )
    parser.add_argument("--float-io", action="store_true", help="int8 model with float input/output tensors")
    parser.add_argument(
        "--layout", choices=("speed", "compact"), default="speed",
        help="TFLite graph layout of every kind (see tfqkd export --layout; default speed)",
    )
    parser.add_argument("--no-xnnpack", action="store_true", help="TFLite built-in kernels without XNNPACK")
    parser.add_argument("--num-classes", type=_positive_int, default=10, help="classes of a model built by name")
    parser.add_argument("--unsafe", action="store_true", help="allow model files with Lambda layers")
    return parser


def _set_tf_threads(threads):
    from tfqkd.compat import tf

    if threads is None:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
    except RuntimeError:  # runtime already initialised (library use): keep its setting
        pass


def _random_calibration(input_shape, n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, size=(n,) + tuple(input_shape)).astype(np.float32)


def resolve_target(target, *, num_classes=10, unsafe=False):
    """Finds the float and quantized models to benchmark.

    Returns:
        dict with ``name``, ``float_model`` (or None), ``quant_model`` (or
        None), ``calibration`` (float inputs), ``source`` (a description) and
        ``run_dir`` (or None).

    Raises:
        TfqkdError: unknown name, missing file, or an empty run directory.
    """
    from tfqkd.io import load_model
    from tfqkd.models import create_model, list_models
    from tfqkd.quant.transform import is_quantized

    path = Path(target)
    if path.is_dir():
        models = path / "models"
        float_path = next((models / f for f in FLOAT_STAGES if (models / f).is_file()), None)
        float_model = load_model(float_path, unsafe=unsafe) if float_path is not None else None
        quant_path = quantized_student(path)
        quant_model = load_model(quant_path, unsafe=unsafe) if quant_path is not None else None
        if float_model is None and quant_model is None:
            raise TfqkdError(f"{path} holds no float student (models/student_fp.h5) nor a quantized student stage")
        some = float_model or quant_model
        calibration = None
        config_path = path / "config.yaml"
        if config_path.is_file():
            import yaml

            from tfqkd import data

            try:
                config = yaml.safe_load(config_path.read_text()) or {}
                calibration = data.calibration_batch(
                    config["dataset"], n=64, seed=int(config.get("seed", 0)), data_dir=config.get("data_dir")
                )
            except (TfqkdError, KeyError, TypeError, ValueError, OSError):
                calibration = None
        if calibration is None or calibration.shape[1:] != tuple(some.input_shape[1:]):
            calibration = _random_calibration(some.input_shape[1:])
        source = f"run directory {path}: " + ", ".join(
            ([f"float {float_path.name}"] if float_model is not None else [])
            + ([f"quantized {quant_path.name}"] if quant_model is not None else []))
        return {
            "name": some.name, "float_model": float_model, "quant_model": quant_model,
            "calibration": calibration, "source": source, "run_dir": path,
        }
    if path.suffix in (".h5", ".keras") or path.is_file():
        model = load_model(path, unsafe=unsafe)
        quantized = is_quantized(model)
        return {
            "name": model.name, "float_model": None if quantized else model,
            "quant_model": model if quantized else None,
            "calibration": _random_calibration(model.input_shape[1:]), "source": f"model file {path}", "run_dir": None,
        }
    if target not in list_models():
        raise TfqkdError(f"{target!r} is neither a registered model, a model file nor a run directory")
    model = create_model(target, num_classes=num_classes)
    return {
        "name": target, "float_model": model, "quant_model": None,
        "calibration": _random_calibration(model.input_shape[1:]),
        "source": f"untrained {target} built by name (random calibration data: timing only)", "run_dir": None,
    }


def benchmark(
    resolved, *, backends=BACKENDS, batch_sizes=None, threads=None, power_watts=None, repeats=5,
    max_batch_s=2.0, time_budget_s=180.0, int8_io=True, xnnpack=True, layout="speed", log=print,
):
    """Converts, times and summarizes (no files written).

    Args:
        resolved: output of :func:`resolve_target`.
        backends: subset of :data:`BACKENDS`.
        other arguments: see ``tfqkd bench --help``.

    Returns:
        dict payload with ``table``, ``sweep``, ``ratios``, ``backends`` and
        run facts; JSON-serialisable.
    """
    from tfqkd.bench.latency import DEFAULT_BATCH_SIZES, keras_backend, summarize, sweep, tflite_backend
    from tfqkd.export.tflite import convert

    threads = threads or os.cpu_count()
    float_model, quant_model = resolved["float_model"], resolved["quant_model"]
    calibration = resolved["calibration"]
    items, notes = [], []
    for key in backends:
        if key == "keras_fp32":
            if float_model is None:
                notes.append("keras_fp32 skipped: no float model")
                continue
            items.append(keras_backend(key, f"CPU FP32 TensorFlow ({threads} thr)", float_model))
            continue
        fmt = {"tflite_fp32": "float32", "tflite_fp16": "float16", "tflite_int8": "int8"}[key]
        source = float_model
        if fmt == "int8" and quant_model is not None:
            source = quant_model
        if source is None:
            notes.append(f"{key} skipped: no float model (pass a run directory with models/student_fp.h5)")
            continue
        t0 = time.perf_counter()
        calibration_data = calibration if fmt == "int8" else None
        try:
            # The thesis' QCPU column is a full-integer file (logits="int8"), as TensorFlow's converter writes one.
            content, _ = convert(source, calibration_data=calibration_data, format=fmt, int8_io=int8_io, layout=layout,
                                 logits="int8")
        except TfqkdError as err:
            if fmt == "int8" and source is quant_model and float_model is not None:
                notes.append(f"int8 from the float model by post-training quantization: {err}")
                content, _ = convert(float_model, calibration_data=calibration, format=fmt, int8_io=int8_io,
                                     layout=layout, logits="int8")
            else:
                raise
        if log:
            log(f"converted {key} with tfqkd.export.tflite in {time.perf_counter() - t0:.1f} s ({len(content) / 1e6:.2f} MB)")
        label = {
            "float32": "CPU FP32 TFLite", "float16": "CPU FP16 TFLite", "int8": "QCPU int8 TFLite",
        }[fmt] + f" ({threads} thr{'' if xnnpack else ', no XNNPACK'})"
        items.append(
            tflite_backend(key, label, content, num_threads=threads, xnnpack=xnnpack,
                           info={"converter": "tfqkd.export.tflite", "int8_io": int8_io if fmt == "int8" else None})
        )
    if not items:
        raise TfqkdError("nothing to benchmark: " + "; ".join(notes))
    measurements = sweep(
        items, batch_sizes or DEFAULT_BATCH_SIZES, repeats=repeats, max_batch_s=max_batch_s,
        time_budget_s=time_budget_s, log=log,
    )
    table = summarize(measurements, items, power_watts)
    sweep_rows = [dict(m.as_dict(power_watts), platform=next(b.label for b in items if b.name == m.backend))
                  for m in measurements]
    ratios = {}
    rows = {r["backend"]: r for r in table}
    if "tflite_int8" in rows and "tflite_fp32" in rows:
        a, b = rows["tflite_int8"], rows["tflite_fp32"]
        ratios["int8_vs_tflite_fp32_best_throughput"] = a["throughput"] / b["throughput"]
        if a["latency_ms"] and b["latency_ms"]:
            ratios["int8_vs_tflite_fp32_batch1_latency"] = a["latency_ms"] / b["latency_ms"]
        if a.get("throughput_per_cpu_s") and b.get("throughput_per_cpu_s"):
            ratios["int8_vs_tflite_fp32_best_throughput_per_cpu_second"] = (
                a["throughput_per_cpu_s"] / b["throughput_per_cpu_s"])
        if a.get("latency_cpu_ms") and b.get("latency_cpu_ms"):
            ratios["int8_vs_tflite_fp32_batch1_cpu_time"] = a["latency_cpu_ms"] / b["latency_cpu_ms"]
    if "tflite_int8" in rows and "keras_fp32" in rows:
        ratios["int8_vs_keras_fp32_best_throughput"] = (
            rows["tflite_int8"]["throughput"] / rows["keras_fp32"]["throughput"])
    from tfqkd.bench.runtime import runtime_name

    return {
        "model": resolved["name"], "source": resolved["source"], "threads": threads, "power_watts": power_watts,
        "runtime": runtime_name(), "machine": {"cpu": platform.processor() or platform.machine(),
                                               "cores": os.cpu_count(), "load_avg": _load_avg()},
        "xnnpack": xnnpack, "int8_io": int8_io, "layout": layout, "table": table, "sweep": sweep_rows, "ratios": ratios,
        "backends": [{"name": b.name, "label": b.label, **b.info} for b in items], "notes": notes,
        "labels": {b.name: b.label for b in items},
    }


def _load_avg():
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover
        return None


def write_outputs(payload, out_dir):
    """Writes bench.json, bench.csv, table.csv and the PNG plots into ``out_dir``; returns the paths."""
    from tfqkd.bench.report import THESIS_TABLE_7_1, plot_sweep, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, thesis_table_7_1=list(THESIS_TABLE_7_1))
    paths = [out_dir / "bench.json", out_dir / "bench.csv", out_dir / "table.csv"]
    write_json(paths[0], payload)
    atomic.write_csv(paths[1], payload["sweep"])
    atomic.write_csv(paths[2], payload["table"])
    paths += plot_sweep(payload["sweep"], payload["labels"], out_dir, title=payload["model"])
    return paths


def run_bench(args):
    """Runs ``tfqkd bench`` from parsed arguments; returns the exit code."""
    from tfqkd.bench.report import THESIS_DPU_LATENCY_MS, format_table

    _set_tf_threads(args.threads)
    start = time.perf_counter()
    resolved = resolve_target(args.target, num_classes=args.num_classes, unsafe=args.unsafe)
    if args.out:
        out = Path(args.out)
    elif resolved["run_dir"] is not None:
        out = resolved["run_dir"] / "bench"
    else:
        out = Path(f"bench-{resolved['name']}")
    atomic.ensure_directory(out, "bench directory")  # before minutes of timing
    print(f"benchmarking {resolved['name']} ({resolved['source']})", flush=True)
    payload = benchmark(
        resolved, backends=args.backends, batch_sizes=args.batch_sizes, threads=args.threads,
        power_watts=args.power_watts, repeats=args.repeats, max_batch_s=args.max_batch_seconds,
        time_budget_s=args.time_budget, int8_io=not args.float_io, xnnpack=not args.no_xnnpack, layout=args.layout,
        log=lambda s: print(s, flush=True),
    )
    paths = write_outputs(payload, out)
    print()
    print(format_table(payload["table"], f"{payload['model']} on {payload['machine']['cpu']} "
                                         f"({payload['threads']} threads, {payload['runtime']})"))
    for note in payload["notes"]:
        print(f"note: {note}")
    ratios = payload["ratios"]
    if "int8_vs_tflite_fp32_best_throughput" in ratios:
        print(f"int8 / FP32 TFLite: throughput x{ratios['int8_vs_tflite_fp32_best_throughput']:.2f} at each one's "
              f"best batch; batch-1 latency x{ratios.get('int8_vs_tflite_fp32_batch1_latency', float('nan')):.2f}")
    if "int8_vs_tflite_fp32_batch1_cpu_time" in ratios:
        print(f"  by CPU time (robust to other load): throughput per CPU-second "
              f"x{ratios['int8_vs_tflite_fp32_best_throughput_per_cpu_second']:.2f}, "
              f"batch-1 x{ratios['int8_vs_tflite_fp32_batch1_cpu_time']:.2f}")
    int8 = next((r for r in payload["table"] if r["backend"] == "tflite_int8"), None)
    if int8 and int8["latency_ms"] is not None:
        ref = THESIS_DPU_LATENCY_MS.get(payload["model"].replace("_dpu", ""))
        thesis = f" (thesis DPU: {ref} ms)" if ref is not None else ""  # only models the thesis measured
        print(f"int8 batch-1 latency {int8['latency_ms']:.3f} ms{thesis}")
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - start:.0f} s")
    return 0
