"""Tucker-2 factorization of k×k Conv: 1×1 (C_in→r_in), k×k core (r_in→r_out), 1×1 (r_out→C_out)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.pass_api import Option, register
from onnxcompress.lowrank.factorize import (
    COMMON_REASONS,
    R_POINTWISE,
    Factor,
    Factorization,
    FactorLayer,
    require_dense_kxk,
)
from onnxcompress.lowrank.linalg import hooi, hosvd, mode_dot, psd_sqrt, tucker2_macs, tucker_to_tensor
from onnxcompress.passes._factorize import COMMON_OPTIONS, FactorizePass

__all__ = [
    "FactorizeTucker",
    "DECLINE_REASONS",
]

log = logging.getLogger(__name__)


#: Every decline code :class:`FactorizeTucker` may give.
DECLINE_REASONS = COMMON_REASONS + (R_POINTWISE,)

_CORE_ATTRS = ("pads", "auto_pad", "strides", "dilations", "kernel_shape")


@register
class FactorizeTucker(FactorizePass):
    """Splits a k×k Conv into 1×1 → k×k core → 1×1 by a Tucker-2 decomposition (HOSVD + HOOI).

    Before: ``y = Conv(x, W[C_out, C_in, kh, kw], b)``
    After:  ``y = Conv1x1(Conv_k×k(Conv1x1(x, U_inᵀ), G), U_out, b)``: a 1×1 Conv
    ``C_in → r_in`` (stride 1, no pads), the core ``G [r_out, r_in, kh, kw]`` with the original
    strides/pads/auto_pad/dilations, and a 1×1 Conv ``r_out → C_out`` carrying the bias.

    Math:
        ``W ≈ G ×₀ U_out ×₁ U_in`` with orthonormal ``U_out [C_out, r_out]``, ``U_in [C_in, r_in]``
        and ``G = W ×₀ U_outᵀ ×₁ U_inᵀ``. HOSVD start (top left singular vectors of the mode-0
        and mode-1 unfoldings), then ``iters`` HOOI sweeps, each of which can only lower
        ``‖W − Ŵ‖² = ‖W‖² − ‖G‖²``. Ranks come from the unfoldings' spectra, per mode: ``energy``
        keeps that share of each unfolding's squared singular values, ``vbmf`` estimates each
        mode's rank by empirical VBMF on the unfolding, ``rank``/``rank_ratio`` apply to both
        modes; each is rounded up to ``round_to`` and capped at ``C_in``/``C_out``. Full ranks are
        exact. Data-aware (calibration data): the input mode is whitened by the input channel
        second moment ``Σ_c`` (averaged over kernel offsets): the decomposition is of
        ``W ×₁ Σ_c^{1/2}`` and ``U_in = Σ_c^{-1/2}·U_in'``; then the last 1×1 Conv is refit by
        least squares to the original output.

    Fires when:
        A Conv with ``group`` 1 has a constant float weight with at least one kernel dim > 1
        (any spatial rank), ``C_in`` and ``C_out`` are ``>= min_channels``, the node is not in
        ``exclude``, and ``1×1 + core + 1×1`` MACs (the first 1×1 runs at the input resolution)
        are below ``max_mac_ratio`` × the original's.

    Declines:
        One code per candidate, from :data:`DECLINE_REASONS`: ``excluded``;
        ``weight_not_constant``; ``unsupported_layout``; ``grouped_conv`` (grouped or depthwise);
        ``pointwise_conv`` (1x1: use factorize_svd); ``tiny_layer``; ``does_not_pay`` (detail:
        the MAC ratio and ranks); ``calibration_statistics_failed``.
        Shared weights are never edited: the factors are new constants (``shared_copied``).

    Stats:
        As :class:`~onnxcompress.passes.factorize_svd.FactorizeSvd`: ``layers_factorized``,
        ``layers_skipped``, params and MACs before/after of the factorized layers,
        ``mean_rel_weight_error``, ``data_aware``, refit errors.
    """

    name = "factorize_tucker"
    ops = frozenset({"Conv"})
    options: ClassVar[Mapping[str, Option]] = {
        **COMMON_OPTIONS, "iters": Option(int, 5, "HOOI sweeps after the HOSVD start (0: HOSVD only)", interval="[0, inf)")}

    def classify(self, node: gs.Node, weight: np.ndarray) -> str:
        """``tucker`` for a dense Conv with a non-1×1 kernel; raises :class:`Decline` otherwise."""
        require_dense_kxk(node, weight)
        return "tucker"

    def gram_kind(self, layer: FactorLayer) -> str:
        """The input channel covariance."""
        return "channel"

    def factorize(self, layer: FactorLayer) -> Factorization:
        """Tucker-2 factors of ``layer`` (whitened input mode when ``layer.sigma`` is set)."""
        w = layer.weight.astype(np.float64)
        root = inv = None
        if layer.sigma is not None:
            root, inv = psd_sqrt(layer.sigma, self.opts["damp"])
            w = mode_dot(w, root, 1)
        (f_out, f_in), ranks = self._ranks(w)
        init = [f_out[:, :ranks[0]], f_in[:, :ranks[1]]]
        core, (u_out, u_in) = hooi(w, (0, 1), ranks, self.opts["iters"], init=init)
        if inv is not None:
            u_in = inv @ u_in
        return self._factors(layer, core, u_out, u_in)

    def _ranks(self, w: np.ndarray) -> tuple[list[np.ndarray], tuple[int, int]]:
        """Full HOSVD factors of both modes and the ``(r_out, r_in)`` the rule picks from their spectra."""
        cout, cin = w.shape[:2]
        factors, (s_out, s_in) = hosvd(w, (0, 1), (cout, cin))
        rest = w.size // (cout * cin)
        return factors, (self.rule.select(s_out, (cout, cin * rest), cout),
                         self.rule.select(s_in, (cin, cout * rest), cin))

    def _factors(self, layer: FactorLayer, core: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> Factorization:
        w = layer.weight
        cout, cin, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        r_out, r_in = u_out.shape[1], u_in.shape[1]
        ones = [1] * len(kernel)
        core_attrs = {k: v for k, v in layer.attrs.items() if k in _CORE_ATTRS}
        core_attrs["kernel_shape"] = list(kernel)
        factors = [
            Factor("Conv", "tucker_in", u_in.T.reshape(r_in, cin, *ones), {"kernel_shape": ones}),
            Factor("Conv", "tucker_core", core, core_attrs),
            Factor("Conv", "tucker_out", u_out.reshape(cout, r_out, *ones), {"kernel_shape": ones}),
        ]
        approx = tucker_to_tensor(core, [u_out, u_in], (0, 1))
        macs = tucker2_macs(cin, cout, kernel, r_in, r_out, int(np.prod(layer.in_spatial)),
                            int(np.prod(layer.out_spatial)))
        return Factorization(factors, approx, (r_in, r_out), macs)
