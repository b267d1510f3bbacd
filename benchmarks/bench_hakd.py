"""Hardware-aware KD benchmark (issue 7, acceptance 3; seed 002).

    /work/venv/bin/python benchmarks/bench_hakd.py [--backend tflite|psmac] [--budget-ms MS] [--out benchmarks/results]

Data: the bundled ``mnist5k`` real MNIST digits (4,000 train / 1,000 test). Teacher:
``kl_mlp_teacher`` (784-1200-1200-10) trained briefly. Candidates: MobileNetV1 widths 0.25,
0.5, 0.75 and MobileNetV2 width 0.35 at 28x28x1. Backend ``tflite``: int8 TFLite interpreter on
this CPU, one thread, batch 1, median of 50 invokes (shared machine: absolute figures are
noisy); ``psmac``: the precision-scalable MAC model at 8 bits, 16 units, 100 MHz.

Without ``--budget-ms`` the budget is the geometric mean of the fastest and slowest candidate
latencies (so the choice is not trivial). HAKD picks the Pareto-best (most MACs) candidate
within the budget and distills it from the teacher (QKD tutor-studying, T=8, alpha=0.7); the
other feasible candidates are distilled with the same schedule, the teacher is pruned to 80 %
sparsity with tfmot, and the chosen student and the teacher are converted to int8, for the
Pareto plot. The chosen student's latency is measured again after training.

Writes ``hakd.json`` and ``hakd_pareto.png``; exit 0 if the student meets the budget.
"""

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import tfqkd.data as data
from tfqkd.compat import keras
from tfqkd.analysis.hakd import (
    Candidate,
    PSMACBackend,
    TFLiteBackend,
    hakd_search,
    measure_candidates,
    plot_pareto,
)
from tfqkd.analysis.psmac import PSMACModel
from tfqkd.training import make_sgd

CANDIDATES = [
    Candidate("mobilenet_v1", (("width_multiplier", 0.25),), "mnv1_w0.25"),
    Candidate("mobilenet_v1", (("width_multiplier", 0.5),), "mnv1_w0.5"),
    Candidate("mobilenet_v1", (("width_multiplier", 0.75),), "mnv1_w0.75"),
    Candidate("mobilenet_v2", (("width_multiplier", 0.35),), "mnv2_w0.35"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("tflite", "psmac"), default="tflite")
    parser.add_argument("--budget-ms", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    keras.utils.set_random_seed(args.seed)
    x_train, y_train = data.load_arrays("mnist5k", "train")
    x_test, y_test = data.load_arrays("mnist5k", "test")

    teacher = tfqkd.create_model("kl_mlp_teacher", num_classes=10, input_shape=(28, 28, 1))
    teacher.compile(make_sgd(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(x_train, y_train, epochs=8, batch_size=64, verbose=0)

    with tempfile.TemporaryDirectory() as tmp:
        if args.backend == "tflite":
            backend = TFLiteBackend(calibration=x_train[:128], runs=50, workdir=tmp)
        else:
            backend = PSMACBackend(bits=8, psmac=PSMACModel(num_mac_units=16, frequency_hz=100e6))
        budget = args.budget_ms
        if budget is None:
            probe = measure_candidates(CANDIDATES, backend, (28, 28, 1), 10)
            latencies = [r["latency_ms"] for r in probe]
            budget = math.sqrt(min(latencies) * max(latencies))
            print("probe latencies (ms):", {r["name"]: round(r["latency_ms"], 4) for r in probe}, flush=True)
        print(f"latency budget {budget:.4f} ms on {backend.name}", flush=True)
        result = hakd_search(
            teacher, CANDIDATES, (x_train, y_train), (x_test, y_test), backend, budget,
            epochs=args.epochs, learning_rate=0.05, seed=args.seed,
        )  # fmt: skip
        chosen = result["chosen"]
        remeasured = backend.measure(chosen["model"], chosen["name"] + "_trained")["latency_ms"]
    plot_path = plot_pareto(result["points"], out / f"hakd_pareto{'' if args.backend == 'tflite' else '_psmac'}.png",
                            latency_budget=budget, title=f"HAKD on mnist5k ({backend.name})")  # fmt: skip
    meets = chosen["latency_ms"] <= budget
    report = {
        "backend": backend.name,
        "latency_budget_ms": budget,
        "teacher": {"model": "kl_mlp_teacher", "test_accuracy": result["teacher_accuracy"]},
        "candidates": [
            {k: v for k, v in row.items() if k not in ("candidate", "model", "path")} for row in result["rows"]
        ],
        "chosen": {
            "name": chosen["name"], "latency_ms": chosen["latency_ms"], "latency_ms_after_training": remeasured,
            "macs": chosen["macs"], "params": chosen["params"], "test_accuracy": chosen["accuracy"],
        },  # fmt: skip
        "points": result["points"],
        "meets_budget": meets,
        "plot": str(plot_path),
        "seconds": time.time() - t0,
    }
    name = "hakd.json" if args.backend == "tflite" else "hakd_psmac.json"
    (out / name).write_text(json.dumps(report, indent=2, default=str))
    for p in result["points"]:
        print(f"{p['kind']:<22} {p['name']:<22} acc {p['accuracy']:6.2f}%  latency {p['latency_ms']:.4f} ms  "
              f"size {p['size_bytes'] / 1024:8.1f} KiB", flush=True)  # fmt: skip
    print(f"chosen {chosen['name']}: {chosen['latency_ms']:.4f} ms (after training {remeasured:.4f}) "
          f"<= budget {budget:.4f}: {meets}; test {chosen['accuracy']:.2f}%; wrote {out / name}, {plot_path}")  # fmt: skip
    return 0 if meets else 1


if __name__ == "__main__":
    sys.exit(main())
