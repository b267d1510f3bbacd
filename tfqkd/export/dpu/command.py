"""``tfqkd export --target dpu``: argument definitions and the command body.

The CLI module wires these in; they follow the package's CLI conventions (user errors raise
:class:`~tfqkd.errors.TfqkdError`, which the CLI prints as one line with exit code 2).
"""

from __future__ import annotations

import json

from tfqkd.data import calibration_batch, load_arrays
from tfqkd.errors import TfqkdError
from tfqkd.export.dpu import to_dpu
from tfqkd.io import load_model

__all__ = ["add_dpu_arguments", "run_dpu_export"]


def add_dpu_arguments(parser, *, include_io=True):
    """Adds the DPU export options to an argparse parser.

    Args:
      parser: the ``export`` sub-parser.
      include_io: also add the positional ``model`` (.h5/.keras file) and ``--out`` directory
        (pass False when the export command already defines them).

    Returns:
      the parser.
    """
    if include_io:
        parser.add_argument("model", help="trained model file (.h5 or .keras)")
        parser.add_argument("--out", required=True, help="output directory of the DPU bundle")
    parser.add_argument("--dpu-arch", choices=("zcu102", "zcu104"), default="zcu102", help="DPUCZDX8G board (default zcu102)")
    parser.add_argument("--calibration-data", default=None, help="dataset for calibrating a float model (e.g. mnist5k)")
    parser.add_argument("--calibration-size", type=int, default=256, help="calibration images (default 256)")
    parser.add_argument("--evaluation-data", default=None, help="dataset whose test split the DPU emulator evaluates")
    parser.add_argument("--evaluation-limit", type=int, default=None, help="evaluate only the first N test images")
    parser.add_argument("--dpu-name", default=None, help="network name for the compiler (default: model name)")
    return parser


def run_dpu_export(args):
    """Runs the DPU export for parsed arguments; prints a summary.

    Args:
      args: namespace with ``model``, ``out`` and the options of :func:`add_dpu_arguments`
        (optional ``unsafe``: allow Lambda layers when loading, as ``tfqkd.load_model``).

    Returns:
      0 (errors raise :class:`~tfqkd.errors.TfqkdError`).
    """
    model = load_model(args.model, unsafe=bool(getattr(args, "unsafe", False)))
    calibration = None
    if args.calibration_data:
        if args.calibration_size < 1:
            raise TfqkdError("--calibration-size must be >= 1")
        calibration = calibration_batch(args.calibration_data, n=args.calibration_size)
    evaluation = None
    if args.evaluation_data:
        evaluation = load_arrays(args.evaluation_data, "test", limit=args.evaluation_limit)
    report = to_dpu(
        model, args.out, calibration_data=calibration, arch=args.dpu_arch, evaluation=evaluation, name=args.dpu_name
    )
    print(f"wrote {', '.join(report['files'])} to {report['out_dir']}")
    print(f"compile: {report['compile_command']}")
    if "emulator_accuracy" in report:
        print(
            f"DPU emulator top-1: {100 * report['emulator_accuracy']:.2f} % "
            f"(Keras fake-quant {100 * report['keras_accuracy']:.2f} %, agreement {100 * report['agreement']:.2f} %) "
            f"on {report['evaluation_images']} images"
        )
    if getattr(args, "json", False):
        print(json.dumps({k: v for k, v in report.items() if k != "nodes"}, indent=2))
    return 0
