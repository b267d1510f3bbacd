"""An hls4ml project (FPGA through HLS) of a trained student, with its C++ emulation checked.

hls4ml compiles QKeras models to HLS. The student goes through its stock QKeras form
(:func:`tfqkd.export.qkeras.stock_qkeras_model`), so hls4ml reads the trained bits and steps of
every layer from the quantizers, not its defaults. Six things stand between hls4ml 1.3 and a
tfqkd model, all handled here:

* with TensorFlow 2.21 ``import keras`` is Keras 3, and hls4ml then takes its Keras-3 reader,
  which fails on the Keras-2 (tf-keras) models QKeras builds (``'Node' object has no attribute
  'arguments'``): the conversion runs with ``keras`` bound to tf-keras;
* hls4ml reserves the layer name ``input``, which every tfqkd model uses: it is renamed;
* hls4ml 1.3 calls ``numpy.product``, which NumPy 2 removed: it is provided during the conversion;
* hls4ml 1.3 types an activation quantizer without fractional bits (a trained step of 1 or more,
  common at 4 bits) as ``ap_(u)int<integer>``: truncating instead of rounding, wrapping instead of
  saturating, and a step of 1 where QKeras' is larger (resnet8 at 4 bits: 77% top-1 agreement):
  those layers get the ``ap_(u)fixed`` type QKeras computes, see :func:`_integer_step_activations`;
* hls4ml 1.3 drops a quantized depthwise conv's alpha and folds the BatchNormalization after it
  into its narrow weight type (ds_cnn at 8 bits: 12% top-1 agreement): the alpha is moved out of
  the layer and its output type set, see :mod:`tfqkd.export.hls4ml_depthwise`;
* in io_stream hls4ml 1.3 computes an activation after a Flatten on the wrong values (and tfqkd
  quantizes the input of every Dense): the activation goes before the Flatten, see
  :mod:`tfqkd.export.hls4ml_flatten`.

The project is written, its C++ emulation compiled with the system compiler, and the emulation's
predictions compared with the tfqkd model's (``hls4ml_report.json`` next to the project).
Compiling the C++ emulation of a convolutional model takes minutes (ds_cnn with io_parallel:
about 18 minutes on 2 cores); MLPs compile in seconds.
hls4ml is an optional extra: ``pip install "tfqkd[hls]"``.
"""

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from tfqkd import atomic
from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.export.hls4ml_depthwise import factor_depthwise_alpha, quantized_depthwise_layers
from tfqkd.export.hls4ml_flatten import activations_before_flatten
from tfqkd.export.qkeras import quiet_stock_qkeras, stock_qkeras_model
from tfqkd.export.validate import compare_logits

__all__ = ["BACKENDS", "IO_TYPES", "to_hls4ml"]

#: hls4ml backends that write an HLS project and a C++ emulation.
BACKENDS = ("Vitis", "Vivado", "Catapult", "oneAPI")
IO_TYPES = ("io_parallel", "io_stream")
#: Layer names hls4ml's ModelGraph refuses.
_RESERVED = ("input",)
#: Precision of what no quantizer fixes (BatchNormalization, additions, pooling, and the types
#: hls4ml infers from it): 16 integer bits carry the float model's values without overflow
#: (hls4ml's own default, ap_fixed<16,6>, overflows inside residual networks: resnet8 agreed on
#: 58.5% of the images with it). 32 fractional bits, because hls4ml folds each weight quantizer's
#: alpha into the BatchNormalization after it, whose scale gamma / sqrt(var) * alpha is small: with
#: 16 its rounding moved 4-bit activations across their rounding boundaries (fc_autoencoder at 4
#: bits: outputs off by 0.32 with ap_fixed<32,16>, by 4e-7 with this; resnet8 at 4 bits: 98.3% ->
#: 100% top-1 agreement).
DEFAULT_PRECISION = "ap_fixed<48,16>"


def _hls4ml():
    try:
        import hls4ml
    except ImportError:
        raise TfqkdError('the hls4ml target needs hls4ml: pip install "tfqkd[hls]"') from None
    return hls4ml


@contextlib.contextmanager
def _hls4ml_compatible():
    """Inside the block ``import keras`` gives tf-keras (hls4ml picks its reader by
    ``keras.__version__``) and ``numpy.product`` exists (hls4ml 1.3's merge layers call it;
    NumPy 2 removed it)."""
    saved = sys.modules.get("keras")
    sys.modules["keras"] = keras
    added_product = not hasattr(np, "product")
    if added_product:
        np.product = np.prod
    try:
        yield
    finally:
        if added_product:
            del np.product
        if saved is None:
            sys.modules.pop("keras", None)
        else:
            sys.modules["keras"] = saved


def _integer_step_activations(stock):
    """``{layer: precision}`` for the activation quantizers of ``stock`` whose step is 1 or more.

    hls4ml.utils.config._get_precision_from_quantizer gives a quantizer with ``bits <= integer``
    (no fractional bits) ``IntegerPrecisionType(width=integer)``: ``ap_uint<integer>``, which
    truncates and wraps (quantized_relu(4,4) on 16.9: 0, QKeras 15) and, for ``integer > bits``,
    has step 1 (quantized_relu(4,5): QKeras' step is 2). ``ap_ufixed<bits, integer, AP_RND_CONV,
    AP_SAT>`` (``ap_fixed<bits, integer + 1, ...>`` when signed) is QKeras' grid: round half to
    even, saturate, step ``2**(integer - bits)``; ap_fixed takes an integer width above the width.
    """
    types = {}
    for layer in stock.layers:
        quantizer = getattr(layer, "quantizer", None) if type(layer).__name__ == "QActivation" else None
        kind = type(quantizer).__name__
        if kind == "quantized_relu" and not getattr(quantizer, "negative_slope", 0):
            sign, integer = "u", quantizer.integer
        elif kind == "quantized_bits" and quantizer.keep_negative:
            sign, integer = "", quantizer.integer + 1
        else:
            continue
        if integer >= quantizer.bits:
            types[layer.name] = f"{sign}fixed<{quantizer.bits},{integer},RND_CONV,SAT>"
    return types


def to_hls4ml(
    model, out_dir, *, backend="Vitis", io_type="io_parallel", evaluation=None, project_name="tfqkd",
    default_precision=DEFAULT_PRECISION,
):  # fmt: skip
    """Writes an hls4ml project of ``model``, compiles its C++ emulation and checks it.

    Args:
      model: a tfqkd-quantized model.
      out_dir: the project directory (created).
      backend: one of :data:`BACKENDS`.
      io_type: "io_parallel" or "io_stream" (streaming, for convolutional models).
      evaluation: optional inputs: compare the compiled emulation with ``model`` on them.
      project_name: the HLS project name.
      default_precision: the precision of layers and intermediate types no quantizer fixes
        (see :data:`DEFAULT_PRECISION`); quantized layers take theirs from the trained quantizers.

    Returns:
      dict with ``project``, ``precisions`` (per layer, as hls4ml configured them from the
      quantizers), ``inexact`` (layers the stock QKeras form rounds, see
      :func:`tfqkd.export.qkeras.to_qkeras`), ``compile_seconds`` and, with ``evaluation``,
      ``validation`` (top-1 agreement and the largest logit difference); also written to
      ``<out_dir>/hls4ml_report.json``.

    Raises:
      TfqkdError: hls4ml missing, an unknown backend or io type, or a layer hls4ml cannot take.
    """
    if backend not in BACKENDS:
        raise TfqkdError(f"unknown hls4ml backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if io_type not in IO_TYPES:
        raise TfqkdError(f"unknown io type {io_type!r}; expected one of {', '.join(IO_TYPES)}")
    hls4ml = _hls4ml()
    from hls4ml.converters import keras_v2_to_hls
    from hls4ml.utils.config import create_config

    out_dir = atomic.ensure_directory(out_dir, "hls4ml project directory")
    taken = {layer.name for layer in model.layers}
    rename = {name: next(f"{name}_{i}" for i in range(1, 100) if f"{name}_{i}" not in taken) for name in _RESERVED if name in taken}
    stock, report = stock_qkeras_model(model, rename=rename, runnable=False)  # hls4ml reads (bits, integer)
    stock, depthwise_alpha = factor_depthwise_alpha(stock)
    before_flatten = []
    if io_type == "io_stream":
        stock, before_flatten = activations_before_flatten(stock)
    try:
        with _hls4ml_compatible(), quiet_stock_qkeras():  # hls4ml reads the stock model's config
            hls_config = hls4ml.utils.config_from_keras_model(
                stock, granularity="name", backend=backend, default_precision=default_precision
            )
            for name in quantized_depthwise_layers(stock):
                # An explicit output type keeps hls4ml's BN fusion, which would cast the scaled
                # weights to the quantizer's type, away from a quantized depthwise conv
                # (see tfqkd.export.hls4ml_depthwise).
                hls_config["LayerName"][name]["Precision"]["result"] = default_precision
            for name, precision in _integer_step_activations(stock).items():
                hls_config["LayerName"][name]["Precision"]["result"] = precision
            config = create_config(output_dir=str(out_dir), project_name=project_name, backend=backend, io_type=io_type)
            config.update(KerasModel=stock, InputData=None, OutputPredictions=None)
            config["HLSConfig"] = {"Model": hls_config["Model"], "LayerName": hls_config.get("LayerName", {})}
            hls_model = keras_v2_to_hls(config)
            start = time.perf_counter()
            hls_model.compile()  # writes the project and builds the C++ emulation
            seconds = time.perf_counter() - start
    except TfqkdError:
        raise
    except Exception as err:  # hls4ml raises plain exceptions for layers it does not support
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TfqkdError(f"hls4ml cannot convert {model.name}: {first[:200]}") from None
    result = {
        "project": str(out_dir),
        "backend": backend,
        "io_type": io_type,
        "renamed": rename,
        "default_precision": default_precision,
        "precisions": {name: cfg.get("Precision") for name, cfg in hls_config.get("LayerName", {}).items()},
        "inexact": report["inexact"],
        "depthwise_alpha": depthwise_alpha,
        "activations_before_flatten": before_flatten,
        "compile_seconds": round(seconds, 1),
    }
    if evaluation is not None:
        x = np.ascontiguousarray(np.asarray(evaluation, dtype=np.float32))
        expected = model.predict(x, verbose=0, batch_size=256)
        result["validation"] = compare_logits(np.asarray(hls_model.predict(x)).reshape(expected.shape), expected)
    atomic.write_text(Path(out_dir) / "hls4ml_report.json", json.dumps(result, indent=2, default=str))
    return result
