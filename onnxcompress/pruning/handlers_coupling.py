"""Handlers of coupling ops: ops that tie channels of several tensors together.

Elementwise ops on two channel tensors (residual Add, squeeze-and-excite Mul; a constant
operand is sliced), Concat (offsets), Split (sizes rewritten), Slice with step 1 (bounds
rewritten), Flatten of ``[N, C, *S]`` into ``[N, C*prod(S)]`` (channel ``c`` is columns
``[c*S, (c+1)*S)``). Reshape is in :mod:`.handlers_reshape`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.pruning.handlers_common import (
    Vec,
    _axis,
    _clamp,
    _const_operand,
    _input,
    _ints,
    _nan,
    _passthrough,
    _prod,
    _set_channels,
    _slice_args,
    channel_vector,
)
from onnxcompress.pruning.types import (
    CHANNEL_AXIS,
    R_BROADCAST,
    R_MISMATCH,
    R_RESHAPE,
    R_UNKNOWN_DIM,
    R_UNSUPPORTED,
    ROLE_PARAM,
    GraphInfo,
    NodeSpec,
    RewriteContext,
)

__all__ = ["_BINARY", "_binary", "_concat", "_flatten", "_slice", "_split"]


# ----------------------------------------------------------------- elementwise on two channel tensors


def _var_operand(spec: NodeSpec, t: gs.Tensor, rank: int, channels: int, out: gs.Tensor) -> str | None | bool:
    """Couple a variable operand with the output; its name if coupled, None if it broadcasts."""
    g = spec.info
    r = g.rank(t)
    if r is None:
        spec.freeze(None, R_UNKNOWN_DIM)
        return False
    spec.touched.add(t.name)
    if r != rank:
        axis = g.axis(rank) - (rank - r)
        shape = g.shape(t)
        if axis >= 0 and shape[axis] != 1:
            spec.freeze(None, R_BROADCAST)
            return False
        if r > CHANNEL_AXIS:
            spec.freeze([t], R_BROADCAST)  # its own axis 1 is not the output's channel axis
        return None
    ct = g.channels(t)
    if ct == channels:
        spec.link(t, np.arange(ct), out, np.arange(channels))
        return t.name
    if ct == 1:
        return None
    spec.freeze(None, R_UNKNOWN_DIM if ct is None else R_BROADCAST)
    return False


_BINARY: dict[str, Callable[[Vec, Vec], Vec]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Max": np.maximum, "Min": np.minimum,
}


def _binary(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    out = node.outputs[0]
    if len(node.inputs) != 2:
        return spec.freeze(None, R_UNSUPPORTED)
    rank, c = g.rank(out), g.channels(out)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    spec.touched.add(out.name)
    operands: list[tuple[str, object]] = []
    for i, t in enumerate(node.inputs):
        if isinstance(t, gs.Constant):
            got = _const_operand(spec, i, rank, c, out)
            kind = "const"
        else:
            got = _var_operand(spec, t, rank, c, out)
            kind = "var"
        if got is False:
            return spec
        operands.append((kind, got))
    fn = _BINARY[node.op]

    def const_fn(get):
        args = []
        for kind, got in operands:
            if got is None:
                args.append(_nan(c))
            else:
                args.append(get(got) if kind == "var" else got)
        with np.errstate(all="ignore"):
            return {out.name: fn(*args)}

    spec.const_fn = const_fn
    return spec


# ----------------------------------------------------------------- shape ops


def _expand(spec: NodeSpec, x: gs.Tensor, y: gs.Tensor, m: int) -> NodeSpec:
    """Channel ``c`` of ``x`` is channels ``[c*m, (c+1)*m)`` of ``y``."""
    g = spec.info
    c = g.channels(x)
    if g.channels(y) != c * m:
        return spec.freeze([x, y], R_MISMATCH)
    spec.link(x, np.repeat(np.arange(c), m), y, np.arange(c * m))
    spec.const_fn = lambda get: {y.name: np.repeat(get(x.name), m)}
    return spec


def _flatten(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    shape = g.shape(x)
    if shape is None or g.channels(x) is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    if _axis(int(node.attrs.get("axis", 1)), len(shape)) != CHANNEL_AXIS:
        return spec.freeze(None, R_RESHAPE)
    spatial = _prod(shape[2:])
    if spatial is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    return _expand(spec, x, y, spatial)


# ----------------------------------------------------------------- concat / split / slice


def _concat(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    y = node.outputs[0]
    rank, c = g.rank(y), g.channels(y)
    if rank is not None and c is None and _axis(int(node.attrs["axis"]), rank) == CHANNEL_AXIS:
        known = [g.channels(t) for t in node.inputs]  # inference may stop at a computed Resize
        if None not in known and all(g.rank(t) == rank for t in node.inputs):
            _set_channels(g, y, rank, int(sum(known)))
            c = g.channels(y)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    axis = _axis(int(node.attrs["axis"]), rank)
    if axis != CHANNEL_AXIS:
        return _concat_other_axis(spec, rank, c)
    sizes = [g.channels(t) for t in node.inputs]
    if None in sizes or sum(sizes) != c:
        return spec.freeze(None, R_UNKNOWN_DIM if None in sizes else R_MISMATCH)
    offsets = np.cumsum([0, *sizes])
    for t, off, n in zip(node.inputs, offsets, sizes):
        spec.link(t, np.arange(n), y, np.arange(off, off + n))
    consts = [channel_vector(t.values, rank, n) if isinstance(t, gs.Constant) else None
              for t, n in zip(node.inputs, sizes)]

    def const_fn(get):
        parts = []
        for t, n, vec in zip(node.inputs, sizes, consts):
            parts.append(get(t.name) if not isinstance(t, gs.Constant) else (vec if vec is not None else _nan(n)))
        return {y.name: np.concatenate(parts) if parts else _nan(0)}

    spec.const_fn = const_fn
    return spec


def _concat_other_axis(spec: NodeSpec, rank: int, c: int) -> NodeSpec:
    """Concat along a non-channel axis: every input has the output's channels."""
    node, y = spec.node, spec.node.outputs[0]
    for i, t in enumerate(node.inputs):
        if isinstance(t, gs.Constant):
            if t.values.shape[CHANNEL_AXIS] != c:
                return spec.freeze(None, R_MISMATCH)
            spec.param(i, CHANNEL_AXIS, y, ROLE_PARAM)
        elif not spec.identity(t, y):
            return spec

    def const_fn(get):
        vals = []
        for t in node.inputs:
            vec = channel_vector(t.values, rank, c) if isinstance(t, gs.Constant) else get(t.name)
            vals.append(_nan(c) if vec is None else vec)
        stack = np.stack(vals)
        return {y.name: np.where(np.all(stack == stack[0], axis=0), stack[0], np.nan)}

    spec.const_fn = const_fn
    return spec


def _split_sizes(node: gs.Node, g: GraphInfo, c: int) -> list[int] | None:
    present, sizes = _ints(node, g, "split", 1 if g.opset >= 13 else None)
    if present:
        return sizes
    n = int(node.attrs.get("num_outputs", len(node.outputs)))
    if "num_outputs" in node.attrs:
        chunk = -(-c // n)
        return [chunk] * (n - 1) + [c - chunk * (n - 1)]
    return [c // n] * n if c % n == 0 else None


def _split(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x = node.inputs[0]
    rank, c = g.rank(x), g.channels(x)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    if _axis(int(node.attrs.get("axis", 0)), rank) != CHANNEL_AXIS:
        return _split_other_axis(spec, x)
    sizes = _split_sizes(node, g, c)
    if sizes is None or len(sizes) != len(node.outputs) or sum(sizes) != c:
        return spec.freeze(None, R_UNSUPPORTED)
    offsets = np.cumsum([0, *sizes])
    for y, off, n in zip(node.outputs, offsets, sizes):
        if g.channels(y) != n:
            return spec.freeze(None, R_UNKNOWN_DIM if g.channels(y) is None else R_MISMATCH)
        spec.link(x, np.arange(off, off + n), y, np.arange(n))
    spec.const_fn = lambda get: {y.name: get(x.name)[off:off + n] for y, off, n in zip(node.outputs, offsets, sizes)}
    spec.rewrite = lambda ctx: _write_split(node, g, [ctx.count(y.name) for y in node.outputs], ctx)
    return spec


def _split_other_axis(spec: NodeSpec, x: gs.Tensor) -> NodeSpec:
    outs = spec.node.outputs
    if all(spec.identity(x, y) for y in outs):
        spec.const_fn = lambda get: {y.name: get(x.name) for y in outs}
    return spec


def _write_split(node: gs.Node, g: GraphInfo, sizes: list[int], ctx: RewriteContext) -> None:
    if g.opset < 13:
        node.attrs["split"] = sizes
        return
    node.attrs.pop("num_outputs", None)
    old = _input(node, 1)
    const = ctx.constant(old.name if old is not None else f"{node.name or node.outputs[0].name}_split",
                         np.asarray(sizes, dtype=np.int64))
    if len(node.inputs) > 1:
        node.inputs[1] = const
    else:
        node.inputs.append(const)


def _slice(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    x, y = node.inputs[0], node.outputs[0]
    rank, c = g.rank(x), g.channels(x)
    args = _slice_args(node, g)
    if rank is None or c is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    if args is None:
        return spec.freeze(None, R_UNSUPPORTED)
    starts, ends, axes, steps = args
    axes = [_axis(a, rank) for a in axes]
    if CHANNEL_AXIS not in axes:
        return _passthrough(node, g)
    j = axes.index(CHANNEL_AXIS)
    if steps[j] != 1:
        return spec.freeze(None, R_UNSUPPORTED)
    s, e = _clamp(starts[j], c), _clamp(ends[j], c)
    e = max(s, e)
    if g.channels(y) != e - s:
        return spec.freeze(None, R_MISMATCH)
    spec.link(x, np.arange(s, e), y, np.arange(e - s))
    spec.touched.update(t.name for t in node.inputs[1:])
    spec.const_fn = lambda get: {y.name: get(x.name)[s:e]}
    spec.rewrite = lambda ctx: _write_slice(node, g, j, _kept_bounds(ctx.kept(x.name), s, e), ctx)
    return spec


def _kept_bounds(kept: np.ndarray, s: int, e: int) -> tuple[int, int]:
    new_s = int(np.sum(kept < s))
    return new_s, new_s + int(np.sum((kept >= s) & (kept < e)))


def _write_slice(node: gs.Node, g: GraphInfo, j: int, bounds: tuple[int, int], ctx: RewriteContext) -> None:
    for k, (index, key) in enumerate(((1, "starts"), (2, "ends"))):
        if g.opset < 10:
            values = list(node.attrs[key])
            values[j] = bounds[k]
            node.attrs[key] = values
            continue
        old = node.inputs[index]
        values = g.const(old).copy()
        values.reshape(-1)[j] = bounds[k]
        node.inputs[index] = ctx.constant(old.name, values)
