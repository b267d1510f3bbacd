"""The ``tfqkd`` command line: ``tfqkd models``, ``tfqkd train RECIPE ...``, ``tfqkd export``,
``tfqkd analyze``, ``tfqkd bench``.

Errors caused by the user (unknown model, bad bits, malformed recipe or
policy, unreadable file) print one line ``tfqkd: error: ...`` on stderr and
exit with code 2, without a traceback.
"""

import argparse
import sys

from tfqkd.console import ArgumentParser, quiet_known_noise, run_cli
from tfqkd.recipes import RECIPES

__all__ = ["ArgumentParser", "main", "quiet_known_noise", "run_cli"]  # the console helpers, re-exported


def _cmd_models(args):
    from tfqkd.models import model_table

    rows = model_table(family=args.family) if args.family else model_table()
    print(f"{'model':<20} {'family':<12} {'input':<14} {'params':>12} {'MACs':>15}")
    for row in rows:
        shape = "x".join(str(d) for d in row.input_shape)
        print(f"{row.name:<20} {row.family:<12} {shape:<14} {row.params:>12,} {row.macs:>15,}")
    return 0


def _cmd_train(args):
    import importlib

    module = importlib.import_module(f"tfqkd.recipes.{args.recipe}")
    return module.main(args.recipe_args)


def _cmd_export(args):
    from pathlib import Path

    if args.target == "tflite":
        from tfqkd.export.command import run_tflite_export

        return run_tflite_export(args)
    if args.target == "qkeras":
        from tfqkd.export.command import run_qkeras_export

        return run_qkeras_export(args)
    if args.target == "hls4ml":
        from tfqkd.export.command import run_hls4ml_export

        return run_hls4ml_export(args)
    from tfqkd.errors import TfqkdError
    from tfqkd.export.command import find_run_model
    from tfqkd.export.dpu.command import run_dpu_export

    source = Path(args.source)
    if source.is_dir():
        args.model, config = find_run_model(source)
        default_out = source / "export" / "dpu"
        dataset = args.dataset or config.get("dataset")
    elif source.is_file():
        args.model, dataset, default_out = source, args.dataset, source.parent / f"{source.stem}_dpu"
    else:
        raise TfqkdError(f"no such run directory or model file: {source}")
    args.out = args.out or default_out
    if (Path(args.out) / "quantized.h5").exists() and not args.force:
        raise TfqkdError(f"{Path(args.out) / 'quantized.h5'} exists; pass --force to overwrite")
    args.calibration_data = args.calibration_data or dataset
    args.evaluation_data = args.evaluation_data or dataset
    return run_dpu_export(args)


def build_parser():
    parser = ArgumentParser(prog="tfqkd", description="Quantization-aware knowledge distillation with QKeras.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    models = sub.add_parser("models", help="list the model zoo with parameters and multiply-accumulates")
    models.add_argument("--family", help="only this family (densenet, mlp, mlperf_tiny, mobilenet)")
    models.set_defaults(func=_cmd_models)

    train = sub.add_parser("train", help="run a training recipe (same as python -m tfqkd.recipes.RECIPE)")
    train.add_argument("recipe", choices=RECIPES)
    train.add_argument("recipe_args", nargs=argparse.REMAINDER, help="arguments of the recipe (see --help of it)")
    train.set_defaults(func=_cmd_train)

    from tfqkd.export.command import add_tflite_arguments
    from tfqkd.export.dpu.command import add_dpu_arguments

    export = sub.add_parser(
        "export", help="export a trained model to TFLite (int8/float), the Xilinx DPU, stock QKeras or an hls4ml project"
    )
    export.add_argument("--target", required=True, choices=("tflite", "dpu", "qkeras", "hls4ml"))
    export.add_argument("source", metavar="RUN_DIR_OR_MODEL_FILE")
    add_tflite_arguments(export)  # also --out, --dataset, --data-dir, --force, --unsafe for both targets
    add_dpu_arguments(export.add_argument_group("DPU (--target dpu)"), include_io=False)
    export.set_defaults(func=_cmd_export)

    from tfqkd.analysis.command import add_analyze_arguments, run_analyze

    analyze = sub.add_parser("analyze", help="layerwise weight/activation statistics, SQNR, histograms")
    add_analyze_arguments(analyze)
    analyze.set_defaults(func=run_analyze)

    from tfqkd.bench.command import add_bench_arguments, run_bench

    bench = sub.add_parser("bench", help="latency, throughput and energy of Keras FP32 and TFLite FP32/FP16/int8")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)
    return parser


def main(argv=None):
    """Entry point of the ``tfqkd`` console script.

    Args:
      argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
      exit code (0 success, 2 user error).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
