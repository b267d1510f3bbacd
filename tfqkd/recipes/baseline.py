"""Float baseline training (thesis section 5.3): ``python -m tfqkd.recipes.baseline --model densenet21``.

Trains the float ``--model`` with the budget's ``student_baseline`` schedule
(SGD, Nesterov momentum, weight decay, warmup then milestone decay) and
reports train and test top-1.
"""

import sys

from tfqkd.recipes.entry import recipe_main
from tfqkd.recipes.runner import train_baseline, write_results

__all__ = ["main"]


def _baseline(start):
    config = start.config
    run = start.new_run()
    with run.scope():  # models and optimizers of the --strategy
        run.record("Baseline (FP)", train_baseline(run, "student", start.student_model, start.unsafe))
        write_results(run, f"Baseline: {config['student']} on {config['dataset']}")


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    return recipe_main("baseline", __doc__, _baseline, argv)


if __name__ == "__main__":
    sys.exit(main())
