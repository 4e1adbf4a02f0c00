#!/usr/bin/env python
"""Run a pass pipeline over ONNX's backend tests and report PASS / SKIP / FAIL / CRASH.

Suites (``--suite``): ``node`` (onnx's node test cases), ``data`` (the model folders shipped in
the onnx wheel: light, simple, pytorch-converted, pytorch-operator) or ``all``.

Usage::

    python scripts/conformance.py --suite all --jobs 2  # everything, default lossless pipeline
    python scripts/conformance.py --sample 200 --seed 1 --json out.json
    python scripts/conformance.py --suite data --filter light --passes simplify:onnxsim=false -v

Exit code 1 if any case FAILs or CRASHes, else 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first
from onnxcompress.pipeline import conformance, conformance_cases

log = logging.getLogger("conformance")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=conformance_cases.SUITES, default="node", help="node tests, the data "
                        "folders, or all (default: node)")
    parser.add_argument("--sample", type=int, default=None, help="run N cases drawn with --seed (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--filter", default=None, help="only cases whose name contains this substring")
    parser.add_argument("--passes", default=None, help="pipeline spec (default: the registered lossless passes, "
                        "fold_bn,equalize,simplify)")
    parser.add_argument("--jobs", type=int, default=1, help="cases run in parallel (each in its own process)")
    parser.add_argument("--no-isolate", action="store_true", help="run cases in this process (a native crash ends "
                        "the run)")
    parser.add_argument("--json", type=Path, default=None, help="write every result and the summary here")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: per-case lines, -vv: pass logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conformance check; return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnxcompress").setLevel(logging.DEBUG if args.verbose > 1 else logging.ERROR)
    logging.getLogger("onnxcompress.pipeline.conformance").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    spec = args.passes or conformance.default_spec()
    start = time.perf_counter()
    log.info("collecting onnx test cases (suite %s)...", args.suite)
    cases = conformance_cases.select_cases(conformance_cases.collect(args.suite), sample=args.sample, seed=args.seed,
                                     filter=args.filter)
    log.info("running %d cases through %r", len(cases), spec)
    results = conformance.run_cases(cases, spec, isolate=not args.no_isolate, jobs=args.jobs)
    summary = conformance.summarize(results)
    summary.update(suite=args.suite, spec=spec, seconds=round(time.perf_counter() - start, 1))
    print_summary(summary, results)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "results": [r.as_dict() for r in results]}, indent=1))
    return 1 if summary["failed"] or summary["crashed"] else 0


def print_summary(summary: dict, results: list[conformance_cases.CaseResult]) -> None:
    """Print counts, skip reasons, and every failure and crash with its detail."""
    counts = summary["counts"]
    print(f"\nsuite {summary['suite']}, pipeline {summary['spec']!r}: {summary['total']} cases in "
          f"{summary['seconds']} s")
    print(f"  passed  {counts['PASS']}")
    print(f"  skipped {counts['SKIP']}")
    for reason, n in summary["skipped_by_reason"].items():
        print(f"    {n:5d}  {reason}")
    print(f"  failed  {counts['FAIL']}")
    print(f"  crashed {counts['CRASH']}")
    for r in results:
        if r.outcome in (conformance_cases.FAIL, conformance_cases.CRASH):
            print(f"  {r.outcome} {r.name}: {r.reason}: {r.detail}")


if __name__ == "__main__":
    sys.exit(main())
