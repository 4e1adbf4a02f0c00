"""Handlers of ``Reshape``: how channels flow through a reshape of ``[N, C, *S]``, and channel shuffles.

The kind of a reshape is decided from its input and output shapes at the run's dims (the output's
completed from the target where inference left it unknown); the batch dim must stay:

* *same*: ``[N, C, *S] -> [N, C, *S']`` (``prod S = prod S'``): channel ``c`` is channel ``c``;
* *merge*: ``[N, C, *S] -> [N, C*m, *S']`` (``m`` divides ``prod S``, a flatten): channel ``c``
  is output channels ``[c*m, (c+1)*m)``;
* *split*: ``[N, C, *S] -> [N, C/m, *S']`` (``m`` divides ``C``, ``C/m > 1``; YOLOv8's DFL
  ``[b, 4*16, n] -> [b, 4, 16, n]``): the channels form blocks of ``m``, input channel ``c`` is
  output channel ``c // m``, so whole blocks are pruned;
* anything else (the batch dim changes, channels spread over the batch) freezes:
  ``reshape_mixes_channels``.

The target is a constant or computed (``Shape -> Gather/Slice -> Concat``, traced by
:mod:`.shape_trace`). Its channel entry (position 1) may be ``-1`` (inferred), ``0`` or
``Shape(x)[1]`` (the pruned count, *same* only) or a literal, rewritten after pruning: a new
constant, or for a computed target a copy of its ``Concat`` with a new constant input (the
original is never edited: other reshapes may share it). The other entries must not read a
channel count; an entry that cannot be traced or rewritten freezes (``reshape_target_untraced``).

A channel shuffle, ``Reshape [N, g*n, *S] -> [N, g, n, *S] -> Transpose(0, 2, 1, ...) ->
Reshape [N, g*n, *S]`` (ShuffleNet), maps input channel ``i*n + j`` to output channel
``j*g + i``. Pruned, it is a shuffle with ``n' = kept / g``, whose output is the original's kept
channels in order only when every block ``i`` keeps the same ``j``: the input channels
``{i*n + j : i < g}`` (output channels ``[j*g, (j+1)*g)``) are one coupled channel. The first
Reshape's spec holds the links and the rewrites of both targets; the Transpose and the last
Reshape only account for their tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.pruning.handlers_channelwise import _transpose as _plain_transpose
from onnxcompress.pruning.handlers_common import _identity_fn, _nan
from onnxcompress.pruning.shape_trace import Element, _shape_elements
from onnxcompress.pruning.types import (
    CHANNEL_AXIS,
    R_RESHAPE,
    R_RESHAPE_TARGET,
    R_UNKNOWN_DIM,
    R_UNSUPPORTED,
    GraphInfo,
    NodeSpec,
    RewriteContext,
)

__all__ = ["Shuffle", "_reshape", "_transpose", "channel_shuffle", "out_shape", "reshape_kind", "target_writer"]

Dims = tuple[int | None, ...]
Sym = tuple[int, tuple[str, ...]]  # a dim as a number times symbols (unknown dims: their names)
Writer = Callable[[RewriteContext, dict[int, int]], None]


# ----------------------------------------------------------------- shapes and kinds


def _zero_copies(node: gs.Node) -> bool:
    return int(node.attrs.get("allowzero", 0)) == 0


def _target(node: gs.Node, g: GraphInfo) -> list[Element] | None:
    return _shape_elements(node.inputs[1], g) if len(node.inputs) > 1 else None


def _dim(g: GraphInfo, name: str, axis: int) -> Sym:
    """Dim ``axis`` of tensor ``name``: its value, else its symbol (inference's name, or its own)."""
    shape = g.shapes.get(name)
    if shape is not None and axis < len(shape) and shape[axis] is not None:
        return int(shape[axis]), ()
    names = g.symbols.get(name, ())
    return 1, (names[axis] if axis < len(names) and names[axis] else f"{name}:{axis}",)


def _times(dims: list[Sym]) -> Sym:
    coef, syms = 1, []
    for c, s in dims:
        coef *= c
        syms += s
    return coef, tuple(sorted(syms))


def _over(a: Sym, b: Sym) -> Sym | None:
    """``a / b`` when it is a product of ``a``'s factors, else ``None``."""
    if b[0] == 0 or a[0] % b[0]:
        return None
    rest = list(a[1])
    for s in b[1]:
        if s not in rest:
            return None
        rest.remove(s)
    return a[0] // b[0], tuple(rest)


def _target_dims(node: gs.Node, g: GraphInfo, el: list[Element]) -> list[Sym | None]:
    """Output dims the target gives (``None`` where unknown; a ``-1`` resolved when it can be)."""
    x = node.inputs[0]
    xs = [_dim(g, x.name, p) for p in range(g.rank(x) or 0)]
    dims: list[Sym | None] = []
    for p, e in enumerate(el):
        if isinstance(e, tuple):
            dims.append(_dim(g, *e))
        elif e == 0 and _zero_copies(node):
            dims.append(xs[p] if p < len(xs) else None)
        else:
            dims.append((e, ()) if isinstance(e, int) and e >= 0 else None)
    if el.count(-1) == 1 and xs:
        k = el.index(-1)
        known = [d for p, d in enumerate(dims) if p != k]
        if None not in known:
            dims[k] = _over(_times(xs), _times(known))  # type: ignore[arg-type]
    return dims


def _out_syms(node: gs.Node, g: GraphInfo, el: list[Element] | None) -> list[Sym | None] | None:
    """The Reshape's output dims: shape inference's values, else the target's, else inference's symbols."""
    y = node.outputs[0]
    inferred = g.shape(y)
    given = _target_dims(node, g, el) if el is not None else None
    rank = len(given) if given is not None else (len(inferred) if inferred is not None else None)
    if rank is None or (inferred is not None and len(inferred) != rank):
        return None if given is None else given
    out: list[Sym | None] = []
    for p in range(rank):
        if inferred is not None and inferred[p] is not None:
            out.append((int(inferred[p]), ()))
        elif given is not None and given[p] is not None:
            out.append(given[p])
        else:
            names = g.symbols.get(y.name, ())
            out.append((1, (names[p],)) if p < len(names) and names[p] else None)
    return out


def _values(dims: list[Sym | None]) -> Dims:
    return tuple(d[0] if d is not None and not d[1] else None for d in dims)


def out_shape(node: gs.Node, g: GraphInfo, el: list[Element] | None) -> Dims | None:
    """The Reshape's output dims (``None`` where not a known number)."""
    dims = _out_syms(node, g, el)
    return None if dims is None else _values(dims)


def reshape_kind(xs: list[Sym], ys: list[Sym | None] | None) -> tuple[str, int]:
    """``(kind, m)``: ``same`` / ``merge`` / ``split`` (see the module doc), ``mix`` or ``unknown``."""
    if ys is None or len(xs) < 2 or len(ys) < 2 or None in ys or xs[1][1] or ys[1][1]:  # type: ignore[index]
        return "unknown", 0
    tx, ty = _times(xs[1:]), _times(ys[1:])  # type: ignore[arg-type]
    if tx != ty:  # the batch dim changes, or (symbols) unknown
        return ("mix", 0) if not tx[1] and not ty[1] else ("unknown", 0)
    c, y = xs[1][0], ys[1][0]  # type: ignore[index]
    if y == c:
        return "same", 1
    if y % c == 0:
        return "merge", y // c
    if c % y == 0 and y > 1:
        return "split", c // y
    return "mix", 0


# ----------------------------------------------------------------- target rewriting


def _entry_ok(node: gs.Node, p: int, e: Element, positions: set[int], follows: bool) -> str:
    """``"keep"`` (valid after pruning as it is), ``"write"`` (a literal to rewrite) or ``"bad"``."""
    x = node.inputs[0]
    copies_channels = (e == 0 and _zero_copies(node) and p == CHANNEL_AXIS) or e == (x.name, CHANNEL_AXIS)
    if p in positions:
        if e == -1 or (follows and p == CHANNEL_AXIS and copies_channels):
            return "keep"
        return "write" if isinstance(e, int) and e > 0 else "bad"
    reads_channels = isinstance(e, tuple) and e[1] == CHANNEL_AXIS
    return "bad" if copies_channels or reads_channels else "keep"


def target_writer(node: gs.Node, g: GraphInfo, positions: set[int], follows: bool) -> Writer | None | bool:
    """How to write new values at ``positions`` of the Reshape's target after pruning.

    Args:
        node: The Reshape.
        g: Graph facts.
        positions: The entries that hold a channel count.
        follows: Whether ``0`` / ``Shape(x)[1]`` at position 1 gives the right pruned count.

    Returns:
        A writer ``(ctx, {position: value})``, ``None`` when nothing needs writing, ``False``
        when the target cannot be traced or rewritten.
    """
    el = _target(node, g)
    if el is None:
        return False
    verdicts = [_entry_ok(node, p, e, positions, follows) for p, e in enumerate(el)]
    if "bad" in verdicts:
        return False
    writes = [p for p, v in enumerate(verdicts) if v == "write"]
    if not writes:
        return None
    values = g.const(node.inputs[1])
    if values is not None:
        return _constant_writer(node, values)
    return _concat_writer(node, g, writes)


def _constant_writer(node: gs.Node, values: np.ndarray) -> Writer:
    name = node.inputs[1].name

    def write(ctx: RewriteContext, new: dict[int, int]) -> None:
        out = values.copy()
        for p, v in new.items():
            out.reshape(-1)[p] = v
        node.inputs[1] = ctx.constant(name, out)

    return write


def _concat_writer(node: gs.Node, g: GraphInfo, writes: list[int]) -> Writer | bool:
    """A writer for a target ``Concat(...)`` whose entries at ``writes`` come from constant inputs."""
    shape_t = node.inputs[1]
    concat = shape_t.inputs[0] if len(shape_t.inputs) == 1 else None
    if concat is None or concat.op != "Concat" or (concat.domain or "") not in ("", "ai.onnx"):
        return False
    where: dict[int, tuple[int, int]] = {}
    start = 0
    for i, inp in enumerate(concat.inputs):
        part = _shape_elements(inp, g)
        if part is None:
            return False
        for p in writes:
            if start <= p < start + len(part):
                if g.const(inp) is None:
                    return False
                where[p] = (i, p - start)
        start += len(part)

    def write(ctx: RewriteContext, new: dict[int, int]) -> None:
        key = ("reshape_target", id(concat), tuple(sorted(new.items())))
        if key not in ctx.made:
            inputs = list(concat.inputs)
            for i in sorted({where[p][0] for p in new}):
                values = g.const(concat.inputs[i]).copy()
                for p, v in new.items():
                    if where[p][0] == i:
                        values.reshape(-1)[where[p][1]] = v
                inputs[i] = ctx.constant(concat.inputs[i].name, values)
            out = gs.Variable(ctx.fresh(shape_t.name), dtype=shape_t.dtype, shape=shape_t.shape)
            ctx.graph.nodes.append(gs.Node("Concat", ctx.fresh(concat.name or shape_t.name), dict(concat.attrs),
                                           inputs, [out]))
            ctx.made[key] = out
        node.inputs[1] = ctx.made[key]

    return write


# ----------------------------------------------------------------- Reshape


def _reshape(node: gs.Node, g: GraphInfo) -> NodeSpec:
    spec = NodeSpec(node, g)
    shuffle = channel_shuffle(node, g)
    if shuffle is not None:
        return shuffle.spec(spec)
    x, y = node.inputs[0], node.outputs[0]
    if len(node.inputs) < 2 or g.channels(x) is None:
        return spec.freeze(None, R_UNKNOWN_DIM)
    ys = _out_syms(node, g, _target(node, g))
    kind, m = reshape_kind([_dim(g, x.name, p) for p in range(g.rank(x) or 0)], ys)
    if kind in ("unknown", "mix"):
        return spec.freeze([x, y], R_UNKNOWN_DIM if kind == "unknown" else R_RESHAPE)
    if not _zero_copies(node) and 0 in _values(ys):
        return spec.freeze([x, y], R_UNSUPPORTED)
    g.shapes[y.name] = _values(ys)
    writer = target_writer(node, g, {CHANNEL_AXIS}, follows=kind == "same")
    if writer is False:
        return spec.freeze([x, y], R_RESHAPE_TARGET)
    c = g.channels(x)
    if kind == "same":
        if spec.identity(x, y):
            spec.const_fn = _identity_fn(x.name, y.name)
    elif kind == "merge":
        spec.link(x, np.repeat(np.arange(c), m), y, np.arange(c * m))
        spec.const_fn = lambda get: {y.name: np.repeat(get(x.name), m)}
    else:
        spec.link(x, np.arange(c), y, np.arange(c) // m)
        spec.const_fn = lambda get: {y.name: _block_value(get(x.name), m)}
    if writer is not None:
        spec.rewrite = lambda ctx: writer(ctx, {CHANNEL_AXIS: ctx.count(y.name)})
    return spec


def _block_value(v: np.ndarray, m: int) -> np.ndarray:
    """Per block of ``m`` channels: their common constant, else NaN."""
    blocks = v.reshape(-1, m)
    return np.where(np.all(blocks == blocks[:, :1], axis=1), blocks[:, 0], _nan(len(blocks)))


# ----------------------------------------------------------------- channel shuffle


def _only_reader(t: gs.Tensor, op: str, g: GraphInfo) -> gs.Node | None:
    readers = list({id(n): n for n in t.outputs}.values())
    if len(readers) != 1 or t.name in g.outputs or readers[0].op != op:
        return None
    return readers[0] if (readers[0].domain or "") in ("", "ai.onnx") else None


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    node = t.inputs[0] if len(t.inputs) == 1 else None
    return node if node is not None and node.op == op and (node.domain or "") in ("", "ai.onnx") else None


@dataclass
class Shuffle:
    """A channel shuffle ``first -> transpose -> last`` of ``groups * per`` channels."""

    first: gs.Node
    transpose: gs.Node
    last: gs.Node
    groups: int
    per: int

    def spec(self, spec: NodeSpec) -> NodeSpec:
        """The spec of one of the three nodes (the first holds the links and rewrites)."""
        node = spec.node
        spec.touched.update(t.name for t in spec.tensors())
        if node is not self.first:
            return spec
        g, n = self.groups, self.per
        x, z = self.first.inputs[0], self.last.outputs[0]
        i, j = np.divmod(np.arange(g * n), n)  # input channel i*n + j
        spec.link(x, np.arange(g * n), z, j * g + i)
        spec.link(z, np.arange(g * n), z, (np.arange(g * n) // g) * g)  # the g channels of one j go together
        source = (np.arange(g * n) % g) * n + np.arange(g * n) // g  # output channel -> input channel
        spec.const_fn = lambda get: {z.name: get(x.name)[source]}
        writers = (target_writer(self.first, spec.info, {2}, follows=False),
                   target_writer(self.last, spec.info, {CHANNEL_AXIS}, follows=False))
        if False in writers:
            return spec.freeze([x, z], R_RESHAPE_TARGET)
        spec.rewrite = lambda ctx: self._rewrite(ctx, writers)
        return spec

    def _rewrite(self, ctx: RewriteContext, writers: tuple) -> None:
        c = ctx.count(self.last.outputs[0].name)
        first, last = writers
        if first:
            first(ctx, {2: c // self.groups})
        if last:
            last(ctx, {CHANNEL_AXIS: c})
        for t, axis in ((self.first.outputs[0], 2), (self.transpose.outputs[0], 1)):
            if t.shape is not None and len(t.shape) > axis:
                t.shape = [*t.shape[:axis], c // self.groups, *t.shape[axis + 1:]]


def channel_shuffle(node: gs.Node, g: GraphInfo) -> Shuffle | None:
    """The channel shuffle ``node`` is part of (as its first Reshape, Transpose or last Reshape)."""
    if node.op == "Transpose":
        candidates = [(_producer(node.inputs[0], "Reshape"), node)]
    elif node.op == "Reshape":
        transpose = _producer(node.inputs[0], "Transpose")
        candidates = [(node, _only_reader(node.outputs[0], "Transpose", g)),
                      (_producer(transpose.inputs[0], "Reshape") if transpose is not None else None, transpose)]
    else:
        return None
    for first, transpose in candidates:
        if first is None or transpose is None or _only_reader(first.outputs[0], "Transpose", g) is not transpose:
            continue
        last = _only_reader(transpose.outputs[0], "Reshape", g)
        found = _check_shuffle(first, transpose, last, g) if last is not None else None
        if found is not None and (node.op != "Reshape" or node in (found.first, found.last)):
            return found
    return None


def _check_shuffle(first: gs.Node, transpose: gs.Node, last: gs.Node, g: GraphInfo) -> Shuffle | None:
    xs = g.shape(first.inputs[0])
    mid = out_shape(first, g, _target(first, g))
    zs = out_shape(last, g, _target(last, g))
    if xs is None or mid is None or zs is None or len(xs) < 2 or None in xs[1:] or len(mid) != len(xs) + 1:
        return None
    rank = len(mid)
    perm = [int(p) for p in transpose.attrs.get("perm", range(rank - 1, -1, -1))]
    if perm != [0, 2, 1, *range(3, rank)] or tuple(zs[1:]) != tuple(xs[1:]):
        return None
    groups, per = mid[1], mid[2]
    if groups is not None and per is None and xs[1] % groups == 0:  # a computed c // g
        per = xs[1] // groups
    if groups is None or per is None or groups < 2 or per < 2 or groups * per != xs[1] or tuple(mid[3:]) != tuple(xs[2:]):
        return None
    return Shuffle(first, transpose, last, int(groups), int(per))


def _transpose(node: gs.Node, g: GraphInfo) -> NodeSpec:
    """A Transpose inside a channel shuffle, else the channel-wise handler (axis 1 must stay)."""
    shuffle = channel_shuffle(node, g)
    return _plain_transpose(node, g) if shuffle is None else shuffle.spec(NodeSpec(node, g))
