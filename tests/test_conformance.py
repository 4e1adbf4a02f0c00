"""Conformance over fixed samples of ONNX's backend tests (see scripts/conformance.py).

Two samples: onnx's node test cases, and the model folders shipped in the onnx wheel (light,
simple, pytorch-converted, pytorch-operator). Every sampled case that onnxruntime runs correctly
must still be correct after the default lossless pipeline (``fold_bn,equalize,simplify``, passes
not registered left out): zero FAIL and zero CRASH, apart from the known issues recorded in
``tests/data/conformance_expected.json``.
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

from onnxcompress.pipeline import conformance, conformance_cases
from onnxcompress.pipeline.conformance_cases import CRASH, FAIL, PASS, SKIP

EXPECTED = json.loads((Path(__file__).parent / "data" / "conformance_expected.json").read_text())


@pytest.fixture(scope="module")
def results() -> list[conformance_cases.CaseResult]:
    sample = EXPECTED["sample"]
    cases = conformance_cases.select_cases(conformance_cases.collect_cases(), sample=sample["size"], seed=sample["seed"],
                                     include=sample["include"])
    return conformance.run_cases(cases, conformance.default_spec(), isolate=True, jobs=2, progress_every=0)


@pytest.fixture(scope="module")
def data_results() -> list[conformance_cases.CaseResult]:
    sample = EXPECTED["data_sample"]
    cases = conformance_cases.select_cases(conformance_cases.collect_data_cases(), sample=sample["size"], seed=sample["seed"],
                                     include=sample["include"])
    return conformance.run_cases(cases, conformance.default_spec(), isolate=True, jobs=2, progress_every=0)


def _unexpected(results: list[conformance_cases.CaseResult]) -> list[str]:
    return [f"{r.outcome} {r.name}: {r.reason}: {r.detail}" for r in results
            if r.outcome in (FAIL, CRASH) and r.name not in EXPECTED["known_issues"]]


def test_no_unexpected_fail_or_crash(results):
    bad = _unexpected(results)
    assert not bad, "\n".join(bad)


def test_data_folders_no_unexpected_fail_or_crash(data_results):
    bad = _unexpected(data_results)
    assert not bad, "\n".join(bad)


def test_data_sample_is_meaningful(data_results):
    names = {r.name for r in data_results}
    assert len(names) >= (EXPECTED["data_sample"]["size"] or 100)
    assert {n.split("/")[0] for n in names} == set(conformance_cases.DATA_FOLDERS)
    by_name = {r.name: r for r in data_results}
    # light models (inputs generated as onnx's runner does) and IR-3 models whose Constant nodes
    # become initializers must run end to end.
    assert by_name["light/light_squeezenet"].outcome == PASS, by_name["light/light_squeezenet"]
    assert by_name["pytorch-converted/test_PixelShuffle"].outcome == PASS
    assert sum(r.outcome == PASS for r in data_results) >= EXPECTED["data_min_passed"]


def test_data_cases_are_collected_from_every_folder():
    cases = conformance_cases.collect_data_cases()
    folders = {c.name.split("/")[0] for c in cases}
    assert folders == set(conformance_cases.DATA_FOLDERS)
    assert [c.name for c in cases] == sorted(c.name for c in cases)
    light = {c.name: c for c in cases if c.name.startswith("light/")}
    assert len(light) >= 9 and all(c.light_outputs and not c.data_dirs for c in light.values())
    assert light["light/light_densenet121"].rtol == 2e-3  # from real/test_densenet121/data.json
    (inputs, refs), = light["light/light_squeezenet"].data_sets
    assert inputs[0].shape == (1, 3, 224, 224) and inputs[0].dtype == np.float32
    assert inputs[0].flat[0] == 0.0 and abs(inputs[0].flat[-1] - (1 - 1 / inputs[0].size)) < 1e-6
    assert refs[0].shape == (1, 1000, 1, 1)
    seq = next(c for c in cases if c.name == "simple/test_sequence_model1")
    assert all(isinstance(v, np.ndarray) for v in seq.data_sets[0][0])
    assert [c.name for c in conformance_cases.collect("data")] == [c.name for c in cases]
    with pytest.raises(ValueError):
        conformance_cases.collect("nope")


def test_folder_case_with_sequence_and_tensor_data(tmp_path):
    """A hand-made folder: a sequence output is read as a list, tensors as arrays."""
    case_dir = tmp_path / "simple" / "test_seq"
    (case_dir / "test_data_set_0").mkdir(parents=True)
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]> g (float[2] x) => '
                                    "(seq(float[2]) s) { s = SequenceConstruct(x, x) }")
    onnx.save(model, case_dir / "model.onnx")
    x = np.array([1.0, -2.0], np.float32)
    (case_dir / "test_data_set_0" / "input_0.pb").write_bytes(onnx.numpy_helper.from_array(x).SerializeToString())
    seq = onnx.numpy_helper.from_list([x, x])
    (case_dir / "test_data_set_0" / "output_0.pb").write_bytes(seq.SerializeToString())
    (case,) = conformance_cases.collect_data_cases(["simple"], root=tmp_path)
    assert case.name == "simple/test_seq"
    result = conformance.run_case(case, "simplify", tmp_path)
    assert result.outcome == PASS, result


def test_ir3_model_with_constant_nodes_stays_valid(tmp_path):
    """IR 3 requires initializers to be graph inputs: normalising Constant nodes into initializers
    must not produce an invalid model (found by the pytorch-converted folder)."""
    model = onnx.parser.parse_model('<ir_version: 3, opset_import: ["" : 9]> g (float[3] x) => (float[3] y) '
                                    "{ c = Constant <value = float[3] {1, 2, 3}> () y = Add(x, c) }")
    x = np.array([1.0, 0.0, -1.0], np.float32)
    case = SimpleNamespace(name="ir3", model=model, data_sets=[([x], [x + np.array([1, 2, 3], np.float32)])],
                           rtol=1e-3, atol=1e-7)
    result = conformance.run_case(case, conformance.default_spec(), tmp_path)
    assert result.outcome == PASS, result


def test_sample_is_meaningful(results):
    names = [r.name for r in results]
    assert len(names) == len(set(names)) >= EXPECTED["sample"]["size"]
    assert any("batchnorm" in n for n in names) and any("conv" in n for n in names)
    assert sum(r.outcome == PASS for r in results) >= EXPECTED["min_passed"]
    assert not [r for r in results if r.outcome == SKIP and r.reason == "ort cannot run original"
                and "Unable to handle object" in r.detail], "inputs were fed to onnxruntime wrongly"


def test_selection_is_deterministic():
    cases = [SimpleNamespace(name=f"test_{i:03d}") for i in range(50)]
    first = conformance_cases.select_cases(cases, sample=10, seed=3, include=["test_049"])
    again = conformance_cases.select_cases(list(reversed(cases))[::-1], sample=10, seed=3, include=["test_049"])
    assert [c.name for c in first] == [c.name for c in again]
    assert len(first) in (10, 11) and first[-1].name == "test_049"
    assert [c.name for c in conformance_cases.select_cases(cases, filter="test_00")] == [f"test_00{i}" for i in range(10)]


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


class _DyingCase(SimpleNamespace):
    """A case whose process dies (SIGKILL: like a segfault, without faulthandler's noise) when the
    runner reads its tolerances, i.e. inside the forked child running it."""

    @property
    def rtol(self) -> float:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def test_native_crash_is_contained():
    boom = _DyingCase(**{k: v for k, v in vars(_tiny_case("boom")).items() if k != "rtol"})
    cases = [_tiny_case("a"), boom, _tiny_case("c")]
    out = conformance.run_cases(cases, "simplify", isolate=True, jobs=1, progress_every=0)
    assert [(r.name, r.outcome) for r in out] == [("a", PASS), ("boom", CRASH), ("c", PASS)]
    assert out[1].reason == "native crash" and "SIGKILL" in out[1].detail
    summary = conformance.summarize(out)
    assert summary["counts"] == {PASS: 2, SKIP: 0, FAIL: 0, CRASH: 1} and summary["crashed"] == ["boom"]
