"""The one boundary to protobuf: load, check, save, and convert to/from graphsurgeon graphs.

Everything else in onnxcompress works on :class:`onnx_graphsurgeon.Graph` objects and numpy arrays.
Loading refuses what it cannot trust (not a file, not a model, external data outside the model's
folder, unknown operator domains) with an :class:`~onnxcompress.core.errors.InputError`; saving is
atomic (a temporary file in the destination folder, then a rename) and switches to external data
when the weights would not fit in a 2 GB protobuf.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import FileRecord
from onnxcompress.core.graph import relazy_lowbit
from onnxcompress.core.spill import SpilledValues, SpillFile, copy_except, copy_field, header_of, spill, spillable

__all__ = [
    "ModelSource", "KNOWN_DOMAINS", "MIN_OPSET", "PROTO_LIMIT", "EXTERNAL_THRESHOLD", "size_limits", "load_model",
    "load_model_file", "save_model", "saves_external", "check_model", "to_graph", "to_model", "detach_weights",
    "weights_nbytes", "tensor_nbytes", "model_opset", "skeleton_model",
]

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike | bytes | onnx.ModelProto

#: Operator domains whose ops onnxruntime's CPU provider knows.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})
#: Oldest default-domain opset we accept.
MIN_OPSET = 7
#: Protobuf's hard limit; above ~this many bytes of weights a model must use external data.
PROTO_LIMIT = 2**31 - 1
#: Above this many bytes of weights a model is saved, inferred and run from external data.
EXTERNAL_THRESHOLD = int(1.8 * 2**30)
#: From this many bytes of weights :func:`check_model` checks a weight-less copy on disk (craftnet,
#: 83 MB: its `fold_bn` run 2.3 -> 1.8 s and 528 -> 490 MB peak against checking in memory).
_CHECK_BY_PATH = 16 * 2**20


@contextlib.contextmanager
def size_limits(*, proto: int | None = None, external: int | None = None,
                check_by_path: int | None = None) -> Iterator[None]:
    """Use other size thresholds (bytes of weights) inside the block: :data:`PROTO_LIMIT`,
    :data:`EXTERNAL_THRESHOLD` and the check-by-path size of :func:`check_model` (``None`` keeps
    one). Lowered, they run the over-2-GB code paths on a small model, as the tests do."""
    global PROTO_LIMIT, EXTERNAL_THRESHOLD, _CHECK_BY_PATH
    saved = PROTO_LIMIT, EXTERNAL_THRESHOLD, _CHECK_BY_PATH
    PROTO_LIMIT = PROTO_LIMIT if proto is None else proto
    EXTERNAL_THRESHOLD = EXTERNAL_THRESHOLD if external is None else external
    _CHECK_BY_PATH = _CHECK_BY_PATH if check_by_path is None else check_by_path
    try:
        yield
    finally:
        PROTO_LIMIT, EXTERNAL_THRESHOLD, _CHECK_BY_PATH = saved


def load_model(source: ModelSource, *, check: bool = True) -> onnx.ModelProto:
    """Load and sanity-check a model from a path, serialized bytes, or a ``ModelProto``.

    External data is loaded only from files inside the model's own folder.

    Args:
        source: A path to an ``.onnx`` file, its bytes, or a ``ModelProto`` (deep-copied).
        check: Run ``onnx.checker`` (without shape inference) and the domain/opset checks.

    Returns:
        The model with all weights in memory.

    Raises:
        InputError: The source is missing, unreadable, not an ONNX model, or not supported.
    """
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
    elif isinstance(source, (bytes, bytearray)):
        model = _parse(bytes(source), "<bytes>")
    else:
        model = _load_path(Path(source))[0]
    if check:
        _check_supported(model)
    return model


def load_model_file(path: str | os.PathLike, *, check: bool = True) -> tuple[onnx.ModelProto, FileRecord]:
    """:func:`load_model` of a path, with the file's :class:`FileRecord`: the sha256 of the bytes read
    to load it (one read, no second load) and the names of its external data files."""
    model, record = _load_path(Path(path))
    if check:
        _check_supported(model)
    return model, record


def _load_path(path: Path) -> tuple[onnx.ModelProto, FileRecord]:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise InputError(f"{path}: empty file")
    model = _parse(data, str(path))
    digest, size = hashlib.sha256(data).hexdigest(), len(data)
    del data
    return model, FileRecord(str(path), digest, size, tuple(_load_external(model, path.parent)))


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{name}: not an ONNX model (protobuf parse failed: {exc})") from None
    if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
        raise InputError(f"{name}: not an ONNX model (no graph, ir_version or opset_import)")
    return model


def _external_tensors(model: onnx.ModelProto):
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            yield tensor


def _load_external(model: onnx.ModelProto, base: Path) -> list[str]:
    """Resolve external data, refusing any location outside ``base`` (no reads happen first);
    returns the data files' names."""
    tensors = list(_external_tensors(model))
    root, locations = base.resolve(), set[str]()
    for tensor in tensors:
        loc = external_data_helper.ExternalDataInfo(tensor).location
        locations.add(loc)
        if not loc or os.path.isabs(loc) or Path(loc).drive:
            raise InputError(f"tensor {tensor.name!r}: external data location {loc!r} is not a relative path")
        target = (root / loc).resolve()
        if root != target and root not in target.parents:
            raise InputError(f"tensor {tensor.name!r}: external data location {loc!r} points outside the model's folder")
        if not target.is_file():
            raise InputError(f"tensor {tensor.name!r}: external data file {loc!r} not found next to the model")
    try:
        if tensors:
            external_data_helper.load_external_data_for_model(model, str(root))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load external data: {exc}") from None
    return sorted(locations)


def _check_supported(model: onnx.ModelProto) -> None:
    _check_opset(model)
    local = {f.domain for f in model.functions}
    for node in _all_nodes(model.graph):
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise InputError(f"node {node.name or node.op_type!r}: unknown operator domain {node.domain!r}")
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS):
                raise InputError(f"node {node.name or node.op_type!r}: type-valued attribute {attr.name!r} is not supported")
    for value in _all_values(model.graph):
        if _has_optional(value.type):
            raise InputError(f"value {value.name!r}: optional types are not supported")
    _check_io_ranks(model.graph)
    try:
        check_model(model, full=False)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model fails the ONNX checker: {first}") from None


def _check_opset(model: onnx.ModelProto) -> None:
    opset = model_opset(model)
    if opset is None:
        if any(n.domain in ("", "ai.onnx") for n in _all_nodes(model.graph)):
            raise InputError("model imports no default-domain (ai.onnx) opset")
    elif opset < MIN_OPSET:
        raise InputError(f"opset {opset} is too old (onnxcompress supports opset >= {MIN_OPSET})")


def _check_io_ranks(graph: onnx.GraphProto) -> None:
    """Graph inputs and outputs need a rank (the checker requires a shape field): name the first without."""
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape"):
                raise InputError(f"graph {kind} {value.name!r} has unknown rank (no shape); give it one "
                                 "(e.g. onnx.tools.update_model_dims) or re-export the model")


def _has_optional(tp: onnx.TypeProto) -> bool:
    kind = tp.WhichOneof("value")
    if kind == "optional_type":
        return True
    if kind == "sequence_type":
        return _has_optional(tp.sequence_type.elem_type)
    if kind == "map_type":
        return _has_optional(tp.map_type.value_type)
    return False


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                yield from _all_graphs(sub)


def _all_values(graph: onnx.GraphProto):
    for g in _all_graphs(graph):
        yield from g.input
        yield from g.output
        yield from g.value_info


def _all_nodes(graph: onnx.GraphProto):
    for g in _all_graphs(graph):
        yield from g.node


def model_opset(model: onnx.ModelProto) -> int | None:
    """The model's default-domain opset version, or ``None`` if it imports none."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def weights_nbytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data (in memory or external) of the main graph."""
    total = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize if init.data_type else 0
    return total


def check_model(model: onnx.ModelProto, *, full: bool = True) -> None:
    """Run ``onnx.checker`` (with shape inference when ``full``), also on models over 2 GB.

    From :data:`_CHECK_BY_PATH` bytes of weights (and always above 2 GB, where a proto cannot be
    serialized) the checker is given a path: the graph is written with every initializer over
    1 KiB as external data in a *sparse* file of the right size. The checker validates names,
    types, shapes and locations, never weight values, so no weight is copied or written (checking
    in memory would serialize the model and have onnx parse it again: three copies of the
    weights); small initializers (shape constants) stay inline for shape inference. ``model`` is
    not modified.

    Raises:
        onnx.checker.ValidationError: The model is invalid.
    """
    if weights_nbytes(model) < min(_CHECK_BY_PATH, EXTERNAL_THRESHOLD):
        onnx.checker.check_model(model, full_check=full)
        return
    with tempfile.TemporaryDirectory(prefix="onnxcompress-check-") as tmp:
        path = Path(tmp) / "model.onnx"
        _write_external(model, path, data=False)
        onnx.checker.check_model(str(path), full_check=full)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external: bool | None = None,
               protect: str | os.PathLike | None = None) -> Path:
    """Write ``model`` atomically; with external data when asked or when it must.

    Args:
        model: The model (not modified).
        path: Destination ``.onnx`` path. Its external data, if any, goes to ``<name>.data`` beside it.
        external: Force external data on/off; ``None`` decides from the weights' size.
        protect: A path that must not be overwritten (the input model).

    Returns:
        The destination path.

    Raises:
        InputError: The destination is the protected input, or its folder is missing or not writable.
    """
    dest = Path(path)
    if protect is not None and dest.exists() and dest.resolve() == Path(protect).resolve():
        raise InputError(f"{dest}: output path is the input model; choose another output")
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder does not exist")
    if dest.is_dir():
        raise InputError(f"{dest}: is a directory")
    external = saves_external(model, external)
    try:
        tmpdir = tempfile.mkdtemp(prefix=".onnxcompress-", dir=folder)
    except OSError as exc:
        raise InputError(f"{folder}: output folder not writable ({exc.strerror})") from None
    try:
        tmp = Path(tmpdir) / dest.name
        _write(model, tmp, external=external)
        data = tmp.with_name(dest.name + ".data")
        if data.exists():
            os.replace(data, dest.with_name(dest.name + ".data"))
        os.replace(tmp, dest)
    except OSError as exc:
        raise InputError(f"{dest}: cannot write ({exc.strerror})") from None
    finally:
        for leftover in Path(tmpdir).glob("*"):
            leftover.unlink()
        os.rmdir(tmpdir)
    return dest


def saves_external(model: onnx.ModelProto, external: bool | None = None) -> bool:
    """Whether :func:`save_model` (given ``external``) writes the weights to ``<name>.data``."""
    return weights_nbytes(model) > EXTERNAL_THRESHOLD if external is None else external


def _write(model: onnx.ModelProto, path: Path, *, external: bool) -> None:
    if not external:
        with open(path, "wb") as fh:
            fh.write(model.SerializeToString())
        return
    _write_external(model, path, data=True)


#: Initializers smaller than this stay inline when saving with external data.
INLINE_BYTES = 1024
#: External data offsets are aligned to this (lets onnxruntime map the file instead of copying).
_ALIGN = 4096
_TENSOR_HEADER = ("name", "dims", "data_type", "doc_string", "metadata_props")


def _write_external(model: onnx.ModelProto, path: Path, *, data: bool) -> None:
    """Write ``model`` to ``path`` with its main-graph initializers over 1 KiB in ``<name>.data``.

    The model is not modified and no second copy of its weights is built: a weight-less skeleton
    is serialized and each initializer's bytes are streamed to the data file one at a time
    (protobuf's arenas never give memory back, so moving weights out of the protos and reading
    them back, as ``onnx.save_model`` does, would grow the process by the weights' size).
    With ``data=False`` the data file is sparse (right size, no bytes written): for the checker.
    """
    skeleton = skeleton_model(model)
    location = path.name + ".data"
    offset = 0
    with open(path.with_name(location), "wb") as fh:
        for init in model.graph.initializer:
            if tensor_nbytes(init) < INLINE_BYTES or init.data_type == onnx.TensorProto.STRING \
                    or external_data_helper.uses_external_data(init):
                skeleton.graph.initializer.add().CopyFrom(init)
                continue
            offset = -(-offset // _ALIGN) * _ALIGN
            nbytes = _append_external(init, skeleton.graph.initializer.add(), location, offset, fh if data else None)
            offset += nbytes
        fh.truncate(offset)
    with open(path, "wb") as fh:
        fh.write(skeleton.SerializeToString())


def _append_external(init: onnx.TensorProto, dest: onnx.TensorProto, location: str, offset: int, fh) -> int:
    """Fill ``dest`` with ``init``'s header and an external reference; write the bytes if ``fh``."""
    for name in _TENSOR_HEADER:
        if name in init.DESCRIPTOR.fields_by_name:
            copy_field(init, dest, init.DESCRIPTOR.fields_by_name[name])
    raw = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
    if fh is not None:
        fh.seek(offset)
        fh.write(raw)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = dest.external_data.add()
        entry.key, entry.value = key, value
    dest.data_location = onnx.TensorProto.EXTERNAL
    return len(raw)


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of ``tensor``'s values from its dims and type (0 when the type is unknown), wherever they are stored."""
    if not tensor.data_type:
        return 0
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 0
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize if tensor.dims else itemsize


def skeleton_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the main graph's initializers (everything else is copied).

    Copies field by field: building it never touches, copies or moves the weights.
    """
    skeleton = onnx.ModelProto()
    copy_except(model, skeleton, frozenset({"graph"}))
    copy_except(model.graph, skeleton.graph, frozenset({"initializer"}))
    return skeleton


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into an onnx-graphsurgeon graph (weights are shared, not copied)."""
    return gs.import_onnx(model)


def detach_weights(graph: gs.Graph) -> int:
    """Make ``graph`` independent of the ``ModelProto`` it was imported from; returns tensors moved.

    :func:`to_graph` shares the model's weights: every constant's lazy values point into the
    model's protobuf arena, and the graph's ``import_domains`` are the model's own repeated field,
    so while the graph lives, the whole model does (protobuf frees an arena only as a whole). Here
    each lazily loaded tensor of at least 1 MiB and a plain type is written to an unlinked
    temporary file (:mod:`onnxcompress.core.spill`: read back through a map, so it costs no memory
    until read), any other one copied into a standalone message (its own arena), and the opset
    imports are copied, in the graph, its subgraphs, its functions and node attributes. Values stay
    lazy, so exporting the graph gives the same bytes as before. Costs one tensor at a time while the
    model is alive; only worth it when the caller drops the model right after.
    """
    moved, file = 0, None
    for g in _graphs_and_functions(graph):
        if g.import_domains is not None:
            g.import_domains = [_standalone(d) for d in g.import_domains]
        for tensor in _constants_of(g):
            values = tensor._values
            if not isinstance(values, gs.ir.tensor.LazyValues) or isinstance(values, (_Header, SpilledValues)):
                continue
            if spillable(values.tensor, _BIG_CONSTANT):
                file = file or SpillFile()
                tensor._values = spill(values.tensor, file)
            else:
                tensor._values = type(values)(_standalone(values.tensor))
            moved += 1
    if file is not None:
        file.flush()
    return moved


def _standalone(message):
    """A copy of a protobuf message in its own arena."""
    copy_ = type(message)()
    copy_.CopyFrom(message)
    return copy_


def _graphs_and_functions(graph: gs.Graph):
    seen: set[int] = set()
    for top in [graph, *getattr(graph, "functions", [])]:
        for g in [top, *top.subgraphs(recursive=True)]:
            if id(g) not in seen:
                seen.add(id(g))
                yield g


def _constants_of(graph: gs.Graph):
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            yield tensor
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant):
                yield value


def to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph back to a model, keeping the template's IR version and metadata.

    Args:
        graph: The graph to export.
        template: The model the graph came from; its ``ir_version``, producer, doc string,
            model version and metadata are carried over.
    """
    relazy_lowbit(graph)
    with weights_set_aside(graph) as big:
        model = gs.export_onnx(graph, do_type_check=False)
    _fill_weights(model, big)
    if template is not None:
        model.ir_version = template.ir_version
        listed = {i.name for i in model.graph.input}
        if model.ir_version < 4 and any(t.name not in listed for t in model.graph.initializer):
            model.ir_version = 4  # IR < 4 requires every initializer to be a graph input
        if model.ir_version < 10 and any(t.data_type in _IR10_TYPES for t in model.graph.initializer):
            model.ir_version = 10  # int4/uint4 tensors need IR 10
        model.producer_name = template.producer_name
        model.producer_version = template.producer_version
        model.domain = template.domain
        model.model_version = template.model_version
        model.doc_string = template.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(template.metadata_props)
    return model


#: Element types IR 10 introduced.
_IR10_TYPES = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4})

#: Constants at least this big are exported by :func:`to_model` with a single copy.
_BIG_CONSTANT = 1 << 20


@contextlib.contextmanager
def weights_set_aside(graph: gs.Graph, *, min_bytes: int = _BIG_CONSTANT, keep_int64: bool = False):
    """Swap every big constant's values for a data-less header while the graph is exported.

    ``gs.export_onnx`` copies each initializer three times (its list, ``make_graph``,
    ``make_model``); protobuf's arenas keep all of it until the model dies. Exporting headers and
    then writing each weight once into the final model (:func:`_fill_weights`) copies it once.
    Constants under ``min_bytes`` (and, with ``keep_int64``, int64 ones of rank <= 1) keep their
    values. Yields ``{name: original values}``; the graph is restored on exit.
    """
    big: dict[str, object] = {}
    swapped: list[tuple[gs.Constant, object]] = []
    try:
        for tensor in _big_constants(graph, min_bytes, keep_int64):
            header = onnx.TensorProto(name=tensor.name, dims=list(tensor.shape), data_type=_onnx_dtype(tensor))
            swapped.append((tensor, tensor._values))
            big[tensor.name] = tensor._values
            tensor._values = _Header(header, tensor._values)
        yield big
    finally:
        for tensor, values in swapped:
            tensor._values = values


class _Header(gs.ir.tensor.LazyValues):
    """Stands in for a constant's values during export: shape and dtype, no data."""

    def __init__(self, header: onnx.TensorProto, values):
        self.tensor, self.shape, self.nbytes = header, tuple(header.dims), getattr(values, "nbytes", 0)
        self.dtype = values.dtype


def _big_constants(graph: gs.Graph, min_bytes: int, keep_int64: bool):
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, gs.ir.tensor.SparseValues):
            continue
        values = tensor._values
        if isinstance(values, SpilledValues):
            ok = True  # exported with a header, always (its ``tensor`` is read from the file)
        elif isinstance(values, gs.ir.tensor.LazyValues):
            ok = values.tensor.HasField("raw_data") and not external_data_helper.uses_external_data(values.tensor)
        else:
            ok = isinstance(values, np.ndarray) and tensor.data_location in (None, onnx.TensorProto.DEFAULT) \
                and _onnx_dtype(tensor) is not None and _exported_as_is(tensor)
        if not ok or (getattr(values, "nbytes", 0) < min_bytes and not isinstance(values, SpilledValues)):
            continue
        if keep_int64 and _onnx_dtype(tensor) == onnx.TensorProto.INT64 and len(values.shape) <= 1:
            continue
        yield tensor


def _exported_as_is(tensor: gs.Constant) -> bool:
    """Whether graphsurgeon would export ``tensor``'s array without converting it (no bfloat16 etc.)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    try:
        return dtype_to_onnx(tensor.export_dtype) == dtype_to_onnx(tensor.dtype)
    except Exception:
        return False


def _onnx_dtype(tensor: gs.Constant) -> int | None:
    values = tensor._values
    if isinstance(values, gs.ir.tensor.LazyValues):
        return header_of(values).data_type
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    except (KeyError, ValueError, TypeError):
        return None


def _fill_weights(model: onnx.ModelProto, big: dict[str, object]) -> None:
    """Write the set-aside values into ``model``'s initializer headers, one tensor at a time."""
    if not big:
        return
    for init in model.graph.initializer:
        values = big.get(init.name)
        if values is None:
            continue
        if isinstance(values, SpilledValues):
            init.raw_data = values.raw()
        elif isinstance(values, gs.ir.tensor.LazyValues):
            init.raw_data = values.tensor.raw_data
        else:
            init.raw_data = np.ascontiguousarray(values).tobytes()


