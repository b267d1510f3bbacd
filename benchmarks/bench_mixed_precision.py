"""Mixed-precision search benchmark (issue 7, acceptance 2; seed 004).

    /work/venv/bin/python benchmarks/bench_mixed_precision.py [--model kl_mlp_student] [--out benchmarks/results]

Data: the bundled ``mnist5k`` real MNIST digits; the 4,000 training digits are split into
3,000 for training and 1,000 held out for the search (sensitivity and verification); the
1,000 test digits are only used for the reported accuracies.

Steps: train the float model; run :func:`tfqkd.analysis.mixed_precision.search` (sensitivity
after a 1-epoch QAT probe per layer and width in {6, 4, 3, 2}, knapsack allocation minimising model size under
a 0.5-point held-out accuracy budget against uniform 8 bits, verification by QAT); train
uniform 4 bits with the same QAT; run AutoQKeras on the same float model, data and epochs.
Sizes count kernels at their bits and biases at 32 bits. The PSMAC latency (16 MAC units,
100 MHz) of each policy is reported too.

Acceptance: searched size <= 0.6 x uniform 8-bit size and test accuracy >= uniform 8-bit - 0.5.
Writes ``mixed_precision.json``, ``mixed_precision.png`` and ``mixed_precision_policy.yaml``.
"""

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


import tfqkd.data as data
from tfqkd.compat import keras
from tfqkd.analysis.mixed_precision import (
    bits_cost,
    evaluate_accuracy,
    layer_costs,
    policy_from_bits,
    quantization_aware_training,
    run_autoqkeras,
    search,
)
from tfqkd.analysis.psmac import PSMACModel
from tfqkd.quant import QuantPolicy, quantize
from tfqkd.training import make_sgd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="kl_mlp_student")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--float-epochs", type=int, default=10)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--autoqkeras-trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(args.seed)
    x_all, y_all = data.load_arrays("mnist5k", "train")
    x_test, y_test = data.load_arrays("mnist5k", "test")
    train, val = (x_all[:3000], y_all[:3000]), (x_all[3000:], y_all[3000:])
    calibration = x_all[:256]

    t0 = time.time()
    float_model = tfqkd.create_model(args.model, num_classes=10, input_shape=(28, 28, 1))
    float_model.compile(make_sgd(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    float_model.fit(*train, epochs=args.float_epochs, batch_size=64, verbose=0)
    float_acc = evaluate_accuracy(float_model, x_test, y_test)
    print(f"float {args.model}: test {float_acc:.2f}% ({time.time() - t0:.0f}s)", flush=True)

    costs = layer_costs(float_model)
    psmac = PSMACModel(num_mac_units=16, frequency_hz=100e6)

    def summarize(label, model, bits, seconds=None, **extra):
        size = bits_cost(costs, bits, "size")
        cycles = bits_cost(costs, bits, "latency", psmac)
        row = {
            "label": label, "bits": bits, "test_accuracy": evaluate_accuracy(model, x_test, y_test),
            "size_bits": size, "size_kib": size / 8 / 1024, "bitops": bits_cost(costs, bits, "bitops"),
            "psmac_cycles": cycles, "psmac_latency_ms": 1e3 * cycles / psmac.frequency_hz,
            "search_seconds": seconds, **extra,
        }  # fmt: skip
        print(f"{label:<22} test {row['test_accuracy']:6.2f}%  size {row['size_kib']:8.1f} KiB  "
              f"psmac {row['psmac_latency_ms']:.3f} ms  bits {bits}", flush=True)  # fmt: skip
        return row

    # Searched policy (its search trains the uniform 8-bit reference with the same QAT).
    result = search(
        float_model, train, val, calibration, budget=args.budget, objective="size", method="knapsack",
        candidate_bits=(8, 6, 4, 3, 2), mode="qat", qat_epochs=args.qat_epochs, sensitivity_epochs=1,
    )  # fmt: skip
    policy_path = out / "mixed_precision_policy.yaml"
    result.policy.to_yaml(policy_path)
    assert QuantPolicy.from_yaml(policy_path).resolve([(n, c["type"]) for n, c in costs.items()]) is not None
    rows = [
        summarize("uniform 8-bit (QAT)", result.reference_model, {n: 8 for n in costs}, val_accuracy=result.reference_val_accuracy),
        summarize("searched mixed (QAT)", result.model, result.bits, result.search_seconds, val_accuracy=result.val_accuracy),
    ]
    # Uniform 4 bits, same QAT.
    start = time.time()
    q4 = quantize(float_model, policy_from_bits({n: 4 for n in costs}, name="uniform4"), calibration)
    quantization_aware_training(q4, *train, epochs=args.qat_epochs)
    rows.append(summarize("uniform 4-bit (QAT)", q4, {n: 4 for n in costs}, time.time() - start,
                          val_accuracy=evaluate_accuracy(q4, *val)))  # fmt: skip

    # AutoQKeras on the same float model, data and epochs per trial.
    with tempfile.TemporaryDirectory() as tmp:
        auto = run_autoqkeras(float_model, train, val, Path(tmp) / "autoqkeras", max_trials=args.autoqkeras_trials,
                              epochs=args.qat_epochs, seed=args.seed)  # fmt: skip
    if auto["ok"]:
        # Kernel bits as searched; AutoQKeras leaves the ReLU outputs float: 16-bit operands
        # for PSMAC/bit-operations (the widest mode), which does not affect the size.
        auto_bits = {n: (auto["bits"].get(n) or 16, 16) for n in costs}
        rows.append(summarize("AutoQKeras (bits goal)", auto["model"], auto_bits, auto["search_seconds"],
                              val_accuracy=evaluate_accuracy(auto["model"], *val),
                              notes=auto["notes"] + ["AutoQKeras quantizes no ReLU layer here: activations stay float"]))  # fmt: skip
        autoqkeras = {k: v for k, v in auto.items() if k != "model"}
    else:
        print(f"AutoQKeras failed: {auto['error']}", flush=True)
        autoqkeras = auto

    ref, mixed = rows[0], rows[1]
    size_ratio = mixed["size_bits"] / ref["size_bits"]
    drop = ref["test_accuracy"] - mixed["test_accuracy"]
    verdict = {
        "size_ratio_vs_uniform8": size_ratio,
        "test_drop_vs_uniform8_points": drop,
        "size_ok (<= 0.6)": size_ratio <= 0.6,
        "accuracy_ok (drop <= 0.5)": drop <= 0.5,
    }
    verdict["pass"] = verdict["size_ok (<= 0.6)"] and verdict["accuracy_ok (drop <= 0.5)"]
    print(f"size ratio {size_ratio:.3f} (<= 0.6), test drop {drop:+.2f} points (<= 0.5): "
          f"{'PASS' if verdict['pass'] else 'FAIL'}", flush=True)  # fmt: skip

    report = {
        "model": args.model, "dataset": "mnist5k (3000 train / 1000 held-out from train; 1000 test)",
        "float_test_accuracy": float_acc, "budget_points": args.budget, "qat_epochs": args.qat_epochs,
        "rows": rows, "search": result.to_dict(), "autoqkeras": autoqkeras, "verdict": verdict,
        "policy_yaml": str(policy_path), "total_seconds": time.time() - t0,
    }  # fmt: skip
    (out / "mixed_precision.json").write_text(json.dumps(report, indent=2, default=str))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in rows:
        ax.scatter(row["size_kib"], row["test_accuracy"], s=60)
        ax.annotate(row["label"], (row["size_kib"], row["test_accuracy"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.axvline(0.6 * ref["size_kib"], color="grey", linestyle=":", label="0.6 x uniform 8-bit size")
    ax.axhline(ref["test_accuracy"] - 0.5, color="red", linestyle=":", label="uniform 8-bit - 0.5 points")
    ax.set_xlabel("weight size (KiB)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Mixed precision on {args.model}, mnist5k")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "mixed_precision.png", dpi=100)
    print(f"wrote {out / 'mixed_precision.json'}, {out / 'mixed_precision.png'}, {policy_path}")
    return 0 if verdict["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
