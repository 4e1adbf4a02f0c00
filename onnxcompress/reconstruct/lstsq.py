"""Streaming ridge least squares: accumulate normal equations batch by batch, then solve.

:class:`LstsqAccumulator` keeps ``XᵀX``, ``XᵀY`` and first/second moments of ``Y ≈ X·W + b``
(memory independent of the number of samples; optionally several independent problems of the same
size, for grouped convolutions) and solves the ridge normal equations by Cholesky, falling back to
an SVD-based ``lstsq`` (then ``pinv``) when the system is singular or badly conditioned.
``solve(keep=...)`` solves for a subset of the features from the same statistics, and
``residual_norms`` / ``relative_error`` score any ``(W, b)`` without the data.

Used by :mod:`onnxcompress.reconstruct.refit` (layer refits) through :mod:`onnxcompress.reconstruct.layerview`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_RIDGE", "PRECISIONS", "UPCAST_TOL", "LstsqAccumulator"]

#: Default relative ridge: λ = ridge · trace(XᵀX) / n_features (on centered features with a bias).
DEFAULT_RIDGE = 1e-4

#: ``precision`` values: products of a chunk's rows in float32, float64, or float32 unless the first
#: chunk shows float32's rounding would matter next to the ridge (then float64 for the whole problem).
PRECISIONS = ("float32", "float64", "auto")
#: ``auto`` keeps float32 while, on the first chunk, the solution from float32 products changes the
#: layer's output by less than this (relative to the output of the float64 solution).
UPCAST_TOL = 1e-3
#: Rows of the first chunk the ``auto`` check looks at.
CHECK_ROWS = 2048

_DEAD = 1e-14  # a feature whose (centered) energy is below this fraction of the largest is dropped
_COND = 1e-12  # (min / max Cholesky diagonal)² below this: treat the system as ill-conditioned
_RCOND = 1e-12  # singular-value cutoff of the lstsq fallback


class LstsqAccumulator:
    """Streaming normal equations for ``Y ≈ X·W + b`` (optionally several independent groups).

    Statistics are accumulated around a shift (the first batch's column means when fitting a bias)
    so that centering stays accurate when activations have a large mean.

    Args:
        n_features: Columns of ``X``.
        n_targets: Columns of ``Y``.
        fit_bias: Fit an unpenalized intercept ``b`` (a ones column, handled implicitly).
        dtype: Accumulation dtype.
        groups: Number of independent problems of the same size (grouped convolutions);
            ``add`` then takes ``[groups, n, ...]`` arrays and ``solve`` a ``group`` index.
        precision: dtype of the per-chunk products (:data:`PRECISIONS`); the sums over chunks are
            kept in ``dtype``. ``auto`` solves the first chunk's ridge problem (``ridge_hint``) from
            float32 and from float64 products and keeps float32 when the two solutions' outputs
            agree within :data:`UPCAST_TOL` (``upcast`` says whether it went to float64).
        ridge_hint: The relative ridge the solve will use (for ``auto``).
    """

    def __init__(self, n_features: int, n_targets: int, fit_bias: bool = True,
                 dtype: np.dtype | type = np.float64, groups: int = 1, precision: str = "float64",
                 ridge_hint: float = DEFAULT_RIDGE):
        if n_features < 0 or n_targets < 1 or groups < 1:
            raise ValueError("need n_features >= 0, n_targets >= 1, groups >= 1")
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: one of {PRECISIONS}")
        self.precision, self.ridge_hint, self.upcast = precision, ridge_hint, False
        self.work = np.dtype(np.float32 if precision != "float64" else dtype)
        self.n_features, self.n_targets, self.groups = n_features, n_targets, groups
        self.fit_bias = fit_bias
        self.dtype = np.dtype(dtype)
        g, f, t = groups, n_features, n_targets
        self.xx = np.zeros((g, f, f), self.dtype)
        self.xy = np.zeros((g, f, t), self.dtype)
        self.sx = np.zeros((g, f), self.dtype)
        self.sy = np.zeros((g, t), self.dtype)
        self.yy = np.zeros((g, t), self.dtype)
        self.x0 = np.zeros((g, f), self.dtype)
        self.y0 = np.zeros((g, t), self.dtype)
        self.n_samples = 0
        #: How the last :meth:`solve` solved: ``cholesky``, ``lstsq``, ``pinv`` or ``none``.
        self.last_solver = ""

    def _as_groups(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=self.work)
        Y = np.asarray(Y, dtype=self.work)
        if X.ndim == 2:
            X = X[None]
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim == 2:
            Y = Y[None]
        want_x = (self.groups, X.shape[1], self.n_features)
        want_y = (self.groups, X.shape[1], self.n_targets)
        if X.shape != want_x or Y.shape != want_y:
            raise ValueError(f"expected X {want_x} and Y {want_y}, got {X.shape} and {Y.shape}")
        return X, Y

    def add(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Accumulate rows: ``X`` is ``[n, F]`` (or ``[groups, n, F]``), ``Y`` ``[n, T]``."""
        first = self.n_samples == 0
        X, Y = self._as_groups(X, Y)
        if X.shape[1] == 0:
            return
        if first and self.fit_bias:
            self.x0, self.y0 = X.mean(axis=1, dtype=self.dtype), Y.mean(axis=1, dtype=self.dtype)
        if first and self.precision == "auto":
            X, Y = self._choose_precision(X, Y)
        Xs = X - self.x0[:, None, :].astype(self.work)
        Ys = Y - self.y0[:, None, :].astype(self.work)
        for g in range(self.groups):
            self.xx[g] += _gram(Xs[g])
        self.xy += Xs.transpose(0, 2, 1) @ Ys
        self.sx += Xs.sum(axis=1, dtype=self.dtype)
        self.sy += Ys.sum(axis=1, dtype=self.dtype)
        self.yy += np.einsum("gnt,gnt->gt", Ys, Ys, dtype=self.dtype)
        self.n_samples += X.shape[1]

    def _choose_precision(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Go to float64 (``upcast``) when, on this chunk, the ridge solution from float32 products
        moves the layer's output by more than :data:`UPCAST_TOL` (relative) from the float64 one;
        returns the chunk in the dtype kept."""
        rows = slice(0, CHECK_ROWS)  # enough rows to see float32's rounding; the cost is the F³ factorization
        Xs = X[:, rows].astype(np.float64) - self.x0[:, None, :]
        Ys = Y[:, rows].astype(np.float64) - self.y0[:, None, :]
        X32, Y32 = Xs.astype(np.float32), Ys.astype(np.float32)
        Xt, X32t = Xs.transpose(0, 2, 1), X32.transpose(0, 2, 1)
        for g64, d64, g32, d32 in zip(Xt @ Xs, Xt @ Ys, (X32t @ X32).astype(np.float64), (X32t @ Y32).astype(np.float64)):
            if not _close_solutions(g64, d64, g32, d32, self.ridge_hint):
                self.upcast, self.work = True, np.dtype(self.dtype)
                return X.astype(self.dtype), Y.astype(self.dtype)
        return X, Y

    def gram(self, group: int = 0) -> np.ndarray:
        """The accumulated (shifted) ``XᵀX`` of ``group`` as a full symmetric matrix."""
        xx = self.xx[group]
        return (xx + xx.T) / 2

    def covariance(self, group: int = 0) -> np.ndarray:
        """``XᵀX`` over all features, centered when fitting a bias (the matrix a refit with a bias
        solves with): the Hessian of the output error in the weights, up to a factor 2."""
        if self.n_samples == 0:
            raise ValueError("no samples accumulated")
        return self._centered(group, self._index(None))[0]

    def _index(self, keep: Sequence[int] | np.ndarray | None) -> np.ndarray:
        if keep is None:
            return np.arange(self.n_features)
        idx = np.asarray(keep, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_features):
            raise ValueError(f"keep indices must lie in [0, {self.n_features})")
        return idx

    def _centered(self, group: int, idx: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(C, D, mean_x, mean_y)``: centered ``XᵀX``, ``XᵀY`` on ``idx`` and the means."""
        xx = self.gram(group)[np.ix_(idx, idx)]
        xy = self.xy[group][idx]
        if not self.fit_bias:
            zx, zy = np.zeros(len(idx), self.dtype), np.zeros(self.n_targets, self.dtype)
            return xx, xy, zx, zy
        n = self.n_samples
        mu_x, mu_y = self.sx[group][idx] / n, self.sy[group] / n
        c = xx - n * np.outer(mu_x, mu_x)
        d = xy - n * np.outer(mu_x, mu_y)
        return (c + c.T) / 2, d, self.x0[group][idx] + mu_x, self.y0[group] + mu_y

    def solve(self, ridge: float = DEFAULT_RIDGE, keep: Sequence[int] | np.ndarray | None = None,
              group: int = 0, fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Ridge least squares from the accumulated statistics.

        Args:
            ridge: Relative ridge: λ = ridge · trace(XᵀX) / features (on the kept, non-constant
                features; centered when fitting a bias). The bias is not penalized.
            keep: Solve using only these feature columns (as if the others were removed).
            group: Which problem, for grouped accumulators.
            fixed: Keep these weights (``[len(keep), T]``) and solve for the bias alone:
                ``mean(Y) − mean(X)·W`` (``last_solver`` is then ``mean``).

        Returns:
            ``(W, b)``: ``W`` is ``[len(keep), T]`` (rows of constant or all-zero features are 0),
            ``b`` is ``[T]`` or ``None`` without a bias.

        Raises:
            ValueError: Nothing was accumulated, or bad ``keep``.
        """
        if self.n_samples == 0:
            raise ValueError("no samples accumulated")
        idx = self._index(keep)
        c, d, mean_x, mean_y = self._centered(group, idx)
        if fixed is not None:
            self.last_solver = "mean"
            w = np.asarray(fixed, np.float64).reshape(len(idx), self.n_targets)
        else:
            w = self._solve_normal(c, d, ridge)
        return w, (mean_y - mean_x @ w if self.fit_bias else None)

    def _solve_normal(self, c: np.ndarray, d: np.ndarray, ridge: float) -> np.ndarray:
        w = np.zeros(d.shape, np.float64)
        diag = np.diag(c)
        top = float(diag.max()) if diag.size else 0.0
        alive = np.flatnonzero(diag > _DEAD * top) if top > 0 else np.zeros(0, np.int64)
        if alive.size == 0:
            self.last_solver = "none"
            return w
        a = c[np.ix_(alive, alive)].astype(np.float64)
        a[np.diag_indices_from(a)] += ridge * float(np.trace(a)) / alive.size
        w[alive] = self._solve_spd(a, d[alive].astype(np.float64))
        return w

    def _solve_spd(self, a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        import scipy.linalg  # imported where used: scipy costs start-up time to runs that never solve

        try:
            factor = scipy.linalg.cho_factor(a, lower=False, check_finite=False)
            dg = np.abs(np.diag(factor[0]))
            if dg.min() ** 2 > _COND * dg.max() ** 2:
                self.last_solver = "cholesky"
                return scipy.linalg.cho_solve(factor, rhs, check_finite=False)
        except np.linalg.LinAlgError:
            pass
        try:
            self.last_solver = "lstsq"
            return scipy.linalg.lstsq(a, rhs, cond=_RCOND, check_finite=False)[0]
        except (np.linalg.LinAlgError, ValueError):
            self.last_solver = "pinv"
            return np.linalg.pinv(a, rcond=_RCOND, hermitian=True) @ rhs

    def residual_norms(self, W: np.ndarray, b: np.ndarray | None = None,
                       keep: Sequence[int] | np.ndarray | None = None, group: int = 0) -> tuple[float, float]:
        """``(‖X·W + b − Y‖², ‖Y‖²)`` over everything accumulated, from the statistics alone.

        ``W`` has one row per kept feature (all features when ``keep`` is ``None``).
        """
        idx = self._index(keep)
        W = np.asarray(W, np.float64).reshape(len(idx), self.n_targets)
        b = np.zeros(self.n_targets) if b is None else np.asarray(b, np.float64).reshape(-1)
        n, g = self.n_samples, group
        xw = self.gram(g)[np.ix_(idx, idx)] @ W
        shift = self.x0[g][idx] @ W + b - self.y0[g]
        res = (np.sum(W * xw) - 2 * np.sum(W * self.xy[g][idx]) + self.yy[g].sum()
               + 2 * shift @ (W.T @ self.sx[g][idx] - self.sy[g]) + n * shift @ shift)
        ysq = self.yy[g].sum() + 2 * self.y0[g] @ self.sy[g] + n * self.y0[g] @ self.y0[g]
        return max(float(res), 0.0), float(ysq)

    def relative_error(self, W: np.ndarray, b: np.ndarray | None = None,
                       keep: Sequence[int] | np.ndarray | None = None, group: int = 0) -> float:
        """``‖X·W + b − Y‖ / ‖Y‖`` over everything accumulated (0 when ``Y`` is all zero)."""
        res, ysq = self.residual_norms(W, b, keep, group)
        return math.sqrt(res / ysq) if ysq > 0 else 0.0


def _gram(x: np.ndarray) -> np.ndarray:
    """``xᵀx`` of ``x [n, F]`` by BLAS ``syrk`` (half the work of a product), made symmetric."""
    import scipy.linalg.blas

    syrk = scipy.linalg.blas.ssyrk if x.dtype == np.float32 else scipy.linalg.blas.dsyrk
    upper = syrk(1.0, x.T, trans=0, lower=0)  # x.T is Fortran-ordered: no copy
    return upper + np.triu(upper, 1).T


def _close_solutions(g64: np.ndarray, d64: np.ndarray, g32: np.ndarray, d32: np.ndarray, ridge: float) -> bool:
    """Whether ridge solutions of ``(g32, d32)`` and ``(g64, d64)`` give outputs within :data:`UPCAST_TOL`
    (``‖X·(w32 − w64)‖ ≤ tol·‖X·w64‖`` measured with ``g64``; ``w32 − w64`` to first order,
    ``A⁻¹((d32 − d64) − (g32 − g64)·w64)`` with ``A = g64 + λI``: one Cholesky factorization)."""
    import scipy.linalg

    lam = ridge * float(np.trace(g64)) / max(1, g64.shape[0])
    if not lam > 0:
        return False
    a = (g64 + lam * np.eye(g64.shape[0])).astype(np.float32)  # a float32 factorization is enough to
    try:                                                         # measure; if it fails, so may float32
        factor = scipy.linalg.cho_factor(a, check_finite=False)
    except np.linalg.LinAlgError:
        return False
    w64 = scipy.linalg.cho_solve(factor, d64.astype(np.float32), check_finite=False).astype(np.float64)
    rhs = ((d32 - d64) - (g32 - g64) @ w64).astype(np.float32)
    dw = scipy.linalg.cho_solve(factor, rhs, check_finite=False).astype(np.float64)
    return float(np.sum(dw * (g64 @ dw))) <= UPCAST_TOL**2 * float(np.sum(w64 * (g64 @ w64)))
