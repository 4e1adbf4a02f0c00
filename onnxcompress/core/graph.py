"""Small helpers every graph-rewriting pass needs: constant values, node labels, fresh names, where a
weight layer keeps its channels, a vector broadcast along one axis, and an activation's clamp."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.spill import header_of

__all__ = [
    "WEIGHT_OPS",
    "Names",
    "WeightLayout",
    "broadcast_along",
    "check_names",
    "clip_bounds",
    "const_values",
    "constant_info",
    "constants_nbytes",
    "has_float_weight",
    "has_padding",
    "lowbit_constant",
    "relazy_lowbit",
    "node_label",
    "opt_input",
    "uncached_values",
    "weight_layout",
]

#: Ops whose input 1 is a weight with output and input channels (see :func:`weight_layout`).
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def const_values(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The values of a dense constant, or ``None`` for anything computed or fed at run time."""
    if not isinstance(tensor, gs.Constant):
        return None
    values = tensor.values
    return values if isinstance(values, np.ndarray) else None


def uncached_values(tensor: gs.Constant) -> np.ndarray:
    """``tensor.values`` without keeping a not-yet-read array in ``tensor``: a constant still backed
    by its protobuf is decoded into a fresh array each call (freed when the caller drops it)."""
    if isinstance(tensor._values, gs.ir.tensor.LazyValues):
        return tensor._values.load()
    return tensor.values


def constant_info(tensor: gs.Tensor | None) -> tuple[np.dtype, tuple[int, ...]] | None:
    """Dtype and shape of a dense constant, as :func:`const_values` would give them, else ``None``.

    A float32 constant not yet read from its protobuf stays unread (no numpy copy is made just to
    look at it: on a large model that would hold every weight twice).
    """
    if isinstance(tensor, gs.Constant) and isinstance(tensor._values, gs.ir.tensor.LazyValues):
        proto = header_of(tensor._values)  # a spilled tensor's data stays in its file
        if proto.data_type == onnx.TensorProto.FLOAT:
            return np.dtype(np.float32), tuple(int(d) for d in proto.dims)
    values = const_values(tensor)
    return None if values is None else (values.dtype, values.shape)


def has_float_weight(node: gs.Node, min_rank: int = 2) -> bool:
    """Whether ``node`` reads a float constant of at least ``min_rank`` dims (a weight): what a pass
    that rewrites weights names in a decline when it leaves such a node alone."""
    return any((info := constant_info(t)) is not None and info[0].kind == "f" and len(info[1]) >= min_rank
               for t in node.inputs)


def constants_nbytes(graph: gs.Graph) -> int:
    """Bytes of the graph's constants, from their shapes and dtypes (nothing is loaded)."""
    return sum(int(getattr(t._values, "nbytes", 0) or 0) for t in graph.tensors().values() if isinstance(t, gs.Constant))


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


@dataclass(frozen=True)
class WeightLayout:
    """Where a weight layer's weight (input 1) keeps its output and input channels.

    ======================  =====================  ========  =======
    op                      weight                 out_axis  in_axis
    ======================  =====================  ========  =======
    Conv                    ``[Cout, Cin/g, k...]``  0         1
    ConvTranspose           ``[Cin, Cout/g, k...]``  1         0
    Gemm                    ``B [K, N]``             1         0
    Gemm ``transB=1``       ``B [N, K]``             0         1
    MatMul                  ``B [..., K, N]``        ndim-1    ndim-2
    ======================  =====================  ========  =======

    Attributes:
        op: The op type.
        out_axis: Weight axis indexing output channels (for ConvTranspose, within a group).
        in_axis: Weight axis indexing input channels (for Conv, within a group).
        group: The conv ``group`` (1 for Gemm and MatMul).
        trans_a: Gemm's ``transA``: the input is ``[K, M]`` (its features on axis 0).
    """

    op: str
    out_axis: int
    in_axis: int
    group: int = 1
    trans_a: bool = False

    @property
    def grouped_axis(self) -> int | None:
        """The axis holding channels per group (Conv: ``in_axis``, ConvTranspose: ``out_axis``), else None."""
        return {"Conv": self.in_axis, "ConvTranspose": self.out_axis}.get(self.op)

    def out_channels(self, shape: Sequence[int]) -> int:
        """Output channels of a weight of ``shape``."""
        return int(shape[self.out_axis]) * (self.group if self.grouped_axis == self.out_axis else 1)

    def in_channels(self, shape: Sequence[int]) -> int:
        """Input channels of a weight of ``shape``."""
        return int(shape[self.in_axis]) * (self.group if self.grouped_axis == self.in_axis else 1)

    def channel_array(self, vector: np.ndarray, shape: Sequence[int], side: str) -> np.ndarray:
        """``vector`` (one value per output or per input channel, ``side`` ``"out"``/``"in"``) shaped to
        multiply a weight of ``shape`` element-wise: each weight element meets the value of its
        channel, group layout included (the grouped axis holds channel ``b*C/g + j`` of block ``b`` at
        ``j``, and block ``b`` is rows ``[b*R/g, (b+1)*R/g)`` of the other axis)."""
        axis = self.out_axis if side == "out" else self.in_axis
        if axis != self.grouped_axis or self.group == 1:
            return broadcast_along(vector, len(shape), axis)
        other = self.in_axis if side == "out" else self.out_axis  # 0 for both conv layouts
        blocks = np.repeat(vector.reshape(self.group, shape[axis]), shape[other] // self.group, axis=0)
        return blocks[(slice(None), slice(None)) + (None,) * (len(shape) - 2)]


def weight_layout(node: gs.Node, ndim: int = 2) -> WeightLayout | None:
    """The :class:`WeightLayout` of a Conv, ConvTranspose, Gemm or MatMul ``node`` (``ndim``: the rank
    of a MatMul's weight), else ``None``."""
    if node.op == "Conv":
        return WeightLayout("Conv", 0, 1, int(node.attrs.get("group", 1)))
    if node.op == "ConvTranspose":
        return WeightLayout("ConvTranspose", 1, 0, int(node.attrs.get("group", 1)))
    if node.op == "Gemm":
        out_axis, in_axis = (0, 1) if int(node.attrs.get("transB", 0)) else (1, 0)
        return WeightLayout("Gemm", out_axis, in_axis, trans_a=bool(int(node.attrs.get("transA", 0))))
    if node.op == "MatMul":
        return WeightLayout("MatMul", max(ndim, 2) - 1, max(ndim, 2) - 2)
    return None


def broadcast_along(vector: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """``vector`` (one value per index of ``axis``; negative axes count from the end) reshaped to
    broadcast against an ``ndim``-D array: shape ``[1, .., -1, .., 1]``. A single value becomes a
    0-D array (it broadcasts anywhere); against a 0-D array the vector is returned as it is."""
    if vector.size == 1:
        return vector.reshape(())
    if ndim == 0:
        return vector
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return vector.reshape(shape)


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """``(min, max)`` that a Relu or Clip ``node`` clamps to, or ``None`` when they are not constants.

    Relu is ``(0, inf)``. A Clip before opset 11 has its bounds as attributes ``min``/``max``; from
    opset 11 as the optional inputs 1 and 2, scalar constants. An absent bound is infinite. ``None``
    for a Clip whose bound is computed at run time or not a single value, and for any other op.
    """
    if node.op == "Relu":
        return 0.0, np.inf
    if node.op != "Clip":
        return None
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        tensor = opt_input(node, index)
        if tensor is None:
            bounds.append(default)
            continue
        values = const_values(tensor)
        if values is None or values.size != 1:
            return None
        bounds.append(float(values.reshape(-1)[0]))
    return bounds[0], bounds[1]


def has_padding(node: gs.Node) -> bool:
    """Whether a Conv/ConvTranspose pads its input (explicit ``pads`` or a SAME ``auto_pad``)."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return auto_pad not in ("NOTSET", "VALID") or any(int(p) != 0 for p in node.attrs.get("pads", []))


def check_names(graph: gs.Graph, names: Iterable[str], *, owner: str, option: str = "exclude",
                tensors: bool = False, op_types: bool = False) -> None:
    """Refuse names in a pass option that match nothing in ``graph`` (subgraphs included).

    A name matches a node's name or label (:func:`node_label`), and with ``tensors`` a tensor name,
    with ``op_types`` an op type.

    Raises:
        InputError: One line with the first unknown name and the closest known ones.
    """
    known: set[str] = set()
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for node in g.nodes:
            known.update(n for n in (node.name, node_label(node)) if n)
            if op_types:
                known.add(node.op)
        if tensors:
            known.update(g.tensors().keys())
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], sorted(known), n=3, cutoff=0.5)
    what = "node" + (", tensor" if tensors else "") + (" or op type" if op_types else "")
    hint = f"; close: {', '.join(close)}" if close else "; `onnxcompress inspect --nodes MODEL` lists them"
    raise InputError(f"{owner}: {option}={unknown[0]!r} names no {what} of the model{hint}")


#: Sub-byte integer element types (numpy holds them as ml_dtypes arrays, one byte per element).
LOWBIT_TYPES = ("int4", "uint4", "int2", "uint2")


def lowbit_constant(name: str, codes: np.ndarray, dtype: str) -> gs.Constant:
    """A constant of sub-byte integer type ``dtype`` (``int4``, ``uint4``, ``int2``, ``uint2``)
    holding integer ``codes`` (packed two or four to a byte in the file)."""
    if dtype not in LOWBIT_TYPES:
        raise ValueError(f"{dtype!r} is not one of {LOWBIT_TYPES}")
    arr = np.asarray(codes).astype(getattr(ml_dtypes, dtype))
    return gs.Constant(name, gs.ir.tensor.LazyValues(numpy_helper.from_array(arr, name)))


def relazy_lowbit(graph: gs.Graph) -> int:
    """Give every sub-byte constant read into numpy (``.values``) its packed protobuf back, which
    graphsurgeon's exporter needs (it cannot convert those arrays itself); returns how many."""
    names = {np.dtype(getattr(ml_dtypes, t)) for t in LOWBIT_TYPES}
    done = 0
    for g in [graph, *graph.subgraphs(recursive=True)]:
        for tensor in g.tensors().values():
            values = tensor._values if isinstance(tensor, gs.Constant) else None
            if isinstance(values, np.ndarray) and values.dtype in names:
                tensor._values = gs.ir.tensor.LazyValues(numpy_helper.from_array(values, tensor.name))
                done += 1
    return done
