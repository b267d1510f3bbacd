#!/usr/bin/env python3
"""VART runner for the compiled DPU model: thesis Algorithm 5 ("DPU Runner").

Copied into the deploy bundle as ``dpu_runner.py`` and run on the board (PetaLinux image with
VART, thesis 6.4)::

    python3 dpu_runner.py model.xmodel eval_data.npz --threads 4

Algorithm 5: load the images and labels; deserialize the XIR graph and take its DPU subgraph;
create one VART runner per thread; split the images into one contiguous subset per thread;
start all threads, join them, and report test accuracy, total time, per-image latency and
throughput (images / second, thesis eq. 7.1). Images are float32 in [0, 1] (as trained) and are
quantized here with the input tensor's ``fix_point`` (round half up), as the DPU expects.

Only the standard library and NumPy are needed besides VART/XIR, which are imported inside
:func:`main`, so the threading and data split can be tested with a stand-in runner.
"""

import argparse
import threading
import time

import numpy as np

__all__ = ["main", "quantize_images", "run_threads", "run_worker", "split_ranges"]


def split_ranges(total, threads):
    """Contiguous ``(start, stop)`` ranges splitting ``total`` images over ``threads`` threads.

    The first ``total % threads`` threads get one extra image, so sizes differ by at most one
    and every image is in exactly one range (Algorithm 5, line 12: ``Subset(Images, i)``).
    """
    if threads < 1:
        raise ValueError("threads must be >= 1")
    base, extra = divmod(int(total), int(threads))
    ranges, start = [], 0
    for i in range(threads):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def quantize_images(images, fix_point):
    """int8 DPU input codes: ``clip(floor(x * 2**fix_point + 0.5), -128, 127)``."""
    scaled = np.asarray(images, np.float32).astype(np.float64) * (2.0**fix_point)
    return np.clip(np.floor(scaled + 0.5), -128, 127).astype(np.int8)


def run_worker(runner, images, results, slot, batch_size=None):
    """One thread's work: run ``images`` through ``runner`` and store top-1 classes in ``results[slot]``.

    Args:
      runner: a ``vart.Runner`` (or anything with ``get_input_tensors``, ``get_output_tensors``,
        ``execute_async`` and ``wait``).
      images: int8 array ``(n, H, W, C)``.
      results: shared list; this thread writes only ``results[slot]``.
      slot: this thread's index.
      batch_size: images per job (default: the runner's input batch dimension).
    """
    input_tensor = runner.get_input_tensors()[0]
    output_tensor = runner.get_output_tensors()[0]
    in_dims = tuple(input_tensor.dims)
    out_dims = tuple(output_tensor.dims)
    batch = int(batch_size or in_dims[0])
    predictions = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        inputs = np.zeros((batch,) + in_dims[1:], dtype=np.int8)
        inputs[: len(chunk)] = chunk.reshape((len(chunk),) + in_dims[1:])
        outputs = np.zeros((batch,) + out_dims[1:], dtype=np.int8)
        job = runner.execute_async([inputs], [outputs])
        runner.wait(job)
        predictions.append(np.argmax(outputs.reshape(batch, -1)[: len(chunk)], axis=1))
    results[slot] = np.concatenate(predictions) if predictions else np.zeros((0,), np.int64)


def run_threads(runners, images, labels):
    """Algorithm 5, lines 11-28: threads over contiguous subsets, timing and metrics.

    Args:
      runners: one runner per thread.
      images: int8 input codes ``(N, H, W, C)``.
      labels: ``(N,)`` integer labels.

    Returns:
      dict with ``accuracy``, ``time_s``, ``latency_ms`` (time per image), ``throughput_fps``,
      ``threads``, ``images`` and ``predictions`` (in image order).
    """
    total = len(images)
    ranges = split_ranges(total, len(runners))
    results = [None] * len(runners)
    threads = [
        threading.Thread(target=run_worker, args=(runner, images[a:b], results, i))
        for i, (runner, (a, b)) in enumerate(zip(runners, ranges))
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if any(r is None for r in results):
        raise RuntimeError("a runner thread failed; see the error above")
    predictions = np.concatenate(results) if results else np.zeros((0,), np.int64)
    correct = int(np.sum(predictions == np.asarray(labels).reshape(-1)))
    return {
        "accuracy": correct / total if total else 0.0,
        "time_s": elapsed,
        "latency_ms": 1000.0 * elapsed / total if total else 0.0,
        "throughput_fps": total / elapsed if elapsed > 0 else float("inf"),
        "threads": len(runners),
        "images": total,
        "predictions": predictions,
    }


def _dpu_subgraph(graph):
    root = graph.get_root_subgraph()
    children = root.toposort_child_subgraph() if not root.is_leaf else []
    dpu = [s for s in children if s.has_attr("device") and s.get_attr("device").upper() == "DPU"]
    if len(dpu) != 1:
        raise RuntimeError(f"expected one DPU subgraph, found {len(dpu)}")
    return dpu[0]


def main(argv=None):
    """Command line entry point on the board."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xmodel", help="compiled model (vai_c_tensorflow2 output)")
    parser.add_argument("data", help="npz with x (float32 N,H,W,C in [0,1]) and y (labels)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    args = parser.parse_args(argv)

    import vart  # noqa: PLC0415  (only on the board)
    import xir  # noqa: PLC0415

    data = np.load(args.data)
    images, labels = data["x"], data["y"]
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    subgraph = _dpu_subgraph(xir.Graph.deserialize(args.xmodel))
    runners = [vart.Runner.create_runner(subgraph, "run") for _ in range(args.threads)]
    fix_point = runners[0].get_input_tensors()[0].get_attr("fix_point")
    codes = quantize_images(images, fix_point)
    report = run_threads(runners, codes, labels)
    print(f"images: {report['images']}  threads: {report['threads']}")
    print(f"top-1 accuracy: {100.0 * report['accuracy']:.2f} %")
    print(f"time: {report['time_s']:.3f} s  latency: {report['latency_ms']:.3f} ms/image  throughput: {report['throughput_fps']:.1f} fps")
    del runners
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
