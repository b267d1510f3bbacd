"""The thesis pipeline end to end: QKD (Kim et al. 2019; thesis section 5.7, tables 5.14-5.16).

    python -m tfqkd.recipes.qkd --model densenet21 [--teacher densenet63] [--dataset cifar10]
                                [--quant w8a8|w4a4|POLICY.yaml] [--budget quick|thesis] [--run-dir DIR]
                                [--deterministic] [--strategy mirrored|multiworker]
    python -m tfqkd.recipes.qkd --resume RUN_DIR      # after a crash: continues where it stopped

Stages (each its own compile/fit, Algorithm 1):

1. float baselines of teacher and student (or reuse trained ones);
2. Quantized: post-training quantization of the float student (intervals
   from the min-max of weights and one batch of activations);
3. SS: self-studying (quantization-aware training, cross-entropy only);
4. SS+TS: from SS, tutor-studying with the frozen baseline teacher;
5. QKD: from SS, co-studying with a copy of the teacher, then tutor-studying
   with that co-studied teacher.

It prints the thesis's comparison table (Baseline, Quantized, SS, SS+TS, QKD;
train and test top-1) and writes results.json, results.csv and
comparison.png into the run directory.

The student the run stands behind is saved as ``models/student_best.h5``,
which ``tfqkd export``, ``bench`` and ``analyze`` read: the QKD student,
unless distillation left it more than a point of training top-1 below SS
(a teacher or learning rate that does not suit this student). The recipe
then says so in one line and keeps the better of SS and SS+TS. The choice
uses the training images only, never the test set.
"""

import sys
import time

from tfqkd.quant import quantize, resolve_policy
from tfqkd.recipes.entry import recipe_main
from tfqkd.recipes.runner import Run, copy_model, train_baseline, write_results

__all__ = ["main", "run_qkd"]


def _stage(run, name, build):
    """Loads stage ``name`` from the run directory or builds it and saves it."""
    model = run.load_stage(name)
    if model is None:
        model = build()
        run.save_model(model, name)
    return model


def run_qkd(config, run_dir, teacher_model=None, student_model=None, unsafe=False, *, resume=False, strategy=None,
            runtime=None):  # fmt: skip
    """Runs the full QKD comparison and returns the Run (results in ``run.results``).

    Args:
      config: the validated recipe config.
      run_dir: the run directory.
      teacher_model, student_model: trained float models to reuse instead of training them.
      unsafe: allow Lambda layers in those files.
      resume: continue an unfinished stage from its last checkpoint.
      strategy: the ``tf.distribute`` strategy (default: the current one).
      runtime: start options to store in ``runtime.json``.

    Returns:
      the Run.
    """
    policy = resolve_policy(config["quant"])  # a bad policy fails before anything is written
    run = Run(config, run_dir, resume=resume, strategy=strategy, runtime=runtime)
    with run.scope():  # every model and optimizer is a (possibly distributed) variable of the strategy
        _pipeline(run, policy, teacher_model, student_model, unsafe)
    return run


def _pipeline(run, policy, teacher_model, student_model, unsafe):
    """The stages of Algorithm 1 and the comparison table (inside the strategy scope)."""
    config = run.config
    run.log(f"{config['student']} from {config['teacher']} on {config['dataset']}, policy {policy.name}")

    start = time.time()
    teacher = train_baseline(run, "teacher", teacher_model, unsafe)
    run.record(f"Teacher baseline (FP, {config['teacher']})", teacher, time.time() - start)

    start = time.time()
    student_fp = train_baseline(run, "student", student_model, unsafe)
    run.record("Baseline (FP)", student_fp, time.time() - start)

    calibration = run.calibration_batch()
    start = time.time()
    ptq = _stage(run, "student_ptq", lambda: quantize(student_fp, policy, calibration))
    run.record("Quantized (PTQ)", ptq, time.time() - start)

    def self_study():
        model = copy_model(ptq)
        run.train("ss", "ss", model, phase="ss")
        return model

    start = time.time()
    ss = _stage(run, "student_ss", self_study)
    run.record("SS", ss, time.time() - start)

    def tutor_study():
        model = copy_model(ss)
        run.train("ss_ts", "ts", model, teacher, phase="ts")
        return model

    start = time.time()
    ss_ts = _stage(run, "student_ss_ts", tutor_study)
    run.record("SS+TS", ss_ts, time.time() - start)

    start = time.time()
    cs_student = run.load_stage("student_cs")
    cs_teacher = run.load_stage("teacher_cs")
    if cs_student is None or cs_teacher is None:
        cs_student, cs_teacher = copy_model(ss), copy_model(teacher)
        run.train("cs", "cs", cs_student, cs_teacher, phase="cs")
        run.save_model(cs_teacher, "teacher_cs")
        run.save_model(cs_student, "student_cs")

    def qkd_tutor_study():
        model = copy_model(cs_student)
        run.train("qkd_ts", "ts", model, cs_teacher, phase="ts")
        return model

    qkd = _stage(run, "student_qkd", qkd_tutor_study)
    run.record("QKD (SS+CS+TS)", qkd, time.time() - start)
    _keep_best_student(run, {"SS": ss, "SS+TS": ss_ts, "QKD (SS+CS+TS)": qkd})
    title = f"QKD comparison: {config['student']} ({policy.name}) from {config['teacher']} on {config['dataset']}"
    write_results(run, title)


#: Training top-1 points a distillation phase may lose against SS before the recipe keeps another student.
REGRESSION_POINTS = 1.0


def _keep_best_student(run, students):
    """Saves ``models/student_best.h5`` (QKD unless it ended below SS) and marks its results row.

    Args:
      run: the Run, whose ``results`` hold a row per method.
      students: ``{method: model}`` for "SS", "SS+TS" and "QKD (SS+CS+TS)", in that order.
    """
    train = {row["method"]: row["train_top1"] for row in run.results if row["method"] in students}
    for method in list(students)[1:]:
        behind = train["SS"] - train[method]
        if behind > REGRESSION_POINTS:
            run.log(
                f"warning: {method} ended {behind:.1f} points of training top-1 below SS ({train[method]:.1f}% vs "
                f"{train['SS']:.1f}%): distillation hurt this student; try a lower cs/ts learning rate or temperature"
            )
    chosen = "QKD (SS+CS+TS)"
    if train["SS"] - train[chosen] > REGRESSION_POINTS:
        chosen = max(["SS", "SS+TS"], key=lambda method: train[method])
    run.save_model(students[chosen], "student_best")
    for row in run.results:
        if row["method"] in students:
            row["exported"] = row["method"] == chosen
    run.log(f"exported student (models/student_best.h5): {chosen}")


def _qkd(start):
    run_qkd(
        start.config, start.run_dir, start.teacher_model, start.student_model, start.unsafe,
        resume=start.resume, strategy=start.strategy, runtime=start.runtime,
    )  # fmt: skip


def main(argv=None):
    """Runs the recipe; returns the exit code (2 for bad input)."""
    return recipe_main("qkd", __doc__, _qkd, argv)


if __name__ == "__main__":
    sys.exit(main())
