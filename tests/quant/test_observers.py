"""Calibration observers against hand-computed thresholds, streaming vs all-at-once, and the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import helper

from onnxcompress.core.errors import InputError
from onnxcompress.quant import METHODS, HistogramCollector, compute_range, load_cache, make_observer, save_cache
from onnxcompress.quant.observers import EntropyObserver, MinMaxObserver, MseObserver, PercentileObserver

N = 200_000


def collect(x: np.ndarray, parts: int = 1) -> HistogramCollector:
    c = HistogramCollector()
    for chunk in np.array_split(x, parts):
        c.update(chunk)
    return c


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_uniform_minmax_is_exact(rng):
    x = rng.uniform(-1.0, 3.0, N).astype(np.float32)
    for parts in (1, 7):
        assert compute_range(collect(x, parts), "minmax") == (float(x.min()), float(x.max()))
    assert compute_range(collect(x), "minmax", symmetric=True) == (-float(x.max()), float(x.max()))
    # on a uniform distribution nothing is worth clipping: every method stays within 1 % of the ends
    for method in METHODS:
        lo, hi = compute_range(collect(x), method, percentile=99.99)
        assert lo == pytest.approx(x.min(), abs=0.04) and hi == pytest.approx(x.max(), abs=0.04), method


def test_percentile_clips_outliers(rng):
    x = rng.standard_normal(N)
    x[:20] = 50.0  # 0.01 % outliers
    lo, hi = compute_range(collect(x), "percentile", percentile=99.9)
    assert hi == pytest.approx(np.quantile(x, 0.999), abs=0.02)
    assert lo == pytest.approx(np.quantile(x, 0.001), abs=0.05)
    t = compute_range(collect(x), "percentile", percentile=99.9, symmetric=True)[1]
    assert t == pytest.approx(np.quantile(np.abs(x), 0.999), abs=0.05) and t < 5
    assert compute_range(collect(x), "minmax")[1] == 50.0


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_heavy_tail_thresholds_between_p99_and_max(rng, method):
    x = rng.laplace(0.0, 1.0, N)
    p99, amax = np.quantile(np.abs(x), 0.99), np.abs(x).max()
    t = compute_range(collect(x), method, symmetric=True)[1]
    assert p99 < t < amax
    lo, hi = compute_range(collect(x), method)
    assert np.quantile(x, 0.005) > lo >= x.min() and np.quantile(x, 0.995) < hi <= x.max()
    assert (lo, hi) != (x.min(), x.max())


def test_mse_keeps_a_saturated_spike_on_the_grid(rng):
    """Relu6-like: 30 % of the values are exactly 6.0; clipping them costs more than any gain."""
    x = np.concatenate([rng.uniform(0.0, 6.0, N), np.full(N * 3 // 7, 6.0)])
    lo, hi = compute_range(collect(x), "mse")
    assert lo == 0.0 and hi == pytest.approx(6.0, abs=0.03)


def test_relu_output_is_one_sided(rng):
    x = np.maximum(rng.standard_normal(N), 0.0)
    c = collect(x)
    assert c.zeros == int((x == 0).sum()) and c.neg.sum() == 0
    for method in METHODS:
        lo, hi = compute_range(c, method)
        assert lo == 0.0 and 1.5 < hi <= x.max(), method


@pytest.mark.parametrize("method", METHODS)
def test_streaming_equals_all_at_once(rng, method):
    """Batches of growing range force re-binning; the histograms, hence all ranges, are identical."""
    x = np.concatenate([rng.laplace(0, 1, N // 4) * s for s in (0.3, 1.0, 2.5, 7.0)]).astype(np.float32)
    whole, streamed = collect(x), collect(x, parts=9)
    assert streamed.width == whole.width and streamed.width < 2 * np.abs(x).max() / whole.bins
    np.testing.assert_array_equal(streamed.pos, whole.pos)
    np.testing.assert_array_equal(streamed.neg, whole.neg)
    for symmetric in (False, True):
        assert compute_range(streamed, method, symmetric=symmetric) == compute_range(whole, method, symmetric=symmetric)


def test_rebinning_keeps_counts_and_power_of_two_width(rng):
    c = HistogramCollector(bins=64)
    c.update(np.array([0.1, -0.2, 0.0]))
    first = c.width
    c.update(np.array([100.0]))
    assert c.pos.sum() + c.neg.sum() + c.zeros == c.count == 4
    assert math.log2(c.width) == int(math.log2(c.width)) and c.width / first == 2 ** round(math.log2(c.width / first))
    assert c.width * c.bins > 100.0


def test_degenerate_and_non_finite():
    c = HistogramCollector()
    c.update(np.zeros(10))
    assert all(compute_range(c, m) == (0.0, 0.0) for m in METHODS)
    c.update(np.array([np.nan, np.inf, 1.0]))
    assert c.count == 11 and c.max == 1.0
    assert compute_range(HistogramCollector(), "mse") == (0.0, 0.0)
    with pytest.raises(ValueError, match="unknown calibration method"):
        compute_range(c, "kl")


def test_observer_classes(rng):
    x = rng.standard_normal(N)
    for cls, method in [(MinMaxObserver, "minmax"), (PercentileObserver, "percentile"), (EntropyObserver, "entropy"),
                        (MseObserver, "mse")]:
        obs = make_observer(method, percentile=99.0)
        assert isinstance(obs, cls)
        for chunk in np.array_split(x, 3):
            obs.update(chunk)
        assert obs.threshold() == obs.range(symmetric=True)[1] > 0
    assert make_observer("percentile", percentile=99.0).percentile == 99.0


def test_cache_round_trip(tmp_path, rng):
    stats = {"a/b:0": collect(rng.standard_normal(1000)), "c": collect(np.maximum(rng.standard_normal(500), 0))}
    path = tmp_path / "calib.npz"
    save_cache(path, "key1", stats)
    back = load_cache(path, "key1")
    assert sorted(back) == sorted(stats)
    for name, c in stats.items():
        for method in METHODS:
            assert compute_range(back[name], method) == compute_range(c, method)
    assert load_cache(path, "other") == {}
    assert load_cache(tmp_path / "missing.npz", "key1") == {}
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a calibration cache"):
        load_cache(tmp_path / "bad.npz", "key1")


def test_minmax_only_statistics_bin_nothing_and_serve_minmax_alone(tmp_path, rng):
    x = np.concatenate([rng.standard_normal(70000), [np.nan, np.inf, 0.0]]).astype(np.float32)
    full, lean = HistogramCollector(), HistogramCollector(minmax_only=True)
    for part in (x[:1000], x * 3, x[:10]):
        full.update(part)
        lean.update(part)
    assert (lean.count, lean.min, lean.max, lean.width) == (full.count, full.min, full.max, full.width)
    assert not lean.pos.any() and not lean.neg.any()
    for symmetric in (False, True):
        assert compute_range(lean, "minmax", symmetric=symmetric) == compute_range(full, "minmax", symmetric=symmetric)
    with pytest.raises(ValueError, match="min/max only"):
        compute_range(lean, "mse")
    save_cache(tmp_path / "c.npz", "k", {"lean": lean, "full": full})
    back = load_cache(tmp_path / "c.npz", "k")
    assert back["lean"].minmax_only and not back["full"].minmax_only


def test_a_cached_minmax_only_entry_does_not_serve_a_histogram(tmp_path):
    from onnxcompress.quant.calibrate import collect_statistics
    from onnxcompress.runtime.data import IterableSource, input_specs
    from tests.helpers.builders import make_model

    model = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
                       {"x": [4, 8]}, ["y"], {})
    feeds = [{"x": np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)}]
    source = IterableSource(feeds, input_specs(model))
    cache = tmp_path / "stats.npz"
    first = collect_statistics(model, ["r", "y"], source, cache=cache, minmax=["r"])
    assert first.collectors["r"].minmax_only and not first.collectors["y"].minmax_only
    again = collect_statistics(model, ["r", "y"], source, cache=cache, minmax=["r"])
    assert sorted(again.cached) == ["r", "y"] and again.samples == 0
    full = collect_statistics(model, ["r", "y"], source, cache=cache)
    assert full.cached == ["y"] and not full.collectors["r"].minmax_only and full.samples == 4
    assert collect_statistics(model, ["r"], source, cache=cache, minmax=["r"]).cached == ["r"]  # a histogram serves


def test_a_new_method_is_one_table_entry(monkeypatch, rng):
    """Adding a calibration method takes one RANGE_RULES entry: compute_range and make_observer follow."""
    from onnxcompress.quant import observers

    monkeypatch.setitem(observers.RANGE_RULES, "half_minmax", lambda c, symmetric, _p: (c.min / 2, c.max / 2))
    c = collect(rng.standard_normal(1000))
    assert compute_range(c, "half_minmax") == (c.min / 2, c.max / 2)
    obs = make_observer("half_minmax")
    obs.update(np.array([-4.0, 2.0]))
    assert obs.range() == (-2.0, 1.0)


def _one_shot(values: np.ndarray, bins: int) -> tuple[float, np.ndarray, np.ndarray, int]:
    """Reference: the whole array binned at once by ``floor(x / w) + bins`` (the pre-chunking code)."""
    amax = float(np.abs(values).max())
    _, exp = math.frexp(amax / bins)
    w = math.ldexp(1.0, exp)
    both = np.bincount((np.floor(values.astype(np.float64) / w) + bins).astype(np.intp), minlength=2 * bins)
    zeros = int(values.size - np.count_nonzero(values))
    pos = both[bins:].copy()
    pos[0] -= zeros
    return w, pos, both[bins - 1::-1], zeros


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_chunked_single_pass_equals_binning_all_at_once(dtype):
    from onnxcompress.quant.histogram import CHUNK

    rng = np.random.default_rng(5)
    parts = [(rng.standard_normal(CHUNK * 2 + 17) * s).astype(dtype) for s in (0.5, 3.0, 40.0)]
    parts[1][::5] = 0
    c = HistogramCollector(256)
    for p in parts:
        c.update(p.reshape(-1, 1))
    everything = np.concatenate(parts)
    w, pos, neg, zeros = _one_shot(everything, 256)
    assert (c.width, c.zeros, c.count) == (w, zeros, everything.size)
    np.testing.assert_array_equal(c.pos, pos)
    np.testing.assert_array_equal(c.neg, neg)
    assert compute_range(c, "minmax") == (float(everything.min()), float(everything.max()))  # exactly


def test_one_collection_serves_every_method_like_separate_observers():
    rng = np.random.default_rng(6)
    batches = [np.maximum(rng.standard_normal(50_000).astype(np.float32) * 2 - 0.3, -0.5) for _ in range(3)]
    shared = HistogramCollector()
    for b in batches:
        shared.update(b)
    for method in METHODS:
        alone = make_observer(method)
        for b in batches:
            alone.update(b)
        for symmetric in (False, True):
            assert compute_range(shared, method, symmetric=symmetric) == alone.range(symmetric=symmetric)


def test_mse_two_sided_descent_skips_searches_it_already_made(rng, monkeypatch):
    """The asymmetric two-sided search alternates hi and lo for three rounds; once a bound comes
    back where it was, the remaining searches would repeat earlier ones with the same arguments:
    they are not run again, and the range is the one the full three rounds give."""
    from onnxcompress.quant import observers

    x = rng.standard_normal(N)
    x = x / (1.0 + np.exp(-x))  # SiLU: a short negative tail
    c = collect(x)
    xs, n = observers._signed_centres(c)
    lo, hi = c.min, c.max
    for _ in range(3):  # the descent, every search run
        hi = observers._search(lambda h, lo=lo: observers._grid_error(xs, n, np.full(h.shape, lo), h, symmetric=False), c.max)
        lo = -observers._search(lambda m, hi=hi: observers._grid_error(xs, n, -m, np.full(m.shape, hi), symmetric=False),
                                -c.min)
    calls = []
    real = observers._search
    monkeypatch.setattr(observers, "_search", lambda *a: calls.append(1) or real(*a))
    assert compute_range(c, "mse") == (lo, hi)
    assert len(calls) < 6


def test_ranges_are_computed_in_threads_in_order(monkeypatch):
    """plan_params computes the tensors' ranges in RANGE_THREADS threads (each search is numpy work
    on its own histogram); the results come back in the items' order."""
    import threading

    from onnxcompress.quant import sensitivity

    monkeypatch.setattr(sensitivity, "RANGE_THREADS", 2)
    names = set()

    def work(i):
        names.add(threading.current_thread().name)
        return i * i

    assert sensitivity._in_threads(work, list(range(40))) == [i * i for i in range(40)]
    assert threading.current_thread().name not in names


def test_sampled_histogram_keeps_exact_extremes_and_weights_the_sample():
    from onnxcompress.quant.histogram import SAMPLE_BLOCK

    rng = np.random.default_rng(7)
    x = rng.standard_normal(1_000_003).astype(np.float32)
    x[::3] = 0.0
    x[123_457] = 9.5  # an outlier the sample almost surely misses: min/max must still see it
    c = HistogramCollector(256, sample=50_000)
    c.update(x)
    k = x.size // 50_000
    binned = (c.pos.sum() + c.neg.sum() + c.zeros)
    assert (c.count, c.min, c.max) == (x.size, float(x.min()), 9.5)
    assert binned % k == 0 and abs(binned - x.size) <= (k + 1) * SAMPLE_BLOCK  # each sampled value counts k times
    assert abs(c.zeros / binned - 1 / 3) < 0.01
    again = HistogramCollector(256, sample=50_000)
    again.update(x)
    np.testing.assert_array_equal(again.pos, c.pos)  # seeded: the same sample every time
    exact = HistogramCollector(256)
    exact.update(x)
    lo, hi = compute_range(c, "percentile", percentile=99.0)  # (a 99.99 % tail is 2 values of this sample)
    elo, ehi = compute_range(exact, "percentile", percentile=99.0)
    assert abs(hi - ehi) < 0.02 * ehi and abs(lo - elo) < 0.02 * abs(elo)
    # the mse optimum is flat: the sample moves the range more than the error it gives on all the values
    from onnxcompress.quant.observers import _grid_error, _signed_centres

    centres, counts = _signed_centres(exact)
    err = [_grid_error(centres, counts, np.array([r[0]]), np.array([r[1]]), symmetric=False)[0]
           for r in (compute_range(c, "mse"), compute_range(exact, "mse"))]
    assert err[0] < 1.1 * err[1]  # (1.06 here: a 5 % sample)


def test_sampled_histogram_does_not_follow_a_layout_stride():
    """Every other value (one channel of two in a channels-last layout, say) is a large one: a sample
    taking every k-th value for an even k would see only one kind."""
    x = np.tile(np.array([0.25, 8.0], np.float32), 400_000)
    c = HistogramCollector(256, sample=20_000)
    c.update(x)
    assert c.pos.sum() > 0 and abs(c.pos[c.pos > 0].min() / c.pos.sum() - 0.5) < 1e-6


def test_small_updates_are_binned_exactly_with_sample():
    rng = np.random.default_rng(8)
    parts = [rng.standard_normal(n).astype(np.float32) for n in (10_000, 19_999, 5)]
    c, exact = HistogramCollector(sample=10_000), HistogramCollector()
    for p in parts:
        c.update(p)
        exact.update(p)
    np.testing.assert_array_equal(c.pos, exact.pos)
    np.testing.assert_array_equal(c.neg, exact.neg)
    with pytest.raises(ValueError):
        HistogramCollector(sample=10)
