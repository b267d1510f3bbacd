"""Bit-accurate DPU arithmetic emulator in NumPy.

Predicts, on a CPU, what the DPUCZDX8G computes for a quantized graph (Vitis-AI pof2s arithmetic):

* the input is quantized ``clip(floor(x * 2**ipos + 0.5), -128, 127)`` (the VART runner does the
  same before copying images to the DPU);
* conv / depthwise conv / dense multiply int8 codes and accumulate in integers; the int8 bias is
  shifted left by ``shift_bias = wpos + ipos - bpos`` into the accumulator; the sum is shifted
  right by ``shift_cut = wpos + ipos - opos`` rounding half up, the fused ReLU / ReLU6 /
  LeakyReLU(26/256) applied, and the result saturated to int8;
* average pooling is ``sum * num / 2**shift`` rounded half up (3x3: 7/64, 5x5: 10/256,
  6x6: 7/256, 7x7: 21/1024, 14x14: 21/4096, powers of two exact); max pooling, concatenation,
  padding, reshapes move int8 codes unchanged (concatenation inputs share one position);
* Add / Multiply align their inputs exactly and round half up to the output position.

All arithmetic is on integers (int64; products summed through float64 BLAS, which is exact below
2**53). The emulator runs from a :class:`~tfqkd.dpu.graph.DPUGraph`, which comes either
from the in-memory DPU training model or from ``quantized.h5`` alone
(:func:`tfqkd.export.dpu.vitis_h5.read_quantized_h5`). The arithmetic itself is
:mod:`tfqkd.dpu.arithmetic`.
"""

from __future__ import annotations

import math

import numpy as np

from tfqkd.dpu.arithmetic import DPU_LEAKY_ALPHA, avgpool_factor, codes, round_shift, saturate
from tfqkd.dpu.graph import WEIGHTED_OPS, bias_codes, kernel_codes, pair
from tfqkd.errors import TfqkdError

__all__ = ["DPUEmulator", "emulate", "round_shift"]


def _same_pads(size, kernel, stride, dilation=1):
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2, out


def _windows(x, kernel, strides, padding, dilation=(1, 1), pad_value=0):
    """Yields ``(i, j, view)``: for each kernel tap the strided input slice it multiplies."""
    n, h, w, c = x.shape
    if padding == "same":
        top, bottom, out_h = _same_pads(h, kernel[0], strides[0], dilation[0])
        left, right, out_w = _same_pads(w, kernel[1], strides[1], dilation[1])
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=pad_value)
    else:
        out_h = (h - (kernel[0] - 1) * dilation[0] - 1) // strides[0] + 1
        out_w = (w - (kernel[1] - 1) * dilation[1] - 1) // strides[1] + 1
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            r0, c0 = i * dilation[0], j * dilation[1]
            view = x[:, r0 : r0 + (out_h - 1) * strides[0] + 1 : strides[0], c0 : c0 + (out_w - 1) * strides[1] + 1 : strides[1], :]
            yield i, j, view


class DPUEmulator:
    """Runs a DPU graph on integer tensors.

    Args:
      graph: a positioned :class:`~tfqkd.dpu.graph.DPUGraph`.
    """

    def __init__(self, graph):
        self.graph = graph
        self._nodes = graph.by_name()
        self._kernels = {}
        for node in graph.nodes:
            if node.op in WEIGHTED_OPS:
                self._kernels[node.name] = (kernel_codes(node).astype(np.float64), bias_codes(node))

    def pos(self, name):
        return self.graph.output_pos(name)

    # -- operators ----------------------------------------------------------------------------
    def _weighted(self, node, x):
        kernel, bias = self._kernels[node.name]
        cfg = node.config
        if node.op == "dense":
            acc = x.astype(np.float64) @ kernel
        else:
            ksize, strides = pair(cfg["kernel_size"]), pair(cfg["strides"])
            dilation = pair(cfg.get("dilation_rate", 1))
            acc = None
            xf = x.astype(np.float64)
            for i, j, view in _windows(xf, ksize, strides, cfg["padding"], dilation):
                if node.op == "conv2d":
                    term = view @ kernel[i, j]
                else:
                    mult = kernel.shape[3]
                    term = (np.repeat(view, mult, axis=-1) if mult > 1 else view) * kernel[i, j].reshape(-1)
                acc = term if acc is None else acc + term
        acc = np.rint(acc).astype(np.int64)
        ipos = self.pos(node.inputs[0])
        wpos, bpos, opos = int(node.pos["kernel"]), int(node.pos["bias"]), int(node.pos["output"])
        shift_bias, shift_cut = wpos + ipos - bpos, wpos + ipos - opos
        if shift_bias >= 0:
            total, cut = acc + (bias << shift_bias), shift_cut
        else:
            total, cut = (acc << -shift_bias) + bias, shift_cut - shift_bias
        if node.act == "leaky_relu":
            negative = total < 0
            num, extra = int(round(DPU_LEAKY_ALPHA * 256)), 8
            out = np.where(negative, round_shift(total * num, cut + extra), round_shift(total, cut))
        else:
            out = round_shift(total, cut)
        if node.act in ("relu", "relu6"):
            out = np.maximum(out, 0)
        if node.act == "relu6":
            out = np.minimum(out, int(math.floor(6.0 * 2.0**opos + 0.5)))
        return saturate(out)

    def _avgpool(self, node, x):
        if node.op == "gap":
            h, w = x.shape[1], x.shape[2]
            if h != w:
                raise TfqkdError(f"{node.name}: the DPU pools square windows only ({h}x{w})")
            num, shift = avgpool_factor(h)
            summed = x.sum(axis=(1, 2), keepdims=bool(node.config.get("keepdims", False)))
        else:
            pool, strides = pair(node.config["pool_size"]), pair(node.config["strides"] or node.config["pool_size"])
            num, shift = avgpool_factor(pool[0])
            summed = sum(view for _, _, view in _windows(x, pool, strides, "valid"))
        delta = self.pos(node.name) - self.pos(node.inputs[0])
        return saturate(round_shift(summed * num, shift - delta))

    def _maxpool(self, node, x):
        pool, strides = pair(node.config["pool_size"]), pair(node.config["strides"] or node.config["pool_size"])
        out = None
        for _, _, view in _windows(x, pool, strides, node.config.get("padding", "valid"), pad_value=-(1 << 20)):
            out = view if out is None else np.maximum(out, view)
        return self._requantize(out, self.pos(node.inputs[0]), self.pos(node.name))

    @staticmethod
    def _requantize(x, from_pos, to_pos):
        if from_pos == to_pos:
            return x
        return saturate(round_shift(x, from_pos - to_pos))

    def _merge(self, node, xs):
        opos = self.pos(node.name)
        positions = [self.pos(s) for s in node.inputs]
        if node.op == "concat":
            return np.concatenate([self._requantize(x, p, opos) for x, p in zip(xs, positions)], axis=-1)
        if node.op == "add":
            top = max(positions + [opos])
            total = sum(np.asarray(x, np.int64) << (top - p) for x, p in zip(xs, positions))
            return saturate(round_shift(total, top - opos))
        product = np.ones_like(xs[0], dtype=np.int64)
        for x in xs:
            product = product * x
        return saturate(round_shift(product, sum(positions) - opos))

    def _reshape(self, node, x):
        if node.op == "flatten":
            return x.reshape(x.shape[0], -1)
        if node.op == "reshape":
            return x.reshape((x.shape[0],) + tuple(node.config["target_shape"]))
        if node.op == "zeropad":
            (t, b), (l, r) = node.config["padding"]
            return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
        if node.op == "upsampling":
            sh, sw = pair(node.config["size"])
            return np.repeat(np.repeat(x, sh, axis=1), sw, axis=2)
        return x  # softmax: monotonic, runs on the CPU after the DPU; codes unchanged

    # -- running ------------------------------------------------------------------------------
    def quantize_input(self, x):
        """int8 codes of float inputs at the input position (round half up, as the runner does)."""
        return codes(x, self.pos(self.graph.nodes[0].name), "half_up")

    def run_codes(self, x):
        """Runs one batch; returns ``{output name: int codes}``."""
        values = {}
        for node in self.graph.nodes:
            if node.op == "input":
                values[node.name] = self.quantize_input(x)
                continue
            xs = [values[s] for s in node.inputs]
            if node.op in WEIGHTED_OPS:
                out = self._weighted(node, xs[0])
            elif node.op in ("avgpool", "gap"):
                out = self._avgpool(node, xs[0])
            elif node.op == "maxpool":
                out = self._maxpool(node, xs[0])
            elif node.op in ("concat", "add", "multiply"):
                out = self._merge(node, xs)
            else:
                out = self._reshape(node, xs[0])
            values[node.name] = out
        return {name: values[name] for name in self.graph.outputs}

    def predict_logits(self, x, batch_size=100):
        """Dequantized outputs (``codes * 2**-pos``) of the first output, in batches."""
        name = self.graph.outputs[0]
        scale = 2.0 ** -self.pos(name)
        parts = [self.run_codes(x[i : i + batch_size])[name] * scale for i in range(0, len(x), batch_size)]
        return np.concatenate(parts, axis=0)

    def predict(self, x, batch_size=100):
        """Top-1 class of each example."""
        return np.argmax(self.predict_logits(x, batch_size), axis=-1)

    def evaluate(self, x, y, batch_size=100):
        """Top-1 accuracy on ``(x, y)``."""
        return float(np.mean(self.predict(x, batch_size) == np.asarray(y).reshape(-1)))


def emulate(graph, x, batch_size=100):
    """Dequantized DPU outputs of ``graph`` for inputs ``x`` (convenience wrapper)."""
    return DPUEmulator(graph).predict_logits(x, batch_size)
