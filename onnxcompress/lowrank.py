"""Low-rank factorization shared by the ``factorize_*`` passes: the math, and the graph-side driver.

The first part is numpy/scipy on float64 arrays: truncated SVD, rank rules, HOSVD/HOOI,
empirical VBMF, the spatial reshape, MAC accounting of factorized layers, input statistics and
whitening. The second part (:class:`FactorizePass`) is what the three passes share on the graph:
candidate scan and declines, input shapes, calibration statistics, rewriting one node into its
factors, the least-squares refit of the last factor, and the stats.

Conventions:
    A linear layer is written ``y = x · M`` with ``M`` of shape ``[features in, features out]``
    (Gemm: ``alpha · op(B)``; 1×1 Conv: ``W[:, :, 0, 0]ᵀ``; spatial SVD: :func:`spatial_matrix`).
    A rank-``r`` factorization is ``M ≈ A · B`` with ``A [in, r]`` (the first layer) and
    ``B [r, out]`` (the second). Singular values are split evenly, ``A = U_r·√S_r`` and
    ``B = √S_r·V_rᵀ``, so both factors have comparable scales in float32.

Data-aware whitening:
    With the layer's input second moment ``Σ = E[x xᵀ]`` (``x`` an input row, or an im2col patch
    for a Conv), the expected output error of an approximation ``M̂`` is
    ``E‖x(M − M̂)‖² = ‖Σ^{1/2}(M − M̂)‖_F²``. Its best rank-``r`` minimizer is
    ``M̂ = Σ^{-1/2}·[Σ^{1/2} M]_r`` (Eckart–Young applied to the whitened matrix), so the first
    factor becomes ``A = Σ^{-1/2} U_r √S_r`` where ``U S Vᵀ`` is the SVD of ``Σ^{1/2} M``. ``Σ``
    is damped, ``Σ + δ·mean(eig Σ)·I``, so directions that the calibration data never excites
    are still approximated sensibly (``δ = damp``, default 0.01).

VBMF:
    :func:`vbmf_rank` is the analytic empirical variational Bayesian matrix factorization of
    Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
    variational Bayesian matrix factorization" (JMLR 14, 2013): for ``V [L, M]`` (``L ≤ M``,
    ``α = L/M``) with singular values ``γ_h``, the noise variance is
    ``σ̂² = argmin Ω(σ²)`` over ``[σ̲², σ̄²]`` with
    ``Ω(σ²) = L·log σ² + Σ_h γ_h²/(Mσ²) + Σ_{h: x_h > x̲} ψ₁(x_h)``, ``x_h = γ_h²/(Mσ²)``,
    ``ψ₁(x) = log(τ+1) + α·log(τ/α + 1) − τ``, ``τ(x) = ½(x − 1 − α + √((x − 1 − α)² − 4α))``,
    ``x̲ = (1 + τ̲)(1 + α/τ̲)`` and ``τ̲`` the zero of ``Φ(τ) + Φ(τ/α)``,
    ``Φ(z) = log(z + 1)/z − ½``; the estimated rank is the number of ``γ_h`` above
    ``γ̲ = σ̂·√(M·x̲)``.

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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
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

#: Energy share kept when no rank rule is given.
DEFAULT_ENERGY = 0.9
#: The rank rules, in the order they are listed in messages.
RULES = ("rank", "rank_ratio", "energy", "vbmf")


# --------------------------------------------------------------------------- rank rules


def round_rank(rank: int, multiple: int, full: int) -> int:
    """``rank`` rounded up to a multiple of ``multiple``, clamped to ``[1, full]``."""
    rank = max(1, int(rank))
    if multiple > 1:
        rank = -(-rank // multiple) * multiple
    return max(1, min(rank, int(full)))


@dataclass(frozen=True)
class RankRule:
    """Which rank to keep, from a layer's singular values.

    Attributes:
        kind: ``rank`` (fixed), ``rank_ratio`` (fraction of the full rank, rounded up),
            ``energy`` (smallest rank keeping this share of ``Σ s²``) or ``vbmf``.
        value: The rank, ratio or energy share (unused for ``vbmf``).
        round_to: Ranks are rounded up to a multiple of this (then capped at the full rank).
    """

    kind: str = "energy"
    value: float = DEFAULT_ENERGY
    round_to: int = 8

    @classmethod
    def from_options(cls, opts: Mapping[str, object]) -> RankRule:
        """The one rule set in ``opts`` (``rank``, ``rank_ratio``, ``energy``, ``vbmf``; default energy 0.9).

        Raises:
            InputError: More than one rule, or a value out of range.
        """
        given = [k for k in RULES if opts.get(k) is not None and opts.get(k) is not False]
        if len(given) > 1:
            raise InputError(f"rank rules {', '.join(given)} conflict: give exactly one of {', '.join(RULES)}")
        round_to = int(1 if opts.get("round_to") is None else opts["round_to"])
        if round_to < 1:
            raise InputError(f"option round_to={round_to}: must be >= 1")
        kind = given[0] if given else "energy"
        value = 1.0 if kind == "vbmf" else float(DEFAULT_ENERGY if not given else opts[kind])
        if kind == "rank" and (value < 1 or not float(value).is_integer()):
            raise InputError(f"option rank={opts.get('rank')}: must be an integer >= 1")
        if kind in ("rank_ratio", "energy") and not 0.0 < value <= 1.0:
            raise InputError(f"option {kind}={value}: must lie in (0, 1]")
        return cls(kind, value, round_to)

    def raw(self, s: np.ndarray, shape: tuple[int, int], full: int | None = None) -> int:
        """The rank before rounding, for singular values ``s`` of a matrix of ``shape``."""
        full = min(shape) if full is None else full
        if self.kind == "rank":
            return int(self.value)
        if self.kind == "rank_ratio":
            return math.ceil(self.value * full - 1e-9)
        if self.kind == "energy":
            return energy_rank(s, self.value)
        return vbmf_rank(s, shape)

    def raw_joint(self, spectra: Sequence[np.ndarray], shape: tuple[int, int], full: int) -> int:
        """One rank shared by several matrices of ``shape`` (e.g. per-channel kernels).

        ``energy`` counts the kept energy over all of them together; ``vbmf`` takes the mean of the
        per-matrix estimates, rounded up; the other rules do not depend on the spectra.
        """
        if self.kind == "energy":
            s2 = np.stack([np.pad(s, (0, full - len(s))) ** 2 for s in spectra])
            total = float(s2.sum())
            if total <= 0:
                return 1
            kept = np.cumsum(s2.sum(axis=0)) / total
            return int(np.searchsorted(kept, self.value - 1e-12) + 1)
        if self.kind == "vbmf":
            return math.ceil(float(np.mean([vbmf_rank(s, shape) for s in spectra])) - 1e-9)
        return self.raw(np.zeros(0), shape, full)

    def select(self, s: np.ndarray, shape: tuple[int, int], full: int | None = None) -> int:
        """The rank to keep: :meth:`raw`, rounded up to ``round_to`` and capped at ``full``."""
        full = min(shape) if full is None else full
        return round_rank(self.raw(s, shape, full), self.round_to, full)

    def describe(self) -> str:
        """``energy=0.9``, ``rank=16``, ``vbmf``..."""
        if self.kind == "vbmf":
            return "vbmf"
        value = int(self.value) if self.kind == "rank" else self.value
        return f"{self.kind}={value}"


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i<r} s_i² ≥ energy · Σ s²`` (1 for an all-zero spectrum)."""
    s2 = np.asarray(s, np.float64) ** 2
    total = float(s2.sum())
    if total <= 0:
        return 1
    kept = np.cumsum(s2) / total
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s2)))


# --------------------------------------------------------------------------- SVD


def svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``m = U·diag(s)·Vᵀ`` in float64 with a deterministic sign per component.

    Each left singular vector is flipped so that its largest-magnitude entry is positive (and
    the right one with it), so equal inputs give equal factors on any LAPACK.
    """
    u, s, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    if u.size:
        idx = np.argmax(np.abs(u), axis=0)
        signs = np.sign(u[idx, np.arange(u.shape[1])])
        signs[signs == 0] = 1.0
        u, vt = u * signs, vt * signs[:, None]
    return u, s, vt


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, B) = (U_r·√S_r, √S_r·V_rᵀ)``, zero-padded when ``rank`` exceeds ``len(s)``."""
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    if rank > r:
        a = np.pad(a, ((0, 0), (0, rank - r)))
        b = np.pad(b, ((0, rank - r), (0, 0)))
    return a, b


def truncated_svd(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors ``(A [in, r], B [r, out])`` of ``m`` in the Frobenius norm."""
    u, s, vt = svd(m)
    return split_factors(u, s, vt, rank)


def relative_error(exact: np.ndarray, approx: np.ndarray) -> float:
    """``‖exact − approx‖_F / ‖exact‖_F`` (0 for an all-zero ``exact``)."""
    norm = float(np.linalg.norm(exact))
    return float(np.linalg.norm(np.asarray(exact, np.float64) - approx)) / norm if norm > 0 else 0.0


def psd_sqrt(sigma: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ_d^{1/2}, Σ_d^{-1/2})`` of the damped ``Σ_d = Σ + damp·mean(eig Σ)·I`` (symmetric roots).

    An all-zero ``Σ`` (or ``damp`` 0 with a singular one) gives identity roots for the dead part:
    eigenvalues that stay at 0 are treated as 1, i.e. not whitened.
    """
    sigma = np.asarray(sigma, np.float64)
    lam, q = np.linalg.eigh((sigma + sigma.T) / 2)
    lam = np.clip(lam, 0.0, None)
    mean = float(lam.mean()) if lam.size else 0.0
    lam = lam + damp * mean
    lam[lam <= 1e-300] = max(mean, 1.0) if mean > 0 else 1.0
    root = np.sqrt(lam)
    return (q * root) @ q.T, (q / root) @ q.T


def lowrank_factors(m: np.ndarray, rank_of: RankRule | int, *, sigma: np.ndarray | None = None,
                    damp: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-``r`` factors of ``m [in, out]``, whitened by ``sigma [in, in]`` when given.

    Args:
        m: The matrix, ``y = x · m``.
        rank_of: A fixed rank or a :class:`RankRule` applied to the (whitened) spectrum.
        sigma: Input second moment ``E[x xᵀ]``; ``None`` for plain (weight-space) SVD.
        damp: Whitening damping (see :func:`psd_sqrt`).

    Returns:
        ``(A [in, r], B [r, out], s)`` with ``s`` the (whitened) singular values.
    """
    root = inv = None
    target = np.asarray(m, np.float64)
    if sigma is not None:
        root, inv = psd_sqrt(sigma, damp)
        target = root @ target
    u, s, vt = svd(target)
    rank = rank_of if isinstance(rank_of, int) else rank_of.select(s, target.shape)
    a, b = split_factors(u, s, vt, rank)
    return (a if inv is None else inv @ a), b, s


# --------------------------------------------------------------------------- input statistics


class GramAccumulator:
    """Streaming second moment of a layer's input features, in the layout a factorization needs.

    Rows ``X [n, C·k]`` are im2col patches (channel-major, like a Conv weight flattened over its
    last axes; ``k = prod(kernel)``, 1 for Gemm/MatMul).

    Kinds:
        ``full``: ``E[x xᵀ]`` over the whole patch ``[C·k, C·k]``.
        ``channel``: the channel covariance ``[C, C]`` averaged over kernel offsets (Tucker's
            input mode).
        ``vertical``: ``[C·kh, C·kh]`` over ``(channel, row)`` columns of a 2-D patch, averaged
            over the kernel's columns (the first conv of a spatial SVD).
        ``blocks``: one ``[k, k]`` block per channel, ``[C, k, k]`` (depthwise filters).
    """

    KINDS = ("full", "channel", "vertical", "blocks")

    def __init__(self, kind: str, channels: int, kernel: Sequence[int] = ()):
        if kind not in self.KINDS:
            raise ValueError(f"unknown gram kind {kind!r}")
        if kind == "vertical" and len(kernel) != 2:
            raise ValueError("vertical grams need a 2-D kernel")
        self.kind, self.channels, self.kernel = kind, int(channels), tuple(int(k) for k in kernel)
        self.k = math.prod(self.kernel)
        self.sum: np.ndarray | None = None
        self.rows = 0

    @property
    def dim(self) -> int:
        """Side of the accumulated matrix (``full``: ``C·k``; ``blocks``: ``k``, times ``C`` blocks)."""
        return {"full": self.channels * self.k, "channel": self.channels,
                "vertical": self.channels * (self.kernel[0] if self.kernel else 1), "blocks": self.k}[self.kind]

    def add(self, x: np.ndarray) -> None:
        """Accumulate feature rows ``x [n, C·k]``."""
        x = np.asarray(x, np.float64).reshape(-1, self.channels * self.k)
        c, n = self.channels, x.shape[0]
        if self.kind == "full":
            part, rows = x.T @ x, n
        elif self.kind == "channel":
            xc = x.reshape(n, c, self.k).transpose(0, 2, 1).reshape(n * self.k, c)
            part, rows = xc.T @ xc, n * self.k
        elif self.kind == "vertical":
            kh, kw = self.kernel
            xv = x.reshape(n, c, kh, kw).transpose(0, 3, 1, 2).reshape(n * kw, c * kh)
            part, rows = xv.T @ xv, n * kw
        else:
            xb = x.reshape(n, c, self.k)
            part, rows = np.einsum("nck,ncl->ckl", xb, xb), n
        self.sum = part if self.sum is None else self.sum + part
        self.rows += rows

    def result(self) -> np.ndarray | None:
        """The mean second moment, or ``None`` if nothing was added."""
        if self.sum is None or self.rows == 0:
            return None
        return self.sum / self.rows


# --------------------------------------------------------------------------- Tucker


def unfold(t: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding ``[I_mode, prod(other dims)]`` (other axes in their order)."""
    return np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)


def mode_dot(t: np.ndarray, m: np.ndarray, mode: int) -> np.ndarray:
    """``t ×_mode m``: ``(t × m)[.., j, ..] = Σ_i m[j, i] · t[.., i, ..]``."""
    return np.moveaxis(np.tensordot(m, t, axes=(1, mode)), 0, mode)


def hosvd(t: np.ndarray, modes: Sequence[int], ranks: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Truncated HOSVD factors: the top ``ranks[n]`` left singular vectors of each unfolding.

    Returns:
        ``(factors, spectra)``: orthonormal ``[I_n, r_n]`` factors and each unfolding's singular values.
    """
    factors, spectra = [], []
    for mode, rank in zip(modes, ranks):
        u, s, _ = svd(unfold(t, mode))
        factors.append(_pad_columns(u[:, :rank], rank))
        spectra.append(s)
    return factors, spectra


def _pad_columns(u: np.ndarray, rank: int) -> np.ndarray:
    """``u`` with zero columns appended up to ``rank`` (a rank above the mode size)."""
    return u if u.shape[1] >= rank else np.pad(u, ((0, 0), (0, rank - u.shape[1])))


def _project(t: np.ndarray, factors: Sequence[np.ndarray], modes: Sequence[int], skip: int | None = None) -> np.ndarray:
    """``t ×_n U_nᵀ`` over every mode except ``skip``."""
    for i, (mode, u) in enumerate(zip(modes, factors)):
        if i != skip:
            t = mode_dot(t, u.T, mode)
    return t


def hooi(t: np.ndarray, modes: Sequence[int], ranks: Sequence[int], iters: int = 5, tol: float = 1e-7,
         init: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Tucker decomposition by higher-order orthogonal iteration (HOSVD start).

    Each sweep replaces every factor by the top singular vectors of the tensor projected on the
    other factors, which maximizes ``‖core‖`` for that factor; since
    ``‖t − core × {U}‖² = ‖t‖² − ‖core‖²`` for orthonormal factors, the error never increases
    from the HOSVD start. Stops after ``iters`` sweeps or when ``‖core‖²`` grows by less than
    ``tol`` relative.

    Returns:
        ``(core, factors)``: ``core = t ×_n U_nᵀ`` over ``modes``, factors ``[I_n, r_n]``.
    """
    factors = list(init) if init is not None else hosvd(t, modes, ranks)[0]
    core = _project(t, factors, modes)
    energy = float(np.sum(core ** 2))
    for _ in range(max(0, iters)):
        for i, (mode, rank) in enumerate(zip(modes, ranks)):
            u, _, _ = svd(unfold(_project(t, factors, modes, skip=i), mode))
            factors[i] = _pad_columns(u[:, :rank], rank)
        core = _project(t, factors, modes)
        new = float(np.sum(core ** 2))
        done = new - energy <= tol * max(new, 1e-300)
        energy = new
        if done:
            break
    return core, factors


def tucker_to_tensor(core: np.ndarray, factors: Sequence[np.ndarray], modes: Sequence[int]) -> np.ndarray:
    """``core ×_n U_n`` over ``modes``."""
    for mode, u in zip(modes, factors):
        core = mode_dot(core, u, mode)
    return core


# --------------------------------------------------------------------------- VBMF


def _phi(z: float) -> float:
    return math.log1p(z) / z - 0.5


def _tau_lower(alpha: float) -> float:
    """``τ̲``: the zero of ``Φ(τ) + Φ(τ/α)`` in ``[√α, 3]``."""
    import scipy.optimize

    return float(scipy.optimize.brentq(lambda t: _phi(t) + _phi(t / alpha), math.sqrt(alpha), 3.0, xtol=1e-12))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.clip(d * d - 4.0 * alpha, 0.0, None)))


def _psi1(x: np.ndarray, alpha: float) -> np.ndarray:
    t = _tau(x, alpha)
    return np.log1p(t) + alpha * np.log1p(t / alpha) - t


def _omega(sigma2: float, g2: np.ndarray, m: int, alpha: float, xbar: float) -> float:
    """The EVB free energy as a function of the noise variance, up to constants."""
    x = g2 / (m * sigma2)
    value = len(g2) * math.log(sigma2) + float(x.sum())
    keep = x > xbar
    return value + float(_psi1(x[keep], alpha).sum())


def _noise_bounds(g2: np.ndarray, m: int, alpha: float, xbar: float) -> tuple[float, float]:
    l = len(g2)
    upper = float(g2.sum()) / (l * m)
    h_bar = min(math.ceil(l / (1.0 + alpha)) - 1, l - 1)
    lower = max(float(g2[h_bar]) / (m * xbar), float(g2[h_bar:].sum()) / (m * (l - h_bar)))
    return lower, upper


def _argmin_log(f, lower: float, upper: float, points: int = 200) -> float:
    """Global-ish minimizer of ``f`` on ``[lower, upper]``: a log grid, then a bounded refine."""
    import scipy.optimize

    if not lower < upper:
        return upper
    grid = np.geomspace(lower, upper, points)
    values = [f(v) for v in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, points - 1)]
    res = scipy.optimize.minimize_scalar(lambda v: f(math.exp(v)), bounds=(math.log(lo), math.log(hi)),
                                         method="bounded", options={"xatol": 1e-10})
    cand = math.exp(float(res.x))
    return cand if f(cand) <= values[best] else float(grid[best])


def evbmf(s: np.ndarray, shape: tuple[int, int]) -> tuple[int, float, float]:
    """Analytic empirical VBMF (Nakajima et al. 2013) from the singular values of a ``shape`` matrix.

    Args:
        s: Singular values (any order; missing ones are taken as 0).
        shape: The matrix shape.

    Returns:
        ``(rank, noise variance σ̂², threshold γ̲)``: components with ``γ_h > γ̲`` are kept.
    """
    l, m = sorted(int(d) for d in shape)
    g = np.zeros(l)
    vals = np.sort(np.asarray(s, np.float64))[::-1][:l]
    g[: len(vals)] = vals
    if l < 2 or g[0] <= 0:
        return (1 if l >= 1 and g[0] > 0 else 0), 0.0, 0.0
    alpha = l / m
    tau = _tau_lower(alpha)
    xbar = (1.0 + tau) * (1.0 + alpha / tau)
    g2 = g ** 2
    lower, upper = _noise_bounds(g2, m, alpha, xbar)
    sigma2 = _argmin_log(lambda v: _omega(v, g2, m, alpha, xbar), max(lower, upper * 1e-12), upper)
    threshold = math.sqrt(m * sigma2 * xbar)
    return int(np.sum(g > threshold)), sigma2, threshold


def vbmf_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """The EVBMF rank estimate (at least 1) of a ``shape`` matrix with singular values ``s``."""
    return max(1, evbmf(s, shape)[0])


# --------------------------------------------------------------------------- reshapes


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """``W [C_out, C_in, kh, kw]`` as ``M [C_in·kh, C_out·kw]``, ``M[(i, h), (o, w)] = W[o, i, h, w]``.

    A rank-``r`` factorization ``M ≈ A·B`` is a ``kh×1`` Conv ``C_in → r`` followed by a
    ``1×kw`` Conv ``r → C_out`` (see :func:`spatial_kernels`).
    """
    cout, cin, kh, kw = w.shape
    return np.asarray(w, np.float64).transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def spatial_kernels(a: np.ndarray, b: np.ndarray, w_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Conv kernels of spatial factors: ``V [r, C_in, kh, 1]`` from ``A`` and ``H [C_out, r, 1, kw]`` from ``B``."""
    cout, cin, kh, kw = w_shape
    r = a.shape[1]
    vertical = a.reshape(cin, kh, r).transpose(2, 0, 1)[..., None]
    horizontal = b.reshape(r, cout, kw).transpose(1, 0, 2)[:, :, None, :]
    return vertical, horizontal


# --------------------------------------------------------------------------- MAC accounting


def conv_macs(c_in: int, c_out: int, kernel: Sequence[int], positions: int, group: int = 1) -> int:
    """MACs of a Conv: ``positions · C_out · C_in/group · prod(kernel)``."""
    return int(positions) * int(c_out) * (int(c_in) // int(group)) * math.prod(kernel)


def svd_macs(k: int, n: int, rank: int, rows: int = 1) -> tuple[int, int]:
    """``(before, after)`` of ``[rows, k] · [k, n]`` split into ``[k, r] · [r, n]`` (also 1×1 Conv)."""
    return rows * k * n, rows * rank * (k + n)


def spatial_svd_macs(c_in: int, c_out: int, kernel: Sequence[int], rank: int, mid_positions: int,
                     out_positions: int) -> tuple[int, int]:
    """``(before, after)`` of a ``kh×kw`` Conv split into ``kh×1`` (at ``mid_positions``: output rows ×
    input columns) and ``1×kw`` (at the output positions)."""
    kh, kw = kernel
    before = conv_macs(c_in, c_out, kernel, out_positions)
    return before, conv_macs(c_in, rank, (kh, 1), mid_positions) + conv_macs(rank, c_out, (1, kw), out_positions)


def tucker2_macs(c_in: int, c_out: int, kernel: Sequence[int], r_in: int, r_out: int, in_positions: int,
                 out_positions: int) -> tuple[int, int]:
    """``(before, after)`` of Tucker-2: 1×1 ``C_in → r_in`` at the input resolution, the ``r_in → r_out``
    core at the output resolution, 1×1 ``r_out → C_out``."""
    before = conv_macs(c_in, c_out, kernel, out_positions)
    after = (conv_macs(c_in, r_in, (1,), in_positions) + conv_macs(r_in, r_out, kernel, out_positions)
             + conv_macs(r_out, c_out, (1,), out_positions))
    return before, after


def dwsep_macs(c_in: int, c_out: int, kernel: Sequence[int], multiplier: int, out_positions: int) -> tuple[int, int]:
    """``(before, after)`` of depthwise (``C_in → C_in·m``) + pointwise (``C_in·m → C_out``)."""
    before = conv_macs(c_in, c_out, kernel, out_positions)
    mid = c_in * multiplier
    return before, conv_macs(mid, mid, kernel, out_positions, group=mid) + conv_macs(mid, c_out, (1,), out_positions)


# =========================================================================== graph side

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
                  ("max_positions", o["max_positions"] >= 1)]
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
                                          max_positions=self.opts["max_positions"], progress=ctx.progress)
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
