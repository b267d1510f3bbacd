"""``tfqkd analyze MODEL_OR_RUN_DIR``: layerwise statistics, CSV and histogram PNGs (seed 003).

The command-line module adds these options to its ``analyze`` sub-command with
:func:`add_analyze_arguments` and calls :func:`run_analyze`. The source is

* a registered model name (an untrained model is built for the dataset's input shape and
  classes, useful to see initial distributions),
* a ``.h5`` / ``.keras`` model file (loaded with :func:`tfqkd.load_model`), or
* a recipe run directory: its quantized student (:func:`tfqkd.rundir.quantized_student`), else the newest ``models/*.h5``.

It writes ``layerwise.csv``, ``weights_hist.png`` and ``activations_hist.png`` into ``--out``
(default: ``<run dir>/analysis``, ``<model file stem>_analysis`` or ``analysis_<name>``).
"""

from pathlib import Path

from tfqkd import atomic
from tfqkd.errors import TfqkdError
from tfqkd.rundir import quantized_student

__all__ = ["add_analyze_arguments", "resolve_source", "run_analyze"]


def add_analyze_arguments(parser):
    """Adds the ``analyze`` arguments to an argparse (sub)parser.

    Args:
      parser: an ``argparse.ArgumentParser`` or sub-parser.
    """
    parser.add_argument("source", metavar="MODEL_OR_RUN_DIR", help="model name, .h5/.keras file or recipe run directory")
    parser.add_argument("--data", default="mnist5k", help="dataset whose test images feed the activations (default mnist5k)")
    parser.add_argument("--out", default=None, help="output directory for layerwise.csv and the PNGs")
    parser.add_argument("--examples", type=int, default=32, help="test images used for activation statistics (default 32)")
    parser.add_argument("--data-dir", default=None, help="prepared tfds data directory")
    parser.add_argument("--unsafe", action="store_true", help="allow model files with Lambda layers (they run code)")


def resolve_source(source, data_name):
    """Turns MODEL_OR_RUN_DIR into a model and a default output directory.

    Args:
      source: model name, model file or run directory.
      data_name: dataset name (input shape and classes for a model name).

    Returns:
      ``(model_path_or_None, model_name_or_None, default_out_dir)``.

    Raises:
      TfqkdError: nothing usable at ``source``.
    """
    from tfqkd.models import list_models

    path = Path(source)
    if path.is_dir():
        models = path / "models"
        preferred = quantized_student(path)
        if preferred is not None:
            return preferred, None, path / "analysis"
        files = sorted(models.glob("*.h5"), key=lambda p: p.stat().st_mtime) if models.is_dir() else []
        files += sorted(path.glob("*.h5"), key=lambda p: p.stat().st_mtime)
        if not files:
            raise TfqkdError(f"{path} holds no model: expected models/student_qkd.h5 or models/*.h5")
        return max(files, key=lambda p: p.stat().st_mtime), None, path / "analysis"
    if path.suffix in (".h5", ".keras"):
        if not path.is_file():
            raise TfqkdError(f"model file not found: {path}")
        return path, None, path.with_name(f"{path.stem}_analysis")
    if source in list_models():
        return None, source, Path(f"analysis_{source}")
    raise TfqkdError(f"{source!r} is neither a model name, a .h5/.keras file nor a run directory")


def run_analyze(args):
    """Runs ``tfqkd analyze`` (see module docstring); prints the files written.

    Args:
      args: namespace from a parser set up by :func:`add_analyze_arguments`.

    Returns:
      0.
    """
    import numpy as np

    import tfqkd.data as data
    from tfqkd.analysis.layerwise import CSV_COLUMNS, analyze, plot_histograms
    from tfqkd.io import load_model
    from tfqkd.models import create_model

    if args.examples < 1:
        raise TfqkdError(f"--examples must be at least 1, got {args.examples}")
    info = data.dataset_info(args.data)
    model_path, model_name, out = resolve_source(args.source, args.data)
    out = atomic.ensure_directory(Path(args.out) if args.out else out, "analysis directory")
    if model_path is not None:
        model = load_model(model_path, unsafe=args.unsafe)
        label = str(model_path)
    else:
        model = create_model(model_name, num_classes=info.num_classes, input_shape=tuple(info.input_shape))
        label = f"{model_name} (untrained)"
    x, _ = data.load_arrays(args.data, "test", data_dir=args.data_dir, limit=args.examples)
    expected = tuple(model.input_shape[1:])
    if tuple(x.shape[1:]) != expected:
        raise TfqkdError(f"dataset {args.data} has inputs {tuple(x.shape[1:])}, the model expects {expected}")
    rows = analyze(model, np.asarray(x), max_examples=args.examples, keep_samples=True)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        atomic.write_csv(out / "layerwise.csv", rows, CSV_COLUMNS),
        plot_histograms(rows, out / "weights_hist.png", tensor="weight"),
        plot_histograms(rows, out / "activations_hist.png", tensor="activation"),
    ]
    print(f"analyzed {label}: {len(rows) // 2} layers on {len(x)} {args.data} test images")
    worst = min((r for r in rows if np.isfinite(r["sqnr4_db"])), key=lambda r: r["sqnr4_db"], default=None)
    if worst is not None:
        print(f"lowest 4-bit SQNR: {worst['layer']} {worst['tensor']} {worst['sqnr4_db']:.1f} dB "
              f"(kurtosis {worst['kurtosis']:.1f})")  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    return 0
