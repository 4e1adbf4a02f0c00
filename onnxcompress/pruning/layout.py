"""Which tensors carry their channels on the last axis (transformer activations).

A CNN's tensors are ``[N, C, *S]``: channels on axis 1. A transformer's linear layers read and
write ``[batch, seq, dim]``: ``MatMul(x, W[dim, n])`` with a constant 2-D weight acts on the last
axis, so its input and output channels are the last axis. :func:`last_axis_tensors` finds them:

* seeds: the data input and the output of every such ``MatMul`` whose input has rank >= 3; and
  the rank >= 3 side of a ``Reshape`` between ``[s, d]`` and ``[1, s, d]`` (same last dim) whose
  rank-2 side a ``Gemm``/``MatMul`` reads or writes (the ``Reshape -> Gemm -> Reshape`` style of
  fixed-shape exports);
* spread: through elementwise ops (:data:`.handlers.LAST_AXIS_OPS`: bias ``Add``, the GELU
  chain, activations; onnxruntime's fused ``com.microsoft`` GELUs) to every operand and output of
  the same rank.

Rank-2 tensors need no entry (axis 1 is their last axis). Every other op that touches one of
these tensors is handled by :mod:`.handlers_last` (MatMul, Reshape, Shape) or frozen.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.pruning.handlers import LAST_AXIS_OPS
from onnxcompress.pruning.handlers_last import MS_GELU_OPS
from onnxcompress.pruning.types import GraphInfo

__all__ = ["last_axis_tensors"]

_LINEAR = ("Gemm", "MatMul")


def _default(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def _const2d(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and GraphInfo.const(t) is not None and GraphInfo.const(t).ndim == 2


def _linear_side(t: gs.Tensor) -> bool:
    """Whether a Gemm/MatMul writes ``t`` or reads it as its data input."""
    made = any(_default(n) and n.op in _LINEAR for n in t.inputs)
    return made or any(_default(n) and n.op in _LINEAR and n.inputs[0] is t for n in t.outputs)


def _seeds(graph: gs.Graph, info: GraphInfo) -> set[str]:
    found: set[str] = set()
    for node in graph.nodes:
        if not _default(node) or not node.inputs or not node.outputs:
            continue
        if node.op == "MatMul" and len(node.inputs) == 2 and _const2d(node.inputs[1]):
            x, y = node.inputs[0], node.outputs[0]
            if (info.rank(x) or 0) >= 3:
                found.update({x.name, y.name})
        elif node.op == "Reshape":
            x, y = node.inputs[0], node.outputs[0]
            xs, ys = info.shape(x), info.shape(y)
            if xs is None or ys is None or not xs or not ys or xs[-1] is None or xs[-1] != ys[-1] or xs[-1] < 2:
                continue
            if len(xs) == 2 and len(ys) >= 3 and _linear_side(x):
                found.add(y.name)
            elif len(ys) == 2 and len(xs) >= 3 and _linear_side(y):
                found.add(x.name)
    return found


def _fill_output(node: gs.Node, info: GraphInfo) -> None:
    """The shape of an elementwise op's output that inference left unknown (a contrib op): its
    variable inputs' common shape, when constants do not broadcast beyond it."""
    y = node.outputs[0]
    if info.shape(y) is not None:
        return
    shapes = {info.shape(t) for t in node.inputs if isinstance(t, gs.Variable)}
    if len(shapes) != 1 or None in shapes:
        return
    shape = shapes.pop()
    if all(np.ndim(t.values) <= len(shape) for t in node.inputs if isinstance(t, gs.Constant)):
        info.shapes[y.name] = shape


def last_axis_tensors(graph: gs.Graph, info: GraphInfo) -> frozenset[str]:
    """Names of the rank >= 3 tensors of ``graph`` whose channels are on the last axis."""
    found = _seeds(graph, info)
    tensors = graph.tensors()
    stack = sorted(found)
    while stack:
        t = tensors.get(stack.pop())
        if t is None:
            continue
        rank = info.rank(t)
        for node in [*t.inputs, *t.outputs]:
            elementwise = node.op in LAST_AXIS_OPS if _default(node) else \
                node.domain == "com.microsoft" and node.op in MS_GELU_OPS
            if not elementwise:
                continue
            _fill_output(node, info)
            for other in [*node.inputs, *node.outputs]:
                if isinstance(other, gs.Variable) and other.name and other.name not in found \
                        and info.rank(other) == rank:
                    found.add(other.name)
                    stack.append(other.name)
    return frozenset(found)
