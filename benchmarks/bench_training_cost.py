"""Training-step cost of the QKD phases, as ratios measured in the same run.

    python benchmarks/bench_training_cost.py --out /tmp/bench_train [--student densenet21 --teacher densenet21]

Configurations, each its own compiled Keras model with its own optimizer:

* ``fp_fit``      plain float ``fit`` step of the student architecture (SparseCCE, accuracy)
* ``q_fit``       plain ``fit`` of the same quantized student (no QKD wrapper): isolates the wrapper's cost
* ``ss``          ``tfqkd.QKD(quantized student, phase="ss")``
* ``teacher_fit`` plain float ``fit`` step of the teacher
* ``cs``          ``tfqkd.QKD(quantized student, teacher, phase="cs")``
* ``ts_cache``    ``tfqkd.QKD(quantized student, phase="ts", teacher_logits=cache)``, batches (x, y, idx)
* ``ts_fly``      ``tfqkd.QKD(quantized student, teacher, phase="ts")`` (teacher inference each step)

Every round runs ``--steps`` steps of each configuration in turn (interleaved,
so load from other processes hits all alike); a callback times each batch;
the first batch of each ``fit`` call and a whole warm-up round are excluded.
Wall-clock and process CPU time (all threads) are both recorded; on a machine
shared with other work the CPU-time ratios are the steadier ones.
Reported: medians of the step times and the ratios

* SS / fp_fit, CS / (teacher_fit + SS), TS-cache / SS, TS-fly / SS

(targets: CS <= 1.10, TS-cache <= 1.15). Results go to OUT/training_cost.json and .csv.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import tfqkd  # noqa: F401  isort: skip
import numpy as np

from tfqkd.compat import keras, tf
from tfqkd import atomic
from tfqkd.bench.report import write_json
from tfqkd.bench.step_timer import StepTimer


CONFIGS = ("fp_fit", "q_fit", "ss", "teacher_fit", "cs", "ts_cache", "ts_fly")


def build(args):
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = rng.uniform(0, 1, (n, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    idx = np.arange(n, dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch).repeat().prefetch(2)
    ds_idx = tf.data.Dataset.from_tensor_slices((x, y, idx)).batch(args.batch).repeat().prefetch(2)
    calib = x[:64]

    student_fp = tfqkd.create_model(args.student, num_classes=10)
    teacher = tfqkd.create_model(args.teacher, num_classes=10)

    def quantized():
        return tfqkd.quantize(tfqkd.create_model(args.student, num_classes=10), args.quant, calib)

    def sgd():
        return tfqkd.make_sgd(1e-3)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    configs = {}
    wanted = set(args.configs)
    fp = student_fp
    fp.compile(optimizer=sgd(), loss=loss, metrics=["accuracy"])
    configs["fp_fit"] = (fp, ds)
    if "q_fit" in wanted:
        q_fit = quantized()
        q_fit.compile(optimizer=sgd(), loss=loss, metrics=["accuracy"])
        configs["q_fit"] = (q_fit, ds)
    ss = tfqkd.QKD(quantized(), phase="ss")
    ss.compile(optimizer=sgd())
    configs["ss"] = (ss, ds)
    teacher_fit = tfqkd.create_model(args.teacher, num_classes=10)
    teacher_fit.compile(optimizer=sgd(), loss=loss, metrics=["accuracy"])
    configs["teacher_fit"] = (teacher_fit, ds)
    cs_teacher = tfqkd.create_model(args.teacher, num_classes=10)
    cs = tfqkd.QKD(quantized(), cs_teacher, phase="cs", alpha=0.7, temperature=8)
    cs.compile(optimizer=sgd(), teacher_optimizer=sgd())
    configs["cs"] = (cs, ds)
    cache_ds = tf.data.Dataset.from_tensor_slices((x, y, idx)).batch(args.batch)
    cache = tfqkd.precompute_teacher_logits(teacher, cache_ds, n)
    ts_cache = tfqkd.QKD(quantized(), phase="ts", teacher_logits=cache, alpha=0.7, temperature=8)
    ts_cache.compile(optimizer=sgd())
    configs["ts_cache"] = (ts_cache, ds_idx)
    ts_fly = tfqkd.QKD(quantized(), teacher, phase="ts", alpha=0.7, temperature=8)
    ts_fly.compile(optimizer=sgd())
    configs["ts_fly"] = (ts_fly, ds)
    return {k: v for k, v in configs.items() if k in wanted}


RATIOS = {
    "ss / fp_fit": (["ss"], ["fp_fit"]),
    "ss / q_fit": (["ss"], ["q_fit"]),
    "cs / (teacher_fit + ss)": (["cs"], ["teacher_fit", "ss"]),
    "ts_cache / ss": (["ts_cache"], ["ss"]),
    "ts_fly / ss": (["ts_fly"], ["ss"]),
}


def _ratios(med):
    return {
        key: sum(med[k] for k in num) / sum(med[k] for k in den)
        for key, (num, den) in RATIOS.items()
        if all(k in med for k in num + den)
    }


def run(args, log=print):
    configs = build(args)
    timers = {k: StepTimer() for k in configs}
    log("warm-up (tracing) ...")
    for name, (model, ds) in configs.items():
        t0 = time.perf_counter()
        model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
        log(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s")
    for r in range(args.rounds):
        for name, (model, ds) in configs.items():
            model.fit(ds, steps_per_epoch=args.steps + 1, epochs=1, verbose=0, callbacks=[timers[name]])
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{k} {1e3 * np.median(t.times):.0f} ms" for k, t in timers.items()))
    med = {k: float(np.median(t.times)) for k, t in timers.items()}
    cpu = {k: float(np.median(t.cpu_times)) for k, t in timers.items()}
    ratios, cpu_ratios = _ratios(med), _ratios(cpu)
    # Per-round ratios: how stable each ratio is under the machine's load.
    spread = {}
    for key, (num, den) in RATIOS.items():
        if not all(k in timers for k in num + den):
            continue
        per_round = []
        for r in range(args.rounds):
            sl = slice(r * args.steps, (r + 1) * args.steps)
            n_ = sum(np.median(timers[k].times[sl]) for k in num)
            d_ = sum(np.median(timers[k].times[sl]) for k in den)
            per_round.append(float(n_ / d_))
        spread[key] = per_round
    return {"median_step_ms": {k: 1e3 * v for k, v in med.items()}, "ratios": ratios, "per_round": spread,
            "median_step_cpu_ms": {k: 1e3 * v for k, v in cpu.items()}, "cpu_time_ratios": cpu_ratios,
            "steps_timed": {k: len(t.times) for k, t in timers.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_training_out")
    parser.add_argument("--student", default="densenet21")
    parser.add_argument("--teacher", default="densenet21")
    parser.add_argument("--quant", default="w8a8")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run(args, log=lambda s: print(s, flush=True))
    result.update(args=vars(args), load_avg=os.getloadavg(), seconds=time.perf_counter() - t0)
    write_json(out / "training_cost.json", result)
    atomic.write_csv(out / "training_cost.csv", [{"config": k, "median_step_ms": v} for k, v in result["median_step_ms"].items()])
    print(json.dumps({k: result[k] for k in ("median_step_ms", "ratios", "per_round", "median_step_cpu_ms",
                                             "cpu_time_ratios")}, indent=1))
    targets = {"cs / (teacher_fit + ss)": 1.10, "ts_cache / ss": 1.15}
    for key, limit in targets.items():
        if key not in result["ratios"]:
            continue
        for kind in ("ratios", "cpu_time_ratios"):
            value = result[kind][key]
            print(f"{key} [{kind}]: {value:.3f} (target <= {limit}) {'OK' if value <= limit else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
