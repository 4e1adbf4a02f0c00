"""KeptValues (graph outputs kept over every sample for bias_correction's check) holds copies:
an onnxruntime output array is a view whose base pins the session's whole memory arena, so
keeping the view would keep the calibration run's arena alive for the rest of the pipeline."""

import gc
import weakref

import numpy as np

from onnxcompress.quant.bias_correction import FloatStatistics, KeptValues
from onnxcompress.runtime.capture import capture
from onnxcompress.runtime.data import RandomSource, input_specs
from tests.helpers.builders import parse

MODEL = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y) {
  h = Relu(x)
  y = Neg(h)
}""")


def test_kept_values_hold_no_reference_to_the_given_arrays():
    base = np.arange(12, dtype=np.float32).reshape(4, 3).copy()  # owns its memory
    gone = weakref.ref(base)
    kept = KeptValues(["y"])
    kept.add({"y": base[:2], "other": base})
    kept.add({"y": base[2:]})
    del base
    gc.collect()
    assert gone() is None  # neither the views nor their base outlive the call
    np.testing.assert_array_equal(kept.arrays()["y"], np.arange(12, dtype=np.float32).reshape(4, 3))


def test_kept_onnxruntime_outputs_own_their_memory():
    src = RandomSource(input_specs(MODEL), 10, seed=1)
    stats = FloatStatistics(src, 4, {}, ["y"])
    seen = []

    def consume(batch, values):
        assert values["y"].base is not None  # what onnxruntime hands out: a view of its buffer
        seen.append(-np.maximum(batch.feeds["x"], 0))
        stats.update(batch, values)

    assert capture(MODEL, ["y"], src, consume, batch_size=4) == 10
    assert stats.samples == 10 and all(p["y"].base is None for p in stats.kept.parts)
    np.testing.assert_array_equal(stats.kept.arrays()["y"], np.concatenate(seen))


def test_kept_values_drop_ragged_batches():
    kept = KeptValues(["y"])
    kept.add({"y": np.zeros((2, 3), np.float32)})
    kept.add({"y": np.zeros((2, 4), np.float32)})
    assert kept.arrays() is None
