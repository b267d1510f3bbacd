"""Command-line arguments shared by the recipes, and their resolution into a config."""

import argparse
import time
from pathlib import Path

from tfqkd.cli import ArgumentParser
from tfqkd.errors import TfqkdError
from tfqkd.recipes.config import budget_config, load_config, merge, show, validate_config

__all__ = ["recipe_parser", "resolve_config", "resolve_run_dir"]


class _RecipeParser(ArgumentParser):
    """The CLI parser, keeping the error on one line even for arguments holding newlines."""

    def error(self, message):
        super().error(" ".join(str(message).split()))


def _model_file(value):
    """argparse type of --teacher-model/--student-model: an existing .h5/.keras file."""
    if "\x00" in value or not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"model file not found: {show(value)}")
    return value


def _file(value):
    """argparse type of --config: an existing file (not a directory)."""
    if "\x00" in value or not Path(value).is_file():
        kind = "is a directory" if "\x00" not in value and Path(value).is_dir() else "not found"
        raise argparse.ArgumentTypeError(f"{show(value)} {kind}; expected a YAML file")
    return value


def recipe_parser(prog, description):
    """The argument parser every recipe starts from.

    Args:
      prog: program name shown in usage and errors.
      description: one-paragraph description of the recipe.

    Returns:
      an ArgumentParser (usage errors: one line, exit code 2).
    """
    parser = _RecipeParser(prog=prog, description=description)
    parser.add_argument("--model", help="student model (see `tfqkd models`); default from the budget")
    parser.add_argument("--teacher", help="teacher model; default from the budget")
    parser.add_argument("--dataset", help="dataset (mnist5k, digits, mnist, cifar10, ...); default from the budget")
    parser.add_argument("--quant", help="policy: w8a8, w4a4, w4a8, thesis8, thesis4, dpu or a POLICY.yaml")
    parser.add_argument("--budget", choices=("quick", "thesis"), default="quick",
                        help="quick: minutes on a 2-core CPU; thesis: the thesis's epochs and learning rates")  # fmt: skip
    parser.add_argument("--config", type=_file, help="recipe YAML file (overrides --budget)")
    parser.add_argument("--run-dir", help="run directory (default runs/<recipe>-<model>-<time>)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--alpha", type=float, help="KD weight of the soft targets, in [0, 1]")
    parser.add_argument("--temperature", type=float, help="KD temperature T > 0")
    parser.add_argument("--data-dir", help="tfds data directory holding prepared datasets")
    parser.add_argument("--teacher-model", type=_model_file, help="reuse this trained float teacher (.h5/.keras) instead of training one")
    parser.add_argument("--student-model", type=_model_file, help="reuse this trained float student (.h5/.keras) instead of training one")
    parser.add_argument("--unsafe", action="store_true", help="allow model files with Lambda layers (they run code)")
    return parser


def resolve_config(args):
    """Builds the validated config from the budget or file and the overrides."""
    if args.config:
        base = load_config(args.config)
    else:
        base = budget_config(args.budget, args.dataset or ("mnist5k" if args.budget == "quick" else "cifar10"))
    overrides = {
        "student": args.model, "teacher": args.teacher, "dataset": args.dataset, "quant": args.quant,
        "seed": args.seed, "batch_size": args.batch_size, "alpha": args.alpha, "temperature": args.temperature,
        "data_dir": args.data_dir,
    }  # fmt: skip
    return validate_config(merge(base, overrides))


def _check_run_dir(path):
    """Refuses a run directory that cannot be created (before any data is loaded)."""
    text = str(path)
    if "\x00" in text:
        raise TfqkdError(f"run directory {show(text)} is not a valid path")
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise TfqkdError(f"run directory {show(text)}: {show(str(part))} is a file, not a directory")
    return path


def resolve_run_dir(args, recipe, config):
    """The run directory: ``--run-dir`` or a new timestamped one under ./runs."""
    if args.run_dir is not None:
        if not args.run_dir.strip():
            raise TfqkdError("--run-dir must not be empty")
        return _check_run_dir(Path(args.run_dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return _check_run_dir(Path("runs") / f"{recipe}-{config['student']}-{config['dataset']}-{stamp}")
