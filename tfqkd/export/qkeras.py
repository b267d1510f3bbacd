"""A trained student as a model of stock QKeras layers and quantizers, loadable without tfqkd.

tfqkd's layers are QKeras layers whose quantizers keep trained state (learned steps, running
ranges). Tools that only know stock QKeras (``qkeras.utils.load_qmodel`` on a machine without
tfqkd, QTools, hls4ml's QKeras reader) take the model this module writes:

* a weight quantizer with a power-of-two step ``s >= 2**-(bits-1)`` becomes
  ``quantized_bits(bits, log2(s) + bits - 1, symmetric, alpha=1)``, QKeras' own grid; any other becomes
  ``quantized_bits(bits, 0, symmetric, keep_negative=1, alpha=s * 2**(bits-1))`` on the kernel
  divided by that ``alpha`` (hls4ml then applies ``alpha`` in a fixed-point scale layer): QKeras rounds
  ``kernel * 2**(bits-1)`` and multiplies by ``alpha / 2**(bits-1)``, so it computes exactly the
  trained ``s * round(clip(w / s))`` (LSQ, power-of-two and symmetric affine grids);
* a quantized bias is stored already on its grid, in float (it is added to the accumulator);
* each activation quantizer becomes ``quantized_relu(bits, integer)`` (unsigned grids, after a
  ReLU) or ``quantized_bits(bits, integer, 0)`` (signed), whose step is the power of two
  ``2**(integer - bits)`` or ``2**(integer - bits + 1)``: exact when the trained step is a
  power of two (policies with ``activation_scheme: lsq_pof2``), otherwise the nearest power of two, and
  the report names the layer and the ratio of the two steps. A step below ``2**-bits`` (a
  negative ``integer``) is written ``quantized_relu(bits - integer, 0, relu_upper_bound=top,
  is_quantized_clip=False)``, the same grid and clip: stock QKeras computes ``2**integer`` in
  int32, and TensorFlow's graph optimizer turns a negative power into an int32 ``Reciprocal``
  that has no CPU kernel, so ``predict()`` of a model with a negative ``integer`` fails.

Everything else (BatchNormalization, pooling, concatenation, ReLU) is copied as it is.
"""

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from tfqkd import atomic
from tfqkd.compat import keras
from tfqkd.errors import TfqkdError
from tfqkd.export.validate import compare_logits
from tfqkd.graph import as_functional
from tfqkd.quant.layers import QActivation, config_key, layer_quantizers, quantized_layer_classes, weight_quantizers
from tfqkd.quant.transform import qkeras_custom_objects, rename_references

# Stock QKeras layers write their quantizers with ``keras.constraints.serialize`` (qkeras/qlayers.py,
# ``get_config``), and tf-keras warns for anything that is not a Constraint. The config written is
# the one ``qkeras.utils.load_qmodel`` reads back (``validate_qkeras`` loads it in a fresh process),
# so the warning would only alarm the user of an export that is correct. Nor is HDF5 "legacy" here:
# it is the format load_qmodel reads.
_QKERAS_SAVE_WARNINGS = (
    r"The `keras\.constraints\.serialize\(\)` API should only be used",
    r"You are saving your model as an HDF5 file",
)


@contextlib.contextmanager
def quiet_stock_qkeras():
    """Silences what tf-keras says about saving or reading the config of a correct stock QKeras model."""
    with warnings.catch_warnings():
        for message in _QKERAS_SAVE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def stock_config(model):
    """A deep copy of a stock QKeras model's config, read without tf-keras' constraint warning."""
    with quiet_stock_qkeras():
        return copy.deepcopy(model.get_config())

__all__ = ["stock_qkeras_model", "to_qkeras", "validate_qkeras"]

_WEIGHT_CLASSES = ("QConv2D", "QDense", "QDepthwiseConv2D")
# Relative difference under which a trained activation step counts as the power of two it is near.
_POF2_TOLERANCE = 1e-6


def _weight_quantizer(quantizer, values, layer_name, report):
    """``(stock quantizer config, alpha)`` for a weight tensor, or ``(None, None)`` to store it on its grid in float."""
    grid = quantizer.grid(values)
    if grid.zero != 0 or grid.qmin < -(2 ** (quantizer.bits - 1)) or grid.qmax > 2 ** (quantizer.bits - 1) - 1:
        report["inexact"].append(f"{layer_name}: {quantizer.bits}-bit weights with zero point {grid.zero} have no "
                                 "stock QKeras form; stored on their grid in float")  # fmt: skip
        return None, None
    import qkeras

    symmetric = 1 if grid.qmin == -grid.qmax else 0
    exponent = math.log2(grid.scale) + quantizer.bits - 1
    if abs(exponent - round(exponent)) < _POF2_TOLERANCE and round(exponent) >= 0:
        # A power-of-two step of at least 2**-(bits-1) is QKeras' own grid: integer bits, alpha 1.
        # Not alpha=None: a QKeras layer turns a weight quantizer's alpha=None into "auto_po2"
        # (qkeras/qconvolutional.py, _set_trainable_parameter), which picks its own scale per
        # channel (resnet8, 4-bit power-of-two weights: a kernel off by 0.0625, logits by 0.22).
        stock = qkeras.quantized_bits(quantizer.bits, round(exponent), symmetric, keep_negative=True, alpha=1.0)
        return {"class_name": "quantized_bits", "config": stock.get_config()}, 1.0
    alpha = grid.scale * 2 ** (quantizer.bits - 1)
    stock = qkeras.quantized_bits(quantizer.bits, 0, symmetric, keep_negative=True, alpha=float(alpha))
    return {"class_name": "quantized_bits", "config": stock.get_config()}, alpha


def _activation_quantizer(quantizer, layer_name, report, runnable=True):
    """The stock quantizer string of an activation quantizer (power-of-two step).

    ``runnable``: no negative ``integer`` (see the module docstring); hls4ml, which reads
    ``(bits, integer)`` and not ``relu_upper_bound``, takes the plain form.
    """
    grid = quantizer.grid()  # one-line TfqkdError for scales that follow each batch
    if grid.zero != 0:
        raise TfqkdError(f"layer '{layer_name}': an activation grid with zero point {grid.zero} has no stock QKeras form")
    keep_negative = 1 if grid.qmin < 0 else 0
    bits = quantizer.bits
    exponent = round(math.log2(grid.scale))
    integer = exponent + bits - keep_negative
    exported = 2.0**exponent
    ratio = exported / grid.scale
    row = {"layer": layer_name, "trained_step": grid.scale, "exported_step": exported, "ratio": ratio}
    report["activations"].append(row)
    if abs(ratio - 1.0) > _POF2_TOLERANCE:
        report["inexact"].append(
            f"{layer_name}: activation step {grid.scale:.6g} exported as 2**{exponent} = {exported:.6g} (x{ratio:.3f})"
        )
    if runnable and integer < 0:
        if keep_negative:
            # quantized_bits has no clip of its own, and its float alpha scales the codes, not x.
            raise TfqkdError(f"layer '{layer_name}': a signed {bits}-bit activation step 2**{exponent} has no stock "
                             "QKeras form that runs (QKeras computes 2**integer in int32; integer would be "
                             f"{integer})")  # fmt: skip
        # The same step 2**exponent and the same top code 2**bits - 1, declared with integer 0.
        top = (2**bits - 1) * exported
        return f"quantized_relu({bits - integer},0,relu_upper_bound={top!r},is_quantized_clip=False)"
    if not keep_negative:
        # Not quantized_bits(keep_negative=False): hls4ml types every quantized_bits as signed,
        # which halves the range of an unsigned grid; quantized_relu is its unsigned type.
        return f"quantized_relu({bits},{integer})"
    return f"quantized_bits({bits},{integer},0)"


def to_qkeras(model, path, *, evaluation=None, force=False):
    """Writes ``model`` as stock QKeras layers and quantizers to ``path`` (.h5).

    Args:
      model: a tfqkd-quantized functional (or Sequential) model.
      path: destination ``.h5`` file, written atomically.
      evaluation: optional input array: the written file is loaded with stock QKeras in a process
        that never imports tfqkd, and its predictions compared with ``model``'s.
      force: overwrite an existing file.

    Returns:
      dict with ``path``, ``activations`` (trained and exported step per activation quantizer),
      ``inexact`` (one line per layer that stock QKeras cannot express exactly) and, with
      ``evaluation``, ``validation`` (:func:`validate_qkeras`).

    Raises:
      TfqkdError: an existing file without ``force``, or a quantizer without a stock form.
    """
    path = Path(path)
    if path.suffix != ".h5":
        raise TfqkdError(f"the QKeras export is an .h5 file (load_qmodel reads HDF5), got {path.name}")
    if path.exists() and not force:
        raise TfqkdError(f"{path} exists; pass --force to overwrite")
    stock_model, report = stock_qkeras_model(model)
    report = {"path": str(path), **report}
    atomic.ensure_directory(path.parent, "QKeras export directory")
    with atomic.replacing(path) as tmp, quiet_stock_qkeras():
        stock_model.save(tmp)
    if evaluation is not None:
        report["validation"] = validate_qkeras(path, np.asarray(evaluation), model.predict(evaluation, verbose=0))
    atomic.write_text(path.with_suffix(".qkeras.json"), json.dumps(report, indent=2, default=float))
    return report


def stock_qkeras_model(model, rename=None, runnable=True):
    """The in-memory model of stock QKeras layers that computes what ``model`` computes.

    Args:
      model: a tfqkd-quantized functional (or Sequential) model.
      rename: optional ``{old layer name: new name}`` (hls4ml reserves some names).
      runnable: write activation steps below ``2**-bits`` in the form stock QKeras runs under
        TensorFlow (``relu_upper_bound``); False: ``quantized_relu(bits, negative integer)``,
        which hls4ml reads (it ignores ``relu_upper_bound``) and TensorFlow cannot predict with.

    Returns:
      ``(stock model, report)``; the report has ``activations`` and ``inexact`` as in :func:`to_qkeras`.
    """
    model = as_functional(model, "to_qkeras()")
    config = copy.deepcopy(model.get_config())
    report = {"activations": [], "inexact": []}
    weights = {}
    stock_names = set(quantized_layer_classes())
    for entry in config["layers"]:
        layer = model.get_layer(entry["name"])
        quantizers = dict(layer_quantizers(layer))
        cls = type(layer).__name__
        for flag in ("midway_thresholds", "add_input"):
            entry["config"].pop(flag, None)  # the steps (and BN gains) in use are exported
        if cls == "IntegerBatchNormalization":
            entry.pop("module", None)
            entry.pop("registered_name", None)
            entry["class_name"] = "BatchNormalization"
            report["inexact"].append(f"{layer.name}: BatchNormalization with its float inference gain and offset "
                                     "(tfqkd puts them on the int8 depthwise grids)")  # fmt: skip
        elif str(entry.get("registered_name") or entry["class_name"]).startswith("tfqkd>"):
            if cls not in stock_names:
                raise TfqkdError(f"layer '{layer.name}' ({cls}) has no stock QKeras counterpart")
            # Stock layers sum x * w in float (the same values up to float32 rounding).
            entry["config"].pop("integer_accumulation", None)
            entry.pop("module", None)
            entry.pop("registered_name", None)
            entry["class_name"] = cls  # tfqkd's layers keep QKeras' class names
        if not quantizers:
            weights[layer.name] = layer.get_weights()
            continue
        layer_config = entry["config"]
        if isinstance(layer, QActivation):
            layer_config["activation"] = _activation_quantizer(layer.quantizer, layer.name, report, runnable)
            weights[layer.name] = []
            continue
        if cls not in _WEIGHT_CLASSES:
            raise TfqkdError(f"layer '{layer.name}' ({cls}) has no stock QKeras counterpart")
        slots = {role: (attr, quantizer, weight) for attr, role, quantizer, weight in weight_quantizers(layer)}
        attr, kernel_quantizer, kernel = slots["depthwise" if cls == "QDepthwiseConv2D" else "kernel"]
        kernel = kernel.numpy()
        stock, alpha = _weight_quantizer(kernel_quantizer, kernel, layer.name, report)
        fake_kernel = kernel_quantizer(kernel, training=False).numpy()
        layer_config[config_key(attr)] = stock
        arrays = [fake_kernel / alpha if alpha is not None else fake_kernel]
        if layer.use_bias:
            bias = layer.bias.numpy()
            if "bias" in slots:
                bias = slots["bias"][1](bias, training=False).numpy()
            arrays.append(bias)
        layer_config["bias_quantizer"] = None
        weights[layer.name] = arrays
    if rename:
        config = _renamed(config, rename)
        weights = {rename.get(name, name): arrays for name, arrays in weights.items()}
    stock_model = keras.Model.from_config(config, custom_objects=qkeras_custom_objects())
    for layer in stock_model.layers:
        layer.set_weights(weights[layer.name])
    return stock_model, report


def _renamed(config, rename):
    """A functional config with layers renamed (their entries and every reference to them)."""
    for entry in config["layers"]:
        if entry["name"] in rename:
            entry["name"] = entry["config"]["name"] = rename[entry["name"]]
        entry["inbound_nodes"] = rename_references(entry["inbound_nodes"], rename)
    config["input_layers"] = rename_references(config["input_layers"], rename)
    config["output_layers"] = rename_references(config["output_layers"], rename)
    return config


_LOADER = r"""
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import qkeras.utils
assert "tfqkd" not in sys.modules
model = qkeras.utils.load_qmodel(sys.argv[1], compile=False)
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0, batch_size=256))
assert "tfqkd" not in sys.modules, "the stock QKeras file pulled tfqkd in"
"""


def validate_qkeras(path, x, expected):
    """Loads ``path`` with stock QKeras in a fresh process that never imports tfqkd and compares predictions.

    Args:
      path: the exported .h5 file.
      x: inputs.
      expected: the tfqkd model's logits for ``x``.

    Returns:
      dict with ``examples``, ``top1_agreement`` (%) and ``max_abs_logit_difference``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        inputs, outputs = Path(scratch) / "x.npy", Path(scratch) / "y.npy"
        np.save(inputs, np.asarray(x, np.float32))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run(
            [sys.executable, "-c", _LOADER, str(path), str(inputs), str(outputs)],
            capture_output=True, text=True, env=env, cwd=scratch, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TfqkdError(f"stock QKeras could not load and run {path}: {last[:200]}")
        got = np.load(outputs)
    return compare_logits(got, expected)
