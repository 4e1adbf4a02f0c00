"""Conformance cases run in forked child processes, so that a native crash (segfault, abort) or a
hang in a dependency ends only its own case, reported as a ``CRASH``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from onnxcompress.pipeline.conformance_cases import CRASH, CaseResult

__all__ = ["run_isolated"]



class _Worker:
    """A forked child that runs the cases it is sent (by index) until told to stop."""

    def __init__(self, ctx: Any, cases: Sequence[Any], run: Callable[[Any], CaseResult]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child, cases, run), daemon=True)
        self.proc.start()
        child.close()
        self.index: int | None = None
        self.started = 0.0

    def send(self, index: int) -> None:
        self.index, self.started = index, time.perf_counter()
        self.conn.send(index)

    def receive(self) -> CaseResult | None:
        """The running case's result, or ``None`` if the child died."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def death(self, name: str, timed_out: bool) -> CaseResult:
        """Kill the child and describe how the case it was running ended."""
        import signal

        self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        elapsed = round(time.perf_counter() - self.started, 4)
        if timed_out:
            return CaseResult(name, CRASH, "timeout", f"no result after {elapsed:.0f} s", elapsed)
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return CaseResult(name, CRASH, "native crash", f"process {how}", elapsed)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()


def _worker_loop(conn: Any, cases: Sequence[Any], run: Callable[[Any], CaseResult]) -> None:
    while (index := conn.recv()) is not None:
        conn.send(run(cases[index]))


def run_isolated(cases: Sequence[Any], run: Callable[[Any], CaseResult], jobs: int, timeout: float,
                 done: Callable[[CaseResult, int], CaseResult]) -> list[CaseResult]:
    """``run(case)`` for every case in up to ``jobs`` forked children, results in case order.

    A child that dies or takes longer than ``timeout`` seconds on a case is killed, replaced, and its
    case reported as a ``CRASH``. ``done(result, number done)`` sees each result as it arrives and
    returns the result to keep.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    results: dict[int, CaseResult] = {}
    todo = list(range(len(cases)))[::-1]
    workers = [_Worker(ctx, cases, run) for _ in range(min(jobs, len(cases)))]
    try:
        for worker in workers:
            if todo:
                worker.send(todo.pop())
        while len(results) < len(cases):
            busy = [w for w in workers if w.index is not None]
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0))
            for i, worker in enumerate(workers):
                index = worker.index
                if index is None:
                    continue
                late = time.perf_counter() - worker.started > timeout
                if not ({worker.conn, worker.proc.sentinel} & ready or late):
                    continue
                result = worker.receive() if worker.conn.poll() else None
                if result is None:
                    result = worker.death(cases[index].name, late)
                    worker = workers[i] = _Worker(ctx, cases, run)
                worker.index = None
                results[index] = done(result, len(results) + 1)
                if todo:
                    worker.send(todo.pop())
    finally:
        for worker in workers:
            worker.stop()
    return [results[i] for i in range(len(cases))]
