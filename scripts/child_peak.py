#!/usr/bin/env python3
"""Run a command in a child process and measure the child's own peak resident memory.

``os.wait4``'s ``ru_maxrss`` for a child of this process is not the child's own peak on Linux: fork
copies the parent's memory high-water mark into the child, and exec keeps it in the child's resource
usage. A benchmark that made 512 calibration images in-process (1.3 GB at its peak) therefore read
at least 1.3 GB for every tool run it started after, whatever the tool did. :func:`run` starts the
command from a relay: this file run as a script, a fresh interpreter whose own mark is a few MB; the
relay starts the command, waits for it and hands its ``ru_maxrss`` back in a file.

    from child_peak import run
    rc, seconds, peak_bytes = run([sys.executable, "-m", "onnxcompress", ...], env=..., cwd=...)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run", "run_usage"]


def run(args: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
        stdout=None, stderr=None) -> tuple[int, float, int]:
    """Run ``args`` (``env``, ``cwd``, ``stdout``, ``stderr`` as for :class:`subprocess.Popen`).

    Returns:
        ``(exit code, wall seconds, peak resident bytes of the command's process)``; the wall time
        includes the relay's start-up (a bare interpreter, ~20 ms).
    """
    return run_usage(args, env=env, cwd=cwd, stdout=stdout, stderr=stderr)[:3]


def run_usage(args: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
              stdout=None, stderr=None) -> tuple[int, float, int, float]:
    """:func:`run`, and the command's CPU seconds (user + system, its threads included): on a
    loaded machine the wall time counts the waits for a core too, the CPU time does not."""
    with tempfile.TemporaryDirectory(prefix="child-peak-") as tmp:
        report = Path(tmp) / "rusage"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-I", str(Path(__file__).resolve()), str(report), *args],
                              env=env, cwd=cwd, stdout=stdout, stderr=stderr, check=False)
        seconds = time.perf_counter() - start
        if not report.exists():
            raise RuntimeError(f"the relay failed (exit {proc.returncode})")
        rc, peak_kib, cpu = report.read_text().split()
    return int(rc), seconds, int(peak_kib) * 1024, float(cpu)


def _relay(report: str, args: list[str]) -> int:
    proc = subprocess.Popen(args)
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    Path(report).write_text(f"{rc} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_relay(sys.argv[1], sys.argv[2:]))
