"""Resumable runs of a graph over calibration data: only the part of the graph a step needs.

A multi-step algorithm (layer-by-layer reconstruction, level-by-level bias correction) asks at each
step for a few tensors of a graph, for every batch of the calibration data, and edits some nodes
between steps. Rerunning the whole graph at each step costs ``steps × network``. A
:class:`SegmentRunner` instead

* runs, per step, a **segment**: the nodes between the tensors it already holds and the tensors
  asked for (:func:`onnxcompress.core.proto.segment_model`), so the network is run about once in
  total, whatever the number of steps;
* keeps, per batch, the **frontier**: the tensors of nodes that will not change any more (not
  downstream of a node the caller says it will still edit) and that a later step will read; the
  rest is dropped as soon as the step is done. Above ``cache_bytes`` the frontier goes to ``.npy``
  files in a temporary folder, so resident memory does not grow with the number of samples;
* runs **batches of ``batch_size``** even when the model's batch dim is fixed (:func:`batches`):
  the segment's inputs carry no shape; :meth:`SegmentRunner.batchable` checks on one batch that
  the graph computes the same as on pieces of its own batch size (a graph that hard-codes its
  batch, e.g. in a Reshape, is then run at that size).

The caller says which batches exist (:func:`batches`, the same sequence at every step) and what it
will still edit (``stale``: node indices whose outputs may still change).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxcompress.core import proto
from onnxcompress.core.graph import const_values
from onnxcompress.runtime.batching import Batch, rebatch
from onnxcompress.runtime.data import CalibSource
from onnxcompress.runtime.session import make_session

__all__ = ["CACHE_BYTES", "FrontierStore", "SegmentRunner", "Topology", "batch_count", "batches", "closure",
           "subgraph_names"]

log = logging.getLogger(__name__)

#: Frontier bytes held in memory before it spills to disk.
CACHE_BYTES = 64 * 2**20

_RUN_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
               ort.capi.onnxruntime_pybind11_state.RuntimeException)


def batches(data: CalibSource, batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` samples, also for a model whose batch dim is fixed (its own
    batches are stacked; samples of different shapes never share a batch)."""
    fixed = {s.batch_dim_static() for s in data.specs} - {None}
    if not fixed:
        return data.batches(batch_size)
    return rebatch(data.batches(batch_size), max(batch_size, max(fixed)))


def batch_count(data: CalibSource, batch_size: int) -> int:
    """How many batches :func:`batches` yields (no data read when the source knows its
    :meth:`~onnxcompress.runtime.data.CalibSource.shape_runs`)."""
    fixed = {s.batch_dim_static() for s in data.specs} - {None}
    if not fixed:
        return data.batch_count(batch_size)
    found = data.cut_count(max(batch_size, max(fixed)))
    return sum(1 for _ in batches(data, batch_size)) if found is None else found


def subgraph_names(node: gs.Node) -> set[str]:
    """Names the subgraphs of ``node`` read (from anywhere: inner or outer tensors)."""
    names: set[str] = set()
    for value in node.attrs.values():
        for g in value if isinstance(value, list) else [value]:
            if isinstance(g, gs.Graph):
                for sub in g.nodes:
                    names.update(x.name for x in sub.inputs)
                    names |= subgraph_names(sub)
    return names


class FrontierStore:
    """Arrays per ``(batch, name)``, in memory up to ``limit`` bytes, then in ``.npy`` files."""

    def __init__(self, limit: int = CACHE_BYTES):
        self.limit, self.held = limit, 0
        self.memory: dict[tuple[int, str], np.ndarray] = {}
        self.files: dict[tuple[int, str], Path] = {}
        self.folder: Path | None = None

    def put(self, key: tuple[int, str], value: np.ndarray) -> None:
        self.drop(key)
        if self.held + value.nbytes <= self.limit:
            self.memory[key] = value
            self.held += value.nbytes
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="onnxcompress-frontier-"))
            log.debug("frontier above %d MB: spilling to %s", self.limit >> 20, self.folder)
        path = self.folder / f"{len(self.files)}_{key[0]}.npy"
        while path.exists():
            path = path.with_name("x" + path.name)
        np.save(path, value, allow_pickle=False)
        self.files[key] = path

    def get(self, key: tuple[int, str]) -> np.ndarray:
        if key in self.memory:
            return self.memory[key]
        return np.load(self.files[key], allow_pickle=False)

    def drop(self, key: tuple[int, str]) -> None:
        if key in self.memory:
            self.held -= self.memory.pop(key).nbytes
        path = self.files.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def keys(self) -> list[tuple[int, str]]:
        return list(self.memory) + list(self.files)

    def close(self) -> None:
        self.memory.clear()
        self.files.clear()
        self.held = 0
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class Topology:
    """Who produces and who reads each tensor of a graph (constants and empty names left out)."""

    def __init__(self, graph: gs.Graph):
        self.feeds = {t.name for t in graph.inputs if not isinstance(t, gs.Constant)}
        self.producer: dict[str, int] = {}
        for i, node in enumerate(graph.nodes):
            for out in node.outputs:
                if out.name:
                    self.producer.setdefault(out.name, i)
        known = set(self.producer) | self.feeds
        self.outs = [[t.name for t in node.outputs if t.name] for node in graph.nodes]
        self.reads: list[list[str]] = []
        self.readers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.nodes):
            names = {t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant)}
            names |= subgraph_names(node) & known
            self.reads.append(sorted(names & known))
            for name in self.reads[-1]:
                self.readers.setdefault(name, []).append(i)

    def closure(self, wanted: Iterable[str], known: set[str]) -> tuple[set[int], set[str]]:
        """Nodes to run to compute ``wanted`` from ``known`` tensors and feeds, and the tensors
        (known or fed) they start from."""
        return _closure(wanted, known | self.feeds, self.producer.get, self.reads.__getitem__)

    def downstream(self, nodes: Iterable[int]) -> set[int]:
        """``nodes`` and every node that reads, directly or not, one of their outputs."""
        found: set[int] = set()
        stack = list(nodes)
        while stack:
            i = stack.pop()
            if i in found:
                continue
            found.add(i)
            stack.extend(r for name in self.outs[i] for r in self.readers.get(name, []))
        return found


def closure(graph: gs.Graph, wanted: Iterable[str], known: set[str]) -> tuple[set[int], set[str]]:
    """:meth:`Topology.closure` of ``graph`` for one query: only the segment's nodes have their reads
    worked out (a :class:`Topology` works out every node's; once per query, that was most of a
    level's cost in ``bias_correction`` on a 1000-node detector)."""
    feeds = {t.name for t in graph.inputs if not isinstance(t, gs.Constant)}
    producer = {t.name: i for i, node in reversed(list(enumerate(graph.nodes))) for t in node.outputs if t.name}
    exists = producer.keys() | feeds

    def reads(i: int) -> list[str]:
        node = graph.nodes[i]
        names = {t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant)} | subgraph_names(node)
        return sorted(names & exists)

    return _closure(wanted, known | feeds, producer.get, reads)


def _closure(wanted: Iterable[str], leaf: set[str], producer: Callable[[str], int | None],
             reads: Callable[[int], Iterable[str]]) -> tuple[set[int], set[str]]:
    """Walk back from ``wanted`` to the ``leaf`` tensors: the producing nodes met and the leaves reached."""
    run: set[int] = set()
    leaves: set[str] = set()
    seen: set[str] = set()
    stack = list(wanted)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in leaf:
            leaves.add(name)
            continue
        i = producer(name)
        if i is not None and i not in run:
            run.add(i)
            stack.extend(reads(i))
    return run, leaves


class SegmentRunner:
    """Step by step, the tensors asked for, per batch, from the least of ``graph`` (see the module).

    Use: ``prepare(wanted, later, stale)`` for a step, then ``run(index, batch)`` for every batch
    (the same sequence of batches at every step, indices from 0), then the next step. Nodes may be
    edited between steps (new constants); the graph's structure must stay the same.

    Args:
        graph: The graph (topologically sorted); read at every step, so edits show.
        threads: onnxruntime intra-op threads (0: one per core).
        cache_bytes: Frontier bytes held in memory before spilling to disk.
    """

    def __init__(self, graph: gs.Graph, *, threads: int = 0, cache_bytes: int = CACHE_BYTES):
        self.graph, self.threads = graph, threads
        self.topo = Topology(graph)
        self.store = FrontierStore(cache_bytes)
        self.known: set[str] = set()
        self.keep: set[str] = set()
        self.wanted: list[str] = []
        self.consts: dict[str, np.ndarray] = {}
        self.nodes: list[int] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.session: ort.InferenceSession | None = None
        #: Segments run and nodes run over all steps (one count per segment, not per batch).
        self.segments, self.nodes_run = 0, 0

    def prepare(self, wanted: Sequence[str], later: Iterable[str], stale: set[int]) -> None:
        """Plan a step computing ``wanted``; ``later``: what later steps will ask for; ``stale``:
        indices of nodes whose outputs may still change (edited later, or downstream of an edit)."""
        self.known, self.wanted = self.keep, list(dict.fromkeys(wanted))
        tensors = self.graph.tensors()
        self.consts = {n: const_values(tensors[n]) for n in self.wanted
                       if isinstance(tensors.get(n), gs.Constant)}
        computed = [n for n in self.wanted if n not in self.consts]
        missing = [n for n in computed if n not in self.topo.producer and n not in self.topo.feeds]
        if missing:
            raise KeyError(missing[0])
        run, _ = self.topo.closure(computed, self.known)
        final = {name for i in run if i not in stale for name in self.topo.outs[i]}
        _, leaves = self.topo.closure(later, self.known | final)
        self.keep = leaves & (self.known | final)
        produced = {name for i in run for name in self.topo.outs[i]}
        self.nodes = sorted(run)
        self.inputs = sorted({n for i in run for n in self.topo.reads[i]} - produced)
        self.outputs = [n for n in computed if n in produced] + sorted((self.keep & produced) - set(computed))
        self.session = None
        if self.nodes:
            self.segments += 1
            self.nodes_run += len(self.nodes)

    def run(self, index: int, batch: Batch) -> dict[str, np.ndarray]:
        """The wanted tensors for batch ``index``; updates that batch's frontier."""
        feeds = {n: batch.feeds[n] if n in self.topo.feeds else self.store.get((index, n)) for n in self.inputs}
        values = dict(zip(self.outputs, self._run(feeds))) if self.nodes else {}
        out = {}
        for name in self.wanted:
            if name in values:
                out[name] = values[name]
            elif name in self.consts:
                out[name] = self.consts[name]
            else:
                out[name] = batch.feeds[name] if name in self.topo.feeds else self.store.get((index, name))
        for name in self.keep & set(values):
            self.store.put((index, name), values[name])
        for name in self.known - self.keep:
            self.store.drop((index, name))
        return out

    def close(self) -> None:
        """Drop the frontier (and its files)."""
        self.store.close()
        self.session = None

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.session is None:
            dtypes = {name: feeds[name].dtype for name in self.inputs}
            model = proto.segment_model(self.graph, [self.graph.nodes[i] for i in self.nodes], dtypes, self.outputs)
            self.session = make_session(model, threads=self.threads, arena=False)
        return self.session.run(self.outputs, feeds)

    def batchable(self, wanted: Sequence[str], batch: Batch, native: int) -> bool:
        """Whether the graph computes ``wanted`` on ``batch`` as on its pieces of ``native`` samples
        (a graph may hard-code its batch size, e.g. in a Reshape): concatenated along axis 0, the
        pieces' results must equal the whole batch's."""
        if len(batch) <= native:
            return True
        batch = Batch({k: v[:2 * native] for k, v in batch.feeds.items()})  # two pieces tell
        names = [n for n in dict.fromkeys(wanted) if n in self.topo.producer]
        run, _ = self.topo.closure(names, set())
        if not run:
            return True
        feeds = {n: batch.feeds[n] for n in sorted({x for i in run for x in self.topo.reads[i]} & self.topo.feeds)}
        model = proto.segment_model(self.graph, [self.graph.nodes[i] for i in sorted(run)],
                                    {k: v.dtype for k, v in feeds.items()}, names)
        session = make_session(model, threads=self.threads, arena=False)
        try:
            whole = session.run(names, feeds)
        except _RUN_ERRORS as exc:
            log.debug("graph does not run at batch %d (%s)", len(batch), str(exc).splitlines()[0])
            return False
        parts = [session.run(names, {k: v[s:s + native] for k, v in feeds.items()}) for s in range(0, len(batch), native)]
        return all(_close(a, np.concatenate(p)) for a, p in zip(whole, zip(*parts)))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if not np.issubdtype(a.dtype, np.floating):
        return bool(np.array_equal(a, b))
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return bool(np.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))
