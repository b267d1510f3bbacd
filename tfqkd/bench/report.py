"""Tables, JSON, CSV and PNG plots of a benchmark sweep (thesis table 7.1 form)."""

import json
from pathlib import Path

from tfqkd import atomic
from tfqkd.plotting import pyplot, save_figure

__all__ = [
    "THESIS_TABLE_7_1",
    "THESIS_THROUGHPUT",
    "THESIS_DPU_LATENCY_MS",
    "format_table",
    "plot_sweep",
    "write_json",
]

#: Thesis table 7.1, DenseNet-21 on CIFAR-10: platform, img/s, latency ms, power W.
#: Only the DPU's power (22.8 W on the ZCU102) is given; energy is shown where P is known.
THESIS_TABLE_7_1 = (
    {"platform": "CPU i5-8600K FP32 (thesis)", "throughput": 665.0, "latency_ms": 6.59, "power_watts": None},
    {"platform": "QCPU i5-8600K int8 (thesis)", "throughput": 1717.0, "latency_ms": 7.92, "power_watts": None},
    {"platform": "GPU RTX-2060S (thesis)", "throughput": 5996.0, "latency_ms": 6.7, "power_watts": None},
    {"platform": "DPU ZCU102 B4096x3 @300MHz (thesis)", "throughput": 3674.0, "latency_ms": 0.69, "power_watts": 22.8},
)

#: Thesis throughputs (img/s) for the three DenseNets: CPU FP, QCPU int8, GPU, DPU.
THESIS_THROUGHPUT = {
    "densenet21": {"cpu": 665.0, "qcpu": 1717.0, "gpu": 5996.0, "dpu": 3674.0},
    "densenet37": {"cpu": 361.0, "qcpu": 1021.0, "gpu": 5890.0, "dpu": 2251.0},
    "densenet63": {"cpu": 216.0, "qcpu": 458.0, "gpu": 4500.0, "dpu": 1318.0},
}

#: Measured DPU latency (ms) in the thesis, ZCU102 with three B4096 cores at 300 MHz.
THESIS_DPU_LATENCY_MS = {"densenet21": 0.69, "densenet37": 1.11, "densenet63": 1.78}


def _thesis_rows():
    rows = []
    base = THESIS_TABLE_7_1[0]["throughput"]
    for r in THESIS_TABLE_7_1:
        energy = None
        if r["power_watts"]:
            energy = 1e3 * min(r["power_watts"] * r["latency_ms"] / 1e3, r["power_watts"] / r["throughput"])
        rows.append(dict(r, energy_mj=energy, speedup=r["throughput"] / base, best_batch=None))
    return rows


def _fmt(value, spec):
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width) if width else 1)
    return format(value, spec)


def format_table(rows, title="", include_thesis=True):
    """Thesis-table-7.1 text: platform, throughput, latency, energy/image, speedup vs FP32.

    Wall-clock columns first (what a user of the platform sees), then the
    CPU-time columns, which stay comparable on a machine shared with other work.

    Args:
        rows: output of :func:`tfqkd.bench.latency.summarize`.
        title: heading line.
        include_thesis: append the thesis's DenseNet-21 figures for reference.

    Returns:
        the table as a string.
    """
    header = (
        f"{'platform':<40} {'img/s':>9} {'@batch':>6} {'latency ms':>10} {'energy mJ/img':>13} "
        f"{'speedup':>8} {'vs TFLite FP32':>14} {'CPU ms b1':>9} {'img/CPU-s':>9}"
    )
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['platform']:<40} {_fmt(r['throughput'], '9.1f')} {_fmt(r.get('best_batch'), '6d')} "
            f"{_fmt(r['latency_ms'], '10.3f')} {_fmt(r['energy_mj'], '13.3f')} {_times(r.get('speedup'), 8)} "
            f"{_times(r.get('speedup_vs_tflite_fp32'), 14)} {_fmt(r.get('latency_cpu_ms'), '9.3f')} "
            f"{_fmt(r.get('throughput_per_cpu_s'), '9.1f')}"
        )
    lines.append(
        "CPU ms b1 / img/CPU-s: process CPU time of one image at batch 1 and images per CPU-second at the best "
        "batch (all threads summed; unaffected by other processes' load)"
    )
    if include_thesis:
        lines.append("reference: thesis table 7.1, DenseNet-21 on CIFAR-10 (speedup vs its CPU FP32)")
        for r in _thesis_rows():
            lines.append(
                f"{r['platform']:<40} {_fmt(r['throughput'], '9.1f')} {'':>6} {_fmt(r['latency_ms'], '10.3f')} "
                f"{_fmt(r['energy_mj'], '13.3f')} {_fmt(r['speedup'], '7.2f')}x {'':>14}"
            )
    return "\n".join(lines)


def _times(value, width):
    return ("-" if value is None else f"{value:.2f}x").rjust(width)


def write_json(path, payload):
    """Writes ``payload`` as indented JSON atomically."""
    atomic.write_text(path, json.dumps(payload, indent=2, default=str))


def plot_sweep(sweep_rows, labels, out_dir, title=""):
    """Writes latency.png, throughput.png and energy.png against batch size.

    Args:
        sweep_rows: dicts of :meth:`Measurement.as_dict`.
        labels: ``{backend: label}``.
        out_dir: directory for the PNGs.
        title: model name for the titles.

    Returns:
        list of written paths.
    """
    plt = pyplot()

    out_dir = Path(out_dir)
    specs = [
        ("latency.png", "batch_ms_median", "time per batch (ms)", "latency"),
        ("throughput.png", "throughput", "throughput (images/s)", "throughput"),
        ("energy.png", "energy_mj_per_image", "energy per image (mJ), P/throughput", "energy per image"),
    ]
    written = []
    for filename, key, ylabel, what in specs:
        if not any(r.get(key) is not None for r in sweep_rows):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for backend, label in labels.items():
            pts = [(r["batch_size"], r[key]) for r in sweep_rows if r["backend"] == backend and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} {what}".strip())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / filename, dpi=110))
    return written
