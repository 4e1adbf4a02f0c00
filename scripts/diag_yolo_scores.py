#!/usr/bin/env python3
"""Where a pruned YOLOv8n (nudenet 320n) loses its detections: box rows vs class-score rows, stage by stage.

Compresses nudenet with each ``SPEC`` (``;``-separated) on the task data of
``scripts/real_model_tasks.py`` (``--calib`` photo views at 320, then seeded random crops) and
prints one row per spec: the box agreement F1 (IoU >= 0.5, same class) with the original on the
task's evaluation crops (``--test``) and on a second, larger crop set (``--extra`` crops per photo,
seed 7: the spread between the two is the metric's sampling noise), the number of reference boxes
in each, the validation's cosine on the box rows (``output0`` rows 0:4, pixels) and on the class
scores (rows 4:22, after the sigmoid), and the MAC ratio.

``--only backbone|neck|head`` prunes one stage of the Ultralytics graph (``/model.K/``: backbone
K <= 9, neck 10..21, the Detect head 22) by excluding every other Conv's group. A near-lossless
spec such as ``fold_bn,quantize_int8`` shows how far F1 falls from small score changes alone (the
reference boxes near the 0.25 threshold flip). ``--show N`` prints, for the first spec, the first
N crops' detections, best class score and mean box error.

    python scripts/diag_yolo_scores.py "prune_channels:ratio=0.3:criterion=obs:obs_damp=0.1;fold_bn,quantize_int8"
    python scripts/diag_yolo_scores.py "prune_channels:ratio=0.3:criterion=obs:obs_damp=0.1" --only head
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np
import onnx
import real_model_tasks as rt
import task_data as td
from photos import random_crops
from real_model_files import CATALOG, locate, symbolic_dims

import onnxcompress
from onnxcompress.runtime.detection import decode

STAGES = {"backbone": range(10), "neck": range(10, 22), "head": range(22, 23)}


def stage_exclude(model: onnx.ModelProto, stage: str) -> str:
    """``:exclude=...`` freezing the groups of every Conv outside ``stage`` (Ultralytics node names)."""
    def inside(name: str) -> bool:
        m = re.match(r"/model\.(\d+)/", name)
        return m is not None and int(m.group(1)) in STAGES[stage]

    names = [n.name for n in model.graph.node if n.op_type == "Conv" and not inside(n.name)]
    return ":exclude=" + "|".join(names)


def boxes(outputs: rt.Outputs) -> int:
    return sum(len(decode(o[0])[0]) for o in outputs)


def show(ref: rt.Outputs, got: rt.Outputs, count: int) -> None:
    print("crop  detections orig -> candidate  best score orig -> candidate  mean |box err| (px)")
    for i, (r, g) in enumerate(list(zip(ref, got))[:count]):
        r0, g0 = r[0][0], g[0][0]
        print(f"{i:4d}  {len(decode(r0[None])[0]):5d} -> {len(decode(g0[None])[0]):<5d}"
              f"  {r0[4:].max():.3f} -> {g0[4:].max():.3f}  {np.abs(r0[:4] - g0[:4]).mean():.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", help="';'-separated pass lists, e.g. prune_channels:ratio=0.3;fold_bn,quantize_int8")
    p.add_argument("--calib", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--test", type=int, default=64, help="evaluation crops as in real_model_tasks (default 64: 60)")
    p.add_argument("--extra", type=int, default=14, help="crops per photo of the second set (default 14; 0: none)")
    p.add_argument("--only", choices=sorted(STAGES), default=None, help="prune only this stage's groups")
    p.add_argument("--show", type=int, default=0, help="crops printed for the first spec (default 0)")
    args = p.parse_args(argv)
    model = onnx.load(str(locate(CATALOG["nudenet"])))
    task = rt.build_task("nudenet", args.calib, args.test)
    extra = td.feeds("images", random_crops(320, per_photo=args.extra, seed=7)) if args.extra else []
    dims = symbolic_dims(model, {k: v.shape for k, v in task.calib[0].items()})
    ref, ref_x = rt.run_all(model, task.test), rt.run_all(model, extra)
    f1 = rt.box_agreement(decode)
    print(f"calibration: {task.calib_note}; evaluation: {task.test_note} ({boxes(ref)} boxes); "
          f"second set: {len(extra)} crops, seed 7 ({boxes(ref_x)} boxes)")
    print("| spec | F1 | F1 second set | box cosine | score cosine | MACs | gate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, spec in enumerate(s for s in args.specs.split(";") if s):
        full = spec + (stage_exclude(model, args.only) if args.only and "prune_channels" in spec else "")
        out, rep = onnxcompress.optimize(model, full, calib=task.calib, data=task.test[:16], dims=dims, force=True)
        got = rt.run_all(out, task.test)
        slices = {(s.start, s.stop): s.cosine for o in rep.validation.outputs for s in o.slices}
        second = f"{f1(ref_x, rt.run_all(out, extra)):.3f}" if extra else "-"
        print(f"| `{spec}`{' (' + args.only + ' only)' if args.only else ''} | {f1(ref, got):.3f} | {second} | "
              f"{slices.get((0, 4), float('nan')):.4f} | {slices.get((4, 22), float('nan')):.4f} | "
              f"{rep.after.macs / rep.before.macs:.3f}x | {'pass' if rep.passed else 'FAIL'} |", flush=True)
        if k == 0 and args.show:
            show(ref, got, args.show)
    return 0


if __name__ == "__main__":
    sys.exit(main())
