"""Every built-in recipe runs over every fixture model, validated on the digits test split."""

from pathlib import Path

import onnx
import pytest

import onnxcompress
from onnxcompress.cli import main
from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.recipes import builtin_recipes, check_requirements, load_recipe
from onnxcompress.runtime.data import CalibSource, open_source

MODELS = Path(__file__).resolve().parents[1] / "models"
FIXTURES = sorted(MODELS.glob("*_digits.onnx"))
DATA = MODELS / "digits_test.npz"
CALIB = MODELS / "digits_calib.npz"


def test_fixtures_present():
    assert len(FIXTURES) >= 4 and DATA.exists() and CALIB.exists()


def calib_for(recipe: str, model: Path) -> CalibSource | None:
    """128 samples of the calibration split for recipes that require it (``requires = ["calib"]``)."""
    if "calib" not in load_recipe(recipe).requires:
        return None
    return open_source(CALIB, onnx.load(str(model)), limit=128)


@pytest.mark.parametrize("recipe", sorted(builtin_recipes()))
@pytest.mark.parametrize("model", FIXTURES, ids=lambda p: p.stem)
def test_recipe_on_fixture(recipe, model):
    calib = calib_for(recipe, model)
    result, report = onnxcompress.optimize(model, recipe=recipe, data=DATA, calib=calib, samples=128)
    assert report.passed, report.validation.failures
    ops = {n.op_type for n in result.graph.node}
    if any(p.name == "fold_bn" for p in load_recipe(recipe).passes):
        assert "BatchNormalization" not in ops
    out = report.validation.outputs[0]
    assert out.samples == 128 and out.ref_accuracy is not None
    onnx.checker.check_model(result, full_check=True)


def test_prune_recipe_requires_calibration():
    recipe = load_recipe("prune")
    assert recipe.requires == ("calib",) and next(p.name for p in recipe.passes) == "prune_channels"
    with pytest.raises(InputError, match="^recipe prune needs calibration data"):
        onnxcompress.optimize(FIXTURES[0], recipe="prune", data=DATA)
    check_requirements(recipe, calib=CALIB)  # given: no error


def test_missing_calibration_is_a_clean_cli_error(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(FIXTURES[0]), "-o", str(out), "--recipe", "prune"])
    _, err = capsys.readouterr()
    assert code == 2 and not out.exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "recipe prune needs calibration data" in lines[0] and "--calib" in lines[0]


@pytest.mark.parametrize("bad", ['requires = "calib"', 'requires = ["gpu"]'])
def test_bad_requires_is_rejected(tmp_path, bad):
    path = tmp_path / "r.toml"
    path.write_text(f'{bad}\n[[pass]]\nname = "fold_bn"\n')
    with pytest.raises(InputError, match="requires must be a list of: calib"):
        load_recipe(path)


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


@pytest.mark.parametrize("text", ["[[pass]]\nname = [0]\n", "[[pass]]\nname = 3\n", "pass = [1, 2]\n"])
def test_recipe_with_non_string_name_or_non_table_pass_is_input_error(tmp_path, text):
    """Found by scripts/fuzz.py (spec target): these raised TypeError instead of InputError."""
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(InputError, match="pass"):
        load_recipe(path)
