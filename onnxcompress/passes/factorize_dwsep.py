"""Approximate a dense k×k Conv by a depthwise k×k Conv (multiplier m) and a pointwise 1×1 Conv."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.pass_api import register
from onnxcompress.lowrank.factorize import (
    COMMON_REASONS,
    R_POINTWISE,
    Factor,
    Factorization,
    FactorLayer,
    require_dense_kxk,
)
from onnxcompress.lowrank.linalg import dwsep_macs, psd_sqrt, split_factors, svd
from onnxcompress.passes._factorize import COMMON_OPTIONS, FactorizePass

__all__ = [
    "FactorizeDwsep",
    "DECLINE_REASONS",
    "round_multiplier",
]

log = logging.getLogger(__name__)


#: Every decline code :class:`FactorizeDwsep` may give.
DECLINE_REASONS = COMMON_REASONS + (R_POINTWISE,)

_DW_ATTRS = ("pads", "auto_pad", "strides", "dilations", "kernel_shape")


def round_multiplier(m: int, c_in: int, multiple: int, full: int) -> int:
    """The smallest ``m' >= m`` (``<= full``) with ``C_in·m'`` a multiple of ``multiple``, else ``m``.

    ``round_to`` applies to the depthwise output channel count ``C_in·m``, not to ``m`` itself
    (whose full value is only ``min(kh·kw, C_out)``).
    """
    m = max(1, min(int(m), int(full)))
    for candidate in range(m, full + 1):
        if (c_in * candidate) % max(1, multiple) == 0:
            return candidate
    return m


@register
class FactorizeDwsep(FactorizePass):
    """Replaces a dense k×k Conv by depthwise k×k (C_in→C_in·m) + pointwise 1×1, per-channel SVD.

    Before: ``y = Conv(x, W[C_out, C_in, kh, kw], b)``
    After:  ``y = Conv1x1(Conv_dw(x, D[C_in·m, 1, kh, kw], group=C_in), P[C_out, C_in·m, 1, 1], b)``:
    the depthwise Conv keeps the original strides/pads/auto_pad/dilations; depthwise output
    channel ``c·m + t`` is filter ``t`` of input channel ``c``; the pointwise Conv carries the bias.

    Math:
        For each input channel ``c``: ``M_c = W[:, c]`` reshaped ``[kh·kw, C_out]`` (the layer on
        that channel's patch, ``y = x_c·M_c``) ``≈ A_c·B_c`` by a rank-``m`` SVD,
        ``A_c = U_m·√S_m`` (``m`` spatial filters: ``D[c·m + t] = A_c[:, t]``) and
        ``B_c = √S_m·V_mᵀ`` (``m`` pointwise columns: ``P[:, c·m + t] = B_c[t]``). One ``m`` for
        all channels: ``energy`` keeps that share of ``Σ_c ‖W[:, c]‖²`` in total, ``vbmf`` takes
        the mean of the per-channel VBMF estimates (rounded up), ``rank`` is ``m`` itself,
        ``rank_ratio`` a fraction of the full ``min(kh·kw, C_out)``; ``m`` is then raised until
        ``C_in·m`` is a multiple of ``round_to`` (when that is possible below the full ``m``).
        ``m = min(kh·kw, C_out)`` is exact. Data-aware (calibration data): each ``M_c`` is whitened
        by the second moment ``Σ_c [kh·kw, kh·kw]`` of channel ``c``'s patches
        (``A_c = Σ_c^{-1/2}·U_m·√S_m``); then the pointwise Conv is refit by least squares.

    Fires when:
        A Conv with ``group`` 1 has a constant float weight with at least one kernel dim > 1
        (any spatial rank), ``C_in`` and ``C_out`` are ``>= min_channels``, the node is not in
        ``exclude``, and ``C_in·m·(kh·kw + C_out)`` MACs per position are below
        ``max_mac_ratio`` × ``C_in·C_out·kh·kw``.

    Declines:
        One code per candidate, from :data:`DECLINE_REASONS`: ``excluded``;
        ``weight_not_constant``; ``unsupported_layout``; ``grouped_conv`` (grouped or depthwise);
        ``pointwise_conv`` (1x1: use factorize_svd); ``tiny_layer``; ``does_not_pay`` (detail:
        the MAC ratio and ``m``); ``calibration_statistics_failed``.
        Shared weights are never edited: the factors are new constants (``shared_copied``).

    Stats:
        As :class:`~onnxcompress.passes.factorize_svd.FactorizeSvd`.
    """

    name = "factorize_dwsep"
    ops = frozenset({"Conv"})
    options = COMMON_OPTIONS

    def classify(self, node: gs.Node, weight: np.ndarray) -> str:
        """``dwsep`` for a dense Conv with a non-1×1 kernel; raises :class:`Decline` otherwise."""
        require_dense_kxk(node, weight)
        return "dwsep"

    def gram_kind(self, layer: FactorLayer) -> str:
        """One patch second moment per input channel."""
        return "blocks"

    def factorize(self, layer: FactorLayer) -> Factorization:
        """Depthwise and pointwise factors of ``layer``."""
        w = layer.weight.astype(np.float64)
        cout, cin, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        k = int(np.prod(kernel))
        full = min(k, cout)
        mats = [w[:, c].reshape(cout, k).T for c in range(cin)]
        inverses: list[np.ndarray | None] = [None] * cin
        if layer.sigma is not None:
            roots = [psd_sqrt(layer.sigma[c], self.opts["damp"]) for c in range(cin)]
            mats = [root @ m for (root, _), m in zip(roots, mats)]
            inverses = [inv for _, inv in roots]
        svds = [svd(m) for m in mats]
        raw = self.rule.raw_joint([s for _, s, _ in svds], (k, cout), full)
        m = round_multiplier(raw, cin, self.rule.round_to, full)
        return self._factors(layer, svds, inverses, m)

    def _factors(self, layer: FactorLayer, svds: list, inverses: list, m: int) -> Factorization:
        w = layer.weight
        cout, cin, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        depthwise = np.zeros((cin * m, 1, *kernel))
        pointwise = np.zeros((cout, cin * m))
        approx = np.zeros(w.shape)
        for c, ((u, s, vt), inv) in enumerate(zip(svds, inverses)):
            a, b = split_factors(u, s, vt, m)
            if inv is not None:
                a = inv @ a
            depthwise[c * m:(c + 1) * m, 0] = a.T.reshape(m, *kernel)
            pointwise[:, c * m:(c + 1) * m] = b.T
            approx[:, c] = (a @ b).T.reshape(cout, *kernel)
        ones = [1] * len(kernel)
        dw_attrs = {key: v for key, v in layer.attrs.items() if key in _DW_ATTRS}
        dw_attrs.update(kernel_shape=list(kernel), group=cin)
        factors = [Factor("Conv", "dw", depthwise, dw_attrs),
                   Factor("Conv", "pw", pointwise.reshape(cout, cin * m, *ones), {"kernel_shape": ones})]
        macs = dwsep_macs(cin, cout, kernel, m, int(np.prod(layer.out_spatial)))
        return Factorization(factors, approx, (m,), macs)
