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


@pytest.mark.parametrize("gate, problem", [
    ("min_cosin = 0.99", "[gate] min_cosin = 0.99: unknown gate threshold; valid: atol, max_rel_err"),
    ('min_cosine = "high"', "[gate] min_cosine = 'high': expected a finite number"),
    ("min_cosine = true", "[gate] min_cosine = True: expected a finite number"),
    ("min_cosine = 1.5", "[gate] min_cosine = 1.5: must be in [-1, 1]"),
    ("max_top1_drop = -1", "[gate] max_top1_drop = -1: must be in [0, 100]"),
    ("min_top1_agreement = 99", "[gate] min_top1_agreement = 99: must be in [0, 1]"),
    ("max_rel_err = -0.1", "[gate] max_rel_err = -0.1: must be >= 0"),
    ("min_sqnr = inf", "[gate] min_sqnr = inf: expected a finite number"),
])
def test_bad_gate_key_is_refused_at_load(tmp_path, gate, problem):
    path = tmp_path / "r.toml"
    path.write_text(f'[gate]\n{gate}\n[[pass]]\nname = "fold_bn"\n')
    with pytest.raises(InputError) as exc:
        load_recipe(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: {problem}") and "\n" not in message


def test_good_gate_is_kept(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[gate]\nmin_cosine = 0.995\nmin_sqnr = 20\nmax_top1_drop = 0\n[[pass]]\nname = "fold_bn"\n')
    assert load_recipe(path).gate == {"min_cosine": 0.995, "min_sqnr": 20, "max_top1_drop": 0}


def test_recipe_pass_order_and_options_are_checked_at_load(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\nname = "bias_correction"\n[[pass]]\nname = "quantize_int8"\n')
    with pytest.raises(InputError, match="r.toml: bias_correction reads the float reference written by quantize_int8, "
                                         "which does not run before it$"):
        load_recipe(path)
    path.write_text('[[pass]]\nname = "prune_channels"\nratio = 1.2\n')
    with pytest.raises(InputError, match=r"r.toml: pass prune_channels: option ratio=1.2: must be in \[0, 1\)$"):
        load_recipe(path)


def test_requires_calib_is_implied_by_the_passes(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[pass]]\nname = "fold_bn"\n[[pass]]\nname = "quantize_int8"\n')
    recipe = load_recipe(path)
    assert recipe.requires == ("calib",)
    with pytest.raises(InputError, match="^recipe r needs calibration data"):
        check_requirements(recipe)
    path.write_text('[[pass]]\nname = "quantize_int8"\nweights_only = true\n')
    assert load_recipe(path).requires == ()
    for name in builtin_recipes():  # the built-in ones say so themselves
        recipe = load_recipe(name)
        if any(p.needs_calibration() for p in recipe.passes):
            assert "calib" in recipe.requires
