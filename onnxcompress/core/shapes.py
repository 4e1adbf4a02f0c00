"""Shape inference, the one entry point for every layer: whole models, weight-free copies, graphs,
and the concrete shapes a model has once its symbolic input dims are fixed.
"""

from __future__ import annotations

import copy
import logging

import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde

__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_DYNAMIC_DIM",
    "concrete_inputs",
    "concrete_shapes",
    "infer_graph",
    "infer_shapes",
    "light_model",
    "shape_model",
]

log = logging.getLogger(__name__)



#: Symbolic dims other than the leading (batch) axis take this value unless given.
DEFAULT_DYNAMIC_DIM = 32
DEFAULT_DIM = 1


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with inferred value_info.

    Uses onnx's inference with data propagation; where it leaves intermediate tensors without a
    shape (dynamic reshapes, unknown ops), falls back to onnxruntime's symbolic shape inference.
    The input is never modified; on failure the best result so far is returned. Exception:
    above the 2 GB threshold (where onnx cannot serialize the model and a copy would double the
    memory) inference runs on a weight-less copy and its value_info is written into ``model``,
    which is returned.
    """
    if serde.weights_nbytes(model) > serde.EXTERNAL_THRESHOLD:
        return _infer_in_place(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        log.debug("onnx shape inference failed: %s", exc)
        inferred = copy.deepcopy(model)
    if _all_shaped(inferred):
        return inferred
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        symbolic = SymbolicShapeInference.infer_shapes(inferred, auto_merge=True, guess_output_rank=True)
        if symbolic is not None:
            return symbolic
    except Exception as exc:
        log.debug("symbolic shape inference failed: %s", exc)
    return inferred


def light_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A weight-less copy for shape inference: big initializers become typed graph inputs.

    Small int64 tensors (shape operands of Reshape, Expand, ...) stay initializers; every other
    initializer is replaced by a graph input of the same name, dtype and shape.
    """
    light = serde.skeleton_model(model)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT64 and len(init.dims) <= 1 or serde.tensor_nbytes(init) < serde.INLINE_BYTES:
            light.graph.initializer.add().CopyFrom(init)
        else:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def shape_model(graph: gs.Graph) -> onnx.ModelProto:
    """The :func:`light_model` of ``graph``, exported without reading or copying any big weight.

    Every initializer that :func:`light_model` would turn into a typed graph input is exported
    as a data-less header (the graph's values are swapped out only during the export), so the
    cost is that of the graph's structure and small constants, whatever the weights' size.
    ``graph`` is not modified.
    """
    with serde.weights_set_aside(graph, min_bytes=serde.INLINE_BYTES, keep_int64=True):
        model = gs.export_onnx(graph, do_type_check=False)
    return light_model(model)


def infer_graph(graph: gs.Graph) -> onnx.ModelProto:
    """``infer_shapes(to_model(graph))`` without the weights: for reading shapes and types only.

    Shape inference runs on :func:`shape_model` (big initializers as typed graph inputs; small and
    int64 rank-<=1 ones, which inference may need the values of, kept whole). The result has the
    graph's own inputs, the inferred ``value_info`` and outputs, and its initializers as headers
    (name, dims, data type): initializers over 1 KiB carry **no data**. Memory and time do not
    grow with the weights' size. ``graph`` is not modified.
    """
    light = shape_model(graph)
    inits = {i.name for i in light.graph.initializer}
    stubs = [vi for vi in light.graph.input if vi.name not in inits and vi.name not in _graph_input_names(graph)]
    inferred = infer_shapes(light)
    stub_names = {vi.name for vi in stubs}
    keep_inputs = [vi for vi in inferred.graph.input if vi.name not in stub_names]
    keep_info = [vi for vi in inferred.graph.value_info if vi.name not in stub_names]
    del inferred.graph.input[:]
    inferred.graph.input.extend(keep_inputs)
    del inferred.graph.value_info[:]
    inferred.graph.value_info.extend(keep_info)
    for vi in stubs:
        tt = vi.type.tensor_type
        inferred.graph.initializer.add(name=vi.name, data_type=tt.elem_type, dims=[d.dim_value for d in tt.shape.dim])
    return inferred


def _graph_input_names(graph: gs.Graph) -> set[str]:
    return {t.name for t in graph.inputs}


def _infer_in_place(model: onnx.ModelProto) -> onnx.ModelProto:
    stubs = {i.name for i in model.graph.initializer}
    inferred = infer_shapes(light_model(model))
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in stubs)
    return model


def _all_shaped(model: onnx.ModelProto) -> bool:
    known = {v.name for v in model.graph.value_info if v.type.tensor_type.HasField("shape")}
    known |= {v.name for v in model.graph.input} | {i.name for i in model.graph.initializer}
    known |= {v.name for v in model.graph.output}
    return all(out in known for node in model.graph.node for out in node.output if out)


def concrete_inputs(model: onnx.ModelProto, dims: dict[str, int] | None = None,
                    default: int = DEFAULT_DIM) -> dict[str, list[int]]:
    """Concrete shape of each graph input: symbolic dims from ``dims`` by name, else ``default``."""
    dims = dims or {}
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shape = []
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append(int(dims.get(d.dim_param, default)))
        out[inp.name] = shape
    return out


def with_concrete_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A weight-less copy of the graph (:func:`light_model`) with fixed input shapes."""
    light = light_model(model)
    for inp in light.graph.input:
        if inp.name in shapes:
            for d, v in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
                d.Clear()
                d.dim_value = v
    del light.graph.value_info[:]
    return light


def concrete_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Every tensor whose shape is fully known once the graph inputs' dynamic dims are fixed
    (the leading one to ``batch``, any other to :data:`onnxcompress.runtime.data.DEFAULT_DYNAMIC_DIM`).

    Shape inference runs on a weight-less copy; a failure gives ``{}`` (callers use defaults).
    """
    from onnxcompress.core.shapes import DEFAULT_DYNAMIC_DIM

    inits = {i.name for i in model.graph.initializer}
    fixed = {}
    for inp in model.graph.input:
        if inp.name not in inits:
            dims = inp.type.tensor_type.shape.dim
            fixed[inp.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                               batch if axis == 0 else DEFAULT_DYNAMIC_DIM for axis, d in enumerate(dims)]
    try:
        inferred = infer_shapes(with_concrete_inputs(model, fixed))
    except Exception as exc:
        log.debug("shape inference failed: %s", exc)
        return {}
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value > 0
                                                          for d in tt.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    return shapes


