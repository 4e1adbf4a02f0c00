"""The over-2-GB code paths, exercised on a ~10 MB model with the size thresholds lowered.

``scripts/large_model.py`` measures the real thing (a 2.3 GB model); these tests check that the
same code paths give correct models: external-data save and load, the checker given a path, the
single-copy export, weight-less metrics, and simplify declining onnxsim.
"""

import gc
import weakref

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.core import serde
from onnxcompress.core.metrics import model_metrics
from onnxcompress.core.pass_api import Pass, PassContext, PassResult
from onnxcompress.core.shapes import infer_shapes
from onnxcompress.passes import simplify as simplify_mod
from onnxcompress.passes.factorize_svd import FactorizeSvd
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.runtime import session as runtime
from tests.helpers.runs import ort_run, rel_err

SMALL = 1 << 20  # 1 MiB: the model below (~10 MB) counts as "over 2 GB"


def _big_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    c, h = 8, 1024
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var"),
        numpy_helper.from_array((rng.standard_normal((c, h)) * 0.3).astype(np.float32), "fc1"),
        numpy_helper.from_array((rng.standard_normal((h, h)) * 0.03).astype(np.float32), "fc2"),  # 4 MiB
        numpy_helper.from_array((rng.standard_normal((h, h)) * 0.03).astype(np.float32), "fc3"),
        numpy_helper.from_array((rng.standard_normal((h, 10)) * 0.03).astype(np.float32), "fc4"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc1"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "fc2"], ["m2"], name="mm2"),
        helper.make_node("Relu", ["m2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "fc3"], ["m3"], name="mm3"),
        helper.make_node("Relu", ["m3"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "fc4"], ["logits"], name="mm4"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", 1, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def low_limits():
    """Make every size check treat megabytes as the 2 GB limit."""
    with serde.size_limits(proto=SMALL, external=SMALL):
        yield


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}


def test_save_external_streams_and_leaves_model_unchanged(tmp_path, low_limits):
    m = _big_model()
    before = m.SerializeToString()
    path = serde.save_model(m, tmp_path / "m.onnx")  # external chosen from the (lowered) threshold
    assert m.SerializeToString() == before
    data = tmp_path / "m.onnx.data"
    assert data.exists() and path.stat().st_size < 100_000
    stored = onnx.load(str(path), load_external_data=False)
    offsets = [int(e.value) for t in stored.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    assert {t.name for t in stored.graph.initializer if t.external_data} >= {"fc2", "fc3"}
    loaded = serde.load_model(path)
    for a, b in zip(m.graph.initializer, loaded.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert not list(tmp_path.glob(".onnxcompress-*"))


def test_check_model_over_threshold_uses_a_path(low_limits):
    m = _big_model()
    serde.check_model(m, full=True)  # valid: passes through the sparse external copy
    bad = _big_model()
    bad.graph.node[7].input[0] = "nowhere"
    with pytest.raises(onnx.checker.ValidationError):
        serde.check_model(bad, full=True)


def test_load_checks_big_models_without_serializing(tmp_path, low_limits):
    m = _big_model()
    serde.save_model(m, tmp_path / "m.onnx", external=True)
    assert serde.load_model(tmp_path / "m.onnx").graph.initializer[6].name == "fc2"
    bad = _big_model()
    bad.graph.node[1].input[0] = "nowhere"
    serde.save_model(bad, tmp_path / "bad.onnx", external=True)
    with pytest.raises(serde.InputError, match="checker"):
        serde.load_model(tmp_path / "bad.onnx")


@pytest.mark.parametrize("touch", [False, True])
def test_to_model_single_copy_export_is_exact(touch):
    m = _big_model()
    graph = serde.to_graph(m)
    if touch:  # loaded to numpy and replaced: exported from the array
        graph.tensors()["fc3"].values = graph.tensors()["fc3"].values * 2
    out = serde.to_model(graph, m)
    got = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    if touch:
        want["fc3"] = want["fc3"] * 2
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert all(not isinstance(t._values, serde._Header) for t in graph.tensors().values() if hasattr(t, "_values"))
    onnx.checker.check_model(out, full_check=True)


def test_metrics_of_big_model_without_copying_weights():
    m = _big_model()
    before = m.SerializeToString()
    metrics = model_metrics(m)
    assert m.SerializeToString() == before
    assert metrics.params == sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    assert metrics.macs > 2 * 1024 * 1024


def test_simplify_declines_onnxsim_over_limit(low_limits):
    m = _big_model()
    out, report = api.optimize(m, "simplify", validate=False)
    (record,) = report.passes
    assert (("<model>", simplify_mod.R_TOO_LARGE) in record.result.where_codes())
    onnx.checker.check_model(out)


def test_cli_pipeline_external_data_matches_ort(tmp_path, low_limits):
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    serde.save_model(_big_model(), src, external=True)
    out = tmp_path / "out.onnx"
    rc = main(["-q", "optimize", str(src), "--passes", "fold_bn,simplify", "-o", str(out), "--external-data",
               "--samples", "4", "--batch-size", "4"])
    assert rc == 0
    assert (tmp_path / "out.onnx.data").exists()
    ref, new = serde.load_model(src), serde.load_model(out)
    assert "BatchNormalization" not in {n.op_type for n in new.graph.node}
    feeds = _feeds()
    assert rel_err(ref, new, feeds) < 1e-5
    session = runtime.make_session(new)  # over the (lowered) limit: loaded from an external-data copy
    np.testing.assert_allclose(session.run(None, feeds)[0], ort_run(new, feeds)[0], rtol=1e-6, atol=1e-6)


def test_optimize_without_validation_releases_nothing_it_needs(low_limits):
    m = _big_model()
    before = m.SerializeToString()
    out, report = api.optimize(m, "fold_bn,quantize_int8:weights_only=true", validate=False)
    assert m.SerializeToString() == before  # the caller's model is copied, never modified
    assert report.before.params > 0 and report.after.nodes > len(m.graph.node)
    onnx.checker.check_model(out, full_check=True)


def test_infer_shapes_over_threshold_types_every_tensor(low_limits):
    m = _big_model()
    weights = [numpy_helper.to_array(t).copy() for t in m.graph.initializer]
    out = infer_shapes(m)
    assert out is m  # in place above the threshold (no second copy of the weights)
    typed = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in out.graph.value_info}
    assert typed["m2"][1] == 1024 and typed["c"][1:] == [8, 8, 8]
    assert [i.name for i in out.graph.input] == ["x"]
    for t, w in zip(out.graph.initializer, weights):
        np.testing.assert_array_equal(numpy_helper.to_array(t), w)


def test_quantize_weights_only_over_threshold(low_limits):
    out, report = api.optimize(_big_model(), "quantize_int8:weights_only=true", validate=False)
    assert report.passes[0].result.stats.get("weights_int8", 0) == 5
    onnx.checker.check_model(out, full_check=True)


# ---------------------------------------------------------------- releasing the input model


def _with_constant_node() -> onnx.ModelProto:
    """``_big_model`` with a ``Constant`` node (its tensor lives in a node attribute) feeding an Add."""
    m = _big_model()
    value = numpy_helper.from_array(np.arange(10, dtype=np.float32), "k")
    m.graph.node.append(helper.make_node("Constant", [], ["k"], value=value, name="k"))
    m.graph.node.append(helper.make_node("Add", ["logits", "k"], ["out"], name="add"))
    m.graph.output[0].name = "out"
    return m


def test_detach_weights_makes_the_graph_independent_of_the_model():
    m = _with_constant_node()
    graph = serde.to_graph(m)
    want = serde.to_model(graph).SerializeToString()
    assert serde.detach_weights(graph) == len(m.graph.initializer) + 1  # + the Constant node's tensor
    for init in m.graph.initializer:  # the source model changes: the graph must not notice
        init.raw_data = bytes(len(init.raw_data))
    m.graph.node[-2].attribute[0].t.raw_data = bytes(40)
    m.opset_import[0].version = 13
    assert serde.to_model(graph).SerializeToString() == want
    assert np.array_equal(graph.tensors()["fc2"].values, numpy_helper.to_array(_big_model().graph.initializer[6]))


def test_detached_big_weights_live_in_a_file_and_export_whole():
    from onnxcompress.core.spill import SpilledValues

    m = _with_constant_node()
    graph = serde.to_graph(m)
    want = {i.name: i.SerializeToString() for i in serde.to_model(graph).graph.initializer}
    serde.detach_weights(graph)
    spilled = {t.name for t in graph.tensors().values() if isinstance(t, gs.Constant) and isinstance(t._values, SpilledValues)}
    assert spilled == {i.name for i in m.graph.initializer if len(i.raw_data) >= SMALL}
    assert spilled  # the model has weights of 1 MiB and more
    direct = gs.export_onnx(graph, do_type_check=False)  # graphsurgeon's own export (segment models) reads the file
    assert {i.name: i.SerializeToString() for i in direct.graph.initializer} == want
    name = sorted(spilled)[0]
    lazy = graph.tensors()[name]._values
    values = graph.tensors()[name].values
    before = values.copy()
    values[0] = 7.0  # an edit of the read array stays private to it (copy-on-write map)
    assert np.array_equal(lazy.load(), before) and not np.array_equal(values, before)


class _Spy(Pass):
    """Test pass: zeroes the caller's model's weights, then records what the graph holds."""

    name = "spy_release"

    def __init__(self, held: onnx.ModelProto):
        super().__init__()
        self.held, self.seen = held, {}

    def run(self, graph, ctx):
        for init in self.held.graph.initializer:
            init.raw_data = bytes(len(init.raw_data))
        self.seen = {t.name: t.values.copy() for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        return PassResult()


class _KeepSpy(_Spy):
    """The same, for a pass that asks to keep sharing the input's weights."""

    name = "spy_keep"
    releases_input = False


@pytest.mark.parametrize("release, spy_class", [(False, _Spy), (True, _Spy), (True, _KeepSpy)])
def test_owned_run_releases_the_input_before_the_pass(release, spy_class):
    """Released: the pass's graph no longer shares the input's weights (and an unchanged pass
    hands back the same bytes). Not released (small model, or a pass with ``releases_input``
    False): it does, and an unchanged model comes back as is."""
    m = _big_model()
    want = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    before = _big_model().SerializeToString()
    spy = spy_class(m)
    out, _ = PassManager([spy], check=False, release_bytes=0 if release else 1 << 62).run(m, owned=True)
    released = release and spy.releases_input
    assert np.array_equal(spy.seen["fc2"], want["fc2"]) is released
    if released:
        assert out is not m and out.SerializeToString() == before
    else:
        assert out is m


SPECS = ["fold_bn", "prune_channels", "factorize_svd:rank=8", "quantize_int8:weights_only=true",
         "factorize_svd:min_channels=100000", "fold_bn,prune_channels,simplify"]


@pytest.mark.parametrize("spec", SPECS)
def test_released_input_gives_the_same_model(spec):
    """What ``optimize`` without validation runs (the manager, input owned), releasing every input."""
    m = _big_model()
    want, report = api.optimize(m, spec, validate=False)  # ~10 MB: under RELEASE_BYTES, nothing released
    got, _ = PassManager(parse_spec(spec), release_bytes=0).run(serde.load_model(m), owned=True)
    assert got.SerializeToString() == want.SerializeToString()
    assert m.SerializeToString() == _big_model().SerializeToString()
    if spec.endswith("100000"):
        assert not report.passes[0].result.modified  # the unchanged case: re-exported byte for byte


def test_factorize_keeps_no_replaced_weight():
    graph = serde.to_graph(_big_model())
    ref = weakref.ref(graph.tensors()["fc2"].values)
    result = FactorizeSvd(rank=8).run(graph, PassContext())
    gc.collect()
    assert result.stats["layers_factorized"] == 2 and ref() is None
    assert result.stats["params_before"] == 2 * 1024 * 1024
    assert result.stats["params_after"] == 2 * 2 * 1024 * 8


def test_check_by_path_from_its_threshold(monkeypatch):
    given = []
    check = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda model, **kw: (given.append(model), check(model, **kw))[1])
    serde.check_model(_big_model(), full=True)
    with serde.size_limits(check_by_path=SMALL):
        serde.check_model(_big_model(), full=True)
        bad = _big_model()
        bad.graph.node[7].input[0] = "nowhere"
        with pytest.raises(onnx.checker.ValidationError):
            serde.check_model(bad, full=True)
    assert [type(m) for m in given] == [onnx.ModelProto, str, str]  # in memory under it, by path from it
