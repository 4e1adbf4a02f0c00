"""A cheap subset of ``scripts/sweep_real_models.py``: real models from pip packages, every pass.

Skipped (with the install command) when the package is missing. Each cell must end as
``applied``, ``no change``, ``declined`` or ``gate failed`` -- never a crash, never an invalid model.
"""

from __future__ import annotations

import pytest

from tests.helpers.runs import builtin_passes, load_script

sweep = load_script("sweep_real_models")

#: model -> passes (None: every registered pass), chosen to stay cheap.
SUBSET = {
    "ddddocr_ocr_old": None,  # already int8 (ConvInteger): every pass must leave it alone or decline
    "refinenet": ["fold_bn", "equalize", "simplify", "quantize_int8"],
}


def _require(key: str) -> None:
    try:
        sweep.locate(sweep.MODELS[key])
    except sweep.MissingModel as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("key", sorted(SUBSET))
def test_every_pass_applies_declines_or_fails_the_gate(key):
    _require(key)
    passes = [p for p in (SUBSET[key] or sorted(builtin_passes())) if p in builtin_passes()]
    cells = sweep.sweep_model(key, passes, n_calib=4, n_data=2, seed=0)
    bad = [f"{c.pass_name}: {c.outcome}: {c.detail}" for c in cells if c.outcome in (sweep.CRASH, sweep.INVALID)]
    assert not bad, "\n".join(bad)
    outcomes = {c.pass_name: c.outcome for c in cells}
    if key == "ddddocr_ocr_old":
        assert outcomes.get("quantize_int8") in (sweep.NO_CHANGE, sweep.DECLINED)
    else:  # exact passes on a float model: applied or nothing to do, never a gate failure
        assert all(outcomes[p] in (sweep.APPLIED, sweep.NO_CHANGE) for p in ("fold_bn", "equalize", "simplify")
                   if p in outcomes), outcomes


def test_table_lists_every_cell():
    cells = [sweep.Cell("m", "a", sweep.APPLIED, "cosine 1"), sweep.Cell("m", "b", sweep.CRASH, "Boom")]
    text = sweep.table(cells, ["m"], ["a", "b", "c"])
    assert "| m | applied (cosine 1) | CRASH (Boom) | - |" in text
