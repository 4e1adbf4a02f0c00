"""quantize_int8:method=auto: the range rule chosen on the worst output/slice SQNR of the calibration data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.manager import parse_spec
from tests.helpers.builders import yolo_split_head
from tests.helpers.quant import conv_classifier, quantize
from tests.helpers.runs import ort_run
from tests.helpers.tensors import rand


def _source(model, n: int = 32):
    from onnxcompress.runtime.data import IterableSource, input_specs

    x = rand(np.random.default_rng(3), n, 3, 64, scale=1.0)
    return IterableSource([{"x": x[: n // 2]}, {"x": x[n // 2:]}], input_specs(model)), x


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


def _scores(stat: str) -> dict[str, float]:
    return {m: float(v) for m, v in (part.split() for part in stat.split(", "))}


def test_auto_keeps_the_method_with_the_best_worst_slice_and_builds_exactly_that_model():
    ref = yolo_split_head()
    source, _ = _source(ref)
    auto, res = quantize(ref, "quantize_int8:method=auto", calib=source)
    scores = _scores(res.stats["method_sqnr"])
    assert list(scores) == ["mse", "minmax", "percentile", "entropy"]
    chosen = res.stats["method_chosen"]
    assert scores[chosen] == max(scores.values())
    assert chosen != "mse"  # on this head another rule wins: the choice is not the default by construction
    explicit, res2 = quantize(ref, f"quantize_int8:method={chosen}", calib=source)
    assert auto.SerializeToString() == explicit.SerializeToString()
    assert "method_chosen" not in res2.stats


def test_auto_scores_are_the_worst_slice_sqnr_measured_in_onnxruntime():
    """method_sqnr of the chosen rule = min over y, y[0:4], y[4:10] of the SQNR vs the float model on
    the calibration data (onnxruntime, optimizations off)."""
    ref = yolo_split_head()
    source, x = _source(ref)
    model, res = quantize(ref, "quantize_int8:method=auto", calib=source)
    want, got = ort_run(ref, {"x": x})[0], ort_run(model, {"x": x})[0]
    worst = min(_sqnr(want, got), _sqnr(want[:, :4], got[:, :4]), _sqnr(want[:, 4:], got[:, 4:]))
    assert math.isclose(_scores(res.stats["method_sqnr"])[res.stats["method_chosen"]], worst, abs_tol=0.011)


def test_auto_is_deterministic_and_combines_with_mixed_precision():
    ref = yolo_split_head()
    source, _ = _source(ref)
    a, res = quantize(ref, "quantize_int8:method=auto:min_sqnr=25", calib=source)
    b, _ = quantize(ref, "quantize_int8:method=auto:min_sqnr=25", calib=source)
    assert a.SerializeToString() == b.SerializeToString()
    assert res.stats["mixed_sqnr"] >= 25 and res.stats["method_chosen"] in _scores(res.stats["method_sqnr"])


def test_ties_go_to_the_default(monkeypatch):
    """When every rule scores the same, auto keeps mse (the default)."""
    import onnxcompress.passes.quantize_int8 as qi
    from onnxcompress.quant.sensitivity import Fidelity

    class Flat:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, candidate):
            return Fidelity(30.0, 0.999)

    monkeypatch.setattr(qi, "Evaluator", Flat)
    _, res = quantize(conv_classifier(np.random.default_rng(0)), "quantize_int8:method=auto")
    assert res.stats["method_chosen"] == "mse"
    assert set(_scores(res.stats["method_sqnr"]).values()) == {30.0}


@pytest.mark.parametrize("spec", ["quantize_int8:method=auto:weights_only=true",
                                  "quantize_int8:method=auto:dynamic=true"])
def test_auto_refuses_modes_without_calibrated_activations(spec):
    with pytest.raises(InputError, match="method=auto"):
        parse_spec(spec)


def test_unknown_method_is_refused():
    with pytest.raises(InputError, match="method"):
        parse_spec("quantize_int8:method=best")
