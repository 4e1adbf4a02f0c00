"""Atomic writes of non-model files (JSON reports, Markdown, PNG); models go through :mod:`serde`."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxcompress.core.errors import InputError

__all__ = ["atomic_write"]


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
