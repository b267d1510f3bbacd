"""Quantization-aware training (thesis section 5.6; QKD phase SS): ``python -m tfqkd.recipes.qat --quant w4a4``.

Float baseline (trained or ``--student-model``), post-training quantization,
then self-studying with cross-entropy under the budget's ``ss`` schedule.
"""

import sys

from tfqkd.console import run_cli
from tfqkd.quant import quantize, resolve_policy
from tfqkd.recipes.args import recipe_parser, start_recipe
from tfqkd.recipes.runner import require_file, train_baseline, write_results

__all__ = ["main"]


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    args = recipe_parser("tfqkd.recipes.qat", __doc__.split("\n\n")[0]).parse_args(argv)

    def go():
        require_file(args.student_model, "student model")
        start = start_recipe(args, "qat")
        config = start.config
        policy = resolve_policy(config["quant"])
        run = start.new_run()
        with run.scope():  # models and optimizers of the --strategy
            student = train_baseline(run, "student", start.student_model, start.unsafe)
            run.record("Baseline (FP)", student)
            quantized = quantize(student, policy, run.calibration_batch())
            run.record("Quantized (PTQ)", quantized)
            run.train("ss", "ss", quantized, phase="ss")
            run.save_model(quantized, "student_ss")
            run.record("SS (QAT)", quantized)
            write_results(run, f"QAT: {config['student']} ({policy.name}) on {config['dataset']}")

    return run_cli(go, prog="tfqkd.recipes.qat")


if __name__ == "__main__":
    sys.exit(main())
