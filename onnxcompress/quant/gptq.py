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
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from onnxcompress.quant.weightonly import BlockQuant, block_scales, qrange
from onnxcompress.reconstruct.lstsq import LstsqAccumulator
from onnxcompress.runtime.capture import capture
from onnxcompress.runtime.data import CalibSource

__all__ = ["DEFAULT_DAMP", "LAZY_ROWS", "collect_hessians", "gptq", "output_error"]

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
    w = np.asarray(w, np.float64).copy()
    k, n = w.shape
    block = block or k
    h = np.asarray(h, np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    scale, zero = block_scales(w, bits, block, symmetric, search, row_weight=np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    u = _inverse_factor(h[np.ix_(order, order)], damp)
    rows_scale = np.repeat(scale, block, axis=0)[:k][order].astype(np.float64)
    rows_zero = None if zero is None else np.repeat(zero, block, axis=0)[:k][order].astype(np.float64)
    wp = w[order]
    codes = _rounded_rows(wp, u, rows_scale, rows_zero, bits, symmetric)
    out = np.empty_like(codes)
    out[order] = codes
    return BlockQuant(out.astype(np.int16), scale, zero, bits, block)


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


def collect_hessians(model: onnx.ModelProto, inputs: Iterable[tuple[str, int]], data: CalibSource, *,
                     batch_size: int = 8, progress: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """``({tensor: XᵀX [K, K]}, samples)`` over ``data`` for each ``(tensor, K)``: every row of the
    tensor's last axis is one input vector (all positions of every sample), accumulated in float64
    (:class:`~onnxcompress.reconstruct.lstsq.LstsqAccumulator` without a bias: its Gram matrix)."""
    accs = {name: LstsqAccumulator(k, 1, fit_bias=False) for name, k in inputs}

    def consume(batch, tensors: dict[str, np.ndarray]) -> None:
        for name, acc in accs.items():
            x = tensors[name].reshape(-1, acc.n_features)
            acc.add(x, np.zeros((x.shape[0], 1)))

    samples = capture(model, list(accs), data, consume, batch_size=batch_size, progress=progress)
    return {name: acc.gram() for name, acc in accs.items()}, samples
