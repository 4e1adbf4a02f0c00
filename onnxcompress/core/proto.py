"""The protobuf views and edits the layers above need besides loading and saving (:mod:`serde`).

Passes and technique packages work on graphsurgeon graphs; where something must look into or
build a ``ModelProto`` (to run it in onnxruntime, hand it to onnxsim, read a reference model), it
asks here: the tensors a model computes and the inputs it is fed, its initializers as arrays, a copy
exposing intermediate tensors as outputs, a model of a few nodes of a graph, the trivial model that
warms onnxruntime up, and the two protobuf edits ``simplify`` does around onnxsim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.shapes import infer_shapes, light_model

__all__ = [
    "produced_names",
    "feed_names",
    "initializer_arrays",
    "with_outputs",
    "exposing",
    "nodes_model",
    "segment_model",
    "identity_model",
    "hoist_subgraph_initializers",
    "same_computation",
    "swap_initializers",
]


def produced_names(model: onnx.ModelProto) -> set[str]:
    """The tensors computed by the main graph's nodes."""
    return {o for n in model.graph.node for o in n.output if o}


def feed_names(model: onnx.ModelProto) -> list[str]:
    """The graph inputs that are fed at run time (initializer-backed inputs left out), in order."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def initializer_arrays(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of those of ``names`` that are main-graph initializers."""
    wanted = set(names)
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in wanted}


def swap_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray | onnx.TensorProto]
                      ) -> dict[str, onnx.TensorProto]:
    """Replace, in place, the values of the main-graph initializers named in ``values``; returns the
    replaced ones (``swap_initializers(model, returned)`` restores them)."""
    old: dict[str, onnx.TensorProto] = {}
    for init in model.graph.initializer:
        new = values.get(init.name)
        if new is None:
            continue
        old[init.name] = onnx.TensorProto()
        old[init.name].CopyFrom(init)
        init.CopyFrom(new if isinstance(new, onnx.TensorProto) else numpy_helper.from_array(np.asarray(new), init.name))
    return old


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include the intermediate tensors ``names``
    (typed by shape inference; float when it cannot tell).

    Raises:
        InputError: A name is not a tensor produced by a node of the main graph.
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(_extra_outputs(model, names))
    return exposed


@contextlib.contextmanager
def exposing(model: onnx.ModelProto, names: Iterable[str]) -> Iterator[onnx.ModelProto]:
    """:func:`with_outputs` without the copy: ``model`` itself with the extra outputs, removed again
    on leaving the block (for a session made from it: one copy of the weights fewer at its peak).

    Raises:
        InputError: A name is not a tensor produced by a node of the main graph.
    """
    extra = _extra_outputs(model, names)
    count = len(model.graph.output)
    model.graph.output.extend(extra)
    try:
        yield model
    finally:
        del model.graph.output[count:]


def _extra_outputs(model: onnx.ModelProto, names: Iterable[str]) -> list[onnx.ValueInfoProto]:
    """Typed outputs for the tensors ``names`` not yet outputs of ``model`` (checked: produced by a node)."""
    names, produced = list(dict.fromkeys(names)), produced_names(model)
    unknown = [n for n in names if n not in produced]
    if unknown:
        raise InputError(f"cannot capture {unknown[:3]}: not produced by any node")
    present = {o.name for o in model.graph.output}
    missing = [n for n in names if n not in present]
    types = _tensor_types(model, missing)
    return [onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None) for name in missing]


def _tensor_types(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    if not names:
        return {}
    # element types do not depend on weight values: infer on a weight-less copy (a full one cost
    # ddddocr_ocr's capture several copies of its 54 MB of weights at once in shape inference)
    inferred = infer_shapes(light_model(model), types_only=True)
    return {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
            if vi.name in set(names) and vi.type.tensor_type.elem_type}


def nodes_model(graph: gs.Graph, nodes: list[gs.Node], outputs: list[gs.Tensor],
                values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A model of ``nodes`` of ``graph`` alone: their constant inputs and ``values`` (known values
    of other inputs, by name) as initializers, ``outputs`` as graph outputs, untyped (shapes recorded
    on the big graph may be stale: onnxruntime infers them)."""
    sub = gs.Graph(nodes=list(nodes), inputs=[], outputs=list(outputs), opset=graph.opset,
                   import_domains=graph.import_domains, ir_version=graph.ir_version)
    model = gs.export_onnx(sub, do_type_check=False)
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in values.items())
    del model.graph.value_info[:]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=t.name) for t in outputs)
    return model


def segment_model(graph: gs.Graph, nodes: list[gs.Node], inputs: Mapping[str, np.dtype],
                  outputs: list[str]) -> onnx.ModelProto:
    """A model of ``nodes`` of ``graph`` (a part of it, cut anywhere) fed by the tensors ``inputs``
    (name → dtype; typed graph inputs without a shape, so any batch size runs) and computing
    ``outputs``; constants the nodes read become initializers, recorded shapes are dropped (they may
    carry a fixed batch size: onnxruntime infers them)."""
    made = {t.name: t for node in nodes for t in node.outputs}
    model = nodes_model(graph, nodes, [made[n] for n in outputs], {})
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)
        for name, dtype in inputs.items())
    return model


def identity_model() -> onnx.ModelProto:
    """``y = Identity(x)`` on a float ``[1]``: the smallest model onnxruntime runs (to warm it up)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "prime",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)


def hoist_subgraph_initializers(model: onnx.ModelProto) -> None:
    """Move subgraph initializers to the main graph wherever that changes no value (in place).

    onnx-graphsurgeon exports every constant a subgraph reads as an initializer of that subgraph,
    so sibling branches repeat names (onnxsim's If elimination then crashes natively). A name is
    moved when every initializer of that name has the same content and no graph input or node
    output anywhere in the model uses it.
    """
    graphs = [model.graph, *_subgraphs(model.graph)]
    nested = {t.name for g in graphs[1:] for t in g.initializer}
    if not nested:
        return
    values = {name for g in graphs for name in _value_names(g)}
    contents: dict[str, set[bytes]] = {}
    for g in graphs:
        for t in g.initializer:
            if t.name in nested:
                contents.setdefault(t.name, set()).add(t.SerializeToString())
    movable = {name for name, c in contents.items() if len(c) == 1 and name not in values}
    top = {t.name for t in model.graph.initializer}
    for g in graphs[1:]:
        keep = [t for t in g.initializer if t.name not in movable]
        for t in g.initializer:
            if t.name in movable and t.name not in top:
                model.graph.initializer.append(t)
                top.add(t.name)
        del g.initializer[:]
        g.initializer.extend(keep)


def _subgraphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                out.append(sub)
                out.extend(_subgraphs(sub))
    return out


def _value_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines other than by initializers: its inputs and its nodes' outputs."""
    return {i.name for i in graph.input} | {o for n in graph.node for o in n.output if o}


def same_computation(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Whether two models' main graphs have the same nodes and initializers (value_info and the
    names of nothing else)."""
    ga, gb = a.graph, b.graph
    if len(ga.node) != len(gb.node) or len(ga.initializer) != len(gb.initializer):
        return False
    nodes = all(x.SerializeToString() == y.SerializeToString() for x, y in zip(ga.node, gb.node))
    return nodes and all(x.SerializeToString() == y.SerializeToString() for x, y in zip(ga.initializer, gb.initializer))
