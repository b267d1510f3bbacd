"""Float knowledge distillation (thesis section 5.4, eq. 5.1): ``python -m tfqkd.recipes.kd --model densenet21``.

Trains the float student from scratch with the KD loss against the frozen
trained teacher (tutor-studying with a float student), under the student
baseline schedule, and compares it with the student trained alone.
"""

import sys

from tfqkd.recipes.entry import recipe_main
from tfqkd.recipes.runner import train_baseline, write_results

__all__ = ["main"]


def _kd(start):
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


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    return recipe_main("kd", __doc__, _kd, argv)


if __name__ == "__main__":
    sys.exit(main())
