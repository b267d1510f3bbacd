"""Quantization-aware training (thesis section 5.6; QKD phase SS): ``python -m tfqkd.recipes.qat --quant w4a4``.

Float baseline (trained or ``--student-model``), post-training quantization,
then self-studying with cross-entropy under the budget's ``ss`` schedule.
"""

import sys

import tfqkd.data as data
from tfqkd.cli import run_cli
from tfqkd.quant import quantize, resolve_policy
from tfqkd.recipes.args import recipe_parser, resolve_config, resolve_run_dir
from tfqkd.recipes.qkd import train_baseline
from tfqkd.recipes.runner import Run, require_file, save_model_atomic, write_results

__all__ = ["main"]


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    args = recipe_parser("tfqkd.recipes.qat", __doc__.split("\n\n")[0]).parse_args(argv)

    def go():
        require_file(args.student_model, "student model")
        config = resolve_config(args)
        policy = resolve_policy(config["quant"])
        run = Run(config, resolve_run_dir(args, "qat", config))
        student = train_baseline(run, "student", args.student_model, args.unsafe)
        run.record("Baseline (FP)", student)
        calibration = data.calibration_batch(config["dataset"], n=256, seed=config["seed"], data_dir=config.get("data_dir"))
        quantized = quantize(student, policy, calibration)
        run.record("Quantized (PTQ)", quantized)
        run.train("ss", "ss", quantized, phase="ss")
        save_model_atomic(quantized, run.model_path("student_ss"))
        run.record("SS (QAT)", quantized)
        write_results(run, f"QAT: {config['student']} ({policy.name}) on {config['dataset']}")

    return run_cli(go, prog="tfqkd.recipes.qat")


if __name__ == "__main__":
    sys.exit(main())
