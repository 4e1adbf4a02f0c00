"""GPTQ: round weights one input row at a time, pushing each row's rounding error onto the rows
not yet rounded, weighted by the inverse Hessian of the layer's output error.

For ``y = x·W`` (``W`` ``[K, N]``) and calibration inputs ``X`` ``[n, K]``, the output error of a
weight change ``ΔW`` is ``‖X·ΔW‖² = tr(ΔWᵀ·H·ΔW)`` with ``H = XᵀX``. Rounding row ``k`` to
``q_k`` and compensating on rows ``k+1..K`` optimally (the OBS update) gives::

    e   = (w_k − q_k) / U[k, k]
    W[k+1:] −= U[k, k+1:]ᵀ · e

where ``U`` is the upper Cholesky factor of ``(H + λI)⁻¹``, ``λ = damp · mean(diag H)``. Rows
are processed in lazy batches of :data:`LAZY_ROWS` (the update of the rows after a batch is one
matrix product). Rows never excited by the data (``H_kk = 0``) get weight 0's code.

Scales: static groups: each block's scale (and zero point) is chosen from the original weights
(:func:`onnxcompress.quant.weightonly.block_scales`, with the search weighted by ``diag H``),
so the row order is free: ``act_order`` rounds rows by decreasing ``H_kk`` (most excited first),
which lets the least important rows absorb the error.

Convolutions (:func:`gptq_conv`): a Conv is a matrix product on im2col patches, so its Hessian is
``XᵀX`` of the patches ``[positions, Cin·kh·kw]`` (:class:`HessianInput` with
:func:`conv_rows`) and the weight ``[Cout, Cin, kh, kw]`` is the ``[Cin·kh·kw, Cout]`` matrix of
those rows. Its scales keep the weight's own layout (:class:`~onnxcompress.quant.weightonly.ConvLayout`:
per output channel, or blocks of input channels per output channel and kernel position), expanded
to one scale per element of that matrix, so rows are rounded in im2col order with error feedback
across input channels and kernel positions alike. Grouped convs have one Hessian per group and
are not handled here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.quant.weightonly import BlockQuant, ConvLayout, block_scales, qrange
from onnxcompress.reconstruct.layerview import conv_geometry, decoded_attrs, im2col
from onnxcompress.reconstruct.lstsq import LstsqAccumulator
from onnxcompress.runtime.capture import capture
from onnxcompress.runtime.data import CalibSource

__all__ = ["DEFAULT_DAMP", "LAZY_ROWS", "HessianInput", "collect_hessians", "conv_rows", "gptq", "gptq_codes",
           "gptq_conv", "im2col_matrix", "output_error"]

#: Default relative damping of the Hessian diagonal.
DEFAULT_DAMP = 0.01
#: Rows per lazy update batch.
LAZY_ROWS = 128


def _inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹`` (damping raised until positive definite)."""
    k = h.shape[0]
    import scipy.linalg  # here: scipy costs start-up time to every run

    mean = float(np.mean(np.diag(h))) or 1.0
    for extra in (1.0, 10.0, 100.0, 1000.0):
        a = h + (damp * extra) * mean * np.eye(k)
        try:
            inv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=False), np.eye(k))
            return scipy.linalg.cholesky((inv + inv.T) / 2, lower=False)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Hessian is not positive definite even after damping")


def gptq(w: np.ndarray, h: np.ndarray, bits: int, block: int, symmetric: bool = True, *,
         damp: float = DEFAULT_DAMP, act_order: bool = False, search: bool = True) -> BlockQuant:
    """GPTQ quantization of ``w`` ``[K, N]`` given the input Hessian ``h = XᵀX`` ``[K, K]``."""
    k = w.shape[0]
    block = block or k
    row_weight = np.where(np.diag(h) > 0, np.diag(h), 1.0)  # dead rows: weight 1, value 0
    w0 = np.where((np.diag(h) <= 0)[:, None], 0.0, np.asarray(w, np.float64))
    scale, zero = block_scales(w0, bits, block, symmetric, search, row_weight=row_weight)
    rows_scale = np.repeat(scale, block, axis=0)[:k]
    rows_zero = None if zero is None else np.repeat(zero, block, axis=0)[:k]
    codes = gptq_codes(w, h, rows_scale, rows_zero, bits, damp=damp, act_order=act_order)
    return BlockQuant(codes, scale, zero, bits, block)


def gptq_codes(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, *,
               damp: float = DEFAULT_DAMP, act_order: bool = False) -> np.ndarray:
    """GPTQ codes (int16 ``[K, N]``) of ``w`` ``[K, N]`` for fixed per-element scales ``scale``
    ``[K, N]`` (and zero points; ``None``: symmetric signed codes) and the Hessian ``h`` ``[K, K]``.
    Rows never excited (``H_kk = 0``) get weight 0's code."""
    w = np.asarray(w, np.float64).copy()
    k = w.shape[0]
    h = np.asarray(h, np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    u = _inverse_factor(h[np.ix_(order, order)], damp)
    rows_zero = None if zero is None else np.asarray(zero, np.float64)[order]
    codes = _rounded_rows(w[order], u, np.asarray(scale, np.float64)[order], rows_zero, bits, zero is None)
    out = np.empty_like(codes)
    out[order] = codes
    return out.astype(np.int16)


def gptq_conv(weight: np.ndarray, h: np.ndarray, layout: ConvLayout, bits: int, symmetric: bool = True, *,
              damp: float = DEFAULT_DAMP, act_order: bool = False, search: bool = True) -> BlockQuant:
    """GPTQ of a Conv weight ``[Cout, Cin, *kernel]`` (``group=1``) given the Hessian ``h`` of its
    im2col patches ``[Cin·prod(kernel)]²``; the result is in ``layout``'s ``[K, N]`` matrix form
    (as :func:`~onnxcompress.quant.weightonly.rtn` on ``layout.matrix(weight)`` gives it)."""
    mat = layout.matrix(weight)
    block = layout.block or mat.shape[0]
    scale, zero = block_scales(mat, bits, block, symmetric, search)
    base = BlockQuant(np.zeros(mat.shape, np.int16), scale, zero, bits, block)

    im = im2col_matrix
    s_rows = im(layout.tensor(base.rows(scale)))
    z_rows = None if zero is None else im(layout.tensor(base.rows(zero)))
    codes = gptq_codes(im(weight), h, s_rows, z_rows, bits, damp=damp, act_order=act_order)
    moved = codes.reshape(*weight.shape[1:], weight.shape[0])
    base.codes = layout.matrix(np.moveaxis(moved, -1, 0)).astype(np.int16)
    return base


def _rounded_rows(w: np.ndarray, u: np.ndarray, s: np.ndarray, z: np.ndarray | None, bits: int,
                  symmetric: bool) -> np.ndarray:
    """Codes of ``w`` (rows in processing order, modified in place) with error feedback."""
    qlo, qhi = qrange(bits, symmetric)
    k = w.shape[0]
    codes = np.empty(w.shape, np.float64)
    zero = np.zeros_like(s) if z is None else z
    for i1 in range(0, k, LAZY_ROWS):
        i2 = min(i1 + LAZY_ROWS, k)
        err = np.empty((i2 - i1, w.shape[1]))
        for i in range(i1, i2):
            q = np.clip(np.round(w[i] / s[i]) + zero[i], qlo, qhi)
            codes[i] = q
            e = (w[i] - (q - zero[i]) * s[i]) / u[i, i]
            w[i + 1:i2] -= np.outer(u[i, i + 1:i2], e)
            err[i - i1] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    return codes


def output_error(h: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    """Relative output error ``sqrt(tr(ΔWᵀHΔW) / tr(WᵀHW))`` of replacing ``w`` by ``w_hat``."""
    d = np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)
    w = np.asarray(w, np.float64)
    num = float(np.sum(d * (h @ d)))
    den = float(np.sum(w * (h @ w)))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def im2col_matrix(a: np.ndarray) -> np.ndarray:
    """A Conv weight-shaped array ``[Cout, Cin, *kernel]`` as the ``[Cin·prod(kernel), Cout]`` matrix
    that multiplies im2col patches (rows in :func:`~onnxcompress.reconstruct.layerview.im2col`'s order)."""
    return np.moveaxis(a, 0, -1).reshape(-1, a.shape[0])


@dataclass(frozen=True)
class HessianInput:
    """One Hessian to collect: ``key`` names it, ``tensor`` is the activation captured, ``k`` the
    number of features, ``rows`` maps a captured batch to ``[n, k]`` feature rows (default: every
    row of the tensor's last axis, as a MatMul reads it)."""

    key: str
    tensor: str
    k: int
    rows: Callable[[np.ndarray], np.ndarray] | None = None


def conv_rows(attrs: dict, kernel: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """A :attr:`HessianInput.rows` for a Conv (``group=1``) with these attributes: the im2col
    patches of a batch ``[N, Cin, *spatial]`` at every output position (geometry resolved per batch,
    ``auto_pad`` included)."""
    attrs = decoded_attrs(attrs)

    def rows(x: np.ndarray) -> np.ndarray:
        return im2col(x, conv_geometry(attrs, kernel, x.shape[2:]))
    return rows


def collect_hessians(model: onnx.ModelProto, inputs: Iterable[tuple[str, int] | HessianInput], data: CalibSource, *,
                     batch_size: int = 8, progress: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """``({key: XᵀX [K, K]}, samples)`` over ``data`` for each input: a ``(tensor, K)`` pair (key:
    the tensor; every row of its last axis is one input vector, all positions of every sample) or a
    :class:`HessianInput`; accumulated in float64
    (:class:`~onnxcompress.reconstruct.lstsq.LstsqAccumulator` without a bias: its Gram matrix)."""
    specs = [i if isinstance(i, HessianInput) else HessianInput(i[0], i[0], i[1]) for i in inputs]
    accs = {spec.key: LstsqAccumulator(spec.k, 1, fit_bias=False) for spec in specs}

    def consume(batch, tensors: dict[str, np.ndarray]) -> None:
        for spec in specs:
            t = tensors[spec.tensor]
            x = (spec.rows(t) if spec.rows else t).reshape(-1, spec.k)
            accs[spec.key].add(x, np.zeros((x.shape[0], 1)))

    samples = capture(model, list(dict.fromkeys(s.tensor for s in specs)), data, consume, batch_size=batch_size,
                      progress=progress)
    return {key: acc.gram() for key, acc in accs.items()}, samples
