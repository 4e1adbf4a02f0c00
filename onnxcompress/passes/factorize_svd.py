"""Truncated-SVD factorization of Gemm, MatMul and 1×1 Conv (and, with ``spatial``, k×k Conv)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.graph import weight_layout
from onnxcompress.core.pass_api import Option, PassContext, PassResult, Slot, register
from onnxcompress.lowrank.factorize import (
    COMMON_REASONS,
    R_ATTRS,
    R_GROUPED,
    R_LAYOUT,
    Decline,
    Factor,
    Factorization,
    FactorLayer,
)
from onnxcompress.lowrank.linalg import (
    lowrank_factors,
    spatial_kernels,
    spatial_matrix,
    spatial_svd_macs,
    svd_macs,
)
from onnxcompress.passes._factorize import COMMON_OPTIONS, FactorizePass
from onnxcompress.quant.latency import LayerPair, measure_ratio

__all__ = ["DECLINE_REASONS", "LATENCY_TIMER", "R_KXK", "R_NOT_FASTER", "R_SPATIAL_RANK", "FactorizeSvd", "factor_pair"]

log = logging.getLogger(__name__)

R_KXK = "kxk_conv_needs_spatial"  # k×k conv without spatial=true
R_SPATIAL_RANK = "spatial_needs_2d_kernel"
R_NOT_FASTER = "not_faster"  # latency_aware: the factors do not run faster than the layer here

#: Every decline code :class:`FactorizeSvd` may give.
DECLINE_REASONS = COMMON_REASONS + (R_KXK, R_SPATIAL_RANK, R_NOT_FASTER)
#: ``latency_aware``: the factors must take less than ``1 - SPEEDUP_MARGIN`` of the layer's time.
SPEEDUP_MARGIN = 0.05
#: Context slot (given by the caller): ``timer(LayerPair) -> t_factors / t_layer`` replacing the
#: onnxruntime measurement of ``latency_aware`` (tests).
LATENCY_TIMER = Slot("factorize_svd_latency_timer", Callable, "the factorization latency timer",
                     "replaces latency_aware's timings")

_PAD_ATTRS = ("pads", "auto_pad", "strides", "dilations")


@register
class FactorizeSvd(FactorizePass):
    """Splits Gemm/MatMul/1×1 Conv (and k×k Conv with spatial=true) into two thinner layers by SVD.

    Before: ``y = x·W + b`` (Gemm ``alpha·op(B)``, MatMul ``B``, 1×1 Conv ``W[:, :, 0, 0]ᵀ``)
    After:  ``y = (x·A)·B + b``: Gemm→Gemm, MatMul→MatMul, 1×1 Conv (``C_in→r``, carrying the
    strides/pads/auto_pad) → 1×1 Conv (``r→C_out``, carrying the bias). With ``spatial=true`` a
    ``kh×kw`` Conv becomes a ``kh×1`` Conv (``C_in→r``; vertical stride/pads/dilation) followed
    by a ``1×kw`` Conv (``r→C_out``; horizontal stride/pads/dilation, the bias); ``auto_pad``
    goes on both (each pads only along its own kernel axis, which is exact).

    Math:
        ``M = U·S·Vᵀ`` (the layer as ``y = x·M``, ``M [in, out]``), ``A = U_r·√S_r`` and
        ``B = √S_r·V_rᵀ`` (Eckart–Young: the best rank-``r`` approximation in Frobenius norm).
        Spatial: ``M[(i, h), (o, w)] = W[o, i, h, w]`` of shape ``[C_in·kh, C_out·kw]``; the
        first conv is ``V[k, i, h, 0] = A[(i, h), k]``, the second ``H[o, k, 0, w] = B[k, (o, w)]``.
        Full rank is exact. Data-aware (calibration data): ``M`` is whitened by the input second
        moment ``Σ`` (Gemm/MatMul: input rows; 1×1 Conv: input channels; spatial: the
        ``(channel, row)`` columns of each im2col patch), ``A = Σ^{-1/2}·U_r·√S_r`` from the SVD of
        ``Σ^{1/2}·M``, and the last factor is refit by least squares to the original output.
        Gemm: ``alpha`` goes into ``A·B``; both Gemms keep ``transB`` (weights stored transposed
        when it is 1); the second keeps ``beta`` and ``C``. Before opset 11 the first Gemm gets a
        zero ``C``.

    Fires when:
        A Gemm (``transA`` 0) or MatMul has a constant 2-D float weight as input 1, or a Conv with
        ``group`` 1 has a constant weight with every kernel dim 1 (or, with ``spatial=true``, a
        2-D ``kh×kw`` kernel), both channel counts are ``>= min_channels``, the node is not in
        ``exclude``, and the chosen rank gives fewer than ``max_mac_ratio`` × the MACs.

    Declines:
        One code per candidate, from :data:`DECLINE_REASONS`: ``excluded``;
        ``weight_not_constant`` (also a constant data input); ``unsupported_layout`` (non-2-D
        Gemm/MatMul weight, non-float weight, empty conv output); ``unsupported_attributes``
        (``transA=1``, ``alpha=0``); ``grouped_conv`` (grouped or depthwise); ``tiny_layer``;
        ``kxk_conv_needs_spatial`` (a k×k conv without ``spatial=true``);
        ``spatial_needs_2d_kernel``; ``does_not_pay`` (detail: the MAC ratio and ranks);
        ``not_faster`` (``latency_aware``: a Gemm/MatMul whose two factors, timed on this machine
        in onnxruntime at the layer's rows, one thread, take more than 95 % of its time; detail the
        ratio and rank: **the output then depends on the machine**);
        ``calibration_statistics_failed`` (then plain).
        A weight shared with other nodes is never edited: the factors are new constants, the
        other users keep the original (``shared_copied``).

    Stats:
        ``layers_factorized``, ``layers_skipped``, ``params_before``/``params_after`` and
        ``macs_before``/``macs_after`` of the factorized layers (batch 1, other symbolic input
        dims at the run's ``ctx.dims``; ``macs_estimated``: layers whose input shape inference
        could not tell, counted at a guessed size),
        ``mean_rel_weight_error`` (``‖W − Ŵ‖/‖W‖`` before any refit), ``data_aware``,
        ``shared_copied``; with a refit ``refit_layers``, ``refit_error_before``/``_after``
        (relative output error of the last factors on the calibration data), ``refit_skipped``;
        ``whitening_skipped`` (layers whose input statistics exceed ``MAX_GRAM_DIM`` per side).
    """

    name = "factorize_svd"
    ops = frozenset({"Gemm", "MatMul", "Conv"})
    reads = (*FactorizePass.reads, LATENCY_TIMER)
    options: ClassVar[Mapping[str, Option]] = {
        **COMMON_OPTIONS, "spatial": Option(bool, False, "factorize k×k Conv into k×1 then 1×k"),
        "latency_aware": Option(bool, False, "Gemm/MatMul: time the two factors against the layer here "
                                             "(float, onnxruntime, 1 thread); decline those not faster")}

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """:meth:`FactorizePass.run`, with this run's latency timings (``latency_aware``) cached by shape."""
        self._timed: dict[tuple[int, int, int, int], float] = {}
        return super().run(graph, ctx)

    def slower(self, layer: FactorLayer, fz: Factorization, ctx: PassContext) -> tuple[str, str] | None:
        """``latency_aware``: a Gemm/MatMul whose factors do not run faster than it here (one timing
        per distinct ``(rows, in, out, rank)``) is declined ``not_faster``."""
        if not self.opts["latency_aware"] or layer.kind not in ("gemm", "matmul"):
            return None
        (k, n), r = layer.channels, fz.ranks[0]
        key = (max(layer.rows, 1), k, n, r)
        cache = self._timed
        if key not in cache:
            timer = ctx.get(LATENCY_TIMER) or (lambda pair: measure_ratio(pair, rounds=30))
            cache[key] = float(timer(factor_pair(*key, seed=ctx.seed)))
        ratio = cache[key]
        if ratio < 1.0 - SPEEDUP_MARGIN:
            return None
        return R_NOT_FASTER, f"{ratio:.2f}× the layer's time at rank {r} ({key[0]} rows, {k}→{n})"

    def classify(self, node: gs.Node, weight: np.ndarray) -> str:
        """``gemm``, ``matmul``, ``conv1x1`` or ``spatial``; raises :class:`Decline` otherwise."""
        if node.op in ("Gemm", "MatMul"):
            if weight.ndim != 2:
                raise Decline(R_LAYOUT)
            if node.op == "Gemm" and (weight_layout(node).trans_a or float(node.attrs.get("alpha", 1.0)) == 0):
                raise Decline(R_ATTRS)
            return node.op.lower()
        if weight.ndim < 3:
            raise Decline(R_LAYOUT)
        if weight_layout(node).group != 1:
            raise Decline(R_GROUPED)
        if all(k == 1 for k in weight.shape[2:]):
            return "conv1x1"
        if not self.opts["spatial"]:
            raise Decline(R_KXK)
        if weight.ndim != 4:
            raise Decline(R_SPATIAL_RANK)
        return "spatial"

    def gram_kind(self, layer: FactorLayer) -> str:
        """Spatial SVD whitens ``(channel, row)`` columns; everything else the full input."""
        return "vertical" if layer.kind == "spatial" else "full"

    def factorize(self, layer: FactorLayer) -> Factorization:
        """The two factors of ``layer``."""
        if layer.kind == "gemm":
            return self._gemm(layer)
        if layer.kind == "matmul":
            return self._matmul(layer)
        if layer.kind == "conv1x1":
            return self._conv1x1(layer)
        return self._spatial(layer)

    def _factors(self, layer: FactorLayer, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, _ = lowrank_factors(m, self.rule, sigma=layer.sigma, damp=self.opts["damp"])
        return a, b

    def _gemm(self, layer: FactorLayer) -> Factorization:
        trans = int(layer.attrs.get("transB", 0))
        alpha = float(layer.attrs.get("alpha", 1.0))
        w = layer.weight.astype(np.float64)
        a, b = self._factors(layer, alpha * (w.T if trans else w))
        r = a.shape[1]
        first = {"transB": trans} if trans else {}
        second = dict(first)
        if layer.bias is not None:
            second["beta"] = float(layer.attrs.get("beta", 1.0))
        zero_c = np.zeros(r) if layer.opset < 11 else None
        factors = [Factor("Gemm", "svd_a", a.T if trans else a, first, zero_c),
                   Factor("Gemm", "svd_b", b.T if trans else b, second)]
        approx = (a @ b) / alpha
        k, n = layer.channels
        return Factorization(factors, approx.T if trans else approx, (r,), svd_macs(k, n, r, layer.rows))

    def _matmul(self, layer: FactorLayer) -> Factorization:
        a, b = self._factors(layer, layer.weight.astype(np.float64))
        k, n = layer.channels
        factors = [Factor("MatMul", "svd_a", a, {}), Factor("MatMul", "svd_b", b, {})]
        return Factorization(factors, a @ b, (a.shape[1],), svd_macs(k, n, a.shape[1], layer.rows))

    def _conv1x1(self, layer: FactorLayer) -> Factorization:
        w = layer.weight
        cout, cin, ones = w.shape[0], w.shape[1], (1,) * (w.ndim - 2)
        a, b = self._factors(layer, w.astype(np.float64).reshape(cout, cin).T)
        r = a.shape[1]
        first = {k: v for k, v in layer.attrs.items() if k in _PAD_ATTRS}
        first["kernel_shape"] = list(ones)
        factors = [Factor("Conv", "svd_a", a.T.reshape(r, cin, *ones), first),
                   Factor("Conv", "svd_b", b.T.reshape(cout, r, *ones), {"kernel_shape": list(ones)})]
        positions = int(np.prod(layer.out_spatial))
        return Factorization(factors, (a @ b).T.reshape(w.shape), (r,), svd_macs(cin, cout, r, positions))

    def _spatial(self, layer: FactorLayer) -> Factorization:
        w = layer.weight
        cout, cin, kh, kw = w.shape
        a, b = self._factors(layer, spatial_matrix(w))
        r = a.shape[1]
        vertical, horizontal = spatial_kernels(a, b, w.shape)
        first, second = _split_attrs(layer.attrs, (kh, kw))
        factors = [Factor("Conv", "svd_v", vertical, first), Factor("Conv", "svd_h", horizontal, second)]
        approx = (a @ b).reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3)
        w_in, (h_out, w_out) = layer.in_spatial[1], layer.out_spatial
        macs = spatial_svd_macs(cin, cout, (kh, kw), r, h_out * w_in, h_out * w_out)
        return Factorization(factors, approx, (r,), macs)


def factor_pair(rows: int, k: int, n: int, r: int, seed: int = 0) -> LayerPair:
    """``x [rows, k] · W [k, n]`` and ``(x · A [k, r]) · B [r, n]`` as two runnable models (random
    weights: float MatMul time does not depend on the values); the pair's second model is the factors."""
    rng = np.random.default_rng(seed)
    models = []
    for shapes in (((k, n),), ((k, r), (r, n))):
        x = gs.Variable("x", np.float32, [rows, k])
        nodes, cur = [], x
        for i, shape in enumerate(shapes):
            out = gs.Variable(f"y{i}", np.float32, [rows, shape[1]])
            w = gs.Constant(f"w{i}", rng.standard_normal(shape).astype(np.float32))
            nodes.append(gs.Node("MatMul", f"mm{i}", {}, [cur, w], [out]))
            cur = out
        models.append(serde.to_model(gs.Graph(nodes=nodes, inputs=[x], outputs=[cur], opset=17)))
    feeds = {"x": rng.standard_normal((rows, k)).astype(np.float32)}
    return LayerPair(models[0], models[1], feeds, feeds)


def _split_attrs(attrs: dict, kernel: tuple[int, int]) -> tuple[dict, dict]:
    """Conv attributes of the ``kh×1`` and ``1×kw`` factors of a ``kh×kw`` Conv.

    The first conv takes the vertical stride, dilation and pads, the second the horizontal ones;
    ``auto_pad`` (SAME_UPPER/SAME_LOWER/VALID) goes on both, since each pads only along its own
    kernel axis with the original stride there.
    """
    kh, kw = kernel
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    first = {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1]}
    second = {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw]}
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad != "NOTSET":
        first["auto_pad"] = second["auto_pad"] = auto_pad
    else:
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        first["pads"] = [top, 0, bottom, 0]
        second["pads"] = [0, left, 0, right]
    return first, second
