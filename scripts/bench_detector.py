#!/usr/bin/env python3
"""Detector-grade int8 on a real YOLOv8n (nudenet 320n): quantize_int8 variants vs onnxruntime's
quantize_static, judged on what a detector does (not a test).

Model: ``nudenet==3.4.2``'s ``320n.onnx`` (YOLOv8n, output ``[1, 4+18, 2100]``: box rows in pixels,
class-score rows after a Sigmoid). Install it with ``pip install --no-deps nudenet==3.4.2``.

Data, built offline from the photos that ship in scikit-image and scikit-learn
(``scripts/photos.py``): calibration = the first ``--calib`` fixed views at 320x320, plus
``--calib-crops`` random crops per photo with seed 5 (default 0); evaluation = ``--per-photo``
seeded random crops of every photo (seed 123, mirrored half of the time), a different set.

Variants (each quantized from the same float model on the same calibration array):

* ``ours: <spec>`` for each ``--specs`` item (``onnxcompress.api.optimize``, validation off);
* ``ort <Method>`` for each ``--ort`` method: ``quantize_static`` (QDQ, per-channel int8 weights,
  uint8 activations) on the model with its input fixed to 320x320 and ``quant_pre_process``-ed.

Per variant, on the evaluation crops (onnxruntime with its default graph optimizations, i.e. the
integer kernels a deployed int8 model runs, not fake-quant; batch 1): SQNR in dB of
the class-score rows ``[4:22]`` and of the box rows ``[0:4]``, and detection agreement with the
float model (decode, confidence 0.25, class-aware NMS 0.45, matched at IoU >= 0.5 with the same
class): precision, recall, F1. Latency: ``onnxcompress bench`` of every model in one interleaved
run (optimizations on, ``--threads``), as the paired median ratio float / variant. The machine
line says whether the CPU has VNNI.

Usage::

    python scripts/bench_detector.py [--calib 32] [--per-photo 14] [--specs "fold_bn,quantize_int8;..."]
                                     [--ort MinMax,Entropy] [--calib-crops 6] [--diagnose]
                                     [--json out.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np
import onnx
from checkout import env as checkout_env
from photos import photos, random_crops
from real_model_files import CATALOG, MissingModel, locate

log = logging.getLogger("bench_detector")

DEFAULT_SPECS = ("fold_bn,quantize_int8", "fold_bn,quantize_int8,bias_correction",
                 "fold_bn,quantize_int8,bias_correction:check=false", "fold_bn,quantize_int8:min_sqnr=20")
SIZE = 320


#: quantize_int8 stats copied into a row (what ``method=auto`` and mixed precision decided).
DECISIONS = ("method_chosen", "method_sqnr", "fallback_layers", "mixed_sqnr", "holdout_samples", "exclude_spec")


def ours(model: onnx.ModelProto, spec: str, calib: Path, out: Path) -> tuple[float, dict]:
    """Seconds to quantize, and the quantize_int8 decisions (:data:`DECISIONS`) found in the report."""
    from onnxcompress import api

    start = time.perf_counter()
    result, report = api.optimize(model, spec, calib=str(calib), validate=False,
                                  dims={"height": SIZE, "width": SIZE})
    onnx.save(result, out)
    stats = next((r.result.stats for r in report.passes if r.name == "quantize_int8"), {})
    return time.perf_counter() - start, {k: stats[k] for k in DECISIONS if k in stats}


def ort_static(path: Path, method: str, calib: np.ndarray, out: Path, tmp: Path) -> float:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fixed, pre = tmp / "fixed.onnx", tmp / "pre.onnx"
    if not pre.exists():
        m = onnx.load(path)
        for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, (1, 3, SIZE, SIZE)):
            d.ClearField("dim_param")
            d.dim_value = v
        onnx.save(m, fixed)
        quant_pre_process(str(fixed), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            self.i += 1
            return {"images": calib[self.i - 1:self.i]} if self.i <= len(calib) else None

        def rewind(self) -> None:
            self.i = 0

    start = time.perf_counter()
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return time.perf_counter() - start


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # as deployed
    return np.concatenate([sess.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])


def sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    err = float(((ref.astype(np.float64) - got) ** 2).sum())
    return float("inf") if err == 0 else 10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / err)


def diagnose(ref: np.ndarray, got: np.ndarray) -> dict:
    """Where the class-score rows' squared error sits (see the module docstring)."""
    r = ref[:, 4:].astype(np.float64)
    err = (got[:, 4:] - r) ** 2
    total = float(err.sum()) or 1.0
    top = np.sort(err.ravel())[::-1]
    crops = np.sort(err.sum(axis=(1, 2)))[::-1]

    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p))

    sig, noise = (r ** 2).sum(axis=(1, 2)), err.sum(axis=(1, 2))
    picks = np.random.default_rng(0).integers(0, len(r), size=(1000, len(r)))
    boot = 10 * np.log10(sig[picks].sum(axis=1) / np.maximum(noise[picks].sum(axis=1), 1e-30))
    pos = r > 0.1
    dl = logit(got[:, 4:].astype(np.float64)[pos]) - logit(r[pos])
    return {"err_top100_share": round(float(top[:100].sum()) / total, 3),
            "err_top5_crops_share": round(float(crops[:5].sum()) / total, 3),
            "err_background_share": round(float(err[r < 0.01].sum()) / total, 3),
            "logit_err_mean": round(float(dl.mean()), 3) if dl.size else None,
            "logit_err_std": round(float(dl.std()), 3) if dl.size else None, "positives": int(pos.sum()),
            "score_sqnr_db_p5_p95": [round(float(v), 2) for v in np.percentile(boot, [5, 95])]}


def agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    from onnxcompress.runtime.detection import DetectionCounts, decode

    counts = DetectionCounts()
    for r, c in zip(decode(ref), decode(got)):
        counts.add(r, c)
    return counts.metrics()


def latency(paths: list[Path], data: Path, threads: int, runs: int) -> tuple[list[float], dict]:
    """Paired ratio float/variant per model (first = float) and the machine record."""
    out = data.parent / "bench.json"
    cmd = [sys.executable, "-m", "onnxcompress", "-q", "bench", *map(str, paths), "--data", str(data),
           "--threads", str(threads), "--runs", str(runs), "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, env=checkout_env())
    rep = json.loads(out.read_text())
    return [1.0 / m["ratio_vs_first"] for m in rep["models"]], rep["machine"]


def vnni() -> bool | None:
    from onnxcompress.quant.cpu import cpu_flags, has_vnni

    return has_vnni(cpu_flags())


def run(args: argparse.Namespace, tmp: Path) -> dict:
    path = locate(CATALOG["nudenet"])
    model = onnx.load(path)
    calib, test = photos(SIZE, args.calib), random_crops(SIZE, args.per_photo)
    if args.calib_crops:
        calib = np.concatenate([calib, random_crops(SIZE, args.calib_crops, seed=5)])
    np.savez(tmp / "bench_input.npz", images=test[:1])
    np.savez(tmp / "calib.npz", images=calib)
    variants: list[tuple[str, Path, float]] = [("float", path, 0.0)]
    decisions: dict[str, dict] = {}
    for i, spec in enumerate(args.specs):
        out = tmp / f"ours{i}.onnx"
        seconds, decisions[f"ours: {spec}"] = ours(model, spec, tmp / "calib.npz", out)
        variants.append((f"ours: {spec}", out, seconds))
        log.info("%s: %.0f s %s", spec, seconds, decisions[f"ours: {spec}"])
    for method in args.ort:
        out = tmp / f"ort_{method}.onnx"
        variants.append((f"ort {method}", out, ort_static(path, method, calib, out, tmp)))
    ref = outputs(path, test)
    speed, machine = latency([p for _, p, _ in variants], tmp / "bench_input.npz", args.threads, args.runs)
    rows = []
    for (name, p, seconds), ratio in zip(variants, speed):
        got = ref if name == "float" else outputs(p, test)
        rows.append({"variant": name, "seconds": round(seconds, 1), "score_sqnr_db": round(sqnr(ref[:, 4:], got[:, 4:]), 2),
                     "box_sqnr_db": round(sqnr(ref[:, :4], got[:, :4]), 2), "speedup": round(ratio, 3),
                     "size_mib": round(p.stat().st_size / 2**20, 2), **agreement(ref, got),
                     **({"decisions": decisions[name]} if decisions.get(name) else {})})
        if args.diagnose and name != "float":
            rows[-1]["diagnosis"] = diagnose(ref, got)
    crops = f" + random_crops(per_photo={args.calib_crops}, seed=5)" if args.calib_crops else ""
    return {"machine": {**machine, "vnni": vnni()},
            "calib": f"photos.py views 0..{args.calib - 1}{crops} at {SIZE}: {len(calib)} images",
            "eval": f"photos.py random_crops(per_photo={args.per_photo}, seed=123): {len(test)} crops", "rows": rows}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"{m['cpu']}, {m['usable_cores']} cores, VNNI: {m['vnni']}, onnxruntime {m['onnxruntime']}, "
             f"{m['threads']} thread(s); calibration: {res['calib']}; evaluation: {res['eval']}", "",
             "| variant | score rows SQNR dB | box rows SQNR dB | det. P | det. R | det. F1 | boxes ref → new "
             "| speed vs float | size MiB | quantize s |", "|" + " --- |" * 10]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['score_sqnr_db']} | {r['box_sqnr_db']} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['f1']:.3f} | {r['ref_detections']} → {r['cand_detections']} | "
                     f"{r['speedup']:.2f}× | {r['size_mib']} | {r['seconds']} |")
    diag = [r for r in res["rows"] if "diagnosis" in r]
    if diag:
        lines += ["", "| variant | error in top 100 entries | in 5 worst crops | at float score < 0.01 "
                  "| logit error mean ± std (float score > 0.1) | score SQNR 90 % interval |", "|" + " --- |" * 6]
        for r in diag:
            d = r["diagnosis"]
            lines.append(f"| {r['variant']} | {d['err_top100_share']:.1%} | {d['err_top5_crops_share']:.1%} | "
                         f"{d['err_background_share']:.1%} | {d['logit_err_mean']} ± {d['logit_err_std']} "
                         f"({d['positives']} entries) | {d['score_sqnr_db_p5_p95'][0]}–{d['score_sqnr_db_p5_p95'][1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=32, help="calibration views (default 32)")
    ap.add_argument("--calib-crops", type=int, default=0,
                    help="also calibrate on this many random crops per photo (seed 5; default 0)")
    ap.add_argument("--per-photo", type=int, default=14, help="evaluation crops per photo (default 14)")
    ap.add_argument("--diagnose", action="store_true", help="where the class-score error sits, per variant")
    ap.add_argument("--specs", default=";".join(DEFAULT_SPECS), help="our pass specs, ';'-separated")
    ap.add_argument("--ort", default="MinMax", help="onnxruntime calibration methods, ','-separated ('' for none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep the models in this folder")
    args = ap.parse_args(argv)
    args.specs = [s for s in args.specs.split(";") if s.strip()]
    args.ort = [s for s in args.ort.split(",") if s.strip()]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("onnxcompress").setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-det-") as tmp:
            folder = args.keep or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            res = run(args, folder)
    except MissingModel as exc:
        print(f"skipped: {exc}")
        return 0
    print(markdown(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
