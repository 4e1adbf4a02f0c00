"""Level-by-level runs over calibration data without rerunning the prefix (for bias correction).

Sequential bias correction measures the layers of level ``L`` on the model whose levels ``< L``
are already corrected. Running the model from its inputs for every level costs one prefix per
level (quadratic in depth). Here every tensor gets a *depth*: the highest level of the corrected
layers it depends on (0 for none; constants have none). A correction of level ``L`` changes only
tensors of depth ``>= L``, so the tensors of depth ``< L`` that nodes of depth ``>= L`` read (the
*frontier*) are final once levels ``< L`` are corrected. They are kept per batch in ``.npy`` files
in a temporary folder; after level ``L - 1`` is corrected one run from the frontier computes the
nodes of depth ``L - 1`` (the frontier moves on) and level ``L``'s layers (measured): one run per level.
A frontier tensor made by a DequantizeLinear is stored as its quantized input (the next segment
dequantizes it again). Every node runs once per step it belongs to (a corrected layer twice), on the
same batches, so without graph optimizations the measured values are the ones a full run of the
partly corrected model gives, bit for bit (with them, a segment's int8 kernels may round
differently from the float path); memory
is one batch of frontier tensors, whatever the number of samples (disk: the frontier of all samples).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import proto
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.segments import FrontierStore, closure
from onnxcompress.runtime.session import make_session

__all__ = ["StagedBatches", "tensor_depths", "frontier", "stored_name", "segment_model"]

log = logging.getLogger(__name__)


def tensor_depths(graph: gs.Graph, levels: dict[int, int]) -> dict[str, int]:
    """Depth of every tensor computed from the graph inputs (``graph`` sorted); constants are left out.

    Args:
        levels: ``{id(node): level}`` of the nodes a correction changes (the layers' bias adders).
    """
    depth = {t.name: 0 for t in graph.inputs}
    for node in graph.nodes:
        ins = [depth[t.name] for t in node.inputs if t.name in depth]
        if not ins and id(node) not in levels:
            continue  # constant-only: recomputed inside every segment that needs it
        d = levels.get(id(node), max(ins, default=0))
        for out in node.outputs:
            depth[out.name] = d
    return depth


def frontier(graph: gs.Graph, depth: dict[str, int], level: int) -> list[str]:
    """Tensors of depth ``< level`` read by nodes of depth ``>= level`` (sorted names); the output of
    a DequantizeLinear of a computed tensor is replaced by that (quantized) tensor, see :func:`stored_name`."""
    names = set()
    for node in graph.nodes:
        outs = [depth[t.name] for t in node.outputs if t.name in depth]
        if not outs or outs[0] < level:
            continue
        names.update(stored_name(t, depth) for t in node.inputs if t.name in depth and depth[t.name] < level)
    return sorted(names)


def stored_name(tensor: gs.Tensor, depth: dict[str, int]) -> str:
    """The name of the tensor to store for ``tensor``: the input of the DequantizeLinear that makes it
    when that input is computed (of the same depth) and its scale and zero point are not, else its own.
    A quarter of the bytes, and the segment that reads it recomputes the DequantizeLinear, so with
    onnxruntime's graph optimizations its layers start from int8 values and run its int8 kernels."""
    dq = tensor.inputs[0] if tensor.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or not dq.inputs:
        return tensor.name
    source = dq.inputs[0].name
    if depth.get(source) != depth[tensor.name] or any(t.name in depth for t in dq.inputs[1:]):
        return tensor.name
    return source


def segment_model(graph: gs.Graph, inputs: dict[str, np.dtype], outputs: list[str]) -> onnx.ModelProto:
    """The part of ``graph`` that computes ``outputs`` from the tensors ``inputs`` (fed at run
    time) and constants (:func:`onnxcompress.core.proto.segment_model` of the nodes between them).

    Raises:
        RuntimeError: The segment reads a computed tensor that is not among ``inputs``.
    """
    run, leaves = closure(graph, outputs, set(inputs))
    missing = sorted(leaves - set(inputs))
    if missing:
        raise RuntimeError(f"segment reads {missing[0]!r}, which is not on the frontier")
    nodes = [graph.nodes[i] for i in sorted(run)]
    fed = sorted(leaves)
    return proto.segment_model(graph, nodes, {n: inputs[n] for n in fed}, list(dict.fromkeys(outputs)))


class StagedBatches:
    """The calibration batches' feeds, then frontier tensors, per batch in a
    :class:`~onnxcompress.runtime.segments.FrontierStore` (in memory up to ``memory`` bytes, then
    in ``.npy`` files), so memory stays bounded whatever the number of samples.

    Args:
        batches: The calibration batches (read once, their feeds stored).
        progress: Show a bar while running.
        memory: Bytes of tensors kept in memory (the rest on disk, read back through the page
            cache: refinenet's ``int8`` recipe peaked at 318 MB with 256 MB here, 218 MB with 32 MB,
            in the same time).
        optimize: Run the segments with onnxruntime's graph optimizations (a QDQ segment then runs
            int8 kernels, as deployed; its values are no longer bit for bit those of a full run
            without optimizations).
    """

    def __init__(self, batches: Iterable[Batch], progress: bool = False, memory: int = 32 * 2**20,
                 optimize: bool = False):
        self._store = FrontierStore(memory)
        self._names: list[set[str]] = []
        self._sizes: list[int] = []
        self.dtypes: dict[str, np.dtype] = {}
        self.progress, self.optimize = progress, optimize
        for batch in batches:
            self._names.append(set())
            self._sizes.append(len(batch.feeds[next(iter(batch.feeds))]) if batch.feeds else 0)
            self._save(len(self._names) - 1, batch.feeds)

    @property
    def samples(self) -> int:
        """Samples stored."""
        return sum(self._sizes)

    def _save(self, i: int, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            self.dtypes[name] = value.dtype
            self._store.put((i, name), value)
            self._names[i].add(name)

    def run(self, graph: gs.Graph, inputs: list[str], outputs: list[str],
            consume: Callable[[Batch, dict[str, np.ndarray]], None] | None = None, *,
            keep: Collection[str] = (), read: Collection[str] = (), label: str = "segment") -> None:
        """Run the segment ``inputs -> outputs`` of ``graph`` on every stored batch; hand the outputs,
        and the stored tensors named in ``read``, to ``consume``; store the outputs named in ``keep``
        as frontier tensors. Without ``outputs`` nothing runs (``consume`` sees ``read`` only)."""
        stored = set(keep)
        session, feeds = None, []
        if outputs:
            model = segment_model(graph, {n: self.dtypes[n] for n in inputs}, outputs)
            feeds = proto.feed_names(model)
            # no arena: each output is its own allocation, so a stored output pins nothing else and is
            # kept as it is (a copy of every frontier tensor cost more than the arena saves in two or three runs)
            session = make_session(model, arena=False, optimize=self.optimize)
        for i in track(range(len(self._names)), label, enabled=self.progress, unit=self._sizes.__getitem__):
            batch = Batch({n: np.asarray(self._store.get((i, n))) for n in feeds})
            values = dict(zip(outputs, session.run(outputs, batch.feeds))) if session is not None else {}
            values.update({n: np.asarray(self._store.get((i, n))) for n in read})
            if consume is not None:
                consume(batch, values)
            if stored:
                self._save(i, {n: v for n, v in values.items() if n in stored})

    def keep_only(self, names: list[str]) -> None:
        """Delete the stored tensors not in ``names``."""
        wanted = set(names)
        for i, held in enumerate(self._names):
            for name in held - wanted:
                self._store.drop((i, name))
            held &= wanted

    def close(self) -> None:
        """Remove the stored tensors and their folder."""
        self._store.close()

    def __enter__(self) -> StagedBatches:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
