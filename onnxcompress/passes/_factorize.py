"""The base of the ``factorize_*`` passes: candidate scan, calibration statistics, rewrite, refit.

Each ``factorize_*`` pass subclasses :class:`FactorizePass` and supplies what differs (which nodes,
the Gram statistics, the factorization); the graph pieces live in :mod:`onnxcompress.lowrank.factorize`
and the math in :mod:`onnxcompress.lowrank.linalg` (see those modules for the driver's steps).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.graph import Names, check_names, node_label
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassResult, Slot
from onnxcompress.core.shapes import DEFAULT_DYNAMIC_DIM, shape_model
from onnxcompress.lowrank.factorize import (
    MAX_GRAM_DIM,
    R_EXCLUDED,
    R_LAYOUT,
    R_NO_STATS,
    R_NOT_PAY,
    R_TINY,
    R_WEIGHT,
    Decline,
    Done,
    Factorization,
    FactorLayer,
    LimitedSource,
    conv_attrs,
    input_shapes,
    refittable,
    release_weights,
    rewrite_layer,
)
from onnxcompress.lowrank.linalg import DEFAULT_ENERGY, GramAccumulator, RankRule, relative_error
from onnxcompress.reconstruct.layerview import conv_geometry, layer_view, sample_rows
from onnxcompress.reconstruct.refit import LayerStats, LayerTarget, reconstruct_layers
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.capture import capture
from onnxcompress.runtime.data import CalibSource

__all__ = ["COMMON_OPTIONS", "MAX_GRAM_DIM_LIMIT", "FactorizePass"]

log = logging.getLogger(__name__)

COMMON_OPTIONS: dict[str, Option] = {
    "rank": Option(int, None, "fixed rank (Tucker: both modes; dwsep: channel multiplier)", interval="[1, inf)"),
    "rank_ratio": Option(float, None, "rank as a fraction of the full rank, in (0, 1]", interval="(0, 1]"),
    "energy": Option(float, None, f"keep this share of the squared singular values (the default rule: {DEFAULT_ENERGY})",
                     interval="(0, 1]"),
    "vbmf": Option(bool, False, "estimate the rank by empirical variational Bayesian matrix factorization"),
    "round_to": Option(int, 8, "round ranks up to a multiple of N (capped at the full rank)", interval="[1, inf)"),
    "max_mac_ratio": Option(float, 0.7, "factorize a layer only if its MACs drop below this fraction",
                            interval="(0, inf)"),
    "min_channels": Option(int, 16, "skip layers with fewer input or output channels", interval="[0, inf)"),
    "exclude": Option(list, [], "node names to leave alone"),
    "data_aware": Option(bool, None, "whiten by calibration input statistics and refit the last factor "
                         "(default: on when calibration data is given)"),
    "refit": Option(bool, True, "data-aware: least-squares refit of the last factor to the original output"),
    "refit_holdout": Option(float, 0.2, "data-aware: share of calibration rows held out to choose the "
                            "refit's ridge and reject a refit that does not beat the unrefit factor (0: off)",
                            interval="[0, 1)"),
    "damp": Option(float, 0.01, "data-aware: whitening damping, relative to the mean input eigenvalue",
                   interval="[0, inf)"),
    "samples": Option(int, 256, "data-aware: calibration samples used (0: all)", interval="[0, inf)"),
    "max_positions": Option(int, 2048, "data-aware: output positions sampled per batch and layer", interval="[1, inf)"),
}


#: Caller-given override of :data:`~onnxcompress.lowrank.factorize.MAX_GRAM_DIM` (e.g. a small one in tests).
MAX_GRAM_DIM_LIMIT = Slot("factorize_max_gram_dim", int, "the whitening size limit",
                          "largest input-statistics side the factorize_* passes whiten")


class FactorizePass(Pass):
    """Base class of the ``factorize_*`` passes (not registered itself).

    Subclasses set ``name``, ``ops`` and ``options`` and implement :meth:`classify`,
    :meth:`gram_kind` and :meth:`factorize`; :meth:`run` does the rest (see the module docs).
    """

    numerics = Numerics.LOSSY
    reads = (MAX_GRAM_DIM_LIMIT,)
    options: ClassVar[Mapping[str, Option]] = COMMON_OPTIONS
    ops: ClassVar[frozenset[str]] = frozenset()

    def check_options(self) -> None:
        """At most one rank rule (``rank``, ``rank_ratio``, ``energy``, ``vbmf``)."""
        try:
            self.rule = RankRule.from_options(self.opts)
        except InputError as exc:
            raise InputError(f"pass {self.name}: {exc}") from None

    # ---- hooks
    def classify(self, node: gs.Node, weight: np.ndarray) -> str:
        """The layer kind of ``node`` with constant ``weight``, or raise :class:`Decline`."""
        raise NotImplementedError

    def gram_kind(self, layer: FactorLayer) -> str:
        """The :class:`GramAccumulator` kind the factorization of ``layer`` is whitened with."""
        raise NotImplementedError

    def factorize(self, layer: FactorLayer) -> Factorization:
        """The factors of ``layer`` (whitened by ``layer.sigma`` when set), or raise :class:`Decline`."""
        raise NotImplementedError

    def slower(self, layer: FactorLayer, fz: Factorization, ctx: PassContext) -> tuple[str, str] | None:
        """``(decline code, detail)`` when ``fz`` would not run faster than ``layer`` here (default: never
        measured, the MAC rule alone decides)."""
        return None

    # ---- driver
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Scan, gather statistics, factorize what pays, refit; see the module docs."""
        check_names(graph, self.opts["exclude"], owner=self.name)
        result = PassResult()
        nodes = [n for n in graph.nodes if n.op in self.ops]
        if not nodes:
            self._stats(result, [], False, [])
            return result
        layers = self._scan(graph, nodes, ctx, result)
        data = self._data(ctx)
        teacher = serde.to_model(graph) if data is not None and layers else None  # only data-aware runs read it
        if teacher is not None and not self._statistics(teacher, layers, data, ctx, result):
            data = None
        names = Names(graph)
        done = [d for d in (self._apply(graph, names, layer, ctx, result) for layer in layers) if d]
        refits = self._refit(graph, teacher, done, data, ctx, result) if data is not None and done else []
        self._stats(result, done, data is not None, refits)
        result.modified = bool(done)
        return result

    def _data(self, ctx: PassContext) -> CalibSource | None:
        wanted = self.opts["data_aware"]
        if wanted is False or ctx.calib is None:
            if wanted:
                log.info("%s: data_aware=true but no calibration data: plain factorization", self.name)
            return None
        return LimitedSource(ctx.calib, self.opts["samples"])

    def _scan(self, graph: gs.Graph, nodes: list[gs.Node], ctx: PassContext, result: PassResult) -> list[FactorLayer]:
        shapes = input_shapes(shape_model(graph), {n.inputs[0].name for n in nodes if n.inputs}, ctx.dims)
        exclude = set(self.opts["exclude"])
        layers = []
        for node in nodes:
            where = node_label(node)
            try:
                if where in exclude or node.name in exclude:
                    raise Decline(R_EXCLUDED)
                layers.append(self._layer(node, where, graph.opset, shapes))
            except Decline as d:
                result.decline(where, d.code, d.detail, logger=ctx.logger)
        return layers

    def _layer(self, node: gs.Node, where: str, opset: int, shapes: dict[str, tuple[int, ...]]) -> FactorLayer:
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant) \
                or not isinstance(node.inputs[1].values, np.ndarray) or isinstance(node.inputs[0], gs.Constant):
            raise Decline(R_WEIGHT)
        weight = node.inputs[1].values
        if weight.dtype.kind != "f":
            raise Decline(R_LAYOUT)
        kind = self.classify(node, weight)
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        layer = FactorLayer(node, where, kind, weight, conv_attrs(node.attrs), bias, int(opset or 0))
        c_in, c_out = layer.channels
        if min(c_in, c_out) < self.opts["min_channels"]:
            raise Decline(R_TINY)
        self._geometry(layer, shapes.get(node.inputs[0].name))
        return layer

    @staticmethod
    def _geometry(layer: FactorLayer, shape: tuple[int, ...] | None) -> None:
        if layer.kind in ("gemm", "matmul"):
            layer.rows = math.prod(shape[:-1]) if shape and len(shape) > 1 else 1
            return
        k = len(layer.kernel)
        layer.spatial_known = bool(shape and len(shape) == k + 2)
        spatial = tuple(shape[2:]) if shape and layer.spatial_known else (DEFAULT_DYNAMIC_DIM,) * k
        if not layer.spatial_known:
            log.warning("%s: %s: input shape unknown: its MACs are estimated at spatial size %s",
                        layer.node.op, layer.where, "x".join(map(str, spatial)))
        try:
            geom = conv_geometry(layer.attrs, layer.kernel, spatial)
        except InputError as exc:
            raise Decline(R_LAYOUT) from exc
        layer.in_spatial, layer.out_spatial = spatial, geom.out

    def _statistics(self, teacher: onnx.ModelProto, layers: list[FactorLayer], data: CalibSource, ctx: PassContext,
                    result: PassResult) -> bool:
        """Fill ``layer.sigma`` from one calibration run of the original model; False if it failed."""
        views, accs, rngs, kept = [], [], [], []
        max_dim = ctx.get(MAX_GRAM_DIM_LIMIT) or MAX_GRAM_DIM
        for i, layer in enumerate(layers):
            acc = GramAccumulator(self.gram_kind(layer), layer.channels[0], layer.kernel)
            if acc.dim > max_dim:
                log.info("%s: %s: input statistics of side %d are too large: plain factorization",
                         self.name, layer.where, acc.dim)
                result.count("whitening_skipped")
                continue
            views.append(layer_view(layer.node, layer.weight, fit_bias=False))
            accs.append(acc)
            rngs.append(np.random.default_rng([ctx.seed, i]))
            kept.append(layer)
        layers, max_pos = kept, self.opts["max_positions"]
        if not layers:
            return True

        def consume(_batch: Batch, tensors: dict[str, np.ndarray]) -> None:
            """Add the sampled im2col rows of every layer's input in this batch."""
            for layer, view, acc, rng in zip(layers, views, accs, rngs):
                x = tensors[layer.node.inputs[0].name]
                rows = sample_rows(view.n_rows(x), max_pos, rng)
                acc.add(view.features(x, rows)[0])

        try:
            capture(teacher, sorted({la.node.inputs[0].name for la in layers}), data, consume,
                    threads=1, progress=ctx.progress)
        except InputError as exc:
            log.warning("%s: calibration run failed (%s): plain factorization", self.name, exc)
            result.decline("calibration", R_NO_STATS, str(exc).splitlines()[0] if str(exc) else "",
                           logger=ctx.logger)
            return False
        for layer, acc in zip(layers, accs):
            layer.sigma = acc.result()
        return True

    def _apply(self, graph: gs.Graph, names: Names, layer: FactorLayer, ctx: PassContext,
               result: PassResult) -> Done | None:
        """Factorize ``layer`` and rewrite the graph if it pays; else record the decline."""
        try:
            fz = self.factorize(layer)
        except Decline as d:
            result.decline(layer.where, d.code, d.detail, logger=ctx.logger)
            return None
        before, after = fz.macs
        ratio = after / before if before else math.inf
        if ratio >= self.opts["max_mac_ratio"]:
            detail = f"MAC ratio {ratio:.2f} >= {self.opts['max_mac_ratio']:g}, ranks {fz.ranks}"
            result.decline(layer.where, R_NOT_PAY, detail, logger=ctx.logger)
            return None
        slower = self.slower(layer, fz, ctx)
        if slower is not None:
            result.decline(layer.where, *slower, logger=ctx.logger)
            return None
        error = relative_error(layer.weight.astype(np.float64), fz.approx)
        if len(layer.node.inputs[1].outputs) > 1:
            result.count("shared_copied")
        target = layer.node.outputs[0].name
        last = rewrite_layer(graph, names, layer, fz)
        log.info("%s: %s -> ranks %s, MACs x%.3f, weight error %.4f%s", self.name, layer.where, fz.ranks, ratio,
                 error, " (whitened)" if layer.sigma is not None else "")
        release_weights(layer, fz)
        return Done(layer, fz, last, target, error)

    def _refit(self, graph: gs.Graph, teacher: onnx.ModelProto, done: list[Done], data: CalibSource,
               ctx: PassContext, result: PassResult) -> list[LayerStats]:
        """Least-squares refit of each last factor to the original node's output (the teacher's)."""
        if not self.opts["refit"]:
            return []
        targets = [LayerTarget(d.last, d.target) for d in done if refittable(d.layer)]
        if not targets:
            return []
        fixed, stats = reconstruct_layers(graph.toposort(), teacher, targets, data, seed=ctx.seed, threads=1,
                                          max_positions=self.opts["max_positions"], progress=ctx.progress,
                                          holdout=self.opts["refit_holdout"])
        result.graph = fixed
        return stats

    def _stats(self, result: PassResult, done: list[Done], data_aware: bool, refits: list[LayerStats]) -> None:
        s = result.stats
        s["layers_factorized"] = len(done)
        s["layers_skipped"] = sum(1 for d in result.declined if d.where != "calibration")
        s["params_before"] = sum(int(d.layer.weight.size) for d in done)
        s["params_after"] = sum(int(f.weight.size) for d in done for f in d.fz.factors)
        s["macs_before"] = sum(d.fz.macs[0] for d in done)
        s["macs_after"] = sum(d.fz.macs[1] for d in done)
        if any(not d.layer.spatial_known for d in done):
            s["macs_estimated"] = sum(1 for d in done if not d.layer.spatial_known)
        s["mean_rel_weight_error"] = float(np.mean([d.error for d in done])) if done else 0.0
        s["data_aware"] = int(data_aware)
        if data_aware and self.opts["refit"]:
            s["refit_skipped"] = len(done) - len(refits)
        if refits:
            s["refit_layers"] = len(refits)
            s["refit_rejected"] = sum(1 for r in refits if r.rejected)
            s["refit_error_before"] = float(np.mean([r.error_before for r in refits]))
            s["refit_error_after"] = float(np.mean([r.error_after for r in refits]))


#: Options every ``factorize_*`` pass takes.
