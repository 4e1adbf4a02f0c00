"""Layer views: a Conv / Gemm / MatMul node seen as a (grouped) least-squares problem.

A :class:`LayerView` (:func:`layer_view`) turns a node's input activation into rows of a feature
matrix (im2col for Conv, per group), its output into target rows, and its weights into a
``[groups, features, targets]`` matrix and back to the ONNX layout. The convolution helpers
(:func:`conv_geometry`, :func:`pad_input`, :func:`im2col`) resolve pads/strides/dilations
(``auto_pad`` included) and extract patches at chosen output positions only.

Memory: the im2col matrix is built for at most ``chunk_bytes`` worth of rows at a time, only at the
sampled output positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.errors import InputError
from onnxcompress.core.graph import weight_layout

__all__ = [
    "CHUNK_BYTES",
    "FLAT_BELOW",
    "SUPPORTED_OPS",
    "ConvGeometry",
    "ConvView",
    "GemmView",
    "LayerView",
    "bias_add",
    "channel_features",
    "conv_geometry",
    "decoded_attrs",
    "im2col",
    "layer_view",
    "node_attrs",
    "pad_input",
    "sample_rows",
]

#: Upper bound on the bytes of one chunk of the feature matrix.
CHUNK_BYTES = 32 * 2**20
#: Op types a :class:`LayerView` exists for.
SUPPORTED_OPS = frozenset({"Conv", "Gemm", "MatMul"})
#: Activations whose output is flat (0) below a threshold of their input: ``relu`` (0), ``hardswish`` (-3).
FLAT_BELOW = {"relu": 0.0, "hardswish": -3.0}


# --------------------------------------------------------------------------- conv geometry


@dataclass(frozen=True)
class ConvGeometry:
    """Resolved convolution geometry for one input size (pads are explicit: begins, then ends)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    out: tuple[int, ...]


def decoded_attrs(attrs: dict) -> dict:
    """``attrs`` with byte strings decoded (``auto_pad``)."""
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}


def node_attrs(node: gs.Node) -> dict:
    """``node.attrs`` with byte strings decoded (``auto_pad``)."""
    return decoded_attrs(node.attrs)


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
    #: dtype of the feature and target rows (float32 halves the cost of the normal equations).
    dtype: np.dtype | type = np.float64

    def __init__(self, groups: int, n_features: int, n_targets: int, fit_bias: bool,
                 out_keep: Sequence[int] | None):
        self.groups, self.n_features, self.n_targets = groups, n_features, n_targets
        self.fit_bias = fit_bias
        self.out_keep = None if out_keep is None else np.asarray(out_keep, dtype=np.int64)
        self.attr_updates: dict[str, float] = {}
        #: The activation after the target (a key of :data:`FLAT_BELOW`): targets in its flat region
        #: are relaxed (:meth:`relax`). ``None``: plain least squares on the pre-activation target.
        self.activation: str | None = None
        self._current: tuple[np.ndarray, np.ndarray] | None = None

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
        step = max(1, chunk_bytes // (np.dtype(self.dtype).itemsize * max(1, width)))
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            X = self._gather_x(state, part)
            yield X, self.relax(X, self._gather_y(ystate, part))

    def feature_chunks(self, x: np.ndarray, rows: np.ndarray,
                       chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """Feature rows ``[g, n, F]`` of input ``x`` at ``rows``, in chunks of at most ``chunk_bytes``
        (for statistics of the inputs alone, e.g. a Gram matrix)."""
        state = self._prepare(x)
        step = max(1, chunk_bytes // (np.dtype(self.dtype).itemsize * max(1, self.groups * self.n_features)))
        for start in range(0, len(rows), step):
            yield self._gather_x(state, rows[start:start + step])

    def relax(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Targets ``Y`` that only matter after the activation: where the teacher's ``Y`` lies in the flat
        region (``Y <= t``, :data:`FLAT_BELOW`) any value ``<= t`` gives the same output, so the target
        becomes the node's current output ``Z = X·W + b`` clipped to ``[Y, t]`` (no pull while ``Z``
        stays flat, a pull to ``t`` otherwise). Unchanged without an activation or a fitted bias."""
        flat = FLAT_BELOW.get(self.activation or "")
        if flat is None or not self.fit_bias:
            return Y
        if self._current is None:
            w, b = self.to_matrix()
            self._current = w.astype(self.dtype), b[:, None, :].astype(self.dtype)
        z = X @ self._current[0] + self._current[1]
        dead = np.less_equal(Y, flat)
        return np.where(dead, np.clip(z, Y, flat), Y).astype(Y.dtype, copy=False)

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

    def __init__(self, node: gs.Node, weight: np.ndarray, bias: np.ndarray | None,
                 fit_bias: bool, out_keep: Sequence[int] | None):
        attrs = node_attrs(node)
        group = weight_layout(node, weight.ndim).group
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
        cols = im2col(xp, geom, rows, padded=True).astype(self.dtype, copy=False)
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
        out = y3[batch, :, pos].astype(self.dtype, copy=False).reshape(len(rows), self.groups, self.n_targets)
        out = out.transpose(1, 0, 2)
        return out if self.fit_bias else out - self.bias.reshape(self.groups, 1, self.n_targets).astype(self.dtype)

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

    def __init__(self, node: gs.Node, weight: np.ndarray, bias: np.ndarray | None,
                 fit_bias: bool, out_keep: Sequence[int] | None):
        attrs = node_attrs(node) if node.op == "Gemm" else {}
        layout = weight_layout(node)
        if layout.trans_a:
            raise InputError(f"Gemm {node.name!r}: transA=1 is not supported")
        if weight.ndim != 2:
            raise InputError(f"{node.op} {node.name!r}: weight must be 2-D, got {list(weight.shape)}")
        self.trans_b = layout.out_axis == 0  # Gemm transB: the weight is [N, K]
        k, m = weight.shape[::-1] if self.trans_b else weight.shape
        super().__init__(1, k, m, fit_bias, out_keep)
        self.op_type, self.weight = node.op, weight
        self.alpha, self.beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        self.bias = self._bias_vector(node, bias, m)
        if fit_bias and self.beta == 0.0:
            self.attr_updates = {"beta": 1.0}
            self.beta = 1.0

    def _bias_vector(self, node: gs.Node, bias: np.ndarray | None, m: int) -> np.ndarray:
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
        return state[rows].astype(self.dtype, copy=False)[None]

    def _target_rows(self, y: np.ndarray, state: np.ndarray) -> np.ndarray:
        y2 = self._select_out(y, y.ndim - 1).reshape(-1, self.n_targets)
        if y2.shape[0] != state.shape[0]:
            raise InputError(f"{self.op_type}: target shape {list(y.shape)} does not match the input rows")
        return y2

    def _gather_y(self, y2: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = y2[rows].astype(self.dtype, copy=False)[None]
        return out if self.fit_bias else out - self.bias.astype(self.dtype)

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


def bias_add(node: gs.Node, outputs: set[str] | frozenset[str] = frozenset()) -> tuple[gs.Node, int] | None:
    """``(add, index)`` when the only reader of MatMul ``node``'s output is an ``Add`` of a constant
    bias on the last axis (input ``index``, ``n`` values): the bias of a MatMul on ``[..., k]`` rows
    (a transformer's linear layer). ``None`` otherwise, or when the output is one of ``outputs``."""
    y = node.outputs[0]
    readers = list({id(n): n for n in y.outputs}.values())
    w = node.inputs[1] if node.op == "MatMul" and len(node.inputs) == 2 else None
    if w is None or not isinstance(w, gs.Constant) or y.name in outputs or len(readers) != 1:
        return None
    add = readers[0]
    if add.op != "Add" or (add.domain or "") not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    index = 1 if add.inputs[0] is y else 0
    b = add.inputs[index]
    if add.inputs[1 - index] is not y or not isinstance(b, gs.Constant) or not isinstance(b.values, np.ndarray):
        return None
    n = np.shape(w.values)[-1]
    if b.values.size != n or b.values.shape[-1] != n:
        return None
    return add, index


def layer_view(node: gs.Node, weight: np.ndarray, bias: np.ndarray | None = None, *,
               fit_bias: bool | None = None, out_keep: Sequence[int] | None = None,
               dtype: np.dtype | type = np.float64, activation: str | None = None) -> LayerView:
    """The :class:`LayerView` of a Conv, Gemm or MatMul node with constant ``weight`` (and ``bias``).

    Args:
        node: The node.
        weight: Its weight (input 1) in ONNX layout.
        bias: Its bias (input 2), if any.
        fit_bias: Solve for a bias (default: Conv/Gemm yes, MatMul no; a MatMul may fit the bias
            of the ``Add`` after it, :func:`bias_add`, given as ``bias``). When ``False`` an
            existing bias is kept fixed and subtracted from the targets.
        out_keep: Channels of the target tensor the node's outputs correspond to (when the node's
            outputs were pruned): axis 1 for Conv, the last axis for Gemm/MatMul.
        dtype: dtype of the rows :meth:`LayerView.pairs` yields.
        activation: The activation after the target (:data:`FLAT_BELOW`; :meth:`LayerView.relax`).

    Raises:
        InputError: Unsupported op or layout.
    """
    if node.op not in SUPPORTED_OPS:
        raise InputError(f"node {node.name!r}: cannot reconstruct {node.op} (only {sorted(SUPPORTED_OPS)})")
    if fit_bias is None:
        fit_bias = node.op != "MatMul"
    if fit_bias and node.op == "MatMul" and bias is None:
        raise InputError(f"MatMul {node.name!r}: has no bias input (nor bias Add) to fit")
    cls = ConvView if node.op == "Conv" else GemmView
    view = cls(node, np.asarray(weight), bias, fit_bias, out_keep)
    if activation is not None and activation not in FLAT_BELOW:
        raise InputError(f"activation {activation!r}: one of {sorted(FLAT_BELOW)}")
    view.dtype, view.activation = dtype, activation
    return view
