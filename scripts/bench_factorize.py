#!/usr/bin/env python3
"""Benchmark the low-rank factorization passes on the fixture models (not a test).

For each fixture model (``models/vgg_digits.onnx``, ``models/resnet_digits.onnx``) and each
configuration, run ``fold_bn,<factorize pass>:<rule>`` twice -- plain (no calibration data) and
data-aware (``models/digits_calib.npz``) -- then measure, against the original model:

* the MAC ratio (whole model, batch 1),
* the ORT latency ratio (graph optimizations on, 1 thread, batch 1), all variants of a model
  benchmarked in one interleaved :func:`onnxcompress.runtime.bench.bench` run with the original first
  (``ratio_vs_first``: the median over rounds of the paired per-round ratio),
* digits test accuracy before/after and the logits' relative error (from the SQNR) on
  ``models/digits_test.npz``.

Two groups of configurations:

* ``target``: ``energy`` rules (the passes' own rank choice, ``max_mac_ratio`` 0.7): what a user
  would run. Data-aware and plain then pick *different* ranks (data-aware reads the whitened
  spectrum), so compare the speed/accuracy trade-off, not the errors.
* ``curve``: Tucker at fixed ``rank_ratio`` with ``max_mac_ratio=10`` (every eligible conv is
  factorized): plain, whitened only (``refit=false``) and data-aware (whitening + refit of the
  last factor) have *the same ranks*, so the error columns compare the factorizations directly.

Usage::

    python scripts/bench_factorize.py                      # both models, all configurations
    python scripts/bench_factorize.py --models vgg --runs 300 --json bench_factorize.json
    python scripts/bench_factorize.py --quick              # fewer configurations and rounds

Missing model or data files are reported and skipped (the fixture models are made by
``scripts/make_models.py``).
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

log = logging.getLogger("bench_factorize")


TARGET = [
    ("factorize_tucker", "energy=0.9"),
    ("factorize_tucker", "energy=0.8"),
    ("factorize_svd", "spatial=true:energy=0.9"),
    ("factorize_dwsep", "energy=0.9"),
]
CURVE = [("factorize_tucker", f"rank_ratio={r}:max_mac_ratio=10") for r in ("0.75", "0.5", "0.375", "0.25", "0.125")]
QUICK_TARGET = TARGET[:2]
QUICK_CURVE = [CURVE[1], CURVE[3]]


@dataclass
class Row:
    """One factorized variant of one model."""

    model: str
    group: str
    spec: str
    mode: str
    mac_ratio: float = math.nan
    latency_ratio: float = math.nan
    latency_ms: float = math.nan
    acc_before: float = math.nan
    acc_after: float = math.nan
    logits_rel_err: float = math.nan
    layers: int = 0
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    @property
    def drop(self) -> float:
        """Accuracy drop in points."""
        return 100.0 * (self.acc_before - self.acc_after)


#: Modes: name -> (use calibration data, extra pass options).
MODES = {"plain": (False, ""), "whitened only": (True, ":refit=false"), "data-aware": (True, "")}


def _variant(model_path: str, name: str, group: str, spec: str, mode: str) -> tuple[Row, object]:
    """Optimize one variant and validate it on the test split."""
    row = Row(name, group, spec, mode)
    aware, extra = MODES[mode]
    start = time.perf_counter()
    try:
        model, report = onnxcompress.optimize(model_path, f"fold_bn,{spec}{extra}", calib=CALIB if aware else None,
                                              data=TEST, force=True)
    except OnnxCompressError as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row, None
    row.seconds = time.perf_counter() - start
    out = report.validation.outputs[0]
    row.mac_ratio = report.after.macs / report.before.macs
    row.acc_before, row.acc_after = out.ref_accuracy, out.cand_accuracy
    row.logits_rel_err = 10 ** (-out.sqnr_db / 20) if math.isfinite(out.sqnr_db) else 0.0
    row.stats = dict(report.passes[-1].result.stats)
    row.layers = int(row.stats.get("layers_factorized", 0))
    return row, model


def run_model(name: str, path: str, configs: list[tuple[str, str, str]], args: argparse.Namespace) -> tuple[list[Row], dict]:
    """Every variant of one model, then one interleaved latency run of the original and all variants."""
    rows, models = [], []
    for group, pass_name, rule in configs:
        modes = ("plain", "whitened only", "data-aware") if group == "curve" else ("plain", "data-aware")
        for mode in modes:
            row, model = _variant(path, name, group, f"{pass_name}:{rule}", mode)
            log.info("%s %s %s: %s", name, row.spec, row.mode, row.error or f"{row.seconds:.1f}s")
            rows.append(row)
            if model is not None:
                models.append((row, model))
    report = bench([path] + [m for _, m in models], threads=args.threads, runs=args.runs, warmup=args.warmup,
                   data=TEST, seed=0)
    for (row, _), result in zip(models, report.models[1:]):
        row.latency_ratio, row.latency_ms = result.ratio_vs_first, result.median_ms
    base = report.models[0]
    return rows, {"machine": report.machine.line(), "original_median_ms": base.median_ms,
                  "runs": args.runs, "threads": args.threads}


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[Row]) -> str:
    """The results as a Markdown table."""
    head = ("| model | group | pipeline (after fold_bn) | mode | layers | MACs ratio | latency ratio | "
            "speed-up | acc before | acc after | drop (pts) | logits rel. err |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.group} | `{r.spec}` | {r.mode} | error: {r.error} |||||||")
            continue
        speed = 1.0 / r.latency_ratio if r.latency_ratio and not math.isnan(r.latency_ratio) else math.nan
        lines.append(f"| {r.model} | {r.group} | `{r.spec}` | {r.mode} | {r.layers} | {_fmt(r.mac_ratio, '.3f')} | "
                     f"{_fmt(r.latency_ratio, '.3f')} | {_fmt(speed, '.2f')}x | {_fmt(100 * r.acc_before, '.2f')} | "
                     f"{_fmt(100 * r.acc_after, '.2f')} | {_fmt(r.drop, '+.2f')} | {_fmt(r.logits_rel_err, '.4f')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg,resnet", help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--runs", type=int, default=200, help="timed latency rounds")
    p.add_argument("--warmup", type=int, default=20, help="untimed latency rounds")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency run")
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    p.add_argument("--json", type=Path, default=None, help="write every number (and pass stats) here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every variant of every available model; print the table (and write JSON)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    configs = [("target", p, r) for p, r in (QUICK_TARGET if args.quick else TARGET)]
    configs += [("curve", p, r) for p, r in (QUICK_CURVE if args.quick else CURVE)]
    missing = missing_data()
    if missing:
        print(f"missing data file(s) {missing}: run scripts/make_models.py first", file=sys.stderr)
        return 2
    all_rows, runs = [], {}
    found, skipped = select_models(args.models)
    for name, path in found:
        rows, info = run_model(name, str(path), configs, args)
        all_rows += rows
        runs[name] = info
    for name, info in runs.items():
        print(f"{name}: original {info['original_median_ms']:.3f} ms median; {info['machine']}")
    print()
    print(markdown(all_rows))
    if args.json:
        payload = {"runs": runs, "skipped": skipped, "rows": [{**r.__dict__, "drop_points": r.drop} for r in all_rows]}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0 if all_rows else 1


if __name__ == "__main__":
    sys.exit(main())
