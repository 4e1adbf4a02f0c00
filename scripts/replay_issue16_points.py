"""The points of issue #16's session, each a check (see ``scripts/replay_issue16.py``).

A check runs the user's commands again through the CLI (:meth:`replay_harness.Replay.cli`) on the
real models when installed, else on synthetic fixtures where the point can still be shown
(``scripts/replay_issue16_setup.py``), and returns FIXED or NOT FIXED with what it observed.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from replay_harness import FIXED, NOT_FIXED, Outcome, Point, Replay, judge, not_yet
from replay_issue16_setup import (
    NUDENET,
    ROW,
    Subject,
    is_score,
    need_matplotlib,
    require_real,
    score_outcome,
    slice_of,
    whole,
)

__all__ = ["GROUPS", "POINTS", "about", "point"]

#: The issue's bullets, by group name.
GROUPS = {
    "gate": "The gate passed broken detectors",
    "shapes": "Shapes",
    "input": "Bad input reached an internal error",
    "silent": "Silent mistakes",
    "report": "The report mixed references",
    "noise": "Noise",
    "targets": "Targets",
}
POINTS: list[Point] = []


def point(key: str, group: str, quote: str, real_only: bool = False) -> Callable:
    """Register the decorated check as a :class:`Point`."""
    def wrap(check: Callable[[Replay], Outcome]) -> Callable[[Replay], Outcome]:
        POINTS.append(Point(key, group, quote, check, real_only))
        return check
    return wrap


def about(outcome: Outcome, subject: Subject | str) -> Outcome:
    """``outcome`` labelled with the model it was shown on."""
    outcome.subject = subject if isinstance(subject, str) else subject.label
    return outcome


# =========================================================================== the gate


@point("int8-gate", "gate", "the int8 recipe passed with cosine 0.9997 / 32 dB, yet the class-score rows had an "
       "SQNR of 2.5-10 dB")
def int8_gate(r: Replay) -> Outcome:
    det = r.asset("detector")
    run, _, report = r.asset("int8")
    return about(score_outcome(run, r.read_json(report)["validation"], det.score), det)


@point("compare-default", "gate", "`compare` exits 0 on that model")
def compare_default(r: Replay) -> Outcome:
    det = r.asset("detector")
    _, int8, _ = r.asset("int8")
    run = r.cli("compare", det.model, int8, "--data", det.calib, "--json", "compare_default.json", show=[ROW, "^gate"])
    data = r.read_json("compare_default.json")
    if not data.get("gate"):
        part = slice_of(whole(data), det.score)
        return about(Outcome(NOT_FIXED, f"no gate without thresholds: exit {run.code} with {part['name']} at cosine "
                                        f"{part['cosine']:.4f}, {part['sqnr_db']:.1f} dB"), det)
    return about(score_outcome(run, data, det.score), det)


@point("compare-slice", "gate", "`compare` exits 0 on that model (with --min-cosine 0.99, the gate the int8 run used)")
def compare_slice(r: Replay) -> Outcome:
    det = r.asset("detector")
    _, int8, _ = r.asset("int8")
    run = r.cli("compare", det.model, int8, "--data", det.calib, "--min-cosine", "0.99", "--json", "compare.json",
                show=[ROW, "^gate"])
    outcome = score_outcome(run, r.read_json("compare.json"), det.score)
    if outcome.verdict == FIXED and run.code == 1 and not run.one_line_error:
        outcome = Outcome(NOT_FIXED, outcome.observed + "; but the error is not one line")
    return about(outcome, det)


@point("det-f1", "gate", "most detections above 0.25 vanished or appeared from nowhere (F1 of detections vs the "
       "original 0.75-0.80)")
def det_f1(r: Replay) -> Outcome:
    det = r.asset("detector")
    _, int8, _ = r.asset("int8")
    run = r.cli("compare", det.model, int8, "--data", det.test, "--task", "detection", "--min-det-f1", "0.9",
                "--json", "compare_f1.json", show=[ROW, r"^task \S+:", "F1"])
    missing = not_yet(run, "--task/--min-det-f1")
    if missing:
        return about(missing, det)
    values = whole(r.read_json("compare_f1.json"))["task"]["values"]
    f1 = float(values["f1"])
    printed = bool(run.lines(r"^task \S+: detection.*F1"))
    gated = run.code == 1 and "detection F1" in run.err if f1 < 0.9 else "detection F1" not in run.err
    text = (f"detection F1 {f1:.3f} vs the float model on held-out data (boxes {values['ref_detections']} -> "
            f"{values['cand_detections']}, {values['matched']} matched); task line printed: {printed}; "
            f"--min-det-f1 0.9 -> exit {run.code}")
    return about(judge(printed and gated, text), det)


def _recipe_gate(r: Replay, asset: str) -> Outcome:
    """The score-slice outcome of the detector run ``asset`` (a lossy recipe)."""
    require_real(r, NUDENET)
    det = r.asset("detector")
    run, _, report = r.asset(asset)
    return about(score_outcome(run, r.read_json(report)["validation"], det.score), det)


@point("prune-gate", "gate", "`prune` and `lowrank` passed at cosine 0.995-0.996 with the score rows near 1.5 dB",
       real_only=True)
def prune_gate(r: Replay) -> Outcome:
    return _recipe_gate(r, "prune")


@point("lowrank-gate", "gate", "`prune` and `lowrank` passed at cosine 0.995-0.996 with the score rows near 1.5 dB",
       real_only=True)
def lowrank_gate(r: Replay) -> Outcome:
    return _recipe_gate(r, "tucker")


@point("sensitivity", "gate", "`min_cosine`/`max_drop`, `sensitivity` and `latency_aware` all rank by the same "
       "whole-output numbers, so none of them could help")
def sensitivity(r: Replay) -> Outcome:
    det = r.asset("detector")
    run, report, _ = r.asset("sensitivity")
    if run.code != 0:
        return about(Outcome(NOT_FIXED, f"sensitivity exit {run.code}: {(run.err_lines or ['?'])[-1]}"), det)
    data = r.read_json(report)
    layers = data["layers"]
    worst = [layer.get("worst") for layer in layers]
    on_slice = sum(1 for w in worst if w and "[" in str(w))
    top = layers[0]
    text = (f"{len(layers)} layers ranked by the worst of outputs and slices; {on_slice} worst on a slice; most "
            f"sensitive {top['node']} {top['sqnr_db']:.1f} dB on {top.get('worst')}; all int8: "
            f"{data['baseline']['sqnr_db']:.1f} dB on {data['baseline'].get('worst')}")
    return about(judge(is_score(top.get("worst"), det.score), text), det)


@point("mixed-precision", "gate", "`min_cosine`/`max_drop` ... rank by the same whole-output numbers (mixed "
       "precision could not help)")
def mixed_precision(r: Replay) -> Outcome:
    det = r.asset("detector")
    run, _, report = r.asset("mixed")
    missing = not_yet(run, "quantize_int8:min_sqnr")
    if missing or run.code == 2:
        return about(missing or Outcome(NOT_FIXED, f"exit 2: {run.err_lines[-1]}"), det)
    data = r.read_json(report)
    stats = next(p["stats"] for p in data["passes"] if p["pass"] == "quantize_int8")
    held = slice_of(whole(data["validation"]), det.score)
    text = (f"kept {stats.get('fallback_layers', 0)} layers float; on the calibration data worst "
            f"{stats.get('mixed_worst')} {stats.get('mixed_sqnr', float('nan')):.1f} dB; held-out {held['name']} "
            f"{held['sqnr_db']:.1f} dB, cosine {held['cosine']:.4f}")
    ok = is_score(stats.get("mixed_worst"), "") and float(stats.get("mixed_sqnr", 0)) >= 20
    return about(judge(ok, text), det)


# =========================================================================== shapes


@point("inspect-data", "shapes", "`inspect` showed `images [1, 3, 1, 1]` and 1.27 M MACs (800x too few)")
def inspect_data(r: Replay) -> Outcome:
    img = r.asset("image")
    run = r.cli("inspect", img.model, "--calib", img.calib, "--json", "inspect_data.json", "--top", "3",
                show=["inputs", "symbolic dims", "MACs / inference"])
    missing = not_yet(run, "`inspect --calib`")
    if missing:
        return about(missing, img)
    ref = r.cli("inspect", img.model, *img.dim_args(), "--json", "inspect_dims.json", "--top", "3",
                show=["MACs / inference"])
    data, at_dims = r.read_json("inspect_data.json"), r.read_json("inspect_dims.json")
    shape = next(iter(data["inputs"].values()))
    named = all(k in data.get("dims", {}) and data["dims"][k]["value"] == v for k, v in img.dims.items())
    text = (f"inputs {shape}, MACs {data['macs']:,} (at {' '.join(img.dim_args())}: {at_dims['macs']:,}); "
            f"symbolic dims named with their source: {named}")
    return about(judge(run.code == 0 and ref.code == 0 and shape == img.shape and data["macs"] == at_dims["macs"]
                       and named, text), img)


@point("inspect-guess", "shapes", "... without naming the symbolic dims")
def inspect_guess(r: Replay) -> Outcome:
    img = r.asset("image")
    run = r.cli("inspect", img.model, "--top", "1", show=["inputs", "symbolic dims", "guess"])
    named = all(k in run.text for k in img.dims)
    guessed = bool(run.lines(r"(?i)guess"))
    shape = " ".join(re.sub(r"[│|]", " ", (run.lines(r"^\s*[│|]\s*inputs") or ["inputs ?"])[0]).split())
    return about(judge(run.code == 0 and named and guessed,
                       f"{shape}; dims {', '.join(img.dims)} named: {named}; says they are guessed: {guessed}"), img)


@point("bench-dims", "shapes", "`bench` silently timed 32x32 inputs")
def bench_dims(r: Replay) -> Outcome:
    img = r.asset("image")
    guess = r.cli("bench", img.model, "--runs", "3", "--warmup", "1", "--json", "bench_guess.json",
                  show=["symbolic", "latency:"])
    data = r.cli("bench", img.model, "--data", img.calib, "--runs", "3", "--warmup", "1", "--json", "bench_data.json",
                 show=["latency:"])
    said = all(k in guess.text for k in img.dims) and bool(guess.lines(r"(?i)guess"))
    shape = next(iter(r.read_json("bench_data.json")["inputs"].values()))["shape"]
    text = f"without data: guessed dims printed: {said}; with --data: timed at {shape}"
    return about(judge(guess.code == 0 and data.code == 0 and said and shape == img.shape, text), img)


@point("tucker-macs", "shapes", "`factorize_tucker`'s `macs_before` used 32x32 even with --dim height=320 "
       "--dim width=320")
def tucker_macs(r: Replay) -> Outcome:
    img = r.asset("image")
    run, _, report = r.asset("tucker")
    data = r.read_json(report)
    rec = next(p for p in data["passes"] if p["pass"] == "factorize_tucker")
    declined = {d["where"] for d in rec["declined"]}
    per_node = {n["name"]: n["macs"] for n in data["before"]["per_node"] if n["op_type"] == "Conv"}
    done = [n for n in per_node if n not in declined]
    expected = sum(per_node[n] for n in done)
    got = rec["stats"].get("macs_before")
    text = (f"{rec['stats'].get('layers_factorized')} layers factorized: macs_before {got:,}; the same layers at "
            f"{' '.join(img.dim_args())} (inspect's per-node MACs): {expected:,}")
    return about(judge(len(done) == rec["stats"].get("layers_factorized") and got == expected, text), img)


@point("latency-aware", "shapes", "`latency_aware` timed another size than the one used")
def latency_aware(r: Replay) -> Outcome:
    img = r.asset("image")
    run = r.cli("optimize", img.model, "-o", "latency.onnx", "--passes", "fold_bn,quantize_int8:latency_aware=true",
                "--calib", img.calib, "--force", "--json", "latency.json", show=["MACs at", "symbolic dims"])
    data = r.read_json("latency.json")
    stats = next(p["stats"] for p in data["passes"] if p["pass"] == "quantize_int8")
    dims = data["before"].get("dims") or {}
    from_data = all(k in dims and dims[k]["value"] == v and "calib" in str(dims[k].get("source")) for k, v in
                    img.dims.items())
    used = ", ".join(f"{k}={d.get('value')} ({d.get('source')})" for k, d in dims.items()) or "not recorded"
    text = (f"{stats.get('latency_measured', 0)} layers timed; the run's dims, which the timings use (a timing's "
            f"shape is not printed): {used}")
    return about(judge(run.code in (0, 1) and stats.get("latency_measured", 0) > 0 and from_data, text), img)


# =========================================================================== input handling

#: Bad ``--preprocess`` values (after the model's right size) and a word the one-line error must contain.
BAD_PREPROCESS = [("mean=1/2", "mean"), ("std=0", "std"), ("std=1/2/3/4", "std"), ("scale=-1", "scale"),
                  ("mean=nan", "mean"), ("layout=NHCW", "layout"), ("resize=zoom", "resize"),
                  ("colour=RGB", "colour"), ("order=L", "channels"), ("mean", "key=value"), ("size=abc", "size"),
                  ("size=0x320", "size")]


def _bad_input(run, word: str) -> bool:
    return run.code == 2 and run.one_line_error and word in run.err and not run.out.strip()


@point("preprocess-mean", "input", '`--preprocess "...,mean=1/2"` for 3 channels -> exit 3, `internal error: '
       'ValueError: operands could not be broadcast together`')
def preprocess_mean(r: Replay) -> Outcome:
    img, images = r.asset("image"), r.asset("images")
    pre = f"{img.folder_pre},mean=1/2"
    runs = [r.cli("compare", img.model, img.model, "--data", images, "--preprocess", pre),
            r.cli("optimize", img.model, "-o", "bad.onnx", "--calib", images, "--preprocess", pre),
            r.cli("bench", img.model, "--data", images, "--preprocess", pre, "--runs", "1", "--warmup", "0")]
    ok = all(_bad_input(run, "mean") for run in runs) and not r.path("bad.onnx").exists()
    codes = ", ".join(f"{run.args[0]} exit {run.code}" for run in runs)
    return about(judge(ok, f"{codes}; {(runs[0].err_lines or ['no error'])[0]}"), img)


@point("preprocess-keys", "input", "every `--preprocess` key validated (count of mean/std values vs channels, "
       "ranges) with exit 2 and one line")
def preprocess_keys(r: Replay) -> Outcome:
    img, images = r.asset("image"), r.asset("images")
    failed = []
    for value, word in BAD_PREPROCESS:
        spec = value if value.startswith("size=") else f"{img.folder_pre},{value}"
        run = r.cli("compare", img.model, img.model, "--data", images, "--preprocess", spec)
        if not _bad_input(run, word):
            failed.append(f"{value}: exit {run.code} {(run.err_lines or [''])[-1][:80]}")
    text = f"{len(BAD_PREPROCESS) - len(failed)}/{len(BAD_PREPROCESS)} bad values exit 2 with one line naming them"
    return about(judge(not failed, text + ("; " + "; ".join(failed) if failed else "")), img)


def _folder_hint(r: Replay, subject: Subject, key: str) -> Outcome:
    images = r.asset("images")
    run = r.cli("compare", subject.model, subject.model, "--data", images)
    fixed = r.cli("compare", subject.model, subject.model, "--data", images, "--preprocess", subject.folder_pre,
                  show=["^validation"])
    hint = run.code == 0 or (run.code == 2 and run.one_line_error and "--preprocess" in run.err and key in run.err)
    said = (run.err_lines or ["(no error)"])[0]
    text = f"without --preprocess: exit {run.code} {said!r}; with --preprocess {subject.folder_pre}: exit {fixed.code}"
    return about(judge(hint and fixed.code == 0, text), subject)


@point("folder-hint", "input", "An image folder without `--preprocess` gives a shape error with no hint that "
       "`--preprocess` exists")
def folder_hint(r: Replay) -> Outcome:
    return _folder_hint(r, r.asset("image"), "size=")


@point("folder-hint-nhwc", "input", "An image folder without `--preprocess` ... (open-nsfw: NHWC input) says how "
       "to add it")
def folder_hint_nhwc(r: Replay) -> Outcome:
    return _folder_hint(r, r.asset("nhwc"), "layout=NHWC")


#: What ``--help`` must say about ``--preprocess``.
HELP_WORDS = ("size=", "resize=", "order=", "scale=", "mean=", "std=", "layout=", "(default 1/255)",
              "(pixel * scale - mean) / std", "channel order")


@point("preprocess-help", "input", "`--help` lists only some preprocess keys; `resize`, `scale`, their defaults, the "
       "order of operations and the channel order of `mean`/`std` are not stated")
def preprocess_help(r: Replay) -> Outcome:
    missing = {}
    for command in ("optimize", "compare", "bench", "sensitivity"):
        run = r.cli(command, "--help")
        text = " ".join(run.out.split())
        missing[command] = [w for w in HELP_WORDS if w not in text]
    bad = {k: v for k, v in missing.items() if v}
    text = "every key, its default, the order of operations and the channel order in " + \
        ", ".join(f"{k} --help" for k in missing if k not in bad)
    return judge(not bad, text + ("; missing: " + "; ".join(f"{k}: {v}" for k, v in bad.items()) if bad else ""))


# =========================================================================== silent mistakes


def _nodes(r: Replay, subject: Subject) -> list[tuple[str, str]]:
    """``(name, op type)`` of every node of ``subject``'s model, in order."""
    import onnx

    return [(n.name, n.op_type) for n in onnx.load(str(r.path(subject.model)), load_external_data=False).graph.node]


def _typo(name: str) -> str:
    """``name`` with one letter of its last part dropped (``.../conv/Conv`` -> ``.../conv/Cnv``)."""
    i = max(name.rfind("/") + 2, len(name) - 3)
    return name[:i] + name[i + 1:]


@point("exclude-unknown", "silent", "`exclude=` with node names that do not exist is accepted without a word")
def exclude_unknown(r: Replay) -> Outcome:
    det = r.asset("detector")
    conv = next(name for name, op in _nodes(r, det) if op == "Conv")
    typo = _typo(conv)
    a = r.cli("optimize", det.model, "-o", "excluded.onnx", "--passes", f"fold_bn,quantize_int8:exclude={typo}",
              "--calib", det.calib)
    b = r.cli("optimize", det.model, "-o", "excluded.onnx", "--passes", "prune_channels:exclude=nonexistent",
              "--calib", det.calib)
    ok = (_bad_input(a, conv) and _bad_input(b, "nonexistent") and "inspect --nodes" in b.err
          and not r.path("excluded.onnx").exists())
    text = (f"exclude={typo}: exit {a.code}, close match {conv} named: {conv in a.err}; exclude=nonexistent: "
            f"exit {b.code}, points to inspect --nodes: {'inspect --nodes' in b.err}")
    return about(judge(ok, text), det)


@point("inspect-nodes", "silent", "no command lists every node name (`inspect --json` lists only the weighted ops)")
def inspect_nodes(r: Replay) -> Outcome:
    det = r.asset("detector")
    run = r.cli("inspect", det.model, "--nodes", "--top", "1", "--json", "nodes.json")
    missing = not_yet(run, "`inspect --nodes`")
    if missing:
        return about(missing, det)
    listed = [n["name"] for n in r.read_json("nodes.json").get("nodes", [])]
    names = [name for name, _ in _nodes(r, det)]
    printed = sum(1 for n in names if n in run.out)
    text = (f"{len(listed)} nodes in --json (the model has {len(names)}), {printed} printed; "
            f"with op type and output shapes: {bool(listed)}")
    return about(judge(run.code == 0 and listed == names and printed == len(names), text), det)


# =========================================================================== the report


def _report(r: Replay) -> tuple[dict, str, str]:
    rep = r.asset("report")
    if rep["run"].code != 0:
        raise RuntimeError(f"report exit {rep['run'].code}: {(rep['run'].err_lines or ['?'])[-1]}")
    return rep, r.path("report.md").read_text(), r.path("report.html").read_text()


def _section(md: str, title: str) -> str:
    parts = md.split(f"## {title}")
    return parts[1].split("\n## ")[0] if len(parts) > 1 else ""


def _table_rows(section: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not set(line) <= set("|-: ")]
    return rows[1:]  # without the header


@point("report-chain", "report", "a run chained on an already-pruned model is reported against that model "
       "(cosine 0.9990) instead of the original (0.9959)")
def report_chain(r: Replay) -> Outcome:
    rep, md, _ = _report(r)
    img = r.asset("image")
    chained, given = r.read_json("prune_int8.json"), r.read_json("prune_int8_ref.json")
    check = r.cli("compare", img.model, "prune_int8_ref.onnx", "--data", rep["calib"][1], "--preprocess",
                  rep["calib"][3], "--json", "compare_ref.json")
    direct = whole(r.read_json("compare_ref.json"))["cosine"]
    vs_ref = whole(given["validation"])["cosine"]
    summary = _section(md, "Summary")
    says = "vs prune" in summary and "--reference" in summary
    ok = check.code in (0, 1) and given["reference"].get("given") and abs(direct - vs_ref) < 1e-6 and says
    text = (f"chained run: cosine {whole(chained['validation'])['cosine']:.4f} vs prune's output, and the report says "
            f"so (suggesting --reference): {says}; with --reference {img.model}: {vs_ref:.4f} = compare with the "
            f"original {direct:.4f}")
    return about(judge(bool(ok), text), img)


def _pareto_rows(md: str) -> list[list[str]]:
    return _table_rows(_section(md, "Accuracy vs latency"))


@point("report-one-original", "report", 'two points are labelled "original"')
def report_one_original(r: Replay) -> Outcome:
    rep, md, _ = _report(r)
    rows = _pareto_rows(md)
    originals = [row for row in rows if row[0] == "original"]
    text = f"{len(originals)} 'original' row(s) among {len(rows)} in Accuracy vs latency"
    return about(judge(len(originals) == 1, text), rep["subject"])


@point("report-no-bench", "report", "a run without a bench disappears from the accuracy-vs-latency table")
def report_no_bench(r: Replay) -> Outcome:
    rep, md, _ = _report(r)
    rows = {row[0]: row for row in _pareto_rows(md)}
    kept = [name for name in ("prune_int8", "prune_int8_ref") if name in rows and "–" in rows[name]]
    text = f"runs without a bench in the table with latency '–': {kept or 'none'}"
    return about(judge(len(kept) == 2, text), rep["subject"])


@point("report-int8-macs", "report", 'an int8-only run gets a 30-row "MACs per layer" table of 1.000x')
def report_int8_macs(r: Replay) -> Outcome:
    rep, md, _ = _report(r)
    stem = rep["runs"]["int8"].removesuffix(".json")
    macs = _section(md, "Per-layer MACs")
    table = f"### {stem}\n" in macs
    note = next((line.strip() for line in macs.splitlines() if stem in line and "MACs" in line), "")
    text = f"per-layer MACs table for the int8-only run `{stem}`: {'yes' if table else 'none'}" + \
        (f"; the report says: {note[:90]}" if note else "")
    return about(judge(not table, text), rep["subject"])


@point("report-pareto-axis", "report", "the Pareto axis runs to 104 %")
def report_pareto_axis(r: Replay) -> Outcome:
    need_matplotlib()
    rep, _, _ = _report(r)
    from onnxcompress.reporting.chains import link_runs
    from onnxcompress.reporting.inputs import load_inputs
    from onnxcompress.reporting.pareto import accuracy_points
    from onnxcompress.reporting.plots import pareto_figure

    inputs = load_inputs([r.path(p) for p in rep["inputs"]])
    metric, points = accuracy_points(inputs, link_runs(inputs.runs))
    shown = [p for p in points if p.plotted]
    ax = pareto_figure(shown, metric).axes[0]
    cap = {"cosine": 1.0}.get(metric, 100.0)
    top, best = ax.get_ylim()[1], max(p.quality for p in shown)
    return about(judge(top <= max(cap, best) and ax.get_xlim()[0] >= 0,
                 f"the report's Pareto figure rebuilt from its inputs: {metric} axis up to {top:.4g} (best point "
                 f"{best:.4g}, cap {cap:g}); latency axis from {ax.get_xlim()[0]:.3g}"), rep["subject"])


@point("report-sens-label", "report", "the sensitivity plot's x label is cut")
def report_sens_label(r: Replay) -> Outcome:
    need_matplotlib()
    _, report, png = r.asset("sensitivity")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from onnxcompress.reporting.plots import sensitivity_figure

    data = r.read_json(report)
    title = f"{r.asset('detector').model}: quantization sensitivity ({data['method']}, {data['samples']} samples)"
    fig = sensitivity_figure(data["layers"][:10], data["baseline"]["sqnr_db"], title)
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer, width, height = fig.canvas.get_renderer(), fig.bbox.width, fig.bbox.height
    boxes = [t.get_window_extent(renderer) for t in (fig.axes[0].xaxis.label, fig.axes[0].title)]
    inside = all(b.x0 >= 0 and b.x1 <= width and b.y0 >= 0 and b.y1 <= height for b in boxes)
    text = f"{png} written: {r.path(png).is_file()}; x label and title inside the figure (as plotted): {inside}"
    return about(judge(inside and r.path(png).is_file(), text), r.asset("detector"))


@point("report-html", "report", "the HTML links its images by relative path (not self-contained)")
def report_html(r: Replay) -> Outcome:
    need_matplotlib()
    rep, _, html = _report(r)
    embedded = len(re.findall(r'src="data:image/png;base64,', html))
    linked = re.findall(r'src="(?!data:)([^"]+)"', html)
    text = f"{embedded} images embedded, {len(linked)} linked by path"
    return about(judge(embedded > 0 and not linked, text), rep["subject"])


@point("report-calib", "report", "calibration source and preprocess appear in the summary")
def report_calib(r: Replay) -> Outcome:
    rep, md, _ = _report(r)
    summary = _section(md, "Summary")
    calib, pre = rep["calib"][1], rep["calib"][3]
    row = next((line for line in summary.splitlines() if line.startswith("| prune_int8 |") and pre in line), "")
    ok = calib in row and r.asset("image").calib in summary
    text = f"summary row: {row.strip()[:110] or 'none with the calibration and preprocess'}"
    return about(judge(ok, text), rep["subject"])


# =========================================================================== noise


@point("fold-bn-declines", "noise", 'fold_bn lists "declined: operand not constant x57" for SiLU Muls and residual '
       "Adds that were never candidates")
def fold_bn_declines(r: Replay) -> Outcome:
    img = r.asset("image")
    run = r.cli("optimize", img.model, "-o", "fold_bn.onnx", "--passes", "fold_bn", "--calib", img.calib,
                "--json", "fold_bn.json", show=[r"^\s*[│|] fold_bn"])
    rec = next(p for p in r.read_json("fold_bn.json")["passes"] if p["pass"] == "fold_bn")
    noise = [d for d in rec["declined"] if d["code"] == "operand_not_constant"]
    text = f"{len(rec['declined'])} declines, {len(noise)} 'operand not constant'; stats {rec['stats'] or '-'}"
    return about(judge(run.code == 0 and not noise, text), img)


@point("simplify-changed", "noise", '`simplify` says "changed yes" when 323 nodes stay 323')
def simplify_changed(r: Replay) -> Outcome:
    img = r.asset("image")
    run = r.cli("optimize", img.model, "-o", "simplify.onnx", "--passes", "simplify", "--calib", img.calib,
                "--json", "simplify.json", show=[r"^\s*[│|] simplify"])
    rec = next(p for p in r.read_json("simplify.json")["passes"] if p["pass"] == "simplify")
    s = rec["stats"]
    nodes = (s.get("nodes_before"), s.get("nodes_after"))
    constants = (s.get("constants_before"), s.get("constants_after"))
    why = nodes[0] != nodes[1] or (None not in constants and constants[0] != constants[1])
    text = f"changed {'yes' if rec['modified'] else 'no'}: nodes {nodes[0]} -> {nodes[1]}, constants " \
           f"{constants[0]} -> {constants[1]}"
    return about(judge(run.code == 0 and why == rec["modified"], text), img)


@point("quiet-after", "noise", "`-q` after the subcommand is \"No such option\" although README calls it global")
def quiet_after(r: Replay) -> Outcome:
    img = r.asset("image")
    quiet = r.cli("inspect", img.model, *img.dim_args(), "-q")
    verbose = r.cli("optimize", img.model, "-o", "verbose.onnx", "--passes", "fold_bn", "--calib", img.calib, "-v",
                    show=["^INFO"])
    ok = quiet.code == 0 and not quiet.out.strip() and verbose.code == 0 and "INFO" in verbose.err
    return about(judge(ok, f"inspect ... -q: exit {quiet.code}, {len(quiet.out.strip())} chars of output; "
                           f"optimize ... -v: exit {verbose.code}, info log: {'INFO' in verbose.err}"), img)
