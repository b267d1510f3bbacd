"""Float baseline training (thesis section 5.3): ``python -m tfqkd.recipes.baseline --model densenet21``.

Trains the float ``--model`` with the budget's ``student_baseline`` schedule
(SGD, Nesterov momentum, weight decay, warmup then milestone decay) and
reports train and test top-1.
"""

import sys

from tfqkd.cli import run_cli
from tfqkd.recipes.args import recipe_parser, resolve_config, resolve_run_dir
from tfqkd.recipes.qkd import train_baseline
from tfqkd.recipes.runner import Run, require_file, write_results

__all__ = ["main"]


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    args = recipe_parser("tfqkd.recipes.baseline", __doc__.split("\n\n")[0]).parse_args(argv)

    def go():
        require_file(args.student_model, "student model")
        config = resolve_config(args)
        run = Run(config, resolve_run_dir(args, "baseline", config))
        run.record("Baseline (FP)", train_baseline(run, "student", args.student_model, args.unsafe))
        write_results(run, f"Baseline: {config['student']} on {config['dataset']}")

    return run_cli(go, prog="tfqkd.recipes.baseline")


if __name__ == "__main__":
    sys.exit(main())
