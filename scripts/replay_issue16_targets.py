"""The target points of issue #16 (nudenet int8 beside onnxruntime, open-nsfw unchanged), registered
after the session's points (see ``scripts/replay_issue16.py``)."""

from __future__ import annotations

from replay_harness import ROOT, Outcome, Replay, judge
from replay_issue16_points import about, point
from replay_issue16_setup import (
    NUDENET,
    OPENNSFW,
    ROW,
    Subject,
    _optimize,
    _photos_module,
    _save_npz,
    require_real,
    slice_of,
    whole,
)

__all__ = ["ORT_QUANTIZE"]


# =========================================================================== targets

#: onnxruntime's own static quantization on the same calibration data, as ``scripts/bench_detector.py``
#: runs it (QDQ, per-channel int8 weights, uint8 activations, MinMax).
ORT_QUANTIZE = """
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[4])
from bench_detector import ort_static
src, npz, out = sys.argv[1:4]
with np.load(npz) as z:
    ort_static(Path(src), "MinMax", z[z.files[0]], Path(out), Path(out).resolve().parent)
"""


def _held_out(r: Replay, det: Subject, model: str, stem: str) -> tuple[float, float] | None:
    """(score-slice SQNR, detection F1) of ``model`` vs the float detector on the held-out photos."""
    run = r.cli("compare", det.model, model, "--data", det.test, "--task", "detection", "--json", f"{stem}.json",
                show=[ROW, r"^task \S+:"])
    if run.code not in (0, 1):  # 1: a default gate failed; the metrics are in the JSON all the same
        return None
    out = whole(r.read_json(f"{stem}.json"))
    return slice_of(out, det.score)["sqnr_db"], float(out["task"]["values"]["f1"])


def _top5_float(r: Replay, det: Subject) -> str:
    """README's route to score rows >= 20 dB: rank the layers with ``sensitivity`` (minmax ranges from
    the calibration photos, scored on random crops of other views: not the held-out photos), then
    quantize with the five most sensitive layers kept float (``exclude=``)."""
    crops = _save_npz(r, "yolo_rank.npz", "images", _photos_module().random_crops(320, 2, seed=7))
    r.cli("sensitivity", det.model, "--calib", det.calib, "--data", crops, "--method", "minmax", "--top", "5",
          "--json", "rank.json", show=[r"^\s*[│|]\s*[1-5]\s"])
    top = [layer["node"] for layer in r.read_json("rank.json")["layers"][:5]]
    spec = f"fold_bn,quantize_int8:method=minmax:exclude={'|'.join(top)}"
    _, out, _ = _optimize(r, det, "int8_top5_float", "--passes", spec, "--calib", det.calib)
    return out


@point("target-det-int8", "targets", "nudenet int8: score-row SQNR >= 20 dB and detection F1 vs float >= 0.9 at "
       ">= 1.4x float speed; report it beside onnxruntime quantize_static on the same data", real_only=True)
def target_det_int8(r: Replay) -> Outcome:
    require_real(r, NUDENET)
    det = r.asset("detector")
    models = {"int8": r.asset("int8")[1], "int8 min_sqnr=20": r.asset("mixed")[1],
              "int8 sensitivity top 5 float": _top5_float(r, det)}
    ort = r.python(ORT_QUANTIZE, det.model, det.calib, "ort_int8.onnx", ROOT / "scripts",
                   label="onnxruntime quantize_static (MinMax)")
    if ort.code == 0:
        models["ort quantize_static"] = "ort_int8.onnx"
    quality = {k: _held_out(r, det, m, f"target_{i}") for i, (k, m) in enumerate(models.items())}
    r.cli("bench", det.model, *models.values(), "--data", det.test, "--runs", "40", "--warmup", "5",
          "--json", "target_bench.json", show=[r"\.onnx\s"])
    ratios = [m["ratio_vs_first"] for m in r.read_json("target_bench.json")["models"][1:]]
    parts, ok = [], False
    for (name, q), ratio in zip(quality.items(), ratios):
        speed = 1.0 / ratio if ratio else float("nan")
        sqnr, f1 = q if q else (float("nan"), float("nan"))
        parts.append(f"{name}: {det.score} {sqnr:.1f} dB, F1 {f1:.2f}, {speed:.2f}x")
        ok = ok or (not name.startswith("ort") and sqnr >= 20 and f1 >= 0.9 and speed >= 1.4)
    return about(judge(ok, "held-out photos: " + "; ".join(parts)), det)


@point("target-nsfw", "targets", "open-nsfw unchanged (SQNR >= 46 dB, top-1 agreement 100 %)", real_only=True)
def target_nsfw(r: Replay) -> Outcome:
    require_real(r, OPENNSFW)
    nsfw = r.asset("nhwc")
    run = r.cli("optimize", nsfw.model, "-o", "open-nsfw.int8.onnx", "--passes", "fold_bn,quantize_int8", "--calib",
                nsfw.calib, "--data", nsfw.test, "--json", "nsfw_int8.json", show=[ROW, "^gate"])
    out = whole(r.read_json("nsfw_int8.json")["validation"])
    text = f"int8 on held-out photos: SQNR {out['sqnr_db']:.1f} dB, top-1 agreement {out['top1_agreement']:.0%}; " \
           f"exit {run.code}"
    return about(judge(run.code == 0 and out["sqnr_db"] >= 46 and out["top1_agreement"] == 1.0, text), nsfw)
