"""The wheel ships every subpackage and the recipes (pyproject lists packages explicitly)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "onnxcompress").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"
    assert "onnxcompress._recipes" in listed


def test_builtin_recipes_found():
    from onnxcompress.pipeline.recipes import builtin_recipes

    assert "default" in builtin_recipes()
