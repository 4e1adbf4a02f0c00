"""Evaluating ``auto``'s candidates: the jobs, their on-disk cache and the executors that run them.

A :class:`Job` is everything one evaluation needs (the model file, the spec, the data, the seed and
the gate), so it can run anywhere: in this process (``jobs=1``), in a local process pool (``jobs=N``,
the default) or on Ray (``ray="auto"`` or a cluster address; ``pip install 'onnxcompress[distributed]'``).
The evaluation function itself is passed in by the caller (the API's, which runs ``optimize``).

Results are cached in ``cache_dir``, keyed by the sha256 of (model hash, spec, calibration and data
hashes, seed, gate, sample count): ``<key>.onnx`` (the candidate model) and ``<key>.json`` (its
metrics, written last, so a record exists only for a finished evaluation). An interrupted search
run again with the same cache directory evaluates only what is missing. Latency is never cached:
it is measured afresh, serially, in the main process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcompress._version import __version__
from onnxcompress.core.errors import InputError
from onnxcompress.core.fileio import atomic_write
from onnxcompress.runtime.progress import track

__all__ = ["Job", "EvalCache", "Executor", "make_executor", "fingerprint", "job_key", "run_jobs"]

log = logging.getLogger(__name__)

Evaluate = Callable[["Job"], dict]


@dataclass(frozen=True)
class Job:
    """One candidate evaluation: build ``spec`` from ``model`` (a file), validate it on ``data`` with
    ``gate``, write the model to ``output``; the result is a JSON-able dict of metrics."""

    model: str
    spec: str
    calib: Any
    data: Any
    seed: int
    gate: dict = field(default_factory=dict)
    samples: int | None = None
    batch_size: int = 32
    dims: dict = field(default_factory=dict)
    key: str = ""
    output: str = ""


def fingerprint(value: Any) -> str:
    """A stable sha256 of data given as a path (file bytes; a folder: names and bytes of every file),
    a string spec (``random:8``), arrays or anything picklable; ``none`` for None."""
    if value is None:
        return "none"
    h = hashlib.sha256()
    if isinstance(value, (str, os.PathLike)) and Path(value).exists():
        path = Path(value)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    elif isinstance(value, (str, os.PathLike)):
        h.update(("spec:" + str(value)).encode())
    else:
        try:
            h.update(pickle.dumps(value, protocol=4))
        except Exception:
            raise InputError(f"auto: cannot fingerprint data of type {type(value).__name__} for the cache; "
                             "give a path") from None
    return h.hexdigest()


def job_key(model_sha: str, spec: str, calib_sha: str, data_sha: str, seed: int, gate: dict,
            samples: int | None, dims: dict | None = None) -> str:
    """The cache key of one evaluation."""
    payload = {"model": model_sha, "spec": spec, "calib": calib_sha, "data": data_sha, "seed": seed,
               "gate": {k: gate[k] for k in sorted(gate)}, "samples": samples, "dims": dims or {},
               "version": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


class EvalCache:
    """Finished evaluations on disk: ``<key>.json`` (metrics) and ``<key>.onnx`` (the model)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{folder}: cannot create the cache folder ({exc.strerror or exc})") from None

    def model_path(self, key: str) -> Path:
        """Where the candidate model of ``key`` is written."""
        return self.folder / f"{key}.onnx"

    def get(self, key: str) -> dict | None:
        """The cached record of ``key`` (None when missing, unreadable or without its model)."""
        record = self.read(key)
        if record is None or (record.get("error") is None and not self.model_path(key).is_file()):
            return None
        return record

    def read(self, name: str) -> dict | None:
        """The JSON object stored as ``name`` (None when missing or unreadable)."""
        try:
            record = json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def put(self, key: str, record: dict) -> None:
        """Store ``record`` as ``key`` (atomically; for an evaluation, its model file is already there)."""
        text = json.dumps(record, sort_keys=True, default=str)
        atomic_write(self.folder / f"{key}.json", lambda fh: fh.write(text.encode("utf-8")))


class Executor:
    """Runs jobs and yields ``(index, result)`` as they finish. This base class runs them here, one by one."""

    name = "inline"

    def map(self, fn: Evaluate, jobs: Sequence[Job]) -> Iterator[tuple[int, dict]]:
        """Each job's index and result, in the order they finish."""
        for i, job in enumerate(jobs):
            yield i, fn(job)

    def close(self) -> None:
        """Release workers."""


class _PoolExecutor(Executor):
    """A local process pool (``spawn``: onnxruntime sessions and forked threads do not mix)."""

    name = "pool"

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, fn: Evaluate, jobs: Sequence[Job]) -> Iterator[tuple[int, dict]]:
        from concurrent.futures import as_completed

        futures = {self.pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class _RayExecutor(Executor):
    """Ray tasks (one CPU each) on a running cluster (``address``) or a local instance (``auto``: the
    one already initialised in this process, else a new local one)."""

    name = "ray"

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise InputError("--ray needs Ray: pip install 'onnxcompress[distributed]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == "auto" else address, include_dashboard=False,
                         log_to_driver=False, ignore_reinit_error=True)
            except Exception as exc:  # connection refused, bad address, cluster version mismatch
                raise InputError(f"--ray {address}: cannot start or reach Ray ({str(exc).splitlines()[0]})") from None

    def map(self, fn: Evaluate, jobs: Sequence[Job]) -> Iterator[tuple[int, dict]]:
        remote = self.ray.remote(num_cpus=1)(fn)
        pending = {remote.remote(job): i for i, job in enumerate(jobs)}
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), self.ray.get(ref)


def make_executor(jobs: int, ray: str | None) -> Executor:
    """Ray when ``ray`` is given, else a pool of ``jobs`` processes (0: one per core), else inline (1).

    Raises:
        InputError: ``jobs`` < 0, or Ray asked for but not installed.
    """
    if ray:
        return _RayExecutor(ray)
    if jobs < 0:
        raise InputError(f"--jobs must be >= 0, got {jobs}")
    workers = jobs or max(1, os.cpu_count() or 1)
    return Executor() if workers == 1 else _PoolExecutor(workers)


def run_jobs(fn: Evaluate, jobs: Sequence[Job], cache: EvalCache, executor: Executor, *,
             progress: bool = False, label: str = "evaluating") -> tuple[list[dict], int]:
    """Results of ``jobs`` in job order (cached ones read, the others run by ``executor`` and cached
    as each finishes) and how many were run."""
    results: list[dict | None] = [cache.get(job.key) for job in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        stream = executor.map(fn, [jobs[i] for i in todo])
        for j, record in track(stream, label, total=len(todo), enabled=progress):
            results[todo[j]] = record
            cache.put(jobs[todo[j]].key, record)
    return [r for r in results if r is not None], len(todo)

