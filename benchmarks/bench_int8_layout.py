"""Before/after of the exporter's "speed" layout: what makes the int8 DenseNet fast on this CPU.

    python benchmarks/bench_int8_layout.py [--model densenet21] [--out benchmarks/results]

Finding (issue 6): under XNNPACK on x86 the int8 convolutions run 3-4x faster
than float32, but the int8 *elementwise* ops of a pre-activation DenseNet do
not: an int8 AVERAGE_POOL_2D runs on TFLite's built-in kernel (not delegated,
and it splits the delegated graph), and int8 MUL/ADD (an inference BN) are
slower than their float versions. The "speed" layout
(``tfqkd.export.integer_graph.LAYOUTS``) computes every unfolded BN as a 1x1
DEPTHWISE_CONV_2D with bias (ReLU fused) and every valid average pool as a
depthwise conv with weights 1/area.

1. Single-op timings, float32 vs int8: 3x3 and 1x1 convs, BN+ReLU as MUL/ADD
   and as a depthwise conv, ReLU, average pool (32x32x96 tensors).
2. The whole model, "compact" (before) vs "speed" (after) layout, float32 and
   int8 interleaved in the same sweep: batch-1 latency and best-batch
   throughput, with the int8/float32 ratios of each layout.

The model is built by name with random BN statistics (as after training: the
BN offsets are not zero, so the compact graph has its ADD ops). Medians of
``--repeats`` interleaved samples. Writes ``int8_layout.json``, ``.csv`` and
``.png`` into ``--out``.
"""

import argparse
import collections
import os
import sys
from pathlib import Path

import tfqkd  # noqa: F401  isort: skip  (selects Keras 2 before TensorFlow)
import numpy as np

from tfqkd.compat import keras
from tfqkd.export.tflite import convert
from tfqkd.bench.latency import sweep, tflite_backend
from tfqkd import atomic
from tfqkd.bench.report import write_json
from tfqkd.bench.runtime import make_interpreter
from tfqkd.models import create_model
from tfqkd.plotting import pyplot, save_figure

_LAYERS = keras.layers


def _single_op(kind, channels=96, size=32):
    inputs = keras.Input((size, size, channels))
    if kind == "conv3x3 128->32":
        inputs = keras.Input((size, size, 128))
        outputs = _LAYERS.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    elif kind == "conv1x1 96->48":
        outputs = _LAYERS.Conv2D(48, 1, use_bias=False)(inputs)
    elif kind == "BN+ReLU as MUL/ADD":
        bn = _LAYERS.BatchNormalization(beta_initializer="random_normal", moving_mean_initializer="random_normal")
        outputs = _LAYERS.ReLU()(bn(inputs))
    elif kind == "BN+ReLU as depthwise 1x1":
        dw = _LAYERS.DepthwiseConv2D(1, depthwise_initializer="random_uniform", bias_initializer="random_normal")
        outputs = _LAYERS.ReLU()(dw(inputs))
    elif kind == "average pool 2x2":
        outputs = _LAYERS.AveragePooling2D(2)(inputs)
    elif kind == "average pool as depthwise 2x2":
        outputs = _LAYERS.DepthwiseConv2D(2, strides=2, use_bias=False)(inputs)
    else:
        raise ValueError(kind)
    return keras.Model(inputs, outputs)


SINGLE_OPS = (
    "conv3x3 128->32", "conv1x1 96->48", "BN+ReLU as MUL/ADD", "BN+ReLU as depthwise 1x1",
    "average pool 2x2", "average pool as depthwise 2x2",
)


def op_counts(content):
    interpreter, _, _ = make_interpreter(content, batch_size=1, num_threads=1, xnnpack=False)
    return dict(collections.Counter(op["op_name"] for op in interpreter._get_ops_details()))


def _with_trained_like_bn(model, seed=1):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, _LAYERS.BatchNormalization):
            shapes = [w.shape for w in layer.get_weights()]
            layer.set_weights([rng.uniform(0.5, 1.5, shapes[0]), rng.normal(0, 0.2, shapes[1]),
                               rng.normal(0, 0.2, shapes[2]), rng.uniform(0.5, 2.0, shapes[3])])
    return model


def _median_ms(measurements, name, batch):
    return next(m.as_dict()["batch_ms_median"] for m in measurements if m.backend == name and m.batch_size == batch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="densenet21")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"load average at start: {os.getloadavg()}")

    # 1. single ops
    backends = []
    for kind in SINGLE_OPS:
        model = _single_op(kind)
        calib = np.random.default_rng(0).normal(0, 1, (32, *model.input_shape[1:])).astype(np.float32)
        for precision in ("float32", "int8"):
            content, _ = convert(model, calibration_data=calib, format=precision, layout="compact", logits="int8")
            backends.append(tflite_backend(f"{kind}|{precision}", kind, content, num_threads=args.threads))
    single = sweep(backends, [1, 16], repeats=args.repeats, min_sample_s=0.05, max_batch_s=1e9, log=None)
    op_rows = []
    for kind in SINGLE_OPS:
        for batch in (1, 16):
            f, i = _median_ms(single, f"{kind}|float32", batch), _median_ms(single, f"{kind}|int8", batch)
            op_rows.append({"op": kind, "batch_size": batch, "float32_ms": f, "int8_ms": i, "int8_over_float32": i / f})
            log(f"{kind:32s} batch {batch:2d}: float32 {f:.4f} ms, int8 {i:.4f} ms, int8/float32 {i / f:.2f}")

    # 2. whole model, both layouts
    model = _with_trained_like_bn(create_model(args.model, num_classes=10))
    calib = np.random.default_rng(0).uniform(0, 1, (64, *model.input_shape[1:])).astype(np.float32)
    graphs, backends = {}, []
    for layout in ("compact", "speed"):
        for precision in ("float32", "int8"):
            content, _ = convert(model, calibration_data=calib, format=precision, layout=layout, logits="int8")
            graphs[f"{layout}|{precision}"] = {"bytes": len(content), "ops": op_counts(content)}
            backends.append(tflite_backend(f"{layout}|{precision}", f"{layout} {precision}", content,
                                           num_threads=args.threads))
    measurements = sweep(backends, args.batch_sizes, repeats=args.repeats, min_sample_s=0.05, max_batch_s=1e9,
                         log=None)
    rows = [m.as_dict() for m in measurements]
    summary = {}
    for layout in ("compact", "speed"):
        best = {p: max(r["throughput"] for r in rows if r["backend"] == f"{layout}|{p}") for p in ("float32", "int8")}
        b1 = {p: _median_ms(measurements, f"{layout}|{p}", 1) for p in ("float32", "int8")}
        summary[layout] = {
            "batch1_ms": b1, "best_throughput": best,
            "int8_vs_float32_batch1_latency": b1["int8"] / b1["float32"],
            "int8_vs_float32_best_throughput": best["int8"] / best["float32"],
            "int8_vs_float32_bytes": graphs[f"{layout}|int8"]["bytes"] / graphs[f"{layout}|float32"]["bytes"],
        }
        log(f"{layout:8s}: batch-1 float32 {b1['float32']:.3f} ms, int8 {b1['int8']:.3f} ms "
            f"(x{b1['int8'] / b1['float32']:.3f}); best throughput float32 {best['float32']:.0f}, int8 {best['int8']:.0f} img/s "
            f"(x{best['int8'] / best['float32']:.2f}); int8 file {graphs[f'{layout}|int8']['bytes']:,} B")
    speedup = summary["compact"]["batch1_ms"]["int8"] / summary["speed"]["batch1_ms"]["int8"]
    log(f"int8 batch-1 latency, compact -> speed layout: x{1 / speedup:.3f} ({speedup:.2f}x faster)")

    write_json(out / "int8_layout.json", {
        "model": args.model, "threads": args.threads, "repeats": args.repeats, "single_ops": op_rows,
        "graphs": graphs, "sweep": rows, "summary": summary, "load_avg_end": os.getloadavg(),
    })
    atomic.write_csv(out / "int8_layout.csv", rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layout, style in (("compact", "--"), ("speed", "-")):
        for precision, color in (("float32", "tab:blue"), ("int8", "tab:red")):
            pts = sorted((r["batch_size"], r["throughput"]) for r in rows if r["backend"] == f"{layout}|{precision}")
            axes[0].plot(*zip(*pts), style, color=color, marker="o", label=f"{precision}, {layout}")
    axes[0].set(xscale="log", xlabel="batch size", ylabel="images / s", title=f"{args.model}, {args.threads} threads")
    axes[0].legend()
    names = list(SINGLE_OPS)
    ratios = [next(r["int8_over_float32"] for r in op_rows if r["op"] == n and r["batch_size"] == 1) for n in names]
    axes[1].barh(names, ratios, color=["tab:green" if r < 1 else "tab:red" for r in ratios])
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set(xscale="log", xlabel="int8 time / float32 time (batch 1)", title="single ops, 32x32 tensors")
    fig.tight_layout()
    save_figure(fig, out / "int8_layout.png")
    log(f"wrote {out / 'int8_layout.json'}, {out / 'int8_layout.csv'}, {out / 'int8_layout.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
