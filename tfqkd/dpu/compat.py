"""Compatibility check of a Keras model against the DPUCZDX8G operator set and limits.

Thesis 6.1 / 6.2.2: the DPU runs Conv2D, DepthwiseConv2D, Dense, fused
ReLU / ReLU6 / LeakyReLU(26/256), max / average / global-average pooling, Add, Multiply,
Concatenate, ZeroPadding2D, Reshape, Flatten and UpSampling2D; its convolution engine takes
kernels of 1-16 and strides of 1-8; pooling windows are square, 1-8 (average pooling 2x2 to 8x8,
the global pools of the DPU's average-pool factor table, :func:`tfqkd.dpu.arithmetic.avgpool_factor`). BatchNormalization is only free when it
directly follows a weighted layer, whose weights absorb it; a pre-activation BN-ReLU-Conv block
cannot be folded and its ReLU would run in software (thesis 6.1). Vitis-AI's own limits are in
``vai_q_tensorflow2``'s ``vitis_layer_limits.py`` / ``limit_utils.py`` (Xilinx/Vitis-AI,
``src/vai_quantizer/vai_q_tensorflow2.x``).

:func:`check_model` reports *every* offending layer and why, so the user can fix the model in
one go.
"""

from __future__ import annotations

import dataclasses

from tfqkd.compat import keras
from tfqkd.dpu.arithmetic import AVGPOOL_FACTORS, LEAKY_ALPHAS, has_avgpool_factor
from tfqkd.dpu.graph import pair
from tfqkd.errors import TfqkdError
from tfqkd.graph import as_functional, config_consumers, inbound_names

__all__ = ["CompatIssue", "CompatReport", "check_model", "require_compatible"]

_WEIGHTED = ("Conv2D", "DepthwiseConv2D", "Dense")
_FREE = ("Dropout", "Flatten", "Reshape", "ZeroPadding2D", "InputLayer")
_FUSABLE_ACTIVATIONS = ("linear", "relu", "relu6")


@dataclasses.dataclass(frozen=True)
class CompatIssue:
    """One offending layer: its name, Keras class and the reason."""

    layer: str
    layer_type: str
    reason: str

    def __str__(self):
        return f"{self.layer} ({self.layer_type}): {self.reason}"


@dataclasses.dataclass
class CompatReport:
    """Result of :func:`check_model`.

    Attributes:
      model_name: the checked model's name.
      issues: every offending layer, in layer order.
    """

    model_name: str
    issues: list

    @property
    def ok(self):
        """True when nothing offends the DPU."""
        return not self.issues

    def format(self):
        """Multi-line human-readable report."""
        if self.ok:
            return f"model '{self.model_name}' is compatible with the DPUCZDX8G"
        lines = [f"model '{self.model_name}' cannot run on the DPUCZDX8G; {len(self.issues)} offending layer(s):"]
        lines += [f"  - {issue}" for issue in self.issues]
        return "\n".join(lines)

    def one_line(self):
        """The report as one line (for :class:`~tfqkd.errors.TfqkdError`)."""
        if self.ok:
            return self.format()
        return (
            f"model '{self.model_name}' cannot run on the DPUCZDX8G, {len(self.issues)} offending layer(s): "
            + "; ".join(str(issue) for issue in self.issues)
        )

    def to_dict(self):
        return {"model": self.model_name, "ok": self.ok, "issues": [dataclasses.asdict(i) for i in self.issues]}


def _activation_name(value):
    if isinstance(value, dict):
        return value.get("config", {}).get("name") or value.get("class_name", "?")
    return str(value)


def check_model(model):
    """Checks a Keras model against the DPUCZDX8G operator set and limits.

    Args:
      model: a functional or Sequential float Keras model (a model from
        :func:`tfqkd.dpu.quantize_for_dpu` is checked through its float structure).

    Returns:
      a :class:`CompatReport` listing every offending layer and why.
    """
    if isinstance(model, keras.Sequential) and model.built:
        model = as_functional(model, "check_model()")
    issues = []
    if not getattr(model, "_is_graph_network", False):
        return CompatReport(model.name, [CompatIssue(model.name, type(model).__name__, "subclassed models cannot be exported; use a functional model")])
    config = model.get_config()
    layers_cfg = config["layers"]
    by_name = {e["name"]: e for e in layers_cfg}
    consumers = config_consumers(layers_cfg)
    output_names = {item[0] for item in config["output_layers"]}
    if len(config["input_layers"]) != 1:
        issues.append(CompatIssue(model.name, "Model", f"the DPU runner takes one input, the model has {len(config['input_layers'])}"))

    def after_weighted(name):
        """Whether ``name``'s single input is a weighted layer (optionally through a foldable BN)."""
        srcs = inbound_names(by_name[name])
        if len(srcs) != 1:
            return False
        src = by_name[srcs[0]]
        if src["class_name"] in _WEIGHTED:
            return len(consumers.get(src["name"], [])) == 1 and src["config"].get("activation", "linear") == "linear"
        if src["class_name"] == "BatchNormalization":
            return foldable_bn(src["name"]) and len(consumers.get(src["name"], [])) == 1
        return False

    def foldable_bn(name):
        srcs = inbound_names(by_name[name])
        if len(srcs) != 1:
            return False
        src = by_name[srcs[0]]
        return (
            src["class_name"] in _WEIGHTED
            and src["config"].get("activation", "linear") == "linear"
            and len(consumers.get(src["name"], [])) == 1
        )

    for entry in layers_cfg:
        name, cls, cfg = entry["name"], entry["class_name"], entry["config"]
        add = lambda reason: issues.append(CompatIssue(name, cls, reason))  # noqa: E731
        if len(entry.get("inbound_nodes") or []) > 1:
            add("shared layer (called more than once); the DPU graph needs one node per layer")
            continue
        if cls == "InputLayer":
            shape = cfg.get("batch_input_shape") or []
            if len(shape) != 4 or any(d is None for d in shape[1:]):
                add(f"the DPU needs a concrete image input (H, W, C), got {tuple(shape[1:])}")
            continue
        if cls in ("Functional", "Model", "Sequential"):
            add("nested models are not supported; flatten the model into one functional graph")
            continue
        if cls in ("Conv2D", "DepthwiseConv2D"):
            kernel, strides = pair(cfg["kernel_size"]), pair(cfg["strides"])
            if any(not 1 <= k <= 16 for k in kernel):
                add(f"kernel {kernel[0]}x{kernel[1]} outside the DPUCZDX8G conv engine's 1-16")
            if any(not 1 <= s <= 8 for s in strides):
                add(f"stride {strides[0]}x{strides[1]} outside the DPUCZDX8G conv engine's 1-8")
            if cls == "Conv2D" and int(cfg.get("groups", 1)) != 1:
                add("grouped convolution is not a DPUCZDX8G operator")
            if _activation_name(cfg.get("activation", "linear")) not in _FUSABLE_ACTIVATIONS:
                add(f"activation '{_activation_name(cfg.get('activation'))}' is not a DPU activation (ReLU, ReLU6, LeakyReLU 26/256)")
            continue
        if cls == "Dense":
            act = _activation_name(cfg.get("activation", "linear"))
            if act not in _FUSABLE_ACTIVATIONS and not (act == "softmax" and name in output_names):
                add(f"activation '{act}' is not a DPU activation (ReLU, ReLU6, LeakyReLU 26/256)")
            continue
        if cls == "BatchNormalization":
            axis = cfg.get("axis", -1)
            axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
            if axis not in (-1, 3, 1) or (axis == 1 and len(model.get_layer(name).input_shape) != 2):
                add("BatchNormalization over a non-channel axis cannot be folded")
            elif not foldable_bn(name):
                add(
                    "BatchNormalization not directly after a Conv2D/DepthwiseConv2D/Dense cannot be folded "
                    "(pre-activation BN-ReLU-Conv; use the *_dpu Conv-BN-ReLU variant, thesis 6.1)"
                )
            continue
        if cls in ("ReLU", "LeakyReLU", "Activation", "Softmax"):
            act = cls
            if cls == "ReLU":
                max_value = cfg.get("max_value")
                if cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
                    add("ReLU with a negative slope or threshold is not a DPU activation")
                    continue
                if max_value is not None and float(max_value) != 6.0:
                    add(f"ReLU capped at {max_value} is not a DPU activation (ReLU6 only)")
                    continue
            elif cls == "LeakyReLU":
                alpha = float(cfg.get("alpha", cfg.get("negative_slope", 0.3)))
                if not any(abs(alpha - a) < 1e-6 for a in LEAKY_ALPHAS):
                    add(f"LeakyReLU alpha {alpha} is not the DPU's 26/256 (0.1 is converted to it)")
                    continue
            elif cls == "Activation":
                act = _activation_name(cfg.get("activation"))
                if act == "linear":
                    continue
                if act == "softmax":
                    if name not in output_names:
                        add("softmax is only supported as the model output")
                    continue
                if act not in ("relu", "relu6"):
                    add(f"activation '{act}' is not a DPU activation (ReLU, ReLU6, LeakyReLU 26/256)")
                    continue
            else:  # Softmax
                if name not in output_names:
                    add("softmax is only supported as the model output")
                continue
            if not after_weighted(name):
                add(
                    "standalone activation: the DPU fuses activations into the preceding Conv2D/Dense; "
                    "this one would run on the CPU (thesis 6.1)"
                )
            continue
        if cls in ("MaxPooling2D", "AveragePooling2D"):
            pool, strides = pair(cfg["pool_size"]), pair(cfg["strides"] or cfg["pool_size"])
            if pool[0] != pool[1] or strides[0] != strides[1]:
                add(f"pooling window {pool} / stride {strides} not square; the DPU pools square windows only")
            elif not 1 <= pool[0] <= 8 or not 1 <= strides[0] <= 8:
                add(f"pooling window {pool[0]} / stride {strides[0]} outside the DPU's 1-8")
            elif cls == "AveragePooling2D":
                if cfg.get("padding", "valid") != "valid":
                    add("average pooling with 'same' padding divides by a varying count; the DPU does not")
                elif not has_avgpool_factor(pool[0]):
                    add(f"no DPU average-pooling factor for a {pool[0]}x{pool[0]} window")
            continue
        if cls == "GlobalAveragePooling2D":
            shape = model.get_layer(name).input_shape
            h, w = shape[1], shape[2]
            if h != w:
                add(f"global average pooling over {h}x{w}: the DPU pools square windows only")
            elif not has_avgpool_factor(h):
                add(f"no DPU average-pooling factor for a {h}x{h} window (powers of two, {', '.join(map(str, AVGPOOL_FACTORS))})")
            continue
        if cls == "Concatenate":
            axis = cfg.get("axis", -1)
            if axis not in (-1, 3):
                add(f"concatenation along axis {axis}; the DPU concatenates channels only")
            continue
        if cls in ("Add", "Multiply", "UpSampling2D"):
            if cls == "UpSampling2D" and cfg.get("interpolation", "nearest") != "nearest":
                add("only nearest-neighbour upsampling is supported")
            continue
        if cls in _FREE:
            continue
        if cls == "Conv2DTranspose":
            add("Conv2DTranspose is a DPU operator but tfqkd's DPU exporter and emulator do not support it yet")
            continue
        add("not a DPUCZDX8G operator")
    return CompatReport(model.name, issues)


def require_compatible(model):
    """Raises :class:`~tfqkd.errors.TfqkdError` (one line, every offending layer) unless compatible.

    Args:
      model: the Keras model.

    Returns:
      the (ok) :class:`CompatReport`.
    """
    report = check_model(model)
    if not report.ok:
        raise TfqkdError(report.one_line())
    return report
