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


def test_license_file_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_version_defined_once():
    """pyproject reads the version from onnxcompress/_version.py; nothing else spells it."""
    from onnxcompress import __version__
    from onnxcompress._version import __version__ as defined

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"] and "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "onnxcompress._version.__version__"}
    assert __version__ == defined
    spelled = [p for p in (ROOT / "onnxcompress").rglob("*.py")
               if f'"{defined}"' in p.read_text() and p.name != "_version.py"]
    assert not spelled, spelled


def test_typed_marker_ships():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (ROOT / "onnxcompress" / "py.typed").exists()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["onnxcompress"]


def test_recipes_found_from_a_source_checkout(monkeypatch):
    """Without the installed data package (tests import the checkout), the checkout's passes/ is used."""
    from importlib import resources

    from onnxcompress.pipeline import recipes

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(resources, "files", missing)
    assert recipes.builtin_recipes()["default"] == ROOT / "passes" / "default.toml"
