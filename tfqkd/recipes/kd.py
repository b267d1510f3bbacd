"""Float knowledge distillation (thesis section 5.4, eq. 5.1): ``python -m tfqkd.recipes.kd --model densenet21``.

Trains the float student from scratch with the KD loss against the frozen
trained teacher (tutor-studying with a float student), under the student
baseline schedule, and compares it with the student trained alone.
"""

import sys

from tfqkd.cli import run_cli
from tfqkd.recipes.args import recipe_parser, resolve_config, resolve_run_dir
from tfqkd.recipes.qkd import train_baseline
from tfqkd.recipes.runner import Run, require_file, save_model_atomic, write_results

__all__ = ["main"]


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    args = recipe_parser("tfqkd.recipes.kd", __doc__.split("\n\n")[0]).parse_args(argv)

    def go():
        require_file(args.teacher_model, "teacher model")
        require_file(args.student_model, "student model")
        config = resolve_config(args)
        run = Run(config, resolve_run_dir(args, "kd", config))
        teacher = train_baseline(run, "teacher", args.teacher_model, args.unsafe)
        run.record(f"Teacher (FP, {config['teacher']})", teacher)
        run.record("Student alone (FP)", train_baseline(run, "student", args.student_model, args.unsafe))
        student = run.new_model("student")
        run.train("kd", "student_baseline", student, teacher, phase="ts")
        save_model_atomic(student, run.model_path("student_kd"))
        run.record("Student with KD (FP)", student)
        write_results(run, f"KD: {config['student']} from {config['teacher']} on {config['dataset']}")

    return run_cli(go, prog="tfqkd.recipes.kd")


if __name__ == "__main__":
    sys.exit(main())
