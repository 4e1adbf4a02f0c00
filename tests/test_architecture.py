"""The house rules, checked on the source tree: the layer contract, no import cycles, ruff, module
and function size, ``__all__`` in every module, and a static type check of ``core`` and ``pipeline``.

The layer contract itself is in ``pyproject.toml`` (``[tool.importlinter]``) and README
"Architecture" draws it.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "onnxcompress"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _tool(name: str) -> str:
    found = shutil.which(name) or (Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed (pip install '.[test]')")
    return str(found)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # analyse this checkout, not an installed copy
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def test_layer_contract():
    proc = _run([_tool("lint-imports"), "--no-cache"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports (anywhere in the file), a package's own children excluded."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module and not (is_pkg and target.startswith(module + ".")) \
                    and not module.startswith(target + "."):
                out.add(target)
    return out


def test_no_import_cycles():
    """Tarjan's strongly connected components over every import, function-level ones included."""
    modules = _modules()
    edges = {m: _imports(m, p, modules) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_ruff_clean():
    proc = _run([_tool("ruff"), "check", "--no-cache", "onnxcompress", "tests", "scripts"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_types_core_and_pipeline():
    proc = _run([_tool("mypy"), "onnxcompress/core", "onnxcompress/pipeline"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-1000:]


def test_module_and_function_size():
    too_big = []
    for module, path in _modules().items():
        src = path.read_text()
        if src.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{module}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    too_big.append(f"{module}.{node.name}: {node.end_lineno - start + 1} lines")
    assert not too_big, "split by concept: " + "; ".join(too_big)


def test_every_module_declares_its_public_surface():
    missing = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        if path.name == "__main__.py":
            continue
        if not any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
                   for n in tree.body):
            missing.append(module)
    assert not missing, f"no __all__: {missing}"


def test_protobuf_and_graphsurgeon_internals_stay_in_core():
    """Only ``core`` reads graphsurgeon's private ``_values``."""
    offenders = [m for m, p in _modules().items() if not m.startswith("onnxcompress.core")
                 and "._values" in p.read_text()]
    assert not offenders, offenders
