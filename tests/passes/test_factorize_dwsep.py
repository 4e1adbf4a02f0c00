"""Tests of factorize_dwsep: exact at full multiplier vs ORT, structure, multiplier rules, declines, data."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import Numerics, PassContext, PassResult
from onnxcompress.lowrank.factorize import R_GROUPED, R_NOT_PAY, R_POINTWISE, R_TINY
from onnxcompress.passes.factorize_dwsep import DECLINE_REASONS, FactorizeDwsep, round_multiplier
from onnxcompress.pipeline.manager import get_pass
from onnxcompress.runtime.data import open_source
from tests.helpers.builders import conv_model, make_model
from tests.helpers.graphs import op_types, weight_shapes
from tests.helpers.runs import ort_run, rel_err, run_checked
from tests.helpers.tensors import rand, random_feeds

FULL = "max_mac_ratio=100:round_to=1"


def factorize(model: onnx.ModelProto, spec: str, ctx: PassContext | None = None) -> tuple[onnx.ModelProto, PassResult]:
    return run_checked(model, spec, DECLINE_REASONS, ctx)


def test_registered_and_documented() -> None:
    cls = get_pass("factorize_dwsep")
    assert cls is FactorizeDwsep and cls.numerics == Numerics.LOSSY
    for word in ("Before:", "After:", "Math:", "Fires when:", "Declines:", "depthwise"):
        assert word in cls.__doc__


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"pads": [2, 0, 1, 1], "strides": [2, 1]},
    {"strides": [1, 2], "dilations": [2, 2]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2], "bias": False},
    {"auto_pad": "VALID"},
])
def test_full_multiplier_is_exact(attrs: dict) -> None:
    attrs = dict(attrs)
    rng = np.random.default_rng(0)
    bias = rand(rng, 24, scale=0.1) if attrs.pop("bias", True) else None
    model = conv_model(rand(rng, 24, 16, 3, 3, scale=0.1), ["N", 16, 9, 8], bias, **attrs)
    new, result = factorize(model, f"factorize_dwsep:rank=9:{FULL}")
    assert op_types(new) == ["Conv", "Conv"] and result.stats["layers_factorized"] == 1
    assert list(weight_shapes(new).values()) == [(16 * 9, 1, 3, 3), (24, 16 * 9, 1, 1)]
    dw, pw = new.graph.node
    dw_attrs = {a.name: helper.get_attribute_value(a) for a in dw.attribute}
    assert dw_attrs["group"] == 16 and dw_attrs.get("strides", [1, 1]) == attrs.get("strides", [1, 1])
    assert pw.output[0] == "y" and len(pw.input) == (3 if bias is not None else 2)
    feeds = random_feeds(model, dim=2)
    for want, got in zip(ort_run(model, feeds), ort_run(new, feeds), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_error_grows_as_multiplier_falls_and_macs() -> None:
    rng = np.random.default_rng(1)
    model = conv_model(rand(rng, 32, 16, 3, 3, scale=0.1), ["N", 16, 6, 6], rand(rng, 32, scale=0.1), pads=[1, 1, 1, 1])
    feeds = random_feeds(model, seed=2, dim=2)
    errors = []
    for m in (9, 6, 4, 2, 1):
        new, result = factorize(model, f"factorize_dwsep:rank={m}:{FULL}")
        assert list(weight_shapes(new).values())[0] == (16 * m, 1, 3, 3)
        assert result.stats["macs_after"] == 36 * (16 * m * 9 + 16 * m * 32)
        errors.append(rel_err(model, new, feeds))
    assert errors[0] < 1e-5 and all(a < b for a, b in itertools.pairwise(errors)), errors


def test_multiplier_rules() -> None:
    assert round_multiplier(3, 16, 8, 9) == 3  # 48 is a multiple of 8
    assert round_multiplier(3, 12, 8, 9) == 4  # 36 → 48
    assert round_multiplier(3, 7, 8, 9) == 8  # 56
    assert round_multiplier(3, 7, 16, 9) == 3  # no multiple of 16 below m = 9: unrounded
    rng = np.random.default_rng(3)
    # channels whose 3×3 kernels are rank 1 across outputs except for small noise
    spatial = rng.standard_normal((16, 9))
    w = np.einsum("ck,oc->ock", spatial, rng.standard_normal((32, 16))) + 0.01 * rng.standard_normal((32, 16, 9))
    model = conv_model((0.1 * w.reshape(32, 16, 3, 3)).astype(np.float32), ["N", 16, 6, 6])
    for spec, m in [("energy=0.99", 1), ("vbmf=true", 1), ("rank_ratio=0.3", 3), ("rank=2", 2)]:
        new, _ = factorize(model, f"factorize_dwsep:{spec}:round_to=1")
        assert list(weight_shapes(new).values())[0] == (16 * m, 1, 3, 3), spec


def test_declines() -> None:
    rng = np.random.default_rng(4)
    inits = {"Wd": rand(rng, 32, 1, 3, 3, scale=0.1), "Wp": rand(rng, 32, 32, 1, 1, scale=0.1),
             "Wt": rand(rng, 8, 32, 3, 3, scale=0.1),
             "Wn": rand(rng, 64, 32, 3, 3, scale=0.1)}
    nodes = [
        helper.make_node("Conv", ["x", "Wd"], ["d"], "depthwise", group=32, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "Wp"], ["p"], "pointwise"),
        helper.make_node("Conv", ["p", "Wt"], ["t"], "tiny", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p", "Wn"], ["n"], "nopay", pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, {"x": [1, 32, 4, 4]}, ["t", "n"], inits)
    _, result = factorize(model, "factorize_dwsep:rank=6")
    reasons = {d.where: d for d in result.declined}
    assert reasons["depthwise"].code == R_GROUPED and reasons["pointwise"].code == R_POINTWISE
    assert reasons["tiny"].code == R_TINY
    assert reasons["nopay"].code == R_NOT_PAY and "ratio 0.76" in reasons["nopay"].detail
    _, result = factorize(model, "factorize_dwsep:rank=4")  # (9 + 64) · 4 / (64 · 9) = 0.51
    assert result.stats["layers_factorized"] == 1 and "nopay" not in dict(result.where_codes())


def test_data_aware_beats_plain_and_is_deterministic() -> None:
    rng = np.random.default_rng(5)
    model = conv_model(rand(rng, 32, 16, 3, 3, scale=0.1), ["N", 16, 8, 8], rand(rng, 32, scale=0.1), pads=[1, 1, 1, 1])
    kernel = np.ones((3, 3)) / 9

    def images(seed: int, n: int) -> np.ndarray:
        """Spatially smooth images (strongly correlated neighbouring pixels), channels of unequal scale."""
        z = np.random.default_rng(seed).standard_normal((n, 16, 10, 10))
        smooth = sum(z[:, :, i:i + 8, j:j + 8] * kernel[i, j] for i in range(3) for j in range(3))
        return (smooth * np.geomspace(3.0, 0.1, 16)[None, :, None, None]).astype(np.float32)

    spec = "factorize_dwsep:rank=2:round_to=1"
    ctx = PassContext(calib=open_source([{"x": images(6, 48)}], model), seed=1)
    aware, result = factorize(model, spec, ctx)
    again, _ = factorize(model, spec, ctx)
    assert aware.SerializeToString() == again.SerializeToString()
    plain, _ = factorize(model, spec)
    test = {"x": images(7, 32)}
    assert rel_err(model, aware, test) < 0.8 * rel_err(model, plain, test)
    assert result.stats["refit_error_after"] <= result.stats["refit_error_before"] + 1e-9


def test_refit_holdout_guards_against_overfitting() -> None:
    """Few small calibration images, wide pointwise factor (rows < features): the refit must not hurt.

    Without the holdout (``refit_holdout=0``) the least-squares refit of the pointwise factor
    interpolates the 32 calibration rows with 128 features and is far worse on new data than no
    refit at all; with it the refit is rejected or regularized, never worse than no refit.
    """
    rng = np.random.default_rng(3)
    model = conv_model(rand(rng, 64, 64, 3, 3, scale=0.1), ["N", 64, 4, 4], rand(rng, 64, scale=0.1), pads=[1, 1, 1, 1])
    calib = {"x": np.random.default_rng(8).random((2, 64, 4, 4), dtype=np.float32)}
    test = {"x": np.random.default_rng(9).random((8, 64, 4, 4), dtype=np.float32)}
    ctx = PassContext(calib=open_source([calib], model), seed=0)
    spec = "factorize_dwsep:rank=2:round_to=1"
    guarded, result = factorize(model, spec, ctx)
    unrefit, _ = factorize(model, f"{spec}:refit=false", ctx)
    naive, _ = factorize(model, f"{spec}:refit_holdout=0", ctx)
    assert rel_err(model, guarded, test) <= 1.01 * rel_err(model, unrefit, test)
    assert rel_err(model, naive, test) > 1.2 * rel_err(model, unrefit, test)  # the failure the guard prevents
    assert result.stats["refit_layers"] == 1 and "refit_rejected" in result.stats
    with pytest.raises(InputError, match="refit_holdout"):
        get_pass("factorize_dwsep")(refit_holdout=1.0)
