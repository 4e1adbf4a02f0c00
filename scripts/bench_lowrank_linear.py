#!/usr/bin/env python
"""When does a rank-r factorization of a Linear layer run faster than the layer in onnxruntime?

Times ``x [rows, k] · W [k, n]`` against ``(x · A [k, r]) · B [r, n]`` (the two MatMuls
``factorize_svd`` writes) on this machine: onnxruntime with its graph optimizations on, one
thread, interleaved rounds, median of paired ratios (``onnxcompress.quant.latency.measure_ratio``,
the timing ``factorize_svd:latency_aware=true`` uses). Default shapes: paraphrase-MiniLM-L3's
projections (384→384 Q/K/V/O, 384→1536 FFN up, 1536→384 FFN down) at 64 tokens. Prints a Markdown
table: time ratio and MAC ratio per rank. Not a test.

    python scripts/bench_lowrank_linear.py [--rows 64] [--shapes 384x384,384x1536,1536x384] [--ranks 48,96,144,192]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcompress.lowrank.linalg import svd_macs
from onnxcompress.passes.factorize_svd import factor_pair
from onnxcompress.quant.cpu import cpu_flags, has_vnni
from onnxcompress.quant.latency import measure_ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="rows of x (batch x tokens)")
    ap.add_argument("--shapes", default="384x384,384x1536,1536x384", help="k x n, comma-separated")
    ap.add_argument("--ranks", default="48,96,144,192,256")
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"1 thread, AVX512-VNNI/AVX-VNNI: {'yes' if has_vnni(cpu_flags()) else 'no'}, {args.rows} rows, "
          f"{args.rounds} interleaved rounds (a shared machine: ratios, not times)\n")
    print("| layer k→n | " + " | ".join(f"rank {r}: time / MACs" for r in ranks) + " |")
    print("|" + " --- |" * (len(ranks) + 1))
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        cells = []
        for r in ranks:
            before, after = svd_macs(k, n, r, args.rows)
            ratio = measure_ratio(factor_pair(args.rows, k, n, r), rounds=args.rounds)
            cells.append(f"{ratio:.2f}× / {after / before:.2f}")
        print(f"| {k}→{n} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
