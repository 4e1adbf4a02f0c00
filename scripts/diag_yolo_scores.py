#!/usr/bin/env python3
"""Where a pruned YOLOv8n (nudenet 320n) loses its detections: box rows vs class-score rows.

Compresses nudenet with ``SPEC`` on the task data of ``scripts/real_model_tasks.py`` (32 photos at
320 for calibration, random crops for evaluation) and prints the validation's per-slice cosine
(``output0`` rows 0:4 are boxes in pixels, 4:22 class scores after the sigmoid), then per test
crop the number of detections of the original and the pruned model, their best class score and the
mean absolute box error, and the box agreement F1 (IoU >= 0.5, same class).

    python scripts/diag_yolo_scores.py "prune_channels:ratio=0.3"
    python scripts/diag_yolo_scores.py "prune_channels:ratio=0.3:reconstruct=false" --test 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import numpy as np
import onnx
import real_model_tasks as rt
from real_model_files import CATALOG, locate, symbolic_dims

import onnxcompress
from onnxcompress.runtime.detection import decode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", help="pass list, e.g. prune_channels:ratio=0.3")
    p.add_argument("--test", type=int, default=20, help="evaluation crops (default 20)")
    p.add_argument("--show", type=int, default=6, help="crops printed (default 6)")
    args = p.parse_args(argv)
    model = onnx.load(str(locate(CATALOG["nudenet"])))
    task = rt.build_task("nudenet", 32, args.test)
    dims = symbolic_dims(model, {k: v.shape for k, v in task.calib[0].items()})
    out, rep = onnxcompress.optimize(model, args.spec, calib=task.calib, data=task.test[:8], dims=dims, force=True)
    ref, got = rt.run_all(model, task.test), rt.run_all(out, task.test)
    for o in rep.validation.outputs:
        print(f"{o.name}: cosine {o.cosine:.4f}; slices " + ", ".join(
            f"[{s.start}:{s.stop}] {s.cosine:.4f}" for s in o.slices))
    print("crop  detections orig -> pruned  best score orig -> pruned  mean |box err| (px)")
    for i, (r, g) in enumerate(list(zip(ref, got))[:args.show]):
        r0, g0 = r[0][0], g[0][0]
        print(f"{i:4d}  {len(decode(r0[None])[0]):5d} -> {len(decode(g0[None])[0]):<5d}"
              f"  {r0[4:].max():.3f} -> {g0[4:].max():.3f}  {np.abs(r0[:4] - g0[:4]).mean():.2f}")
    print(f"box agreement F1: {rt.box_agreement(decode)(ref, got):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
