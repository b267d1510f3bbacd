"""Quantized training-step cost against float and against tfmot QAT, interleaved in one run (issue 16).

    python benchmarks/bench_train_step.py                         # all models, about 15 min on 2 cores
    python benchmarks/bench_train_step.py --models resnet8 --rounds 3 --steps 10

For each model (random 32x32x3 inputs, batch 64, SGD with momentum 0.9, sparse cross-entropy):

* ``float``: the float model's ``fit`` step;
* ``tfmot_qat``: ``tfmot.quantization.keras.quantize_model`` of it (the field's standard QAT),
  where tfmot can quantize the model (it cannot quantize a BatchNormalization that follows no conv);
* ``tfqkd_w8a8``, ``tfqkd_w4a4``, ``tfqkd_thesis8``: ``tfqkd.quantize(model, policy)``;
  ``tfqkd_dpu`` for the DPU variants; ``tfqkd_w8a8_tf_ops`` and ``tfqkd_w4a4_tf_ops``: the
  learned-step policies on TensorFlow's ops instead of the fused kernels (``tfqkd.quant.kernels``);
* for densenet21 also the QKD phases of a w8a8 student: ``qkd_ss``, ``qkd_cs`` (a float teacher of
  the same architecture co-trained) and ``qkd_ts_cache`` (teacher logits read from a cache).

Every round runs ``--steps`` steps of each variant in turn, so load from other processes hits all
alike; the first batch of each ``fit`` call and a warm-up round are not timed. Reported per variant:
the median step time, images per second, and the ratio to the float step of the same round
(``ratio_to_float``); writes ``benchmarks/results/train_step.json`` and ``train_step.png``.
"""

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

from tfqkd.compat import keras, tf
from tfqkd.atomic import write_text
from tfqkd.bench.step_timer import StepTimer
from tfqkd.distill import QKD
from tfqkd.models import create_model
from tfqkd.plotting import pyplot, save_figure
from tfqkd.quant import quantize
from tfqkd.quant.kernels import fake_quant_ops, tensorflow_ops_only

MODELS = ("densenet21_dpu", "resnet8", "densenet21", "kl_mlp_student")
BATCH = 64
INPUT = {"kl_mlp_student": (28, 28, 1)}
DEFAULT_INPUT = (32, 32, 3)


def _optimizer():
    return keras.optimizers.SGD(0.01, momentum=0.9)


def _plain(model):
    model.compile(_optimizer(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _tfmot(model):
    import tensorflow_model_optimization as tfmot

    return _plain(tfmot.quantization.keras.quantize_model(model))


def variants(name, x, with_phases):
    """``{variant: (compiled model, dataset)}``, and ``{variant: reason}`` for those that cannot be built."""
    float_model = create_model(name, num_classes=10, input_shape=x.shape[1:])
    y = np.random.default_rng(0).integers(0, 10, len(x))
    plain = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(BATCH)
    indexed = tf.data.Dataset.from_tensor_slices((x, y, np.arange(len(x)) % len(x))).repeat().batch(BATCH)
    built, skipped = {}, {}
    makers = {
        "float": lambda: _plain(keras.models.clone_model(float_model)),
        "tfmot_qat": lambda: _tfmot(keras.models.clone_model(float_model)),
        "tfqkd_w8a8": lambda: _plain(quantize(float_model, "w8a8", x[:256])),
        "tfqkd_w4a4": lambda: _plain(quantize(float_model, "w4a4", x[:256])),
        "tfqkd_thesis8": lambda: _plain(quantize(float_model, "thesis8", x[:256])),
    }
    if name.endswith("_dpu"):
        makers["tfqkd_dpu"] = lambda: _plain(quantize(float_model, "dpu", x[:256]))
    for variant, make in makers.items():
        try:
            built[variant] = (make(), plain)
        except Exception as err:  # a tool that cannot take this model is a result, not a crash
            skipped[variant] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    for policy in ("w8a8", "w4a4"):
        # The same policy on TensorFlow's ops (what tfqkd ran before its fused kernels): the
        # choice is made when the step is traced, so the first fit runs inside the switch.
        with tensorflow_ops_only():
            model = _plain(quantize(float_model, policy, x[:256]))
            model.fit(plain, epochs=1, steps_per_epoch=1, verbose=0)
        built[f"tfqkd_{policy}_tf_ops"] = (model, plain)
    if with_phases:
        student = quantize(float_model, "w8a8", x[:256])
        teacher = create_model(name, num_classes=10, input_shape=x.shape[1:])
        cache = np.random.default_rng(1).standard_normal((len(x), 10)).astype("float32")
        for phase in ("ss", "cs", "ts"):
            model = QKD(student, teacher if phase == "cs" else None, phase=phase,
                        teacher_logits=cache if phase == "ts" else None)  # fmt: skip
            model.compile(_optimizer(), teacher_optimizer=_optimizer() if phase == "cs" else None)
            built[f"qkd_{phase}" + ("_cache" if phase == "ts" else "")] = (model, indexed)
    return built, skipped


def measure(built, rounds, steps, log):
    """Median step seconds per variant and per round (interleaved rounds; the first is warm-up)."""
    per_round = {variant: [] for variant in built}
    for r in range(rounds + 1):
        for variant, (model, data) in built.items():
            timer = StepTimer()
            model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer])
            if r > 0:
                per_round[variant].append(float(np.median(timer.times)))
        if r > 0:
            log(f"  round {r}: " + ", ".join(f"{v} {1e3 * t[-1]:.0f} ms" for v, t in per_round.items()))
    return per_round


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    results = {}
    for name in args.models:
        shape = INPUT.get(name, DEFAULT_INPUT)
        x = np.random.default_rng(2).random((BATCH * 8, *shape)).astype("float32")
        keras.utils.set_random_seed(0)
        built, skipped = variants(name, x, with_phases=(name == "densenet21"))
        log(f"{name}: {', '.join(built)}" + (f"; cannot build {', '.join(skipped)}" if skipped else ""))
        per_round = measure(built, args.rounds, args.steps, log)
        rows = {}
        for variant, times in per_round.items():
            ratios = [t / f for t, f in zip(times, per_round["float"])]  # same round: same machine load
            median = float(np.median(times))
            rows[variant] = {
                "step_ms": round(1e3 * median, 2),
                "images_per_s": round(BATCH / median, 1),
                "ratio_to_float": round(float(np.median(ratios)), 3),
            }
        results[name] = {"variants": rows, "cannot_build": skipped}
        log("  " + ", ".join(f"{v} {r['images_per_s']:.0f} img/s (x{r['ratio_to_float']:.2f})" for v, r in rows.items()))
    payload = {
        "what": __doc__.split("\n\n")[0],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "batch_size": BATCH,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "fused_kernels": fake_quant_ops() is not None,
        "results": results,
    }
    import json

    write_text(args.out / "train_step.json", json.dumps(payload, indent=1))
    _plot(results, args.out / "train_step.png")
    return 0


def _plot(results, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        names = list(result["variants"])
        ratios = [result["variants"][v]["ratio_to_float"] for v in names]
        bars = ax.bar(range(len(names)), ratios, color=["#999999" if v == "float" else "#4c72b0" for v in names])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        if "tfmot_qat" in result["variants"]:
            ax.axhline(result["variants"]["tfmot_qat"]["ratio_to_float"], color="#c44e52", ls="--", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("step time / float step (same round)")
        ax.set_title(name)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
