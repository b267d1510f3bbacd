"""Latency, throughput and energy per image (thesis chapter 7, eq. 7.4).

* latency: time for one image, i.e. one inference at batch size 1 (median of
  repeats);
* throughput: images per second at a batch size, ``batch / time(batch)``;
* energy per image: ``E = min(P * latency, P / throughput)`` (thesis eq. 7.4)
  with ``P`` the platform power in watts, given by the user.

Backends are timed *interleaved*: at each batch size every backend runs one
sample in turn, repeatedly, so that load from other processes on the machine
hits all of them alike and the ratios between backends are fair.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

from tfqkd.errors import TfqkdError

__all__ = [
    "Backend",
    "DEFAULT_BATCH_SIZES",
    "energy_per_image",
    "keras_backend",
    "summarize",
    "sweep",
    "tflite_backend",
]

#: Powers of two from 1 to 1024 (thesis chapter 7's sweep).
DEFAULT_BATCH_SIZES = tuple(2**i for i in range(11))


def energy_per_image(power_watts, latency_s, throughput):
    """Energy per image in joules, thesis eq. 7.4: ``min(P * latency, P / throughput)``.

    Args:
        power_watts: platform power ``P`` (W), > 0.
        latency_s: time for one image (s), or None.
        throughput: images per second, or None.

    Returns:
        Joules per image, or None when ``power_watts`` is None or neither
        latency nor throughput is known.

    Raises:
        TfqkdError: non-positive power, latency or throughput.
    """
    if power_watts is None:
        return None
    if power_watts <= 0:
        raise TfqkdError(f"power must be > 0 W, got {power_watts}")
    candidates = []
    if latency_s is not None:
        if latency_s <= 0:
            raise TfqkdError(f"latency must be > 0 s, got {latency_s}")
        candidates.append(power_watts * latency_s)
    if throughput is not None:
        if throughput <= 0:
            raise TfqkdError(f"throughput must be > 0 img/s, got {throughput}")
        candidates.append(power_watts / throughput)
    return min(candidates) if candidates else None


@dataclass
class Backend:
    """One thing to time.

    Attributes:
        name: short key (``keras_fp32``, ``tflite_int8`` ...).
        label: human-readable platform label for tables and plots.
        make: ``make(batch_size) -> run`` builds a zero-argument callable
            running one batch of that size.
        info: free-form facts (threads, runtime, converter, file size).
    """

    name: str
    label: str
    make: Callable[[int], Callable[[], None]]
    info: dict = field(default_factory=dict)


def tflite_backend(name, label, model_content, *, num_threads=None, xnnpack=True, info=None):
    """A backend invoking a TFLite flatbuffer through the edge runtime."""
    from tfqkd.bench.runtime import make_interpreter, runtime_name

    def make(batch_size):
        interpreter, _, _ = make_interpreter(
            model_content, batch_size=batch_size, num_threads=num_threads, xnnpack=xnnpack
        )
        return interpreter.invoke

    facts = {"runtime": runtime_name(), "threads": num_threads, "xnnpack": xnnpack, "bytes": len(model_content)}
    facts.update(info or {})
    return Backend(name, label, make, facts)


def keras_backend(name, label, model, *, info=None):
    """A backend running the Keras model in TensorFlow (one traced function per batch size)."""
    from tfqkd.compat import tf

    shape = [int(d) for d in model.input_shape[1:]]

    def make(batch_size):
        x = tf.zeros([int(batch_size)] + shape, tf.float32)
        fn = tf.function(lambda t: model(t, training=False))
        fn(x)  # trace

        def run():
            fn(x).numpy()

        return run

    return Backend(name, label, make, dict(info or {}, runtime=f"tensorflow {tf.__version__}"))


@dataclass
class Measurement:
    """Timing of one backend at one batch size (seconds per batch)."""

    backend: str
    batch_size: int
    samples: List[float]
    cpu_samples: List[float] = field(default_factory=list)

    @property
    def median_s(self):
        return float(np.median(self.samples))

    @property
    def min_s(self):
        return float(np.min(self.samples))

    @property
    def throughput(self):
        return self.batch_size / self.median_s

    @property
    def cpu_median_s(self):
        """Median process CPU time per batch (all threads summed): robust to other processes' load."""
        return float(np.median(self.cpu_samples)) if self.cpu_samples else None

    def as_dict(self, power_watts=None):
        return {
            "backend": self.backend,
            "batch_size": self.batch_size,
            "batch_ms_median": 1e3 * self.median_s,
            "batch_ms_min": 1e3 * self.min_s,
            "batch_cpu_ms_median": None if self.cpu_median_s is None else 1e3 * self.cpu_median_s,
            "ms_per_image": 1e3 * self.median_s / self.batch_size,
            "throughput": self.throughput,
            "energy_mj_per_image": (
                None if power_watts is None else 1e3 * energy_per_image(power_watts, None, self.throughput)
            ),
            "repeats": len(self.samples),
        }


def sweep(
    backends,
    batch_sizes=DEFAULT_BATCH_SIZES,
    *,
    repeats=5,
    min_sample_s=0.05,
    max_batch_s=2.0,
    time_budget_s=None,
    log: Optional[Callable[[str], None]] = print,
):
    """Times every backend at every batch size, interleaved.

    At each batch size each still-active backend is built, warmed up once,
    then sampled ``repeats`` times in round-robin order; a sample of a fast
    batch runs it several times in a row (at least ``min_sample_s``) and
    records the mean (wall clock, and process CPU time: with one thread the
    latter is the compute time even when other processes share the cores).
    A backend whose batch takes longer than ``max_batch_s``
    drops out of larger batch sizes, and when ``time_budget_s`` is spent no
    larger batch size is started.

    Args:
        backends: list of :class:`Backend`.
        batch_sizes: increasing batch sizes.
        repeats: samples per backend and batch size (>= 1).
        min_sample_s: minimum duration of one sample.
        max_batch_s: stop a backend's sweep after a batch this slow.
        time_budget_s: overall wall-clock budget, or None.
        log: progress printer (None for silence).

    Returns:
        list of :class:`Measurement`.
    """
    if repeats < 1:
        raise TfqkdError(f"repeats must be >= 1, got {repeats}")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if not batch_sizes or batch_sizes[0] < 1:
        raise TfqkdError("batch sizes must be positive integers")
    start = time.perf_counter()
    active = list(backends)
    results = []
    for batch in batch_sizes:
        if not active:
            break
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            if log:
                log(f"time budget of {time_budget_s:.0f} s spent; stopping before batch {batch}")
            break
        runs, inner, samples, cpu, reps = {}, {}, {}, {}, {}
        for backend in active:
            run = backend.make(batch)
            t0 = time.perf_counter()
            run()
            warm = time.perf_counter() - t0
            runs[backend.name] = run
            inner[backend.name] = max(1, math.ceil(min_sample_s / max(warm, 1e-6)))
            # Slow batches: fewer samples, the median of three is still robust.
            reps[backend.name] = repeats if warm < 0.5 else min(repeats, 3)
            samples[backend.name] = []
            cpu[backend.name] = []
        for rep in range(max(reps.values())):
            for backend in active:
                if rep >= reps[backend.name]:
                    continue
                run, n = runs[backend.name], inner[backend.name]
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(n):
                    run()
                samples[backend.name].append((time.perf_counter() - t0) / n)
                cpu[backend.name].append((time.process_time() - c0) / n)
        still = []
        for backend in active:
            m = Measurement(backend.name, batch, samples[backend.name], cpu[backend.name])
            results.append(m)
            if log:
                log(f"  batch {batch:5d}  {backend.name:<14} {1e3 * m.median_s:10.2f} ms  {m.throughput:9.1f} img/s")
            if m.median_s <= max_batch_s:
                still.append(backend)
            elif log:
                log(f"  {backend.name}: batch {batch} took {m.median_s:.1f} s > {max_batch_s:.1f} s; "
                    "stopping its sweep")
        runs.clear()
        active = still
    return results


def summarize(measurements, backends, power_watts=None, reference="keras_fp32", reference2="tflite_fp32"):
    """One row per backend in the form of thesis table 7.1.

    Latency is the median time of one image at batch size 1; throughput the
    best images/s over the sweep (and the batch where it occurred); energy per
    image is eq. 7.4; speedups are throughput ratios to ``reference`` (and
    ``reference2``) from the same run.

    Returns:
        list of dicts with keys ``backend, platform, throughput, best_batch,
        latency_ms, energy_mj, speedup, speedup_vs_tflite_fp32``.
    """
    rows = []
    by_backend = {}
    for m in measurements:
        by_backend.setdefault(m.backend, []).append(m)
    for backend in backends:
        ms = by_backend.get(backend.name)
        if not ms:
            continue
        best = max(ms, key=lambda m: m.throughput)
        one = [m for m in ms if m.batch_size == 1]
        latency = one[0].median_s if one else None
        latency_cpu = one[0].cpu_median_s if one else None
        best_cpu = min((m for m in ms if m.cpu_median_s), key=lambda m: m.cpu_median_s / m.batch_size, default=None)
        energy = energy_per_image(power_watts, latency, best.throughput)
        rows.append(
            {
                "backend": backend.name,
                "platform": backend.label,
                "throughput": best.throughput,
                "best_batch": best.batch_size,
                "latency_ms": None if latency is None else 1e3 * latency,
                "latency_cpu_ms": None if latency_cpu is None else 1e3 * latency_cpu,
                "throughput_per_cpu_s": None if best_cpu is None else best_cpu.batch_size / best_cpu.cpu_median_s,
                "energy_mj": None if energy is None else 1e3 * energy,
                "power_watts": power_watts,
            }
        )
    for key, ref in (("speedup", reference), ("speedup_vs_tflite_fp32", reference2)):
        base = next((r["throughput"] for r in rows if r["backend"] == ref), None)
        for r in rows:
            r[key] = None if base is None else r["throughput"] / base
    return rows
