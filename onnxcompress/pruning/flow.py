"""Channel flow through one node, from one of its inputs: the op table read node by node.

:func:`.dependency.analyze` links the channels of every node at once. A walker that follows one
producer's channels forward (the ``equalize`` pass) asks instead, at each node it reaches, where
the channels of the tensor it arrived on go: :func:`channel_flow`. Both read the one op table,
:data:`.handlers.HANDLERS`, so how channel indices flow through an op (pass-through, concat
offsets, split ranges, flatten blocks...) and when they cannot be followed is written once,
there; an op without a handler is frozen with :data:`.types.R_NO_HANDLER` for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.pruning.handlers import handle
from onnxcompress.pruning.types import R_NO_HANDLER, R_RESHAPE, GraphInfo

__all__ = ["Flow", "channel_flow"]


@dataclass
class Flow:
    """Where the channels of one input of a node go.

    Attributes:
        outputs: ``(output, source)`` for each output that carries some of them: channel ``j``
            of the output is channel ``source[j]`` of the input (``-1``: not one of its channels).
            Channels merged into blocks (a Reshape ``[N, k*m, ...] -> [N, k, m, ...]``) or linked
            past the node (a channel shuffle) cannot be followed one by one: ``reshape_mixes_channels``.
        frozen: The table's reason when it freezes the input or an output (``outputs`` is then
            empty), else ``None``.
    """

    outputs: list[tuple[gs.Tensor, np.ndarray]]
    frozen: str | None = None


def channel_flow(node: gs.Node, tensor: gs.Tensor, info: GraphInfo) -> Flow:
    """How the channels of ``tensor`` (an input of ``node``) reach ``node``'s outputs.

    Args:
        node: The node.
        tensor: One of its inputs, a channel tensor.
        info: Graph facts (:func:`.dependency.graph_info`); ``info.last_axis`` for channels on
            the last axis.
    """
    spec = handle(node, info)
    names = {tensor.name, *(t.name for t in node.outputs)}
    frozen = next((reason for name, reason in spec.freezes if name in names), None)
    if frozen is None and tensor.name not in spec.touched:
        frozen = R_NO_HANDLER
    if frozen is None and not _one_to_one(spec.links, tensor.name, {t.name for t in node.outputs}):
        frozen = R_RESHAPE  # channels merged into blocks, or linked past this node (a channel shuffle)
    if frozen is not None:
        return Flow([], frozen)
    outputs = []
    for out in node.outputs:
        source = None
        for a, ia, b, ib in spec.links:
            pairs = [(ia, ib)] if (a, b) == (tensor.name, out.name) else []
            pairs += [(ib, ia)] if (b, a) == (tensor.name, out.name) else []
            for src, dst in pairs:
                if source is None:
                    source = np.full(info.channels(out), -1, dtype=np.int64)
                source[dst] = src
        if source is not None:
            outputs.append((out, source))
    return Flow(outputs)


def _one_to_one(links, name: str, outputs: set[str]) -> bool:
    """Whether every link of ``name`` goes to one of ``outputs``, each output channel from one channel."""
    for a, ia, b, ib in links:
        if name not in (a, b):
            continue
        other, dst = (b, ib) if a == name else (a, ia)
        if other not in outputs or len(np.unique(dst)) < len(dst):
            return False
    return True
