"""Per-channel activation statistics: the absolute maximum of every channel (last axis) of a tensor
over calibration data, and the outlier ratio it gives (what tells whether smoothing will help).

``max|x_j|`` is taken over every sample and every position but the last axis (a transformer's
hidden dimension, a Gemm input's features). The *outlier ratio* of a tensor is
``max_j max|x_j| / median_j max|x_j|``: about 1-3 for evenly spread activations, 10-100 and more
when a few channels carry outliers, the case where per-tensor activation quantization wastes its
levels on them and SmoothQuant-style smoothing (``smooth``) pays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.core import serde
from onnxcompress.core.graph import node_label
from onnxcompress.quant.smoothing import find_groups, graph_shapes, linear_reader
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.capture import capture
from onnxcompress.runtime.data import CalibSource

__all__ = ["ChannelStats", "LayerOutliers", "channel_absmax", "layer_input_outliers", "outlier_stats"]


def channel_absmax(model: onnx.ModelProto, names: list[str], source: CalibSource, *, batch_size: int = 32,
                   progress: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """``({tensor: max|x| per channel of the last axis (float64)}, samples seen)`` over ``source``."""
    names = list(dict.fromkeys(names))
    found: dict[str, np.ndarray] = {}

    def consume(_batch: Batch, tensors: dict[str, np.ndarray]) -> None:
        for name in names:
            x = np.abs(np.asarray(tensors[name], dtype=np.float64))
            amax = x.reshape(-1, x.shape[-1]).max(axis=0) if x.ndim and x.size else np.zeros(x.shape[-1:])
            found[name] = amax if name not in found else np.maximum(found[name], amax)

    samples = capture(model, names, source, consume, batch_size=batch_size, progress=progress)
    return found, samples


@dataclass(frozen=True)
class ChannelStats:
    """Outlier statistics of one tensor's per-channel absolute maxima.

    Attributes:
        channels: Number of channels (last axis).
        max: Largest per-channel maximum.
        median: Median per-channel maximum.
        ratio: ``max / median`` (``inf`` when the median is 0 and the max is not; 1 for all-zero).
        top: Index of the channel holding the largest maximum.
    """

    channels: int
    max: float
    median: float
    ratio: float
    top: int

    def as_dict(self) -> dict:
        """JSON-ready form (``ratio`` rounded; ``inf`` as a string)."""
        ratio = round(self.ratio, 3) if np.isfinite(self.ratio) else "inf"
        return {"channels": self.channels, "max": round(self.max, 6), "median": round(self.median, 6),
                "ratio": ratio, "top_channel": self.top}


def outlier_stats(amax: np.ndarray) -> ChannelStats:
    """:class:`ChannelStats` of per-channel absolute maxima."""
    a = np.asarray(amax, dtype=np.float64).reshape(-1)
    if not a.size:
        return ChannelStats(0, 0.0, 0.0, 1.0, 0)
    hi, med = float(a.max()), float(np.median(a))
    ratio = hi / med if med > 0 else (np.inf if hi > 0 else 1.0)
    return ChannelStats(int(a.size), hi, med, float(ratio), int(a.argmax()))


@dataclass(frozen=True)
class LayerOutliers:
    """The outlier statistics of one linear layer's input, and whether ``smooth`` can act on it.

    Attributes:
        node: The MatMul/Gemm node (name, or label).
        op: Its op type.
        input: The input tensor measured.
        stats: Per-channel statistics of that input.
        smoothable: ``smooth`` can fold a scale for this layer.
        reason: The ``smooth`` decline code (and detail) when it cannot, else empty.
    """

    node: str
    op: str
    input: str
    stats: ChannelStats
    smoothable: bool
    reason: str = ""

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {"node": self.node, "op": self.op, "input": self.input, **self.stats.as_dict(),
                "smoothable": self.smoothable, "reason": self.reason}


def layer_input_outliers(model: onnx.ModelProto, source: CalibSource, *, batch_size: int = 32,
                         progress: bool = False) -> list[LayerOutliers]:
    """Per-channel outlier statistics of the input of every MatMul/Gemm with a constant weight
    (graph order), and whether ``smooth`` could migrate them (see :mod:`onnxcompress.quant.smoothing`)."""
    graph = serde.to_graph(model)
    graph.toposort()
    layers = [n for n in graph.nodes if linear_reader(n)]
    if not layers:
        return []
    groups, declined = find_groups(graph, graph_shapes(graph))
    smoothed = {id(n) for g in groups for n in g.readers}
    why = {id(n): f"{code} ({detail})" if detail else code for n, code, detail in declined}
    amax, _ = channel_absmax(model, [n.inputs[0].name for n in layers], source, batch_size=batch_size,
                             progress=progress)
    return [LayerOutliers(node_label(n), n.op, n.inputs[0].name, outlier_stats(amax[n.inputs[0].name]),
                          id(n) in smoothed, why.get(id(n), "")) for n in layers]
