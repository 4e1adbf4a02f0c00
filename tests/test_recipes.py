"""Every built-in recipe runs over every fixture model, validated on the digits test split."""

from pathlib import Path

import onnx
import pytest

import onnxcompress
from onnxcompress.recipes import builtin_recipes, load_recipe

MODELS = Path(__file__).resolve().parents[1] / "models"
FIXTURES = sorted(MODELS.glob("*_digits.onnx"))
DATA = MODELS / "digits_test.npz"


def test_fixtures_present():
    assert len(FIXTURES) >= 4 and DATA.exists()


@pytest.mark.parametrize("recipe", sorted(builtin_recipes()))
@pytest.mark.parametrize("model", FIXTURES, ids=lambda p: p.stem)
def test_recipe_on_fixture(recipe, model):
    result, report = onnxcompress.optimize(model, recipe=recipe, data=DATA, samples=128)
    assert report.passed, report.validation.failures
    ops = {n.op_type for n in result.graph.node}
    if any(p.name == "fold_bn" for p in load_recipe(recipe).passes):
        assert "BatchNormalization" not in ops
    out = report.validation.outputs[0]
    assert out.samples == 128 and out.ref_accuracy is not None
    onnx.checker.check_model(result, full_check=True)


@pytest.mark.parametrize("model", FIXTURES, ids=lambda p: p.stem)
def test_fold_bn_exact_on_fixture(model):
    """Issue #2's bar: no BN left, outputs within 1e-4 relative on the whole test split."""
    result, report = onnxcompress.optimize(model, passes="fold_bn", data=DATA)
    assert "BatchNormalization" not in {n.op_type for n in result.graph.node}
    (out,) = report.validation.outputs
    assert out.rel_max < 1e-4 and out.top1_agreement == 1.0
    assert out.cand_accuracy == out.ref_accuracy


def test_deterministic_output():
    model = FIXTURES[0]
    a, _ = onnxcompress.optimize(model, recipe="default", validate=False)
    b, _ = onnxcompress.optimize(model, recipe="default", validate=False)
    assert a.SerializeToString() == b.SerializeToString()
