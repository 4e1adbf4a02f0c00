"""Report integrity (#16 item 6): ``optimize`` JSON records the files it read and wrote (sha256),
``--reference`` validates against the true original of a chain, the report links runs into chains
by hash and says what each row is measured against, keeps runs without a bench, drops sections
without information, clamps plot axes, keeps labels inside the figure and embeds images in HTML.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress import api
from onnxcompress.cli import main
from onnxcompress.core import serde
from onnxcompress.reporting.chains import link_runs, originals
from onnxcompress.reporting.inputs import load_inputs
from onnxcompress.reporting.report import build_report
from tests.helpers.builders import conv_model, small_net

DATA = Path(__file__).parent / "data"
OPT_PRUNE = DATA / "report_optimize_prune.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_json(tmp: Path, name: str, model: str, output: str, sha_in: str, sha_out: str, cosine: float,
              reference: dict | None = None) -> Path:
    """A run's JSON (from the real prune fixture) without labels: quality is cosine, as for a detector."""
    run = json.loads(OPT_PRUNE.read_text())
    out = run["validation"]["outputs"][0]
    for key in ("top1_agreement", "ref_accuracy", "cand_accuracy", "top1_drop"):
        out.pop(key, None)
    out["cosine"] = cosine
    run.update(model=model, output=output,
               input_model={"path": model, "sha256": sha_in * 64, "bytes": 10, "external_data": []},
               output_model={"path": output, "sha256": sha_out * 64, "bytes": 5, "external_data": []},
               reference=reference or {"path": model, "sha256": sha_in * 64, "given": False},
               calibration={"source": "calib.npz", "samples": 256}, preprocess=None)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(run))
    return path


def _bench_json(tmp: Path, times: dict[str, float]) -> Path:
    first = next(iter(times.values()))
    models = [{"name": n, "median_ms": t, "p90_ms": t, "min_ms": t, "ratio_vs_first": t / first}
              for n, t in times.items()]
    path = tmp / "bench.json"
    path.write_text(json.dumps({"machine": {}, "settings": {}, "models": models}))
    return path


def _chain(tmp: Path) -> list[Path]:
    """A -> B (prune), then B -> C validated against B, and B -> C2 validated against A (``--reference``).
    The second runs read B from another folder: only the hashes link them to the first."""
    return [_run_json(tmp, "prune", "work/A.onnx", "work/B.onnx", "a", "b", 0.9990),
            _run_json(tmp, "int8", "copy/B.onnx", "work/C.onnx", "b", "c", 0.9995),
            _run_json(tmp, "int8_ref", "copy/B.onnx", "work/C2.onnx", "b", "d", 0.9959,
                      {"path": "work/A.onnx", "sha256": "a" * 64, "given": True})]


def _table_rows(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| run |")]


# ---------------------------------------------------------------- chains


def test_chain_is_linked_by_hash_and_traced_to_the_original(tmp_path) -> None:
    runs = _chain(tmp_path)
    bench = _bench_json(tmp_path, {"work/A.onnx": 1.0, "copy/B.onnx": 0.6, "work/B.onnx": 0.6,
                                   "work/C.onnx": 0.3, "work/C2.onnx": 0.3})
    md = build_report([*runs, bench], tmp_path / "r.md", plots=False)[0].read_text()
    summary = md.split("## Summary")[1].split("## Passes")[0]
    assert "| int8 | B.onnx (output of prune) |" in summary
    assert "| vs prune (its input, not the original) | 0.999500 |" in summary
    assert "| int8_ref | B.onnx (output of prune) |" in summary and "| vs original | 0.995900 |" in summary
    assert "`int8` is measured against `prune`'s output" in summary
    assert "`onnxcompress optimize copy/B.onnx --reference work/A.onnx ...`" in summary
    assert "| `A.onnx` (sha256 aaaaaaaaaaaa…) → prune → int8 |" in summary
    assert "| `A.onnx` (sha256 aaaaaaaaaaaa…) → prune → int8_ref |" in summary
    rows = _table_rows(md.split("## Accuracy vs latency")[1])
    assert [r.split(" | ")[0] for r in rows] == ["| original", "| prune", "| int8", "| int8_ref"]  # one original
    assert rows[0].startswith("| original | `A.onnx` |  | 1.0000 | 1.000 |")
    assert rows[2] == "| int8 | `C.onnx` | vs prune | 0.9995 | 0.300 | 0.300× | – |"  # not in the front
    assert rows[3].endswith("| yes |") and "Runs not measured against their original" in md


def test_one_original_point_per_original_model(tmp_path) -> None:
    runs = _chain(tmp_path)
    other = _run_json(tmp_path, "other", "x/X.onnx", "x/Y.onnx", "e", "f", 0.99)
    lineages = link_runs(load_inputs([*runs, other]).runs)
    assert [lin.original_key[:1] for lin in lineages] == ["a", "a", "a", "e"]
    assert [lin.reference for lin in lineages] == ["original", "parent", "original", "original"]
    assert [s.label for s in lineages[1].chain] == ["prune", "int8"]
    assert sorted(originals(lineages).values()) == ["original (A.onnx)", "original (X.onnx)"]
    # unlinked by hash (another B), the second run would be its own original
    broken = _run_json(tmp_path, "int8", "work/B.onnx", "work/C.onnx", "z", "c", 0.9995)
    assert link_runs(load_inputs([runs[0], broken]).runs)[1].parent is None


def test_summary_shows_calibration_and_preprocess(tmp_path) -> None:
    run = json.loads(_chain(tmp_path)[0].read_text())
    run.update(calibration={"source": "photos (images)", "samples": 12}, preprocess="size=8x8,order=RGB")
    (tmp_path / "img.json").write_text(json.dumps(run))
    md = build_report([tmp_path / "img.json"], tmp_path / "r.md", plots=False)[0].read_text()
    summary = md.split("## Summary")[1].split("## Passes")[0]
    assert "Calibration: `photos (images)` (12 samples)." in summary
    assert "Preprocess: `size=8x8,order=RGB`." in summary
    md = build_report([tmp_path / "img.json", OPT_PRUNE], tmp_path / "two.md", plots=False)[0].read_text()
    assert "| report_optimize_prune | not recorded | `models/digits_test.npz` (360 samples) | not recorded |" in md


# ---------------------------------------------------------------- sections without information


def test_runs_that_keep_every_layers_macs_get_no_macs_table(tmp_path) -> None:
    run = json.loads(OPT_PRUNE.read_text())
    run["after"]["per_node"] = copy.deepcopy(run["before"]["per_node"])  # int8: same MACs per layer
    for p in run["passes"]:
        p["declined"] = []
    (tmp_path / "int8.json").write_text(json.dumps(run))
    md = build_report([tmp_path / "int8.json"], tmp_path / "r.md", plots=False)[0].read_text()
    assert "## Per-layer MACs" not in md and "MACs before" not in md
    assert "declined (code)" not in md and "Nothing declined" not in md
    assert "top-1 agreement" in md  # columns with values stay
    md = build_report([OPT_PRUNE, tmp_path / "int8.json"], tmp_path / "b.md", plots=False)[0].read_text()
    macs = md.split("## Per-layer MACs")[1].split("\n## ")[0]
    assert "No layer's MACs changed in `int8` (not shown)." in macs
    assert "### report_optimize_prune" in macs and "### int8" not in macs


def test_columns_without_values_are_dropped(tmp_path) -> None:
    md = build_report([_chain(tmp_path)[0]], tmp_path / "r.md", plots=False)[0].read_text()
    header = md.split("## Summary")[1].strip().splitlines()[0]
    assert "cosine (worst)" in header and "top-1 agreement" not in header and "accuracy ref" not in header


# ---------------------------------------------------------------- plots


def _points(qualities: list[float], latencies: list[float]):
    from onnxcompress.reporting.pareto import Point

    return [Point("original" if i == 0 else f"run_{i}", f"m{i}.onnx", q, t, None, "b.json", baseline=i == 0,
                  front=True) for i, (q, t) in enumerate(zip(qualities, latencies))]


def test_pareto_axes_stay_within_the_data_and_100_percent() -> None:
    pytest.importorskip("matplotlib")
    from onnxcompress.reporting.plots import pareto_figure

    fig = pareto_figure(_points([100.0, 97.2, 99.7], [2.0, 0.8, 1.1]), "top-1 agreement %")
    ax = fig.axes[0]
    bottom, top = ax.get_ylim()
    assert top == 100.0 and 96.9 < bottom < 97.2  # no 104 %
    left, right = ax.get_xlim()
    assert 0.0 <= left < 0.8 and 2.0 < right < 2.2
    fig = pareto_figure(_points([0.9999, 0.9959], [2.0, 1.0]), "cosine")
    assert fig.axes[0].get_ylim()[1] == 1.0


def test_pareto_labels_do_not_overlap() -> None:
    pytest.importorskip("matplotlib")
    from onnxcompress.reporting.plots import pareto_figure

    points = _points([99.0, 99.02, 99.04, 99.06, 95.0], [1.0, 1.01, 1.02, 1.03, 0.4])
    fig = pareto_figure(points, "accuracy %")
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(p.label for p in points)  # one label each
    assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    frame = fig.bbox
    assert all(b.x0 >= frame.x0 and b.x1 <= frame.x1 and b.y0 >= frame.y0 and b.y1 <= frame.y1 for b in boxes)


def test_sensitivity_labels_fit_in_the_figure() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from onnxcompress.reporting.plots import sensitivity_figure

    layers = [{"node": f"/model.22/cv3.2/cv3.2.1/conv/Conv_with_a_long_name_{i}", "sqnr_db": 10.0 + i}
              for i in range(20)]
    fig = sensitivity_figure(layers, 15.0, "yolov8n_320.onnx: quantization sensitivity (mse, 64 samples)")
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer, width = fig.canvas.get_renderer(), fig.bbox.width
    for text in (fig.axes[0].xaxis.label, fig.axes[0].title):
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width, text.get_text()


# ---------------------------------------------------------------- optimize records its files


def _images(folder: Path, n: int = 3) -> Path:
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (10, 12), (20 * i, 40, 60)).save(folder / f"{i}.png")
    return folder


def test_optimize_json_records_files_calibration_and_preprocess(tmp_path, capsys) -> None:
    model, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(small_net(), model)
    photos = _images(tmp_path / "photos")
    code = main(["-q", "optimize", str(model), "--passes", "fold_bn,quantize_int8", "--calib", str(photos),
                 "--preprocess", "size=8x8", "-o", str(out), "--json", str(report), "--force"])
    assert code in (0, 1), capsys.readouterr().err
    d = json.loads(report.read_text())
    assert d["input_model"] == {"path": str(model), "sha256": _sha(model), "bytes": model.stat().st_size,
                                "external_data": []}
    assert d["output_model"] == {"path": str(out), "sha256": _sha(out), "bytes": out.stat().st_size,
                                 "external_data": []}
    assert d["reference"] == {**d["input_model"], "given": False}
    assert d["calibration"] == {"source": f"{photos} (images)", "samples": 3}
    assert d["preprocess"] == "size=8x8,resize=stretch,order=RGB,scale=0.00392157,mean=0,std=1,layout=NCHW"


def test_external_data_is_named_not_hashed(tmp_path) -> None:
    path = serde.save_model(small_net(), tmp_path / "big.onnx", external=True)
    model, record = serde.load_model_file(path)
    assert record.sha256 == _sha(path) and record.bytes == path.stat().st_size
    assert record.external_data == ("big.onnx.data",)
    assert len(model.graph.initializer) == 6 and serde.saves_external(model, None) is False


def test_reference_validates_against_another_model(tmp_path) -> None:
    model, ref = tmp_path / "m.onnx", tmp_path / "ref.onnx"
    onnx.save(small_net(0), model)
    onnx.save(small_net(1), ref)  # same inputs and outputs, other weights
    _, own = api.optimize(model, "fold_bn")
    _, other = api.optimize(model, "fold_bn", reference=ref, force=True)
    assert own.validation is not None and other.validation is not None
    assert own.validation.outputs[0].cosine > 0.99999 > other.validation.outputs[0].cosine
    assert other.extra["reference"] == {"path": str(ref), "sha256": _sha(ref), "bytes": ref.stat().st_size,
                                        "external_data": [], "given": True}
    assert other.extra["input_model"]["sha256"] == _sha(model)


@pytest.mark.parametrize("x_shape, kind, named", [(["N", 3, 16, 16], "inputs", "x float[?,3,16,16]"),
                                                    (["N", 3, 8, 8], "outputs", "y float[?,2,6,6]")])
def test_reference_with_other_inputs_or_outputs_is_exit_2(tmp_path, capsys, x_shape, kind, named) -> None:
    model, ref = tmp_path / "m.onnx", tmp_path / "ref.onnx"
    onnx.save(small_net(), model)
    onnx.save(conv_model(np.ones((2, 3, 3, 3), np.float32), x_shape), ref)
    code = main(["optimize", str(model), "--passes", "fold_bn", "--reference", str(ref), "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --reference {ref}: its {kind}") and err.count("\n") == 1
    assert named in err and not (tmp_path / "o.onnx").exists()
    code = main(["optimize", str(model), "--no-validate", "--reference", str(model), "-o", str(tmp_path / "o.onnx")])
    assert code == 2 and "--reference needs validation" in capsys.readouterr().err
