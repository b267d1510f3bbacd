"""Lossless clean-up of a converted .tflite flatbuffer (applied to every export kind alike).

The TFLite converter leaves bookkeeping in the file that the runtime never
needs. :func:`compact_tflite` removes it without touching any arithmetic, so
the int8, float32 and float16 files are compared like for like (the size
report, thesis table 5.8):

* debug tensor names (the converter's ``"block1_layer1_relu1/Relu;...;
  FakeQuantWithMinMaxVars_5"`` strings), as TFLite's own
  ``flatbuffer_utils.strip_strings`` does, keeping the names of the model's
  input and output tensors;
* constant buffers with identical bytes stored once (e.g. the all-zero
  biases the converter materialises for every bias-free conv: the int8
  CONV_2D kernel requires a bias operand, so they stay as tensors, sharing
  one buffer), and tensors and buffers no operator uses;
* identical vectors written once and referenced from every table that holds
  them (:class:`_SharedVectorBuilder`). Flatbuffers address vectors by
  offset, so sharing is plain, verifiable flatbuffer. It matters for
  per-channel quantization: the runtime requires one int64 zero point per
  channel, all zero for weights and biases, and a BN-folded 1x1 conv of 128
  channels stores two such 1 KB vectors (weights and bias) that are the
  same bytes in every layer.
"""

import flatbuffers
import numpy as np

__all__ = ["compact_tflite", "pack_tflite", "tflite_schema", "unpack_tflite"]


def tflite_schema():
    """TFLite's generated flatbuffer object API (imported when first needed: it loads TensorFlow)."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def unpack_tflite(data):
    """The editable object tree (``ModelT``) of .tflite bytes."""
    return tflite_schema().ModelT.InitFromPackedBuf(bytearray(data), 0)


def pack_tflite(model, builder=None):
    """.tflite bytes of a ``ModelT`` (``builder``: a ``flatbuffers.Builder``, a plain one by default)."""
    builder = builder or flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def compact_tflite(data):
    """Returns the flatbuffer ``data`` without debug names, unused tensors and duplicate buffers.

    Args:
      data: .tflite bytes from the converter.

    Returns:
      bytes of an equivalent model (same operators, weights and quantization).
    """
    model = unpack_tflite(data)
    model.description = None
    model.signatureDefs = None
    for graph in model.subgraphs:
        graph.name = None
        keep_names = set(graph.inputs.tolist() if graph.inputs is not None else [])
        keep_names |= set(graph.outputs.tolist() if graph.outputs is not None else [])
        for index, tensor in enumerate(graph.tensors):
            if index not in keep_names:
                tensor.name = None
        _drop_unused_tensors(graph)
    _share_buffers(model)
    return pack_tflite(model, _SharedVectorBuilder(1024))


class _SharedVectorBuilder(flatbuffers.Builder):
    """A flatbuffers builder that writes each distinct numpy vector once.

    The generated object API packs every numeric vector (shapes, operator
    inputs, scales, zero points, buffer data) through ``CreateNumpyVector``;
    a repeated one returns the offset of its first copy. Keyed by dtype and
    bytes, so a reused vector has the element type and alignment its field
    expects.
    """

    def __init__(self, initial_size):
        super().__init__(initial_size)
        self._vectors = {}

    def CreateNumpyVector(self, x):  # noqa: N802 - flatbuffers' name
        key = (x.dtype.str, x.size, x.tobytes())
        if key not in self._vectors:
            self._vectors[key] = super().CreateNumpyVector(x)
        return self._vectors[key]


def _drop_unused_tensors(graph):
    used = set(graph.inputs.tolist()) | set(graph.outputs.tolist())
    for op in graph.operators:
        used.update(int(i) for i in op.inputs if i >= 0)
        used.update(int(i) for i in op.outputs if i >= 0)
        if op.intermediates is not None:
            used.update(int(i) for i in op.intermediates if i >= 0)
    order = [i for i in range(len(graph.tensors)) if i in used]
    remap = {old: new for new, old in enumerate(order)}

    def renumber(indices):
        return np.asarray([remap[int(i)] if i >= 0 else int(i) for i in indices], np.int32)

    graph.tensors = [graph.tensors[i] for i in order]
    graph.inputs, graph.outputs = renumber(graph.inputs), renumber(graph.outputs)
    for op in graph.operators:
        op.inputs, op.outputs = renumber(op.inputs), renumber(op.outputs)
        if op.intermediates is not None:
            op.intermediates = renumber(op.intermediates)


def _share_buffers(model):
    # Buffer 0 is the empty sentinel; metadata may point at buffers too.
    used = {0}
    for graph in model.subgraphs:
        used.update(t.buffer for t in graph.tensors)
    for entry in model.metadata or []:
        used.add(entry.buffer)
    first = {}
    alias = {}
    for index in sorted(used):
        data = model.buffers[index].data
        key = None if data is None or len(data) == 0 else np.asarray(data, np.uint8).tobytes()
        if key is None or index == 0:
            alias[index] = index
            continue
        alias[index] = first.setdefault(key, index)
    kept = sorted(set(alias.values()) | {0})
    remap = {old: new for new, old in enumerate(kept)}
    model.buffers = [model.buffers[i] for i in kept]
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            tensor.buffer = remap[alias.get(tensor.buffer, tensor.buffer)]
    for entry in model.metadata or []:
        entry.buffer = remap[alias[entry.buffer]]
