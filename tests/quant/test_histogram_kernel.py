"""The compiled counting loop of the histograms counts the same integers as numpy's path."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxcompress.quant import histogram
from onnxcompress.quant.histogram import CHUNK, HistogramCollector


@pytest.fixture(autouse=True)
def _kernel_required():
    if not histogram.compiled():
        if os.environ.get("CI"):  # CI installs with a compiler: a missing kernel is a build failure there
            pytest.fail("the compiled histogram kernel (_onnxcompress_histogram) is not installed")
        pytest.skip("the compiled histogram kernel is not installed (no compiler at install time)")


def _collect(monkeypatch, batches, *, compiled: bool, **kwargs) -> HistogramCollector:
    with monkeypatch.context() as m:
        if not compiled:
            m.setattr(histogram, "_kernel", None)
        c = HistogramCollector(**kwargs)
        for b in batches:
            c.update(b)
    return c


def _same(a: HistogramCollector, b: HistogramCollector) -> None:
    assert (a.count, a.zeros, a.min, a.max, a.width) == (b.count, b.zeros, b.min, b.max, b.width)
    np.testing.assert_array_equal(a.pos, b.pos)
    np.testing.assert_array_equal(a.neg, b.neg)


def _both(monkeypatch, batches, **kwargs) -> HistogramCollector:
    fast = _collect(monkeypatch, batches, compiled=True, **kwargs)
    _same(fast, _collect(monkeypatch, batches, compiled=False, **kwargs))
    return fast


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_like_stream_with_growing_range(monkeypatch, dtype):
    rng = np.random.default_rng(0)
    batches = [(np.maximum(rng.standard_normal(CHUNK * 2 + 17), 0) * scale).astype(dtype)
               for scale in (0.01, 1.0, 3.0, 1000.0)]  # the width doubles between batches
    c = _both(monkeypatch, batches)
    assert c.zeros > 0 and c.pos.sum() + c.zeros == c.count


def test_values_on_bin_edges_and_both_signs(monkeypatch):
    w = 2.0**-4
    edges = np.arange(-40, 41, dtype=np.float32) * np.float32(w)  # exact multiples of the width
    halves = edges + np.float32(w / 2)
    c = _both(monkeypatch, [np.concatenate([edges, halves, -halves, [0.0, -0.0]]).astype(np.float32)])
    assert c.neg.sum() > 0 and c.zeros == 3


def test_non_finite_values_odd_sizes_and_weights(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(CHUNK * 3 + 5).astype(np.float32)
    x[::97] = np.nan
    x[5] = np.inf
    _both(monkeypatch, [x, x[:1], x[:1023], x[:1025]])
    _both(monkeypatch, [rng.standard_normal(1 << 18).astype(np.float32)], sample=4096)  # counts of weight > 1


def test_tiny_widths_and_non_float_inputs_take_numpy(monkeypatch):
    _both(monkeypatch, [np.array([1e-35, -3e-36, 0.0], np.float32), np.arange(-5, 300, dtype=np.int64)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # context() restores
@given(hnp.arrays(np.float32, st.integers(1, 3000),
                  elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)))
def test_any_float32_values(monkeypatch, x):
    _both(monkeypatch, [x, -x[::-1].copy()])


def test_a_view_that_is_not_contiguous_is_counted(monkeypatch):
    x = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    _both(monkeypatch, [x[:, ::3], x.T])


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_ranges_are_the_same_bits_with_the_compiled_grid(monkeypatch, symmetric):
    """The MSE search's error terms computed by the kernel equal numpy's to the bit, so every
    chosen range is the same float (relu-like, two-sided and spiky tensors, partial last chunks)."""
    from onnxcompress.quant.observers import _grid_error, compute_range

    rng = np.random.default_rng(4)
    tensors = [np.maximum(rng.standard_normal(50_000), 0) * rng.gamma(2, 1, 50_000),
               rng.standard_normal(70_000) * 3 + 1, np.clip(rng.standard_normal(20_000) * 4, -6, 6),
               rng.laplace(size=30_000) ** 3]
    for x in tensors:
        c = HistogramCollector()
        c.update(x.astype(np.float32))
        fast = compute_range(c, "mse", symmetric=symmetric)
        with monkeypatch.context() as m:
            m.setattr(histogram, "_kernel", None)
            assert compute_range(c, "mse", symmetric=symmetric) == fast
    centres, counts = np.linspace(-5, 7, 1500), rng.integers(0, 50, 1500).astype(np.float64)
    hi = np.linspace(0.5, 7, 256)
    lo = np.full(256, -3.0)
    fast = _grid_error(centres, counts, lo, hi, symmetric=symmetric)
    with monkeypatch.context() as m:
        m.setattr(histogram, "_kernel", None)
        np.testing.assert_array_equal(_grid_error(centres, counts, lo, hi, symmetric=symmetric), fast)
