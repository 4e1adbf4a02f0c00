import numpy as np
import pytest

from onnxcompress.core.errors import InputError
from onnxcompress.core.proto import with_outputs
from onnxcompress.runtime.capture import capture
from onnxcompress.runtime.data import RandomSource, input_specs
from tests.helpers.builders import parse

MODEL = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y) {
  h = Relu(x)
  n = Neg(h)
  y = Add(n, n)
}""")


def test_capture_streams_intermediates_and_inputs():
    src = RandomSource(input_specs(MODEL), 10, seed=3)
    seen = []
    n = capture(MODEL, ["h", "x", "y"], src, lambda batch, t: seen.append((batch, t)), batch_size=4)
    assert n == 10 and [len(b) for b, _ in seen] == [4, 4, 2]
    for batch, t in seen:
        x = batch.feeds["x"]
        np.testing.assert_array_equal(t["x"], x)
        np.testing.assert_array_equal(t["h"], np.maximum(x, 0))
        np.testing.assert_array_equal(t["y"], -2 * np.maximum(x, 0))


def test_capture_initializer_and_unknown_name():
    m = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y) <float[3] b = {1.0, 1.0, 1.0}> { y = Add(x, b) }""")
    got = {}
    capture(m, ["b"], RandomSource(input_specs(m), 1), lambda b, t: got.update(t))
    np.testing.assert_array_equal(got["b"], np.ones(3, np.float32))
    with pytest.raises(InputError, match="not produced"):
        with_outputs(m, ["nope"])
    assert [o.name for o in with_outputs(MODEL, ["h"]).graph.output] == ["y", "h"]


def test_exposing_adds_the_outputs_for_the_block_only():
    """``exposing`` is ``with_outputs`` without a copy: the same outputs inside the block, the model
    byte for byte as it was after it (also when the block or the name check fails)."""
    from onnxcompress.core.proto import exposing

    before = MODEL.SerializeToString()
    with exposing(MODEL, ["h", "y"]) as exposed:
        assert exposed is MODEL
        assert exposed.graph.output == with_outputs(MODEL, ["h", "y"]).graph.output
    assert MODEL.SerializeToString() == before
    with pytest.raises(InputError, match="not produced"):
        with exposing(MODEL, ["nope"]):
            pass
    with pytest.raises(RuntimeError):
        with exposing(MODEL, ["h"]):
            raise RuntimeError("session failed")
    assert MODEL.SerializeToString() == before


def test_memory_budget_cuts_batches_into_runs_whatever_the_number_of_samples():
    """The capture never holds more than one run: with a budget of 5 samples' tensors, every
    consumer call gets at most 5 samples, for 12 or 60 samples alike, and sees every sample once."""
    per_sample = 3 * 4 * 2  # h and y: float32[3] each
    for total in (12, 60):
        src = RandomSource(input_specs(MODEL), total, seed=3)
        sizes, xs = [], []
        capture(MODEL, ["h", "y", "x"], src, lambda b, t, sizes=sizes, xs=xs: (sizes.append(len(b)), xs.append(t["x"])),
                batch_size=32, max_bytes=5 * per_sample)
        assert sizes[0] == 1 and max(sizes) == 5 and sum(sizes) == total
        np.testing.assert_array_equal(np.concatenate(xs), np.concatenate([b.feeds["x"] for b in src.batches(32)]))


def test_statistics_with_and_without_budget_are_identical():
    from onnxcompress.quant.histogram import HistogramCollector

    src = RandomSource(input_specs(MODEL), 40, seed=4)
    stats = []
    for budget in (None, 50):
        c = {n: HistogramCollector(64) for n in ("h", "y")}
        capture(MODEL, ["h", "y"], src, lambda b, t, c=c: [c[n].update(t[n]) for n in c], batch_size=16, max_bytes=budget)
        stats.append(c)
    for n in ("h", "y"):
        for k, v in stats[0][n].to_arrays().items():
            np.testing.assert_array_equal(v, stats[1][n].to_arrays()[k])


def test_progress_of_samples_shows_samples_per_second():
    import types

    from onnxcompress.runtime.progress import _rate_column, track

    column = _rate_column()
    assert column.render(types.SimpleNamespace(fields={"samples": True}, speed=12.34)).plain == "12.3 samples/s"
    assert column.render(types.SimpleNamespace(fields={}, speed=12.34)).plain == ""
    assert list(track([[1, 2], [3]], "x", enabled=False, unit=len)) == [[1, 2], [3]]


def test_overlap_consumes_runs_in_order_in_one_worker_with_an_eighth_of_the_budget():
    """With ``overlap`` two runs are alive at once (one consumed while the next is computed): each run
    aims at an eighth of the budget, and one worker thread sees every sample once, in order."""
    import threading

    per_sample = 3 * 4 * 2
    src = RandomSource(input_specs(MODEL), 30, seed=5)
    sizes, xs, threads = [], [], set()

    def consume(b, t):
        sizes.append(len(b))
        xs.append(t["x"])
        threads.add(threading.current_thread().name)

    assert capture(MODEL, ["h", "y", "x"], src, consume, batch_size=8, max_bytes=17 * per_sample, overlap=True) == 30
    assert sizes[0] == 1 and max(sizes) == 2 and sum(sizes) == 30
    np.testing.assert_array_equal(np.concatenate(xs), np.concatenate([b.feeds["x"] for b in src.batches(8)]))
    assert len(threads) == 1 and threading.current_thread().name not in threads


def test_overlap_raises_the_consumers_error():
    src = RandomSource(input_specs(MODEL), 12, seed=5)
    calls = []

    def consume(b, t):
        calls.append(len(b))
        if len(calls) == 2:
            raise ValueError("consumer failed")

    with pytest.raises(ValueError, match="consumer failed"):
        capture(MODEL, ["h"], src, consume, batch_size=4, overlap=True)
    assert len(calls) <= 3


def test_overlap_is_dropped_when_one_sample_exceeds_half_the_budget():
    """Two runs alive must still fit the budget: with room for 1.5 samples the runs hold one sample
    each and are consumed in the caller's thread, one after the other."""
    import threading

    per_sample = 3 * 4 * 2
    src = RandomSource(input_specs(MODEL), 6, seed=5)
    sizes, threads = [], set()

    def consume(b, t):
        sizes.append(len(b))
        threads.add(threading.current_thread().name)

    capture(MODEL, ["h", "y"], src, consume, batch_size=8, max_bytes=per_sample * 3 // 2, overlap=True)
    assert sizes == [1] * 6 and threads == {threading.current_thread().name}
