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
        targets = [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
        targets += [n.target for n in tree.body if isinstance(n, ast.AnnAssign)]
        if not any(getattr(t, "id", None) == "__all__" for t in targets):
            missing.append(module)
    assert not missing, f"no __all__: {missing}"


#: Protobuf fields of ModelProto/GraphProto/NodeProto that hold a graph's structure (graphsurgeon
#: spells its own lists in the plural: ``nodes``, ``inputs``, ``outputs``).
PROTO_FIELDS = frozenset({"graph", "node", "initializer", "input", "output", "value_info", "attribute",
                          "opset_import", "metadata_props", "sparse_initializer"})
PROTO_EDITS = frozenset({"append", "extend", "add", "insert", "remove", "pop", "CopyFrom", "MergeFrom", "Clear",
                         "ClearField"})
PROTO_MESSAGES = frozenset({"ModelProto", "GraphProto", "NodeProto", "ValueInfoProto", "FunctionProto"})


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _proto_edits(tree: ast.AST) -> list[str]:
    """Where ``tree`` builds or edits a protobuf graph, or reads graphsurgeon's private ``_values``."""
    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Attribute) and node.attr == "_values":
            what = "reads graphsurgeon's private _values"
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            name = _dotted(node.func)
            last = name.rpartition(".")[2]
            if "helper.make_" in name or (isinstance(node.func, ast.Name) and last.startswith("make_")
                                          and last.endswith(("_node", "_graph", "_model", "_attribute"))):
                what = f"builds protobuf with {name}()"
            elif last in PROTO_MESSAGES:
                what = f"constructs {last}"
            elif last in ("CopyFrom", "MergeFrom") or (
                    last in PROTO_EDITS and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr in PROTO_FIELDS):
                what = f"edits a protobuf field: {name}()"
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute) \
                        and target.value.attr in PROTO_FIELDS:
                    what = f"edits a protobuf field: {_dotted(target.value)}[...]"
        if what:
            found.append(f"line {node.lineno}: {what}")
    return found


def test_protobuf_and_graphsurgeon_internals_stay_in_core():
    """Only ``core`` builds or edits protobuf graphs, and only ``core`` reads graphsurgeon's private
    ``_values``: everything above works on graphsurgeon graphs and asks ``core`` (``serde``,
    ``proto``, ``shapes``, ``graph``) for protobuf. Reading a ``ModelProto`` that is handed to or
    returned by onnxruntime is allowed; what fails this test, in any module outside ``core``, is
    a call of ``onnx.helper.make_*``, constructing a ``ModelProto``/``GraphProto``/``NodeProto``/
    ``ValueInfoProto``/``FunctionProto``, ``CopyFrom``/``MergeFrom``, an ``append``/``extend``/
    ``add``/``insert``/``remove``/``pop``/``Clear`` on a protobuf graph field (``graph``, ``node``,
    ``initializer``, ``input``, ``output``, ``value_info``, ``attribute``, ``opset_import``,
    ``metadata_props``), an assignment or ``del`` of an item of one, and reading ``._values``."""
    offenders = {m: edits for m, p in _modules().items() if not m.startswith("onnxcompress.core")
                 and (edits := _proto_edits(ast.parse(p.read_text())))}
    assert not offenders, offenders


def test_the_protobuf_check_sees_edits():
    """The check above flags each kind of edit it claims to (and leaves graphsurgeon code alone)."""
    edits = _proto_edits(ast.parse(
        "m = onnx.ModelProto()\nm.CopyFrom(x)\nm.graph.output.append(v)\ndel m.graph.value_info[:]\n"
        "node.input[1] = 'w'\nonnx.helper.make_node('Relu', ['x'], ['y'])\nt._values\n"))
    assert len(edits) == 7, edits
    assert not _proto_edits(ast.parse("g.nodes.append(n)\nnode.inputs[1] = c\ng.outputs.extend(ts)\n"))


def test_no_reexport_shims():
    """A module's ``__all__`` names only what it defines (packages' ``__init__`` gather their surface)."""
    shims = []
    for module, path in _modules().items():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for n in tree.body:
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            for t in targets:
                defined |= {e.id for e in ast.walk(t) if isinstance(e, ast.Name)}
        exported = next((n.value for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                         and getattr(n.targets[0] if isinstance(n, ast.Assign) else n.target, "id", None) == "__all__"),
                        None)
        names = [e.value for e in getattr(exported, "elts", []) if isinstance(e, ast.Constant)]
        shims += [f"{module}.{name}" for name in names if name not in defined]
    assert not shims, f"re-exported from elsewhere: {shims}"
