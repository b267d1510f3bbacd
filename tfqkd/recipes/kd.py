"""Float knowledge distillation (thesis section 5.4, eq. 5.1): ``python -m tfqkd.recipes.kd --model densenet21``.

Trains the float student from scratch with the KD loss against the frozen
trained teacher (tutor-studying with a float student), under the student
baseline schedule, and compares it with the student trained alone.
"""

import sys

from tfqkd.console import run_cli
from tfqkd.recipes.args import recipe_parser, start_recipe
from tfqkd.recipes.runner import require_file, train_baseline, write_results

__all__ = ["main"]


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    args = recipe_parser("tfqkd.recipes.kd", __doc__.split("\n\n")[0]).parse_args(argv)

    def go():
        require_file(args.teacher_model, "teacher model")
        require_file(args.student_model, "student model")
        start = start_recipe(args, "kd")
        config = start.config
        run = start.new_run()
        with run.scope():  # models and optimizers of the --strategy
            teacher = train_baseline(run, "teacher", start.teacher_model, start.unsafe)
            run.record(f"Teacher (FP, {config['teacher']})", teacher)
            run.record("Student alone (FP)", train_baseline(run, "student", start.student_model, start.unsafe))
            student = run.new_model("student")
            run.train("kd", "student_baseline", student, teacher, phase="ts")
            run.save_model(student, "student_kd")
            run.record("Student with KD (FP)", student)
            write_results(run, f"KD: {config['student']} from {config['teacher']} on {config['dataset']}")

    return run_cli(go, prog="tfqkd.recipes.kd")


if __name__ == "__main__":
    sys.exit(main())
