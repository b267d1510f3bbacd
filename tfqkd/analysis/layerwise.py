"""Layerwise analysis of weights and activations (seed 003: Yun 2022, "An Analysis Framework
for the Quantization-Aware Design of Efficient, Low-Power CNNs").

For every Conv2D / DepthwiseConv2D / Dense layer (float or QKeras-quantized) this module
reports, for its weights and for the activations feeding it (taken from one or a few
batches): min, max, mean, std, excess kurtosis, the share of values clipped by the layer's
quantization range, and the SQNR at 8, 4 and 2 bits. The same statistics go to a CSV file,
PNG histogram grids, and TensorBoard during training (:class:`LayerwiseTensorBoard`).

Definitions:

* **SQNR** at ``b`` bits: uniform symmetric quantization of the tensor at its max-abs range,
  ``step = max|x| / (2**(b-1) - 1)``, ``q(x) = step * round(x / step)``, and
  ``SQNR = 10 * log10(sum x**2 / sum (x - q(x))**2)`` dB (``inf`` if the error is zero).
* **Kurtosis**: Pearson's excess kurtosis ``E[(x-mu)**4] / sigma**4 - 3`` (0 for a Gaussian,
  > 0 for heavy tails, which quantize badly at max-abs range).
* **Share clipped**: for a quantized layer, the share of values outside the quantizer's
  representable range ``[qmin * step, qmax * step]`` (learned-step quantizers; the running
  min/max of affine ones; ``+-qmax * 2**-pos`` for the DPU power-of-two ones). For a float layer
  (no bits) the range is ``mean +- 3 * std``, the 3-sigma range of a clipping quantizer, so the
  share measures the tail mass beyond a Gaussian's (0.27 %).
"""

import math
from pathlib import Path

import numpy as np

from tfqkd.compat import keras, tf
from tfqkd.data.examples import take_inputs
from tfqkd.errors import TfqkdError
from tfqkd.plotting import pyplot, save_figure

__all__ = [
    "FLOAT_CLIP_SIGMAS",
    "SQNR_BITS",
    "LayerwiseTensorBoard",
    "analyze",
    "collect_tensors",
    "excess_kurtosis",
    "plot_histograms",
    "quantize_symmetric",
    "sqnr_db",
    "tensor_stats",
]

#: Bit widths at which every tensor's SQNR is reported.
SQNR_BITS = (8, 4, 2)
#: Float layers: values beyond mean +- this many standard deviations count as clipped.
FLOAT_CLIP_SIGMAS = 3.0
_ANALYZED_TYPES = ("Conv2D", "DepthwiseConv2D", "Dense")
_HIST_SAMPLE = 50_000
CSV_COLUMNS = (
    "layer", "tensor", "layer_type", "shape", "numel", "bits", "clip_lo", "clip_hi",
    "min", "max", "mean", "std", "kurtosis", "clipped_share",
) + tuple(f"sqnr{b}_db" for b in SQNR_BITS)  # fmt: skip


def quantize_symmetric(x, bits):
    """Uniform symmetric quantization of ``x`` at its max-abs range.

    Args:
      x: array.
      bits: bit width >= 2 (codes ``-(2**(b-1)-1) .. 2**(b-1)-1``).

    Returns:
      the de-quantized array ``step * round(x / step)`` (float64).
    """
    x = np.asarray(x, dtype=np.float64)
    if bits < 2:
        raise TfqkdError(f"symmetric quantization needs at least 2 bits, got {bits}")
    extent = float(np.max(np.abs(x))) if x.size else 0.0
    if extent == 0.0:
        return np.zeros_like(x)
    step = extent / (2 ** (bits - 1) - 1)
    return np.round(x / step) * step


def sqnr_db(x, bits):
    """Signal-to-quantization-noise ratio of ``x`` at ``bits`` (symmetric, max-abs range).

    Args:
      x: array.
      bits: bit width >= 2.

    Returns:
      ``10 * log10(sum x**2 / sum (x - q(x))**2)`` in dB; ``inf`` when the quantization is
      exact, ``nan`` for an all-zero tensor.
    """
    x = np.asarray(x, dtype=np.float64)
    signal = float(np.sum(x * x))
    noise = float(np.sum((x - quantize_symmetric(x, bits)) ** 2))
    if signal == 0.0:
        return float("nan")
    if noise == 0.0:
        return float("inf")
    return 10.0 * math.log10(signal / noise)


def excess_kurtosis(x):
    """Pearson's excess kurtosis ``m4 / m2**2 - 3`` (population moments); nan if constant."""
    x = np.asarray(x, dtype=np.float64).ravel()
    centered = x - x.mean()
    m2 = float(np.mean(centered**2))
    if m2 == 0.0:
        return float("nan")
    return float(np.mean(centered**4) / (m2 * m2) - 3.0)


def tensor_stats(x, clip_range=None):
    """Statistics of one tensor.

    Args:
      x: array of values.
      clip_range: ``(lo, hi)`` representable range of the tensor's quantizer, or None for a
        float tensor (then ``mean +- FLOAT_CLIP_SIGMAS * std``).

    Returns:
      dict with min, max, mean, std, kurtosis, clip_lo, clip_hi, clipped_share and
      ``sqnr{b}_db`` for b in :data:`SQNR_BITS`.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise TfqkdError("cannot compute statistics of an empty tensor")
    mean, std = float(x.mean()), float(x.std())
    if clip_range is None:
        lo, hi = mean - FLOAT_CLIP_SIGMAS * std, mean + FLOAT_CLIP_SIGMAS * std
    else:
        lo, hi = float(clip_range[0]), float(clip_range[1])
    tol = 1e-6 * max(abs(lo), abs(hi))
    stats = {
        "min": float(x.min()),
        "max": float(x.max()),
        "mean": mean,
        "std": std,
        "kurtosis": excess_kurtosis(x),
        "clip_lo": lo,
        "clip_hi": hi,
        # A float32 step times qmax can land an ulp inside the extreme value it was set from.
        "clipped_share": float(np.mean((x < lo - tol) | (x > hi + tol))),
    }
    for bits in SQNR_BITS:
        stats[f"sqnr{bits}_db"] = sqnr_db(x, bits)
    return stats


def _quantizer_range(quantizer):
    """Representable ``(lo, hi)`` of a tfqkd/QKeras quantizer, or None if unknown."""
    from tfqkd.quant.quantizers import AffineQuantizer, LearnedStepQuantizer, Pof2Quantizer

    if isinstance(quantizer, LearnedStepQuantizer):
        step = float(quantizer.step.numpy()[0])
        return quantizer.qmin * step, quantizer.qmax * step
    if isinstance(quantizer, AffineQuantizer):
        if quantizer.running:
            return float(quantizer.variable("min").numpy()[0]), float(quantizer.variable("max").numpy()[0])
        return None  # weights: the range follows the tensor, nothing is clipped
    if isinstance(quantizer, Pof2Quantizer):
        if quantizer.running:
            absmax = float(quantizer.variable("absmax").numpy()[0])
            pos = float(quantizer.position_for(absmax).numpy())
            return quantizer.qmin * 2.0**-pos, quantizer.qmax * 2.0**-pos
        return None
    bits = getattr(quantizer, "bits", None)
    if bits is not None and hasattr(quantizer, "integer"):  # plain QKeras quantized_bits/relu
        integer = int(getattr(quantizer, "integer", 0))
        signed = bool(getattr(quantizer, "keep_negative", True))
        top = 2.0**integer
        return (-top if signed else 0.0), top
    return None


def _layer_bits(quantizer):
    bits = getattr(quantizer, "bits", None)
    return int(bits) if bits is not None else None


def _unwrap(model):
    """The network to analyse: a QKD wrapper's student, else the model itself."""
    student = getattr(model, "student", None)
    return student if isinstance(student, keras.Model) else model


def _first_batch(data, max_examples):
    x = take_inputs(data, max_examples)
    if x is None:
        raise TfqkdError("layerwise analysis needs input data (an array, (x, y) or a tf.data.Dataset)")
    if len(x) == 0:
        raise TfqkdError("the dataset given for layerwise analysis is empty")
    return x


def collect_tensors(model, data, max_examples=32, batch_size=16):
    """Weights and input activations of every conv/dense layer.

    Args:
      model: float or quantized Keras model (or a QKD wrapper: its student is used).
      data: input array, ``(x, y)`` tuple or tf.data.Dataset; the first ``max_examples``
        inputs are used.
      max_examples: examples whose activations are recorded.
      batch_size: inference batch size.

    Returns:
      list of dicts ``{layer, tensor ("weight"|"activation"), layer_type, values, bits,
      clip_range}`` in layer order. Activations are the layer's input before its input
      quantizer (its ``*_qin`` QActivation) so clipping by that quantizer is visible.
    """
    from tfqkd.quant.layers import input_quantizer_of

    model = _unwrap(model)
    x = _first_batch(data, max_examples)
    targets = [
        layer for layer in model.layers
        if any(base.__name__ in _ANALYZED_TYPES for base in type(layer).__mro__)
    ]  # fmt: skip
    if not targets:
        raise TfqkdError(f"model '{model.name}' has no Conv2D/DepthwiseConv2D/Dense layer to analyse")
    probes, qins = [], []
    for layer in targets:
        qin = input_quantizer_of(layer)
        source = qin if qin is not None else layer
        if len(source._inbound_nodes) != 1:
            raise TfqkdError(f"layer '{source.name}' is shared; layerwise analysis needs one call per layer")
        probes.append(source.input)
        qins.append(qin)
    probe_model = keras.Model(model.inputs, probes)
    try:
        outputs = probe_model.predict(x, batch_size=batch_size, verbose=0)
    except (ValueError, TypeError) as err:
        raise TfqkdError(f"the analysis data does not fit model '{model.name}': {str(err).splitlines()[0]}") from None
    outputs = outputs if isinstance(outputs, list) else [outputs]
    rows = []
    for layer, qin, act in zip(targets, qins, outputs):
        layer_type = next(base.__name__ for base in type(layer).__mro__ if base.__name__ in _ANALYZED_TYPES)
        kernel_q = getattr(layer, "kernel_quantizer_internal", None) or getattr(
            layer, "depthwise_quantizer_internal", None
        )
        kernel = layer.depthwise_kernel if layer_type == "DepthwiseConv2D" else layer.kernel
        rows.append(
            {
                "layer": layer.name,
                "tensor": "weight",
                "layer_type": layer_type,
                "values": kernel.numpy(),
                "bits": _layer_bits(kernel_q),
                "clip_range": None if kernel_q is None else _quantizer_range(kernel_q),
                "quantized": kernel_q is not None,
            }
        )
        act_q = None if qin is None else qin.quantizer
        rows.append(
            {
                "layer": layer.name,
                "tensor": "activation",
                "layer_type": layer_type,
                "values": np.asarray(act),
                "bits": _layer_bits(act_q),
                "clip_range": None if act_q is None else _quantizer_range(act_q),
                "quantized": act_q is not None,
            }
        )
    return rows


def analyze(model, data, max_examples=32, keep_samples=False, seed=0):
    """Per-layer weight and activation statistics (seed 003).

    Args:
      model: float or quantized Keras model (or a QKD wrapper).
      data: input array, ``(x, y)`` or tf.data.Dataset (first ``max_examples`` inputs).
      max_examples: examples whose activations are analysed.
      keep_samples: add a ``sample`` entry (up to 50,000 values drawn at random, with
        replacement) to each row,
        for histograms.
      seed: seed of that subsample.

    Returns:
      list of dict rows, two per conv/dense layer (``tensor`` = "weight", "activation"), with
      the :data:`CSV_COLUMNS` fields (``bits`` is None for float tensors).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for entry in collect_tensors(model, data, max_examples=max_examples):
        values = entry["values"]
        clip_range = entry["clip_range"] if entry["quantized"] else None
        if entry["quantized"] and clip_range is None:
            # Quantizers whose range follows the tensor (affine/pof2 weights) clip nothing.
            clip_range = (float(values.min()), float(values.max()))
        row = {
            "layer": entry["layer"],
            "tensor": entry["tensor"],
            "layer_type": entry["layer_type"],
            "shape": "x".join(str(d) for d in values.shape[1:]) if entry["tensor"] == "activation"
            else "x".join(str(d) for d in values.shape),
            "numel": int(values.size),
            "bits": entry["bits"],
            **tensor_stats(values, clip_range),
        }
        if keep_samples:
            flat = values.ravel()
            if flat.size > _HIST_SAMPLE:
                flat = flat[rng.integers(0, flat.size, _HIST_SAMPLE)]
            row["sample"] = flat.astype(np.float32)
        rows.append(row)
    return rows


def plot_histograms(rows, path, tensor="weight", columns=6, bins=60):
    """A grid of histograms, one panel per layer, for one tensor kind.

    Args:
      rows: rows from :func:`analyze` with ``keep_samples=True``.
      path: PNG file to write.
      tensor: "weight" or "activation".
      columns: panels per row.
      bins: histogram bins.

    Returns:
      the path written.
    """
    plt = pyplot()

    selected = [r for r in rows if r["tensor"] == tensor]
    if not selected:
        raise TfqkdError(f"no {tensor} rows to plot")
    if any("sample" not in r for r in selected):
        raise TfqkdError("plot_histograms needs rows from analyze(..., keep_samples=True)")
    columns = min(columns, len(selected))
    nrows = math.ceil(len(selected) / columns)
    fig, axes = plt.subplots(nrows, columns, figsize=(2.6 * columns, 2.0 * nrows), squeeze=False)
    for ax in axes.ravel()[len(selected):]:
        ax.axis("off")
    for ax, row in zip(axes.ravel(), selected):
        ax.hist(row["sample"], bins=bins, color="tab:blue" if tensor == "weight" else "tab:orange", log=True)
        for edge in (row["clip_lo"], row["clip_hi"]):
            if np.isfinite(edge):
                ax.axvline(edge, color="red", linewidth=0.8, linestyle="--")
        bits = f"{row['bits']}b" if row["bits"] else "float"
        ax.set_title(
            f"{row['layer']} ({bits})\nk={row['kurtosis']:.1f} clip={100 * row['clipped_share']:.2f}% "
            f"SQNR4={row['sqnr4_db']:.1f}dB",
            fontsize=6,
        )
        ax.tick_params(labelsize=5)
    fig.suptitle(f"{tensor} distributions (red: clipping range)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


class LayerwiseTensorBoard(keras.callbacks.Callback):
    """Logs the layerwise statistics to TensorBoard during training (seed 003).

    Every ``every_n_epochs`` epochs it runs :func:`analyze` on ``data`` and writes, per layer
    and tensor kind, the scalars ``<layer>/<tensor>/<stat>`` (min, max, mean, std, kurtosis,
    clipped_share, SQNR at 8/4/2 bits) and the histogram ``<layer>/<tensor>``. Works with a
    plain Keras model and with :class:`tfqkd.QKD` (its student is analysed).

    Args:
      log_dir: TensorBoard log directory (a ``layerwise`` sub-directory is written).
      data: input array, ``(x, y)`` or tf.data.Dataset used for the activations.
      every_n_epochs: logging period in epochs (>= 1).
      max_examples: examples used for the activations.
    """

    STATS = ("min", "max", "mean", "std", "kurtosis", "clipped_share") + tuple(f"sqnr{b}_db" for b in SQNR_BITS)

    def __init__(self, log_dir, data, every_n_epochs=1, max_examples=32):
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise TfqkdError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        self.log_dir = Path(log_dir) / "layerwise"
        self.data = _first_batch(data, max_examples)
        self.every_n_epochs = every_n_epochs
        self.max_examples = max_examples
        self._writer = None

    def _log(self, step):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        rows = analyze(self.model, self.data, max_examples=self.max_examples, keep_samples=True)
        with self._writer.as_default(step=step):
            for row in rows:
                prefix = f"{row['layer']}/{row['tensor']}"
                for stat in self.STATS:
                    value = row[stat]
                    if np.isfinite(value):
                        tf.summary.scalar(f"{prefix}/{stat}", value)
                tf.summary.histogram(prefix, row["sample"])
        self._writer.flush()
        return rows

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs == 0:
            self._log(epoch + 1)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
