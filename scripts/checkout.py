"""The environment for child processes that must run this checkout's onnxcompress.

``python -m onnxcompress`` in a child imports whatever is first on ``sys.path``: with the project
installed without ``-e`` (as README's quick start does), that is the installed copy, not the code
beside the script. Scripts that measure or fingerprint the tool pass :func:`env` to their children.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ROOT", "env"]

#: The checkout this script belongs to.
ROOT = Path(__file__).resolve().parents[1]


def env(root: Path = ROOT, **extra: str) -> dict[str, str]:
    """``os.environ`` with ``root`` first on ``PYTHONPATH`` (and ``extra`` variables set)."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
