"""Bias correction level by level from stored frontiers (quant.staged) equals rerunning the prefix."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcompress.passes import bias_correction as bc_pass
from onnxcompress.quant.staged import StagedBatches, frontier, tensor_depths
from onnxcompress.runtime.data import open_source
from tests.helpers.quant import quantize

RESNET = "models/resnet_digits.onnx"


def _old_sequential(self, graph, names, kept, levels, ctx, result, rel, outputs):
    """The previous implementation: every level measured by a run of the truncated graph from the inputs
    (no outputs of the corrected model: the check, when on, runs it)."""
    for level in levels:
        batch = [(i, s, ref) for i, (s, ref) in enumerate(kept) if s.level == level]
        graph.toposort()
        wanted = {i: (s.measured.name, s.axis) for i, s, _ in batch}
        quant = self._measure(bc_pass._truncated(graph, [n for n, _ in wanted.values()]), wanted, ctx, result)
        self._apply(graph, names, [(s, ref) for _, s, ref in batch], [quant[i] for i, _, _ in batch], ctx, result, rel)
    return None


def _calib(model: onnx.ModelProto, n: int = 24):
    data = np.load("models/digits_calib.npz")
    return open_source([{k: data[k][:n] for k in data.files if k not in ("labels", "label")}], model)


@pytest.mark.parametrize("memory", [256 * 2**20, 0])  # frontier in memory, or all on disk
def test_staged_bias_correction_equals_rerunning_the_prefix(monkeypatch, memory):
    model = onnx.load(RESNET)
    spec = "fold_bn,quantize_int8:method=minmax,bias_correction:batch_size=8:check=false:optimize=false:measure=run"
    monkeypatch.setattr(bc_pass.StagedBatches.__init__, "__defaults__", (False, memory, False))
    new, res_new = quantize(model, spec, calib=_calib(model))
    with monkeypatch.context() as m:
        m.setattr(bc_pass.BiasCorrection, "_sequential", _old_sequential)
        old, res_old = quantize(model, spec, calib=_calib(model))
    assert res_new.stats["levels"] > 3 and res_new.stats["layers_corrected"] == res_old.stats["layers_corrected"]
    assert new.SerializeToString() == old.SerializeToString()


def test_depths_and_frontier_on_a_residual_block():
    import onnx_graphsurgeon as gs

    from tests.helpers.builders import parse

    m = parse("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x) => (float[N,3] y) <float[3] c = {1.0, 2.0, 3.0}> {
  a = Add(x, c)
  b = Relu(a)
  d = Mul(b, c)
  e = Neg(d)
  y = Add(e, b)
}""")
    g = gs.import_onnx(m)
    nodes = {n.outputs[0].name: n for n in g.nodes}
    levels = {id(nodes["a"]): 1, id(nodes["d"]): 2}
    depth = tensor_depths(g, levels)
    assert depth == {"x": 0, "a": 1, "b": 1, "d": 2, "e": 2, "y": 2}
    assert frontier(g, depth, 1) == ["x"]
    assert frontier(g, depth, 2) == ["b"]  # read by Mul (depth 2) and by the residual Add


def test_store_keeps_tensors_in_memory_up_to_its_budget_then_on_disk():
    batches = [type("B", (), {"feeds": {"x": np.full((4, 3), i, np.float32)}})() for i in range(5)]
    with StagedBatches(batches, memory=2 * 48) as store:  # two batches fit in memory, three go to disk
        assert len(store._store.memory) == 2 and len(store._store.files) == 3
        assert store.samples == 20
        assert np.array_equal(store._store.get((4, "x")), np.full((4, 3), 4, np.float32))
        store.keep_only([])
        assert not store._store.keys() and all(not n for n in store._names)



@pytest.mark.parametrize("shape,axis", [((12, 5, 7, 3), 1), ((12, 9, 6), -1), ((12, 4), 1)])
def test_channel_moments_do_not_depend_on_how_samples_are_batched(shape, axis):
    from onnxcompress.quant.bias_correction import ChannelMoments

    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32) * 3 + 1
    whole, parts = ChannelMoments(axis), ChannelMoments(axis)
    whole.update(x)
    for cut in ((0, 1), (1, 6), (6, 12)):
        parts.update(x[cut[0]:cut[1]])
    assert np.array_equal(whole.mean(), parts.mean()) and np.array_equal(whole.var(), parts.var())
    others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(whole.mean(), x.astype(np.float64).mean(axis=others), rtol=1e-12)


def test_check_from_captured_outputs_equals_rerunning_the_models(monkeypatch):
    """The check scores the float outputs captured with the reference moments and the corrected
    model's outputs from the last staged run: the same decision and SQNRs as running both models."""
    model = onnx.load(RESNET)
    spec = "fold_bn,quantize_int8:method=minmax,bias_correction:batch_size=8:optimize=false"
    tails = []
    real_tail = bc_pass._tail
    monkeypatch.setattr(bc_pass, "_tail", lambda *a: tails.append(real_tail(*a)) or tails[-1])
    new, res_new = quantize(model, spec, calib=_calib(model, 20))
    assert tails and tails[0] is not None and len(tails[0]) == 3  # 20 samples: batches of 8, 8, 4
    with monkeypatch.context() as m:
        m.setattr(bc_pass, "_tail", lambda *a: None)
        m.setattr(bc_pass.KeptValues, "arrays", lambda self: None)
        old, res_old = quantize(model, spec, calib=_calib(model, 20))
    keys = ("check_sqnr_before", "check_sqnr_after", "layers_corrected")
    assert [res_new.stats[k] for k in keys] == [res_old.stats[k] for k in keys]
    assert new.SerializeToString() == old.SerializeToString()


def test_optimized_runs_measure_within_noise_of_unoptimized_ones(monkeypatch):
    """optimize=true (the default) runs the QDQ segments with onnxruntime's int8 kernels: the
    corrections may differ slightly from optimize=false, the layers corrected and the outcome do not."""
    from onnxcompress.pipeline.validate import compare_models

    model = onnx.load(RESNET)
    results, seen = {}, []
    real = bc_pass.StagedBatches.__init__
    monkeypatch.setattr(bc_pass.StagedBatches, "__init__", lambda self, *a, **k: seen.append(k["optimize"])
                        or real(self, *a, **k))
    for flag in ("true", "false"):
        spec = f"fold_bn,quantize_int8:method=minmax,bias_correction:batch_size=8:optimize={flag}"
        out, res = quantize(model, spec, calib=_calib(model))
        results[flag] = (out, res)
    (fast, res_fast), (slow, res_slow) = results["true"], results["false"]
    assert seen == [True, False]
    for key in ("layers_corrected", "levels", "runs"):
        assert res_fast.stats[key] == res_slow.stats[key]
    data = _calib(model, 64)
    sqnr = [min(o.sqnr_db for o in compare_models(model, m, data).outputs) for m in (fast, slow)]
    assert abs(sqnr[0] - sqnr[1]) < 0.3, sqnr


def test_channel_moments_without_variance_give_the_same_means():
    from onnxcompress.quant.bias_correction import ChannelMoments

    x = np.random.default_rng(3).standard_normal((6, 4, 5, 5)).astype(np.float32)
    full, means = ChannelMoments(1), ChannelMoments(1, variance=False)
    full.update(x)
    means.update(x)
    assert np.array_equal(full.mean(), means.mean()) and full.var().shape == (4,)
    with pytest.raises(ValueError, match="variance"):
        means.var()


@pytest.mark.parametrize("optimize", ["false", "true"])
def test_means_from_input_sums_correct_like_measured_outputs(monkeypatch, optimize):
    """measure=sums (the default) takes each layer's output means from sums of its input: every
    layer is summed, not run; the corrections match measure=run's to rounding (the first levels,
    before a rounding flip of an int32 bias can carry on) and the outcome is within noise."""
    from onnxcompress.pipeline.validate import compare_models
    from onnxcompress.quant.linear_mean import LinearSums

    model = onnx.load(RESNET)
    deltas: dict[str, list] = {"sums": [], "run": []}
    real = bc_pass.BiasCorrection._apply

    def record(self, graph, names, pairs, quant, ctx, result, rel):
        quant = list(quant)
        deltas[self.opts["measure"]] += [(type(m), ref.mean() - m.mean()) for (_, ref), m in zip(pairs, quant)]
        return real(self, graph, names, pairs, quant, ctx, result, rel)

    monkeypatch.setattr(bc_pass.BiasCorrection, "_apply", record)
    out = {}
    for how in ("sums", "run"):
        spec = f"fold_bn,quantize_int8:method=minmax,bias_correction:batch_size=8:optimize={optimize}:measure={how}"
        out[how] = quantize(model, spec, calib=_calib(model))
    assert all(issubclass(kind, LinearSums) for kind, _ in deltas["sums"])
    assert not any(issubclass(kind, LinearSums) for kind, _ in deltas["run"])
    assert len(deltas["sums"]) == len(deltas["run"]) == out["sums"][1].stats["layers_corrected"] > 5
    first = deltas["sums"][0][1], deltas["run"][0][1]
    np.testing.assert_allclose(first[0], first[1], rtol=1e-4, atol=1e-6 * np.abs(first[1]).max())
    for key in ("layers_corrected", "levels", "runs"):
        assert out["sums"][1].stats[key] == out["run"][1].stats[key]
    data = _calib(model, 64)
    sqnr = [min(o.sqnr_db for o in compare_models(model, out[h][0], data).outputs) for h in ("sums", "run")]
    assert abs(sqnr[0] - sqnr[1]) < 0.3, sqnr


def test_closure_through_graph_links_equals_the_topology():
    """``segments.closure`` walks the graph's own links; it finds what a full :class:`Topology` finds,
    subgraph reads (an If branch reading an outer tensor) and graph inputs included."""
    from onnx import parser

    from onnxcompress.core import serde
    from onnxcompress.runtime.segments import Topology, closure

    model = parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x, bool c) => (float[2] y, float[2] z) <float[2] k = {1.0, 2.0}> {
    a = Relu(x)
    b = Mul(a, k)
    t = If(c) <then_branch = g1 () => (float[2] tt) { tt = Add(b, a) },
               else_branch = g2 () => (float[2] te) { te = Neg(a) }>
    d = Sigmoid(t)
    y = Add(d, b)
    z = Sub(a, x)
}""")
    graph = serde.to_graph(model)
    topology = Topology(graph)
    for wanted, known in ((["y"], set()), (["y", "z"], {"a"}), (["y"], {"t"}), (["d"], {"b"}), (["z"], {"z"})):
        assert closure(graph, wanted, known) == topology.closure(wanted, known), (wanted, known)
    run, leaves = closure(graph, ["d"], {"b"})
    assert {graph.nodes[i].op for i in run} == {"If", "Sigmoid", "Relu"} and leaves == {"b", "c", "x"}

