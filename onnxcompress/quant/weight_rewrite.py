"""Weight-only quantization, the graph side: the node forms a quantized weight takes.

* :func:`dq_weight` — standard ``DequantizeLinear`` (opset 21: ``block_size`` along ``K``;
  int4/uint4/int8/uint8 codes; per-channel: per-axis scales) whose output replaces the weight.
* :func:`dq_conv_weight` — the same for a Conv/ConvTranspose weight (per output channel, or
  blocks along the input channels; see :class:`onnxcompress.quant.weightonly.ConvLayout`).
* :func:`matmulnbits_node` — onnxruntime's ``com.microsoft.MatMulNBits``: unsigned codes packed
  low bits first along ``K`` into ``B [N, k_blocks, block·bits/8]``, scales ``[N, k_blocks]``,
  zero points packed the same way (symmetric: omitted, the default ``2^(bits−1)`` is used, so
  the stored code is ``q + 2^(bits−1)``); ``K`` padded to whole blocks with the zero point.
* :func:`codebook_weight` — k-means: ``Gather(codebook, Cast(indices))`` (uint4 indices up to
  4 bits, uint8 above): a constant subgraph onnxruntime folds into a float weight when the
  session starts (small file, float speed).
* :func:`gather_rows` — an embedding ``Gather`` that dequantizes only the rows it gathers:
  standard form: ``Gather`` of the int8 table (4-bit: a uint8 table of packed code pairs,
  unpacked with ``BitwiseAnd``/``BitShift``) and of the per-row block scales (and zero points),
  then a blocked ``DequantizeLinear`` along the last axis (8-bit symmetric codes whose blocks
  divide the row: ``Cast`` to float and ``Mul`` by the gathered scales, the same values, faster
  in onnxruntime); onnxruntime form: ``com.microsoft.GatherBlockQuantized``.

Codes come from :class:`onnxcompress.quant.weightonly.BlockQuant` (``[K, N]``, blocks along ``K``).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, lowbit_constant
from onnxcompress.quant.weightonly import BlockQuant, ConvLayout, pack_bits

__all__ = ["MS_DOMAIN", "codebook_weight", "dq_conv_weight", "dq_weight", "gather_rows", "matmulnbits_node", "unsigned_codes"]

#: onnxruntime's contrib-op domain.
MS_DOMAIN = "com.microsoft"


def _codes_constant(names: Names, base: str, codes: np.ndarray, bits: int, signed: bool) -> gs.Constant:
    if bits <= 4:
        return lowbit_constant(names.fresh(base), codes, "int4" if signed else "uint4")
    return gs.Constant(names.fresh(base), np.ascontiguousarray(codes.astype(np.int8 if signed else np.uint8)))


def dq_weight(names: Names, q: BlockQuant, base: str, transposed: bool = False) -> tuple[gs.Node, gs.Variable]:
    """A ``DequantizeLinear`` giving the ``[K, N]`` weight (``[N, K]`` when ``transposed``)."""
    k, n = q.codes.shape
    t = (lambda a: a.T) if transposed else (lambda a: a)
    per_channel = q.scale.shape[0] == 1 and q.block >= k
    axis = (0 if transposed else 1) if per_channel else (1 if transposed else 0)
    scale = q.scale[0] if per_channel else t(q.scale)
    zero = None if q.zero is None else q.zero[0] if per_channel else t(q.zero)
    attrs = {"axis": axis} if per_channel else {"axis": axis, "block_size": q.block}
    return _dq_node(names, q, base, t(q.codes), np.ascontiguousarray(scale, np.float32), zero, attrs,
                    [n, k] if transposed else [k, n])


def dq_conv_weight(names: Names, q: BlockQuant, layout: ConvLayout, base: str) -> tuple[gs.Node, gs.Variable]:
    """A ``DequantizeLinear`` giving a Conv/ConvTranspose weight quantized as ``q`` (the ``[K, N]``
    matrix of ``layout``): per-axis scales on the output-channel axis, or blocked along the
    input-channel axis (opset 21 ``block_size``)."""
    zero = None if q.zero is None else layout.tensor(q.zero)
    attrs = {"axis": layout.axis, "block_size": layout.block} if layout.block else {"axis": layout.axis}
    return _dq_node(names, q, base, layout.tensor(q.codes), layout.tensor(q.scale.astype(np.float32)), zero, attrs,
                    list(layout.shape))


def _dq_node(names: Names, q: BlockQuant, base: str, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
             attrs: dict, shape: list[int]) -> tuple[gs.Node, gs.Variable]:
    """``DequantizeLinear(codes, scale[, zero])`` with ``attrs``, giving a float tensor of ``shape``."""
    inputs: list[gs.Tensor] = [_codes_constant(names, f"{base}_q", codes, q.bits, q.symmetric),
                               gs.Constant(names.fresh(f"{base}_scale"), scale)]
    if zero is not None:
        inputs.append(_codes_constant(names, f"{base}_zero", zero, q.bits, False))
    out = gs.Variable(names.fresh(f"{base}_dq"), np.float32, shape)
    return gs.Node("DequantizeLinear", names.fresh(f"{base}_DequantizeLinear"), attrs, inputs, [out]), out


def unsigned_codes(q: BlockQuant) -> np.ndarray:
    """``[K, N]`` codes as stored unsigned (symmetric ones offset by ``2^(bits−1)``)."""
    return q.codes.astype(np.int32) + (1 << (q.bits - 1) if q.symmetric else 0)


def matmulnbits_node(names: Names, q: BlockQuant, base: str, a: gs.Tensor, out: gs.Tensor,
                     bias: gs.Tensor | None = None, accuracy_level: int = 0) -> gs.Node:
    """``com.microsoft.MatMulNBits`` computing ``out = a·W (+ bias)`` for ``W`` ``[K, N]``."""
    k, n = q.codes.shape
    bs, nb = q.block, q.scale.shape[0]
    codes = unsigned_codes(q)
    pad = nb * bs - k
    if pad:
        fill = (np.full((pad, n), 1 << (q.bits - 1)) if q.zero is None else np.repeat(q.zero[-1:], pad, axis=0))
        codes = np.concatenate([codes, fill], axis=0)
    packed = pack_bits(codes.T.reshape(n, nb, bs), q.bits)
    inputs: list[gs.Tensor] = [a, gs.Constant(names.fresh(f"{base}_B"), np.ascontiguousarray(packed)),
                               gs.Constant(names.fresh(f"{base}_scales"), np.ascontiguousarray(q.scale.T, np.float32))]
    if q.zero is not None:
        per = 8 // q.bits
        z = q.zero.T.astype(np.uint8)
        if nb % per:
            z = np.concatenate([z, np.zeros((n, per - nb % per), np.uint8)], axis=1)
        inputs.append(gs.Constant(names.fresh(f"{base}_zero_points"), pack_bits(z, q.bits)))
    if bias is not None:
        while len(inputs) < 5:
            inputs.append(gs.Variable.empty())
        inputs.append(bias)
    attrs = {"K": k, "N": n, "bits": q.bits, "block_size": bs}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    return gs.Node("MatMulNBits", names.fresh(f"{base}_MatMulNBits"), attrs, inputs, [out], domain=MS_DOMAIN)


def codebook_weight(names: Names, codebook: np.ndarray, idx: np.ndarray, bits: int, base: str,
                    transposed: bool = False) -> tuple[list[gs.Node], gs.Variable]:
    """``Gather(codebook, Cast(indices))``: the ``[K, N]`` weight (``[N, K]`` when ``transposed``)."""
    idx = idx.T if transposed else idx
    codes = _codes_constant(names, f"{base}_idx", idx, bits, False)
    wide = gs.Variable(names.fresh(f"{base}_idx32"), np.int32, list(idx.shape))
    cast = gs.Node("Cast", names.fresh(f"{base}_Cast"), {"to": onnx.TensorProto.INT32}, [codes], [wide])
    book = gs.Constant(names.fresh(f"{base}_codebook"), np.ascontiguousarray(codebook, np.float32))
    out = gs.Variable(names.fresh(f"{base}_w"), np.float32, list(idx.shape))
    gather = gs.Node("Gather", names.fresh(f"{base}_Gather"), {"axis": 0}, [book, wide], [out])
    return [cast, gather], out


def _rows_table(q: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes ``[V, D]``, scales ``[V, nb]``, zero points of a table quantized as ``q`` (``[D, V]``)."""
    return q.codes.T, np.ascontiguousarray(q.scale.T, np.float32), None if q.zero is None else q.zero.T


def gather_rows(names: Names, q: BlockQuant, base: str, ids: gs.Tensor, out: gs.Tensor, rank: int,
                contrib: bool = False) -> list[gs.Node]:
    """Nodes computing ``out = table[ids]`` from the quantized table (``q`` quantizes ``tableᵀ``,
    ``[D, V]``: blocks along ``D``); ``rank`` is ``ids``' rank."""
    if contrib:
        return [_gather_block_quantized(names, q, base, ids, out)]
    codes, scale, zero = _rows_table(q)
    if q.bits == 8 and q.symmetric and codes.shape[1] % q.block == 0:
        return _cast_mul_rows(names, base, codes, scale, ids, out, rank)
    g = lambda table, suffix, dtype: _gather(names, base, suffix, table, ids, dtype)  # noqa: E731
    nodes, scales = g(gs.Constant(names.fresh(f"{base}_scale"), scale), "scale", np.float32)
    dq_in = [None, scales[-1].outputs[0]]
    if q.bits == 8 and q.symmetric:
        more, gathered = g(gs.Constant(names.fresh(f"{base}_q"), np.ascontiguousarray(codes, np.int8)), "q", np.int8)
        nodes += more
        dq_in[0] = gathered[-1].outputs[0]
    else:
        unsigned = codes.astype(np.int32) + (1 << (q.bits - 1) if q.symmetric else 0)
        zeros = np.full(scale.shape, 1 << (q.bits - 1)) if zero is None else zero
        more, gathered = g(gs.Constant(names.fresh(f"{base}_zero"), np.ascontiguousarray(zeros, np.uint8)), "zero", np.uint8)
        nodes += more
        codes_nodes, codes_out = _gathered_codes(names, base, unsigned, q.bits, ids, rank)
        nodes += codes_nodes
        dq_in = [codes_out, dq_in[1], gathered[-1].outputs[0]]
    nodes.append(gs.Node("DequantizeLinear", names.fresh(f"{base}_DequantizeLinear"),
                         {"axis": -1, "block_size": q.block}, dq_in, [out]))
    return nodes


def _cast_mul_rows(names: Names, base: str, codes: np.ndarray, scale: np.ndarray, ids: gs.Tensor, out: gs.Tensor,
                   rank: int) -> list[gs.Node]:
    """``out = float(codes[ids]) · scale[ids]`` per block, for int8 codes ``[V, D]`` and scales ``[V, nb]``
    (``nb`` blocks dividing ``D``): the codes stored as ``[V, nb, D/nb]`` and the scales as ``[V, nb, 1]``,
    so one ``Mul`` broadcasts them (one ``Reshape`` back to ``[..., D]``; one block per row: ``[V, D]``,
    ``[V, 1]``, no Reshape). The same values as a blocked ``DequantizeLinear`` with zero point 0 (one
    product each), in four or five cheap nodes: onnxruntime (1.32) runs its blocked DequantizeLinear
    on gathered rows slowly (64 rows of 384: about twice the time of Cast and Mul, 8× a float Gather)."""
    v, d = codes.shape
    nb = scale.shape[1]
    shape = (v, d) if nb == 1 else (v, nb, d // nb)
    rows, scales = (gs.Variable(names.fresh(f"{base}_{s}_rows"), dtype) for s, dtype in (("q", np.int8), ("scale", np.float32)))
    wide = gs.Variable(names.fresh(f"{base}_rows_float"), np.float32)
    nodes = [
        gs.Node("Gather", names.fresh(f"{base}_Gather_q"), {"axis": 0},
                [gs.Constant(names.fresh(f"{base}_q"), np.ascontiguousarray(codes.reshape(shape), np.int8)), ids], [rows]),
        gs.Node("Gather", names.fresh(f"{base}_Gather_scale"), {"axis": 0},
                [gs.Constant(names.fresh(f"{base}_scale"), np.ascontiguousarray(scale.reshape(v, nb) if nb == 1
                                                                                 else scale.reshape(v, nb, 1))), ids], [scales]),
        gs.Node("Cast", names.fresh(f"{base}_Cast"), {"to": onnx.TensorProto.FLOAT}, [rows], [wide]),
    ]
    if nb == 1:
        return nodes + [gs.Node("Mul", names.fresh(f"{base}_Mul"), {}, [wide, scales], [out])]
    prod = gs.Variable(names.fresh(f"{base}_scaled_blocks"), np.float32)
    shape_const = gs.Constant(names.fresh(f"{base}_row_shape"), np.array([0] * rank + [d], np.int64))
    return nodes + [gs.Node("Mul", names.fresh(f"{base}_Mul"), {}, [wide, scales], [prod]),
                    gs.Node("Reshape", names.fresh(f"{base}_Reshape_rows"), {}, [prod, shape_const], [out])]


def _gather(names: Names, base: str, suffix: str, table: gs.Constant, ids: gs.Tensor,
            dtype) -> tuple[list[gs.Node], list[gs.Node]]:
    out = gs.Variable(names.fresh(f"{base}_{suffix}_rows"), dtype)
    node = gs.Node("Gather", names.fresh(f"{base}_Gather_{suffix}"), {"axis": 0}, [table, ids], [out])
    return [node], [node]


def _gathered_codes(names: Names, base: str, unsigned: np.ndarray, bits: int, ids: gs.Tensor,
                    rank: int) -> tuple[list[gs.Node], gs.Variable]:
    """Gather rows of unsigned codes (uint8; 4-bit: packed pairs, unpacked in-graph)."""
    if bits == 8:
        nodes, g = _gather(names, base, "q", gs.Constant(names.fresh(f"{base}_q"), unsigned.astype(np.uint8)), ids, np.uint8)
        return nodes, g[-1].outputs[0]
    packed = pack_bits(unsigned, 4)
    nodes, g = _gather(names, base, "q", gs.Constant(names.fresh(f"{base}_q"), packed), ids, np.uint8)
    rows = g[-1].outputs[0]
    var = lambda s: gs.Variable(names.fresh(f"{base}_{s}"), np.uint8)  # noqa: E731
    const = lambda s, v: gs.Constant(names.fresh(f"{base}_{s}"), np.asarray(v))  # noqa: E731
    lo, hi, lo1, hi1, pairs, codes = (var(s) for s in ("lo", "hi", "lo1", "hi1", "pairs", "codes"))
    axes = const("axes", np.array([-1], np.int64))
    nodes += [
        gs.Node("BitwiseAnd", names.fresh(f"{base}_BitwiseAnd"), {}, [rows, const("mask", np.uint8(15))], [lo]),
        gs.Node("BitShift", names.fresh(f"{base}_BitShift"), {"direction": "RIGHT"}, [rows, const("four", np.uint8(4))], [hi]),
        gs.Node("Unsqueeze", names.fresh(f"{base}_Unsqueeze_lo"), {}, [lo, axes], [lo1]),
        gs.Node("Unsqueeze", names.fresh(f"{base}_Unsqueeze_hi"), {}, [hi, axes], [hi1]),
        gs.Node("Concat", names.fresh(f"{base}_Concat"), {"axis": -1}, [lo1, hi1], [pairs]),
        gs.Node("Reshape", names.fresh(f"{base}_Reshape"), {},
                [pairs, const("shape", np.array([0] * rank + [unsigned.shape[1]], np.int64))], [codes]),
    ]
    return nodes, codes


def _gather_block_quantized(names: Names, q: BlockQuant, base: str, ids: gs.Tensor, out: gs.Tensor) -> gs.Node:
    """``GatherBlockQuantized`` on a uint8 table (4-bit: code pairs packed low first; symmetric:
    codes offset by ``2^(bits−1)``, onnxruntime's default zero point)."""
    codes, scale, zero = _rows_table(q)
    unsigned = codes.astype(np.int32) + (1 << (q.bits - 1) if q.symmetric else 0)
    data = gs.Constant(names.fresh(f"{base}_q"), pack_bits(unsigned, q.bits) if q.bits < 8 else unsigned.astype(np.uint8))
    inputs: list[gs.Tensor] = [data, ids, gs.Constant(names.fresh(f"{base}_scale"), scale)]
    if zero is not None:
        z = zero.astype(np.uint8)
        per = 8 // q.bits
        if z.shape[1] % per:
            z = np.concatenate([z, np.zeros((z.shape[0], per - z.shape[1] % per), np.uint8)], axis=1)
        inputs.append(gs.Constant(names.fresh(f"{base}_zero"), pack_bits(z, q.bits)))
    attrs = {"bits": q.bits, "block_size": q.block, "quantize_axis": 1, "gather_axis": 0}
    return gs.Node("GatherBlockQuantized", names.fresh(f"{base}_GatherBlockQuantized"), attrs, inputs, [out],
                   domain=MS_DOMAIN)
