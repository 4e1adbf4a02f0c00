"""Where the fixture models and digits splits live, shared by the benchmark scripts."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["ROOT", "CALIB", "TEST", "MODELS", "missing_data", "select_models"]

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "models" / "digits_calib.npz"
TEST = ROOT / "models" / "digits_test.npz"
MODELS = {name: ROOT / "models" / f"{name}_digits.onnx" for name in ("resnet", "mobilenetv2", "vgg", "concat")}


def missing_data() -> list[str]:
    """The digits split files that do not exist (run scripts/make_models.py to create them)."""
    return [str(f) for f in (CALIB, TEST) if not f.exists()]


def select_models(names: str) -> tuple[list[tuple[str, Path]], list[str]]:
    """``(found (name, path) pairs, skipped names)`` for a comma-separated list; skips are reported on stderr."""
    found, skipped = [], []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        path = MODELS.get(name)
        if path is None or not path.exists():
            skipped.append(name)
            print(f"skipping {name}: {path or 'unknown model'} not found", file=sys.stderr)
        else:
            found.append((name, path))
    return found, skipped
