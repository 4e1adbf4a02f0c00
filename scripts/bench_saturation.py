#!/usr/bin/env python
"""Static int8 with 8-bit vs 7-bit weights, judged as fake-quant and as onnxruntime runs it.

On x86 CPUs without VNNI, onnxruntime's u8s8 kernels (QLinearConv, QGemm, MatMulInteger) add pairs
of ``uint8 x int8`` products in 16 bits; 8-bit weights can overflow them. With its graph optimizations
off, onnxruntime runs a Q/DQ model as fake-quant (DequantizeLinear then float Conv) and never shows
it; with them on (a user's default session) it runs the integer kernels. This script makes, for
every fixture, ``fold_bn,quantize_int8`` with ``reduce_range=false`` (8-bit weights) and ``true``
(7-bit; what ``auto``, the default, picks on a CPU without VNNI), and reports the digits test
accuracy both ways, plus the latency ratio vs float (batch 1, 1 thread, optimizations on,
interleaved rounds). The first line names the machine and whether it has VNNI.

Usage::

    python scripts/bench_saturation.py [--models resnet,vgg] [--runs 200] [--json out.json]

Prints a Markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first

from fixtures import CALIB, TEST, missing_data, select_models

from onnxcompress import api
from onnxcompress.core import serde
from onnxcompress.quant.cpu import cpu_flags, has_vnni
from onnxcompress.runtime.bench import bench
from onnxcompress.runtime.session import make_session

VARIANTS = {"8-bit weights": "fold_bn,quantize_int8:reduce_range=false",
            "7-bit weights": "fold_bn,quantize_int8:reduce_range=true"}


def accuracy(model, optimize: bool) -> float:
    """Top-1 accuracy (%) on the digits test split, onnxruntime optimizations on or off."""
    data = np.load(TEST)
    sess = make_session(model, optimize=optimize, threads=1)
    name = sess.get_inputs()[0].name
    x, y = data["input"], data["labels"]
    logits = np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return 100 * float((logits.argmax(1) == y).mean())


def measure(name: str, path: Path, runs: int) -> list[dict]:
    float_model = serde.load_model(path)
    rows = [{"model": name, "variant": "float", "fake_quant": accuracy(float_model, False),
             "deployed": accuracy(float_model, True)}]
    models = []
    for variant, spec in VARIANTS.items():
        model, _ = api.optimize(float_model, spec, calib=str(CALIB), validate=False)
        models.append(model)
        rows.append({"model": name, "variant": variant, "fake_quant": accuracy(model, False),
                     "deployed": accuracy(model, True)})
    report = bench([float_model, *models], threads=1, runs=runs, warmup=20, data=str(TEST))
    for row, m in zip(rows, report.models, strict=True):
        row["latency_ratio"] = m.ratio_vs_first
    rows[0]["machine"] = report.machine.line()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet,mobilenetv2,vgg,concat", help="comma-separated fixtures")
    parser.add_argument("--runs", type=int, default=200, help="timed latency rounds")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if missing_data():
        print(f"missing: {', '.join(missing_data())}", file=sys.stderr)
        return 2
    vnni = has_vnni(cpu_flags())
    found, _ = select_models(args.models)
    rows = [r for name, path in found for r in measure(name, path, args.runs)]
    print(f"{rows[0]['machine']}; VNNI: {'unknown' if vnni is None else 'yes' if vnni else 'no'}\n")
    print("| model | variant | accuracy % fake-quant (ORT opt. off) | accuracy % as run (ORT opt. on) | latency vs float |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['fake_quant']:.2f} | {r['deployed']:.2f} | {r['latency_ratio']:.2f}× |")
    if args.json:
        args.json.write_text(json.dumps({"vnni": vnni, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
