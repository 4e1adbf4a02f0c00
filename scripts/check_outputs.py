"""Fingerprint what the tool produces, to prove a refactor changed nothing.

Runs, on every fixture model in ``models/``, every built-in recipe and every registered pass at its
default options (``onnxcompress optimize --seed 0 --force`` with the fixture calibration and test
splits), and records the sha256 of each written ``.onnx`` and of its ``--json`` report with timings
removed (decline lists are reduced to the declined names, whose reasons may be reworded).

    python scripts/check_outputs.py --write outputs.json      # record
    python scripts/check_outputs.py --compare outputs.json    # exit 1 on any difference
    python scripts/check_outputs.py --compare outputs.json --only equalize,default   # a subset
    python scripts/check_outputs.py --write real.json --real ddddocr_ocr,refinenet --only none

``--real KEYS`` adds installed real models (``scripts/real_model_files.py``'s CATALOG) at the sweep's
input sizes, each optimized with ``fold_bn,quantize_int8`` on :data:`REAL_SAMPLES` seeded uniform
samples (calibration and validation): shapes the fixtures never have (ddddocr_ocr's CTC head, which
onnx's shape inference leaves unknown) reach the reported MACs.

Runs go through the CLI of this checkout (first on ``PYTHONPATH``) in subprocesses (``--jobs`` at a time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from checkout import env as checkout_env

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
FIXTURES = ("resnet_digits", "mobilenetv2_digits", "vgg_digits", "concat_digits")
_TIMING_KEYS = {"seconds", "elapsed", "wall_seconds", "latency_ratio"}  # latency_ratio: measured (quantize_weights)
#: Where a run's files and data came from (paths in temporary folders; the models' hashes are compared
#: as ``onnx`` already): left out of the report's digest.
_PROVENANCE_KEYS = ("model", "output", "input_model", "output_model", "reference", "calibration", "preprocess")
#: The pipeline and the calibration samples of each ``--real`` model.
REAL_SPEC, REAL_SAMPLES = "fold_bn,quantize_int8", 16

#: One run: label, ``passes`` or ``recipe``, its name, the model file, the calibration and validation data.
Job = tuple[str, str, str, Path, Path, Path]


def _jobs() -> list[Job]:
    recipes = sorted(p.stem for p in (ROOT / "passes").glob("*.toml"))
    out = subprocess.run([sys.executable, "-m", "onnxcompress", "passes", "--json"],
                         capture_output=True, text=True, check=True, env=checkout_env())
    passes = sorted(p["name"] for p in json.loads(out.stdout)["passes"])
    jobs: list[Job] = []
    for model in FIXTURES:
        path, calib, test = MODELS / f"{model}.onnx", MODELS / "digits_calib.npz", MODELS / "digits_test.npz"
        jobs += [(model, "recipe", r, path, calib, test) for r in recipes]
        jobs += [(model, "passes", p, path, calib, test) for p in passes]
    return jobs


def _real_jobs(keys: str, folder: Path) -> list[Job]:
    """``--real``: each installed model of ``keys`` with its seeded data written into ``folder``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from sweep_real_models import seeded_files

    return [(key, "passes", REAL_SPEC, path, data, data)
            for key, path, data, _ in seeded_files([k for k in keys.split(",") if k], REAL_SAMPLES, folder)]


def _strip(value):
    if isinstance(value, str):
        return _relative(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in _TIMING_KEYS or k.endswith("_seconds"):
                continue
            if k == "declined" and isinstance(v, list):
                out[k] = sorted(str(d.get("where")) if isinstance(d, dict) else d for d in v)
                continue
            out[k] = _strip(v)
        return out
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _relative(text: str) -> str:
    """Paths inside the checkout as ``<root>/...``, so that worktrees compare equal."""
    return text.replace(str(ROOT), "<root>").replace("/work/main", "<root>")


def _run(job: Job, tmp: Path) -> dict:
    model, kind, name, path, calib, data = job
    stem = f"{model}.{name}"
    onnx_path, json_path = tmp / f"{stem}.onnx", tmp / f"{stem}.json"
    cmd = [sys.executable, "-m", "onnxcompress", "-q", "optimize", str(path), f"--{kind}", name,
           "--calib", str(calib), "--data", str(data),
           "--seed", "0", "--force", "--json", str(json_path), "-o", str(onnx_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp, env=checkout_env())
    row = {"exit": proc.returncode}
    if onnx_path.exists():
        row["onnx"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if json_path.exists():
        report = _strip(json.loads(json_path.read_text().replace(str(tmp), "<tmp>")))  # --real data lives there
        row["json"] = _digest(report)
        row["report"] = report
    if proc.returncode not in (0, 1):
        row["stderr"] = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    return {f"{model} {kind} {name}": row}


def _digest(report: dict | None) -> str | None:
    """sha256 of a stripped report (recomputed on compare, so older records normalise the same way)."""
    if report is None:
        return None
    report = _strip({k: v for k, v in report.items() if k not in _PROVENANCE_KEYS})
    return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()


def fingerprint(jobs: int, only: set[str] | None = None, real: str = "") -> dict:
    """``{"model kind name": {"exit", "onnx", "json", "report"}}`` for every fixture run (or the
    passes and recipes named in ``only``) and every ``real`` model's run."""
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        todo = [j for j in _jobs() if not only or j[2] in only] + _real_jobs(real, Path(tmp))
        rows = list(pool.map(lambda j: _run(j, Path(tmp)), todo))
    return {k: v for row in rows for k, v in row.items()}


def _compare(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in sorted(set(new) if len(new) < len(old) else set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            diffs.append(f"{key}: {'new' if a is None else 'missing'}")
            continue
        gained: list[str] = []
        a = {**a, "json": _digest(a.get("report"))}
        b = {**b, "report": _without_gained(a.get("report"), b.get("report"), key, gained)}
        b["json"] = _digest(b.get("report"))
        if gained and a["json"] == b["json"]:
            print(f"note: {key}: the report gained {', '.join(gained)} (tolerated: reports may gain keys)")
        for field in ("exit", "onnx", "json"):
            if a.get(field) != b.get(field):
                diffs.append(f"{key}: {field} differs ({a.get(field)} -> {b.get(field)})")
                if field == "json":
                    diffs += _report_diff(*(_strip({k: v for k, v in (r.get("report") or {}).items()
                                                    if k not in _PROVENANCE_KEYS}) for r in (a, b)), key)
    return diffs


def _without_gained(old, new, where: str, gained: list[str]):
    """``new`` without the dict keys ``old`` does not have (recorded in ``gained``): reports may gain keys."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = {}
        for k, v in new.items():
            if k not in old:
                gained.append(f"{where}.{k}")
                continue
            out[k] = _without_gained(old[k], v, f"{where}.{k}", gained)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [_without_gained(x, y, f"{where}[{i}]", gained) for i, (x, y) in enumerate(zip(old, new))]
    return new


def _report_diff(a, b, where: str, depth: int = 0) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict) and depth < 6:
        out = []
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out += _report_diff(a.get(k), b.get(k), f"{where}.{k}", depth + 1)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and depth < 6:
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _report_diff(x, y, f"{where}[{i}]", depth + 1)]
    return [f"    {where}: {json.dumps(a)[:200]} -> {json.dumps(b)[:200]}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="record the fingerprints here")
    ap.add_argument("--compare", type=Path, help="compare with fingerprints recorded earlier")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated pass and recipe names (default: all; "
                                               "'none': no fixture run)")
    ap.add_argument("--real", default="", help="also these real models (comma-separated keys of "
                                               f"scripts/real_model_files.py's CATALOG), with {REAL_SPEC}")
    args = ap.parse_args()
    rows = fingerprint(args.jobs, {s for s in args.only.split(",") if s} or None, args.real)
    if args.write:
        args.write.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"{len(rows)} runs: " + ", ".join(f"exit {c}: {sum(r['exit'] == c for r in rows.values())}"
                                          for c in sorted({r['exit'] for r in rows.values()})))
    if args.compare:
        diffs = _compare(json.loads(args.compare.read_text()), rows)
        print("\n".join(diffs) if diffs else "identical: every .onnx sha256 and every --json (timings removed)")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
