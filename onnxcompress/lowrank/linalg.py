"""Low-rank math shared by the ``factorize_*`` passes (numpy/scipy on float64 arrays).

Truncated SVD, rank rules, HOSVD/HOOI, empirical VBMF, the spatial reshape, MAC accounting of
factorized layers, input statistics and whitening. The graph side is :mod:`onnxcompress.lowrank.factorize`;
the passes' common driver is :class:`onnxcompress.passes._factorize.FactorizePass`.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxcompress.core.errors import InputError

__all__ = [
    "DEFAULT_ENERGY",
    "RULES",
    "GramAccumulator",
    "RankRule",
    "conv_macs",
    "dwsep_macs",
    "energy_rank",
    "evbmf",
    "hooi",
    "hosvd",
    "lowrank_factors",
    "mode_dot",
    "psd_sqrt",
    "relative_error",
    "round_rank",
    "spatial_kernels",
    "spatial_matrix",
    "spatial_svd_macs",
    "split_factors",
    "svd",
    "svd_macs",
    "truncated_svd",
    "tucker2_macs",
    "tucker_to_tensor",
    "unfold",
    "vbmf_rank",
]

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
