#!/usr/bin/env python
"""Where a small model's run time goes, per node, with onnxruntime's profiler.

For each model: one session as ``bench`` makes it (CPU, graph optimizations on, ``--threads``
intra-op threads), ``--warmup`` untimed runs, then ``--runs`` profiled runs on the first sample of
``--data`` (batch 1). Prints the median ``model_run`` time, the sum of the per-node median kernel
times (the rest is the session's own overhead plus the profiler's), and per op type of the graph
onnxruntime actually runs (after its fusions and layout changes: ``ReorderInput``/``ReorderOutput``
of the NCHWc layout, ``QuantizeLinear`` left unfused, ``FusedConv`` = a conv outside the blocked
layout) the node count and the summed median kernel time; ``--nodes`` lists every node.

The profiler adds a few µs per node, so compare models with each other here and take speed ratios
from ``onnxcompress bench``. Also prints the per-node cost of onnxruntime's executor itself,
measured without the profiler on a chain of 41 against 1 ``Relu`` on a ``[1, 16, 16, 16]`` tensor.

Usage::

    python scripts/profile_nodes.py MODEL [MODEL ...] [--data models/digits_test.npz] [--runs 300]
                                    [--threads 1] [--nodes]

Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent


def _session(model: str | bytes, threads: int, profile_dir: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "profile")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def profile(path: str, x: np.ndarray, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(path, args.threads, tmp)
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(args.warmup + args.runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][args.warmup:]
    nodes: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            nodes[(e["args"]["op_name"], e["name"][: -len("_kernel_time")])].append(e["dur"])
    medians = {key: float(np.median(d[args.warmup:])) for key, d in nodes.items()}
    by_op: dict[str, list[float]] = defaultdict(list)
    for (op, _), t in medians.items():
        by_op[op].append(t)
    print(f"{Path(path).name}: model_run median {np.median(runs):.1f} µs, sum of node medians "
          f"{sum(medians.values()):.1f} µs, {len(medians)} nodes")
    for op, ts in sorted(by_op.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {op:26s} {len(ts):3d} nodes {sum(ts):8.1f} µs")
    if args.nodes:
        for (op, name), t in medians.items():
            print(f"    {t:6.1f} µs  {op:18s} {name}")


def executor_overhead(threads: int) -> float:
    """µs per node of onnxruntime's executor: 41 vs 1 Relu on [1, 16, 16, 16], no profiler."""
    shape = [1, 16, 16, 16]

    def chain(n: int) -> bytes:
        nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
        graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, shape)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    def median_us(model: bytes) -> float:
        sess, x = _session(model, threads), np.random.default_rng(0).random(shape, np.float32)
        for _ in range(50):
            sess.run(None, {"t0": x})
        times = []
        for _ in range(1000):
            start = time.perf_counter()
            sess.run(None, {"t0": x})
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e6

    return (median_us(chain(41)) - median_us(chain(1))) / 40


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default=str(ROOT / "models" / "digits_test.npz"))
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nodes", action="store_true", help="list every node")
    args = parser.parse_args(argv)
    data = np.load(args.data)
    for path in args.models:
        name = onnx.load(path, load_external_data=False).graph.input[0].name
        profile(path, data[name][:1].astype(np.float32), args)
    print(f"onnxruntime executor: {executor_overhead(args.threads):.2f} µs per node (no profiler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
