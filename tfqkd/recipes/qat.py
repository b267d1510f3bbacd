"""Quantization-aware training (thesis section 5.6; QKD phase SS): ``python -m tfqkd.recipes.qat --quant w4a4``.

Float baseline (trained or ``--student-model``), post-training quantization,
then self-studying with cross-entropy under the budget's ``ss`` schedule.
"""

import sys

from tfqkd.recipes.entry import recipe_main
from tfqkd.recipes.runner import quantized_baseline, write_results

__all__ = ["main"]


def _qat(start):
    config, policy = start.config, start.policy
    run = start.new_run()
    with run.scope():  # models and optimizers of the --strategy
        quantized = quantized_baseline(run, policy, start.student_model, start.unsafe)
        run.record("Quantized (PTQ)", quantized)
        run.train("ss", "ss", quantized, phase="ss")
        run.save_model(quantized, "student_ss")
        run.record("SS (QAT)", quantized)
        write_results(run, f"QAT: {config['student']} ({policy.name}) on {config['dataset']}")


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    return recipe_main("qat", __doc__, _qat, argv)


if __name__ == "__main__":
    sys.exit(main())
