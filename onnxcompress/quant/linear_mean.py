"""A linear layer's output channel means from sums of its input, without running the layer.

Bias correction compares the per-channel mean of a quantized layer's output (before its output
QuantizeLinear) with the float model's. That mean is linear in the layer's input, so it follows
from sums of the input:

* Conv (any rank, strides, dilations, pads or ``auto_pad``, groups): keep ``T``, the sum over
  samples of the input at each channel and position. With ``T_pad`` zero-padded as the Conv pads,
  ``P`` output positions per sample and ``n`` samples::

      mean_c = 1 / (n P) * sum_{i, k} W[c, i, k] U[i, k] + b_c
      U[i, k] = sum over output positions p of T_pad[i, p * stride + k * dilation]

* Gemm: ``alpha * mean_rows(A') @ B' + beta * C`` (``A'``, ``B'`` transposed as the node says);
* an Add of a per-channel constant (a MatMul's bias adder): ``mean(other input) + b``.

Before: the layer ran in float on every sample (its output was a segment output, so onnxruntime
could not fuse it into an int8 kernel) and its output was averaged. The numbers are the same up to
rounding (float64 sums here, float32 arithmetic there). When the input is read as the integer
tensor its DequantizeLinear dequantizes (per-tensor scale ``s`` and zero point ``z``), the sums are
exact integers and ``x = s (q - z)`` is applied to the sums.

:func:`linear_sums` declines (returns ``None``; the caller runs the layer instead): ConvTranspose,
a weight or bias that is not a constant, an input dequantized with a scale or zero point that is
not one constant, a Gemm input that is not 2-D.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import const_values, opt_input
from onnxcompress.quant.bias_correction import BiasSite, ChannelMoments, bias_values
from onnxcompress.reconstruct.layerview import conv_geometry, node_attrs, pad_input

__all__ = ["LinearSums", "ConvSums", "RowSums", "linear_sums"]


@dataclass(frozen=True)
class _Dequant:
    """``x = scale * (q - zero)`` of a per-tensor DequantizeLinear (identity for a float input)."""

    scale: float = 1.0
    zero: float = 0.0

    def sums(self, total: np.ndarray, count: int) -> np.ndarray:
        """The sums of ``x`` from the sums of ``q`` over ``count`` values each."""
        return self.scale * (total.astype(np.float64) - count * self.zero)


class LinearSums:
    """Sums of a layer's input that give its output channel means (see the module docstring).

    Attributes:
        source: The tensor :meth:`update` expects: the layer's input, or the integer tensor its
            DequantizeLinear reads.
    """

    source: str

    def update(self, values: np.ndarray) -> None:
        """Add a batch of ``source`` values (axis 0: samples)."""
        raise NotImplementedError

    def mean(self) -> np.ndarray:
        """The layer's output mean per channel (float64)."""
        raise NotImplementedError


class ConvSums(LinearSums):
    """A Conv's input summed over samples, kept per spatial size (dynamic sizes sum separately)."""

    def __init__(self, source: str, dequant: _Dequant, node: gs.Node, weight: np.ndarray, bias: np.ndarray):
        self.source, self.dequant = source, dequant
        self.attrs, self.weight, self.bias = node_attrs(node), weight, bias
        self.group = int(self.attrs.get("group", 1))
        self.totals: dict[tuple[int, ...], list] = {}  # spatial size -> [sum over samples, samples]

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values)
        exact = x.dtype.kind in "iu" and x.itemsize == 1  # integer sums: exact, so batching does not matter
        entry = self.totals.get(tuple(x.shape[2:]))
        if entry is None:
            entry = self.totals[tuple(x.shape[2:])] = [np.zeros(x.shape[1:], np.int64 if exact else np.float64), 0]
        total = entry[0]
        if exact and len(x) > 1:
            total += x.sum(axis=0, dtype=np.int32)  # |sum| < 2^31 below 2^23 samples a batch
        else:
            for sample in x:  # one sample at a time, like ChannelMoments: batching does not change the sum
                total += sample
        entry[1] += len(x)

    def mean(self) -> np.ndarray:
        out = np.zeros(self.weight.shape[0])
        positions = 0
        for shape in sorted(self.totals):
            total, samples = self.totals[shape]
            window, per_sample = self._window_sums(self.dequant.sums(total, samples), shape)
            groups = self.group
            w = self.weight.reshape(groups, self.weight.shape[0] // groups, self.weight.shape[1], -1)
            u = window.reshape(groups, self.weight.shape[1], -1)
            out += np.einsum("gmik,gik->gm", w, u).reshape(-1)
            positions += samples * per_sample
        return out / max(positions, 1) + self.bias

    def _window_sums(self, total: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
        """``U[i, k]``, the input sum under kernel offset ``k`` over every output position, and the
        number of output positions per sample."""
        geom = conv_geometry(self.attrs, self.weight.shape[2:], shape)
        padded = pad_input(total[None], geom)[0]
        window = np.empty((total.shape[0], *geom.kernel))
        spatial = tuple(range(1, padded.ndim))
        for offset in itertools.product(*(range(k) for k in geom.kernel)):
            cut = tuple(slice(k * d, k * d + (o - 1) * s + 1, s)
                        for k, d, o, s in zip(offset, geom.dilations, geom.out, geom.strides))
            window[(slice(None), *offset)] = padded[(slice(None), *cut)].sum(axis=spatial)
        return window, int(np.prod(geom.out))


class RowSums(LinearSums):
    """The mean input row of a Gemm (``mean_rows(A') @ B'``) or of a bias Add (``mean + b``)."""

    def __init__(self, source: str, dequant: _Dequant, axis: int, weight: np.ndarray | None, bias: np.ndarray,
                 alpha: float = 1.0):
        self.source, self.dequant = source, dequant
        self.moments = ChannelMoments(axis, variance=False)
        self.weight, self.bias, self.alpha = weight, bias, alpha

    def update(self, values: np.ndarray) -> None:
        self.moments.update(values)

    def mean(self) -> np.ndarray:
        row = self.dequant.sums(self.moments.total, self.moments.count) / max(self.moments.count, 1)
        return (row if self.weight is None else self.alpha * (row @ self.weight)) + self.bias


def linear_sums(site: BiasSite, stored: Callable[[gs.Tensor], str]) -> LinearSums | None:
    """The sums that give ``site``'s output means, or ``None`` where the layer is not handled
    (module docstring). They read the layer's input (the Add's other input for a MatMul) as
    ``stored(input)`` names it: the input itself, or the integer input of its DequantizeLinear."""
    node, target = site.node, site.target
    read = target.inputs[1 - site.slot] if node.op == "MatMul" else node.inputs[0]
    source = stored(read)
    dequant = _dequant(read, source)
    if dequant is None or node.op == "ConvTranspose":
        return None
    bias = _bias(target, site)
    weight = None if node.op == "MatMul" else bias_values(node.inputs[1])
    if bias is None or (node.op != "MatMul" and weight is None):
        return None
    if node.op == "Conv":
        return ConvSums(source, dequant, node, weight, bias)
    if node.op == "MatMul":
        return RowSums(source, dequant, site.axis, None, bias)
    attrs = node_attrs(node)
    if read.shape is not None and len(read.shape) != 2:
        return None
    weight = weight.T if attrs.get("transB", 0) else weight
    return RowSums(source, dequant, 0 if attrs.get("transA", 0) else 1, weight, bias * site.bias_scale_divisor,
                   float(attrs.get("alpha", 1.0)))


def _dequant(read: gs.Tensor, source: str) -> _Dequant | None:
    """How ``source`` gives ``read``: itself, or through ``read``'s per-tensor DequantizeLinear."""
    if source == read.name:
        return _Dequant()
    dq = read.inputs[0] if read.inputs else None
    if dq is None or dq.op != "DequantizeLinear" or dq.inputs[0].name != source:
        return None
    scale = const_values(opt_input(dq, 1))
    zp_t = opt_input(dq, 2)
    zero = const_values(zp_t) if zp_t is not None else np.zeros(())
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    return _Dequant(float(scale.reshape(())), float(zero.reshape(())))


def _bias(target: gs.Node, site: BiasSite) -> np.ndarray | None:
    """The site's bias per channel (zeros where there is none yet)."""
    if site.slot is None:
        return np.zeros(site.channels)
    values = bias_values(target.inputs[site.slot])
    return None if values is None else np.broadcast_to(values.reshape(-1), (site.channels,)).astype(np.float64)
