#!/usr/bin/env python3
"""Structured-pruning coverage: groups found / pruned / frozen (with reasons) per model.

Models: onnx's light model zoo (the ``light_*.onnx`` files in the onnx wheel; their large weights
are ``ConstantOfShape`` fills, materialized here as seeded He-normal initializers: structure
only) and the real models of ``scripts/real_model_files.py`` that are installed. Each is run
through :func:`onnxcompress.optimize` with ``--passes`` (default
``fold_bn,simplify,prune_channels:ratio=0.3``), seeded random calibration data of the model's
input shape (free dims = ``--size``), no validation. Prints one line per model and, with
``-v``, every frozen group with the nodes that froze it.

Usage::

    python scripts/prune_coverage.py                           # the zoo + every installed real model
    python scripts/prune_coverage.py --models shufflenet,nudenet --size 320 -v
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
from onnxcompress.pruning.types import FREEZE_REASONS

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join((*ZOO, *CATALOG)), help="comma-separated: " + ", ".join((*ZOO, *CATALOG)))
    p.add_argument("--passes", default=SPEC)
    p.add_argument("--size", type=int, default=320, help="free spatial dims of real models (default 320)")
    p.add_argument("--calib", type=int, default=4, help="random calibration samples (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="list the frozen groups")
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
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
