#!/usr/bin/env python
"""Every registered pass and built-in recipe on every trained fixture transformer: how it ends.

For each fixture of ``models.json``'s ``transformers`` key (``scripts/make_transformers.py``) and each
pass (preceded by what it needs) or recipe, run ``onnxcompress.optimize`` with the fixture's
calibration data (``--calib-samples``, fixed length) and validation on the first ``--data-samples``
test samples, then score the model on the whole test split in onnxruntime (optimizations off).
Prints a Markdown table: exit code as the CLI would give it (0 written, 1 gate failed, 2 refused,
3 internal error), whether the graph changed, the top decline codes, accuracy before -> after.
Also runs onnxruntime's ``quantize_dynamic`` on each fixture for comparison (``--ort``).

    python scripts/transformer_matrix.py [--only text_ts,vit_ts] [--pipelines quantize_int8,int8-dynamic] \
        [--spec quantize_weights:prefer=size] [--ort]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcompress import api
from onnxcompress.core.errors import GateFailed, InputError
from onnxcompress.pipeline.manager import registry
from onnxcompress.pipeline.recipes import builtin_recipes
from tests.helpers.trained import pipeline_for

MODELS = ROOT / "models"


def run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """First output in onnxruntime, one thread, graph optimizations off."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def split(entry: dict, which: str, n: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(MODELS / entry["data"][which]) as npz:
        arrays = {k: npz[k][:n] for k in npz.files}
    return arrays, arrays.pop("labels")


def one(path: Path, how: dict, calib: Path, data: Path, test: tuple[dict, np.ndarray]) -> dict:
    """The row of one run."""
    t0 = time.perf_counter()
    try:
        new, rep = api.optimize(str(path), calib=str(calib), data=str(data), **how)
        code, note = 0, ""
    except GateFailed as exc:
        new, rep, code, note = exc.model, exc.report, 1, "; ".join(exc.report.validation.failures)
    except InputError as exc:
        return {"exit": 2, "note": str(exc), "seconds": time.perf_counter() - t0}
    except Exception as exc:
        return {"exit": 3, "note": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    try:
        onnx.checker.check_model(new, full_check=True)
        acc = float((run(new, test[0]).argmax(1) == test[1]).mean())
    except Exception as exc:
        return {"exit": code, "note": f"INVALID MODEL: {type(exc).__name__}: {exc}"}
    declined = collections.Counter(d.code for r in rep.passes for d in r.result.declined)
    return {"exit": code, "modified": [r.name for r in rep.passes if r.result.modified], "accuracy": acc,
            "declined": dict(declined.most_common(3)), "note": note, "seconds": time.perf_counter() - t0}


def ort_dynamic(path: Path, test: tuple[dict, np.ndarray], tmp: Path) -> dict:
    """onnxruntime's quantize_dynamic (per-channel int8): fails, writes an invalid model, or scores."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / f"{path.stem}.ortq.onnx"
    try:
        quantize_dynamic(str(path), str(out), per_channel=True, weight_type=QuantType.QInt8)
    except Exception as exc:
        return {"exit": "fails", "note": f"{type(exc).__name__}: {str(exc)[:120]}"}
    try:
        acc = float((run(str(out), test[0]).argmax(1) == test[1]).mean())
    except Exception as exc:
        return {"exit": "invalid", "note": str(exc)[:160]}
    return {"exit": 0, "accuracy": acc}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated fixture names")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--data-samples", type=int, default=128)
    parser.add_argument("--pipelines", default="", help="comma-separated pass and recipe names (default: all)")
    parser.add_argument("--spec", action="append", default=[], help="also this pass list (repeatable)")
    parser.add_argument("--ort", action="store_true", help="also onnxruntime's quantize_dynamic")
    args = parser.parse_args(argv)
    manifest = json.loads((MODELS / "models.json").read_text()).get("transformers", {})
    names = args.only.split(",") if args.only else sorted(manifest)
    wanted = set(args.pipelines.split(",")) if args.pipelines else None
    jobs = [{"passes": pipeline_for(p)} for p in registry() if wanted is None or p in wanted] + [
        {"recipe": r} for r in builtin_recipes() if wanted is None or r in wanted] + [{"passes": p} for p in args.spec]
    print("| fixture | pipeline | exit | changed | accuracy (float -> result) | top declines | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            e = manifest[name]
            calib, _ = split(e, "calib", args.calib_samples)
            data = split(e, "test", args.data_samples)
            np.savez(Path(tmp) / "calib.npz", **calib)
            np.savez(Path(tmp) / "data.npz", **data[0], labels=data[1])
            test = split(e, "test")
            rows = [(how.get("passes") or "recipe " + how["recipe"],
                     one(MODELS / e["file"], how, Path(tmp) / "calib.npz", Path(tmp) / "data.npz", test)) for how in jobs]
            if args.ort:
                rows.append(("ORT quantize_dynamic", ort_dynamic(MODELS / e["file"], test, Path(tmp))))
            for label, r in rows:
                acc = f"{e['accuracy']:.4f} -> {r['accuracy']:.4f}" if "accuracy" in r else ""
                print(f"| {name} | {label} | {r['exit']} | {','.join(r.get('modified', [])) or '-'} | {acc} | "
                      f"{r.get('declined', '')} | {r.get('note', '')[:140]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
