#!/usr/bin/env python
"""Does merging parallel Convs (same input, same attributes) into one Conv + Split pay? (issue 14 check)

An experiment, not a pass: on each fixture model it finds Convs that read the same tensor with
identical attributes and constant, unshared weights, merges each such group into one Conv with
concatenated output channels (and biases) followed by a Split along the channel axis, checks the
rewrite is exact (onnxruntime, graph optimizations off) and measures latency with
``onnxcompress.runtime.bench.bench`` (batch 1, ORT graph optimizations on), paired with the unmerged
model in the same run. Two starting points per fixture:

* ``lossless``: the default lossless recipe (``fold_bn,simplify``);
* ``auto``: the concat ``auto --target latency=0.5`` winner of README (``prune_channels:...,fold_bn,
  simplify,quantize_int8``) with the merge applied before ``quantize_int8``.

Usage::

    python scripts/bench_merge_parallel_convs.py [--models concat] [--runs 600] [--repeat 3] [--pad-kernels]

``--pad-kernels`` also merges 'same'-padded convs of different kernel sizes (1x1 zero-padded to 3x3):
fewer nodes, more MACs, exact only up to float rounding.

Prints the number of merged groups, the max |difference| and the ratio (merged / unmerged). Not a test.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first

from fixtures import CALIB, TEST, select_models

from onnxcompress.core import serde
from onnxcompress.core.pass_api import PassContext
from onnxcompress.pipeline.manager import PassManager, parse_spec
from onnxcompress.runtime.bench import bench, machine_info
from onnxcompress.runtime.data import open_source

PRUNE = "prune_channels:macs=0.25:max_group_ratio=0.6:sens_samples=32,fold_bn,simplify"


def _same_padded(n: onnx.NodeProto) -> bool:
    """Odd square-or-not kernel with 'same' padding k//2 on every side."""
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    ks = list(a.get("kernel_shape", []))
    return bool(ks) and all(k % 2 for k in ks) and list(a.get("pads", [0] * 2 * len(ks))) == [k // 2 for k in ks] * 2


def _groups(model: onnx.ModelProto, pad: bool = False) -> list[list[onnx.NodeProto]]:
    """Conv groups with one input, equal attributes and constant weights used by no other node.

    With ``pad``, kernel sizes may differ when every conv has 'same' padding (smaller kernels are
    zero-padded to the largest)."""
    inits = {i.name for i in model.graph.initializer}
    uses = collections.Counter(i for n in model.graph.node for i in n.input)
    by_key: dict[tuple, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in model.graph.node:
        params = list(n.input[1:])
        if n.op_type == "Conv" and params and all(p in inits and uses[p] == 1 for p in params):
            free = ("kernel_shape", "pads") if pad and _same_padded(n) else ()
            attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute
                                 if a.name not in free))
            by_key[(n.input[0], attrs)].append(n)
    return [g for g in by_key.values() if len(g) > 1]


def _pad_to(w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``w`` zero-padded (centred) to spatial ``shape``."""
    extra = [((t - s) // 2, (t - s) // 2) for s, t in zip(w.shape[2:], shape)]
    return np.pad(w, [(0, 0), (0, 0), *extra])


def merge(model: onnx.ModelProto, pad: bool = False) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every group of :func:`_groups` merged into Conv + Split."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    groups = _groups(out, pad)
    for k, convs in enumerate(groups):
        ws = [numpy_helper.to_array(inits[n.input[1]]) for n in convs]
        big = max(range(len(ws)), key=lambda i: ws[i].size // ws[i].shape[0])
        ws = [_pad_to(w, ws[big].shape[2:]) for w in ws]
        bs = [numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 else np.zeros(w.shape[0], w.dtype)
              for n, w in zip(convs, ws)]
        names = [f"merged{k}_{s}" for s in ("W", "B", "split", "Y")]
        g.initializer.extend([numpy_helper.from_array(np.concatenate(ws), names[0]),
                              numpy_helper.from_array(np.concatenate(bs), names[1]),
                              numpy_helper.from_array(np.array([w.shape[0] for w in ws], np.int64), names[2])])
        conv = helper.make_node("Conv", [convs[0].input[0], names[0], names[1]], [names[3]], name=f"merged{k}")
        conv.attribute.extend(convs[big].attribute)
        split = helper.make_node("Split", [names[3], names[2]], [n.output[0] for n in convs], name=f"merged{k}_split",
                                 axis=1)
        at = list(g.node).index(convs[0])
        for n in convs:
            g.node.remove(n)
            for p in n.input[1:]:
                g.initializer.remove(inits[p])
        g.node.insert(at, split)
        g.node.insert(at, conv)
    onnx.checker.check_model(out)
    return out, len(groups)


def max_diff(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    """Max |a - b| over the outputs on the first 64 test samples (ORT optimizations off)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feed = {a.graph.input[0].name: np.load(TEST)["input"][:64].astype(np.float32)}
    ra = ort.InferenceSession(a.SerializeToString(), opts).run(None, feed)
    rb = ort.InferenceSession(b.SerializeToString(), opts).run(None, feed)
    return max(float(np.abs(p - q).max()) for p, q in zip(ra, rb))


def run(spec: str, model: onnx.ModelProto) -> onnx.ModelProto:
    out, _ = PassManager(parse_spec(spec), PassContext(calib=open_source(CALIB, model))).run(model)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="concat")
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pad-kernels", action="store_true",
                        help="also merge 'same'-padded convs of different kernel sizes (smaller kernels zero-padded)")
    args = parser.parse_args()
    found, _ = select_models(args.models)
    print(machine_info("CPUExecutionProvider", 1, True).line())
    print("| model | start | merged groups | max abs diff (float) | latency merged / unmerged (median, range) |")
    print("| --- | --- | --- | --- | --- |")
    for name, path in found:
        original = serde.load_model(path)
        lossless = run("fold_bn,simplify", original)
        merged, count = merge(lossless, args.pad_kernels)
        pruned = run(PRUNE, original)
        pairs = {"lossless": (lossless, merged),
                 "auto (prune+int8)": (run("quantize_int8", pruned), run("quantize_int8", merge(pruned, args.pad_kernels)[0]))}
        for label, (base, cand) in pairs.items():
            diff = f"{max_diff(base, cand):.3g}" if label == "lossless" else "–"
            ratios = [bench([base, cand], threads=1, runs=args.runs, warmup=20, data=str(TEST), seed=r)
                      .models[1].ratio_vs_first for r in range(args.repeat)]
            print(f"| {name} | {label} | {count} | {diff} | {statistics.median(ratios):.3f} "
                  f"({min(ratios):.3f}–{max(ratios):.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
