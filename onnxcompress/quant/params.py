"""Quantization parameters: activation scale/zero point, int8 weights, int32 biases.

Conventions (what onnxruntime's CPU kernels expect):

* Activations, asymmetric (default): uint8, ``scale = (hi - lo) / 255`` over the range widened to
  include 0, ``zero_point = round(-lo / scale)``, so 0.0 is exactly representable.
* Activations, symmetric: int8, ``zero_point = 0``, ``scale = max(|lo|, |hi|) / 127``. One-sided
  tensors (the output of a Relu/Clip folded into the quantized op before it) use int8 with
  ``zero_point = -128`` and ``scale = hi / 255`` instead, so onnxruntime can still drop the Relu
  (it only does when the zero point is the type's minimum) and no level is wasted.
* Weights: int8 symmetric, ``zero_point = 0``, ``scale_c = max|W_c| / 127`` per output channel
  (``reduce_range``: ``/ 64``, i.e. 7-bit weights in ``[-64, 64]``); an all-zero channel gets
  scale 1.
* Bias: int32, ``scale_c = s_in * s_w[c]``, ``zero_point = 0``, ``b_q = round(b / scale_c)``.
  A channel whose bias would overflow int32 gets a larger weight scale.

A degenerate range (``lo == hi``, e.g. a tensor that is always 0) gets scale 1 and is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxcompress.core.graph import broadcast_along

__all__ = ["QParams", "activation_params", "quantize_weight", "quantize_bias", "bias_safe_weight_scale",
           "quantize_values", "INT32_MAX"]

INT32_MAX = 2**31 - 1
_SAFE_SCALE = 1.0


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one tensor (scalars, or vectors along ``axis``).

    Attributes:
        scale: float32 array (0-D or 1-D).
        zero_point: uint8 / int8 / int32 array of the same shape.
        axis: The quantized axis for 1-D parameters, else ``None``.
        degenerate: The range was empty and the safe scale 1 was used.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    degenerate: bool = False

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.zero_point.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.zero_point.dtype).max)


def activation_params(lo: float, hi: float, *, symmetric: bool = False, one_sided: bool = False) -> QParams:
    """Per-tensor parameters for an activation with calibrated range ``[lo, hi]``.

    Args:
        lo: Range minimum.
        hi: Range maximum.
        symmetric: int8 with zero point 0 (``one_sided``: zero point -128) instead of uint8.
        one_sided: The tensor is known to be ``>= 0`` (a folded Relu/Clip output).
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if one_sided:
        lo = 0.0
    if symmetric and not one_sided:
        t = max(-lo, hi)
        degenerate = t <= 0.0
        scale = _SAFE_SCALE if degenerate else t / 127.0
        return QParams(np.array(scale, np.float32), np.array(0, np.int8), degenerate=degenerate)
    degenerate = hi - lo <= 0.0
    scale = _SAFE_SCALE if degenerate else (hi - lo) / 255.0
    scale32 = np.float32(scale)
    if symmetric:  # one-sided int8: the whole [0, hi] on [-128, 127]
        return QParams(np.array(scale32), np.array(-128, np.int8), degenerate=degenerate)
    zp = 0 if degenerate else int(np.clip(np.round(-lo / float(scale32)), 0, 255))
    return QParams(np.array(scale32), np.array(zp, np.uint8), degenerate=degenerate)


def _reduce_except(a: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.asarray(np.abs(a).max() if a.size else 0.0)
    others = tuple(i for i in range(a.ndim) if i != axis)
    return np.abs(a).max(axis=others) if others else np.abs(a)


def quantize_weight(w: np.ndarray, axis: int | None, *, qmax: int = 127,
                    min_scale: np.ndarray | None = None) -> tuple[np.ndarray, QParams]:
    """Symmetric int8 quantization of a weight, per channel along ``axis`` (``None``: per tensor).

    ``W_q = clip(round(W / s), -qmax, qmax)`` with ``s = max|W_c| / qmax`` stored as float32
    (the division uses the stored float32 scale, so ``DequantizeLinear`` reproduces ``s * W_q``).

    Args:
        w: The float weight.
        axis: Channel axis, or ``None`` for one scale.
        qmax: 127, or 64 with ``reduce_range``.
        min_scale: Lower bounds for the scales (see :func:`bias_safe_weight_scale`).

    Returns:
        ``(int8 weight, params)``; all-zero channels get scale 1.
    """
    amax = _reduce_except(w, axis).astype(np.float64)  # |w| and max are exact: the same as in float64
    scale = np.where(amax > 0, amax / qmax, _SAFE_SCALE)
    if min_scale is not None:
        scale = np.maximum(scale, min_scale)
    scale32 = scale.astype(np.float32)
    scale64 = scale32.astype(np.float64)
    q = w.astype(np.float64)  # then in place: clip(round(w / s)), the same values, one float64 copy
    q /= scale64 if axis is None else broadcast_along(scale64, w.ndim, axis)
    np.round(q, out=q)
    np.clip(q, -qmax, qmax, out=q)
    params = QParams(scale32, np.zeros(scale32.shape, np.int8), axis if scale32.ndim else None)
    return q.astype(np.int8), params


def bias_safe_weight_scale(bias: np.ndarray, s_in: float) -> np.ndarray:
    """Smallest weight scales for which ``bias / (s_in * s_w)`` fits in int32."""
    return np.abs(bias.astype(np.float64)) / (float(s_in) * (INT32_MAX - 1))


def quantize_bias(bias: np.ndarray, s_in: float, w_params: QParams) -> tuple[np.ndarray, QParams]:
    """int32 bias with ``scale = s_in * s_w`` (per channel when the weight is) and zero point 0.

    ``b_q = round(b / (s_in * s_w))`` computed in float64 from the stored float32 scales.
    """
    scale = np.float64(s_in) * w_params.scale.astype(np.float64)
    q = np.clip(np.round(bias.astype(np.float64) / scale), -INT32_MAX, INT32_MAX).astype(np.int32)
    scale32 = np.broadcast_to(scale, q.shape).astype(np.float32) if scale.ndim else scale.astype(np.float32)
    axis = 0 if scale32.ndim else None
    return q, QParams(scale32, np.zeros(scale32.shape, np.int32), axis)


def quantize_values(values: np.ndarray, params: QParams) -> np.ndarray:
    """``clip(round(x / scale) + zero_point)`` in the zero point's dtype (per-tensor params)."""
    info = np.iinfo(params.zero_point.dtype)
    q = np.round(values.astype(np.float64) / float(params.scale)) + int(params.zero_point)
    return np.clip(q, info.min, info.max).astype(params.zero_point.dtype)
