"""Post-training quantization drop at 8 and 4 bits (thesis section 5.5, table 5.10), on real data.

For each seed: the float student is trained with the quick budget's baseline
schedule on mnist5k (4,000 real MNIST digits), then quantized without any
training by the QKD learned-step quantizers (``w8a8``, ``w4a4``; intervals
from the min-max of the weights and one batch of activations) and by the
thesis's affine running min-max quantizers (``thesis8``, ``thesis4``).
Test top-1 on the 1,000 held-out digits; means and stds over seeds go to
``results/ptq_drop.json`` and ``results/ptq_drop.png``.

    python benchmarks/ptq_drop.py [--models densenet21 kl_mlp_student] [--seeds 0 1 2]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import tfqkd  # noqa: F401  (selects Keras 2 before TensorFlow loads)
import tfqkd.data as data
from tfqkd.quant import quantize
from tfqkd.recipes.config import budget_config, merge, validate_config
from tfqkd.recipes.qkd import train_baseline
from tfqkd.recipes.runner import Run, evaluate_top1

POLICIES = ("w8a8", "w4a4", "thesis8", "thesis4")


def run_seed(model_name, seed, work_dir):
    """Trains one float student and measures every PTQ policy; returns {row: test top-1}."""
    config = validate_config(
        merge(budget_config("quick", "mnist5k"), {"student": model_name, "seed": seed, "eval_train_limit": 1000})
    )
    run = Run(config, Path(work_dir) / f"{model_name}-seed{seed}", verbose=0)
    student = train_baseline(run, "student")
    calibration = data.calibration_batch("mnist5k", n=256, seed=seed)
    rows = {"float": evaluate_top1(student, run.x_test, run.y_test)}
    for policy in POLICIES:
        rows[policy] = evaluate_top1(quantize(student, policy, calibration), run.x_test, run.y_test)
    return rows


def _plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["float", *POLICIES]
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for ax, (model_name, stats) in zip(axes[0], summary.items()):
        means = [stats[label]["mean"] for label in labels]
        stds = [stats[label]["std"] for label in labels]
        bars = ax.bar(labels, means, yerr=stds, capsize=4, color=["grey", "C0", "C0", "C1", "C1"])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_ylim(max(0.0, min(means) - 10.0), 100.0)
        ax.set_title(f"PTQ on mnist5k: {model_name}")
        ax.set_ylabel("test top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["densenet21", "kl_mlp_student"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    per_seed, summary = {}, {}
    with tempfile.TemporaryDirectory() as work_dir:
        for model_name in args.models:
            per_seed[model_name] = {seed: run_seed(model_name, seed, work_dir) for seed in args.seeds}
            rows = per_seed[model_name]
            summary[model_name] = {
                label: {
                    "mean": float(np.mean([rows[s][label] for s in args.seeds])),
                    "std": float(np.std([rows[s][label] for s in args.seeds])),
                }
                for label in ["float", *POLICIES]
            }
    payload = {
        "what": "test top-1 (%) of float students and their post-training quantized twins, mnist5k",
        "schedule": "float student: quick budget student_baseline (2 epochs, lr 0.05, /5 after epoch 1)",
        "seeds": args.seeds,
        "per_seed": per_seed,
        "summary": summary,
        "drop_vs_float": {
            m: {p: round(s["float"]["mean"] - s[p]["mean"], 2) for p in POLICIES} for m, s in summary.items()
        },
        "seconds": round(time.time() - start, 1),
    }
    (out / "ptq_drop.json").write_text(json.dumps(payload, indent=2))
    _plot(summary, out / "ptq_drop.png")
    for model_name, drops in payload["drop_vs_float"].items():
        float_mean = summary[model_name]["float"]["mean"]
        print(f"{model_name}: float {float_mean:.2f}%; PTQ drop (points): " + ", ".join(f"{p} {d:+.2f}" for p, d in drops.items()))


if __name__ == "__main__":
    main()
