"""Weights moved out of their protobuf into an unlinked temporary file and mapped back on demand.

protobuf frees a parsed model's memory only as a whole (one arena), so a graph that shares the
weights of a loaded ``ModelProto`` keeps all of it alive. :func:`spill` writes one tensor's bytes
to a :class:`SpillFile` (an unlinked temporary file: the disk space goes with the last reference)
and returns :class:`SpilledValues`, lazy values for a graphsurgeon constant that cost no memory
until read; reading maps the file (copy-on-write: pages are shared with the page cache and
dropped with the array, an in-place edit stays private). Only plain dense types (float, integer,
bool: the bytes are the numpy array's) are spilled; :func:`spillable` says which.

The field-by-field copy of protobuf messages without a field (:func:`copy_except`) lives here
too: it builds a tensor's header without touching its data.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import IO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper

__all__ = ["SpillFile", "SpilledValues", "copy_except", "copy_field", "header_of", "spill", "spillable"]

#: Element types whose raw bytes are the numpy array's (``numpy_helper.to_array`` is a plain view).
_PLAIN = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                    onnx.TensorProto.UINT64, onnx.TensorProto.BOOL})


def copy_field(src, dest, fd) -> None:
    """Copy field ``fd`` of protobuf message ``src`` into ``dest`` (repeated fields appended)."""
    if fd.is_repeated:
        getattr(dest, fd.name).extend(getattr(src, fd.name))
    elif fd.message_type is not None:
        if src.HasField(fd.name):
            getattr(dest, fd.name).CopyFrom(getattr(src, fd.name))
    elif src.HasField(fd.name) if fd.has_presence else True:
        setattr(dest, fd.name, getattr(src, fd.name))


def copy_except(src, dest, skip: frozenset[str]) -> None:
    """Copy every field of ``src`` but those named in ``skip`` into ``dest`` (which is not cleared)."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name not in skip:
            copy_field(src, dest, fd)


class SpillFile:
    """An unlinked temporary file that tensors' bytes are appended to (page-aligned, so each can
    be mapped on its own). Closed when the last :class:`SpilledValues` using it is gone."""

    def __init__(self) -> None:
        self.fh: IO[bytes] = tempfile.TemporaryFile(prefix="onnxcompress-weights-")  # noqa: SIM115 - lives with the values
        self.end = 0

    def append(self, data: bytes) -> int:
        """Write ``data`` at the next page boundary; returns its offset."""
        offset = -(-self.end // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        self.fh.seek(offset)
        self.fh.write(data)
        self.end = offset + len(data)
        return offset

    def flush(self) -> None:
        """Make the appended bytes visible to maps and reads."""
        self.fh.flush()


class SpilledValues(gs.ir.tensor.LazyValues):
    """Lazy values of a constant whose bytes are in a :class:`SpillFile`.

    ``header`` is the tensor without its data; ``tensor`` (what graphsurgeon's exporter reads) is a
    full ``TensorProto`` built from the file at each access; :meth:`load` maps the bytes.
    """

    def __init__(self, header: onnx.TensorProto, file: SpillFile, offset: int, length: int):
        from onnx_graphsurgeon.importers.onnx_importer import get_itemsize, get_onnx_tensor_dtype, get_onnx_tensor_shape

        self.header, self.file, self.offset, self.length = header, file, offset, length
        self.shape = get_onnx_tensor_shape(header)
        self.dtype = get_onnx_tensor_dtype(header)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * get_itemsize(self.dtype)

    @property
    def tensor(self) -> onnx.TensorProto:
        full = onnx.TensorProto()
        full.CopyFrom(self.header)
        full.raw_data = self.raw()
        return full

    def raw(self) -> bytes:
        """The tensor's bytes, read from the file."""
        return os.pread(self.file.fh.fileno(), self.length, self.offset)

    def load(self) -> np.ndarray:
        """The values as a writable array over a private map of the file (no copy is made)."""
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.header.data_type)
        mapped = mmap.mmap(self.file.fh.fileno(), self.length, access=mmap.ACCESS_COPY, offset=self.offset)
        return np.frombuffer(mapped, dtype=dtype).reshape(self.shape)


def header_of(values: gs.ir.tensor.LazyValues) -> onnx.TensorProto:
    """The ``TensorProto`` describing lazy ``values`` (type, dims) without reading a spilled tensor's data."""
    return values.header if isinstance(values, SpilledValues) else values.tensor


def spillable(tensor: onnx.TensorProto, min_bytes: int) -> bool:
    """Whether :func:`spill` takes ``tensor``: in-memory ``raw_data`` of a plain type, at least ``min_bytes``."""
    if tensor.data_type not in _PLAIN or not tensor.HasField("raw_data") or external_data_helper.uses_external_data(tensor):
        return False
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize >= max(1, min_bytes)


def spill(tensor: onnx.TensorProto, file: SpillFile) -> SpilledValues:
    """Append ``tensor``'s bytes to ``file`` and return lazy values reading them from there (call
    ``file.flush()`` before reading them); ``tensor`` is not modified."""
    header = onnx.TensorProto()
    copy_except(tensor, header, frozenset({"raw_data"}))
    data = tensor.raw_data
    offset = file.append(data)
    return SpilledValues(header, file, offset, len(data))
