"""Robustness grid (issue 13): short quantized trainings from scratch; must show 0 dead runs.

    python benchmarks/robustness.py                      # the whole grid (hours on 2 cores)
    python benchmarks/robustness.py --models kl_mlp_student dnn300 --seeds 8
    python benchmarks/robustness.py --models resnet8 densenet21 --seeds 2 --append

{models} x {w8a8, w4a4, w3a3, w2a2, thesis8, thesis4} x {Adam 1e-3, SGD 0.05 momentum 0.9,
SGD 0.1 Nesterov (the thesis's)} x seeds, on the bundled mnist5k (4,000 train / 1,000 test
real MNIST digits), each run as a new user writes it: ``create_model(name, quant=policy)``,
``compile``, ``fit`` (no calibration data), and the same without quantization (``fp32``) as
the control. MLPs and resnet8 train 2 epochs; densenet21 ("short") 1 epoch of 40 batches. A
run is dead when its training ends at chance (:func:`tfqkd.bench.robustness.is_dead_run`). Writes ``benchmarks/results/robustness.json`` (every run)
and ``robustness.png`` (final training accuracy per policy and optimizer; the dotted line is the
dead threshold).
"""

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tfqkd import atomic
from tfqkd.bench.robustness import OPTIMIZERS, train_run
from tfqkd.training.guard import chance_accuracy_ceiling
from tfqkd.data import load_arrays
from tfqkd.plotting import pyplot, save_figure

MODELS = ("kl_mlp_student", "dnn300", "resnet8", "densenet21")
#: fp32 is the control: what the same short training gives without quantization.
POLICIES = ("fp32", "w8a8", "w4a4", "w3a3", "w2a2", "thesis8", "thesis4")
#: (epochs, batches per epoch or None for all) per model: densenet21 is the "short" one.
BUDGET = {"densenet21": (1, 40)}
DEFAULT_BUDGET = (2, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--append", action="store_true", help="add to the runs already in robustness.json")
    args = parser.parse_args(argv)

    x_train, y_train = load_arrays("mnist5k", "train")
    x_test, y_test = load_arrays("mnist5k", "test")
    data = (x_train, y_train, x_test, y_test)
    path = args.out / "robustness.json"
    runs = json.loads(path.read_text())["runs"] if args.append and path.exists() else []
    grid = [(m, p, o, s) for m in args.models for p in args.policies for o in args.optimizers for s in range(args.seeds)]
    done = {(r["model"], r["policy"], r["optimizer"], r["seed"]) for r in runs}
    for model, policy, optimizer, seed in tqdm(grid, desc="robustness", unit="run"):
        if (model, policy, optimizer, seed) in done:
            continue
        epochs, steps = BUDGET.get(model, DEFAULT_BUDGET)
        run = train_run(model, policy, optimizer, seed, data, epochs=epochs, steps_per_epoch=steps)
        runs.append(run)
        if run["dead"]:
            tqdm.write(f"DEAD: {run}")
        _write(path, runs)  # after every run: a long grid can be stopped and --append-ed
    summary = _write(path, runs)
    _plot(runs, args.out / "robustness.png")
    print(f"{summary['runs']} runs, {summary['dead']} dead; per model: {summary['per_model']}")
    return 1 if summary["dead"] else 0


def _write(path, runs):
    per_model = {}
    for run in runs:
        cell = per_model.setdefault(run["model"], {"runs": 0, "dead": 0, "mean_test_accuracy": []})
        cell["runs"] += 1
        cell["dead"] += int(run["dead"])
        cell["mean_test_accuracy"].append(run["test_accuracy"])
    for cell in per_model.values():
        cell["mean_test_accuracy"] = round(float(np.mean(cell["mean_test_accuracy"])), 4)
    summary = {"runs": len(runs), "dead": sum(r["dead"] for r in runs), "per_model": per_model}
    payload = {
        "what": "short quantized trainings from scratch on mnist5k, create_model(quant=...) + fit, no calibration",
        "dead_means": "final training accuracy <= min(1.5/classes, 1/classes + 0.1) or final training loss >= 0.98 "
        "ln(classes)",
        "note": "test accuracy of the CNNs is low after so few updates because BatchNormalization's moving "
        "statistics lag the weights; the fp32 control shows the same",
        "summary": summary,
        "runs": runs,
    }
    atomic.write_text(path, json.dumps(payload, indent=1))
    return summary


def _plot(runs, path):
    plt = pyplot()
    models = sorted({r["model"] for r in runs}, key=lambda m: MODELS.index(m) if m in MODELS else 99)
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in runs if r["model"] == model]
        policies = [p for p in POLICIES if any(r["policy"] == p for r in mine)]
        for k, optimizer in enumerate(OPTIMIZERS):
            for i, policy in enumerate(policies):
                acc = [100 * r["train_accuracy"] for r in mine if r["policy"] == policy and r["optimizer"] == optimizer]
                ax.scatter(np.full(len(acc), i + (k - 1) * 0.25), acc, s=12, color=f"C{k}",
                           label=optimizer if i == 0 else None)  # fmt: skip
        ax.axhline(100 * chance_accuracy_ceiling(10), color="grey", ls=":", lw=1)  # at or below: dead
        ax.set_xticks(range(len(policies)), policies, rotation=30)
        ax.set_title(f"{model} ({len(mine)} runs, {sum(r['dead'] for r in mine)} dead)")
        ax.set_ylabel("final training top-1 (%)")
        ax.set_ylim(0, 100)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
