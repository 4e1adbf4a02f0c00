"""Exact rewrites that make a graph easier to analyse, applied before the dependency analysis.

* :func:`merge_reshapes`: ``Reshape(Reshape(x, s1), s2)`` is ``Reshape(x, s2)`` whenever ``s2``
  does not copy dims of the intermediate tensor (no ``0`` entries, or ``allowzero=1``): a
  reshape never reorders elements. tf2onnx turns the NHWC transpose in front of a classifier's
  flatten into ``[N, C, 1, 1] -> [N, 1, 1, C] -> [N, C]``; the middle tensor moves the channel
  axis (which freezes the last residual stream), the merged ``[N, C, 1, 1] -> [N, C]`` does not.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["merge_reshapes"]

log = logging.getLogger(__name__)


def _default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in ("", "ai.onnx")


def merge_reshapes(graph: gs.Graph) -> int:
    """Feed each ``Reshape`` of a ``Reshape`` from the first one's input; returns how many.

    Only when the intermediate tensor has no other reader and is not a graph output, and the
    second shape is a constant without ``0`` entries (unless ``allowzero=1``). The first
    Reshape is left dead (``graph.cleanup()`` removes it).
    """
    outputs = {t.name for t in graph.outputs}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "Reshape" or not _default_domain(node) or len(node.inputs) < 2:
            continue
        mid, shape = node.inputs[0], node.inputs[1]
        if not isinstance(shape, gs.Constant) or len(mid.inputs) != 1:
            continue
        first = mid.inputs[0]
        if first.op != "Reshape" or not _default_domain(first) or mid.name in outputs or len(mid.outputs) != 1:
            continue
        target = np.asarray(shape.values).reshape(-1)
        if int(node.attrs.get("allowzero", 0)) == 0 and np.any(target == 0):
            continue
        node.inputs[0] = first.inputs[0]
        merged += 1
        log.debug("prune_channels: merged Reshape %s into %s", first.name, node.name)
    return merged
