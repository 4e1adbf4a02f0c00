"""Float layers followed by pooling, laid out so that onnxruntime keeps the pooling in float.

When a Conv stays float (``exclude``, mixed precision) and its ``Relu``/``Clip`` output goes through
a ``MaxPool`` to quantized readers, the QuantizeLinear lands after the MaxPool. onnxruntime's
QDQ propagation then moves that Q backwards over the MaxPool (a ``MaxPool`` whose input has one
reader) and runs the MaxPool on uint8 in NCHW layout, and a sibling MaxPool reading the same
quantized tensor likewise: measured on the pruned concat fixture (AVX-512 Xeon, onnxruntime 1.32),
43 and 72 µs per run for these two uint8 MaxPools against 3–5 µs in float or NHWC, which made
keeping the image stem float (its int8 conv with one input channel is 4x slower than float)
slower overall than int8 everywhere.

:func:`commute_float_pools` rewrites the float graph before placement:

1. ``C -> Relu/Clip -> MaxPool`` (``C`` kept float, each the only reader of the previous output)
   becomes ``C -> MaxPool -> Relu/Clip``: exact, since a max over a window commutes with a
   monotone non-decreasing elementwise map; the activation's output keeps the MaxPool output's
   name, so every reader and the calibrated range stay the same. onnxruntime does not move a Q
   over a Relu/Clip, so the MaxPool runs in float (in its blocked layout, next to the float conv).
2. every other MaxPool reading that tensor is kept float as well (returned, to be excluded): it
   then dequantizes, pools in float and requantizes with its own calibrated range, instead of
   running on uint8 in NCHW.
"""

from __future__ import annotations

from dataclasses import replace

import onnx_graphsurgeon as gs

from onnxcompress.core.graph import clip_bounds
from onnxcompress.quant.options import QuantConfig

__all__ = ["commute_float_pools", "with_float_pools"]

_ACTIVATIONS = ("Relu", "Clip")
_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _sole_reader(t: gs.Tensor, op: tuple[str, ...], outputs: set[str]) -> gs.Node | None:
    if t.name in outputs or len(t.outputs) != 1 or t.outputs[0].op not in op:
        return None
    node = t.outputs[0]
    return node if node.inputs and node.inputs[0] is t and len(node.outputs) == 1 else None


def _monotone(act: gs.Node) -> bool:
    """Relu, or a Clip with constant bounds (both monotone non-decreasing)."""
    return act.op == "Relu" or clip_bounds(act) is not None


def commute_float_pools(graph: gs.Graph, excluded: set[str]) -> list[str]:
    """Apply rules 1–2 of the module doc to the compute nodes named (or typed) in ``excluded``, in
    place; returns the names of the sibling MaxPools to keep float (rule 2)."""
    outputs = {t.name for t in graph.outputs}
    extra: list[str] = []
    for node in list(graph.nodes):
        if node.op not in _COMPUTE or not (node.name in excluded or node.op in excluded) or len(node.outputs) != 1:
            continue
        act = _sole_reader(node.outputs[0], _ACTIVATIONS, outputs)
        pool = act is not None and _monotone(act) and _sole_reader(act.outputs[0], ("MaxPool",), outputs)
        if not pool or len(pool.outputs) != 1:
            continue
        pre, mid, post = node.outputs[0], act.outputs[0], pool.outputs[0]
        pool.inputs[0] = pre  # C -> MaxPool -> act: mid now carries the pooled, pre-activation values
        pool.outputs[0] = mid
        act.inputs[0] = mid
        act.outputs[0] = post
        mid.shape = None  # the pooled shape, inferred again downstream
        extra += [r.name for r in post.outputs if r.op == "MaxPool" and r.name and r.name not in excluded]
    if extra:
        graph.toposort()
    return sorted(set(extra))


def with_float_pools(graph: gs.Graph, cfg: QuantConfig) -> QuantConfig:
    """With ``cfg.float_pools`` and layers kept float: :func:`commute_float_pools` on ``graph`` (in
    place), and ``cfg`` with the sibling MaxPools excluded too; else ``cfg`` unchanged."""
    if not cfg.float_pools or not cfg.exclude or cfg.weights_only:
        return cfg
    extra = commute_float_pools(graph, set(cfg.exclude))
    return replace(cfg, exclude=(*cfg.exclude, *extra)) if extra else cfg
