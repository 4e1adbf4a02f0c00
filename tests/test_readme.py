"""README stays true: its Python examples run, and quick-start command 1 works."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnx

from tests.helpers.runs import python_env

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 3)
    return README[start:end]


def test_library_api_examples_run(monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", _section("Library API"), re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "0"
    assert "accuracy" in out[1]
    from onnxcompress import registry

    assert "drop_identity" in registry()


def test_quick_start_command(tmp_path):
    """Command 1 as written, with a smaller search space (uniform prune 0.5 and int8: three evaluations; the
    README's full search takes minutes) and a private cache: it prints the chosen pipeline, speed-up,
    size and accuracy, and writes a valid model."""
    line = next(l for l in _section("Quick start").splitlines() if l.startswith("pip install . && "))
    args = shlex.split(line.split("&&", 1)[1])
    assert args[:2] == ["onnxcompress", "auto"]
    args = [str(ROOT / a) if a.startswith("models/") else a for a in args[1:]]
    args += ["--space", "prune=0.5,prune_macs=,lowrank=,quant=int8", "--cache-dir", str(tmp_path / "cache"), "--latency-runs", "30", "--budget-minutes", "10"]
    proc = subprocess.run([sys.executable, "-m", "onnxcompress", *args], cwd=tmp_path, capture_output=True, text=True,
                          env=python_env())
    assert proc.returncode == 0, proc.stderr
    for shown in ("chosen pipeline: prune_channels:ratio=0.5", "speed-up", "size", "accuracy", "reproduce:"):
        assert shown in proc.stdout, shown
    out = onnx.load(tmp_path / "resnet_digits.auto.onnx")
    onnx.checker.check_model(out)
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}


def test_ci_runs_readme_test_command():
    line = next(l for l in _section("Quick start").splitlines() if l.startswith("pip install '.[test]'"))
    assert line in (ROOT / ".ci" / "run").read_text()
