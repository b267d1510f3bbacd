"""Post-training quantization (thesis section 5.5): ``python -m tfqkd.recipes.ptq --model densenet21 --quant w4a4``.

Quantizes the trained float student (``--student-model``, or one trained
with the budget's baseline schedule) with the policy, initialising the
intervals from the min-max of the weights and one batch of activations, and
reports the accuracy before and after.
"""

import sys

from tfqkd.recipes.entry import recipe_main
from tfqkd.recipes.runner import quantized_baseline, write_results

__all__ = ["main"]


def _ptq(start):
    config, policy = start.config, start.policy
    run = start.new_run()
    with run.scope():  # models and optimizers of the --strategy
        quantized = quantized_baseline(run, policy, start.student_model, start.unsafe)
        run.save_model(quantized, "student_ptq")
        run.record(f"Quantized (PTQ, {policy.name})", quantized)
        write_results(run, f"PTQ: {config['student']} ({policy.name}) on {config['dataset']}")


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    return recipe_main("ptq", __doc__, _ptq, argv)


if __name__ == "__main__":
    sys.exit(main())
