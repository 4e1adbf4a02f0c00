"""Weight-only low-bit quantization, the math: block scales, round-to-nearest, bit packing.

A weight ``W`` is a ``[K, N]`` matrix (``y = x·W``: ``K`` input features, ``N`` outputs), quantized
in blocks of ``block`` consecutive rows (along ``K``) per output column: block ``b`` of column ``n``
has a scale ``s[b, n]`` and, when asymmetric, an integer zero point ``z[b, n]``; a code ``q``
stands for ``(q − z)·s``.

* Symmetric: signed codes in ``[−2^(bits−1), 2^(bits−1) − 1]``, ``z = 0``,
  ``s = r·max|W_block| / (2^(bits−1) − 1)``.
* Asymmetric: unsigned codes in ``[0, 2^bits − 1]``, ``s = r·(max − min) / (2^bits − 1)``,
  ``z = round(−r·min / s)`` over the block's range widened to contain 0.

``r`` is 1 without ``search``; with it, each block takes the ``r`` of :data:`SEARCH_RATIOS` that
minimises its squared rounding error (clipping a few outliers to round the rest more finely).
A ``K`` that ``block`` does not divide leaves a short last block. ``block = 0``: one block of all
``K`` rows (per output channel).

:func:`pack_bits` packs unsigned codes low-bits-first into bytes (the layout of onnxruntime's
``MatMulNBits``: 2, 4 or 8 bits, several codes per byte along ``K``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SEARCH_RATIOS",
    "BlockQuant",
    "ConvLayout",
    "block_scales",
    "codes_for",
    "conv_layout",
    "pack_bits",
    "qrange",
    "rtn",
    "unpack_bits",
]

#: Range shrink (and stretch) factors the scale search tries, per block.
SEARCH_RATIOS = tuple(float(r) for r in np.round(np.linspace(0.6, 1.15, 23), 4))


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The code range: signed ``[−2^(b−1), 2^(b−1)−1]`` when symmetric, else ``[0, 2^b − 1]``."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


@dataclass
class BlockQuant:
    """A quantized ``[K, N]`` weight.

    Attributes:
        codes: ``[K, N]`` int16 codes (signed when symmetric, else unsigned values).
        scale: ``[ceil(K / block), N]`` float32 scales.
        zero: ``[ceil(K / block), N]`` int16 zero points (``None`` when symmetric: 0).
        bits: Code width.
        block: Rows per block (``K`` for one block per column).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    bits: int
    block: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def rows(self, values: np.ndarray) -> np.ndarray:
        """Per-block ``[nb, N]`` values repeated to ``[K, N]``."""
        return np.repeat(values, self.block, axis=0)[: self.codes.shape[0]]

    def dequantize(self) -> np.ndarray:
        """``(q − z)·s`` as float32 ``[K, N]``."""
        q = self.codes.astype(np.float32)
        if self.zero is not None:
            q = q - self.rows(self.zero).astype(np.float32)
        return (q * self.rows(self.scale)).astype(np.float32)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """``[nb, block, N]`` view of ``w`` (last block padded by repeating its last row)."""
    k, n = w.shape
    nb = math.ceil(k / block)
    pad = nb * block - k
    if pad:
        w = np.concatenate([w, np.repeat(w[-1:], pad, axis=0)], axis=0)
    return w.reshape(nb, block, n)


def _params(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) covering ``[lo, hi]`` (per block and column)."""
    qlo, qhi = qrange(bits, symmetric)
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = amax / qhi
        return np.where(scale > 0, scale, 1.0).astype(np.float32), None
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = (hi - lo) / (qhi - qlo)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.round(qlo - lo / scale), qlo, qhi)
    return scale, zero.astype(np.int16)


def _round(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, symmetric: bool) -> np.ndarray:
    qlo, qhi = qrange(bits, symmetric)
    z = 0 if zero is None else zero[:, None, :]
    return np.clip(np.round(blocks / scale[:, None, :]) + z, qlo, qhi)


def _error(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, symmetric: bool,
           weight: np.ndarray | None) -> np.ndarray:
    """Squared rounding error per ``[nb, N]`` block (rows weighted by ``weight`` ``[nb, block, 1]``)."""
    q = _round(blocks, scale, zero, bits, symmetric)
    z = 0 if zero is None else zero[:, None, :]
    err = ((q - z) * scale[:, None, :] - blocks) ** 2
    return (err if weight is None else err * weight).sum(axis=1)


def block_scales(w: np.ndarray, bits: int, block: int, symmetric: bool = True, search: bool = True,
                 row_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales ``[nb, N]`` (and zero points) of ``w`` ``[K, N]`` in blocks of ``block`` rows.

    ``row_weight`` (``[K]``, e.g. the diagonal of the input Hessian) weights each row's rounding
    error in the search.
    """
    block = block or w.shape[0]
    blocks = _blocks(np.asarray(w, np.float32), block)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    scale, zero = _params(lo, hi, bits, symmetric)
    if not search:
        return scale, zero
    weight = None if row_weight is None else _blocks(np.asarray(row_weight, np.float32)[:, None], block)
    best = _error(blocks, scale, zero, bits, symmetric, weight)
    for r in SEARCH_RATIOS:
        s, z = _params(lo * r, hi * r, bits, symmetric)
        err = _error(blocks, s, z, bits, symmetric, weight)
        better = err < best
        best = np.where(better, err, best)
        scale = np.where(better, s, scale)
        if zero is not None and z is not None:
            zero = np.where(better, z, zero)
    return scale, zero


def codes_for(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, block: int) -> np.ndarray:
    """Round ``w`` ``[K, N]`` to codes with the given block parameters."""
    k = w.shape[0]
    q = _round(_blocks(np.asarray(w, np.float32), block), scale, zero, bits, zero is None)
    return q.reshape(-1, w.shape[1])[:k].astype(np.int16)


def rtn(w: np.ndarray, bits: int, block: int, symmetric: bool = True, search: bool = True,
        row_weight: np.ndarray | None = None) -> BlockQuant:
    """Round-to-nearest block quantization of ``w`` ``[K, N]`` (``block = 0``: per column)."""
    block = block or w.shape[0]
    scale, zero = block_scales(w, bits, block, symmetric, search, row_weight)
    return BlockQuant(codes_for(w, scale, zero, bits, block), scale, zero, bits, block)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (last axis a multiple of ``8 // bits``) low bits first into uint8."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes into bytes (1, 2, 4 or 8)")
    per = 8 // bits
    c = np.asarray(codes).astype(np.uint8)
    if c.shape[-1] % per:
        raise ValueError(f"last axis {c.shape[-1]} is not a multiple of {per}")
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (uint8 codes)."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    mask = np.uint8((1 << bits) - 1)
    c = (np.asarray(packed, np.uint8)[..., None] >> shifts) & mask
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)


@dataclass(frozen=True)
class ConvLayout:
    """How a Conv/ConvTranspose weight maps to the ``[K, N]`` matrix the block math works on.

    Per output channel (``block == 0``): ``N`` is the output-channel ``axis`` (0 for Conv, 1 for
    ConvTranspose), ``K`` every other element. Blocked: ``K`` is the input-channel ``axis`` (1 for
    Conv, 0 for ConvTranspose) cut in blocks of ``block``, ``N`` every other element (one scale
    per block, output channel and kernel position: ``DequantizeLinear``'s blocked layout).
    """

    shape: tuple[int, ...]
    axis: int
    block: int

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """The ``[K, N]`` matrix of weight ``w``."""
        if self.block:
            return np.moveaxis(w, self.axis, 0).reshape(self.shape[self.axis], -1)
        return np.moveaxis(w, self.axis, -1).reshape(-1, self.shape[self.axis])

    def tensor(self, a: np.ndarray) -> np.ndarray:
        """A ``[rows, N]`` matrix (codes: ``rows = K``; block scales: one row per block) back in
        the weight's layout (per channel: ``[1, N]`` scales become the 1-D ``[N]`` vector)."""
        if not self.block:
            if a.shape[0] == 1:
                return np.ascontiguousarray(a[0])
            moved = tuple(d for i, d in enumerate(self.shape) if i != self.axis) + (self.shape[self.axis],)
            return np.ascontiguousarray(np.moveaxis(a.reshape(moved), -1, self.axis))
        rest = tuple(d for i, d in enumerate(self.shape) if i != self.axis)
        return np.ascontiguousarray(np.moveaxis(a.reshape((a.shape[0],) + rest), 0, self.axis))


def conv_layout(op: str, shape: tuple[int, ...], block_size: int) -> ConvLayout:
    """The layout of a ``Conv``/``ConvTranspose`` weight quantized in blocks of ``block_size`` input
    channels; per output channel when ``block_size <= 0`` or the weight has fewer input channels
    (per group) than one block (depthwise convs, first layers)."""
    out_axis, in_axis = (0, 1) if op == "Conv" else (1, 0)
    if block_size <= 0 or shape[in_axis] < block_size:
        return ConvLayout(tuple(shape), out_axis, 0)
    return ConvLayout(tuple(shape), in_axis, block_size)
