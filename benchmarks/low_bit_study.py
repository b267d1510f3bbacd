"""Low-bit study (issue 13): test accuracy vs bits for PTQ, QAT, KD and QKD, with a teacher that can teach.

    python benchmarks/low_bit_study.py                       # both datasets, 3 seeds (about an hour on 2 cores)
    python benchmarks/low_bit_study.py --datasets digits --seeds 0
    python benchmarks/low_bit_study.py --datasets mnist5k --bits 3 2 --methods QAT QKD --temperature 4 --tag t4

Student ``kl_mlp_student`` (784-300-300-10 MLP); teacher a float ``densenet21``, clearly
stronger than the float student on both bundled datasets (``mnist5k``: 4,000 train / 1,000
test real MNIST digits; ``digits``: 1,437 / 360 8x8 digits); its margin is reported.
Policies: weights and activations at 8, 4, 3 and 2 bits with the first and last layer at 8
(QKD learned-step quantizers). Per bit width and seed, from the same float student:

* PTQ: post-training quantization (steps from min-max, QKD Algorithm 1 line 2);
* QAT: self-studying (cross-entropy) for E student epochs;
* KD: tutor-studying from the float teacher for E epochs;
* QKD: self-studying, co-studying with a copy of the teacher, then tutor-studying with the
  co-studied teacher, E epochs in all (Kim et al. 2019; thesis Algorithm 1).

QAT, KD and QKD make the same number of student updates, with the same optimizer (SGD,
Nesterov momentum 0.9, weight decay 5e-4 except on quantizer state) and learning rate.
A difference between two methods is called real only when it exceeds twice their pooled
standard deviation over seeds. Writes ``low_bit_study.json`` and ``low_bit_study.png``.
"""

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from tfqkd import atomic
from tfqkd.compat import keras, tf
from tfqkd.data import load_arrays
from tfqkd.distill import QKD, precompute_teacher_logits
from tfqkd.models import create_model
from tfqkd.plotting import pyplot, save_figure
from tfqkd.quant import quantize
from tfqkd.quant.quantizers import quantizer_state_suffixes
from tfqkd.recipes.runner import copy_model
from tfqkd.training import WarmupMultiStep, make_sgd

METHODS = ("PTQ", "QAT", "KD", "QKD")
BITS = (8, 4, 3, 2)
STUDENT, TEACHER = "kl_mlp_student", "densenet21"
BATCH = 64
NO_DECAY = quantizer_state_suffixes()
ALPHA, TEMPERATURE = 0.7, 8.0
#: Epochs per dataset: float teacher, float student, and the quantized phases (QKD's SS, CS, TS;
#: QAT and KD train SS+CS+TS epochs). digits is small: more epochs for the same number of updates.
BUDGET = {
    "mnist5k": {"teacher": 8, "student": 20, "ss": 4, "cs": 2, "ts": 6},
    "digits": {"teacher": 30, "student": 60, "ss": 10, "cs": 5, "ts": 15},
}
FLOAT_LR, QUANT_LR = 0.05, 0.01


def _dataset(x, y, seed, epoch_tag):
    """Shuffled (x, y, index) batches: the index reads the teacher-logit cache."""
    idx = np.arange(len(x))
    ds = tf.data.Dataset.from_tensor_slices((x, y, idx))
    return ds.shuffle(len(x), seed=seed * 1009 + epoch_tag, reshuffle_each_iteration=True).batch(BATCH)


def _optimizer(lr, steps, epochs=None):
    if epochs is None:
        return make_sgd(lr, exclude=NO_DECAY)
    schedule = WarmupMultiStep(lr, steps, 0, [int(epochs * 0.5), int(epochs * 0.75)], 5)
    return make_sgd(schedule, exclude=NO_DECAY)


def _accuracy(model, x, y):
    return float(100.0 * np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def _train_float(name, data, epochs, seed):
    x, y, _, _ = data
    keras.utils.set_random_seed(seed)
    model = create_model(name, num_classes=10, input_shape=x.shape[1:])
    wrapper = QKD(model, phase="ss")
    wrapper.compile(_optimizer(FLOAT_LR, -(-len(x) // BATCH), epochs))
    wrapper.fit(_dataset(x, y, seed, 1), epochs=epochs, verbose=0)
    return model


#: What an ablation may change (--temperature, --alpha, --cs-teacher-lr); the defaults are the study's.
SETTINGS = {"temperature": TEMPERATURE, "alpha": ALPHA, "cs_teacher_lr": QUANT_LR}


def _phase(student, data, seed, tag, phase, epochs, teacher=None, cache=None):
    """Trains ``student`` in place for one QKD phase at the quantized learning rate."""
    x, y, _, _ = data
    if epochs <= 0:
        return
    model = QKD(
        student, teacher, phase=phase, alpha=SETTINGS["alpha"], temperature=SETTINGS["temperature"],
        teacher_logits=cache,
    )  # fmt: skip
    teacher_optimizer = _optimizer(SETTINGS["cs_teacher_lr"], None) if phase == "cs" else None
    model.compile(_optimizer(QUANT_LR, None), teacher_optimizer=teacher_optimizer)
    model.fit(_dataset(x, y, seed, tag), epochs=epochs, verbose=0)


def _cache(teacher, data):
    x, y, _, _ = data
    ordered = tf.data.Dataset.from_tensor_slices((x, y, np.arange(len(x)))).batch(256)
    return precompute_teacher_logits(teacher, ordered, len(x))


def run_cell(data, float_student, teacher, teacher_cache, bits, seed, budget, methods=METHODS):
    """Test top-1 of ``methods`` (PTQ, QAT, KD, QKD) at ``bits`` for one seed."""
    x, _, x_test, y_test = data
    policy = {"default": {"weight_bits": bits, "activation_bits": bits}, "first_last_bits": 8}
    keras.utils.set_random_seed(seed)
    ptq = quantize(float_student, policy, x[:256])
    total = budget["ss"] + budget["cs"] + budget["ts"]
    out = {"PTQ": _accuracy(ptq, x_test, y_test)}

    if "QAT" in methods:
        qat = copy_model(ptq)
        _phase(qat, data, seed, 10 + bits, "ss", total)
        out["QAT"] = _accuracy(qat, x_test, y_test)
    if "KD" in methods:
        kd = copy_model(ptq)
        _phase(kd, data, seed, 20 + bits, "ts", total, cache=teacher_cache)
        out["KD"] = _accuracy(kd, x_test, y_test)
    if "QKD" not in methods:
        return out
    qkd = copy_model(ptq)
    _phase(qkd, data, seed, 30 + bits, "ss", budget["ss"])
    co_teacher = copy_model(teacher)
    _phase(qkd, data, seed, 40 + bits, "cs", budget["cs"], teacher=co_teacher)
    _phase(qkd, data, seed, 50 + bits, "ts", budget["ts"], cache=_cache(co_teacher, data))
    out["QKD"] = _accuracy(qkd, x_test, y_test)
    out["co_studied_teacher"] = _accuracy(co_teacher, x_test, y_test)
    return out


def _stats(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(values.mean()), 2), "std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 2)}


def _verdict(a, b):
    """a - b and whether it exceeds twice the pooled standard deviation."""
    diff = a["mean"] - b["mean"]
    pooled = float(np.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2))
    return {"difference": round(diff, 2), "twice_pooled_std": round(2 * pooled, 2), "real": bool(abs(diff) > 2 * pooled)}


def study(dataset, seeds, log, bits_list=BITS, methods=METHODS):
    x, y = load_arrays(dataset, "train")
    x_test, y_test = load_arrays(dataset, "test")
    data = (x, y, x_test, y_test)
    budget = BUDGET[dataset]
    start = time.time()
    teacher = _train_float(TEACHER, data, budget["teacher"], seed=100)
    teacher_acc = _accuracy(teacher, x_test, y_test)
    teacher_cache = _cache(teacher, data)
    log(f"{dataset}: teacher {TEACHER} {teacher_acc:.2f}% ({time.time() - start:.0f} s)")
    cells = {str(b): {m: [] for m in methods} for b in bits_list}
    co_teacher, float_students = {str(b): [] for b in bits_list}, []
    for seed in seeds:
        student = _train_float(STUDENT, data, budget["student"], seed)
        float_students.append(_accuracy(student, x_test, y_test))
        log(f"{dataset} seed {seed}: float student {float_students[-1]:.2f}%")
        for bits in bits_list:
            t = time.time()
            result = run_cell(data, student, teacher, teacher_cache, bits, seed, budget, methods)
            for method in methods:
                cells[str(bits)][method].append(result[method])
            if "co_studied_teacher" in result:
                co_teacher[str(bits)].append(result["co_studied_teacher"])
            log(f"{dataset} seed {seed} {bits}-bit: " + ", ".join(f"{m} {result[m]:.2f}" for m in methods)
                + f" ({time.time() - t:.0f} s)")  # fmt: skip
    summary = {bits: {m: _stats(v) for m, v in row.items()} for bits, row in cells.items()}
    student_stats = _stats(float_students)
    return {
        "dataset": dataset,
        "budget_epochs": budget,
        "teacher": {"model": TEACHER, "test_top1": round(teacher_acc, 2)},
        "float_student": {"model": STUDENT, "test_top1": student_stats, "per_seed": float_students},
        "teacher_margin_points": round(teacher_acc - student_stats["mean"], 2),
        "per_seed": cells,
        "co_studied_teacher_test_top1": co_teacher,
        "summary": summary,
        "qkd_vs_qat": {bits: _verdict(row["QKD"], row["QAT"]) for bits, row in summary.items() if {"QKD", "QAT"} <= set(row)},
        "kd_vs_qat": {bits: _verdict(row["KD"], row["QAT"]) for bits, row in summary.items() if {"KD", "QAT"} <= set(row)},
        "seconds": round(time.time() - start),
    }


def _plot(results, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results):
        bits_list = [int(b) for b in result["summary"]]
        methods = [m for m in METHODS if m in next(iter(result["summary"].values()))]
        for k, method in enumerate(methods):
            means = [result["summary"][str(b)][method]["mean"] for b in bits_list]
            stds = [result["summary"][str(b)][method]["std"] for b in bits_list]
            x = np.arange(len(bits_list)) + (k - 1.5) * 0.06
            ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=method)
        ax.axhline(result["teacher"]["test_top1"], color="grey", ls="--", lw=1, label=f"float teacher ({TEACHER})")
        ax.axhline(result["float_student"]["test_top1"]["mean"], color="black", ls=":", lw=1, label="float student")
        ax.set_xticks(np.arange(len(bits_list)), [f"{b}-bit" for b in bits_list])
        ax.set_xlabel("weights and activations (first and last layer 8-bit)")
        ax.set_ylabel("test top-1 (%), mean ± std over seeds")
        ax.set_title(f"{STUDENT} on {result['dataset']}")
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(BUDGET), choices=list(BUDGET))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--alpha", type=float, default=ALPHA)
    parser.add_argument("--cs-teacher-lr", type=float, default=QUANT_LR, help="the teacher's rate in co-studying")
    parser.add_argument("--split", type=int, nargs=3, metavar=("SS", "CS", "TS"),
                        help="QKD's epochs per phase (ablations); QAT and KD train their sum")
    parser.add_argument("--tag", default="", help="suffix of the output files (ablations)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    SETTINGS.update(temperature=args.temperature, alpha=args.alpha, cs_teacher_lr=args.cs_teacher_lr)
    if args.split:
        for name in args.datasets:
            BUDGET[name].update(zip(("ss", "cs", "ts"), args.split))
    log = lambda line: print(line, flush=True)  # noqa: E731
    results = [study(name, args.seeds, log, args.bits, args.methods) for name in args.datasets]
    stem = "low_bit_study" + (f"_{args.tag}" if args.tag else "")
    payload = {
        "what": __doc__.split("\n\n")[0],
        "command": "python benchmarks/low_bit_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **SETTINGS,
        "float_lr": FLOAT_LR,
        "quantized_lr": QUANT_LR,
        "real_means": "|difference of means| > 2 x pooled std over seeds",
        "results": results,
    }
    atomic.write_text(args.out / f"{stem}.json", json.dumps(payload, indent=1))
    _plot(results, args.out / f"{stem}.png")
    for result in results:
        print(f"{result['dataset']}: teacher margin {result['teacher_margin_points']} points")
        for bits, row in result["summary"].items():
            verdict = result["qkd_vs_qat"].get(bits)
            said = f"  QKD-QAT {verdict['difference']:+.2f} ({'real' if verdict['real'] else 'within noise'})" if verdict else ""
            print(f"  {bits}-bit " + "  ".join(f"{m} {s['mean']:.2f}±{s['std']:.2f}" for m, s in row.items()) + said)
    return 0


if __name__ == "__main__":
    sys.exit(main())
