"""KeptValues (graph outputs kept over every sample for bias_correction's check) and StagedBatches
(frontier tensors) hold copies:
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
    kept.add({"y": base[:2], "other": base}, 2)
    kept.add({"y": base[2:]}, 2)
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
    assert stats.samples == 10 and all(p["y"].base is None for _, p in stats.kept.parts)
    np.testing.assert_array_equal(stats.kept.arrays()["y"], np.concatenate(seen))


def test_kept_values_drop_ragged_batches():
    kept = KeptValues(["y"])
    kept.add({"y": np.zeros((2, 3), np.float32)}, 2)
    kept.add({"y": np.zeros((2, 4), np.float32)}, 2)
    assert kept.arrays() is None


def test_kept_values_of_outputs_whose_axis_0_is_not_the_samples_are_kept_run_by_run():
    """A sequence-first output ``[T, N, C]`` (ddddocr's CTC head): cutting the concatenation back
    into batches by its axis 0 would hand the check another tensor, so it is not stacked; the runs
    are kept as they are, for batches that are those runs."""
    kept = KeptValues(["y"])
    kept.add({"y": np.zeros((2, 3), np.float32)}, 2)
    kept.add({"y": np.ones((16, 1, 3), np.float32)}, 1)
    assert kept.arrays() is None
    assert [(n, v[0].shape) for n, v in kept.runs()] == [(2, (2, 3)), (1, (16, 1, 3))]
    kept = KeptValues(["y"])
    kept.add({"y": np.zeros((16, 1, 3), np.float32)}, 1)
    assert kept.arrays() is None and len(kept.runs()) == 1


def test_staged_frontier_tensors_come_from_sessions_without_an_arena(monkeypatch):
    """Stored frontier tensors are onnxruntime's outputs as they are (views): only a session without
    a memory arena makes each output its own allocation, so a stored one pins nothing else."""
    import onnx_graphsurgeon as gs

    from onnxcompress.quant import staged
    from onnxcompress.quant.staged import StagedBatches

    arenas = []
    real = staged.make_session
    monkeypatch.setattr(staged, "make_session", lambda m, **k: arenas.append(k.get("arena", True)) or real(m, **k))
    src = RandomSource(input_specs(MODEL), 6, seed=2)
    graph = gs.import_onnx(MODEL)
    with StagedBatches(src.batches(4)) as store:
        store.run(graph, ["x"], ["h"], keep=["h"])
        stored = [store._store.get((i, "h")) for i in range(2)]
        got = []
        store.run(graph, ["h"], ["y"], lambda _b, v: got.append(v["y"]))
    x = np.concatenate([b.feeds["x"] for b in src.batches(4)])
    np.testing.assert_array_equal(np.concatenate(stored), np.maximum(x, 0))
    np.testing.assert_array_equal(np.concatenate(got), -np.maximum(x, 0))
    assert arenas == [False, False]


def test_pruning_sensitivity_reference_owns_its_memory():
    """MaskedError keeps the unpruned model's outputs for every group it measures: copies, not views."""
    import onnx_graphsurgeon as gs

    from onnxcompress.pruning.dependency import analyze
    from onnxcompress.pruning.sensitivity import MaskedError
    from tests.passes.test_prune_budget import two_groups

    model = two_groups(a_matters=True)
    src = RandomSource(input_specs(model), 8, seed=3)
    evaluate = MaskedError(analyze(gs.import_onnx(model)), src, samples=8, batch_size=4)
    assert all(out.base is None for outs in evaluate.reference for out in outs)
    assert evaluate.error({}) == 0.0
