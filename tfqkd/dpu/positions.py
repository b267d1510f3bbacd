"""Power-of-two positions of a DPU graph, adjusted to the DPU's limits.

The DPU scheme of Vitis-AI ``vai_q_tensorflow2``'s pof2s refine pipeline
(``vitis_pof2s_refine_transforms.py``: ``align_concat``, ``align_pool``,
``adjust_dpu_shift_cut``, ``adjust_dpu_shift_bias``):

* all inputs of a Concatenate and its output share one position, the minimum (so nothing
  overflows); chains of concatenations (DenseNet blocks) form one group;
* a pooling output keeps its input position;
* a conv/dense's ``shift_cut = wpos + ipos - opos`` lies in [0, 16]; its
  ``shift_bias = wpos + ipos - bpos`` in ``[min(0, -(24 - (8 + shift_cut))), 16]``.

:func:`solve_positions` computes positions from weights and activation ranges and enforces
these rules by moving the kernel and bias positions (activations keep their group's position);
:func:`check_limits` lists every violation of a finished graph.
"""

from __future__ import annotations

from tfqkd.dpu.arithmetic import SHIFT_CUT_RANGE, min_diff_pos, non_overflow_pos, shift_bias_range
from tfqkd.dpu.graph import PASS_OPS, WEIGHTED_OPS

__all__ = ["SHIFT_CUT_RANGE", "check_limits", "position_groups", "shift_bias_range", "shifts", "solve_positions"]


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def position_groups(graph):
    """Groups of nodes whose output tensors must share one position.

    Args:
      graph: a :class:`~tfqkd.dpu.graph.DPUGraph`.

    Returns:
      dict node name -> group representative.
    """
    uf = _UnionFind()
    for node in graph.nodes:
        uf.find(node.name)
        if node.op in PASS_OPS or node.op in ("avgpool", "gap"):
            # Pass-through tensors, pool output = input, concat inputs = output.
            for src in node.inputs:
                uf.union(src, node.name)
    return {node.name: uf.find(node.name) for node in graph.nodes}


def shifts(graph, node):
    """``(shift_cut, shift_bias)`` of a weighted node of a positioned graph."""
    ipos = graph.output_pos(node.inputs[0])
    wpos, bpos, opos = node.pos["kernel"], node.pos["bias"], node.pos["output"]
    return wpos + ipos - opos, wpos + ipos - bpos


def solve_positions(graph, *, act_absmax=None, act_default=None):
    """Computes every position of ``graph`` and enforces the DPU limits.

    Args:
      graph: a :class:`~tfqkd.dpu.graph.DPUGraph` with float weights.
      act_absmax: node name -> max |activation| of its output on calibration data.
      act_default: node name -> position to use when ``act_absmax`` has no entry.

    Returns:
      dict node name -> {"output": pos[, "kernel": pos, "bias": pos]}; the graph's ``pos``
      dicts are updated too.
    """
    act_absmax = act_absmax or {}
    act_default = act_default or {}
    groups = position_groups(graph)
    candidates = {}
    for node in graph.nodes:
        if node.op in PASS_OPS:
            continue
        if node.name in act_absmax:
            pos = non_overflow_pos([act_absmax[node.name]])
        elif node.name in act_default:
            pos = int(act_default[node.name])
        elif "output" in node.pos:
            pos = int(node.pos["output"])
        else:
            pos = 4
        group = groups[node.name]
        candidates[group] = min(candidates.get(group, pos), pos)
    solved = {}
    for node in graph.nodes:
        group = groups[node.name]
        if group in candidates:
            node.pos["output"] = candidates[group]
        solved[node.name] = {"output": node.pos.get("output")}
    for node in graph.nodes:
        if node.op not in WEIGHTED_OPS:
            continue
        ipos, opos = graph.output_pos(node.inputs[0]), node.pos["output"]
        wpos = min_diff_pos(node.weights["kernel"], "even")
        # shift_cut = wpos + ipos - opos in [0, 16]
        wpos = min(max(wpos, opos - ipos + SHIFT_CUT_RANGE[0]), opos - ipos + SHIFT_CUT_RANGE[1])
        shift_cut = wpos + ipos - opos
        bpos = min_diff_pos(node.weights["bias"], "even")
        low, high = shift_bias_range(shift_cut)
        # shift_bias = wpos + ipos - bpos in [low, high]
        bpos = min(max(bpos, wpos + ipos - high), wpos + ipos - low)
        node.pos["kernel"], node.pos["bias"] = wpos, bpos
        solved[node.name].update(kernel=wpos, bias=bpos)
    return solved


def check_limits(graph):
    """Every violation of the DPU's position rules in a positioned graph.

    Args:
      graph: a :class:`~tfqkd.dpu.graph.DPUGraph` with positions.

    Returns:
      list of one-line violation messages (empty when the graph is DPU-legal).
    """
    problems = []
    nodes = graph.by_name()
    for node in graph.nodes:
        for key, value in node.pos.items():
            if value is None or int(value) != value:
                problems.append(f"{node.name}: {key} position {value!r} is not an integer")
        if node.op == "concat":
            out = graph.output_pos(node.name)
            for src in node.inputs:
                if graph.output_pos(src) != out:
                    problems.append(f"{node.name}: input '{src}' position {graph.output_pos(src)} != concat position {out}")
        if node.op in ("avgpool", "gap", "maxpool"):
            if graph.output_pos(node.name) != graph.output_pos(node.inputs[0]):
                problems.append(f"{node.name}: pooling output position differs from its input's")
        if node.op in WEIGHTED_OPS:
            shift_cut, shift_bias = shifts(graph, node)
            if not SHIFT_CUT_RANGE[0] <= shift_cut <= SHIFT_CUT_RANGE[1]:
                problems.append(f"{node.name}: shift_cut {shift_cut} outside [{SHIFT_CUT_RANGE[0]}, {SHIFT_CUT_RANGE[1]}]")
            low, high = shift_bias_range(shift_cut)
            if not low <= shift_bias <= high:
                problems.append(f"{node.name}: shift_bias {shift_bias} outside [{low}, {high}]")
        if node.op not in PASS_OPS and "output" not in node.pos and node.name in nodes:
            problems.append(f"{node.name}: output has no position")
    return problems
