"""Check what onnxruntime's CPU provider actually fuses: Q/DQ nodes left after its optimizations.

:func:`ort_optimized_model` loads a model with every onnxruntime graph optimization on and returns
the graph onnxruntime will run (``SessionOptions.optimized_model_filepath``). In that graph,
:func:`unfused_qdq` lists the QuantizeLinear/DequantizeLinear nodes that are *not* absorbed by
integer kernels:

every Q/DQ that onnxruntime fused has disappeared into an integer kernel (``QLinearConv``,
``QGemm``, ``QLinearAdd``, ``MatMulIntegerToFloat``, a Reshape/MaxPool/Resize running on uint8,
...), so each one left is either

* ``boundary``: the entry into the integer domain (a Q with only float ops, no DQ, upstream) or
  the exit from it (a DQ with no Q downstream), which every quantized model needs;
* ``weight``: a DQ of a constant, i.e. a weight dequantized at run time for a float op;
* ``activation``: a DQ whose output reaches a Q, or a Q whose input comes from a DQ: a float
  island (an op onnxruntime did not fuse, or an orphan Q/DQ pair) inside the integer region,
  which costs a dequantize, float work and a requantize.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxcompress.core.errors import InputError
from onnxcompress.runtime.session import make_session

__all__ = ["UnfusedQdq", "ort_optimized_model", "unfused_qdq", "count_unfused_qdq", "integer_op_counts"]

#: Ops that move data without arithmetic; on an integer input they run in the integer domain.
_DATA_MOVEMENT = frozenset({
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "NhwcMaxPool", "Resize", "Slice",
    "Gather", "GatherElements", "Expand", "Tile", "Split", "Identity", "Pad", "DepthToSpace", "SpaceToDepth",
})
_INTEGER_PREFIXES = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize", "QAttention",
                     "QEmbed", "QOrdered")
_INT_TYPES = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32,
                        onnx.TensorProto.INT16, onnx.TensorProto.UINT16})


@dataclass(frozen=True)
class UnfusedQdq:
    """A Q/DQ node onnxruntime left in its optimized graph outside integer kernels."""

    name: str
    op: str
    tensor: str
    kind: str  # "activation" | "weight" | "boundary"


def ort_optimized_model(model: onnx.ModelProto, *, threads: int = 1) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs for ``model`` with all optimizations on.

    Raises:
        InputError: onnxruntime refuses the model.
    """
    with tempfile.TemporaryDirectory(prefix="onnxcompress-ortopt-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        try:
            make_session(model, optimize=True, threads=threads, optimized_model_path=path)
        except InputError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime cannot load the model: {first}") from None
        return onnx.load(str(path))


def _is_integer_op(node: onnx.NodeProto, int_tensors: set[str]) -> bool:
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return False
    if node.op_type.startswith(_INTEGER_PREFIXES):
        return True
    return node.op_type in _DATA_MOVEMENT and bool(node.input) and node.input[0] in int_tensors


def _integer_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of tensors holding integers (initializers, Q outputs, integer-op outputs)."""
    ints = {i.name for i in graph.initializer if i.data_type in _INT_TYPES}
    ints |= {i.name for i in graph.input if i.type.tensor_type.elem_type in _INT_TYPES}
    for node in graph.node:  # the optimized graph is topologically sorted
        if node.op_type == "QuantizeLinear":
            ints.update(node.output)
        elif node.op_type == "QGemm" and (len(node.input) < 8 or not node.input[7]):
            continue  # float output
        elif node.op_type == "MatMulIntegerToFloat":
            continue
        elif _is_integer_op(node, ints):
            ints.update(o for o in node.output if o)
    return ints


def _after_dq(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from the output of an activation DequantizeLinear (forward closure)."""
    inits = {i.name for i in graph.initializer}
    marked: set[str] = set()
    for node in graph.node:  # the optimized graph is topologically sorted
        if node.op_type == "DequantizeLinear" and node.input[0] not in inits:
            marked.update(node.output)
        elif any(i in marked for i in node.input):
            marked.update(o for o in node.output if o)
    return marked


def _before_q(graph: onnx.GraphProto) -> set[str]:
    """Tensors that flow into a QuantizeLinear (backward closure)."""
    marked: set[str] = set()
    for node in reversed(graph.node):
        if node.op_type == "QuantizeLinear" or any(o in marked for o in node.output):
            marked.update(i for i in node.input if i)
    return marked


def unfused_qdq(model: onnx.ModelProto, *, optimized: bool = False) -> list[UnfusedQdq]:
    """Q/DQ nodes of ``model`` that onnxruntime leaves outside integer kernels.

    In a fully fused model the float region before the first Q and after the last DQ are the
    only float parts: every Q/DQ onnxruntime keeps is an entry into or an exit from one integer
    island. A Q whose input comes (through float ops) from a DQ, or a DQ whose output reaches a
    Q, marks a float island in the middle: ``activation``. An entry Q or exit DQ is
    ``boundary``; a DQ of a constant is ``weight``.

    Args:
        model: A QDQ model.
        optimized: ``model`` already is onnxruntime's optimized graph (skip the session).
    """
    graph = (model if optimized else ort_optimized_model(model)).graph
    inits = {i.name for i in graph.initializer}
    after_dq, before_q = _after_dq(graph), _before_q(graph)
    out = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            kind = "activation" if node.input[0] in after_dq else "boundary"
        elif node.op_type == "DequantizeLinear":
            if node.input[0] in inits:
                kind = "weight"
            else:
                kind = "activation" if node.output[0] in before_q else "boundary"
        else:
            continue
        out.append(UnfusedQdq(node.name, node.op_type, node.input[0], kind))
    return out


def count_unfused_qdq(model: onnx.ModelProto, *, boundary: bool = False) -> int:
    """How many Q/DQ nodes onnxruntime's CPU provider leaves as float work.

    Counts ``activation`` and ``weight`` nodes of :func:`unfused_qdq`; ``boundary`` ones (the Q of
    a graph input, the DQ of a graph output) only with ``boundary=True``.
    """
    return sum(1 for u in unfused_qdq(model) if boundary or u.kind != "boundary")


def integer_op_counts(model: onnx.ModelProto, *, optimized: bool = False) -> dict[str, int]:
    """Op counts of the integer kernels in onnxruntime's optimized graph of ``model``."""
    opt = model if optimized else ort_optimized_model(model)
    ints = _integer_tensors(opt.graph)
    counts: dict[str, int] = {}
    for node in opt.graph.node:
        if _is_integer_op(node, ints):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
