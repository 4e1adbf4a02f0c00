"""SmoothQuant: migrate per-channel activation outliers into the weights of the linear layers reading them."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.graph import Names, node_label, opt_input, uncached_values, weight_layout
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassResult, register
from onnxcompress.quant.channels import channel_absmax, outlier_stats
from onnxcompress.quant.smoothing import SmoothGroup, find_groups, graph_shapes, smooth_scales

__all__ = ["Smooth"]

log = logging.getLogger(__name__)


def _row_axis(node: gs.Node) -> int:
    """Axis of the weight indexed by the input channel."""
    layout = weight_layout(node)
    assert layout is not None
    return layout.in_axis


def _scaled(values: np.ndarray, scale: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return (values.astype(np.float64) * scale.reshape(shape)).astype(np.float32)


@register
class Smooth(Pass):
    """SmoothQuant: divide activation channels by ``s``, multiply the weight rows reading them by ``s``.

    Before: ``y = LayerNorm(x; gamma, beta) @ W``    (a few channels of the LN output up to 100x the others)
    After:  ``y = LayerNorm(x; gamma / s, beta / s) @ (diag(s) W)``  (same ``y``; flatter activation)

    Math:
        For a linear layer ``y = x W`` (MatMul, or Gemm with ``W`` stored either way) and any
        positive ``s``: ``x W = (x / s) (diag(s) W)``. With ``s_j = max|x_j|^alpha /
        max|W_j|^(1 - alpha)`` (``max|x_j|`` over the calibration data, ``max|W_j|`` over row ``j``
        of every weight reading ``x``), the activation's per-channel ranges become
        ``max|x_j|^(1 - alpha) max|W_j|^(1 - alpha)`` and the weight's ``max|x_j|^alpha max|W_j|^alpha``:
        ``alpha`` sets how much of the outliers moves into the weights (0.5: half, in log scale),
        where per-channel weight quantization absorbs them. Scales are clamped to ``[1e-4, 1e4]``;
        a channel that is 0 in the data or in the weights keeps ``s = 1``.

    The ``1 / s`` is folded exactly into the op producing ``x`` (see
    :mod:`onnxcompress.quant.smoothing` for the ops it is followed through: channel-keeping
    Reshape/Transpose, head split and merge, the attention ``MatMul(P, V)``):

    * ``LayerNormalization``: ``gamma / s``, ``beta / s``;
    * a decomposed norm's final ``Add(Mul(n, gamma), beta)``: both constants divided by ``s``;
    * a ``Mul`` by a constant vector (``c / s``) or ``Div`` by one (``c * s``); after a ``Mul``/``Div``
      by a *scalar* (an exported GELU's final ``* 0.5``: onnxruntime fuses the GELU only while it is
      a scalar) a ``Mul`` by ``1 / s`` is inserted instead (one elementwise op; exact), so the FFN down
      projection is smoothed too;
    * a linear layer (constant weight, optional constant bias Add): its output columns and bias
      divided by ``s`` (the value projection for the attention output projection).

    A norm whose output also feeds other ops (the residual Add of a post-LN block) is copied: the
    copy, with the smoothed constants, feeds the linear layers; the others keep reading the original.
    New constants are always created (shared initializers are never edited in place).

    ``insert``: a linear layer that would be declined (its input comes from a GELU ending in
    ``Mul(x, Phi(x))``, a graph input, an op read by other ops...) gets a ``Mul`` by ``1 / s`` in
    front instead (shared by the layers reading the same tensor): exact, one elementwise op each.

    Numerics: exact in float (same function up to rounding); it only prepares ``quantize_int8``
    (run it just before, e.g. recipe ``int8-dynamic``).

    Fires when:
        A MatMul/Gemm with a constant 2-D weight reads, directly or through those ops, a tensor
        produced by one of the ops above, and every reader of that tensor (Shape/Size aside) is such
        a linear layer, or (norms only) leads only to other ops.

    Declines (per linear layer; none with ``insert``):
        ``no_foldable_producer`` (detail: the op found, e.g. a GELU ending in ``Mul(x, Phi(x))``
        before an FFN down projection, or ``graph input``); ``shared_with_other_readers`` (a linear producer's output
        also feeds other ops, or a reader path mixes linear layers and other ops);
        ``graph_output`` (a tensor on the way is a graph output).

    Context:
        Needs calibration data (per-channel ``max|x|`` of every smoothed layer's input).

    Stats:
        ``groups_smoothed``, ``layers_smoothed``, ``producers_copied``, ``scales_inserted``, ``outlier_ratio_max``
        (largest ``max / median`` of the per-channel maxima before smoothing), ``calib_samples``.
    """

    name = "smooth"
    numerics = Numerics.EXACT
    options = {
        "alpha": Option(float, 0.5, "migration strength: 0 keeps the activations, 1 moves all outliers into weights",
                        interval="[0, 1]"),
        "insert": Option(bool, False, "layers whose producer cannot take the scale get a Mul by 1/s in front "
                                      "(one elementwise op each) instead of being declined"),
        "batch_size": Option(int, 32, "calibration batch size", interval="[1, inf)"),
    }

    def needs_calibration(self) -> bool:
        """The scales come from per-channel activation maxima on calibration data."""
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Find the groups, calibrate their inputs, fold the scales."""
        result = PassResult()
        graph.toposort()
        groups, declined = find_groups(graph, graph_shapes(graph), insert=self.opts["insert"])
        for node, code, detail in declined:
            result.decline(node_label(node), code, detail, logger=ctx.logger)
        if not groups:
            return result
        names = [n for g in groups for n in g.inputs]
        amax, samples = channel_absmax(serde.to_model(graph), names, ctx.calib, batch_size=self.opts["batch_size"],
                                       progress=ctx.progress)
        result.stats["calib_samples"] = samples
        result.stats["outlier_ratio_max"] = round(max(outlier_stats(amax[n]).ratio for n in names), 3)
        scales = [self._scales(g, amax) for g in groups]
        names_ = Names(graph)
        for g, s in zip(groups, scales):
            _Folder(graph, names_, result).fold(g, s)
            result.count("groups_smoothed")
            result.count("layers_smoothed", len(g.readers))
        result.modified = True
        return result

    def _scales(self, g: SmoothGroup, amax: dict[str, np.ndarray]) -> np.ndarray:
        x = np.max([amax[n] for n in g.inputs], axis=0)
        w = np.max([np.abs(uncached_values(r.inputs[1])).max(axis=1 - _row_axis(r)) for r in g.readers], axis=0)
        return smooth_scales(x, w, self.opts["alpha"])


class _Folder:
    """Writes the scaled constants of one group (always new constants) and copies the producer if needed."""

    def __init__(self, graph: gs.Graph, names: Names, result: PassResult):
        self.graph, self.names, self.result = graph, names, result

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names.fresh(f"{base}_smoothed"), np.ascontiguousarray(values))

    def divided(self, t: gs.Tensor, s: np.ndarray) -> gs.Constant:
        """A new constant ``t / s`` along the last axis (a scalar becomes a vector)."""
        v = uncached_values(t).astype(np.float64)
        out = (v.reshape(-1) / s) if v.size == 1 else v / s.reshape([1] * (v.ndim - 1) + [-1])
        return self.const(t.name, out.astype(np.float32))

    def multiplied(self, t: gs.Tensor, s: np.ndarray) -> gs.Constant:
        """A new constant ``t * s`` along the last axis (a Div's divisor)."""
        return self.divided(t, 1.0 / s)

    def fold(self, g: SmoothGroup, s: np.ndarray) -> None:
        """Scale the readers' weight rows by ``s`` and divide the source's channels by ``s``."""
        done: dict[int, gs.Constant] = {}
        for r in g.readers:
            w = r.inputs[1]
            if id(w) not in done:
                values = uncached_values(w)
                done[id(w)] = self.const(w.name, _scaled(values, s, _row_axis(r), values.ndim))
            r.inputs[1] = done[id(w)]
        if g.kind == "linear":
            self._linear(g, s)
            return
        if g.kind == "scale":
            self._scale(g, s)
            return
        if g.kind == "inserted":
            self.insert_mul(g.source, g.split, s)
            return
        node = self._copy(g) if g.split else g.producer
        if g.kind == "layernorm":
            node.inputs[1] = self.divided(node.inputs[1], s)
            if opt_input(node, 2) is not None:
                node.inputs[2] = self.divided(node.inputs[2], s)
            return
        self._decomposed(node, s)

    def _scale(self, g: SmoothGroup, s: np.ndarray) -> None:
        """``x * c`` / ``x / c``: a vector ``c`` takes the scale; a scalar one (an exported GELU's
        ``* 0.5``, which onnxruntime fuses into ``Gelu`` only while it is a scalar) is kept, and a
        ``Mul`` by ``1 / s`` is inserted for the linear readers."""
        node = g.producer
        i = 0 if isinstance(node.inputs[0], gs.Constant) else 1
        if node.inputs[i].values.size > 1:
            node = self._copy(g) if g.split else node
            node.inputs[i] = self.multiplied(node.inputs[i], s) if node.op == "Div" else self.divided(node.inputs[i], s)
            return
        self.insert_mul(g.source, g.split or [r for r in g.source.outputs if r.op not in ("Shape", "Size")], s)

    def insert_mul(self, src: gs.Tensor, readers: list[gs.Node], s: np.ndarray) -> None:
        """``Mul(src, 1 / s)`` read by ``readers`` instead of ``src``."""
        out = gs.Variable(self.names.fresh(f"{src.name}_smoothed"), dtype=src.dtype, shape=src.shape)
        inv = self.const(f"{src.name}_inverse_scale", (1.0 / s).astype(np.float32))
        self.graph.nodes.append(gs.Node("Mul", self.names.fresh(f"{src.name}_smoothing_Mul"), {}, [src, inv], [out]))
        for reader in readers:
            for k, t in enumerate(list(reader.inputs)):
                if t is src:
                    reader.inputs[k] = out
        self.result.count("scales_inserted")

    def _decomposed(self, add: gs.Node, s: np.ndarray) -> None:
        i = 0 if isinstance(add.inputs[0], gs.Constant) else 1
        add.inputs[i] = self.divided(add.inputs[i], s)
        mul = add.inputs[1 - i].inputs[0]
        j = 0 if isinstance(mul.inputs[0], gs.Constant) else 1
        mul.inputs[j] = self.divided(mul.inputs[j], s)

    def _linear(self, g: SmoothGroup, s: np.ndarray) -> None:
        p = g.producer
        values = uncached_values(p.inputs[1])
        out_axis = 1 - _row_axis(p)
        p.inputs[1] = self.const(p.inputs[1].name, _scaled(values, 1.0 / s, out_axis, values.ndim))
        if p.op == "Gemm" and opt_input(p, 2) is not None:
            p.inputs[2] = self.divided(p.inputs[2], s)
        if g.bias_add is not None:
            i = 0 if isinstance(g.bias_add.inputs[0], gs.Constant) else 1
            g.bias_add.inputs[i] = self.divided(g.bias_add.inputs[i], s)

    def _copy(self, g: SmoothGroup) -> gs.Node:
        """Copy the producer (a norm, or the Mul + Add of a decomposed one) for the linear readers."""
        src = g.source
        out = gs.Variable(self.names.fresh(f"{src.name}_smoothed"), dtype=src.dtype, shape=src.shape)
        p = g.producer
        inputs = list(p.inputs)
        if g.kind == "decomposed":
            i = 0 if isinstance(p.inputs[0], gs.Constant) else 1
            mul = p.inputs[1 - i].inputs[0]
            mid = gs.Variable(self.names.fresh(f"{mul.outputs[0].name}_smoothed"), dtype=mul.outputs[0].dtype)
            self.graph.nodes.append(gs.Node("Mul", self.names.fresh(f"{mul.name}_smoothed"), dict(mul.attrs),
                                            list(mul.inputs), [mid]))
            inputs[1 - i] = mid
        copy = gs.Node(p.op, self.names.fresh(f"{p.name or p.op}_smoothed"), dict(p.attrs), inputs, [out])
        self.graph.nodes.append(copy)
        for reader in g.split:
            for k, t in enumerate(list(reader.inputs)):
                if t is src:
                    reader.inputs[k] = out
        self.result.count("producers_copied")
        return copy

