#!/usr/bin/env python
"""Benchmark quantize_int8 against onnxruntime's quantize_static on the fixture models.

For every fixture model in ``models/`` (``resnet_digits``, ``mobilenetv2_digits``, ``vgg_digits``,
``concat_digits``; missing ones are skipped) and the same calibration split
(``models/digits_calib.npz``):

* ours: ``fold_bn,quantize_int8:method=M`` for M in minmax, entropy, percentile, mse, plus
  ``weights_only=true``;
* ours with the companion passes (``--no-companions`` skips them): ``bias_correction`` after
  minmax / entropy / mse, per-tensor weights (``per_channel=false``, where weight rounding shifts
  channel means most) with and without it, and, when the ``equalize`` pass is registered,
  ``fold_bn,equalize,quantize_int8[,bias_correction]`` (``+eq``, ``+bc``);
* onnxruntime: ``quantize_static`` on the fold_bn'd model, QDQ format, per-channel int8 weights,
  uint8 activations, MinMax and Entropy calibration, fed by a ``CalibrationDataReader`` over the
  same npz in batches of 32.

Each quantization runs in its own subprocess, which reports its wall time and peak RSS
(``VmHWM``, which starts afresh at ``exec``, unlike ``ru_maxrss`` which can inherit the parent's
peak; also the growth over the RSS after imports), so the numbers are separable. The
parent then measures, against the *original* float model on ``models/digits_test.npz``: test
accuracy and its drop, top-1 agreement, SQNR (``onnxcompress.pipeline.validate.compare_models``); onnxruntime
latency relative to the float model, all models interleaved in one ``onnxcompress.runtime.bench.bench`` run
(1 thread, graph optimizations on); file size; and the Q/DQ nodes onnxruntime leaves unfused.

Usage::

    python scripts/bench_quant.py [--models resnet_digits,mobilenetv2_digits] [--runs 300] [--repeat 3]
                                  [--json out.json] [--keep folder] [--no-companions]

Prints a Markdown table and the issue's targets with a pass/fail verdict. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's onnxcompress, not an installed copy
MODELS = ("resnet_digits", "mobilenetv2_digits", "vgg_digits", "concat_digits")
OURS = ("minmax", "entropy", "percentile", "mse")
ORT = ("MinMax", "Entropy")
TARGET_DROP = {"resnet_digits": 0.3, "mobilenetv2_digits": 0.5}
BC = "bias_correction"


def companion_variants() -> list[tuple[str, str]]:
    """``(label, pipeline)`` of the companion-pass variants (``equalize`` ones only if registered)."""
    from onnxcompress.pipeline.manager import registry

    q = "fold_bn,quantize_int8"
    rows = [(f"ours {m} +bc", f"{q}:method={m},{BC}") for m in ("minmax", "entropy", "mse")]
    for m in ("minmax", "mse"):
        rows += [(f"ours {m} per-tensor", f"{q}:method={m}:per_channel=false"),
                 (f"ours {m} per-tensor +bc", f"{q}:method={m}:per_channel=false,{BC}")]
    if "equalize" in registry():
        eq = "fold_bn,equalize,quantize_int8"
        rows += [("ours mse +eq", eq), ("ours mse +eq+bc", f"{eq},{BC}"),
                 ("ours mse per-tensor +eq", f"{eq}:per_channel=false"),
                 ("ours mse per-tensor +eq+bc", f"{eq}:per_channel=false,{BC}")]
    return rows


def _status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` memory field in KiB (Linux), else ``None``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_kib() -> int:
    """Peak RSS of this process image. ``VmHWM`` starts afresh at ``exec``; ``ru_maxrss`` (the
    fallback) may carry the RSS the forking parent had, which would blur the numbers."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kib() -> int:
    rss = _status_kib("VmRSS")
    return rss if rss is not None else _peak_kib()


# ------------------------------------------------------------------------------ worker side


def _worker_ours(spec: str, model_path: str, calib: str, out: str) -> None:
    from onnxcompress.core import serde
    from onnxcompress.core.pass_api import PassContext
    from onnxcompress.pipeline.manager import PassManager, parse_spec, registry
    from onnxcompress.runtime.data import open_source

    registry()  # imports every pass module (onnxsim, ...): import time, not quantization time
    base = _rss_kib()
    start = time.perf_counter()
    model = serde.load_model(model_path)
    ctx = PassContext(calib=open_source(calib, model))
    quantized, _ = PassManager(parse_spec(spec), ctx).run(model)
    serde.save_model(quantized, out)
    _report(start, base)


def _worker_ort(method: str, model_path: str, calib: str, out: str) -> None:
    import numpy as np
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class NpzReader(CalibrationDataReader):
        def __init__(self, path: str, batch: int = 32):
            self.data = np.load(path)["input"]
            self.batch, self.pos = batch, 0

        def get_next(self) -> dict | None:
            if self.pos >= len(self.data):
                return None
            chunk = self.data[self.pos : self.pos + self.batch]
            self.pos += self.batch
            return {"input": chunk}

        def rewind(self) -> None:
            self.pos = 0

    base = _rss_kib()
    start = time.perf_counter()
    quantize_static(
        model_path,
        out,
        NpzReader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    _report(start, base)


def _report(start: float, base_kib: int) -> None:
    peak = _peak_kib()
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "peak_rss_mib": peak / 1024,
                "rss_growth_mib": (peak - base_kib) / 1024,
            }
        )
    )


def _worker(argv: list[str]) -> None:
    kind, what, model_path, calib, out = argv
    logging.basicConfig(level=logging.ERROR)
    if kind == "ours":
        _worker_ours(what, model_path, calib, out)
    else:
        _worker_ort(what, model_path, calib, out)


# ------------------------------------------------------------------------------ parent side


def _quantize(kind: str, what: str, model_path: Path, calib: Path, out: Path, repeat: int = 1) -> dict:
    """Run one quantization ``repeat`` times, each in a fresh subprocess; median time, max RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, what, str(model_path), str(calib), str(out)]
    runs = []
    for _ in range(repeat):
        proc = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
        if proc.returncode:
            raise RuntimeError(f"{kind} {what} failed:\n{proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    seconds = sorted(r["seconds"] for r in runs)
    return {
        "seconds": seconds[len(seconds) // 2],
        "seconds_all": seconds,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "rss_growth_mib": max(r["rss_growth_mib"] for r in runs),
    }


def _variants(name: str, tmp: Path, folded_path: Path, calib: Path, repeat: int,
              companions: bool = True) -> list[dict]:
    """Quantize ``name`` every way, each in a subprocess; returns rows with paths and costs."""
    original = ROOT / "models" / f"{name}.onnx"
    rows = []
    for method in OURS:
        out = tmp / f"{name}.ours_{method}.onnx"
        cost = _quantize("ours", f"fold_bn,quantize_int8:method={method}", original, calib, out, repeat)
        rows.append({"variant": f"ours {method}", "path": out, **cost})
    out = tmp / f"{name}.ours_weights_only.onnx"
    cost = _quantize("ours", "fold_bn,quantize_int8:weights_only=true", original, calib, out)
    rows.append({"variant": "ours weights_only", "path": out, **cost})
    for label, spec in companion_variants() if companions else []:
        out = tmp / f"{name}.{label.replace(' ', '_').replace('+', 'p')}.onnx"
        cost = _quantize("ours", spec, original, calib, out, repeat)
        rows.append({"variant": label, "path": out, **cost})
    for method in ORT:
        out = tmp / f"{name}.ort_{method}.onnx"
        cost = _quantize("ort", method, folded_path, calib, out, repeat)
        rows.append({"variant": f"ort {method}", "path": out, **cost})
    return rows


def _measure(name: str, rows: list[dict], test: Path, runs: int) -> dict:
    import onnx

    from onnxcompress.core import serde
    from onnxcompress.pipeline.validate import compare_models
    from onnxcompress.quant import count_unfused_qdq
    from onnxcompress.runtime.bench import bench
    from onnxcompress.runtime.data import open_source

    float_model = serde.load_model(ROOT / "models" / f"{name}.onnx")
    models = [onnx.load(str(r["path"])) for r in rows]
    for row, model in zip(rows, models, strict=True):
        out = compare_models(float_model, model, open_source(test, float_model)).outputs[0]
        row.update(
            accuracy=100 * out.cand_accuracy,
            drop=100 * (out.ref_accuracy - out.cand_accuracy),
            agreement=100 * out.top1_agreement,
            sqnr_db=out.sqnr_db,
            cosine=out.cosine,
            size_kib=model.ByteSize() / 1024,
            unfused=count_unfused_qdq(model),
        )
        row["path"] = str(row["path"])
    report = bench([float_model, *models], threads=1, runs=runs, warmup=20, data=str(test))
    for row, m in zip(rows, report.models[1:], strict=True):
        row.update(latency_ratio=m.ratio_vs_first, median_ms=m.median_ms)
    base = compare_models(float_model, float_model, open_source(test, float_model)).outputs[0]
    return {
        "model": name,
        "float_accuracy": 100 * base.ref_accuracy,
        "float_size_kib": float_model.ByteSize() / 1024,
        "float_median_ms": report.models[0].median_ms,
        "machine": report.machine.line(),
        "rows": rows,
    }


def _table(results: list[dict]) -> str:
    head = (
        "| model | variant | acc % | drop pts | top-1 agree % | SQNR dB | cosine | latency vs float | size KiB | "
        "calib s | peak RSS MiB (growth) | unfused Q/DQ |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(12)) + "|"]
    for res in results:
        lines.append(
            f"| {res['model']} | float | {res['float_accuracy']:.2f} | | | | | 1.00 ({res['float_median_ms']:.3f} ms) "
            f"| {res['float_size_kib']:.0f} | | | |"
        )
        for r in res["rows"]:
            lines.append(
                f"| {res['model']} | {r['variant']} | {r['accuracy']:.2f} | {r['drop']:+.2f} | {r['agreement']:.2f} | "
                f"{r['sqnr_db']:.2f} | {r['cosine']:.6f} | {r['latency_ratio']:.2f} | {r['size_kib']:.0f} | "
                f"{r['seconds']:.2f} | {r['peak_rss_mib']:.0f} ({r['rss_growth_mib']:+.0f}) | {r['unfused']} |"
            )
    return "\n".join(lines)


def _targets(results: list[dict]) -> list[str]:
    out = []
    for res in results:
        rows = {r["variant"]: r for r in res["rows"]}
        ours = [r for v, r in rows.items() if v.startswith("ours") and "weights_only" not in v]
        best_ours = max(ours, key=lambda r: r["sqnr_db"])
        ort_best = max((r for v, r in rows.items() if v.startswith("ort")), key=lambda r: r["sqnr_db"])
        limit = TARGET_DROP.get(res["model"])
        default = rows.get("ours mse")
        if limit is not None and default is not None:
            ok = default["drop"] <= limit
            out.append(
                f"- {res['model']}: accuracy drop (ours mse, the default) {default['drop']:+.2f} pts <= {limit}: "
                f"{'PASS' if ok else 'FAIL'}"
            )
        if default is not None:
            ok = default["sqnr_db"] >= ort_best["sqnr_db"] + 1.0
            out.append(
                f"- {res['model']}: SQNR ours mse {default['sqnr_db']:.2f} dB vs onnxruntime best "
                f"({ort_best['variant']}) {ort_best['sqnr_db']:.2f} dB + 1: {'PASS' if ok else 'FAIL'} "
                f"(our best: {best_ours['variant']} {best_ours['sqnr_db']:.2f} dB)"
            )
        ent, ort_ent = rows.get("ours entropy"), rows.get("ort Entropy")
        if ent and ort_ent:
            ok_t = ent["seconds"] <= ort_ent["seconds"]
            ok_m = ent["peak_rss_mib"] <= ort_ent["peak_rss_mib"]
            out.append(
                f"- {res['model']}: entropy calibration time {ent['seconds']:.2f} s vs {ort_ent['seconds']:.2f} s: "
                f"{'PASS' if ok_t else 'FAIL'}; peak RSS {ent['peak_rss_mib']:.0f} MiB vs "
                f"{ort_ent['peak_rss_mib']:.0f} MiB: {'PASS' if ok_m else 'FAIL'}"
            )
    return out


def _companion_summary(results: list[dict]) -> list[str]:
    """SQNR and accuracy without -> with the companion passes, for every variant that has a base."""
    out = []
    for res in results:
        rows = {r["variant"]: r for r in res["rows"]}
        for label, row in rows.items():
            suffix = next((x for x in ("+eq+bc", "+bc", "+eq") if label.endswith(" " + x)), None)
            base = rows.get(label[: -len(suffix) - 1]) if suffix else None
            if base is not None:
                out.append(f"- {res['model']}: {base['variant']} {suffix}: SQNR {base['sqnr_db']:.2f} -> "
                           f"{row['sqnr_db']:.2f} dB ({row['sqnr_db'] - base['sqnr_db']:+.2f}), accuracy "
                           f"{base['accuracy']:.2f} -> {row['accuracy']:.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated fixture names")
    parser.add_argument("--runs", type=int, default=300, help="timed latency rounds")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--keep", type=Path, help="keep the quantized models in this folder")
    parser.add_argument("--repeat", type=int, default=1, help="quantize each way N times; report the median time")
    parser.add_argument("--no-companions", action="store_true",
                        help="skip the bias_correction / per-tensor / equalize variants")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from onnxcompress.core import serde
    from onnxcompress.pipeline.manager import PassManager, parse_spec

    calib, test = ROOT / "models" / "digits_calib.npz", ROOT / "models" / "digits_test.npz"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp_name:
        tmp = args.keep or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            path = ROOT / "models" / f"{name}.onnx"
            if not path.exists():
                print(f"(skipping {name}: {path} does not exist)", file=sys.stderr)
                continue
            folded, _ = PassManager(parse_spec("fold_bn")).run(serde.load_model(path))
            folded_path = tmp / f"{name}.fold_bn.onnx"
            serde.save_model(folded, folded_path)
            rows = _variants(name, tmp, folded_path, calib, args.repeat, not args.no_companions)
            results.append(_measure(name, rows, test, args.runs))
            print(f"done: {name}", file=sys.stderr)
    print(
        f"onnxcompress quantize_int8 vs onnxruntime quantize_static - calib {calib.name} (256), "
        f"test {test.name} (360); "
        f"calib s: median of {args.repeat} subprocess run(s); unfused Q/DQ: count_unfused_qdq (weights_only: the "
        f"weight DQs onnxruntime runs before float ops)\n"
    )
    if results:
        print(results[0]["machine"] + "\n")
    print(_table(results))
    print("\nTargets:")
    print("\n".join(_targets(results)))
    summary = _companion_summary(results)
    if summary:
        print("\nCompanion passes (same quantization without -> with):")
        print("\n".join(summary))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
