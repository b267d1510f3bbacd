"""Float baseline training (thesis section 5.3): ``python -m tfqkd.recipes.baseline --model densenet21``.

Trains the float ``--model`` with the budget's ``student_baseline`` schedule
(SGD, Nesterov momentum, weight decay, warmup then milestone decay) and
reports train and test top-1.
"""

import sys

from tfqkd.console import run_cli
from tfqkd.recipes.args import recipe_parser, start_recipe
from tfqkd.recipes.runner import require_file, train_baseline, write_results

__all__ = ["main"]


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    args = recipe_parser("tfqkd.recipes.baseline", __doc__.split("\n\n")[0]).parse_args(argv)

    def go():
        require_file(args.student_model, "student model")
        start = start_recipe(args, "baseline")
        config = start.config
        run = start.new_run()
        with run.scope():  # models and optimizers of the --strategy
            run.record("Baseline (FP)", train_baseline(run, "student", start.student_model, start.unsafe))
            write_results(run, f"Baseline: {config['student']} on {config['dataset']}")

    return run_cli(go, prog="tfqkd.recipes.baseline")


if __name__ == "__main__":
    sys.exit(main())
