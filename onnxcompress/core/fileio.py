"""Atomic writes of non-model files (JSON reports, Markdown, PNG; models go through :mod:`serde`),
TOML reading, file records (path, sha256, size) that let reports tell which file a run read, and
``.npy``/``.npz`` arrays read a few rows at a time (:func:`array_rows`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxcompress.core.errors import InputError

__all__ = ["ROWS_BYTES", "array_rows", "array_row_shapes", "atomic_write", "read_toml", "FileRecord", "sha256_file", "file_record"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Write through ``write(binary file)`` into a temporary file in the folder, then rename.

    A failure leaves no file behind; the result gets the usual permissions (``0666 & ~umask``).

    Raises:
        InputError: The folder does not exist or is not writable.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{folder}: folder does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxcompress-", dir=folder)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise


def read_toml(path: Path) -> dict:
    """Parse a TOML file.

    Raises:
        InputError: Unreadable file or invalid TOML.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text())
    except Exception as exc:
        raise InputError(f"{path}: invalid TOML ({exc})") from None


@dataclass(frozen=True)
class FileRecord:
    """Which file a run used: its path, the sha256 of its bytes and its size; for a model with
    external data, the data files' names (their bytes are not hashed: the ``.onnx`` file holds
    their names, offsets and lengths)."""

    path: str | None
    sha256: str
    bytes: int
    external_data: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "external_data": list(self.external_data)}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[str, int]:
    """``(sha256 hex digest, size in bytes)`` of a file, read in ``chunk``-byte pieces (constant memory).

    Raises:
        InputError: The file cannot be read.
    """
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
                size += len(block)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest(), size


def file_record(path: str | os.PathLike, external_data: Sequence[str] = ()) -> FileRecord:
    """The :class:`FileRecord` of a file on disk, hashed by streaming it (:func:`sha256_file`)."""
    digest, size = sha256_file(path)
    return FileRecord(str(path), digest, size, tuple(external_data))


#: Bytes of rows (all arrays together) :func:`array_rows` reads at a time.
ROWS_BYTES = 32 * 2**20


def array_rows(path: str | os.PathLike, chunk_bytes: int | None = None,
               ranks: dict[str, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The arrays of an ``.npz`` file (keyed as ``np.load`` keys them) or of an ``.npy`` file (key
    ``""``), a few leading-axis rows at a time: each dict holds the same rows of every array, about
    ``chunk_bytes`` (default :data:`ROWS_BYTES`) in all, so a file larger than memory is read in constant memory. Arrays that
    cannot be cut that way (scalars, Fortran order, objects, leading axes of different lengths, or
    an array named in ``ranks`` with another rank: a single sample stored without its sample axis)
    come whole, in one dict. The rows are the file's bytes, in order (concatenated, the chunks equal
    ``np.load``'s arrays).

    Raises:
        OSError, ValueError, zipfile.BadZipFile: The file cannot be read as numpy arrays.
    """
    chunk_bytes = ROWS_BYTES if chunk_bytes is None else chunk_bytes
    with _handles(path) as (handles, whole):
        heads = _row_heads(handles, ranks or {})
        if heads is None:
            yield whole()
            return
        count = next(iter(heads.values()))[0][0]
        row_bytes = {k: int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize for k, (shape, _, dtype) in heads.items()}
        step = max(1, chunk_bytes // max(1, sum(row_bytes.values())))
        for start in range(0, max(count, 1), step):
            rows = min(step, count - start)
            yield {k: _read_rows(handles[k], rows, shape, dtype) for k, (shape, _, dtype) in heads.items()}


def array_row_shapes(path: str | os.PathLike,
                     ranks: dict[str, int] | None = None) -> tuple[int, dict[str, tuple[int, ...]]] | None:
    """``(rows, {key: shape of one row})``: the number of leading-axis rows :func:`array_rows` would
    cut the file into and the shape of a row of each array, read from the arrays' headers alone (no
    data read); ``None`` when the file comes whole (see there).

    Raises:
        OSError, ValueError, zipfile.BadZipFile: The file cannot be read as numpy arrays.
    """
    with _handles(path) as (handles, _whole):
        heads = _row_heads(handles, ranks or {})
    if heads is None:
        return None
    return int(next(iter(heads.values()))[0][0]), {k: tuple(shape[1:]) for k, (shape, _, _) in heads.items()}


@contextlib.contextmanager
def _handles(path: str | os.PathLike) -> Iterator[tuple[dict[str, Any], Callable[[], dict[str, np.ndarray]]]]:
    """Open streams of the file's arrays (keyed as :func:`array_rows` keys them) and a reader of
    the whole file."""
    if Path(path).suffix == ".npy":
        with open(path, "rb") as fh:
            yield {"": fh}, lambda: {"": np.load(path, allow_pickle=False)}
        return
    with zipfile.ZipFile(path) as zf, contextlib.ExitStack() as stack:
        members = {n[:-4] if n.endswith(".npy") else n: zf.getinfo(n) for n in zf.namelist()}
        handles = {key: stack.enter_context(_stored(path, info) or zf.open(info)) for key, info in members.items()}
        yield handles, lambda: _load_npz(path)


#: Size of a zip local file header before its name and extra field (the zip format's APPNOTE, 4.3.7).
_LOCAL_HEADER = 30


def _stored(path: str | os.PathLike, info: zipfile.ZipInfo) -> Any | None:
    """A plain file positioned at the data of the uncompressed, unencrypted member ``info`` (read
    without zipfile's per-read overhead and CRC pass: ~20x faster on calibration images), or
    ``None`` for another kind of member. Readers stop at the member's end by the ``.npy`` header's
    size, so nothing past it is read."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller's ExitStack
    try:
        fh.seek(info.header_offset)
        local = fh.read(_LOCAL_HEADER)
        if len(local) != _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {info.filename}")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        fh.seek(info.header_offset + _LOCAL_HEADER + name_len + extra_len)
    except BaseException:
        fh.close()
        raise
    return fh


def _load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _row_heads(handles: dict[str, Any], ranks: dict[str, int]) -> dict[str, tuple] | None:
    """Every array's ``(shape, fortran, dtype)`` header if all can be cut by rows alike, else ``None``."""
    found = {key: _npy_header(fh) for key, fh in handles.items()}
    heads = {k: h for k, h in found.items() if h is not None}
    lengths = {shape[0] if shape else -1 for shape, _, _ in heads.values()}
    if not heads or len(heads) < len(found) or len(lengths) != 1 or -1 in lengths or \
            any(fortran or dtype.hasobject for _, fortran, dtype in heads.values()) or \
            any(len(heads[k][0]) != rank for k, rank in ranks.items() if k in heads):
        return None
    return heads


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` stream; ``None`` for a format version this
    reader leaves to ``np.load`` (3.0: UTF-8 field names)."""
    version = np.lib.format.read_magic(fh)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    return None if read is None else read(fh)


def _read_rows(fh, rows: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    out = np.empty((rows, *shape[1:]), dtype=dtype)
    view, done = out.reshape(-1).view(np.uint8).data, 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise ValueError(f"array data ends after {done} of {len(view)} bytes")
        done += got
    return out
