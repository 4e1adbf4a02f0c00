"""A harness for scripted replays of a user session: run the CLI step by step, show what happened,
decide a verdict per point, print a summary (used by ``scripts/replay_issue16.py``).

Each :class:`Point` quotes what a user hit and holds a check: a function of the :class:`Replay`
that runs ``python -m onnxcompress ...`` commands in a work folder (each printed as
``$ onnxcompress ...`` with its exit code, time and key output lines) and returns an
:class:`Outcome`: ``FIXED`` or ``NOT FIXED`` (with what was observed), or ``SKIPPED`` when a model
it needs is not installed. Files several points share (a quantized model, a report) are built
once by *assets*, on first use. A check that cannot run (an option missing in this build, an
unexpected JSON layout) is reported as ``NOT FIXED`` with the reason, never as a crash.

Commands run in subprocesses with ``--code`` (default: this checkout) first on ``PYTHONPATH``, or
in-process through :func:`onnxcompress.cli.main` (``inprocess=True``: much faster for tests).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from importlib import util as import_util
from pathlib import Path
from typing import Any

__all__ = ["FIXED", "NOT_FIXED", "ROOT", "SKIPPED", "Missing", "Outcome", "Point", "RealModel", "Replay", "Run",
           "find_real", "judge", "not_yet", "run_points", "summary_table"]

ROOT = Path(__file__).resolve().parent.parent
FIXED, NOT_FIXED, SKIPPED = "FIXED", "NOT FIXED", "SKIPPED"
#: Seconds a command may take before it is killed (and its point judged on that).
TIMEOUT = 1800


class Missing(Exception):
    """A point cannot run here (a model or a package is not installed): the message says how to get it."""


@dataclass(frozen=True)
class RealModel:
    """A model file inside an installed pip package (found with :func:`importlib.util.find_spec`,
    without importing the package)."""

    key: str
    module: str
    file: str
    pip: str


def find_real(spec: RealModel) -> Path | None:
    """Path of ``spec``'s file, or None when the package (or the file) is not installed."""
    try:
        found = import_util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    locations = list(found.submodule_search_locations or []) if found else []
    path = Path(locations[0]) / spec.file if locations else None
    return path if path is not None and path.is_file() else None


@dataclass
class Run:
    """One CLI command and what it did."""

    args: list[str]
    code: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        """stdout and stderr together."""
        return self.out + ("\n" if self.out and self.err else "") + self.err

    @property
    def err_lines(self) -> list[str]:
        """The non-empty stderr lines."""
        return [line for line in self.err.splitlines() if line.strip()]

    def lines(self, pattern: str) -> list[str]:
        """Lines of stdout and stderr matching the regular expression ``pattern``."""
        rx = re.compile(pattern)
        return [line.rstrip() for line in self.text.splitlines() if rx.search(line)]

    @property
    def missing_option(self) -> str | None:
        """The click error when the command or an option does not exist in this build."""
        hits = [line for line in self.err_lines if re.search(r"No such (option|command)|unexpected extra argument",
                                                             line, re.I)]
        return hits[0].strip() if hits else None

    @property
    def one_line_error(self) -> bool:
        """Failed with one line on stderr besides log records (``WARNING ...``): an ``error:`` line
        that is not an internal error, and no traceback."""
        lines = [line for line in self.err_lines if not line.startswith(("WARNING ", "INFO ", "DEBUG "))]
        return len(lines) == 1 and lines[0].startswith("error:") and "internal error" not in lines[0] \
            and "Traceback" not in self.err


@dataclass
class Outcome:
    """A point's verdict and what was observed (one line)."""

    verdict: str
    observed: str
    subject: str = ""


def judge(ok: bool, observed: str) -> Outcome:
    """``FIXED`` when ``ok``, else ``NOT FIXED``."""
    return Outcome(FIXED if ok else NOT_FIXED, observed)


def not_yet(run: Run, what: str) -> Outcome | None:
    """``NOT FIXED`` ("not fixed yet") when ``run`` failed because ``what`` (an option or a command)
    does not exist in this build; None otherwise."""
    missing = run.missing_option
    return Outcome(NOT_FIXED, f"not fixed yet: {what} does not exist in this build ({missing})") if missing else None


@dataclass(frozen=True)
class Point:
    """One point of the session: the issue's words and the check that decides whether it is fixed.

    Attributes:
        key: Short name (``--only`` takes it, or the group's name).
        group: The issue bullet it belongs to.
        quote: One line quoted from the issue.
        check: Runs the commands and returns the :class:`Outcome`.
        real_only: Needs a real model (no synthetic fixture can show it): SKIPPED without it.
    """

    key: str
    group: str
    quote: str
    check: Callable[[Replay], Outcome]
    real_only: bool = False


def _display(arg: str) -> str:
    return shlex.quote(arg) if arg else "''"


class Replay:
    """Runs the steps in ``work``: the CLI, shared assets, printing.

    Args:
        work: Folder for every file the replay writes (it exists).
        code: The onnxcompress checkout the commands run (first on ``PYTHONPATH``).
        synthetic: Use the synthetic fixtures even where the real models are installed.
        inprocess: Run the CLI in this process (fast; the code is whatever ``onnxcompress`` imports).
        write: Where the text goes (default: print to stdout).
    """

    def __init__(self, work: Path, *, code: Path = ROOT, synthetic: bool = False, inprocess: bool = False,
                 write: Callable[[str], None] | None = None):
        self.work, self.code, self.synthetic, self.inprocess = Path(work), Path(code), synthetic, inprocess
        self.write = write or (lambda text: print(text, flush=True))
        paths = [str(self.code), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "COLUMNS": "160"}
        self._assets: dict[str, Any] = {}
        self.builders: dict[str, Callable[[Replay], Any]] = {}

    def say(self, text: str, indent: int = 2) -> None:
        """Print ``text`` indented."""
        for line in str(text).splitlines() or [""]:
            self.write(" " * indent + line)

    def cli(self, *args: Any, show: Sequence[str] = ()) -> Run:
        """Run ``onnxcompress ARGS`` in the work folder; print the command, its exit code and time,
        its error/warning lines and the output lines matching any pattern of ``show``."""
        argv = [str(a) for a in args]
        self.say("$ onnxcompress " + " ".join(_display(a) for a in argv))
        start = time.perf_counter()
        code, out, err = self._inprocess(argv) if self.inprocess else self._subprocess(argv)
        run = Run(argv, code, out, err, time.perf_counter() - start)
        self.say(f"exit {run.code} ({run.seconds:.1f} s)", 4)
        shown = [line for line in run.err_lines if line.startswith(("error", "WARNING", "Traceback"))][:3]
        for pattern in show:
            shown += [line for line in run.lines(pattern) if line not in shown]
        for line in shown[:12]:
            self.say("| " + line.strip()[:200], 4)
        return run

    def python(self, code: str, *args: Any, label: str) -> Run:
        """Run a Python snippet (``python -c``) in a subprocess in the work folder, printed as ``label``."""
        argv = [str(a) for a in args]
        self.say(f"$ python -c <{label}> " + " ".join(_display(a) for a in argv))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=self.work, env=self.env, capture_output=True,
                              text=True, check=False, timeout=TIMEOUT)
        run = Run(argv, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)
        self.say(f"exit {run.code} ({run.seconds:.1f} s)" + (f": {run.err_lines[-1]}" if run.code else ""), 4)
        return run

    def _subprocess(self, argv: list[str]) -> tuple[int, str, str]:
        try:
            proc = subprocess.run([sys.executable, "-m", "onnxcompress", *argv], cwd=self.work, env=self.env,
                                  capture_output=True, text=True, check=False, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            return -1, "", f"error: replay: no answer after {TIMEOUT} s (killed)"
        return proc.returncode, proc.stdout, proc.stderr

    def _inprocess(self, argv: list[str]) -> tuple[int, str, str]:
        from onnxcompress.cli import main

        out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
        os.chdir(self.work)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:  # pragma: no cover - click paths that exit directly
                    code = int(exc.code or 0)
        finally:
            os.chdir(here)
        return code, out.getvalue(), err.getvalue()

    def asset(self, name: str) -> Any:
        """The shared file(s) ``name`` (built by ``self.builders[name]`` on first use, then reused)."""
        if name not in self._assets:
            self.say(f"[building {name}]")
            self._assets[name] = self.builders[name](self)
        else:
            self.say(f"[reusing {name}]")
        return self._assets[name]

    def path(self, name: str) -> Path:
        """``name`` inside the work folder."""
        return self.work / name

    def read_json(self, name: str) -> Any:
        """The JSON file ``name`` of the work folder.

        Raises:
            FileNotFoundError: No such file (the command that should have written it failed).
        """
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{name} was not written")
        return json.loads(path.read_text())


def _run_one(replay: Replay, point: Point, index: int) -> Outcome:
    replay.write(f"\n[{index}] {point.key}  ({point.group})")
    replay.say(f'issue: "{point.quote}"')
    try:
        outcome = point.check(replay)
    except Missing as exc:
        outcome = Outcome(SKIPPED, f"skipped: {exc}")
    except Exception as exc:  # a check that cannot run on this build is a finding, not a crash
        replay.say("".join(traceback.format_exception_only(type(exc), exc)).strip(), 4)
        outcome = Outcome(NOT_FIXED, f"check could not run: {type(exc).__name__}: {exc}")
    replay.say(f"observed: {outcome.observed}")
    replay.say(f"=> {outcome.verdict}" + (f"  [{outcome.subject}]" if outcome.subject else ""))
    return outcome


def run_points(replay: Replay, points: Iterable[Point],
               groups: dict[str, str] | None = None) -> list[tuple[Point, Outcome]]:
    """Run ``points`` in order, each group under its title (``groups``: name -> title); every point
    gets an outcome."""
    results: list[tuple[Point, Outcome]] = []
    for i, point in enumerate(points, 1):
        if groups and (not results or results[-1][0].group != point.group):
            replay.write(f"\n=== {groups.get(point.group, point.group)} ===")
        results.append((point, _run_one(replay, point, i)))
    return results


def summary_table(results: list[tuple[Point, Outcome]], width: int = 100) -> str:
    """The summary: one row per point (key, group, subject, verdict, what was observed)."""
    rows = [("#", "point", "group", "model", "verdict", "observed")]
    for i, (p, o) in enumerate(results, 1):
        text = o.observed if len(o.observed) <= width else o.observed[:width - 1] + "…"
        rows.append((str(i), p.key, p.group, o.subject or "-", o.verdict, text))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5] for r in rows]
    counts = {v: sum(o.verdict == v for _, o in results) for v in (FIXED, NOT_FIXED, SKIPPED)}
    lines.append(f"{counts[FIXED]} fixed, {counts[NOT_FIXED]} not fixed, {counts[SKIPPED]} skipped")
    return "\n".join(lines)
