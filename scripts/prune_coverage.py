#!/usr/bin/env python3
"""Structured-pruning coverage: groups found / pruned / frozen (with reasons) per model.

Models: onnx's light model zoo (the ``light_*.onnx`` files in the onnx wheel; their large weights
are ``ConstantOfShape`` fills, materialized here as seeded He-normal initializers, and BN
variances are redrawn positive: structure only) and the real models of ``scripts/real_model_files.py`` that are installed. Each is run
through :func:`onnxcompress.optimize` with ``--passes`` (default
``fold_bn,simplify,prune_channels:ratio=0.3``), seeded random calibration data of the model's
input shape (free dims = ``--size``), no validation. Prints one line per model and, with
``-v``, every frozen group with the nodes that froze it. ``--oracle`` also checks the pruning
itself: the model after the passes before ``prune_channels``, pruned at ``ratio`` with random
scores and no bias compensation, must equal in onnxruntime that model with the removed
channels' consumer columns zeroed (``mask_inputs``): the largest output difference is printed.

Usage::

    python scripts/prune_coverage.py                           # the zoo + every installed real model
    python scripts/prune_coverage.py --models shufflenet,nudenet --size 320 -v --oracle
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np
import onnx
from onnx import numpy_helper
from real_model_files import CATALOG, MissingModel, input_shapes, locate, symbolic_dims

import onnxcompress
from onnxcompress.core import serde
from onnxcompress.pruning.apply import apply_pruning, mask_inputs
from onnxcompress.pruning.dependency import analyze
from onnxcompress.pruning.select import Budget, plan_removal
from onnxcompress.pruning.types import FREEZE_REASONS
from onnxcompress.runtime.session import make_session

log = logging.getLogger("prune_coverage")

ZOO = ("shufflenet", "resnet50", "inception_v1", "inception_v2", "densenet121", "squeezenet")
SPEC = "fold_bn,simplify,prune_channels:ratio=0.3"


def zoo_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """``light_<name>.onnx`` with every ``ConstantOfShape`` weight fill replaced by seeded He-normal values."""
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    keep = []
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else max(shape[0], 1)
            values = rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape).astype(np.float32)
            model.graph.initializer.append(numpy_helper.from_array(values, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:  # the light files' BN variances are not all positive: outputs would be NaN
        if node.op_type == "BatchNormalization" and node.input[4] in inits:
            var = numpy_helper.to_array(inits[node.input[4]])
            inits[node.input[4]].CopyFrom(numpy_helper.from_array(
                rng.uniform(0.5, 2.0, var.shape).astype(np.float32), node.input[4]))
    model.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs
    return model


def load(key: str, size: int) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """The model and concrete input shapes."""
    if key in ZOO:
        model = zoo_model(key)
        shapes = {i.name: tuple(d.dim_value or 1 for d in i.type.tensor_type.shape.dim) for i in model.graph.input
                  if i.name not in {t.name for t in model.graph.initializer}}
        return model, shapes
    spec = CATALOG[key]
    return onnx.load(str(locate(spec))), input_shapes(spec, size)


def measure(key: str, spec: str, size: int, n_calib: int, seed: int) -> dict[str, Any]:
    """Groups found/pruned/frozen (and the frozen groups by reason) of ``spec`` on model ``key``."""
    model, shapes = load(key, size)
    rng = np.random.default_rng(seed)
    calib = [{k: rng.random(s, dtype=np.float32) for k, s in sorted(shapes.items())} for _ in range(n_calib)]
    dims = symbolic_dims(model, shapes) if key in CATALOG else None
    _, report = onnxcompress.optimize(model, spec, calib=calib, validate=False, dims=dims, seed=seed)
    record = next(r for r in report.passes if r.name == "prune_channels")
    stats = record.result.stats
    frozen = [(d.where, d.code) for d in record.result.declined if d.code in FREEZE_REASONS]
    reasons = Counter(code for _, code in frozen)
    return {"model": key, "found": stats.get("groups_found", 0), "pruned": stats.get("groups_pruned", 0),
            "frozen": stats.get("groups_frozen", 0), "small": stats.get("groups_skipped_small", 0),
            "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])), "frozen_groups": frozen,
            "macs_ratio": round(record.macs_after / record.macs_before, 3) if record.macs_before else None}


def oracle(key: str, spec: str, size: int, seed: int, ratio: float = 0.3) -> tuple[int, float]:
    """``(channels removed, max |pruned - unread| / max |unread|)`` on one random input (see the module doc)."""
    model, shapes = load(key, size)
    dims = symbolic_dims(model, shapes) if key in CATALOG else None
    before = ",".join(p for p in spec.split(",") if not p.startswith("prune_channels"))
    if before:
        model, _ = onnxcompress.optimize(model, before, validate=False, dims=dims, seed=seed)
    producers = {o: n for n in model.graph.node for o in n.output}
    typed = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for out in list(model.graph.output):  # compare logits, not a saturated softmax
        node = producers.get(out.name)
        if node is not None and node.op_type == "Softmax" and node.input[0] in typed:
            model.graph.output.append(typed[node.input[0]])
    rng = np.random.default_rng(seed)
    graph = serde.to_graph(model)
    analysis = analyze(graph, dims=dims)
    scores = {g.index: rng.random(g.size) for g in analysis.groups if g.frozen is None}
    remove = plan_removal(analysis, scores, Budget(ratio, round_to=1, seed=seed)).remove
    report = apply_pruning(analysis, remove, compensate=False)
    pruned = serde.to_model(graph.cleanup().toposort(), model)
    onnx.checker.check_model(pruned, full_check=True)
    reference = serde.to_graph(model)
    mask_inputs(analyze(reference, dims=dims), remove)
    reference_model = serde.to_model(reference.cleanup().toposort(), model)
    feeds = {k: rng.random(s, dtype=np.float32) for k, s in shapes.items()}
    got = make_session(pruned).run(None, feeds)
    want = make_session(reference_model).run(None, feeds)
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))
    scale = max(float(np.max(np.abs(b))) for b in want)
    return report.removed, err / max(scale, 1e-12)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join((*ZOO, *CATALOG)), help="comma-separated: " + ", ".join((*ZOO, *CATALOG)))
    p.add_argument("--passes", default=SPEC)
    p.add_argument("--size", type=int, default=320, help="free spatial dims of real models (default 320)")
    p.add_argument("--calib", type=int, default=4, help="random calibration samples (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="list the frozen groups")
    p.add_argument("--oracle", action="store_true", help="also check pruned == masked original (see above)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    print(f"{'model':16s} {'found':>5s} {'pruned':>6s} {'frozen':>6s} {'small':>5s} {'MACs':>6s}  frozen reasons")
    for key in args.models.split(","):
        try:
            row = measure(key, args.passes, args.size, args.calib, args.seed)
        except MissingModel as exc:
            print(f"{key:16s} skipped: {str(exc).splitlines()[0]}")
            continue
        rows.append(row)
        reasons = ", ".join(f"{n}x {r}" for r, n in row["reasons"].items()) or "-"
        print(f"{key:16s} {row['found']:5d} {row['pruned']:6d} {row['frozen']:6d} {row['small']:5d} "
              f"{row['macs_ratio'] or 0:6.3f}  {reasons}")
        if args.verbose:
            for name, reason in row["frozen_groups"]:
                print(f"    {reason:28s} {name}")
        if args.oracle:
            removed, rel = oracle(key, args.passes, args.size, args.seed)
            row["oracle"] = {"removed": removed, "rel_err": rel}
            print(f"    oracle: {removed} channels removed, pruned vs masked original: rel err {rel:.2e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
