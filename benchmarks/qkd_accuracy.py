"""QKD accuracy benchmark (issue 3, acceptance 4): 4-bit KL_MLP student on real MNIST digits.

    /work/venv/bin/python benchmarks/qkd_accuracy.py [--seeds 0 1 2] [--out benchmarks/results]

Data: the bundled ``mnist5k`` (4,000 real MNIST training digits, the 1,000
held-out test digits are the test set). Student ``kl_mlp_student`` (784-300-
300-10), teacher ``kl_mlp_teacher`` (784-1200-1200-10), policy ``w4a4`` (4-bit
weights and activations, QKD learned-step quantizers), three seeds.

Each seed runs the library's QKD recipe (:func:`tfqkd.recipes.qkd.run_qkd`)
with a config dict (the thesis MNIST hyperparameters: SGD with Nesterov
momentum 0.9, weight decay 5e-4, batch 64, T=20, alpha=0.7, SS/CS lr 0.01,
baselines lr 0.1 with warmup and /2 milestones), scaled down in epochs; the
phase lengths keep the thesis's SS:CS:TS = 30:50:40 ratio. It records:

* Baseline (FP): the float student;
* Quantized (PTQ): w4a4 post-training quantization of it;
* SS: self-studying (QAT) for the SS epochs only (the thesis's "SS" row);
* SS (matched budget): the SS model trained on with cross-entropy for CS+TS
  more epochs, so it has made exactly as many student updates as the QKD path
  (SS+CS+TS). This is the fair QAT baseline the acceptance compares against;
* SS+TS: tutor-studying from the frozen float teacher after SS;
* QKD (SS+CS+TS): co-studying then tutor-studying with the co-studied teacher.

Writes ``qkd_accuracy.json`` (per-seed rows, means, stds, the schedule and the
verdicts) and ``qkd_accuracy.png`` (mean test top-1 with std error bars), and
prints the checks: mean QKD >= mean SS; mean QKD within 1.0 point of the
mean float student; the 4-bit PTQ drop.
"""

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tfqkd.recipes.config import validate_config
from tfqkd.recipes.qkd import run_qkd
from tfqkd.recipes.runner import copy_model, save_model_atomic

ROWS = ("Baseline (FP)", "Quantized (PTQ)", "SS", "SS (matched budget)", "SS+TS", "QKD (SS+CS+TS)")
TEACHER_ROW = "Teacher (FP)"

# The thesis MNIST recipe (configs/thesis_mnist.yaml) at about 1/5 of its epochs:
# baselines 100 -> 20 (milestones 20/40/60 -> 5/10/15), SS 30 -> 6, CS 50 -> 10, TS 40 -> 8.
# The thesis runs TS at lr 0.1. Tried here: with T=20 the KD term's gradient is about
# alpha*T = 14 times the cross-entropy's, and at lr 0.1 the 4-bit student collapsed to
# 10% test top-1 within the first TS epoch (seed 0), so TS uses the SS/CS rate 0.01.
CONFIG = {
    "name": "bench_qkd_accuracy",
    "dataset": "mnist5k",
    "student": "kl_mlp_student",
    "teacher": "kl_mlp_teacher",
    "quant": "w4a4",
    "seed": 0,
    "batch_size": 64,
    "alpha": 0.7,
    "temperature": 20.0,
    "weight_decay": 5.0e-4,
    "momentum": 0.9,
    "teacher_cache": "auto",
    "schedules": {
        "teacher_baseline": {"epochs": 20, "lr": 0.1, "milestones": [5, 10, 15], "factor": 2, "warmup": 1},
        "student_baseline": {"epochs": 20, "lr": 0.1, "milestones": [5, 10, 15], "factor": 2, "warmup": 1},
        "ss": {"epochs": 6, "lr": 0.01, "milestones": [], "factor": 2, "warmup": 0},
        "cs": {"epochs": 10, "lr": 0.01, "milestones": [], "factor": 2, "warmup": 0},
        "ts": {"epochs": 8, "lr": 0.01, "milestones": [], "factor": 2, "warmup": 0},
    },
}


# What was tried before settling on CONFIG (all seeds always reported, none dropped).
TRIED = [
    "TS lr 0.1 (thesis value), T=20: seed 0 SS+TS collapsed to 10.0% test top-1 in the first TS epoch "
    "(KD loss ~15, 4-bit student diverged); run stopped, TS lr set to 0.01 (the SS/CS rate).",
    "TS lr 0.01, T=20 (this config), 3 seeds: mean QKD 95.03 vs SS 94.97, SS (matched budget) 94.93, "
    "float student 94.93, PTQ 95.03 (earlier run whose seed-0 baseline/PTQ/SS models were reused from the run above).",
]


def run_seed(config, seed, run_dir):
    """One seed of the comparison; returns {row: {"train_top1", "test_top1"}}."""
    cfg = validate_config(dict(copy.deepcopy(config), seed=seed))
    run = run_qkd(cfg, run_dir)
    rows = {r["method"]: r for r in run.results}
    rows[TEACHER_ROW] = next(r for r in run.results if r["method"].startswith("Teacher baseline"))

    # Matched-budget QAT: continue the SS model with cross-entropy for CS+TS epochs at the
    # SS rate, so its student has as many updates as the QKD path (SS+CS+TS).
    extra = cfg["schedules"]["cs"]["epochs"] + cfg["schedules"]["ts"]["epochs"]
    run.config["schedules"]["ss_matched"] = dict(cfg["schedules"]["ss"], epochs=extra)
    model = run.load_stage("student_ss_matched")
    if model is None:
        model = copy_model(run.load_stage("student_ss"))
        run.train("ss_matched", "ss_matched", model, phase="ss")
        save_model_atomic(model, run.model_path("student_ss_matched"))
    rows["SS (matched budget)"] = run.record("SS (matched budget)", model)
    return {name: {"train_top1": r["train_top1"], "test_top1": r["test_top1"]} for name, r in rows.items()}


def _plot(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [TEACHER_ROW, *ROWS]
    means = [summary[n]["test_top1_mean"] for n in names]
    stds = [summary[n]["test_top1_std"] for n in names]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = ax.bar(np.arange(len(names)), means, 0.6, yerr=stds, capsize=4,
                  color=["#999999", "#4c72b0", "#dd8452", "#55a868", "#8fbf8f", "#8172b3", "#c44e52"])  # fmt: skip
    ax.bar_label(bars, labels=[f"{m:.2f}\n±{s:.2f}" for m, s in zip(means, stds)], fontsize=8, padding=2)
    ax.set_xticks(np.arange(len(names)), names, rotation=15)
    finite = [m for m in means if np.isfinite(m)]
    ax.set_ylim(max(0.0, min(finite) - 5.0), 100.5)
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--work-dir", help="run directories (default: a temporary directory)")
    parser.add_argument("--temperature", type=float, help="override T (default 20, the thesis MNIST value)")
    parser.add_argument("--ts-lr", type=float, help="override the TS learning rate")
    args = parser.parse_args(argv)

    config = copy.deepcopy(CONFIG)
    if args.temperature is not None:
        config["temperature"] = args.temperature
    if args.ts_lr is not None:
        config["schedules"]["ts"]["lr"] = args.ts_lr
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="qkd_accuracy_"))

    start = time.time()
    per_seed = {}
    for seed in args.seeds:
        print(f"=== seed {seed} ===", flush=True)
        per_seed[seed] = run_seed(config, seed, work / f"seed{seed}")
    seconds = time.time() - start

    summary = {}
    for name in (TEACHER_ROW, *ROWS):
        test = np.array([per_seed[s][name]["test_top1"] for s in args.seeds])
        train = np.array([per_seed[s][name]["train_top1"] for s in args.seeds])
        summary[name] = {
            "test_top1": test.tolist(),
            "test_top1_mean": round(float(test.mean()), 2),
            "test_top1_std": round(float(test.std(ddof=1)) if len(test) > 1 else 0.0, 2),
            "train_top1_mean": round(float(train.mean()), 2),
        }
    mean = {name: summary[name]["test_top1_mean"] for name in summary}
    qkd, fp = mean["QKD (SS+CS+TS)"], mean["Baseline (FP)"]
    checks = {
        "qkd_ge_ss_matched": qkd >= mean["SS (matched budget)"],
        "qkd_ge_ss": qkd >= mean["SS"],
        "qkd_within_1pt_of_float": abs(fp - qkd) <= 1.0,
        "qkd_minus_float": round(qkd - fp, 2),
        "qkd_minus_ss_matched": round(qkd - mean["SS (matched budget)"], 2),
        "qkd_minus_ss": round(qkd - mean["SS"], 2),
        "ptq_drop": round(fp - mean["Quantized (PTQ)"], 2),
    }
    schedules = config["schedules"]
    schedule = {
        "baseline_epochs": schedules["student_baseline"]["epochs"],
        "student_updates_in_epochs": {
            "SS": schedules["ss"]["epochs"],
            "SS (matched budget)": schedules["ss"]["epochs"] + schedules["cs"]["epochs"] + schedules["ts"]["epochs"],
            "SS+TS": schedules["ss"]["epochs"] + schedules["ts"]["epochs"],
            "QKD (SS+CS+TS)": schedules["ss"]["epochs"] + schedules["cs"]["epochs"] + schedules["ts"]["epochs"],
        },
        "note": (
            "SS (matched budget) continues the SS model with cross-entropy at the SS rate for CS+TS epochs, "
            "so QAT and QKD make the same number of student updates; SS is the thesis's row (SS epochs only)."
        ),
    }
    payload = {
        "benchmark": "qkd_accuracy",
        "dataset": "mnist5k (4,000 train / 1,000 held-out test real MNIST digits)",
        "student": config["student"],
        "teacher": config["teacher"],
        "policy": config["quant"],
        "seeds": args.seeds,
        "config": config,
        "schedule": schedule,
        "per_seed": {str(s): per_seed[s] for s in args.seeds},
        "summary": summary,
        "checks": checks,
        "tried": TRIED,
        "seconds": round(seconds, 1),
        "cpu_count": os.cpu_count(),
    }
    (out / "qkd_accuracy.json").write_text(json.dumps(payload, indent=2))
    title = (f"QKD on mnist5k: {config['student']} (w4a4) from {config['teacher']}, "
             f"{len(args.seeds)} seeds, T={config['temperature']:g}, alpha={config['alpha']:g}")  # fmt: skip
    _plot(summary, out / "qkd_accuracy.png", title)

    width = max(len(n) for n in summary) + 2
    print(title)
    print(f"{'Method':<{width}}{'test top-1 mean ± std':>24}   per seed")
    for name in (TEACHER_ROW, *ROWS):
        s = summary[name]
        seeds = "  ".join(f"{v:.2f}" for v in s["test_top1"])
        print(f"{name:<{width}}{s['test_top1_mean']:>15.2f} ± {s['test_top1_std']:<5.2f}   {seeds}")
    print(f"mean QKD >= mean SS (matched budget, {schedule['student_updates_in_epochs']['QKD (SS+CS+TS)']} epochs): "
          f"{checks['qkd_ge_ss_matched']} ({checks['qkd_minus_ss_matched']:+.2f} points)")  # fmt: skip
    print(f"mean QKD >= mean SS (thesis row, {schedules['ss']['epochs']} epochs): "
          f"{checks['qkd_ge_ss']} ({checks['qkd_minus_ss']:+.2f} points)")
    print(f"mean QKD within 1.0 point of mean float student: {checks['qkd_within_1pt_of_float']} "
          f"({checks['qkd_minus_float']:+.2f} points)")
    print(f"4-bit PTQ drop: {checks['ptq_drop']:.2f} points ({fp:.2f} -> {mean['Quantized (PTQ)']:.2f})")
    print(f"wrote {out / 'qkd_accuracy.json'} and {out / 'qkd_accuracy.png'} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
