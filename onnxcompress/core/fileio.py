"""Atomic writes of non-model files (JSON reports, Markdown, PNG; models go through :mod:`serde`),
TOML reading, and file records (path, sha256, size) that let reports tell which file a run read."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcompress.core.errors import InputError

__all__ = ["atomic_write", "read_toml", "FileRecord", "sha256_file", "file_record"]


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
