"""``tfqkd export --target tflite RUN_DIR_OR_MODEL_FILE``: the TFLite half of the export command.

The command-line module adds these options to its ``export`` sub-command
with :func:`add_tflite_arguments` and calls :func:`run_tflite_export` for
``--target tflite``. A recipe run directory (``config.yaml`` plus
``models/*.h5``) exports its final quantized student (QKD, else
self-studied, else post-training quantized) with the run's dataset for
calibration and validation; a single model file needs ``--dataset``.
"""

from pathlib import Path

import yaml

from tfqkd import atomic
from tfqkd.errors import TfqkdError
from tfqkd.rundir import QUANTIZED_STUDENTS, quantized_student

__all__ = ["STUDENT_PREFERENCE", "add_tflite_arguments", "find_run_model", "run_tflite_export"]

#: Which saved stage of a run is exported, first found first.
STUDENT_PREFERENCE = QUANTIZED_STUDENTS
_CALIBRATION_EXAMPLES = 512


def add_tflite_arguments(parser):
    """Adds the export options to an ``export`` (sub)parser.

    The caller owns ``--target`` and the positional ``source``
    (RUN_DIR_OR_MODEL_FILE). ``--out``, ``--dataset``, ``--data-dir``,
    ``--force`` and ``--unsafe`` serve both targets; ``--format``,
    ``--float-io`` and ``--logits`` only TFLite.

    Args:
      parser: an ``argparse.ArgumentParser`` (or sub-parser).
    """
    common = parser.add_argument_group("output and data (both targets)")
    common.add_argument("--out", default=None, help="output directory (default: <run dir>/export, or next to the model file)")
    common.add_argument("--dataset", default=None, help="calibration/evaluation dataset (default: the run's config.yaml)")
    common.add_argument("--data-dir", default=None, help="prepared tfds data directory")
    common.add_argument("--force", action="store_true", help="overwrite existing output files")
    common.add_argument("--unsafe", action="store_true", help="allow model files with Lambda layers (they run code)")
    hls = parser.add_argument_group("hls4ml (--target hls4ml)")
    hls.add_argument("--backend", default="Vitis", help="hls4ml backend: Vitis, Vivado, Catapult, oneAPI")
    hls.add_argument("--io-type", default="io_parallel", choices=("io_parallel", "io_stream"))
    hls.add_argument("--default-precision", default=None,
                     help="precision of what no quantizer fixes (BN, additions, pooling); default ap_fixed<48,16>")  # fmt: skip
    group = parser.add_argument_group("TFLite (--target tflite)")
    group.add_argument(
        "--format", "--kind", dest="format", default="all", choices=("int8", "float32", "float16", "all"),
        help="which TFLite model(s) to write (--kind is its old name)",
    )
    group.add_argument("--float-io", action="store_true",
                       help="int8 model with a float32 input and output (default: an int8 input, and an int8 output "
                       "with --logits int8)")  # fmt: skip
    group.add_argument(
        "--logits", choices=("auto", "int8", "float"), default="auto",  # float_head.LOGITS (TF-free import here)
        help="int8 model's last layer: float: the int8 body and the output Dense in float32, so near-tie logits are "
        "not merged by int8 rounding (float32 output); int8: full integer (integer-only targets); auto (default): "
        "float for a Dense output layer, else int8",
    )
    group.add_argument(
        "--runtimes", default="auto", metavar="NAME[=PYTHON],...",
        help="validate each written file on these TFLite runtimes: litert, tflite-runtime, tensorflow, "
        "litert-builtin (LiteRT without XNNPACK: TFLite's built-in kernels) (auto: the "
        "first installed). NAME=PYTHON runs it with another Python, e.g. a venv with tflite-runtime 2.14 and "
        "numpy<2; a runtime that is not installed is reported in one line",
    )
    group.add_argument(
        "--layout", choices=("speed", "compact"), default="speed",  # integer_graph.LAYOUTS (TF-free import here)
        help="speed: BNs and average pools as depthwise convs (fast int8 on XNNPACK; default); "
        "compact: MUL/ADD and AVERAGE_POOL_2D (smaller file)",
    )


def find_run_model(run_dir):
    """The model file and config of a recipe run directory.

    Args:
      run_dir: a directory with ``config.yaml`` and ``models/*.h5``.

    Returns:
      ``(model_path, config_dict)``.

    Raises:
      TfqkdError: no config or no quantized student in the directory.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise TfqkdError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TfqkdError(f"{config_path}: malformed YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise TfqkdError(f"{config_path}: expected a mapping")
    candidate = quantized_student(run_dir)
    if candidate is not None:
        return candidate, config
    raise TfqkdError(f"{run_dir}/models holds no quantized student ({', '.join(s + '.h5' for s in STUDENT_PREFERENCE)})")


def resolve_export_source(args):
    """``(model file, dataset, data_dir, output directory)`` of an export's RUN_DIR_OR_MODEL_FILE.

    The output directory is created and probed before any model is loaded.

    Raises:
      TfqkdError: no such source, no dataset, an output directory that cannot be written.
    """
    source = Path(args.source)
    if source.is_dir():
        model_path, config = find_run_model(source)
        dataset = args.dataset or config.get("dataset")
        data_dir = args.data_dir or config.get("data_dir")
        out_dir = Path(args.out) if args.out else source / "export"
    elif source.is_file():
        model_path, dataset, data_dir = source, args.dataset, args.data_dir
        out_dir = Path(args.out) if args.out else source.parent
    else:
        raise TfqkdError(f"no such run directory or model file: {source}")
    if not dataset:
        raise TfqkdError("no dataset for calibration and validation: pass --dataset (a model file has none)")
    atomic.ensure_directory(out_dir, "export directory")  # before the model is loaded or converted
    return model_path, dataset, data_dir, out_dir


def run_qkeras_export(args):
    """Runs ``tfqkd export --target qkeras``: ``<model>_qkeras.h5`` of stock QKeras layers, validated.

    The file is loaded with stock QKeras in a process that never imports
    tfqkd and compared with the tfqkd model on the dataset's test images.

    Returns:
      0 (the exit code).
    """
    import tfqkd.data as data
    from tfqkd.export.qkeras import to_qkeras
    from tfqkd.io import load_model

    model_path, dataset, data_dir, out_dir = resolve_export_source(args)
    target = out_dir / f"{model_path.stem}_qkeras.h5"
    if target.exists() and not args.force:
        raise TfqkdError(f"{target} exists; pass --force to overwrite")
    model = load_model(model_path, unsafe=args.unsafe)
    x, _ = data.load_arrays(dataset, "test", data_dir=data_dir, limit=1000)
    print(f"[tfqkd] exporting {model_path} to stock QKeras: {target}", flush=True)
    report = to_qkeras(model, target, evaluation=x, force=args.force)
    _print_check("loaded by qkeras.utils.load_qmodel without tfqkd", report, dataset, target.with_suffix(".qkeras.json"))
    return 0


def _print_check(what, report, dataset, report_path):
    """The agreement of an exported model with the Keras one, and the layers it could not express exactly."""
    check = report["validation"]
    print(
        f"[tfqkd] {what}: top-1 agreement {check['top1_agreement']:.2f}% with the Keras model on {check['examples']} "
        f"{dataset} test images, largest logit difference {check['max_abs_logit_difference']:.3g}"
    )
    for line in report["inexact"]:
        print(f"[tfqkd]   not exact: {line}")
    if report["inexact"]:
        print("[tfqkd]   train with `scheme: lsq_pof2` (or `activation_scheme: lsq_pof2`) in the policy for steps it expresses exactly")
    print(f"[tfqkd] report: {report_path}", flush=True)


def run_hls4ml_export(args):
    """Runs ``tfqkd export --target hls4ml``: the hls4ml project, its compiled C++ emulation, the check.

    Returns:
      0 (the exit code).
    """
    import tfqkd.data as data
    from tfqkd.export.hls4ml import DEFAULT_PRECISION, to_hls4ml
    from tfqkd.io import load_model

    model_path, dataset, data_dir, out_dir = resolve_export_source(args)
    project = out_dir / f"{model_path.stem}_hls4ml"
    if project.exists() and any(project.iterdir()) and not args.force:
        raise TfqkdError(f"{project} exists; pass --force to overwrite")
    model = load_model(model_path, unsafe=args.unsafe)
    x, _ = data.load_arrays(dataset, "test", data_dir=data_dir, limit=1000)
    print(f"[tfqkd] hls4ml {args.backend} project ({args.io_type}) of {model_path}: {project}", flush=True)
    precision = args.default_precision or DEFAULT_PRECISION
    result = to_hls4ml(
        model, project, backend=args.backend, io_type=args.io_type, evaluation=x, default_precision=precision
    )
    _print_check(f"C++ emulation (compiled in {result['compile_seconds']:.0f} s)", result, dataset,
                 project / "hls4ml_report.json")  # fmt: skip
    return 0


def run_tflite_export(args):
    """Runs ``tfqkd export --target tflite`` with parsed arguments.

    Writes ``<model>_<format>.tflite`` for each format, a
    ``.validation.json`` next to each, and ``<model>_size.json``; prints a
    short report.

    Args:
      args: namespace with ``source`` plus the options of :func:`add_tflite_arguments`.

    Returns:
      0 (the exit code).

    Raises:
      TfqkdError: any user-facing problem (missing files, existing outputs
        without --force, unsafe model file, unsupported model).
    """
    import tfqkd.data as data
    from tfqkd.export.size import size_report, write_size_report
    from tfqkd.export.tflite import FORMATS, to_tflite
    from tfqkd.export.validate import format_report
    from tfqkd.io import load_model

    from tfqkd.export.runtimes import parse_runtimes

    runtimes = parse_runtimes(getattr(args, "runtimes", "auto"))  # unknown names fail before any work
    model_path, dataset, data_dir, out_dir = resolve_export_source(args)
    formats = FORMATS if args.format == "all" else (args.format,)
    stem = model_path.stem
    targets = {fmt: out_dir / f"{stem}_{fmt}.tflite" for fmt in formats}
    size_path = out_dir / f"{stem}_size.json"
    if not args.force:
        existing = [str(p) for p in (*targets.values(), size_path) if p.exists()]
        if existing:
            raise TfqkdError(f"{existing[0]} exists; pass --force to overwrite")

    model = load_model(model_path, unsafe=args.unsafe)
    calibration = data.calibration_batch(
        dataset, n=min(_CALIBRATION_EXAMPLES, data.dataset_info(dataset).train_size), data_dir=data_dir
    )
    evaluation = data.load_arrays(dataset, "test", data_dir=data_dir)
    print(f"[tfqkd] exporting {model_path} ({', '.join(formats)}) to {out_dir}", flush=True)
    for fmt in formats:
        result = to_tflite(
            model,
            targets[fmt],
            calibration_data=calibration,
            format=fmt,
            int8_io=not args.float_io,
            evaluation=evaluation,
            force=args.force,
            unsafe=args.unsafe,
            layout=args.layout,
            runtimes=runtimes,
            logits=getattr(args, "logits", "auto"),
        )
        head = " with float32 logits" if fmt == "int8" and result["logits"] == "float" else ""
        print(f"[tfqkd] {fmt}{head}: {result['path']} ({result['bytes']:,} bytes)")
        print(f"[tfqkd]   {format_report(result['validation'])}", flush=True)
        added = result["rounded_add_inputs"]
        if added:
            print(
                f"[tfqkd]   note: {len(added)} tensors that residual Adds sum in float in the Keras model (e.g. "
                f"{added[0]}) are rounded onto calibrated 8-bit grids in int8, so the file departs from the Keras "
                "model by more than its own rounding; for an exact export train with `integer_intermediates: true` "
                "in the policy",
                flush=True,
            )
        rounded = result["rounded_batchnorm"]
        if rounded:
            advice = "" if added else "; for an exact export train with `integer_intermediates: true` in the policy"
            print(
                f"[tfqkd]   note: {len(rounded)} BatchNormalization layers (e.g. {rounded[0]}) run in float in the "
                f"Keras model and are rounded in int8{advice}",
                flush=True,
            )
    report = size_report(model, targets)
    report["layout"] = args.layout  # the file sizes depend on it (compact is ~5% smaller in int8)
    write_size_report(report, size_path, force=True)
    files = ", ".join(f"{label} {info['bytes']:,} B" for label, info in report["files"].items())
    print(
        f"[tfqkd] size: {report['parameters']:,} parameters; FP32 {report['fp32_mb']:.3f} MB, 8-bit "
        f"{report['int8_mb']:.3f} MB, 4-bit {report['int4_mb']:.3f} MB; files: {files} -> {size_path}"
    )
    if "int8_to_float32" in report:
        hint = "; --layout compact writes a smaller, slower int8 file" if args.layout == "speed" else ""
        print(f"[tfqkd] int8/float32 bytes: {report['int8_to_float32']:.3f} ({args.layout} layout{hint})")
    return 0
