#!/usr/bin/env python
"""The README's ``auto`` table: the searched model beside the best single built-in recipe.

For every fixture model in ``models/`` (missing ones are skipped):

* ``onnxcompress.auto`` with ``--target latency=0.5 --max-drop 1.0`` and with ``--target size=0.1
  --max-drop 1.0`` (calibration ``models/digits_calib.npz``, validation and accuracy on
  ``models/digits_test.npz``; both searches share one evaluation cache, so the second mostly reuses
  the first's evaluations; search time is wall time on this machine);
* the single-technique built-in recipes ``prune``, ``lowrank``, ``int8`` through ``optimize`` with the
  same gate as the search (accuracy drop ≤ 1 point, cosine ≥ 0.95);

then one ``onnxcompress.runtime.bench.bench`` run per model (original, recipes, both winners;
interleaved rounds, paired median ratios, 1 thread, ORT graph optimizations on, batch 1), so the
latency ratios of recipes and winners come from the same rounds. "vs best recipe" is the latency of
the fastest passing recipe divided by the winner's.

Usage::

    python scripts/bench_auto.py [--models resnet,mobilenetv2,vgg,concat] [--jobs 2] [--runs 200]
                                 [--cache-dir DIR] [--budget-minutes 10] [--json out.json]
                                 [--targets latency=0.5,size=0.1] [--also-space SPEC] [--compare-json PATH]

Prints a Markdown table with the machine line above it; ``--json`` also keeps every candidate each
search evaluated (label, spec, gate, accuracy drop, cosine, size, MACs, search-stage latency). Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # this checkout first
from fixtures import CALIB, MODELS, TEST, missing_data, select_models

RECIPES = ("prune", "lowrank", "int8")
TARGETS = ("latency=0.5", "size=0.1")
MAX_DROP = 1.0


def _search(path: Path, target: str, args: argparse.Namespace, cache: Path, space: str | None = None) -> dict:
    import onnxcompress
    from onnxcompress.pipeline.auto_space import parse_space

    start = time.perf_counter()
    result = onnxcompress.auto(path, str(CALIB), str(TEST), target=target, max_drop=MAX_DROP, jobs=args.jobs,
                               cache_dir=cache, budget_minutes=args.budget_minutes, seed=0, space=parse_space(space))
    rec = result.winner or result.best or {}
    variant = f"auto {target}" + (f" (--space {space})" if space else "")
    return {"variant": variant, "spec": rec.get("spec"), "met": result.winner is not None,
            "model_path": rec.get("model_path"), "seconds": time.perf_counter() - start,
            "evaluated": result.evaluated, "cached": result.cached, "accuracy": rec.get("accuracy"),
            "change": None if rec.get("accuracy_drop") is None else -rec["accuracy_drop"],
            "size_ratio": rec.get("size_ratio"), "macs_ratio": rec.get("macs_ratio"),
            "search_latency_ratio": rec.get("latency_ratio"), "gate": "pass" if rec.get("passed") else "fail",
            "candidates": [{k: r.get(k) for k in ("label", "spec", "stage", "passed", "accuracy_drop", "cosine",
                                                  "size_ratio", "macs_ratio", "latency_ratio",
                                                  "latency_ratio_all")}
                           for r in result.records]}


def _recipe(path: Path, recipe: str, out: Path) -> dict:
    import onnxcompress
    from onnxcompress.api import auto_gate
    from onnxcompress.core import serde

    gate, _ = auto_gate(MAX_DROP, None)
    start = time.perf_counter()
    model, report = onnxcompress.optimize(path, recipe=recipe, calib=str(CALIB), data=str(TEST), gate=gate, force=True)
    serde.save_model(model, out)
    o = report.validation.outputs[0]
    return {"variant": f"recipe {recipe}", "spec": recipe, "met": None, "model_path": str(out),
            "seconds": time.perf_counter() - start, "accuracy": 100 * o.cand_accuracy, "change": -o.top1_drop,
            "size_ratio": report.after.file_bytes / report.before.file_bytes,
            "macs_ratio": report.after.macs / report.before.macs, "gate": "pass" if report.passed else "fail"}


def _earlier(name: str, path: Path | None) -> list[dict]:
    """The auto rows of model ``name`` in an earlier run's ``--json`` (e.g. of the previous commit),
    relabelled ``before: …``, to be timed again in this run's bench beside this run's rows."""
    if path is None:
        return []
    found = [r for res in json.loads(path.read_text()) if res["model"] == name for r in res["rows"]]
    keep = ("spec", "met", "model_path", "seconds", "evaluated", "accuracy", "change", "size_ratio", "macs_ratio",
            "gate")
    return [{**{k: r.get(k) for k in keep}, "variant": f"before: {r['variant']}", "met": None}
            for r in found if r["variant"].startswith("auto") and r.get("model_path")]


def _measure(name: str, path: Path, rows: list[dict], runs: int) -> dict:
    from onnxcompress.runtime.bench import bench

    timed = [r for r in rows if r.get("model_path")]
    report = bench([str(path), *[r["model_path"] for r in timed]], threads=1, runs=runs, warmup=20)
    for r, m in zip(timed, report.models[1:], strict=True):
        r["latency_ratio"] = m.ratio_vs_first
    passing = [r["latency_ratio"] for r in timed if r["variant"].startswith("recipe") and r["gate"] == "pass"]
    best = min(passing) if passing else None
    for r in timed:
        if "auto " in r["variant"] and best is not None:
            r["vs_best_recipe"] = best / r["latency_ratio"]
    return {"model": name, "float_median_ms": report.models[0].median_ms, "machine": report.machine.line(),
            "best_recipe_latency": best, "rows": rows}


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _table(results: list[dict]) -> str:
    lines = ["| model | variant | pipeline | latency vs float | vs best recipe | size | MACs | accuracy change "
             "| target met | search s (evaluated) |", "|" + "---|" * 10]
    for res in results:
        for r in res["rows"]:
            met = "" if r["met"] is None else "yes" if r["met"] else "**no**"
            search = f"{r['seconds']:.0f} ({r['evaluated']})" if "evaluated" in r else f"{r['seconds']:.0f}"
            spec = str(r["spec"]).replace("|", "\\|")  # a Markdown cell
            lines.append(f"| {res['model']} | {r['variant']} | `{spec}` | {_fmt(r.get('latency_ratio'), '.3f')} "
                         f"| {_fmt(r.get('vs_best_recipe'), '.2f', '×')} | {_fmt(r['size_ratio'], '.3f', '×')} | "
                         f"{_fmt(r['macs_ratio'], '.3f', '×')} | {_fmt(r['change'], '+.2f')} ({r['gate']}) | {met} "
                         f"| {search} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated fixture names")
    parser.add_argument("--jobs", type=int, default=2, help="parallel evaluations")
    parser.add_argument("--runs", type=int, default=200, help="timed latency rounds")
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="per search")
    parser.add_argument("--cache-dir", type=Path, default=None, help="evaluation cache (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write all numbers here")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated auto targets (default {','.join(TARGETS)})")
    parser.add_argument("--also-space", default=None, metavar="SPEC",
                        help="also run each search with this --space (e.g. 'align=' for the space without aligned "
                             "pruning), timed in the same bench run: a before/after comparison")
    parser.add_argument("--compare-json", type=Path, default=None, metavar="PATH",
                        help="an earlier run's --json (its --cache-dir kept): its auto winners are timed again in "
                             "this run's bench, labelled 'before: …' (before/after in one run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if missing_data():
        print(f"missing {', '.join(missing_data())}: run scripts/make_models.py", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxcompress-bench-auto-") as tmp_name:
        tmp = Path(tmp_name)
        cache = args.cache_dir or tmp / "cache"
        for name, path in select_models(args.models)[0]:
            rows = [_recipe(path, recipe, tmp / f"{name}.{recipe}.onnx") for recipe in RECIPES]
            for target in [t for t in args.targets.split(",") if t]:
                for space in [None] + ([args.also_space] if args.also_space is not None else []):
                    rows.append(_search(path, target, args, cache, space))
                    print(f"  {name}: {rows[-1]['variant']} done ({rows[-1]['seconds']:.0f} s)", file=sys.stderr)
            rows += _earlier(name, args.compare_json)
            results.append(_measure(name, path, rows, args.runs))
    print(f"onnxcompress auto vs the single-technique recipes — calib {CALIB.name}, test {TEST.name} (360 samples); "
          f"gate: accuracy drop ≤ {MAX_DROP:g} point, cosine ≥ 0.95; latency: paired median ratio vs the float "
          f"model, {args.runs} interleaved rounds, batch 1, 1 thread; {args.jobs} parallel evaluations\n")
    if results:
        print(results[0]["machine"] + "\n")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
