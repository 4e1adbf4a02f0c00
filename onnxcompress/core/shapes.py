"""Shape inference, the one entry point for every layer: whole models, weight-free copies, graphs,
and the concrete shapes a model has once its symbolic input dims are fixed.

Symbolic input dims are resolved in one place, :func:`resolve_dims`: ``--dim`` values win, then the
shapes of the data's first batch (each dim name bound to the value seen), then defaults (1 for a
batch dim, :data:`DEFAULT_DYNAMIC_DIM` for any other, a guess that :meth:`Dims.warning` names).
The :class:`Dims` it returns carries each value's source, for logs, tables and JSON reports.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.shape_values import fill_shapes, full_shapes

__all__ = [
    "BATCH",
    "DEFAULT",
    "DEFAULT_BATCH",
    "DEFAULT_DYNAMIC_DIM",
    "GIVEN",
    "Dims",
    "SymbolicDim",
    "concrete_inputs",
    "concrete_shapes",
    "describe_dims",
    "dim_name",
    "infer_graph",
    "infer_shapes_filled",
    "infer_shapes",
    "light_model",
    "parse_dims",
    "resolve_dims",
    "shape_model",
    "symbolic_dims",
    "with_concrete_inputs",
]

log = logging.getLogger(__name__)



#: Symbolic dims other than batch dims take this value when neither ``--dim`` nor data gives one
#: (a guess: :meth:`Dims.warning` says so).
DEFAULT_DYNAMIC_DIM = 32
#: Batch dims (the leading axis of an input) take this value unless given: statistics are per sample.
DEFAULT_BATCH = 1
#: :attr:`Dims.sources` of a value given by the caller (``--dim``, ``dims=``).
GIVEN = "--dim"
#: :attr:`Dims.sources` of a guessed value (:data:`DEFAULT_DYNAMIC_DIM`).
DEFAULT = "default"
#: :attr:`Dims.sources` of a batch dim's :data:`DEFAULT_BATCH`.
BATCH = "batch"


def infer_shapes(model: onnx.ModelProto, *, types_only: bool = False) -> onnx.ModelProto:
    """Return a copy of ``model`` with inferred value_info.

    Uses onnx's inference with data propagation; where it leaves intermediate tensors without a
    shape (dynamic reshapes, unknown ops), falls back to onnxruntime's symbolic shape inference.
    ``types_only``: the caller reads element types alone, so the fallback runs only where a tensor
    has no element type (its sympy import and pure-Python pass cost ~0.5-1 s on an LSTM/CTC head).
    The input is never modified; on failure the best result so far is returned. Exception:
    above the 2 GB threshold (where onnx cannot serialize the model and a copy would double the
    memory) inference runs on a weight-less copy and its value_info is written into ``model``,
    which is returned.
    """
    if serde.weights_nbytes(model) > serde.EXTERNAL_THRESHOLD:
        return _infer_in_place(model)
    inferred = _onnx_inferred(model)
    if _all_typed(inferred) if types_only else _all_shaped(inferred):
        return inferred
    symbolic = _symbolic(inferred)
    return inferred if symbolic is None else symbolic


def _onnx_inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's inference with data propagation (a copy of ``model`` where it fails)."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        log.debug("onnx shape inference failed: %s", exc)
        return copy.deepcopy(model)


#: onnxruntime's symbolic shape inference module (a file of its ``tools`` folder).
_SYMBOLIC_MODULE = "onnxruntime.tools.symbolic_shape_infer"


@functools.cache
def _symbolic_inference() -> Any:
    """onnxruntime's ``SymbolicShapeInference`` class, or None (warned once) where it cannot load."""
    try:
        return _symbolic_module().SymbolicShapeInference
    except ImportError as exc:  # it needs sympy, a dependency of ours (onnxruntime no longer installs it)
        log.warning("onnxruntime's symbolic shape inference is unavailable (%s): shapes after com.microsoft "
                    "ops stay unknown", exc)
        return None


def _symbolic_module() -> Any:
    """The module of :data:`_SYMBOLIC_MODULE`, loaded from its file without running the
    ``onnxruntime.tools`` package's ``__init__``: that imports torch whenever torch is installed
    (seconds of start-up, several times the inference itself, for nothing used here)."""
    if _SYMBOLIC_MODULE in sys.modules:
        return sys.modules[_SYMBOLIC_MODULE]
    package = importlib.util.find_spec("onnxruntime")
    path = Path(package.origin).parent / "tools" / "symbolic_shape_infer.py" if package and package.origin else None
    if path is None or not path.is_file():
        return importlib.import_module(_SYMBOLIC_MODULE)
    spec = importlib.util.spec_from_file_location(_SYMBOLIC_MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_SYMBOLIC_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_SYMBOLIC_MODULE]
        raise
    return module


def _symbolic(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference (it knows the com.microsoft ops), or None."""
    inference = _symbolic_inference()
    if inference is None:
        return None
    try:
        return inference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception as exc:
        log.debug("symbolic shape inference failed: %s", exc)
        return None


def _gave_up(vi: onnx.ValueInfoProto) -> bool:
    """Whether onnx's inference left a dim of ``vi`` as one of its ``unk__N`` placeholders."""
    return any(d.dim_param.startswith("unk__") for d in vi.type.tensor_type.shape.dim)


def infer_shapes_filled(model: onnx.ModelProto, only: Collection[str] | None = None) -> onnx.ModelProto:
    """:func:`infer_shapes`, then, for the tensors onnx gave up on (``unk__N`` dims, e.g. after a
    ``Slice`` whose ends are computed, as in transformer position embeddings), the shapes of
    onnxruntime's symbolic inference where it finds them all. For MAC counting at concrete input
    dims; the passes keep :func:`infer_shapes`.

    Args:
        only: The tensors whose shapes the caller reads: symbolic inference (and its sympy import,
            seconds) runs only when neither onnx nor the shape arithmetic evaluated at these dims
            (:func:`~onnxcompress.core.shape_values.fill_shapes`) finds all of theirs (default: on any tensor).
            The shapes of these tensors are the same either way.
    """
    wanted = None if only is None else set(only)
    if wanted is not None and serde.weights_nbytes(model) <= serde.EXTERNAL_THRESHOLD:
        inferred = _onnx_inferred(model)
        missing = wanted - full_shapes(inferred).keys()
        if missing:
            fill_shapes(light_model(model), inferred, missing)
        if not wanted - full_shapes(inferred).keys():
            return inferred
    inferred = infer_shapes(model)
    if not any(_gave_up(vi) and (wanted is None or vi.name in wanted) for vi in inferred.graph.value_info):
        return inferred
    symbolic = _symbolic(inferred)
    if symbolic is None:
        return inferred
    found = {vi.name: vi for vi in symbolic.graph.value_info
             if all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    for vi in inferred.graph.value_info:
        if _gave_up(vi) and vi.name in found:
            vi.CopyFrom(found[vi.name])
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


def infer_graph(graph: gs.Graph, dims: Mapping[str, int] | None = None, *, types_only: bool = False
                ) -> onnx.ModelProto:
    """``infer_shapes(to_model(graph))`` without the weights: for reading shapes and types only.

    ``dims``: values of some symbolic input dims, by name (:meth:`Dims.known`), fixed on the graph's
    inputs before inference (the returned inputs carry them); other dims stay symbolic.

    Shape inference runs on :func:`shape_model` (big initializers as typed graph inputs; small and
    int64 rank-<=1 ones, which inference may need the values of, kept whole). The result has the
    graph's own inputs, the inferred ``value_info`` and outputs, and its initializers as headers
    (name, dims, data type): initializers over 1 KiB carry **no data**. Memory and time do not
    grow with the weights' size. ``graph`` is not modified. ``types_only``: see :func:`infer_shapes`.
    """
    light = shape_model(graph)
    inits = {i.name for i in light.graph.initializer}
    stubs = [vi for vi in light.graph.input if vi.name not in inits and vi.name not in _graph_input_names(graph)]
    if dims:
        _fix_dims([vi for vi in light.graph.input if vi.name in _graph_input_names(graph)], dims)
    inferred = infer_shapes(light, types_only=types_only)
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


def _fix_dims(inputs: list[onnx.ValueInfoProto], dims: Mapping[str, int]) -> None:
    """Set the symbolic dims named in ``dims`` on ``inputs`` (in place)."""
    for vi in inputs:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            name = "" if d.HasField("dim_value") and d.dim_value > 0 else dim_name(vi.name, axis, d.dim_param)
            if name in dims:
                d.Clear()
                d.dim_value = int(dims[name])


def _graph_input_names(graph: gs.Graph) -> set[str]:
    return {t.name for t in graph.inputs}


def _infer_in_place(model: onnx.ModelProto) -> onnx.ModelProto:
    stubs = {i.name for i in model.graph.initializer}
    inferred = infer_shapes(light_model(model))
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in stubs)
    return model


def _all_shaped(model: onnx.ModelProto) -> bool:
    return _all_known(model, lambda t: t.HasField("shape"))


def _all_typed(model: onnx.ModelProto) -> bool:
    return _all_known(model, lambda t: bool(t.elem_type))


def _all_known(model: onnx.ModelProto, known_in: Callable[[onnx.TypeProto.Tensor], bool]) -> bool:
    """Whether every node output is a graph input, initializer or output, or has value_info with
    ``known_in(tensor_type)``."""
    known = {v.name for v in model.graph.value_info if known_in(v.type.tensor_type)}
    known |= {v.name for v in model.graph.input} | {i.name for i in model.graph.initializer}
    known |= {v.name for v in model.graph.output}
    return all(out in known for node in model.graph.node for out in node.output if out)


# ---------------------------------------------------------------------------------- symbolic dims


@dataclass(frozen=True)
class SymbolicDim:
    """A symbolic dim of the graph inputs: its name (the ``dim_param``, or ``input[axis]`` when
    unnamed), whether it is a batch dim (the leading axis of some input) and where it occurs."""

    name: str
    batch: bool
    where: tuple[tuple[str, int], ...]


def dim_name(input_name: str, axis: int, param: str = "") -> str:
    """The name a symbolic dim goes by: its ``dim_param``, else ``input[axis]``."""
    return param or f"{input_name}[{axis}]"


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in inits]


def symbolic_dims(model: onnx.ModelProto) -> dict[str, SymbolicDim]:
    """The symbolic dims of ``model``'s inputs (initializer-backed inputs excluded), in order."""
    where: dict[str, list[tuple[str, int]]] = {}
    for inp in _real_inputs(model):
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                where.setdefault(dim_name(inp.name, axis, d.dim_param), []).append((inp.name, axis))
    return {n: SymbolicDim(n, any(axis == 0 for _, axis in w), tuple(w)) for n, w in where.items()}


def _default(sym: SymbolicDim) -> int:
    return DEFAULT_BATCH if sym.batch else DEFAULT_DYNAMIC_DIM


@dataclass(frozen=True)
class Dims:
    """The values a run gives the symbolic input dims, and where each came from.

    Attributes:
        values: Dim name -> value.
        sources: Dim name -> :data:`GIVEN` (``--dim`` / ``dims=``), the label of the data whose first
            batch gave it (``"--calib x.npz"``), :data:`BATCH` (a batch dim: statistics per sample)
            or :data:`DEFAULT` (guessed: :data:`DEFAULT_DYNAMIC_DIM`).
        batch: The names of the batch dims.
    """

    values: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    batch: frozenset[str] = frozenset()

    def guessed(self) -> dict[str, int]:
        """Non-batch dims that nothing set (their values are guesses: the default)."""
        return {n: v for n, v in self.values.items() if self.sources[n] == DEFAULT}

    def known(self) -> dict[str, int]:
        """Non-batch dims given or read from data (what shape tracing may rely on)."""
        return {n: v for n, v in self.values.items() if n not in self.batch and self.sources[n] not in (DEFAULT, BATCH)}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-ready form: ``{name: {"value": v, "source": s}}``."""
        return {n: {"value": v, "source": self.sources[n]} for n, v in self.values.items()}

    def describe(self) -> str:
        """``height=320, width=320 (from --calib x.npz); N=1 (batch: per sample)``; ``""`` without symbolic dims."""
        return describe_dims(self.as_dict())

    def warning(self, data: str = "--calib/--data") -> str | None:
        """The line to warn with when some non-batch dims are guessed (``data``: the options that
        give data), else ``None``."""
        guessed = self.guessed()
        if not guessed:
            return None
        listed = ", ".join(f"{n}={v}" for n, v in guessed.items())
        options = " ".join(f"--dim {n}=N" for n in guessed)
        return (f"symbolic input dim{'s' if len(guessed) > 1 else ''} {', '.join(guessed)} not set: guessing {listed} "
                f"(MACs, shapes and timings depend on them); set them with {options}, or give data ({data})")


def describe_dims(record: Mapping[str, Mapping[str, Any]]) -> str:
    """:meth:`Dims.describe` of a :meth:`Dims.as_dict` record (as JSON reports keep it)."""
    groups: dict[str, list[str]] = {}
    for name, d in sorted(record.items(), key=lambda item: item[1]["source"] == BATCH):  # batch dims last
        groups.setdefault(str(d["source"]), []).append(f"{name}={d['value']}")
    words = {GIVEN: "--dim", DEFAULT: "guessed", BATCH: "batch: per sample"}
    return "; ".join(f"{', '.join(items)} ({words.get(src, 'from ' + src)})" for src, items in groups.items())


def _seen_values(found: dict[str, SymbolicDim], seen: Mapping[str, Sequence[int]], seen_from: str) -> dict[str, int]:
    """Non-batch dim values in the data's input shapes ``seen``; inputs sharing a name must agree."""
    bound: dict[str, tuple[int, str]] = {}
    for sym in found.values():
        if sym.batch:
            continue
        for inp, axis in sym.where:
            shape = seen.get(inp)
            if shape is None or axis >= len(shape):
                continue
            value = int(shape[axis])
            if sym.name in bound and bound[sym.name][0] != value:
                raise InputError(f"symbolic dim {sym.name!r} is {bound[sym.name][0]} in input {bound[sym.name][1]!r} "
                                 f"but {value} in input {inp!r} ({seen_from}): inputs sharing a dim name must agree")
            bound[sym.name] = (value, inp)
    return {n: v for n, (v, _) in bound.items()}


def resolve_dims(model: onnx.ModelProto, given: Mapping[str, int] | None = None,
                 seen: Mapping[str, Sequence[int]] | None = None, seen_from: str = "data", *,
                 strict: bool = False) -> Dims:
    """The value of each symbolic input dim of ``model`` for a run: ``given`` (``--dim``) wins, then
    the data's input shapes ``seen`` (its first batch; batch dims are not read from data), then
    :data:`DEFAULT_BATCH` for batch dims and :data:`DEFAULT_DYNAMIC_DIM` for the others.

    Args:
        model: The model whose input dims are resolved.
        given: Values by dim name.
        seen: The shape of each input in the data, by input name.
        seen_from: Label of the data (``"--calib x.npz"``), recorded as the source.
        strict: Refuse names in ``given`` that are not symbolic dims of ``model``.

    Raises:
        InputError: One line: inputs sharing a dim name disagree in the data, or (``strict``) an
            unknown name in ``given``.
    """
    given = dict(given or {})
    found = symbolic_dims(model)
    unknown = sorted(set(given) - set(found))
    if strict and unknown:
        listed = ", ".join(found) or "none"
        raise InputError(f"--dim {unknown[0]}: the model has no symbolic input dim {unknown[0]!r} (its symbolic dims: {listed})")
    data = _seen_values(found, seen, seen_from) if seen else {}
    values, sources = {}, {}
    for name, sym in found.items():
        if name in given:
            values[name], sources[name] = int(given[name]), GIVEN
            if name in data and data[name] != values[name]:
                log.warning("--dim %s=%d differs from the %d of %s: shapes and MACs use %d",
                            name, values[name], data[name], seen_from, values[name])
        elif name in data:
            values[name], sources[name] = data[name], seen_from
        else:
            values[name], sources[name] = _default(sym), BATCH if sym.batch else DEFAULT
    return Dims(values, sources, frozenset(n for n, s in found.items() if s.batch))


def parse_dims(items: Iterable[str]) -> dict[str, int]:
    """Parse ``NAME=VALUE`` strings (``--dim batch=4``).

    Raises:
        InputError: Malformed item or non-positive value.
    """
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) <= 0:
            raise InputError(f"--dim {item!r}: expected NAME=POSITIVE_INT")
        dims[name.strip()] = int(value)
    return dims


def concrete_inputs(model: onnx.ModelProto, dims: Mapping[str, int] | Dims | None = None,
                    batch: int | None = None) -> dict[str, list[int]]:
    """Concrete shape of each graph input: symbolic dims from ``dims`` by name (a :class:`Dims` or
    a mapping), else :data:`DEFAULT_BATCH` for batch dims and :data:`DEFAULT_DYNAMIC_DIM` for the
    others; ``batch`` (if given) sets every batch dim whatever ``dims`` says."""
    values = dims.values if isinstance(dims, Dims) else dict(dims or {})
    found = symbolic_dims(model)
    out = {}
    for inp in _real_inputs(model):
        shape = []
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
                continue
            sym = found[dim_name(inp.name, axis, d.dim_param)]
            if batch is not None and sym.batch:
                shape.append(int(batch))
            else:
                shape.append(int(values.get(sym.name, _default(sym))))
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


def concrete_shapes(model: onnx.ModelProto, dims: Mapping[str, int] | Dims | None = None,
                    batch: int | None = None, *, filled: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor whose shape is fully known once the graph inputs' symbolic dims are fixed as
    :func:`concrete_inputs` fixes them (``dims`` by name, ``batch`` for batch dims, else the defaults).

    Shape inference runs on a weight-less copy; a failure gives ``{}``. ``filled``: with
    :func:`infer_shapes_filled` (onnxruntime's symbolic inference where onnx gives up, e.g. after
    a transformer's computed position ``Slice``).
    """
    try:
        infer = infer_shapes_filled if filled else infer_shapes
        inferred = infer(with_concrete_inputs(model, concrete_inputs(model, dims, batch)))
    except Exception as exc:
        log.debug("shape inference failed: %s", exc)
        return {}
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value > 0 for d in tt.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
    return shapes
