#!/usr/bin/env python3
"""Benchmark structured channel pruning on the fixture models (not a test).

For each fixture model (``models/{resnet,mobilenetv2,vgg,concat}_digits.onnx``) and each ratio
``R`` (default 0.5), two variants of the same pipeline:

* ``plain``: ``prune_channels:ratio=R:reconstruct=false,fold_bn,simplify`` (no data);
* ``recon``: ``prune_channels:ratio=R,fold_bn,simplify`` with ``--calib models/digits_calib.npz``
  (the consumers of removed channels are refitted by least squares against the original).

Both prune exactly the same channels (the selection does not look at the data unless
``criterion=activation``), so they have the same MACs and latency and differ only in weights.

The **baseline** is the original model after ``fold_bn,simplify`` (exact), so the latency ratio
measures pruning alone, not BatchNormalization folding. Reported per variant:

* MACs and parameter ratios vs the baseline (``onnxcompress.core.metrics``; batch 1);
* onnxruntime latency ratio vs the baseline, measured in the same run: every variant of a model
  and the baseline in one interleaved :func:`onnxcompress.runtime.bench.bench` run (graph optimizations
  on, ``--threads 1``), ``ratio_vs_first`` = median over rounds of the paired per-round ratio,
  at batch 1 and batch 32 (``--batches``); inputs are the first samples of the test split;
* digits test accuracy (``models/digits_test.npz``, 360 samples: one sample is 0.28 points) of
  the original and of the variant, the drop in points, for ``recon`` the drop as a fraction of
  ``plain``'s drop, and the cosine similarity of the logits to the original's (a finer measure
  than accuracy on 360 samples).

Targets (from the issue), checked at the end: ResNet at ratio 0.5 >= 2x faster at batch 1 with
<= 1.0 point accuracy drop (``recon``), and on every model/ratio ``recon`` at least halves the
drop of ``plain``.

Usage::

    python scripts/bench_prune.py                                  # 4 models, ratio 0.5, batch 1 and 32
    python scripts/bench_prune.py --ratios 0.5,0.3 --json bench_prune.json
    python scripts/bench_prune.py --models resnet --options :criterion=bn_scale:steps=3
    python scripts/bench_prune.py --accuracy-only --ratios 0.3,0.5 --options :criterion=l1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fixtures import CALIB, MODELS, ROOT, TEST, missing_data, select_models

sys.path.insert(0, str(ROOT))

import onnxcompress
from onnxcompress.core.errors import OnnxCompressError
from onnxcompress.runtime.bench import bench

log = logging.getLogger("bench_prune")

BASELINE = "fold_bn,simplify"
TARGET_MODEL, TARGET_RATIO, TARGET_SPEEDUP, TARGET_DROP = "resnet", 0.5, 2.0, 1.0


@dataclass
class Row:
    """One pruned variant of one model."""

    model: str
    ratio: float
    mode: str
    pipeline: str
    macs_ratio: float = math.nan
    params_ratio: float = math.nan
    latency: dict[int, float] = field(default_factory=dict)  # batch -> paired ratio vs baseline
    latency_spread: dict[int, tuple[float, float]] = field(default_factory=dict)  # batch -> (p10, p90)
    latency_ms: dict[int, float] = field(default_factory=dict)
    acc_before: float = math.nan
    acc_after: float = math.nan
    cosine: float = math.nan
    gate_passed: bool = False
    groups: str = ""
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    @property
    def drop(self) -> float:
        """Accuracy drop in points."""
        return 100.0 * (self.acc_before - self.acc_after)


def _pipeline(ratio: float, mode: str, options: str) -> str:
    extra = "" if mode == "recon" else ":reconstruct=false"
    return f"prune_channels:ratio={ratio}{options}{extra},{BASELINE}"


def _variant(path: str, name: str, ratio: float, mode: str, options: str, base_report) -> tuple[Row, object]:
    """Prune one variant and validate it on the test split."""
    spec = _pipeline(ratio, mode, options)
    row = Row(name, ratio, mode, spec)
    start = time.perf_counter()
    try:
        model, report = onnxcompress.optimize(path, spec, calib=str(CALIB) if mode == "recon" else None,
                                              data=str(TEST), force=True)
    except OnnxCompressError as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row, None
    row.seconds = time.perf_counter() - start
    out = report.validation.outputs[0]
    row.acc_before, row.acc_after = out.ref_accuracy, out.cand_accuracy
    row.cosine = out.cosine
    row.gate_passed = report.passed
    row.macs_ratio = report.after.macs / base_report.after.macs
    row.params_ratio = report.after.params / base_report.after.params
    stats = dict(report.passes[0].result.stats)
    row.stats = stats
    frozen = {k[len("groups_frozen_"):]: v for k, v in stats.items() if k.startswith("groups_frozen_")}
    row.groups = (f"{stats.get('groups_pruned', 0)}/{stats.get('groups_found', 0)} pruned, frozen "
                  + (", ".join(f"{k} {v}" for k, v in sorted(frozen.items())) or "none"))
    return row, model


def run_model(name: str, path: str, args: argparse.Namespace) -> tuple[list[Row], dict]:
    """Baseline, every variant, then one interleaved latency run per batch size."""
    base, base_report = onnxcompress.optimize(path, BASELINE, data=str(TEST))
    out = base_report.validation.outputs[0]
    info = {"baseline": BASELINE, "acc_original": out.ref_accuracy, "acc_baseline": out.cand_accuracy,
            "baseline_macs": base_report.after.macs, "baseline_params": base_report.after.params, "bench": {}}
    rows, models = [], []
    for ratio in args.ratios:
        for mode in ("plain", "recon"):
            row, model = _variant(path, name, ratio, mode, args.options, base_report)
            log.info("%s ratio %s %s: %s", name, ratio, mode, row.error or f"{row.seconds:.1f}s")
            rows.append(row)
            if model is not None:
                models.append((row, model))
    for batch in args.batches:
        runs = args.runs if batch == 1 else args.big_runs
        report = bench([base] + [m for _, m in models], threads=args.threads, runs=runs, warmup=args.warmup,
                       batch=batch, data=str(TEST), seed=0)
        for (row, _), result in zip(models, report.models[1:]):
            row.latency[batch] = result.ratio_vs_first
            row.latency_spread[batch] = (result.ratio_p10, result.ratio_p90)
            row.latency_ms[batch] = result.median_ms
        info["bench"][batch] = {"machine": report.machine.line(), "load_average": report.machine.load_average,
                                "baseline_median_ms": report.models[0].median_ms, "runs": runs,
                                "threads": args.threads}
    return rows, info


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _halving(rows: list[Row], row: Row) -> float:
    """``recon`` drop / ``plain`` drop for the same model and ratio (NaN if not applicable)."""
    if row.mode != "recon":
        return math.nan
    plain = next((r for r in rows if r.model == row.model and r.ratio == row.ratio and r.mode == "plain"), None)
    if plain is None or plain.error or plain.drop <= 0:
        return math.nan
    return row.drop / plain.drop


def markdown(rows: list[Row], batches: list[int]) -> str:
    """The results as a Markdown table."""
    lat = "".join(f"latency b{b} (speed-up) | " for b in batches)
    head = (f"| model | ratio | mode | groups | MACs ratio | params ratio | {lat}acc before | acc after | "
            "drop (pts) | recon/plain drop | logits cosine |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.ratio} | {r.mode} | error: {r.error} |" + " |" * (8 + len(batches)))
            continue
        cells = []
        for b in batches:
            x = r.latency.get(b, math.nan)
            cells.append(f"{_fmt(x, '.3f')} ({_fmt(1 / x if x else math.nan, '.2f')}x)")
        lines.append(f"| {r.model} | {r.ratio} | {r.mode} | {r.groups} | {_fmt(r.macs_ratio, '.3f')} | "
                     f"{_fmt(r.params_ratio, '.3f')} | {''.join(c + ' | ' for c in cells)}"
                     f"{_fmt(100 * r.acc_before, '.2f')} | "
                     f"{_fmt(100 * r.acc_after, '.2f')} | {_fmt(r.drop, '+.2f')} | "
                     f"{_fmt(_halving(rows, r), '.3f')} | {_fmt(r.cosine, '.4f')} |")
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[tuple[str, bool | None, str]]:
    """The issue's targets: ``(what, met (None: not measured), detail)``."""
    out = []
    target = next((r for r in rows if r.model == TARGET_MODEL and r.ratio == TARGET_RATIO and r.mode == "recon"
                   and not r.error), None)
    if target is None or 1 not in target.latency:
        out.append((f"{TARGET_MODEL} ratio {TARGET_RATIO}: >= {TARGET_SPEEDUP}x at batch 1, <= {TARGET_DROP} pt drop",
                    None, "not measured (needs the resnet model, ratio 0.5 and batch 1)"))
    else:
        speedup = 1 / target.latency[1]
        ok = speedup >= TARGET_SPEEDUP and target.drop <= TARGET_DROP
        out.append((f"{TARGET_MODEL} ratio {TARGET_RATIO}: >= {TARGET_SPEEDUP}x at batch 1, <= {TARGET_DROP} pt drop",
                    ok, f"{speedup:.2f}x, drop {target.drop:+.2f} pts (with reconstruction)"))
    for r in rows:
        if r.mode != "recon" or r.error:
            continue
        h = _halving(rows, r)
        detail = (f"drop {r.drop:+.2f} vs plain "
                  f"{next(p.drop for p in rows if p.model == r.model and p.ratio == r.ratio and p.mode == 'plain'):+.2f}"
                  if not math.isnan(h) else "plain pruning lost nothing")
        out.append((f"{r.model} ratio {r.ratio}: reconstruction at least halves the drop",
                    None if math.isnan(h) else h <= 0.5, detail))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--ratios", default="0.5", help="comma-separated pruning ratios (e.g. 0.5,0.3)")
    p.add_argument("--options", default="", help="extra prune_channels options, e.g. ':criterion=bn_scale:steps=3'")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes for the latency runs")
    p.add_argument("--accuracy-only", action="store_true", help="no latency runs (same as --batches '')")
    p.add_argument("--runs", type=int, default=200, help="timed latency rounds at batch 1")
    p.add_argument("--big-runs", type=int, default=40, help="timed latency rounds at batch > 1")
    p.add_argument("--warmup", type=int, default=20, help="untimed latency rounds")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency runs")
    p.add_argument("--json", type=Path, default=None, help="write every number (and pass stats) here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    args.batches = [] if args.accuracy_only else [int(b) for b in args.batches.split(",") if b.strip()]
    if args.options and not args.options.startswith(":"):
        args.options = ":" + args.options
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every variant of every available model; print the table and the targets (and write JSON)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    missing = missing_data()
    if missing:
        print(f"missing data file(s) {missing}: run scripts/make_models.py first", file=sys.stderr)
        return 2
    all_rows, runs = [], {}
    found, skipped = select_models(args.models)
    for name, path in found:
        rows, info = run_model(name, str(path), args)
        all_rows += rows
        runs[name] = info
    for name, info in runs.items():
        for batch, b in info["bench"].items():
            print(f"{name} baseline ({BASELINE}) batch {batch}: {b['baseline_median_ms']:.3f} ms median, "
                  f"{b['runs']} rounds; {b['machine']}")
        print(f"{name}: accuracy original {100 * info['acc_original']:.2f}%, baseline {100 * info['acc_baseline']:.2f}%")
    print()
    print(markdown(all_rows, args.batches))
    print()
    verdicts = targets(all_rows)
    for what, ok, detail in verdicts:
        mark = "n/a" if ok is None else ("MET" if ok else "MISSED")
        print(f"- {what}: **{mark}** ({detail})")
    if args.json:
        payload = {"runs": runs, "skipped": skipped, "options": args.options, "batches": args.batches,
                   "rows": [{**r.__dict__, "drop_points": r.drop, "recon_over_plain_drop": _halving(all_rows, r)}
                            for r in all_rows],
                   "targets": [{"target": w, "met": ok, "detail": d} for w, ok, d in verdicts]}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0 if all_rows else 1


if __name__ == "__main__":
    sys.exit(main())
