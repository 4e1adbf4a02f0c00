"""Tests of factorize_tucker: exact at full ranks vs ORT, structure, HOOI vs HOSVD, VBMF ranks, declines, data."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.core.pass_api import Numerics, PassContext, PassResult
from onnxcompress.lowrank.factorize import R_GROUPED, R_NOT_PAY, R_POINTWISE, R_TINY, R_WEIGHT
from onnxcompress.lowrank.linalg import evbmf, unfold
from onnxcompress.passes.factorize_tucker import DECLINE_REASONS, FactorizeTucker
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
    cls = get_pass("factorize_tucker")
    assert cls is FactorizeTucker and cls.numerics == Numerics.LOSSY and "iters" in cls.options
    for word in ("Before:", "After:", "Math:", "Fires when:", "Declines:", "HOOI"):
        assert word in cls.__doc__


CONFIGS = [
    {"pads": [1, 1, 1, 1]},
    {"pads": [0, 1, 2, 1], "strides": [2, 1]},
    {"strides": [2, 2], "dilations": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "SAME_LOWER", "bias": False},
    {"auto_pad": "VALID"},
]


@pytest.mark.parametrize("attrs", CONFIGS)
def test_full_ranks_are_exact(attrs: dict) -> None:
    attrs = dict(attrs)
    rng = np.random.default_rng(0)
    bias = rand(rng, 24, scale=0.1) if attrs.pop("bias", True) else None
    model = conv_model(rand(rng, 24, 16, 3, 3, scale=0.1), ["N", 16, 9, 8], bias, **attrs)
    new, result = factorize(model, f"factorize_tucker:rank=24:{FULL}")
    assert op_types(new) == ["Conv"] * 3
    assert list(weight_shapes(new).values()) == [(16, 16, 1, 1), (24, 16, 3, 3), (24, 24, 1, 1)]
    first, core, last = new.graph.node
    core_attrs = {a.name: helper.get_attribute_value(a) for a in core.attribute}
    assert core_attrs.get("strides", [1, 1]) == attrs.get("strides", [1, 1])
    assert {a.name for a in first.attribute} == {"kernel_shape"} and last.output[0] == "y"
    assert len(last.input) == (3 if bias is not None else 2)
    feeds = random_feeds(model, dim=2)
    for want, got in zip(ort_run(model, feeds), ort_run(new, feeds), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert result.stats["mean_rel_weight_error"] < 1e-6


def test_conv1d_and_ranks_per_mode() -> None:
    rng = np.random.default_rng(1)
    model = conv_model(rand(rng, 32, 24, 5, scale=0.1), ["N", 24, 20], rand(rng, 32, scale=0.1), pads=[2, 2])
    new, result = factorize(model, "factorize_tucker:rank_ratio=0.25:round_to=1")
    assert list(weight_shapes(new).values()) == [(6, 24, 1), (8, 6, 5), (32, 8, 1)]  # ceil(.25·24) = 6, .25·32 = 8
    assert result.stats["macs_after"] < 0.7 * result.stats["macs_before"]
    new8, _ = factorize(model, "factorize_tucker:rank_ratio=0.25")
    assert list(weight_shapes(new8).values()) == [(8, 24, 1), (8, 8, 5), (32, 8, 1)]  # rounded up to 8


def test_hooi_is_no_worse_than_hosvd_and_error_grows_as_rank_falls() -> None:
    rng = np.random.default_rng(2)
    model = conv_model(rand(rng, 32, 32, 3, 3, scale=0.1), ["N", 32, 6, 6], rand(rng, 32, scale=0.1), pads=[1, 1, 1, 1])
    errors = {}
    for iters in (0, 5):
        _, result = factorize(model, f"factorize_tucker:rank=8:iters={iters}:{FULL}")
        errors[iters] = result.stats["mean_rel_weight_error"]
    assert errors[5] < errors[0]
    feeds = random_feeds(model, seed=3, dim=2)
    out = [rel_err(model, factorize(model, f"factorize_tucker:rank={r}:{FULL}")[0], feeds) for r in (32, 24, 16, 8, 2)]
    assert out[0] < 1e-5 and all(a < b for a, b in itertools.pairwise(out)), out


def test_vbmf_estimates_each_mode() -> None:
    rng = np.random.default_rng(4)
    # a kernel with rank 6 in the output mode and rank 10 in the input mode, plus noise
    core = rng.standard_normal((6, 10, 3, 3))
    u_out, u_in = np.linalg.qr(rng.standard_normal((48, 6)))[0], np.linalg.qr(rng.standard_normal((40, 10)))[0]
    w = np.einsum("abhw,oa,ib->oihw", core, u_out, u_in) + 0.01 * rng.standard_normal((48, 40, 3, 3))
    model = conv_model((0.1 * w).astype(np.float32), ["N", 40, 6, 6], pads=[1, 1, 1, 1])
    assert evbmf(np.linalg.svd(unfold(w, 0), compute_uv=False), (48, 360))[0] == 6
    new, _ = factorize(model, "factorize_tucker:vbmf=true:round_to=1")
    assert list(weight_shapes(new).values()) == [(10, 40, 1, 1), (6, 10, 3, 3), (48, 6, 1, 1)]
    new, _ = factorize(model, "factorize_tucker:vbmf=true")
    assert list(weight_shapes(new).values()) == [(16, 40, 1, 1), (8, 16, 3, 3), (48, 8, 1, 1)]


def test_declines() -> None:
    rng = np.random.default_rng(5)
    inits = {"Wd": rand(rng, 32, 1, 3, 3, scale=0.1), "Wg": rand(rng, 32, 16, 3, 3, scale=0.1),
             "Wp": rand(rng, 32, 32, 1, 1, scale=0.1),
             "Wt": rand(rng, 8, 32, 3, 3, scale=0.1), "Wn": rand(rng, 32, 32, 3, 3, scale=0.1)}
    nodes = [
        helper.make_node("Conv", ["x", "Wd"], ["d"], "depthwise", group=32, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "Wg"], ["g"], "grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["g", "Wp"], ["p"], "pointwise"),
        helper.make_node("Conv", ["p", "Wt"], ["t"], "tiny", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p", "p"], ["s"], "dynamic"),  # weight from the data: not constant
        helper.make_node("Conv", ["p", "Wn"], ["n"], "nopay", pads=[1, 1, 1, 1]),
    ]
    model = make_model(nodes, {"x": [1, 32, 3, 3]}, ["t", "s", "n"], inits)
    _, result = factorize(model, "factorize_tucker:rank=32")
    reasons = dict(result.where_codes())
    assert {k: v for k, v in reasons.items() if k != "nopay"} == {
        "depthwise": R_GROUPED, "grouped": R_GROUPED, "pointwise": R_POINTWISE, "tiny": R_TINY, "dynamic": R_WEIGHT}
    nopay = next(d for d in result.declined if d.where == "nopay")
    assert nopay.code == R_NOT_PAY and "(32, 32)" in nopay.detail
    assert not result.modified and result.stats["layers_skipped"] == 6


def test_first_1x1_runs_at_input_resolution_in_the_mac_count() -> None:
    rng = np.random.default_rng(6)
    model = conv_model(rand(rng, 32, 32, 3, 3, scale=0.1), ["N", 32, 16, 16], pads=[1, 1, 1, 1], strides=[2, 2])
    _, result = factorize(model, f"factorize_tucker:rank=8:{FULL}")
    assert result.stats["macs_before"] == 64 * 32 * 32 * 9
    assert result.stats["macs_after"] == 256 * 8 * 32 + 64 * 8 * 8 * 9 + 64 * 32 * 8


def test_data_aware_beats_plain_and_is_deterministic() -> None:
    rng = np.random.default_rng(7)
    model = conv_model(rand(rng, 32, 32, 3, 3, scale=0.1), ["N", 32, 8, 8], rand(rng, 32, scale=0.1), pads=[1, 1, 1, 1])
    mix = np.random.default_rng(8).standard_normal((32, 32)) * np.geomspace(4.0, 0.02, 32)[:, None]

    def images(seed: int, n: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((n, 8, 8, 32)) @ mix
        return z.transpose(0, 3, 1, 2).astype(np.float32)

    spec = "factorize_tucker:rank=16"
    ctx = PassContext(calib=open_source([{"x": images(9, 48)}], model))
    aware, result = factorize(model, spec, ctx)
    again, _ = factorize(model, spec, ctx)
    assert aware.SerializeToString() == again.SerializeToString()
    plain, _ = factorize(model, spec)
    assert list(weight_shapes(aware).values()) == list(weight_shapes(plain).values())
    test = {"x": images(10, 32)}
    assert rel_err(model, aware, test) < 0.7 * rel_err(model, plain, test)
    assert result.stats["data_aware"] == 1 and result.stats["refit_layers"] == 1
