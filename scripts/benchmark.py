#!/usr/bin/env python
"""The README's results table: every built-in recipe, and the peers a user would otherwise pick.

For every fixture model in ``models/`` (missing ones are skipped) this runs:

* every recipe in the top-level ``passes/`` folder (``onnxcompress.optimize(recipe=...)``), with
  ``models/digits_calib.npz`` as calibration data (recipes that need none ignore it) and
  validation on ``models/digits_test.npz``;
* peers: ``onnxsim`` alone (``onnxsim.simplify``: constant folding and its onnxoptimizer fusions,
  BN into Conv among them; onnxsim has no quantizer of its own), and onnxruntime's
  ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax and Entropy,
  after ``quant_pre_process`` as its documentation recommends) on the same calibration split.

Then, against the original float model on the 360-sample test split: accuracy and its change,
top-1 agreement, SQNR, file size and MACs ratios, and onnxruntime latency relative to the float
model — all variants of one model in one ``onnxcompress.runtime.bench.bench`` run (interleaved rounds,
paired ratios, 1 thread, graph optimizations on, batch 1), so machine drift hits them alike.
Optimization wall time is reported too (it includes validation for the recipes).

Usage::

    python scripts/benchmark.py [--models resnet,mobilenetv2,vgg,concat] [--recipes default,prune]
                                [--runs 200] [--batch 1] [--json results.json] [--keep folder]

Prints a Markdown table (the README's) with the machine line above it. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first
from fixtures import CALIB, MODELS, TEST, missing_data, select_models


def _recipe_row(model_path: Path, recipe: str, out: Path) -> dict:
    """Run one built-in recipe; a gate failure is a result (row ``gate: fail``), not an error."""
    import onnxcompress
    from onnxcompress.core import serde

    start = time.perf_counter()
    result, report = onnxcompress.optimize(model_path, recipe=recipe, calib=str(CALIB), data=str(TEST), force=True)
    seconds = time.perf_counter() - start
    serde.save_model(result, out)
    return {"variant": f"recipe {recipe}", "path": out, "seconds": seconds,
            "gate": "pass" if report.passed else "fail: " + "; ".join(report.validation.failures)}


def _onnxsim_row(model_path: Path, out: Path) -> dict:
    import onnx
    import onnxsim

    start = time.perf_counter()
    simplified, ok = onnxsim.simplify(onnx.load(str(model_path)))
    seconds = time.perf_counter() - start
    onnx.save(simplified, str(out))
    return {"variant": "onnxsim", "path": out, "seconds": seconds, "gate": "checked" if ok else "onnxsim check failed"}


class _NpzReader:
    """A ``CalibrationDataReader`` over the calibration npz, in batches of 32."""

    def __init__(self, path: Path, name: str, batch: int = 32):
        import numpy as np

        self.data, self.name, self.batch, self.pos = np.load(path)["input"], name, batch, 0

    def get_next(self) -> dict | None:
        if self.pos >= len(self.data):
            return None
        chunk = self.data[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return {self.name: chunk}

    def rewind(self) -> None:
        self.pos = 0


def _ort_row(model_path: Path, method: str, tmp: Path, out: Path) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_NpzReader, CalibrationDataReader), {})(CALIB, "input")
    start = time.perf_counter()
    pre = tmp / f"{model_path.stem}.ort_pre.onnx"
    quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)  # onnx shape inference suffices
    with contextlib.redirect_stdout(sys.stderr):  # its entropy calibrator prints progress
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return {"variant": f"ort {method}", "path": out, "seconds": time.perf_counter() - start, "gate": ""}


def _variants(name: str, path: Path, recipes: list[str], tmp: Path) -> list[dict]:
    rows = []
    for recipe in recipes:
        rows.append(_recipe_row(path, recipe, tmp / f"{name}.{recipe}.onnx"))
        print(f"  {name}: recipe {recipe} done", file=sys.stderr)
    rows.append(_onnxsim_row(path, tmp / f"{name}.onnxsim.onnx"))
    for method in ("MinMax", "Entropy"):
        rows.append(_ort_row(path, method, tmp, tmp / f"{name}.ort_{method}.onnx"))
    return rows


def _measure(name: str, path: Path, rows: list[dict], runs: int, batch: int) -> dict:
    import onnx

    from onnxcompress.core import serde
    from onnxcompress.core.metrics import model_metrics
    from onnxcompress.pipeline.validate import compare_models
    from onnxcompress.runtime.bench import bench
    from onnxcompress.runtime.data import open_source

    original = serde.load_model(path)
    base = model_metrics(original)
    models = [onnx.load(str(r["path"])) for r in rows]
    for row, model in zip(rows, models, strict=True):
        out = compare_models(original, model, open_source(str(TEST), original)).outputs[0]
        metrics = model_metrics(model)
        row.update(accuracy=100 * out.cand_accuracy, change=100 * (out.cand_accuracy - out.ref_accuracy),
                   agreement=100 * out.top1_agreement, sqnr_db=out.sqnr_db,
                   size_ratio=model.ByteSize() / original.ByteSize(), macs_ratio=metrics.macs / base.macs,
                   path=str(row["path"]))
    report = bench([original, *models], threads=1, runs=runs, warmup=20, batch=batch)
    for row, m in zip(rows, report.models[1:], strict=True):
        row["latency_ratio"] = m.ratio_vs_first
    float_acc = compare_models(original, original, open_source(str(TEST), original)).outputs[0].ref_accuracy
    return {"model": name, "float_accuracy": 100 * float_acc, "float_median_ms": report.models[0].median_ms,
            "float_kib": original.ByteSize() / 1024, "float_macs": base.macs, "machine": report.machine.line(),
            "rows": rows}


def _table(results: list[dict]) -> str:
    head = ("| model | variant | accuracy % (change) | top-1 agree % | SQNR dB | latency vs float | size | MACs | "
            "time s | gate |")
    lines = [head, "|" + "---|" * 10]
    for res in results:
        lines.append(f"| {res['model']} | float | {res['float_accuracy']:.2f} | | | 1.00 "
                     f"({res['float_median_ms']:.3f} ms) | {res['float_kib']:.0f} KiB | "
                     f"{res['float_macs'] / 1e6:.2f} M | | |")
        for r in res["rows"]:
            lines.append(f"| {res['model']} | {r['variant']} | {r['accuracy']:.2f} ({r['change']:+.2f}) | "
                         f"{r['agreement']:.2f} | {r['sqnr_db']:.1f} | {r['latency_ratio']:.2f} | "
                         f"{r['size_ratio']:.2f}× | {r['macs_ratio']:.2f}× | {r['seconds']:.1f} | {r['gate']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated fixture names")
    parser.add_argument("--recipes", default=None, help="comma-separated built-in recipes (default: all)")
    parser.add_argument("--runs", type=int, default=200, help="timed latency rounds")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the latency runs")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--keep", type=Path, help="keep the produced models in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if missing_data():
        print(f"missing {', '.join(missing_data())}: run scripts/make_models.py", file=sys.stderr)
        return 2
    from onnxcompress.pipeline.recipes import builtin_recipes

    recipes = args.recipes.split(",") if args.recipes else sorted(builtin_recipes())
    models, _ = select_models(args.models)
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxcompress-benchmark-") as tmp_name:
        tmp = args.keep or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        for name, path in models:
            rows = _variants(name, path, recipes, tmp)
            results.append(_measure(name, path, rows, args.runs, args.batch))
    print(f"onnxcompress recipes vs peers — calib {CALIB.name} (256 samples), test {TEST.name} (360 samples); "
          f"latency: paired median ratio vs the float model, {args.runs} interleaved rounds, batch {args.batch}, "
          "1 thread, ORT graph optimizations on\n")
    if results:
        print(results[0]["machine"] + "\n")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
