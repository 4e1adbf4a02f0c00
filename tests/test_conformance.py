"""Conformance over a fixed sample of ONNX's backend node tests (see scripts/conformance.py).

Every sampled case that onnxruntime runs correctly must still be correct after ``fold_bn,simplify``
(or ``simplify`` alone while ``fold_bn`` is not registered): zero FAIL and zero CRASH, apart from
the known issues recorded in ``tests/data/conformance_expected.json``.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from onnxcompress import conformance
from onnxcompress.conformance import CRASH, FAIL, PASS, SKIP

EXPECTED = json.loads((Path(__file__).parent / "data" / "conformance_expected.json").read_text())


@pytest.fixture(scope="module")
def results() -> list[conformance.CaseResult]:
    sample = EXPECTED["sample"]
    cases = conformance.select_cases(conformance.collect_cases(), sample=sample["size"], seed=sample["seed"],
                                     include=sample["include"])
    return conformance.run_cases(cases, conformance.default_spec(), isolate=True, jobs=2, progress_every=0)


def test_no_unexpected_fail_or_crash(results):
    bad = [f"{r.outcome} {r.name}: {r.reason}: {r.detail}" for r in results
           if r.outcome in (FAIL, CRASH) and r.name not in EXPECTED["known_issues"]]
    assert not bad, "\n".join(bad)


def test_sample_is_meaningful(results):
    names = [r.name for r in results]
    assert len(names) == len(set(names)) >= EXPECTED["sample"]["size"]
    assert any("batchnorm" in n for n in names) and any("conv" in n for n in names)
    assert sum(r.outcome == PASS for r in results) >= EXPECTED["min_passed"]
    assert not [r for r in results if r.outcome == SKIP and r.reason == "ort cannot run original"
                and "Unable to handle object" in r.detail], "inputs were fed to onnxruntime wrongly"


def test_selection_is_deterministic():
    cases = [SimpleNamespace(name=f"test_{i:03d}") for i in range(50)]
    first = conformance.select_cases(cases, sample=10, seed=3, include=["test_049"])
    again = conformance.select_cases(list(reversed(cases))[::-1], sample=10, seed=3, include=["test_049"])
    assert [c.name for c in first] == [c.name for c in again]
    assert len(first) in (10, 11) and first[-1].name == "test_049"
    assert [c.name for c in conformance.select_cases(cases, filter="test_00")] == [f"test_00{i}" for i in range(10)]


def _tiny_case(name: str, scale: float = 1.0) -> SimpleNamespace:
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[3] x) => (float[3] y) '
                                    "{ a = Identity(x)  y = Relu(a) }")
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    return SimpleNamespace(name=name, model=model, data_sets=[([x], [np.maximum(x, 0) * scale])], rtol=1e-3,
                           atol=1e-7)


def test_outcomes_of_tiny_cases(tmp_path):
    assert conformance.run_case(_tiny_case("ok"), "simplify", tmp_path).outcome == PASS
    wrong = conformance.run_case(_tiny_case("wrong_reference", scale=2.0), "simplify", tmp_path)
    assert (wrong.outcome, wrong.reason) == (SKIP, "ort mismatches reference")
    empty = _tiny_case("empty")
    empty.data_sets = []
    assert conformance.run_case(empty, "simplify", tmp_path).reason == "no data"


def test_native_crash_is_contained(monkeypatch):
    real = conformance.run_case

    def maybe_die(case, spec, workdir):
        if case.name == "boom":  # SIGKILL: like a segfault, but without faulthandler's noise
            os.kill(os.getpid(), signal.SIGKILL)
        return real(case, spec, workdir)

    monkeypatch.setattr(conformance, "run_case", maybe_die)
    cases = [_tiny_case("a"), _tiny_case("boom"), _tiny_case("c")]
    out = conformance.run_cases(cases, "simplify", isolate=True, jobs=1, progress_every=0)
    assert [(r.name, r.outcome) for r in out] == [("a", PASS), ("boom", CRASH), ("c", PASS)]
    assert out[1].reason == "native crash" and "SIGKILL" in out[1].detail
    summary = conformance.summarize(out)
    assert summary["counts"] == {PASS: 2, SKIP: 0, FAIL: 0, CRASH: 1} and summary["crashed"] == ["boom"]
