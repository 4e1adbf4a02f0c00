"""The streaming reconstruction engine: float32 normal equations, row subsampling, segment runs of
the student and the teacher from a kept frontier, stacking of fixed-batch samples, rows-vs-features."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcompress.core import serde
from onnxcompress.core.proto import with_outputs
from onnxcompress.reconstruct.lstsq import LstsqAccumulator
from onnxcompress.reconstruct.refit import LayerTarget, reconstruct_layers, refit_summary
from onnxcompress.runtime.data import RandomSource, input_specs
from onnxcompress.runtime.segments import SegmentRunner, batches
from onnxcompress.runtime.session import make_session
from tests.helpers.builders import make_model
from tests.helpers.tensors import he
from tests.test_reconstruct import with_weight


def chain(batch: int | str = "N", reshape_batch: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """x → Conv a → Relu → Conv b → Relu → Conv c (+ a skip from the first Relu) → Add → Conv d.

    With ``reshape_batch`` a Reshape to ``[1, 4, 6, 6]`` and back hard-codes the batch size 1."""
    rng = np.random.default_rng(3)
    inits = {f"w{k}": he(rng, 4, 4 if k != "a" else 3, 3, 3) for k in "abcd"}
    inits["shape"] = np.array([1, 4, 6, 6], np.int64)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], "ca", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ra"], "relu_a"),
             helper.make_node("Conv", ["ra", "wb"], ["b"], "cb", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["rb"], "relu_b"),
             helper.make_node("Conv", ["rb", "wc"], ["c"], "cc", pads=[1] * 4),
             helper.make_node("Add", ["c", "ra"], ["s"], "add"),
             helper.make_node("Conv", ["s", "wd"], ["d"], "cd", pads=[1] * 4)]
    if reshape_batch:
        nodes[5] = helper.make_node("Add", ["c", "ra"], ["s0"], "add")
        nodes.insert(6, helper.make_node("Reshape", ["s0", "shape"], ["s"], "fixed"))
    model = make_model(nodes, {"x": [batch, 3, 6, 6]}, ["d"], inits)
    return model, ["ca", "cb", "cc", "cd"]


def student_of(teacher: onnx.ModelProto) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    out = teacher
    for name in ("wa", "wb", "wc"):
        w = next(onnx.numpy_helper.to_array(i) for i in teacher.graph.initializer if i.name == name)
        out = with_weight(out, name, w * (1 + 0.3 * rng.standard_normal(w.shape)))
    return out


def weights(graph, names: list[str]) -> list[np.ndarray]:
    by = {n.name: n for n in graph.nodes}
    return [np.asarray(by[n].inputs[1].values, np.float64) for n in names]


def targets(names: list[str]) -> list[LayerTarget]:
    return [LayerTarget(n, n[1]) for n in names]


# ---------------------------------------------------------------- normal equations


def _ill_conditioned(rng: np.random.Generator, n: int = 4000, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Two nearly collinear features whose small difference drives the target."""
    base = rng.standard_normal((n, 3))
    X = np.c_[base, base[:, :1] + eps * rng.standard_normal((n, 1))].astype(np.float32)
    X64 = X.astype(np.float64)
    Y = (X64[:, 3:4] - X64[:, :1]) / eps + X64[:, 1:2] + 1e-5 * rng.standard_normal((n, 1))
    return X, Y.astype(np.float32)


def test_float32_normal_equations_match_float64_when_well_conditioned() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 20)).astype(np.float32)
    Y = (X @ rng.standard_normal((20, 4)) + 0.1 * rng.standard_normal((3000, 4))).astype(np.float32)
    solved = {}
    for precision in ("float64", "float32", "auto"):
        acc = LstsqAccumulator(20, 4, precision=precision)
        for part in np.array_split(np.arange(3000), 3):
            acc.add(X[part], Y[part])
        solved[precision] = (acc.solve()[0], acc.upcast)
    w64 = solved["float64"][0]
    for precision in ("float32", "auto"):
        np.testing.assert_allclose(solved[precision][0], w64, rtol=0, atol=1e-4 * np.abs(w64).max())
    assert solved["auto"][1] is False


def test_auto_upcasts_on_an_ill_conditioned_case() -> None:
    X, Y = _ill_conditioned(np.random.default_rng(1))
    ridge = 1e-12
    solved = {}
    for precision in ("float64", "float32", "auto"):
        acc = LstsqAccumulator(4, 1, precision=precision, ridge_hint=ridge)
        for part in np.array_split(np.arange(len(X)), 4):
            acc.add(X[part], Y[part])
        solved[precision] = acc
    w64 = solved["float64"].solve(ridge)[0]
    err32 = solved["float64"].relative_error(*solved["float32"].solve(ridge))
    best = solved["float64"].relative_error(*solved["float64"].solve(ridge))
    assert solved["auto"].upcast and not solved["float32"].upcast
    np.testing.assert_allclose(solved["auto"].solve(ridge)[0], w64, rtol=1e-9, atol=1e-12)
    assert err32 > 100 * best  # float32 alone is far worse here: the check is needed


# ---------------------------------------------------------------- segment runs


def test_segment_runs_equal_full_runs_and_keep_a_frontier() -> None:
    model, _ = chain()
    graph = serde.to_graph(model)
    data = RandomSource(input_specs(model), 10, seed=2)
    steps = [(["a"], ["b", "c", "d"], set(range(7))), (["b"], ["c", "d"], {2, 3, 4, 5, 6}),
             (["c", "ra"], ["d"], {4, 5, 6}), (["d"], [], {6})]
    for cache in (1 << 30, 0):  # in memory, then spilled to disk
        runner = SegmentRunner(graph, cache_bytes=cache)
        for wanted, later, stale in steps:
            runner.prepare(wanted, later, stale)
            for index, batch in enumerate(batches(data, 4)):
                got = runner.run(index, batch)
                full = dict(zip(wanted, make_session(with_outputs(model, wanted)).run(wanted, batch.feeds)))
                for name in wanted:
                    np.testing.assert_allclose(got[name], full[name], rtol=1e-5, atol=1e-5)
        assert runner.nodes_run == 10  # ca 1+1, relu_a 1, cb 1+1, relu_b 1, cc 1+1, add 1, cd 1: a refit node reruns once
        assert (runner.store.folder is not None) == (cache == 0)
        runner.close()


def test_fixed_batch_samples_are_stacked_and_a_hard_coded_batch_is_not(caplog: pytest.LogCaptureFixture) -> None:
    for reshape in (False, True):
        teacher, names = chain(batch=1, reshape_batch=reshape)
        data = RandomSource(input_specs(teacher), 40, seed=4)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="onnxcompress.reconstruct.refit"):
            stacked, stats = reconstruct_layers(serde.to_graph(student_of(teacher)), teacher, targets(names), data,
                                                batch_size=16, precision="float64")
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fixed batch 1")]
        assert said == ["fixed batch 1: run at that size" if reshape else "fixed batch 1: stacked into batches of 16"]
        native, _ = reconstruct_layers(serde.to_graph(student_of(teacher)), teacher, targets(names), data,
                                       batch_size=1, precision="float64")
        for a, b in zip(weights(stacked, names), weights(native, names)):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
        assert stats[1].error_after < stats[1].error_before


# ---------------------------------------------------------------- the engine vs one layer at a time


def test_engine_equals_the_per_layer_path() -> None:
    teacher, names = chain()
    data = RandomSource(input_specs(teacher), 64, seed=6)
    graph = serde.to_graph(student_of(teacher))
    for name in names:  # the old path: one layer per call, the whole student rerun, float64, every row
        graph, _ = reconstruct_layers(graph, teacher, targets([name]), data, precision="float64",
                                      rows_per_feature=None, max_positions=None, group_independent=False)
    engine, stats = reconstruct_layers(serde.to_graph(student_of(teacher)), teacher, targets(names), data,
                                       max_positions=None, rows_per_feature=None)
    for a, b in zip(weights(engine, names), weights(graph, names)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-4 * np.abs(b).max())
    assert [s.node for s in stats] == names and not any(s.upcast for s in stats)


def test_row_subsampling_is_seeded_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    teacher, names = chain()
    data = RandomSource(input_specs(teacher), 32, seed=7)
    runs = [reconstruct_layers(serde.to_graph(student_of(teacher)), teacher, targets(names), data,
                               rows_per_feature=8, seed=seed) for seed in (0, 0, 1)]
    (g0, s0), (g1, _), (g2, _) = runs
    for a, b in zip(weights(g0, names), weights(g1, names)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(weights(g0, names), weights(g2, names)))
    full = reconstruct_layers(serde.to_graph(student_of(teacher)), teacher, targets(names), data,
                              rows_per_feature=None)[1]
    assert all(s.positions <= 8 * (s.features + 1) + 32 for s in s0)  # the budget (+ rounding per batch)
    assert all(a.positions < b.positions for a, b in zip(s0, full))
    summary = refit_summary(s0)
    assert summary["reconstruct_rows"] == sum(s.positions for s in s0)
    assert summary["reconstruct_features"] == sum(s.kept_features for s in s0)
    assert summary["reconstruct_underdetermined"] == 0
    with caplog.at_level(logging.WARNING, logger="onnxcompress.reconstruct.refit"):
        _, few = reconstruct_layers(serde.to_graph(student_of(teacher)), teacher, targets(names),
                                    RandomSource(input_specs(teacher), 1, seed=8), max_positions=20)
    assert refit_summary(few)["reconstruct_underdetermined"] == 4
    assert sum("under-determined" in r.getMessage() for r in caplog.records) == 4


def test_counting_the_batches_reads_no_data(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rows_per_feature`` needs the number of batches: it comes from the file's headers (reading the
    whole calibration set only to count it cost ~280 MB of resident memory on 512 opennsfw crops), and
    equals the count of a source that must be read (same weights)."""
    from onnxcompress.core import fileio
    from onnxcompress.runtime.data import FileSource, IterableSource

    teacher, names = chain(batch=1)
    x = np.concatenate([b.feeds["x"] for b in RandomSource(input_specs(teacher), 40, seed=9).batches()])
    np.savez(tmp_path / "calib.npz", x=x)
    monkeypatch.setattr(fileio, "ROWS_BYTES", 5 * x[0].nbytes)  # 8 reads of 5 rows per pass over the file
    reads = []
    real = fileio._read_rows
    monkeypatch.setattr(fileio, "_read_rows", lambda *a: reads.append(a[1]) or real(*a))

    def refit(data, rows_per_feature):
        reads.clear()
        graph, _ = reconstruct_layers(serde.to_graph(student_of(teacher)), teacher, targets(names), data,
                                      batch_size=16, rows_per_feature=rows_per_feature)
        return weights(graph, names), sum(reads)

    _, plain = refit(FileSource(tmp_path / "calib.npz", input_specs(teacher)), None)
    counted, rows = refit(FileSource(tmp_path / "calib.npz", input_specs(teacher)), 8)
    assert rows == plain  # the count added no read
    read_all, _ = refit(IterableSource([{"x": s} for s in x], input_specs(teacher)), 8)
    for a, b in zip(counted, read_all):
        np.testing.assert_array_equal(a, b)
