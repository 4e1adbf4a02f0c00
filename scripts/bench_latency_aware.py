#!/usr/bin/env python
"""Benchmark quantize_int8:latency_aware against plain quantize_int8 and the float model.

For every fixture model (``resnet``, ``mobilenetv2``, ``vgg``, ``concat``; missing ones are
skipped) and the digits calibration split:

* ``int8``: ``fold_bn,quantize_int8``;
* ``int8 latency_aware``: ``fold_bn,quantize_int8:latency_aware=true`` (per-layer timings on this
  machine decide which layers stay float; the script prints the ``exclude=`` spec that
  reproduces the decision and the conversion wall time).

Then, against the original float model: digits test accuracy and SQNR
(``onnxcompress.pipeline.validate.compare_models``, ORT optimizations off), and latency with
``onnxcompress.runtime.bench.bench``: the three models interleaved in one run (batch 1, 1 thread, ORT
graph optimizations on), ratio = median over rounds of ``t_model / t_float`` in the same round.
With ``--repeat R`` the bench runs R times and the table shows the median ratio (and the range).

Usage::

    python scripts/bench_latency_aware.py [--models resnet,vgg] [--runs 300] [--repeat 3] [--json out.json]

Prints a Markdown table and the target check (latency_aware never slower than float). Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first

from fixtures import CALIB, TEST, missing_data, select_models

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassContext
from onnxcompress.passes.quantize_int8 import LATENCY_TIMINGS
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.pipeline.validate import compare_models
from onnxcompress.runtime.bench import bench, machine_info
from onnxcompress.runtime.data import open_source

VARIANTS = {"int8": "fold_bn,quantize_int8", "int8 latency_aware": "fold_bn,quantize_int8:latency_aware=true"}


def convert(model, spec: str) -> tuple[object, dict, float]:
    """Run ``spec`` with the calibration split; return the model, the quantize pass's stats and the wall time."""
    ctx = PassContext(calib=open_source(CALIB, model))
    start = time.perf_counter()
    out, records = PassManager(parse_spec(spec), ctx).run(model)
    seconds = time.perf_counter() - start
    result = records[-1].result
    stats = dict(result.stats)
    stats["kept"] = [(d.where, d.text()) for d in result.declined if d.code.startswith("kept_float")]
    stats["timings"] = [(t.node, t.ratio) for t in ctx.get(LATENCY_TIMINGS) or []]
    return out, stats, seconds


def accuracy(reference, candidate) -> dict:
    """Digits test accuracy of both models, top-1 agreement and SQNR (ORT optimizations off)."""
    report = compare_models(reference, candidate, open_source(TEST, reference), batch_size=64)
    o = report.outputs[0]
    return {"float_acc": o.ref_accuracy, "acc": o.cand_accuracy, "agreement": o.top1_agreement, "sqnr_db": o.sqnr_db}


def latency(models: list, runs: int, repeat: int) -> list[list[float]]:
    """Ratios vs the first model, one list per model, one value per repeat."""
    ratios: list[list[float]] = [[] for _ in models]
    for r in range(repeat):
        report = bench(models, threads=1, batch=1, runs=runs, warmup=20, data=str(TEST), seed=r)
        for i, m in enumerate(report.models):
            ratios[i].append(m.ratio_vs_first)
    return ratios


def run_model(name: str, path: Path, runs: int, repeat: int) -> dict:
    float_model = serde.load_model(path)
    row: dict = {"model": name, "variants": {}}
    built = [float_model]
    for label, spec in VARIANTS.items():
        q, stats, seconds = convert(float_model, spec)
        built.append(q)
        row["variants"][label] = {"spec": spec, "convert_s": seconds, **accuracy(float_model, q),
                                  "layers": stats.get("latency_measured"), "kept": stats["kept"],
                                  "exclude_spec": stats.get("exclude_spec"), "timings": stats["timings"]}
    ratios = latency(built, runs, repeat)
    row["float"] = accuracy(float_model, float_model)
    for label, r in zip(VARIANTS, ratios[1:]):
        row["variants"][label]["ratio"] = statistics.median(r)
        row["variants"][label]["ratio_range"] = [min(r), max(r)]
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | float acc | int8 acc | int8 latency vs float | latency_aware acc | latency_aware latency "
            "vs float | kept float (timed layers) | convert s (plain / aware) |")
    lines = [head, "|" + " --- |" * 8]
    for row in rows:
        a, b = row["variants"]["int8"], row["variants"]["int8 latency_aware"]

        def rng(v):
            lo, hi = v["ratio_range"]
            return f"{v['ratio']:.3f}×" + (f" ({lo:.2f}–{hi:.2f})" if hi > lo else "")

        kept = f"{len(b['kept'])} ({b['layers']})"
        lines.append(f"| {row['model']} | {100 * a['float_acc']:.2f} % | {100 * a['acc']:.2f} % | {rng(a)} | "
                     f"{100 * b['acc']:.2f} % | {rng(b)} | {kept} | {a['convert_s']:.1f} / {b['convert_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,mobilenetv2,vgg,concat")
    parser.add_argument("--runs", type=int, default=300, help="timed rounds per bench run")
    parser.add_argument("--repeat", type=int, default=3, help="bench runs (the table shows the median ratio)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if missing_data():
        print("missing data: " + ", ".join(missing_data()) + " (run scripts/make_models.py)", file=sys.stderr)
        return 2
    found, _ = select_models(args.models)
    rows = []
    for name, path in found:
        rows.append(run_model(name, path, args.runs, args.repeat))
        v = rows[-1]["variants"]["int8 latency_aware"]
        print(f"{name}: latency_aware kept float {v['kept']}; reproduce with quantize_int8:{v['exclude_spec']}",
              file=sys.stderr)
    print(machine_info("CPUExecutionProvider", 1, True).line())
    print(table(rows))
    worst = max((r["variants"]["int8 latency_aware"]["ratio"] for r in rows), default=float("nan"))
    print(f"\ntarget (latency_aware never slower than float): worst ratio {worst:.3f}× -> "
          f"{'met' if worst <= 1.0 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
