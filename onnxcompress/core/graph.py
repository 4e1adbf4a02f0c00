"""Small helpers every graph-rewriting pass needs: constant values, node labels, fresh names."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["const_values", "node_label", "opt_input", "Names"]


def const_values(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The values of a dense constant, or ``None`` for anything computed or fed at run time."""
    if not isinstance(tensor, gs.Constant):
        return None
    values = tensor.values
    return values if isinstance(values, np.ndarray) else None


def opt_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node``, or ``None`` if it is absent or an omitted optional input."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def node_label(node: gs.Node) -> str:
    """A deterministic label for ``node``: its name, else its first output's name, else its op."""
    if node.name:
        return node.name
    return node.outputs[0].name if node.outputs and node.outputs[0].name else node.op


class Names:
    """Every tensor and node name of a graph (subgraphs included), and fresh unique ones.

    Args:
        graph: The graph whose names are taken.
    """

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        for g in [graph, *graph.subgraphs(recursive=True)]:
            self.taken.update(g.tensors().keys())
            self.taken.update(n.name for n in g.nodes if n.name)

    def __contains__(self, name: str) -> bool:
        return name in self.taken

    def fresh(self, base: str) -> str:
        """``base``, or ``base_<i>`` with the smallest ``i`` not taken yet; reserved from now on."""
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name
