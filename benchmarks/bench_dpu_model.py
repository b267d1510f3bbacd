"""The DPUCZDX8G performance model against the thesis's measured DPU figures.

    python benchmarks/bench_dpu_model.py --out /tmp/bench_dpu

For DenseNet-21/37/63 (the Conv-BN-ReLU ``*_dpu`` variants the thesis
deployed; CIFAR 32x32x3 input) on a ZCU102 with three B4096 cores at 300 MHz:

* the fitted global parameter(s) (overhead cycles per layer; optionally the
  engine efficiency too) and the max relative latency error of the fit;
* a leave-one-out check: fit on two models, predict the third;
* latency and throughput per model with the relative error to the thesis
  (0.69 / 1.11 / 1.78 ms; 3674 / 2251 / 1318 img/s);
* ablations: compute only (ideal engine), padding only, no memory term;
* the same models on the other DPUCZDX8G sizes (table 6.4), for reference.

Writes OUT/dpu_model.json and OUT/dpu_model.csv.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import tfqkd  # noqa: F401  isort: skip

from tfqkd.dpu.performance import CORES, CALIBRATION, THESIS_DPU, DPUConfig, calibrate, estimate, layer_costs
from tfqkd import atomic
from tfqkd.bench.report import write_json
from tfqkd.models import create_model

MODELS = ("densenet21", "densenet37", "densenet63")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_dpu_out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    models = {n: create_model(f"{n}_dpu", num_classes=10, input_shape=(32, 32, 3)) for n in MODELS}
    costs = {n: layer_costs(m) for n, m in models.items()}
    measured = {n: THESIS_DPU[n]["latency_ms"] for n in MODELS}
    etas = [i / 100 for i in range(20, 101, 2)]
    overheads = range(0, 15001, 100)

    fit1 = calibrate(costs, measured, etas=[1.0], overheads=overheads)
    fit2 = calibrate(costs, measured, etas=etas, overheads=overheads)
    loo = {}
    for held in MODELS:
        rest = {k: v for k, v in measured.items() if k != held}
        eta, over, _ = calibrate(costs, rest, etas=[1.0], overheads=overheads)
        pred = estimate(costs[held], DPUConfig(eta=eta, overhead_cycles=over))["latency_ms"]
        loo[held] = {"overhead_cycles": over, "predicted_ms": pred, "error": pred / measured[held] - 1}

    default = DPUConfig()
    variants = {
        "model (shipped calibration)": default,
        "compute only, padded (eta=1, no overhead, no memory)": replace(default, overhead_cycles=0.0, memory_bound=False),
        "padded compute + memory, no overhead": replace(default, overhead_cycles=0.0),
        "no memory term": replace(default, memory_bound=False),
    }
    rows = []
    for vname, cfg in variants.items():
        for n in MODELS:
            e = estimate(models[n], cfg)
            t = THESIS_DPU[n]
            rows.append({
                "variant": vname, "model": n, "arch": cfg.arch.name, "cores": cfg.cores,
                "macs": e["macs"], "layers": e["layers"], "ideal_ms": e["compute_only_ms"],
                "padded_ms": e["padded_compute_ms"], "latency_ms": e["latency_ms"],
                "thesis_latency_ms": t["latency_ms"], "latency_error": e["latency_ms"] / t["latency_ms"] - 1,
                "throughput": e["throughput"], "thesis_throughput": t["throughput"],
                "throughput_error": e["throughput"] / t["throughput"] - 1,
                "memory_bound_layers": e["memory_bound_layers"], "cpu_layers": len(e["cpu_layers"]),
            })
    for arch in CORES.values():
        cfg = replace(default, arch=arch)
        for n in MODELS:
            e = estimate(layer_costs(models[n], arch), cfg)
            rows.append({"variant": "other arch (shipped calibration)", "model": n, "arch": arch.name,
                         "cores": cfg.cores, "macs": e["macs"], "layers": e["layers"],
                         "ideal_ms": e["compute_only_ms"], "padded_ms": e["padded_compute_ms"],
                         "latency_ms": e["latency_ms"], "throughput": e["throughput"]})
    preact = estimate(create_model("densenet21", num_classes=10))
    payload = {
        "calibration_shipped": CALIBRATION,
        "fit_overhead_only": {"eta": fit1[0], "overhead_cycles": fit1[1], "max_error": fit1[2]},
        "fit_eta_and_overhead": {"eta": fit2[0], "overhead_cycles": fit2[1], "max_error": fit2[2]},
        "leave_one_out": loo,
        "rows": rows,
        "preactivation_densenet21_cpu_layers": len(preact["cpu_layers"]),
    }
    write_json(out / "dpu_model.json", payload)
    atomic.write_csv(out / "dpu_model.csv", rows)

    print(f"shipped calibration {CALIBRATION}")
    print(f"fit overhead only (eta=1): {payload['fit_overhead_only']}")
    print(f"fit eta and overhead:      {payload['fit_eta_and_overhead']}")
    for n, v in loo.items():
        print(f"leave-one-out {n}: overhead {v['overhead_cycles']:.0f} -> {v['predicted_ms']:.3f} ms "
              f"({100 * v['error']:+.1f}%)")
    print(f"\n{'variant':<54} {'model':<11} {'lat ms':>7} {'thesis':>6} {'err':>7} {'img/s':>7} {'thesis':>6} {'err':>7}")
    for r in rows:
        if "thesis_latency_ms" not in r:
            continue
        print(f"{r['variant']:<54} {r['model']:<11} {r['latency_ms']:7.3f} {r['thesis_latency_ms']:6.2f} "
              f"{100 * r['latency_error']:+6.1f}% {r['throughput']:7.0f} {r['thesis_throughput']:6.0f} "
              f"{100 * r['throughput_error']:+6.1f}%")
    print(f"\nother DPUCZDX8G sizes (x{default.cores} @ {default.clock_hz / 1e6:.0f} MHz), latency ms / img/s:")
    for r in rows:
        if r["variant"].startswith("other"):
            print(f"  {r['arch']:<6} {r['model']:<11} {r['latency_ms']:7.3f} {r['throughput']:7.0f}")
    print(f"pre-activation densenet21: {payload['preactivation_densenet21_cpu_layers']} layers the DPU cannot run "
          "(BN/ReLU before convs; thesis 6.1)")
    worst = max(abs(r["latency_error"]) for r in rows if r["variant"] == "model (shipped calibration)")
    print(f"max |latency error| of the shipped model: {100 * worst:.1f}% (target 35%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
