"""Inference benchmark: the table-7.1 sweep, and what makes our int8 models fast on CPU.

    python benchmarks/bench_inference.py --out /tmp/bench_inf [--model densenet21] [--skip-sweep]

1. The ``tfqkd bench`` sweep for ``--model`` (Keras FP32, TFLite FP32/FP16/int8
   over batch sizes), written to ``OUT/sweep``.
2. A speed study, every variant timed *interleaved in the same run* (so
   load from other processes hits all alike) at batch 1 and at ``--batch``:
   the pre-activation DenseNet vs its Conv-BN-ReLU DPU variant (BN folds into
   the conv, ReLU fuses: no standalone MUL/ADD ops), int8 vs float
   input/output tensors, XNNPACK delegate on vs off, and 1 vs 2 threads.
   Written to ``OUT/study.json`` and ``OUT/study.csv``, with the TFLite op
   counts of each graph.

Medians of ``--repeats`` samples; each sample runs a fast batch several times.
"""

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)
import numpy as np

from tfqkd.bench.command import benchmark, resolve_target, write_outputs
from tfqkd.export.tflite import convert
from tfqkd.bench.latency import sweep, tflite_backend
from tfqkd import atomic
from tfqkd.bench.report import format_table, write_json
from tfqkd.bench.runtime import make_interpreter
from tfqkd.models import create_model


def op_counts(content):
    interpreter, _, _ = make_interpreter(content, batch_size=1, num_threads=1, xnnpack=False)
    return dict(collections.Counter(op["op_name"] for op in interpreter._get_ops_details()))


def study(model_name, batch, repeats, threads_list, log):
    calib = np.random.default_rng(0).uniform(0, 1, (64, 32, 32, 3)).astype(np.float32)
    graphs = {}
    for name in (model_name, f"{model_name}_dpu"):
        model = create_model(name, num_classes=10)
        for kind, io8 in (("float32", None), ("int8", True), ("int8", False)):
            t0 = time.perf_counter()
            content, _ = convert(model, calibration_data=calib, format=kind, int8_io=bool(io8), logits="int8")
            tag = f"{name}:{kind}" + ("" if io8 is None else (":int8io" if io8 else ":floatio"))
            graphs[tag] = content
            log(f"converted {tag} in {time.perf_counter() - t0:.0f} s")
    backends = []
    for tag, content in graphs.items():
        for threads in threads_list:
            backends.append(tflite_backend(f"{tag}:t{threads}", f"{tag} {threads} thr", content, num_threads=threads))
        if tag.endswith((":float32", ":int8io")):
            backends.append(tflite_backend(f"{tag}:t1:noxnn", f"{tag} 1 thr no XNNPACK", content, num_threads=1,
                                           xnnpack=False))
    measurements = sweep(backends, [1, batch], repeats=repeats, min_sample_s=0.05, max_batch_s=1e9, log=log)
    rows = []
    for m in measurements:
        d = m.as_dict()
        tag, _, rest = d["backend"].partition(":t")
        model, kind = tag.split(":")[0], ":".join(tag.split(":")[1:])
        d.update(model=model, kind=kind, threads=int(rest.split(":")[0]), xnnpack="noxnn" not in rest)
        rows.append(d)
    ops = {tag: op_counts(content) for tag, content in graphs.items()}
    return rows, ops


def ratio(rows, a, b, batch, key="batch_ms_median"):
    ra = next(r for r in rows if r["backend"] == a and r["batch_size"] == batch)
    rb = next(r for r in rows if r["backend"] == b and r["batch_size"] == batch)
    return ra[key] / rb[key]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_inference_out")
    parser.add_argument("--model", default="densenet21")
    parser.add_argument("--batch", type=int, default=32, help="the larger batch of the study")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-study", action="store_true")
    parser.add_argument("--power-watts", type=float, default=95.0, help="i5-8600K TDP by default")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(s):
        print(s, flush=True)

    log(f"load average at start: {os.getloadavg()}")
    if not args.skip_sweep:
        for threads in args.threads:
            resolved = resolve_target(args.model)
            payload = benchmark(resolved, threads=threads, power_watts=args.power_watts, log=log)
            write_outputs(payload, out / f"sweep_t{threads}")
            log(format_table(payload["table"], f"{args.model}, {threads} threads"))
            log(json.dumps(payload["ratios"], indent=1))
    if not args.skip_study:
        rows, ops = study(args.model, args.batch, args.repeats, args.threads, log)
        atomic.write_csv(out / "study.csv", rows)
        all_summaries = {}
        m, d = args.model, f"{args.model}_dpu"
        for clock, key in (("wall", "batch_ms_median"), ("cpu", "batch_cpu_ms_median")):
            all_summaries[clock] = summary = {}
            study_ratios(rows, summary, m, d, args, key)
        write_json(out / "study.json", {"rows": rows, "ops": ops, "ratios": all_summaries,
                                        "load_avg_end": os.getloadavg()})
        log(json.dumps(all_summaries, indent=1))
        log(json.dumps(ops, indent=1))
    log(f"load average at end: {os.getloadavg()}")
    return 0


def study_ratios(rows, summary, m, d, args, key):
    def ratio_(a, b, batch):
        return ratio(rows, a, b, batch, key)

    for b in (1, args.batch):
        for t in args.threads:
            s = summary.setdefault(f"batch{b}_t{t}", {})
            s["int8/fp32 time"] = ratio_(f"{m}:int8:int8io:t{t}", f"{m}:float32:t{t}", b)
            s["dpu-variant/preact time (int8)"] = ratio_(f"{d}:int8:int8io:t{t}", f"{m}:int8:int8io:t{t}", b)
            s["dpu-variant/preact time (fp32)"] = ratio_(f"{d}:float32:t{t}", f"{m}:float32:t{t}", b)
            s["int8io/floatio time"] = ratio_(f"{m}:int8:int8io:t{t}", f"{m}:int8:floatio:t{t}", b)
            s["dpu int8 / preact fp32 time"] = ratio_(f"{d}:int8:int8io:t{t}", f"{m}:float32:t{t}", b)
        s = summary.setdefault(f"batch{b}_xnnpack", {})
        s["int8 xnnpack/builtin time (1 thr)"] = ratio_(f"{m}:int8:int8io:t1", f"{m}:int8:int8io:t1:noxnn", b)
        s["fp32 xnnpack/builtin time (1 thr)"] = ratio_(f"{m}:float32:t1", f"{m}:float32:t1:noxnn", b)
        if len(args.threads) > 1:
            t2 = max(args.threads)
            s[f"int8 {t2}thr/1thr time"] = ratio_(f"{m}:int8:int8io:t{t2}", f"{m}:int8:int8io:t1", b)
            s[f"fp32 {t2}thr/1thr time"] = ratio_(f"{m}:float32:t{t2}", f"{m}:float32:t1", b)


if __name__ == "__main__":
    sys.exit(main())
