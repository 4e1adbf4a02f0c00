"""quantize_int8:holdout=F: ranges calibrated on some samples, method=auto and mixed precision judged on
the others (runtime.data.SplitSource: every 1/F-th sample held out)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxcompress.core.errors import InputError
from onnxcompress.pipeline.manager import parse_spec
from onnxcompress.runtime.data import IterableSource, SplitSource, input_specs
from tests.helpers.builders import yolo_split_head
from tests.helpers.quant import quantize
from tests.helpers.runs import ort_run
from tests.helpers.tensors import rand

#: Samples held out by holdout=0.25 among 32: every 4th (3, 7, ..., 31).
HELD = np.arange(32) % 4 == 3


def _data(n: int = 32, tail: float = 1.0) -> np.ndarray:
    """``n`` samples of the head's input; every 4th scaled by ``tail`` (beyond the others' ranges)."""
    x = rand(np.random.default_rng(3), n, 3, 64, scale=1.0)
    x[np.arange(n) % 4 == 3] *= tail
    return x


def _source(model, x: np.ndarray, chunk: int = 5) -> IterableSource:
    return IterableSource([{"x": x[i:i + chunk]} for i in range(0, len(x), chunk)], input_specs(model))


def _worst_sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    def sqnr(r: np.ndarray, g: np.ndarray) -> float:
        r, err = r.astype(np.float64), float(((r - g) ** 2).sum())
        return math.inf if err == 0 else float(10 * np.log10((r ** 2).sum() / err))

    return min(sqnr(ref, got), sqnr(ref[:, :4], got[:, :4]), sqnr(ref[:, 4:], got[:, 4:]))


def test_split_source_spreads_the_held_out_samples_evenly_and_keeps_the_others():
    ref = yolo_split_head()
    x = _data(23)
    held, kept = SplitSource(_source(ref, x), 0.25, held=True), SplitSource(_source(ref, x), 0.25, held=False)
    got = [b.feeds["x"] for b in held.batches(2)]
    assert [len(b) for b in got] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(got), x[[3, 7, 11, 15, 19]])
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in kept.batches(32)]),
                                  np.delete(x, [3, 7, 11, 15, 19], axis=0))
    assert held.count() == 5 and kept.count() == 18 and "held out" in held.description
    third = SplitSource(_source(ref, x), 1 / 3, held=True)
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in third.batches()]), x[2::3])
    assert SplitSource(_source(ref, x), 0.0, held=True).count() == 0
    with pytest.raises(ValueError):
        SplitSource(_source(ref, x), 1.5, held=True)


def test_auto_with_holdout_calibrates_on_the_head_and_scores_on_the_tail():
    """The model is exactly ``method=<chosen>`` calibrated on the 24 kept samples; its score is the
    worst-slice SQNR measured by onnxruntime on the 8 held-out ones only."""
    ref = yolo_split_head()
    x = _data(32)
    model, res = quantize(ref, "quantize_int8:method=auto:holdout=0.25", calib=_source(ref, x))
    assert res.stats["holdout_samples"] == 8 and res.stats["calib_samples"] == 24
    chosen = res.stats["method_chosen"]
    explicit, _ = quantize(ref, f"quantize_int8:method={chosen}", calib=_source(ref, x[~HELD]))
    assert model.SerializeToString() == explicit.SerializeToString()
    scores = {m: float(v) for m, v in (p.split() for p in res.stats["method_sqnr"].split(", "))}
    tail = {"x": x[HELD]}
    want = _worst_sqnr(ort_run(ref, tail)[0], ort_run(model, tail)[0])
    assert math.isclose(scores[chosen], want, abs_tol=0.011)
    whole = _worst_sqnr(ort_run(ref, {"x": x})[0], ort_run(model, {"x": x})[0])
    assert not math.isclose(whole, want, abs_tol=0.011)  # not the score on every sample


def test_mixed_precision_judged_on_the_holdout_sees_what_the_calibration_missed():
    """The 8 held-out samples are 1.5x larger than the 24 others: judged on the samples it was calibrated on,
    min_sqnr holds with fewer float layers than judged on the held-out ones, and mixed_sqnr is the
    held-out SQNR of the model built."""
    ref = yolo_split_head()
    x = _data(32, tail=1.5)
    spec = "quantize_int8:method=minmax:min_sqnr=30"
    seen, res_seen = quantize(ref, spec, calib=_source(ref, x[~HELD]))
    held, res_held = quantize(ref, spec + ":holdout=0.25", calib=_source(ref, x))
    assert res_held.stats["fallback_layers"] > res_seen.stats["fallback_layers"]
    tail = {"x": x[HELD]}
    got = _worst_sqnr(ort_run(ref, tail)[0], ort_run(held, tail)[0])
    assert got >= 30 and math.isclose(res_held.stats["mixed_sqnr"], got, abs_tol=0.011)
    assert _worst_sqnr(ort_run(ref, tail)[0], ort_run(seen, tail)[0]) < 30
    again, _ = quantize(ref, spec + ":holdout=0.25", calib=_source(ref, x))
    assert again.SerializeToString() == held.SerializeToString()


def test_holdout_zero_is_the_plain_run():
    ref = yolo_split_head()
    x = _data(16)
    a, res = quantize(ref, "quantize_int8:method=auto", calib=_source(ref, x))
    b, _ = quantize(ref, "quantize_int8:method=auto:holdout=0", calib=_source(ref, x))
    assert a.SerializeToString() == b.SerializeToString() and "holdout_samples" not in res.stats


@pytest.mark.parametrize("spec, match", [
    ("quantize_int8:holdout=0.25", "neither is set"),
    ("quantize_int8:method=minmax:holdout=0.25", "neither is set"),
    ("quantize_int8:method=auto:holdout=1", "holdout"),
    ("quantize_int8:min_sqnr=20:holdout=-0.1", "holdout"),
    ("quantize_int8:min_sqnr=20:holdout=half", "holdout"),
])
def test_bad_holdout_is_refused_at_parse_time(spec, match):
    with pytest.raises(InputError, match=match):
        parse_spec(spec)


def test_holdout_leaving_no_sample_on_either_side_is_refused():
    ref = yolo_split_head()
    with pytest.raises(InputError, match="both need at least one"):
        quantize(ref, "quantize_int8:method=auto:holdout=0.1", calib=_source(ref, _data(4)))
    with pytest.raises(InputError, match="both need at least one"):
        quantize(ref, "quantize_int8:min_sqnr=20:holdout=0.9", calib=_source(ref, _data(1)))
