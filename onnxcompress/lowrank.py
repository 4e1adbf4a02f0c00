"""Low-rank factorization shared by the ``factorize_*`` passes: the graph-side driver.

:class:`FactorizePass` is what the three passes share on the graph: candidate scan and declines,
input shapes, calibration statistics, rewriting one node into its factors, the least-squares refit
of the last factor, and the stats. The math it uses (truncated SVD, rank rules, HOSVD/HOOI,
empirical VBMF, the spatial reshape, MAC accounting, input statistics and whitening; conventions
and formulas in that module's docs) lives in :mod:`onnxcompress.lowrank_math`; every public name
of it is re-exported here, so imports such as ``from onnxcompress.lowrank import svd`` keep working.

Driver (:meth:`FactorizePass.run`):
    1. Every node of the pass's op types is a candidate; it is declined with a reason (excluded,
       weight not constant, grouped conv, tiny layer, ...) or becomes a :class:`Layer` (input
       shapes come from shape inference at batch 1, other symbolic dims taken as 32).
    2. Data-aware (option ``data_aware``, default on when ``ctx.calib`` is given): one ORT run of
       the *original* model over at most ``samples`` calibration samples captures every
       candidate's input; im2col rows (at most ``max_positions`` per batch, drawn with
       ``ctx.seed``) feed the :class:`GramAccumulator` the pass asks for.
    3. Each layer is factorized; a layer whose factors need ``>= max_mac_ratio`` × its MACs is
       declined ("does not pay (MAC ratio ..., ranks ...)"). Otherwise the node is replaced, at
       its place in the node list, by its factors: the first reads the node's input, the last
       writes the node's output tensor (names downstream and graph outputs keep) and takes its
       bias; weights are new constants, so a shared weight stays intact for its other users.
    4. Data-aware refit: :func:`~onnxcompress.reconstruct.reconstruct_layers` refits each last
       factor (weight and bias) by ridge least squares so that its output matches the original
       node's output tensor in the original model (the teacher) on the calibration data, layer
       by layer in topological order with the already-refitted student's inputs. A last factor
       whose bias is not a constant per-output vector is not refit (``refit_skipped``).
       A share ``refit_holdout`` of the sampled rows is held out of the fit: the ridge is chosen
       on them and a refit that does not beat the unrefit factor there is rejected
       (``refit_rejected``), which stops the overfitting of wide last factors (e.g. dwsep's
       pointwise conv, ``C_in·m`` features) when few or small calibration images give barely more
       rows than features.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from . import serde
from .calib import DEFAULT_DYNAMIC_DIM, Batch, CalibSource
from .capture import capture
from .errors import InputError
from .graphutil import Names, node_label
from .lowrank_math import (  # re-exported: the math used to live here
    DEFAULT_ENERGY,
    RULES,
    GramAccumulator,
    RankRule,
    conv_macs,
    dwsep_macs,
    energy_rank,
    evbmf,
    hooi,
    hosvd,
    lowrank_factors,
    mode_dot,
    psd_sqrt,
    relative_error,
    round_rank,
    spatial_kernels,
    spatial_matrix,
    spatial_svd_macs,
    split_factors,
    svd,
    svd_macs,
    truncated_svd,
    tucker2_macs,
    tucker_to_tensor,
    unfold,
    vbmf_rank,
)
from .manager import Numerics, Option, Pass, PassContext, PassResult
from .metrics import concrete_shapes
from .reconstruct import (
    LayerStats,
    LayerTarget,
    conv_geometry,
    layer_view,
    reconstruct_layers,
    sample_rows,
)

__all__ = [
    "DEFAULT_ENERGY",
    "RULES",
    "RankRule",
    "energy_rank",
    "round_rank",
    "svd",
    "truncated_svd",
    "split_factors",
    "lowrank_factors",
    "relative_error",
    "psd_sqrt",
    "GramAccumulator",
    "unfold",
    "mode_dot",
    "hosvd",
    "hooi",
    "tucker_to_tensor",
    "evbmf",
    "vbmf_rank",
    "spatial_matrix",
    "spatial_kernels",
    "conv_macs",
    "svd_macs",
    "spatial_svd_macs",
    "tucker2_macs",
    "dwsep_macs",
    "R_EXCLUDED",
    "R_WEIGHT",
    "R_LAYOUT",
    "R_ATTRS",
    "R_GROUPED",
    "R_TINY",
    "R_NOT_PAY",
    "R_NO_STATS",
    "R_POINTWISE",
    "require_dense_kxk",
    "COMMON_REASONS",
    "COMMON_OPTIONS",
    "MAX_GRAM_DIM",
    "Decline",
    "Layer",
    "Factor",
    "Factorization",
    "FactorizePass",
    "attr_text",
    "input_shapes",
]

log = logging.getLogger(__name__)


R_EXCLUDED = "excluded"
R_WEIGHT = "weight not constant"
R_LAYOUT = "unsupported layout"
R_ATTRS = "unsupported attributes"
R_GROUPED = "grouped/depthwise conv"
R_TINY = "tiny layer"
R_NOT_PAY = "does not pay"
R_NO_STATS = "calibration statistics failed"
R_POINTWISE = "1x1 conv: use factorize_svd"

#: Layers whose whitening matrix would be larger than this (per side) are factorized plainly.
MAX_GRAM_DIM = 4096

#: Reasons every ``factorize_*`` pass may give (``does not pay`` is followed by the MAC ratio).
COMMON_REASONS = (R_EXCLUDED, R_WEIGHT, R_LAYOUT, R_ATTRS, R_GROUPED, R_TINY, R_NOT_PAY, R_NO_STATS)

#: Options every ``factorize_*`` pass takes.
COMMON_OPTIONS: dict[str, Option] = {
    "rank": Option(int, None, "fixed rank (Tucker: both modes; dwsep: channel multiplier)"),
    "rank_ratio": Option(float, None, "rank as a fraction of the full rank, in (0, 1]"),
    "energy": Option(float, None, f"keep this share of the squared singular values (the default rule: {DEFAULT_ENERGY})"),
    "vbmf": Option(bool, False, "estimate the rank by empirical variational Bayesian matrix factorization"),
    "round_to": Option(int, 8, "round ranks up to a multiple of N (capped at the full rank)"),
    "max_mac_ratio": Option(float, 0.7, "factorize a layer only if its MACs drop below this fraction"),
    "min_channels": Option(int, 16, "skip layers with fewer input or output channels"),
    "exclude": Option(list, [], "node names to leave alone"),
    "data_aware": Option(bool, None, "whiten by calibration input statistics and refit the last factor "
                         "(default: on when calibration data is given)"),
    "refit": Option(bool, True, "data-aware: least-squares refit of the last factor to the original output"),
    "refit_holdout": Option(float, 0.2, "data-aware: share of calibration rows held out to choose the "
                            "refit's ridge and reject a refit that does not beat the unrefit factor (0: off)"),
    "damp": Option(float, 0.01, "data-aware: whitening damping, relative to the mean input eigenvalue"),
    "samples": Option(int, 256, "data-aware: calibration samples used (0: all)"),
    "max_positions": Option(int, 2048, "data-aware: output positions sampled per batch and layer"),
}


class Decline(Exception):
    """Raised by a pass hook to leave the current node alone, for ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def require_dense_kxk(node: gs.Node, weight: np.ndarray) -> None:
    """Raise :class:`Decline` unless ``node`` is a dense (group 1) Conv with a non-1×1 kernel."""
    if weight.ndim < 3:
        raise Decline(R_LAYOUT)
    if int(node.attrs.get("group", 1)) != 1:
        raise Decline(R_GROUPED)
    if all(k == 1 for k in weight.shape[2:]):
        raise Decline(R_POINTWISE)


@dataclass
class Layer:
    """A candidate node and what the driver knows about it.

    Attributes:
        node: The node (Gemm, MatMul or Conv with ``group`` 1).
        where: Its name (else its first output's name).
        kind: ``gemm``, ``matmul``, ``conv1x1``, ``spatial``, ``tucker`` or ``dwsep``.
        weight: The constant weight in ONNX layout and dtype.
        attrs: The node's attributes.
        bias: The bias / ``C`` input (passed to the last factor unchanged), if any.
        opset: The graph's default-domain opset.
        in_spatial: Input spatial size (Conv; batch 1, symbolic dims taken as 32 when unknown).
        out_spatial: Output spatial size (Conv).
        rows: Rows per sample (Gemm 1, MatMul the product of the input's leading dims).
        sigma: The input statistics the factorization is whitened by (data-aware mode).
    """

    node: gs.Node
    where: str
    kind: str
    weight: np.ndarray
    attrs: dict
    bias: gs.Tensor | None
    opset: int
    in_spatial: tuple[int, ...] = ()
    out_spatial: tuple[int, ...] = ()
    rows: int = 1
    sigma: np.ndarray | None = None

    @property
    def channels(self) -> tuple[int, int]:
        """``(inputs, outputs)``: ``(K, N)`` for Gemm/MatMul, ``(C_in, C_out)`` for Conv."""
        w = self.weight
        if self.kind == "gemm":
            return (w.shape[1], w.shape[0]) if self.attrs.get("transB", 0) else (w.shape[0], w.shape[1])
        if self.kind == "matmul":
            return w.shape[0], w.shape[1]
        return w.shape[1], w.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        """Conv kernel size (``()`` for Gemm/MatMul)."""
        return tuple(self.weight.shape[2:]) if self.weight.ndim > 2 else ()


@dataclass
class Factor:
    """One node of a factorization: op, weight (ONNX layout, float64) and attributes.

    ``bias`` is a new constant bias (the first Gemm before opset 11, whose ``C`` is required);
    the last factor takes the original bias tensor instead.
    """

    op: str
    suffix: str
    weight: np.ndarray
    attrs: dict
    bias: np.ndarray | None = None


@dataclass
class Factorization:
    """What replaces one layer: its factors in order, the product and its cost."""

    factors: list[Factor]
    approx: np.ndarray
    ranks: tuple[int, ...]
    macs: tuple[int, int]


@dataclass
class _Done:
    layer: Layer
    fz: Factorization
    last: str
    target: str
    error: float


def attr_text(value: object) -> object:
    """Attribute values as gs gives them, with bytes decoded."""
    return value.decode() if isinstance(value, bytes) else value


class _Limited(CalibSource):
    """At most ``limit`` samples of another source (0: all)."""

    def __init__(self, source: CalibSource, limit: int):
        super().__init__(getattr(source, "specs", []), limit or None)
        self.source = source
        self.description = getattr(source, "description", "data")

    def batches(self, batch_size: int = 32) -> Iterator[Batch]:
        """The wrapped source's batches, the last one cut so that at most ``limit`` samples come out."""
        seen = 0
        for batch in self.source.batches(batch_size):
            if self.limit is not None and seen >= self.limit:
                return
            take = len(batch) if self.limit is None else min(len(batch), self.limit - seen)
            if take < len(batch):
                labels = None if batch.labels is None else batch.labels[:take]
                batch = Batch({k: v[:take] for k, v in batch.feeds.items()}, labels)
            seen += take
            yield batch


def input_shapes(model: onnx.ModelProto, names: set[str]) -> dict[str, tuple[int, ...]]:
    """Fully known shapes of the tensors ``names`` at batch 1 (other dynamic dims: 32)."""
    return {name: shape for name, shape in concrete_shapes(model).items() if name in names}


def _conv_attrs(attrs: Mapping[str, object]) -> dict:
    return {k: attr_text(v) for k, v in attrs.items()}


class FactorizePass(Pass):
    """Base class of the ``factorize_*`` passes (not registered itself).

    Subclasses set ``name``, ``ops`` and ``options`` and implement :meth:`classify`,
    :meth:`gram_kind` and :meth:`factorize`; :meth:`run` does the rest (see the module docs).
    """

    numerics = Numerics.LOSSY
    options: ClassVar[Mapping[str, Option]] = COMMON_OPTIONS
    ops: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **opts: object):
        super().__init__(**opts)
        self.rule = RankRule.from_options(self.opts)
        o = self.opts
        checks = [("max_mac_ratio", o["max_mac_ratio"] > 0), ("min_channels", o["min_channels"] >= 0),
                  ("damp", o["damp"] >= 0), ("samples", o["samples"] >= 0),
                  ("max_positions", o["max_positions"] >= 1),
                  ("refit_holdout", 0.0 <= o["refit_holdout"] < 1.0)]
        checks += [(k, o[k] >= 0) for k in ("iters",) if k in o]
        for key, ok in checks:
            if not ok:
                raise InputError(f"pass {self.name}: option {key}={o[key]} is out of range")

    # ---- hooks
    def classify(self, node: gs.Node, weight: np.ndarray) -> str:
        """The layer kind of ``node`` with constant ``weight``, or raise :class:`Decline`."""
        raise NotImplementedError

    def gram_kind(self, layer: Layer) -> str:
        """The :class:`GramAccumulator` kind the factorization of ``layer`` is whitened with."""
        raise NotImplementedError

    def factorize(self, layer: Layer) -> Factorization:
        """The factors of ``layer`` (whitened by ``layer.sigma`` when set), or raise :class:`Decline`."""
        raise NotImplementedError

    # ---- driver
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Scan, gather statistics, factorize what pays, refit; see the module docs."""
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
        return _Limited(ctx.calib, self.opts["samples"])

    def _scan(self, graph: gs.Graph, nodes: list[gs.Node], ctx: PassContext, result: PassResult) -> list[Layer]:
        shapes = input_shapes(serde.shape_model(graph), {n.inputs[0].name for n in nodes if n.inputs})
        exclude = set(self.opts["exclude"])
        layers = []
        for node in nodes:
            where = node_label(node)
            try:
                if where in exclude or node.name in exclude:
                    raise Decline(R_EXCLUDED)
                layers.append(self._layer(node, where, graph.opset, shapes))
            except Decline as d:
                result.decline(where, d.reason, ctx.logger)
        return layers

    def _layer(self, node: gs.Node, where: str, opset: int, shapes: dict[str, tuple[int, ...]]) -> Layer:
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant) \
                or not isinstance(node.inputs[1].values, np.ndarray) or isinstance(node.inputs[0], gs.Constant):
            raise Decline(R_WEIGHT)
        weight = node.inputs[1].values
        if weight.dtype.kind != "f":
            raise Decline(R_LAYOUT)
        kind = self.classify(node, weight)
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        layer = Layer(node, where, kind, weight, _conv_attrs(node.attrs), bias, int(opset or 0))
        c_in, c_out = layer.channels
        if min(c_in, c_out) < self.opts["min_channels"]:
            raise Decline(R_TINY)
        self._geometry(layer, shapes.get(node.inputs[0].name))
        return layer

    @staticmethod
    def _geometry(layer: Layer, shape: tuple[int, ...] | None) -> None:
        if layer.kind in ("gemm", "matmul"):
            layer.rows = math.prod(shape[:-1]) if shape and len(shape) > 1 else 1
            return
        k = len(layer.kernel)
        spatial = tuple(shape[2:]) if shape and len(shape) == k + 2 else (DEFAULT_DYNAMIC_DIM,) * k
        try:
            geom = conv_geometry(layer.attrs, layer.kernel, spatial)
        except InputError as exc:
            raise Decline(R_LAYOUT) from exc
        layer.in_spatial, layer.out_spatial = spatial, geom.out

    def _statistics(self, teacher: onnx.ModelProto, layers: list[Layer], data: CalibSource, ctx: PassContext,
                    result: PassResult) -> bool:
        """Fill ``layer.sigma`` from one calibration run of the original model; False if it failed."""
        views, accs, rngs, kept = [], [], [], []
        for i, layer in enumerate(layers):
            acc = GramAccumulator(self.gram_kind(layer), layer.channels[0], layer.kernel)
            if acc.dim > MAX_GRAM_DIM:
                log.info("%s: %s: input statistics of side %d are too large: plain factorization",
                         self.name, layer.where, acc.dim)
                result.count("whitening_skipped")
                continue
            proto = helper.make_node(layer.node.op, ["x", "w"], ["y"], **layer.attrs)
            views.append(layer_view(proto, layer.weight, fit_bias=False))
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
            result.decline("calibration", R_NO_STATS, ctx.logger)
            return False
        for layer, acc in zip(layers, accs):
            layer.sigma = acc.result()
        return True

    def _apply(self, graph: gs.Graph, names: Names, layer: Layer, ctx: PassContext,
               result: PassResult) -> _Done | None:
        """Factorize ``layer`` and rewrite the graph if it pays; else record the decline."""
        try:
            fz = self.factorize(layer)
        except Decline as d:
            result.decline(layer.where, d.reason, ctx.logger)
            return None
        before, after = fz.macs
        ratio = after / before if before else math.inf
        if ratio >= self.opts["max_mac_ratio"]:
            reason = f"{R_NOT_PAY} (MAC ratio {ratio:.2f} >= {self.opts['max_mac_ratio']:g}, ranks {fz.ranks})"
            result.decline(layer.where, reason, ctx.logger)
            return None
        error = relative_error(layer.weight.astype(np.float64), fz.approx)
        if len(layer.node.inputs[1].outputs) > 1:
            result.count("shared_copied")
        target = layer.node.outputs[0].name
        last = _rewrite(graph, names, layer, fz)
        log.info("%s: %s -> ranks %s, MACs x%.3f, weight error %.4f%s", self.name, layer.where, fz.ranks, ratio,
                 error, " (whitened)" if layer.sigma is not None else "")
        _release(layer, fz)
        return _Done(layer, fz, last, target, error)

    def _refit(self, graph: gs.Graph, teacher: onnx.ModelProto, done: list[_Done], data: CalibSource,
               ctx: PassContext, result: PassResult) -> list[LayerStats]:
        """Least-squares refit of each last factor to the original node's output (the teacher's)."""
        if not self.opts["refit"]:
            return []
        targets = [LayerTarget(d.last, d.target) for d in done if _refittable(d.layer)]
        if not targets:
            return []
        student = serde.to_model(graph.toposort())
        fixed, stats = reconstruct_layers(student, teacher, targets, data, seed=ctx.seed, threads=1,
                                          max_positions=self.opts["max_positions"], progress=ctx.progress,
                                          holdout=self.opts["refit_holdout"])
        result.graph = serde.to_graph(fixed)
        return stats

    def _stats(self, result: PassResult, done: list[_Done], data_aware: bool, refits: list[LayerStats]) -> None:
        s = result.stats
        s["layers_factorized"] = len(done)
        s["layers_skipped"] = sum(1 for where, _ in result.declined if where != "calibration")
        s["params_before"] = sum(int(d.layer.weight.size) for d in done)
        s["params_after"] = sum(int(f.weight.size) for d in done for f in d.fz.factors)
        s["macs_before"] = sum(d.fz.macs[0] for d in done)
        s["macs_after"] = sum(d.fz.macs[1] for d in done)
        s["mean_rel_weight_error"] = float(np.mean([d.error for d in done])) if done else 0.0
        s["data_aware"] = int(data_aware)
        if data_aware and self.opts["refit"]:
            s["refit_skipped"] = len(done) - len(refits)
        if refits:
            s["refit_layers"] = len(refits)
            s["refit_rejected"] = sum(1 for r in refits if r.rejected)
            s["refit_error_before"] = float(np.mean([r.error_before for r in refits]))
            s["refit_error_after"] = float(np.mean([r.error_after for r in refits]))


def _release(layer: Layer, fz: Factorization) -> None:
    """Drop the arrays a rewritten layer no longer needs, keeping their shapes and dtypes.

    The original weight (now out of the graph unless shared), the float64 product and factors
    would otherwise live, for every layer, until the pass ends: on a big model more than the
    weights' size again. What the stats and the refit read later (``shape``, ``size``,
    ``dtype``) stays right: each array becomes a read-only, zero-byte broadcast of its shape.
    """
    layer.weight = _shape_only(layer.weight)
    fz.approx = _shape_only(fz.approx)
    for factor in fz.factors:
        factor.weight = _shape_only(factor.weight)


def _shape_only(array: np.ndarray) -> np.ndarray:
    """A zero-byte, read-only array with ``array``'s shape and dtype (its values are all zero)."""
    return np.broadcast_to(np.zeros((), dtype=array.dtype), array.shape)


def _refittable(layer: Layer) -> bool:
    """Whether :func:`reconstruct_layers` can refit the last factor (a constant, per-output bias)."""
    if layer.bias is None:
        return True
    if not isinstance(layer.bias, gs.Constant) or not isinstance(layer.bias.values, np.ndarray):
        return False
    b, n = layer.bias.values, layer.channels[1]
    return b.size == 1 or (b.size == n and b.shape[-1] == n)


def _rewrite(graph: gs.Graph, names: Names, layer: Layer, fz: Factorization) -> str:
    """Replace ``layer.node`` by the factors, in place in the node list; returns the last factor's name.

    The first factor reads the node's input, the last one writes the node's output tensor (so
    downstream and graph-output names are kept) and takes its bias. New constants are
    ``<node>_<suffix>_W`` (and ``_B``), intermediate tensors ``<node>_<suffix>_Y``.
    """
    node = layer.node
    index = next(i for i, n in enumerate(graph.nodes) if n is node)
    x, out = node.inputs[0], node.outputs[0]
    dtype = layer.weight.dtype
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.pop(index)
    new_nodes, current = [], x
    for i, f in enumerate(fz.factors):
        last = i == len(fz.factors) - 1
        name = names.fresh(f"{layer.where}_{f.suffix}")
        inputs = [current, gs.Constant(names.fresh(f"{name}_W"), np.ascontiguousarray(f.weight.astype(dtype)))]
        if f.bias is not None:
            inputs.append(gs.Constant(names.fresh(f"{name}_B"), np.ascontiguousarray(f.bias.astype(dtype))))
        if last and layer.bias is not None:
            inputs.append(layer.bias)
        y = out if last else gs.Variable(names.fresh(f"{name}_Y"), dtype=dtype)
        new_nodes.append(gs.Node(f.op, name, dict(f.attrs), inputs, [y]))
        current = y
    graph.nodes[index:index] = new_nodes
    return new_nodes[-1].name
