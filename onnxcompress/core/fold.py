"""Constant subgraphs become constants: what every pass reads as a weight is an initializer.

Exporters leave small computations on weights in the graph: a BN scale ``Unsqueeze(s, [1, 2])``
(Caffe2), a weight ``Reshape(w, Concat(c1, c2))``, ``Cast``, ``Transpose`` of a MatMul weight, a
``Mul(gamma, Reciprocal(Sqrt(Add(var, eps))))``. A pass looking for a constant (``const_values``)
sees a computed tensor there, and declines. :func:`fold_constants` evaluates every subgraph that
depends on constants alone and turns the tensors the rest of the graph reads into initializers.
:func:`~onnxcompress.core.normalize.normalize` runs it before any pass, so no pass depends on
``simplify`` having run first.

Which nodes: default-domain nodes of :data:`EXACT_OPS` whose inputs are all constants or results
of such nodes. These ops move data or are correctly rounded (``+ - * /``, ``Sqrt``,
``Reciprocal``, ``Neg``, ``Abs``, ``Cast``): every conforming runtime computes the same bits, so
folding changes no output of the model, bit for bit (onnxruntime with optimizations off included).
Quantization ops (``DequantizeLinear``), transcendental functions (``Exp``, ``Pow``...) and
reductions (whose result depends on the summation order) are left alone; so is integer ``Div``.
They are evaluated here with numpy, one node at a time, in topological order.

Size: folding a tensor makes the model grow by its size minus the sources that become unused
(constants read only inside its subgraph). A tensor is folded only if that growth is at most
``max_bytes`` (:data:`MAX_FOLD_BYTES`, 64 KiB), and the growths of all folded tensors add up to at
most ``max_total`` (:data:`MAX_TOTAL_BYTES`, 1 MiB): a per-channel scale or a shape is folded, a
``Reshape``/``Transpose`` of a weight nothing else reads is folded (no growth), an ``Expand``,
``Tile`` or ``ConstantOfShape`` to a large tensor is not (its inputs may be), and neither is a
``Transpose`` of a weight that another node also reads (that would store it twice). An output
that large is not even computed.

Names: a folded tensor keeps its name (its consumers read an initializer of that name); a graph
output computed from constants becomes the output of a ``Constant`` node (the node that computed
it, renamed nothing), so the graph's outputs keep their names and order. Source constants are
never modified: folded values are new arrays; a source nothing reads any more is dropped by the
caller's cleanup. The result is deterministic.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, uncached_values

__all__ = ["EXACT_OPS", "MAX_FOLD_BYTES", "MAX_TOTAL_BYTES", "evaluate_node", "fold_constants"]

log = logging.getLogger(__name__)

#: Largest growth of the model (bytes) that folding one tensor may cause.
MAX_FOLD_BYTES = 64 * 1024
#: Largest growth of the model (bytes) that folding may cause in all.
MAX_TOTAL_BYTES = 1 << 20

_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
_NUMERIC = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                      "float16", "float32", "float64"})
_GENERATORS = frozenset({"Expand", "Tile", "ConstantOfShape"})
#: Input values of a node: arrays, ``None`` for an omitted optional input (typed ``Any``: the ops
#: below index them freely once the node's arity is known).
Values = Sequence[Any]


# --- one node, in numpy ------------------------------------------------------------------------


def _axes(node: gs.Node, args: Values, opset: int, since: int) -> list[int] | None:
    """An op's ``axes``: an attribute before opset ``since``, an optional input 1 from it."""
    if opset < since:
        axes = node.attrs.get("axes")
        return None if axes is None else [int(a) for a in axes]
    return None if len(args) < 2 or args[1] is None else [int(a) for a in args[1].reshape(-1)]


def _unsqueeze(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    axes = _axes(node, args, opset, 13)
    if not axes:
        raise ValueError("Unsqueeze without axes")
    return np.expand_dims(args[0], tuple(axes))


def _squeeze(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    axes = _axes(node, args, opset, 13)
    return np.squeeze(args[0], axis=None if axes is None else tuple(axes))


def _reshape(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    x, shape = args[0], [int(d) for d in args[1].reshape(-1)]
    if not int(node.attrs.get("allowzero", 0)):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    x = args[0]
    axis = int(node.attrs.get("axis", 1))
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _slice_bounds(dim: int, start: int, end: int, step: int) -> slice:
    """ONNX's clamping of one axis' ``start``/``end`` as a Python slice."""
    if step == 0:
        raise ValueError("Slice step 0")
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


def _slice(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    x = args[0]
    if opset < 10:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes, steps = node.attrs.get("axes"), None
    else:
        starts, ends = list(args[1].reshape(-1)), list(args[2].reshape(-1))
        axes = None if len(args) < 4 or args[3] is None else list(args[3].reshape(-1))
        steps = None if len(args) < 5 or args[4] is None else list(args[4].reshape(-1))
    axes = list(range(len(starts))) if axes is None else [int(a) % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        index[axis] = _slice_bounds(x.shape[axis], int(start), int(end), int(step))
    return x[tuple(index)]


def _gather(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    x, indices = args[0], args[1].astype(np.int64)
    axis = int(node.attrs.get("axis", 0)) % x.ndim
    dim = x.shape[axis]
    if indices.size and (indices.min() < -dim or indices.max() >= dim):
        raise ValueError("Gather index out of range")
    return np.take(x, np.where(indices < 0, indices + dim, indices), axis=axis)


def _shape(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    dims = np.array(args[0].shape, dtype=np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return dims[int(start):None if end is None else int(end)]


def _constant_of_shape(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    value = node.attrs.get("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value.values)
    return np.full([int(d) for d in args[0].reshape(-1)], fill.reshape(-1)[0], dtype=fill.dtype)


def _cast(node: gs.Node, args: Values, opset: int) -> np.ndarray:
    x = args[0]
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    if dtype.name not in _NUMERIC:
        raise ValueError(f"Cast to {dtype}")
    if dtype.kind in "iu" and x.dtype.kind == "f":  # out of range or NaN: undefined, not folded
        info = np.iinfo(dtype)
        if not np.isfinite(x).all() or (x.size and (np.trunc(x).min() < info.min or np.trunc(x).max() > info.max)):
            raise ValueError("Cast of a value out of the target range")
    return x.astype(dtype)


def _float_only(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def run(*xs: np.ndarray) -> np.ndarray:
        if any(x.dtype.kind != "f" for x in xs):
            raise ValueError("integer operand")
        return fn(*xs)
    return run


_ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _float_only(np.divide),
    "Neg": np.negative, "Abs": np.abs, "Sqrt": _float_only(np.sqrt), "Reciprocal": _float_only(np.reciprocal),
}

_OPS: dict[str, Callable[[gs.Node, Values, int], np.ndarray]] = {
    "Identity": lambda node, args, opset: args[0],
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": lambda node, args, opset: np.transpose(args[0], node.attrs.get("perm")),
    "Concat": lambda node, args, opset: np.concatenate([a for a in args if a is not None], int(node.attrs["axis"])),
    "Expand": lambda node, args, opset: np.broadcast_to(
        args[0], np.broadcast_shapes(args[0].shape, tuple(int(d) for d in args[1].reshape(-1)))),
    "Tile": lambda node, args, opset: np.tile(args[0], [int(r) for r in args[1].reshape(-1)]),
    "Slice": _slice,
    "Gather": _gather,
    "Shape": _shape,
    "Size": lambda node, args, opset: np.array(args[0].size, dtype=np.int64),
    "ConstantOfShape": _constant_of_shape,
    "Cast": _cast,
}

#: The ops :func:`fold_constants` evaluates (exact: see the module docstring).
EXACT_OPS = frozenset(_OPS) | frozenset(_ELEMENTWISE)


def evaluate_node(node: gs.Node, args: Sequence[np.ndarray | None], opset: int) -> np.ndarray:
    """The output of ``node`` (an op of :data:`EXACT_OPS`, one output) for input values ``args``
    (``None`` for an omitted optional input), as a new array that shares no memory with ``args``.

    Raises:
        ValueError: Not an exact op, an unsupported case (integer ``Div``, ``Cast`` of out-of-range
            values, ...) or inputs the op rejects.
    """
    values = list(args)
    if node.op in _ELEMENTWISE:
        arrays = [v for v in values if v is not None]
        if len(arrays) != len(values) or len({v.dtype for v in arrays}) != 1:
            raise ValueError(f"{node.op}: inputs of different dtypes")
        with np.errstate(all="ignore"):
            out = np.asarray(_ELEMENTWISE[node.op](*arrays)).astype(arrays[0].dtype, copy=False)
    elif node.op in _OPS:
        if not values or values[0] is None:
            raise ValueError(f"{node.op}: no data input")
        out = np.asarray(_OPS[node.op](node, values, opset))
    else:
        raise ValueError(f"{node.op} is not folded")
    return np.array(out, copy=True, order="C")


def _generated_bytes(node: gs.Node, args: Values) -> int:
    """Bytes of the output of an Expand, Tile or ConstantOfShape, from its inputs (not computed)."""
    dims = [int(d) for d in args[-1 if node.op == "ConstantOfShape" else 1].reshape(-1)]
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        itemsize = 4 if value is None else np.dtype(value.dtype).itemsize
        return int(np.prod(dims, dtype=np.float64)) * itemsize
    x = args[0]
    shape = np.broadcast_shapes(x.shape, tuple(dims)) if node.op == "Expand" else [a * b for a, b in zip(x.shape, dims)]
    return int(np.prod(shape, dtype=np.float64)) * x.itemsize


# --- which tensors, and folding them ------------------------------------------------------------


def _dtype_name(constant: gs.Constant) -> str:
    """The numpy name of a constant's dtype (``""`` for types numpy lacks: bfloat16, float8...)."""
    try:
        return np.dtype(constant.dtype).name
    except TypeError:
        return ""


def _nbytes(constant: gs.Constant) -> int:
    """Bytes of a constant, from its shape and dtype (a value not read yet stays unread)."""
    return int(getattr(constant._values, "nbytes", 0) or 0)


class _Region:
    """The nodes computed from constants alone, with the value and the source constants of each output."""

    def __init__(self, graph: gs.Graph, max_bytes: int):
        self.nodes: list[gs.Node] = []
        self.values: dict[int, np.ndarray] = {}  # id(tensor) -> value
        self.leaves: dict[int, np.ndarray] = {}  # id(constant) -> its values
        self.sources: dict[int, dict[int, gs.Constant]] = {}  # id(tensor) -> source constants by id
        self.producer: dict[int, gs.Node] = {}
        opset = int(graph.opset or 1)
        for node in graph.nodes:
            if node.op in EXACT_OPS and node.domain in _DEFAULT_DOMAINS | {None} and len(node.outputs) == 1 \
                    and not any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                self._add(node, opset, max_bytes)

    def _input(self, tensor: gs.Tensor) -> tuple[bool, np.ndarray | None, dict[int, gs.Constant]]:
        """``(known, value, sources)`` of one input (an omitted optional input is known, ``None``)."""
        if not tensor.name:
            return True, None, {}
        if isinstance(tensor, gs.Constant):
            if _dtype_name(tensor) not in _NUMERIC:
                return False, None, {}
            if id(tensor) not in self.leaves:  # read once (not cached in the tensor: see uncached_values)
                self.leaves[id(tensor)] = uncached_values(tensor)
            values = self.leaves[id(tensor)]
            if not isinstance(values, np.ndarray) or values.dtype.name not in _NUMERIC:
                return False, None, {}
            return True, values, {id(tensor): tensor}
        if id(tensor) in self.values:
            return True, self.values[id(tensor)], self.sources[id(tensor)]
        return False, None, {}

    def _add(self, node: gs.Node, opset: int, max_bytes: int) -> None:
        args: list[np.ndarray | None] = []
        sources: dict[int, gs.Constant] = {}
        for tensor in node.inputs:
            known, value, srcs = self._input(tensor)
            if not known:
                return
            args.append(value)
            sources.update(srcs)
        cap = max_bytes + sum(_nbytes(c) for c in sources.values())
        try:
            if node.op in _GENERATORS and _generated_bytes(node, args) > cap:
                return
            value = evaluate_node(node, args, opset)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            log.debug("not folding %s (%s): %s", node.name, node.op, exc)
            return
        if value.nbytes > cap:
            return
        out = node.outputs[0]
        self.nodes.append(node)
        self.values[id(out)], self.sources[id(out)], self.producer[id(out)] = value, sources, node

    def cone(self, tensor: gs.Tensor) -> set[int]:
        """Ids of the region's nodes ``tensor`` is computed by."""
        seen: set[int] = set()
        stack = [tensor]
        while stack:
            node = self.producer.get(id(stack.pop()))
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.inputs)
        return seen

    def growth(self, tensor: gs.Tensor) -> int:
        """Bytes the model grows by when ``tensor`` is folded: its size minus the sources only its
        own subgraph reads (they become unused)."""
        cone = self.cone(tensor)
        freed = sum(_nbytes(c) for c in self.sources[id(tensor)].values()
                    if all(id(n) in cone for n in c.outputs))
        return int(self.values[id(tensor)].nbytes) - freed


def _needed(graph: gs.Graph, region: _Region) -> list[gs.Tensor]:
    """The region's outputs read outside it (by other nodes, subgraphs or as graph outputs)."""
    inside = {id(n) for n in region.nodes}
    outputs = {id(t) for t in graph.outputs}
    return [n.outputs[0] for n in region.nodes
            if id(n.outputs[0]) in outputs or any(id(c) not in inside for c in n.outputs[0].outputs)]


def _choose(graph: gs.Graph, region: _Region, max_bytes: int, max_total: int) -> tuple[list[gs.Tensor], list[str]]:
    """``(tensors to fold, names of tensors too large to fold)``: from the last needed tensor back;
    a tensor not folded keeps its node, whose computed inputs are needed in turn."""
    order = {id(n): i for i, n in enumerate(region.nodes)}
    heap = [(-order[id(region.producer[id(t)])], t.name, t) for t in _needed(graph, region)]
    heapq.heapify(heap)
    queued = {id(t) for _, _, t in heap}
    fold, too_large, total = [], [], 0
    while heap:
        _, _, tensor = heapq.heappop(heap)
        growth = region.growth(tensor)
        if growth <= min(max_bytes, max_total - total):
            fold.append(tensor)
            total += max(growth, 0)
            continue
        too_large.append(tensor.name)
        for t in region.producer[id(tensor)].inputs:
            if id(t) in region.values and id(t) not in queued:
                queued.add(id(t))
                heapq.heappush(heap, (-order[id(region.producer[id(t)])], t.name, t))
    return fold, too_large


def fold_constants(graph: gs.Graph, max_bytes: int = MAX_FOLD_BYTES, max_total: int = MAX_TOTAL_BYTES) -> int:
    """Fold the constant subgraphs of ``graph`` (main graph, in place; see the module docstring)
    and return how many tensors became constants. Nodes left unused stay for the caller's cleanup.

    Args:
        graph: The graph; toposorted here.
        max_bytes: Largest growth of the model one folded tensor may cause.
        max_total: Largest growth of the model all folded tensors may cause (tensors that free as
            many bytes as they take are always folded).
    """
    graph.toposort(recurse_subgraphs=False, recurse_functions=False)
    region = _Region(graph, max_bytes)
    if not region.nodes:
        return 0
    fold, too_large = _choose(graph, region, max_bytes, max_total)
    if too_large:
        log.info("not folding %d constant tensor(s) that would grow the model by over %d bytes each or %d in all "
                 "(e.g. %s)", len(too_large), max_bytes, max_total, too_large[0])
    outputs = {id(t) for t in graph.outputs}
    names = Names(graph)
    for tensor in fold:
        node, value = region.producer[id(tensor)], region.values[id(tensor)]
        if id(tensor) in outputs:  # the producer becomes a Constant node: the output keeps its name
            node.op, node.domain = "Constant", None
            node.inputs.clear()
            node.attrs = {"value": gs.Constant(f"{tensor.name}_value", value)}
            continue
        node.outputs[0] = gs.Variable(names.fresh(f"{tensor.name}_folded"))
        tensor.to_constant(value)
    return len(fold)
