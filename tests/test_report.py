"""Tests of ``onnxcompress report`` (Markdown/HTML/plots from stored JSON) and of progress display.

Fixtures in tests/data: ``report_optimize_default.json`` and ``report_optimize_prune.json`` are real
``optimize --json`` output on resnet_digits (paths made relative), ``report_bench.json`` a real
``bench --json`` of the original and both outputs (``times_ms`` cut to 5 values), and
``report_sensitivity.json`` a hand-made file in the shape ``sensitivity --json`` writes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from onnxcompress.cli import main
from onnxcompress.core.errors import InputError
from onnxcompress.reporting.inputs import load_inputs
from onnxcompress.reporting.pareto import pareto_front
from onnxcompress.reporting.report import PLOT_HINT, build_report
from onnxcompress.reporting.runs import pipeline_label
from onnxcompress.runtime import progress
from tests.helpers.builders import small_net

DATA = Path(__file__).parent / "data"
OPT_DEFAULT = DATA / "report_optimize_default.json"
OPT_PRUNE = DATA / "report_optimize_prune.json"
BENCH = DATA / "report_bench.json"
SENS = DATA / "report_sensitivity.json"
ALL = [OPT_DEFAULT, OPT_PRUNE, BENCH, SENS]


def _no_matplotlib(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- report content


def test_markdown_has_every_section_and_row(tmp_path) -> None:
    written = build_report(ALL, tmp_path / "r.md", plots=False)
    assert written == [tmp_path / "r.md"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    md = (tmp_path / "r.md").read_text()
    for heading in ("# onnxcompress report", "## Summary", "## Passes", "## Per-layer MACs", "## Layer sensitivity",
                    "## Latency", "## Accuracy vs latency"):
        assert f"\n{heading}\n" in "\n" + md
    summary = md.split("## Summary")[1].split("## Passes")[0]
    assert "| report_optimize_prune | resnet_digits.onnx | `fold_bn,prune_channels:ratio=0.5" in summary
    assert "48.53M → 12.21M (0.252×)" in summary and "98.89% → 98.89%" in summary and "| passed |" in summary
    assert "| fold_bn | operand not constant | 3 | `/stage1/Add`, `/stage2/Add`, `/stage3/Add` |" in md
    assert "| `/stage1/conv1/conv1.0/Conv` | Conv | 9,437,184 | 2,359,296 | 0.250× |" in md
    sens = md.split("## Layer sensitivity")[1].split("## Latency")[0]
    assert sens.index("/stage1/conv1/conv1.0/Conv") < sens.index("/fc/Gemm")  # worst SQNR first
    assert "| `prune0.5.onnx` |" in md.split("## Latency")[1]
    pareto = md.split("## Accuracy vs latency")[1]
    rows = [line for line in pareto.splitlines() if line.startswith("| ") and not line.startswith("| run |")]
    assert [r.split(" | ")[0] for r in rows] == ["| original", "| report_optimize_default", "| report_optimize_prune"]
    assert rows[-1].endswith("| yes |")  # the pruned model is fastest at the same accuracy


def test_declines_are_grouped_by_code_old_reports_by_reason(tmp_path) -> None:
    data = json.loads(OPT_PRUNE.read_text())
    data["passes"][0]["declined"] = [
        {"where": "a", "code": "does_not_pay", "detail": "MAC ratio 0.83, ranks (12,)"},
        {"where": "b", "code": "does_not_pay", "detail": "MAC ratio 0.91, ranks (16,)"},
        {"where": "c", "code": "excluded", "detail": ""},
        {"where": "d", "reason": "operand not constant"}]  # a report written before decline codes
    path = tmp_path / "coded.json"
    path.write_text(json.dumps(data))
    md = (build_report([path], tmp_path / "r.md", plots=False)[0]).read_text()
    assert "| fold_bn | does_not_pay | 2 | `a`, `b` |" in md
    assert "| fold_bn | excluded | 1 | `c` |" in md and "| fold_bn | operand not constant | 1 | `d` |" in md
    assert "MAC ratio" not in md  # details do not split the groups


def test_html_only_for_html_output_and_both_with_flag(tmp_path) -> None:
    assert build_report(ALL, tmp_path / "r.html", plots=False) == [tmp_path / "r.html"]
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h2>Summary</h2>" in page and "<table>" in page
    assert "<code>fold_bn,prune_channels:ratio=0.5" in page
    written = build_report(ALL, tmp_path / "b.md", html=True, plots=False, title="digits")
    assert written == [tmp_path / "b.md", tmp_path / "b.html"]
    assert "<title>digits</title>" in (tmp_path / "b.html").read_text()
    assert (tmp_path / "b.md").read_text().startswith("# digits\n")


def test_plots_written_next_to_the_report_and_embedded_in_html(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    written = build_report(ALL, tmp_path / "r.md", html=True)
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    # the default recipe changes no layer's MACs: no MACs plot for it
    assert pngs == ["r-macs-report_optimize_prune.png", "r-pareto-runs.png", "r-sensitivity-report_sensitivity.png"]
    md = (tmp_path / "r.md").read_text()
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md  # Markdown links the files
    page = (tmp_path / "r.html").read_text()
    assert PLOT_HINT not in md and page.count('src="data:image/png;base64,') == len(pngs)
    assert 'src="r-' not in page and ".png\"" not in page  # HTML is self-contained
    embedded = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(embedded) == (tmp_path / "r-macs-report_optimize_prune.png").read_bytes()
    assert [p.name for p in build_report(ALL, tmp_path / "only.html")] == ["only.html"]  # no PNG files


def test_without_matplotlib_the_report_says_how_to_get_plots(tmp_path, monkeypatch) -> None:
    _no_matplotlib(monkeypatch)
    written = build_report(ALL, tmp_path / "r.md")
    assert written == [tmp_path / "r.md"] and not list(tmp_path.glob("*.png"))
    md = (tmp_path / "r.md").read_text()
    assert "Plots skipped: matplotlib is not installed" in md and "onnxcompress[plot]" in md and "![" not in md


def test_same_json_gives_same_bytes(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    files_a = build_report(ALL, a / "r.md", html=True)
    files_b = build_report(ALL, b / "r.md", html=True)
    assert [p.name for p in files_a] == [p.name for p in files_b]
    for pa, pb in zip(files_a, files_b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    if any(p.suffix == ".png" for p in files_a):
        assert b"Software" not in files_a[0].read_bytes()


def test_only_bench_or_only_sensitivity(tmp_path) -> None:
    build_report([BENCH], tmp_path / "b.md", plots=False)
    md = (tmp_path / "b.md").read_text()
    assert "## Latency" in md and "## Summary" not in md and "## Accuracy vs latency" not in md
    build_report([SENS], tmp_path / "s.md", plots=False)
    assert "## Layer sensitivity" in (tmp_path / "s.md").read_text()


def test_runs_without_a_bench_keep_their_row_with_a_dash(tmp_path) -> None:
    bench = json.loads(BENCH.read_text())
    bench["models"] = bench["models"][:1]  # only the original was timed
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    build_report([OPT_PRUNE, OPT_DEFAULT, tmp_path / "bench.json"], tmp_path / "r.md", plots=False)
    pareto = (tmp_path / "r.md").read_text().split("## Accuracy vs latency")[1]
    assert "| original | `resnet_digits.onnx` |  | 98.89 | 0.509 |" in pareto
    assert "| report_optimize_prune | `prune0.5.onnx` | vs original | 98.89 | – | – | – |" in pareto
    assert "| report_optimize_default | `default.onnx` | vs original | 98.89 | – |" in pareto
    assert "No latency (\"–\") for `report_optimize_prune`, `report_optimize_default`" in pareto


def test_runs_without_model_key_find_the_original_by_metrics(tmp_path) -> None:
    run = json.loads(OPT_PRUNE.read_text())
    del run["model"]
    (tmp_path / "run.json").write_text(json.dumps(run))
    build_report([tmp_path / "run.json", BENCH], tmp_path / "r.md", plots=False)
    pareto = (tmp_path / "r.md").read_text().split("## Accuracy vs latency")[1]
    assert "| original | `resnet_digits.onnx` |" in pareto and "| run | `prune0.5.onnx` |" in pareto


def test_same_file_names_get_unique_labels(tmp_path) -> None:
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        shutil.copy(OPT_DEFAULT, tmp_path / sub / "run.json")
    inputs = load_inputs([tmp_path / "x" / "run.json", tmp_path / "y" / "run.json"])
    assert [r.label for r in inputs.runs] == ["run", "run-2"]


def test_pareto_front() -> None:
    points = [(1.0, 90.0), (0.5, 90.0), (0.2, 80.0), (0.6, 85.0), (0.2, 80.0), (2.0, 95.0)]
    assert pareto_front(points) == [False, True, True, False, True, True]
    assert pareto_front([]) == []


def test_pipeline_label_keeps_only_non_default_options() -> None:
    from onnxcompress.pipeline.manager import get_pass

    defaults = {k: o.default for k, o in get_pass("prune_channels").options.items()}
    run = {"recipe": None, "passes": [{"pass": "fold_bn", "options": {}},
                                      {"pass": "prune_channels", "options": {**defaults, "ratio": 0.5}},
                                      {"pass": "not_a_pass", "options": {"x": 1}}]}
    assert pipeline_label(run) == "fold_bn,prune_channels:ratio=0.5,not_a_pass:x=1"
    assert pipeline_label(json.loads(OPT_DEFAULT.read_text())) == "recipe default"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"hello": 1}', "not the JSON of optimize, bench, sensitivity or auto"),
    ('{"machine": {}, "models": [{"name": "m.onnx"}]}', "missing key 'median_ms'"),
    ('{"before": {}, "after": {}, "passes": []}', "missing key 'file_bytes'"),
])
def test_bad_json_is_one_line_exit_2(tmp_path, capsys, text, message) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    code, out, err = _run(capsys, "report", OPT_DEFAULT, bad, "-o", tmp_path / "r.md")
    assert code == 2 and out == "" and message in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "r.md").exists()


def test_missing_file_folder_and_top(tmp_path, capsys) -> None:
    code, _, err = _run(capsys, "report", tmp_path / "nope.json", "-o", tmp_path / "r.md")
    assert code == 2 and "cannot read" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "report", OPT_DEFAULT, "-o", tmp_path / "no" / "r.md")
    assert code == 2 and "folder does not exist" in err
    with pytest.raises(InputError, match="--top"):
        build_report([OPT_DEFAULT], tmp_path / "r.md", top=0)


def test_cli_report(tmp_path, capsys) -> None:
    code, out, err = _run(capsys, "report", *ALL, "-o", tmp_path / "r.md", "--html", "--no-plots", "--title", "T",
                          "--top", "3")
    assert code == 0 and out == "" and "wrote" in err
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# T\n") and (tmp_path / "r.html").exists() and "The 3 heaviest of 10 layers" in md
    code, out, err = _run(capsys, "-q", "report", *ALL, "-o", tmp_path / "q.md", "--no-plots")
    assert code == 0 and out == "" and err == ""


# ---------------------------------------------------------------- progress


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_silent_when_disabled_or_not_a_terminal(capsys, monkeypatch) -> None:
    assert list(progress.track(range(3), "x")) == [0, 1, 2]  # pytest's stderr is not a terminal
    with progress.steps(["a", "b"], "run") as bar:
        bar.done()
        bar.done()
    fake = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    assert list(progress.track(range(3), "x", enabled=False)) == [0, 1, 2]
    with progress.steps(["a"], "run", enabled=False) as bar:
        bar.done()
    assert fake.getvalue() == "" and capsys.readouterr().err == ""


def test_nested_bars_share_one_display_on_a_terminal(monkeypatch) -> None:
    fake = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    with progress.steps(["fold_bn", "prune_channels"], "optimize") as bar:
        bar.done()
        for _ in progress.track(range(2), "refitting 2 layers"):
            assert list(progress.track(iter(range(3)), "capturing")) == [0, 1, 2]
        bar.done()
    assert progress._LIVE == {"progress": None, "users": 0}
    text = fake.getvalue()
    assert "optimize 2/2 prune_channels" in text and "refitting 2 layers" in text and "capturing" in text


def test_bar_is_removed_when_the_loop_raises(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", _FakeTTY())
    with pytest.raises(ValueError):
        for _ in progress.track(range(3), "x"):
            raise ValueError
    assert progress._LIVE == {"progress": None, "users": 0}


def test_optimize_reports_each_pass_to_the_steps_bar(monkeypatch) -> None:
    from onnxcompress import api

    seen = []

    class Recorder(progress.Steps):
        def done(self, *args) -> None:
            seen.append(self._text())
            super().done(*args)

    monkeypatch.setattr(progress, "Steps", Recorder)
    calls = []
    api.optimize(small_net(), "fold_bn,simplify", progress=True, on_pass=lambda r: calls.append(r.name))
    assert seen == ["optimize 1/3 fold_bn", "optimize 2/3 simplify"] and calls == ["fold_bn", "simplify"]


def test_reconstruct_shows_a_bar_over_layers_only_with_progress(monkeypatch) -> None:
    from onnxcompress.core import serde
    from onnxcompress.reconstruct import refit as reconstruct
    from onnxcompress.runtime.data import RandomSource, input_specs

    calls = []
    real = reconstruct.track

    def spy(items, description, **kw):
        calls.append((description, kw.get("enabled")))
        return real(items, description, **kw)

    monkeypatch.setattr(reconstruct, "track", spy)
    teacher = small_net()
    layers = [reconstruct.LayerTarget("conv2", "c2"), reconstruct.LayerTarget("fc", "out")]
    for flag in (True, False):
        reconstruct.reconstruct_layers(serde.to_graph(teacher), teacher, layers, RandomSource(input_specs(teacher), 32, seed=1),
                                       batch_size=32, progress=flag)
    assert calls == [("refitting 2 layers in 2 rounds", True), ("refitting 2 layers in 2 rounds", False)]


def test_summary_uses_the_worst_slice_and_names_it(tmp_path) -> None:
    run = json.loads(OPT_DEFAULT.read_text())
    out = run["validation"]["outputs"][0]
    out["slices"] = [{"name": f"{out['name']}[0:4]", "start": 0, "stop": 4, "cosine": 0.999999, "sqnr_db": "inf"},
                     {"name": f"{out['name']}[4:10]", "start": 4, "stop": 10, "cosine": 0.912345, "sqnr_db": 7.8}]
    src = tmp_path / "sliced.json"
    src.write_text(json.dumps(run))
    build_report([src], tmp_path / "r.md", plots=False)
    summary = (tmp_path / "r.md").read_text().split("## Summary")[1].split("## Passes")[0]
    assert f"0.912345 ({out['name']}[4:10])" in summary and f"7.8 ({out['name']}[4:10])" in summary
    build_report([OPT_DEFAULT], tmp_path / "plain.md", plots=False)
    assert "[4:10]" not in (tmp_path / "plain.md").read_text()


def test_summary_shows_task_metrics(tmp_path) -> None:
    run = json.loads(OPT_DEFAULT.read_text())
    run["validation"]["outputs"][0]["task"] = {"task": "detection", "inferred": True, "settings": {},
                                               "values": {"f1": 0.90625, "precision": 0.95, "recall": 0.87}}
    src = tmp_path / "det.json"
    src.write_text(json.dumps(run))
    build_report([src], tmp_path / "r.md", plots=False)
    summary = (tmp_path / "r.md").read_text().split("## Summary")[1].split("## Passes")[0]
    assert "| task |" in summary and "det. F1 0.906" in summary
    plain = json.loads(OPT_DEFAULT.read_text())
    for o in plain["validation"]["outputs"]:
        o.pop("task", None)
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    build_report([tmp_path / "plain.json"], tmp_path / "p.md", plots=False)
    assert "| task |" not in (tmp_path / "p.md").read_text()  # no task metric: the column is dropped
