"""Post-training quantization (thesis section 5.5): ``python -m tfqkd.recipes.ptq --model densenet21 --quant w4a4``.

Quantizes the trained float student (``--student-model``, or one trained
with the budget's baseline schedule) with the policy, initialising the
intervals from the min-max of the weights and one batch of activations, and
reports the accuracy before and after.
"""

import sys

from tfqkd.console import run_cli
from tfqkd.quant import quantize, resolve_policy
from tfqkd.recipes.args import recipe_parser, start_recipe
from tfqkd.recipes.runner import require_file, train_baseline, write_results

__all__ = ["main"]


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    args = recipe_parser("tfqkd.recipes.ptq", __doc__.split("\n\n")[0]).parse_args(argv)

    def go():
        require_file(args.student_model, "student model")
        start = start_recipe(args, "ptq")
        config = start.config
        policy = resolve_policy(config["quant"])
        run = start.new_run()
        with run.scope():  # models and optimizers of the --strategy
            student = train_baseline(run, "student", start.student_model, start.unsafe)
            run.record("Baseline (FP)", student)
            quantized = quantize(student, policy, run.calibration_batch())
            run.save_model(quantized, "student_ptq")
            run.record(f"Quantized (PTQ, {policy.name})", quantized)
            write_results(run, f"PTQ: {config['student']} ({policy.name}) on {config['dataset']}")

    return run_cli(go, prog="tfqkd.recipes.ptq")


if __name__ == "__main__":
    sys.exit(main())
