"""Least-squares layer reconstruction: shrink first, then win the accuracy back.

A compressed model (the *student*) is refitted layer by layer so that each refitted node's output on
calibration data matches the same tensor of the original model (the *teacher*), with no gradients:
for a node ``y = x·W + b`` the input activations ``X`` come from the student and the targets ``Y``
from the teacher, and ``W, b`` are the ridge least-squares solution. The same machinery serves
channel pruning (refit the consumer of pruned channels), low-rank factorization (refit the last
factor) and quantization bias correction.

Three layers:

* :class:`LstsqAccumulator` streams ``XᵀX``, ``XᵀY`` and first/second moments batch by batch
  (memory independent of the number of samples) and solves the normal equations by Cholesky
  (falling back to an SVD-based ``lstsq`` when singular or badly conditioned). ``solve(keep=...)``
  solves for a subset of the input features from the same statistics: pruning can try several
  channel sets without re-running the model.
* :class:`LayerView` (:func:`layer_view`) turns a Conv / Gemm / MatMul input activation into rows
  of a feature matrix (im2col for Conv, per group), its output into target rows, and its weights
  into a ``[groups, features, targets]`` matrix and back to the ONNX layout.
* :func:`reconstruct_layers` drives the refit of a list of :class:`LayerTarget` in topological
  order, capturing the student's activations from the already-refitted student.

Memory: a batch's activations are held once (as :mod:`onnxcompress.capture` hands them over); the
im2col matrix is built for at most ``chunk_bytes`` worth of rows at a time, only at the sampled
output positions (``max_positions`` per batch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import scipy.linalg
from onnx import helper, numpy_helper

from .calib import CalibSource
from .capture import capture, expose
from .errors import InputError
from .progress import track
from .runtime import make_session

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_POSITIONS",
    "DEFAULT_RIDGE",
    "SUPPORTED_OPS",
    "ConvGeometry",
    "ConvView",
    "GemmView",
    "LayerStats",
    "LayerTarget",
    "LayerView",
    "LstsqAccumulator",
    "channel_features",
    "conv_geometry",
    "im2col",
    "layer_view",
    "pad_input",
    "reconstruct_layers",
    "sample_rows",
]

log = logging.getLogger(__name__)

#: Default relative ridge: λ = ridge · trace(XᵀX) / n_features (on centered features with a bias).
DEFAULT_RIDGE = 1e-4
#: Default bound on the output positions (rows) sampled per batch and layer.
DEFAULT_MAX_POSITIONS = 4096
#: Upper bound on the bytes of one chunk of the float64 feature matrix.
CHUNK_BYTES = 32 * 2**20
#: Op types a :class:`LayerView` exists for.
SUPPORTED_OPS = frozenset({"Conv", "Gemm", "MatMul"})

_DEAD = 1e-14  # a feature whose (centered) energy is below this fraction of the largest is dropped
_COND = 1e-12  # (min / max Cholesky diagonal)² below this: treat the system as ill-conditioned
_RCOND = 1e-12  # singular-value cutoff of the lstsq fallback


# --------------------------------------------------------------------------- accumulator


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
    """

    def __init__(self, n_features: int, n_targets: int, fit_bias: bool = True,
                 dtype: np.dtype | type = np.float64, groups: int = 1):
        if n_features < 0 or n_targets < 1 or groups < 1:
            raise ValueError("need n_features >= 0, n_targets >= 1, groups >= 1")
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
        X = np.asarray(X, dtype=self.dtype)
        Y = np.asarray(Y, dtype=self.dtype)
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
        X, Y = self._as_groups(X, Y)
        if X.shape[1] == 0:
            return
        if self.n_samples == 0 and self.fit_bias:
            self.x0, self.y0 = X.mean(axis=1), Y.mean(axis=1)
        Xs = X - self.x0[:, None, :]
        Ys = Y - self.y0[:, None, :]
        Xt = Xs.transpose(0, 2, 1)
        self.xx += Xt @ Xs
        self.xy += Xt @ Ys
        self.sx += Xs.sum(axis=1)
        self.sy += Ys.sum(axis=1)
        self.yy += np.einsum("gnt,gnt->gt", Ys, Ys)
        self.n_samples += X.shape[1]

    def gram(self, group: int = 0) -> np.ndarray:
        """The accumulated (shifted) ``XᵀX`` of ``group`` as a full symmetric matrix."""
        xx = self.xx[group]
        return (xx + xx.T) / 2

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
              group: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """Ridge least squares from the accumulated statistics.

        Args:
            ridge: Relative ridge: λ = ridge · trace(XᵀX) / features (on the kept, non-constant
                features; centered when fitting a bias). The bias is not penalized.
            keep: Solve using only these feature columns (as if the others were removed).
            group: Which problem, for grouped accumulators.

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


# --------------------------------------------------------------------------- conv geometry


@dataclass(frozen=True)
class ConvGeometry:
    """Resolved convolution geometry for one input size (pads are explicit: begins, then ends)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    out: tuple[int, ...]


def _attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _same_pads(size: int, k: int, s: int, d: int, lower: bool) -> tuple[int, int, int]:
    out = -(-size // s)
    total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
    small = total // 2
    begin = total - small if lower else small
    return begin, total - begin, out


def conv_geometry(attrs: dict, kernel: Sequence[int], in_spatial: Sequence[int]) -> ConvGeometry:
    """Resolve strides, dilations, pads (``auto_pad`` included) and output size of a Conv.

    Raises:
        InputError: The output would be empty or ``auto_pad`` is unknown.
    """
    k = len(kernel)
    strides = tuple(attrs.get("strides", [1] * k))
    dils = tuple(attrs.get("dilations", [1] * k))
    auto = attrs.get("auto_pad", "NOTSET")
    begins, ends, out = [], [], []
    for i, size in enumerate(in_spatial):
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            b, e, o = _same_pads(size, kernel[i], strides[i], dils[i], auto == "SAME_LOWER")
        elif auto in ("NOTSET", "VALID"):
            pads = attrs.get("pads", [0] * 2 * k) if auto == "NOTSET" else [0] * 2 * k
            b, e = pads[i], pads[i + k]
            o = (size + b + e - dils[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        else:
            raise InputError(f"Conv: unknown auto_pad {auto!r}")
        if o < 1:
            raise InputError(f"Conv: empty output for input size {tuple(in_spatial)}")
        begins.append(b)
        ends.append(e)
        out.append(o)
    return ConvGeometry(tuple(kernel), strides, dils, tuple(begins + ends), tuple(out))


def pad_input(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """Zero-pad the spatial axes of ``x`` (``[N, C, *spatial]``); returns ``x`` itself without pads."""
    if not any(geom.pads):
        return x
    k = len(geom.kernel)
    widths = [(0, 0), (0, 0)] + [(geom.pads[i], geom.pads[i + k]) for i in range(k)]
    return np.pad(x, widths)


def im2col(x: np.ndarray, geom: ConvGeometry, rows: np.ndarray | None = None, *,
           padded: bool = False) -> np.ndarray:
    """Patches of ``x`` at output positions ``rows`` (flat indices over ``[N, *out]``).

    Args:
        x: Input ``[N, C, *spatial]``; already padded when ``padded``.
        geom: The convolution's geometry.
        rows: Output positions to extract (all when ``None``).
        padded: ``x`` is already padded with :func:`pad_input`.

    Returns:
        ``[len(rows), C·prod(kernel)]`` in ``x``'s dtype; columns ordered channel-major like a
        Conv weight ``[Cout, C, *kernel]`` flattened over its last axes.
    """
    xp = x if padded else pad_input(x, geom)
    n, k = x.shape[0], len(geom.kernel)
    if rows is None:
        rows = np.arange(n * math.prod(geom.out))
    r = len(rows)
    coords = np.unravel_index(rows, (n, *geom.out))
    index: list = [coords[0].reshape((r,) + (1,) * k), slice(None)]
    for i in range(k):
        pos = coords[i + 1][:, None] * geom.strides[i] + np.arange(geom.kernel[i]) * geom.dilations[i]
        shape = [r] + [1] * k
        shape[i + 1] = geom.kernel[i]
        index.append(pos.reshape(shape))
    patches = xp[tuple(index)]  # [r, *kernel, C]: advanced indices split by a slice go first
    return np.moveaxis(patches, -1, 1).reshape(r, -1)


# --------------------------------------------------------------------------- layer views


def channel_features(channels: Sequence[int] | np.ndarray, block: int) -> np.ndarray:
    """Feature indices owned by ``channels`` when each channel owns ``block`` consecutive features
    (``kh·kw`` for a Conv, ``H·W`` for a Gemm after Flatten)."""
    ch = np.asarray(channels, dtype=np.int64).reshape(-1, 1)
    return (ch * block + np.arange(block)).reshape(-1)


def sample_rows(n_rows: int, max_positions: int | None, rng: np.random.Generator) -> np.ndarray:
    """All row indices, or ``max_positions`` of them drawn without replacement (sorted)."""
    if max_positions is None or n_rows <= max_positions:
        return np.arange(n_rows)
    return np.sort(rng.choice(n_rows, size=max_positions, replace=False))


class LayerView:
    """How one node's input, output and weights map onto a (grouped) least-squares problem.

    Attributes:
        op_type: The node's op type.
        groups: Independent problems (Conv ``group``; 1 otherwise).
        n_features: Features per group (``Cin/g·prod(kernel)`` for Conv, ``K`` for Gemm/MatMul).
        n_targets: Targets per group (``Cout/g`` for Conv, ``M`` for Gemm/MatMul).
        fit_bias: Whether the refit solves for a bias.
        attr_updates: Node attributes to set when writing a refit (Gemm ``beta`` 0 → 1).
    """

    op_type = ""

    def __init__(self, groups: int, n_features: int, n_targets: int, fit_bias: bool,
                 out_keep: Sequence[int] | None):
        self.groups, self.n_features, self.n_targets = groups, n_features, n_targets
        self.fit_bias = fit_bias
        self.out_keep = None if out_keep is None else np.asarray(out_keep, dtype=np.int64)
        self.attr_updates: dict[str, float] = {}

    # -- subclasses implement these
    def _prepare(self, x: np.ndarray) -> object:
        raise NotImplementedError

    def _rows(self, state: object) -> int:
        raise NotImplementedError

    def _gather_x(self, state: object, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _target_rows(self, y: np.ndarray, state: object) -> object:
        raise NotImplementedError

    def _gather_y(self, ystate: object, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def to_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """The current weights as ``(W [g, F, T], b [g, T])`` (zeros without a bias), float64."""
        raise NotImplementedError

    def from_matrix(self, W: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(weight, bias)`` in the node's ONNX layout from ``W [g, F, T]`` and ``b [g, T]``."""
        raise NotImplementedError

    def feature_keep(self, channels: Sequence[int] | None) -> list[np.ndarray] | None:
        """Per-group feature indices owned by the kept input ``channels`` (``None``: all)."""
        raise NotImplementedError

    # -- shared
    def n_rows(self, x: np.ndarray) -> int:
        """Rows (output positions) that input ``x`` yields."""
        return self._rows(self._prepare(x))

    def features(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Feature rows ``[g, len(rows), F]`` (float64) of input ``x`` (all rows when ``None``)."""
        state = self._prepare(x)
        rows = np.arange(self._rows(state)) if rows is None else rows
        return self._gather_x(state, rows)

    def targets(self, y: np.ndarray, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Target rows ``[g, len(rows), T]`` (float64) of output ``y`` for input ``x``."""
        state = self._prepare(x)
        rows = np.arange(self._rows(state)) if rows is None else rows
        return self._gather_y(self._target_rows(y, state), rows)

    def pairs(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray | None = None, *,
              max_positions: int | None = None, rng: np.random.Generator | None = None,
              chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(X [g, n, F], Y [g, n, T])`` chunks of float64 rows for input ``x`` and target ``y``.

        Args:
            x: The node's input activation (one batch).
            y: The target tensor (one batch).
            rows: Rows to use; default: all, or ``max_positions`` drawn with ``rng``.
            max_positions: Bound on the rows drawn when ``rows`` is not given.
            rng: Generator for the draw (default: seeded with 0).
            chunk_bytes: Bound on the bytes of one chunk's feature and target rows.
        """
        state = self._prepare(x)
        ystate = self._target_rows(y, state)
        if rows is None:
            rng = rng if rng is not None else np.random.default_rng(0)
            rows = sample_rows(self._rows(state), max_positions, rng)
        width = self.groups * (self.n_features + self.n_targets)
        step = max(1, chunk_bytes // (8 * max(1, width)))
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            yield self._gather_x(state, part), self._gather_y(ystate, part)

    def _select_out(self, y: np.ndarray, axis: int) -> np.ndarray:
        if self.out_keep is not None:
            y = np.take(y, self.out_keep, axis=axis)
        if y.shape[axis] != self.groups * self.n_targets:
            raise InputError(f"{self.op_type}: target has {y.shape[axis]} channels on axis {axis}, "
                             f"the node produces {self.groups * self.n_targets}")
        return y


class ConvView(LayerView):
    """Conv (any rank, stride, pads incl. ``auto_pad``, dilation, groups) via im2col."""

    op_type = "Conv"

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                 fit_bias: bool, out_keep: Sequence[int] | None):
        attrs = _attrs(node)
        group = int(attrs.get("group", 1))
        cout, cg = weight.shape[:2]
        if weight.ndim < 3 or cout % group:
            raise InputError(f"Conv {node.name!r}: weight shape {list(weight.shape)} does not fit group {group}")
        super().__init__(group, cg * math.prod(weight.shape[2:]), cout // group, fit_bias, out_keep)
        self.attrs, self.kernel = attrs, tuple(weight.shape[2:])
        self.weight = weight
        self.bias = np.zeros(cout) if bias is None else np.asarray(bias, np.float64).reshape(cout)

    def _prepare(self, x: np.ndarray) -> tuple[np.ndarray, ConvGeometry, int]:
        if x.ndim != len(self.kernel) + 2 or x.shape[1] != self.groups * self.n_features // math.prod(self.kernel):
            raise InputError(f"Conv: input shape {list(x.shape)} does not fit weight {list(self.weight.shape)}")
        geom = conv_geometry(self.attrs, self.kernel, x.shape[2:])
        return pad_input(x, geom), geom, x.shape[0]

    def _rows(self, state: tuple) -> int:
        return state[2] * math.prod(state[1].out)

    def _gather_x(self, state: tuple, rows: np.ndarray) -> np.ndarray:
        xp, geom, _ = state
        cols = im2col(xp, geom, rows, padded=True).astype(np.float64)
        return cols.reshape(len(rows), self.groups, self.n_features).transpose(1, 0, 2)

    def _target_rows(self, y: np.ndarray, state: tuple) -> np.ndarray:
        _, geom, n = state
        y = self._select_out(y, 1)
        if y.shape[0] != n or tuple(y.shape[2:]) != geom.out:
            raise InputError(f"Conv: target shape {list(y.shape)} does not match the output "
                             f"[{n}, {y.shape[1]}, {', '.join(map(str, geom.out))}]")
        return y.reshape(n, y.shape[1], -1)

    def _gather_y(self, y3: np.ndarray, rows: np.ndarray) -> np.ndarray:
        batch, pos = np.divmod(rows, y3.shape[2])
        out = y3[batch, :, pos].astype(np.float64).reshape(len(rows), self.groups, self.n_targets)
        out = out.transpose(1, 0, 2)
        return out if self.fit_bias else out - self.bias.reshape(self.groups, 1, self.n_targets)

    def to_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        w = self.weight.astype(np.float64).reshape(self.groups, self.n_targets, self.n_features)
        return w.transpose(0, 2, 1), self.bias.reshape(self.groups, self.n_targets).copy()

    def from_matrix(self, W: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        weight = np.asarray(W).transpose(0, 2, 1).reshape(self.weight.shape)
        return weight, None if b is None else np.asarray(b).reshape(-1)

    def feature_keep(self, channels: Sequence[int] | None) -> list[np.ndarray] | None:
        if channels is None:
            return None
        ch = np.unique(np.asarray(channels, dtype=np.int64))
        cg, k = self.weight.shape[1], math.prod(self.kernel)
        if ch.size and (ch.min() < 0 or ch.max() >= cg * self.groups):
            raise InputError(f"Conv: kept channels must lie in [0, {cg * self.groups})")
        return [channel_features(ch[ch // cg == g] - g * cg, k) for g in range(self.groups)]


class GemmView(LayerView):
    """Gemm (``transA=0``; ``transB``, ``alpha``, ``beta``) and MatMul with a constant 2-D weight."""

    def __init__(self, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
                 fit_bias: bool, out_keep: Sequence[int] | None):
        attrs = _attrs(node) if node.op_type == "Gemm" else {}
        if attrs.get("transA", 0):
            raise InputError(f"Gemm {node.name!r}: transA=1 is not supported")
        if weight.ndim != 2:
            raise InputError(f"{node.op_type} {node.name!r}: weight must be 2-D, got {list(weight.shape)}")
        self.trans_b = bool(attrs.get("transB", 0))
        k, m = weight.shape[::-1] if self.trans_b else weight.shape
        super().__init__(1, k, m, fit_bias, out_keep)
        self.op_type, self.weight = node.op_type, weight
        self.alpha, self.beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        self.bias = self._bias_vector(node, bias, m)
        if fit_bias and self.beta == 0.0:
            self.attr_updates = {"beta": 1.0}
            self.beta = 1.0

    def _bias_vector(self, node: onnx.NodeProto, bias: np.ndarray | None, m: int) -> np.ndarray:
        if bias is None or self.beta == 0.0:
            return np.zeros(m)
        bias = np.asarray(bias, np.float64)
        if bias.size == 1:
            return np.full(m, self.beta * float(bias.reshape(-1)[0]))
        if bias.size != m or bias.shape[-1] != m:
            raise InputError(f"Gemm {node.name!r}: bias shape {list(bias.shape)} is not per output")
        return self.beta * bias.reshape(m)

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.n_features or (self.op_type == "Gemm" and x.ndim != 2):
            raise InputError(f"{self.op_type}: input shape {list(x.shape)} does not fit weight {list(self.weight.shape)}")
        return x.reshape(-1, self.n_features)

    def _rows(self, state: np.ndarray) -> int:
        return state.shape[0]

    def _gather_x(self, state: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return state[rows].astype(np.float64)[None]

    def _target_rows(self, y: np.ndarray, state: np.ndarray) -> np.ndarray:
        y2 = self._select_out(y, y.ndim - 1).reshape(-1, self.n_targets)
        if y2.shape[0] != state.shape[0]:
            raise InputError(f"{self.op_type}: target shape {list(y.shape)} does not match the input rows")
        return y2

    def _gather_y(self, y2: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = y2[rows].astype(np.float64)[None]
        return out if self.fit_bias else out - self.bias

    def to_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        w = self.weight.astype(np.float64)
        w = self.alpha * (w.T if self.trans_b else w)
        return w[None], self.bias[None].copy()

    def from_matrix(self, W: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        w = np.asarray(W)[0] / self.alpha
        bias = None if b is None else np.asarray(b).reshape(-1) / self.beta
        return (w.T if self.trans_b else w), bias

    def feature_keep(self, channels: Sequence[int] | None) -> list[np.ndarray] | None:
        if channels is None:
            return None
        idx = np.unique(np.asarray(channels, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_features):
            raise InputError(f"{self.op_type}: kept features must lie in [0, {self.n_features})")
        return [idx]


def layer_view(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None = None, *,
               fit_bias: bool | None = None, out_keep: Sequence[int] | None = None) -> LayerView:
    """The :class:`LayerView` of a Conv, Gemm or MatMul node with constant ``weight`` (and ``bias``).

    Args:
        node: The node.
        weight: Its weight (input 1) in ONNX layout.
        bias: Its bias (input 2), if any.
        fit_bias: Solve for a bias (default: Conv/Gemm yes, MatMul no). When ``False`` an existing
            bias is kept fixed and subtracted from the targets.
        out_keep: Channels of the target tensor the node's outputs correspond to (when the node's
            outputs were pruned): axis 1 for Conv, the last axis for Gemm/MatMul.

    Raises:
        InputError: Unsupported op or layout.
    """
    if node.op_type not in SUPPORTED_OPS:
        raise InputError(f"node {node.name!r}: cannot reconstruct {node.op_type} (only {sorted(SUPPORTED_OPS)})")
    if fit_bias is None:
        fit_bias = node.op_type != "MatMul"
    if fit_bias and node.op_type == "MatMul":
        raise InputError(f"MatMul {node.name!r}: has no bias input to fit")
    cls = ConvView if node.op_type == "Conv" else GemmView
    return cls(node, np.asarray(weight), bias, fit_bias, out_keep)


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class LayerTarget:
    """One node of the student to refit.

    Attributes:
        node: The student node's name (or, for unnamed nodes, its first output's name).
        target: The teacher tensor its output must match (its pre-activation output).
        in_keep: Input channels of the node to keep (feature indices for Gemm/MatMul; see
            :func:`channel_features` for Flatten→Gemm). The others get zero weights, so the
            layout is unchanged and a later surgery can remove them. ``None``: all. For a student
            whose channels were already removed, leave this ``None``.
        out_keep: Channels of ``target`` that the node's outputs correspond to, when the node's
            own outputs were pruned.
        fit_bias: Solve for a bias (default: Conv/Gemm yes, MatMul no).
    """

    node: str
    target: str
    in_keep: Sequence[int] | None = None
    out_keep: Sequence[int] | None = None
    fit_bias: bool | None = None


@dataclass
class LayerStats:
    """What one refit did.

    ``error_before``/``error_after`` are ``‖X·W + b − Y‖ / ‖Y‖`` on the calibration rows used
    (student inputs, teacher targets) with the old and the new weights.
    """

    node: str
    op_type: str
    target: str
    error_before: float
    error_after: float
    samples: int
    positions: int
    groups: int
    features: int
    kept_features: int
    solver: str
    weight: str
    bias: str | None = None


@dataclass
class _Plan:
    target: LayerTarget
    index: int
    label: str
    input: str


@dataclass
class _Options:
    ridge: float
    batch_size: int
    max_positions: int | None
    seed: int
    progress: bool
    threads: int
    chunk_bytes: int = CHUNK_BYTES
    stats: list[LayerStats] = field(default_factory=list)


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                names.update(sub.input)
                names |= _subgraph_names(sub)
    return names


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        used |= _subgraph_names(node)
    return used


def _all_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {i.name for i in g.initializer} | {v.name for v in g.value_info}
    names |= {v.name for v in g.input} | {v.name for v in g.output} | _used_names(g)
    for node in g.node:
        names.update(node.output)
    return names


def _unique(names: set[str], base: str) -> str:
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _const_input(model: onnx.ModelProto, node: onnx.NodeProto, i: int, label: str) -> np.ndarray | None:
    if i >= len(node.input) or not node.input[i]:
        return None
    init = _initializers(model).get(node.input[i])
    if init is None:
        raise InputError(f"node {label!r}: input {i} ({node.input[i]!r}) is not a constant initializer")
    return numpy_helper.to_array(init)


def _resolve(model: onnx.ModelProto, layers: Sequence[LayerTarget]) -> list[_Plan]:
    by_name: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for key in ([node.name] if node.name else []) + list(node.output[:1]):
            by_name.setdefault(key, i)
    plans, seen = [], set()
    for t in layers:
        if t.node not in by_name:
            raise InputError(f"no node named {t.node!r} in the student")
        idx = by_name[t.node]
        node = model.graph.node[idx]
        if idx in seen:
            raise InputError(f"node {t.node!r} is listed twice")
        if node.op_type not in SUPPORTED_OPS:
            raise InputError(f"node {t.node!r}: cannot reconstruct {node.op_type} (only {sorted(SUPPORTED_OPS)})")
        _const_input(model, node, 1, t.node)
        seen.add(idx)
        plans.append(_Plan(t, idx, t.node, node.input[0]))
    return sorted(plans, key=lambda p: p.index)


def _ancestors(model: onnx.ModelProto, name: str) -> set[int]:
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    found: set[int] = set()
    stack = [name]
    while stack:
        idx = producer.get(stack.pop())
        if idx is None or idx in found:
            continue
        found.add(idx)
        node = model.graph.node[idx]
        stack.extend(list(node.input) + sorted(_subgraph_names(node)))
    return found


def _rounds(model: onnx.ModelProto, plans: list[_Plan], together: bool) -> list[list[_Plan]]:
    """Split ``plans`` (topologically sorted) into runs whose inputs don't depend on each other."""
    if not together:
        return [[p] for p in plans]
    rounds: list[list[_Plan]] = []
    for plan in plans:
        deps = _ancestors(model, plan.input)
        if rounds and not any(p.index in deps for p in rounds[-1]):
            rounds[-1].append(plan)
        else:
            rounds.append([plan])
    return rounds


class _Teacher:
    """One session over the teacher exposing every target; run per batch."""

    def __init__(self, teacher: onnx.ModelProto, names: Sequence[str], threads: int):
        produced = {o for n in teacher.graph.node for o in n.output if o}
        inits = {i.name for i in teacher.graph.initializer}
        self.inputs = {i.name for i in teacher.graph.input} - inits
        bad = [n for n in names if n not in produced and n not in self.inputs]
        if bad:
            raise InputError(f"teacher has no tensor {bad[0]!r} computed from its inputs")
        self.computed = sorted({n for n in names if n in produced})
        self.session = make_session(expose(teacher, self.computed), threads=threads) if self.computed else None

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(zip(self.computed, self.session.run(self.computed, feeds))) if self.session else {}
        values.update({n: feeds[n] for n in self.inputs if n in feeds})
        return values


def _views(model: onnx.ModelProto, plans: list[_Plan]) -> list[LayerView]:
    views = []
    for p in plans:
        node = model.graph.node[p.index]
        weight = _const_input(model, node, 1, p.label)
        bias = _const_input(model, node, 2, p.label)
        views.append(layer_view(node, weight, bias, fit_bias=p.target.fit_bias, out_keep=p.target.out_keep))
    return views


def _refit_round(model: onnx.ModelProto, plans: list[_Plan], teacher: _Teacher, data: CalibSource,
                 opts: _Options) -> None:
    views = _views(model, plans)
    accs = [LstsqAccumulator(v.n_features, v.n_targets, v.fit_bias, groups=v.groups) for v in views]
    rngs = [np.random.default_rng([opts.seed, p.index]) for p in plans]
    positions = [0] * len(plans)

    def consume(batch, tensors: dict[str, np.ndarray]) -> None:
        targets = teacher(batch.feeds)
        for i, (plan, view) in enumerate(zip(plans, views)):
            x, y = tensors[plan.input], targets[plan.target.target]
            for X, Y in view.pairs(x, y, max_positions=opts.max_positions, rng=rngs[i],
                                   chunk_bytes=opts.chunk_bytes):
                accs[i].add(X, Y)
                positions[i] += X.shape[1]

    samples = capture(model, [p.input for p in plans], data, consume, batch_size=opts.batch_size,
                      threads=opts.threads, progress=opts.progress)
    if samples == 0:
        raise InputError("no calibration samples")
    for plan, view, acc, pos in zip(plans, views, accs, positions):
        opts.stats.append(_finish(model, plan, view, acc, opts.ridge, samples, pos))


def _solve_layer(view: LayerView, acc: LstsqAccumulator, keeps: list[np.ndarray] | None,
                 ridge: float) -> tuple[np.ndarray, np.ndarray, list[float], set[str]]:
    """New ``(W, b)`` and ``[res_before², res_after², ‖Y‖²]`` summed over groups, and solvers used."""
    w_cur, b_cur = view.to_matrix()
    w_new, b_new = np.zeros_like(w_cur), b_cur.copy()
    sums, solvers = [0.0, 0.0, 0.0], set()
    for g in range(view.groups):
        keep = None if keeps is None else keeps[g]
        w, b = acc.solve(ridge, keep=keep, group=g)
        solvers.add(acc.last_solver)
        before, ysq = acc.residual_norms(w_cur[g], b_cur[g] if view.fit_bias else None, group=g)
        after, _ = acc.residual_norms(w, b, keep=keep, group=g)
        w_new[g][slice(None) if keep is None else keep] = w
        if b is not None:
            b_new[g] = b
        sums = [sums[0] + before, sums[1] + after, sums[2] + ysq]
    return w_new, b_new, sums, solvers


def _finish(model: onnx.ModelProto, plan: _Plan, view: LayerView, acc: LstsqAccumulator,
            ridge: float, samples: int, positions: int) -> LayerStats:
    keeps = view.feature_keep(plan.target.in_keep)
    w_new, b_new, (before, after, ysq), solvers = _solve_layer(view, acc, keeps, ridge)
    weight, bias = _write(model, plan.index, view, w_new, b_new)
    rel = (lambda r: math.sqrt(r / ysq)) if ysq > 0 else (lambda r: 0.0)
    kept = view.n_features * view.groups if keeps is None else sum(len(k) for k in keeps)
    stats = LayerStats(plan.label, view.op_type, plan.target.target, rel(before), rel(after), samples,
                       positions, view.groups, view.n_features * view.groups, kept,
                       "+".join(sorted(solvers)), weight, bias)
    log.info("refit %s (%s): relative error %.4g -> %.4g on %d samples, %d positions",
             stats.node, stats.op_type, stats.error_before, stats.error_after, samples, positions)
    return stats


def _add_initializer(model: onnx.ModelProto, names: set[str], base: str, array: np.ndarray) -> str:
    name = _unique(names, base)
    model.graph.initializer.append(numpy_helper.from_array(array, name=name))
    if model.ir_version < 4:  # initializers must also be graph inputs before IR 4
        dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
        model.graph.input.append(helper.make_tensor_value_info(name, dtype, array.shape))
    return name


def _set_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _write(model: onnx.ModelProto, index: int, view: LayerView, W: np.ndarray,
           b: np.ndarray) -> tuple[str, str | None]:
    """Point the node at new initializers holding the refit; drop the old ones if now unused."""
    node = model.graph.node[index]
    inits = _initializers(model)
    names = _all_names(model)
    weight, bias = view.from_matrix(W, b if view.fit_bias else None)
    old_w = node.input[1]
    wdtype = numpy_helper.to_array(inits[old_w]).dtype
    node.input[1] = _add_initializer(model, names, f"{old_w}_refit", weight.astype(wdtype))
    old_b = node.input[2] if len(node.input) > 2 and node.input[2] else None
    new_b = None
    if bias is not None:
        bdtype = numpy_helper.to_array(inits[old_b]).dtype if old_b else wdtype
        base = f"{old_b}_refit" if old_b else f"{node.name or node.output[0]}_bias_refit"
        new_b = _add_initializer(model, names, base, bias.astype(bdtype).reshape(-1))
        if len(node.input) > 2:
            node.input[2] = new_b
        else:
            node.input.append(new_b)
    for key, value in view.attr_updates.items():
        _set_attr(node, key, value)
    _drop_unused(model, {old_w, old_b} - {None})
    return node.input[1], new_b


def _drop_unused(model: onnx.ModelProto, names: set[str]) -> None:
    unused = names - _used_names(model.graph)
    if not unused:
        return
    g = model.graph
    keep_inits = [i for i in g.initializer if i.name not in unused]
    keep_inputs = [i for i in g.input if i.name not in unused]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    del g.input[:]
    g.input.extend(keep_inputs)


def reconstruct_layers(student: onnx.ModelProto, teacher: onnx.ModelProto, layers: Sequence[LayerTarget],
                       data: CalibSource, *, ridge: float = DEFAULT_RIDGE, batch_size: int = 32,
                       max_positions: int | None = DEFAULT_MAX_POSITIONS, seed: int = 0,
                       progress: bool = False, group_independent: bool = True, threads: int = 0,
                       chunk_bytes: int = CHUNK_BYTES) -> tuple[onnx.ModelProto, list[LayerStats]]:
    """Refit ``layers`` of ``student`` so that their outputs match tensors of ``teacher``.

    Layers are processed in the student's topological order; each layer's inputs are captured from
    the student with every earlier layer already refitted, and its targets from the teacher on the
    same batch, so errors do not compound. Each refit writes new initializers (shared or not, the
    old arrays are never modified; an old initializer nobody uses any more is removed).

    Args:
        student: The compressed model (not modified).
        teacher: The original model; must take the same inputs.
        layers: What to refit (Conv, Gemm or MatMul nodes with constant weights).
        data: Calibration samples.
        ridge: Relative ridge (see :meth:`LstsqAccumulator.solve`).
        batch_size: Samples per ORT run.
        max_positions: Rows (output positions) used per batch and layer, sampled with ``seed``
            (``None``: all). Cost per batch grows with rows × features²; a few thousand rows
            per batch is plenty for the normal equations.
        seed: Seed of the position sampling.
        progress: Show a progress bar over the layers and one per capture run.
        group_independent: Refit in one run all consecutive layers whose inputs do not depend on
            each other (same result as one layer per run, fewer runs).
        threads: ORT intra-op threads (0: default).
        chunk_bytes: Bound on one chunk of the im2col feature matrix.

    Returns:
        ``(model, stats)``: the refitted copy and one :class:`LayerStats` per layer, in the order
        they were refitted.

    Raises:
        InputError: Unknown or unsupported node, non-constant weights, a missing teacher tensor,
            shapes that do not match, or no data.
    """
    model = onnx.ModelProto()
    model.CopyFrom(student)
    plans = _resolve(model, layers)
    teach = _Teacher(teacher, sorted({p.target.target for p in plans}), threads)
    opts = _Options(ridge, batch_size, max_positions, seed, progress, threads, chunk_bytes)
    rounds = _rounds(model, plans, group_independent)
    for group in track(rounds, f"refitting {len(plans)} layers in {len(rounds)} runs", total=len(rounds), enabled=progress):
        log.debug("refitting %s in one run", [p.label for p in group])
        _refit_round(model, group, teach, data, opts)
    return model, opts.stats
