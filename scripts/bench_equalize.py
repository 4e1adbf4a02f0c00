#!/usr/bin/env python
"""Does cross-layer equalization help int8 quantization? Numbers on the fixture models.

For every fixture model (``resnet``, ``mobilenetv2``, ``vgg``, ``concat``; missing ones are
skipped) and the same calibration split (``models/digits_calib.npz``), quantize with and without
``equalize`` in front and compare each result with the original float model on
``models/digits_test.npz`` (360 samples):

* ``fold_bn[,equalize],quantize_int8:per_channel=false`` — per-tensor weight scales, where
  equalization should matter;
* the same with ``per_channel=true`` (the default), where it should matter little;
* ``weights_only=true`` (int8 weights, float activations) per-tensor: the weight error alone.

MobileNetV2 uses ReLU6 (exported as ``Clip(0, 6)``), which equalize declines by default; it also
runs ``equalize:relu6_as_relu=true`` (Clip -> Relu in the equalized groups, an approximation of
the float model that is included in the numbers, since everything is measured against the
original). The ``equalize`` pass stats (groups, range spread before/after) are printed too.

Usage::

    python scripts/bench_equalize.py [--models resnet,mobilenetv2,vgg,concat] [--json out.json]

Prints a Markdown table: SQNR (dB) and cosine of the logits vs float, test accuracy, top-1
agreement. No timing. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first

from fixtures import CALIB, TEST, missing_data, select_models

import onnxcompress
from onnxcompress.core.errors import OnnxCompressError

log = logging.getLogger("bench_equalize")

QUANT = {
    "per-tensor": "quantize_int8:per_channel=false",
    "per-channel": "quantize_int8",
    "weights-only per-tensor": "quantize_int8:weights_only=true:per_channel=false",
}


@dataclass
class Row:
    """One pipeline on one model, measured against the original float model."""

    model: str
    quant: str
    equalize: str
    spec: str
    sqnr_db: float = float("nan")
    cosine: float = float("nan")
    acc_float: float = float("nan")
    acc: float = float("nan")
    top1_agreement: float = float("nan")
    eq_stats: dict = field(default_factory=dict)
    error: str = ""


def _equalize_variants(name: str) -> list[str]:
    variants = ["", "equalize"]
    if name == "mobilenetv2":
        variants.append("equalize:relu6_as_relu=true")
    return variants


def run_one(name: str, path: str, quant: str, eq: str) -> Row:
    """Quantize ``path`` with ``fold_bn[,eq],QUANT[quant]`` and validate it on the test split."""
    spec = ",".join(p for p in ("fold_bn", eq, QUANT[quant]) if p)
    row = Row(name, quant, eq or "-", spec)
    try:
        _, report = onnxcompress.optimize(str(path), spec, calib=str(CALIB), data=str(TEST), force=True)
    except OnnxCompressError as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    out = report.validation.outputs[0]
    row.sqnr_db, row.cosine = out.sqnr_db, out.cosine
    row.acc_float, row.acc, row.top1_agreement = out.ref_accuracy, out.cand_accuracy, out.top1_agreement
    for record in report.passes:
        if record.name == "equalize":
            row.eq_stats = dict(record.result.stats)
    return row


def _table(rows: list[Row]) -> str:
    lines = ["| model | weights | equalize | SQNR dB | cosine | accuracy (float → int8) | top-1 agreement |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.quant} | {r.equalize} | error: {r.error} | | | |")
            continue
        lines.append(f"| {r.model} | {r.quant} | {r.equalize} | {r.sqnr_db:.2f} | {r.cosine:.5f} | "
                     f"{100 * r.acc_float:.2f} → {100 * r.acc:.2f} | {100 * r.top1_agreement:.2f} |")
    return "\n".join(lines)


def _spread_table(rows: list[Row]) -> str:
    head = ("| model | equalize | groups | layers | sweeps | range spread median (before → after) | "
            "range spread max (before → after) |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for r in rows:
        key = (r.model, r.equalize)
        if not r.eq_stats or key in seen:
            continue
        seen.add(key)
        s = r.eq_stats
        lines.append(f"| {r.model} | {r.equalize} | {s.get('groups', 0):g} | {s.get('layers', 0):g} | "
                     f"{s.get('sweeps', 0):g} | {s['spread_median_before']:.2f} → {s['spread_median_after']:.2f} | "
                     f"{s['spread_max_before']:.2f} → {s['spread_max_after']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,mobilenetv2,vgg,concat")
    parser.add_argument("--quant", default=",".join(QUANT), help="comma-separated subset of " + ", ".join(QUANT))
    parser.add_argument("--json", help="write every row as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    missing = missing_data()
    if missing:
        print(f"missing data: {', '.join(missing)} (run scripts/make_models.py)", file=sys.stderr)
        return 2
    models, _ = select_models(args.models)
    rows = []
    for name, path in models:
        for quant in [q.strip() for q in args.quant.split(",") if q.strip()]:
            for eq in _equalize_variants(name):
                row = run_one(name, path, quant, eq)
                log.info("%s | %s | %s: %s", name, quant, eq or "-", row.error or f"SQNR {row.sqnr_db:.2f} dB")
                rows.append(row)
    print(_table(rows))
    print()
    print(_spread_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
