"""Rewrite a graph without the chosen channels, and the "zeroed" reference it must equal.

Removing a coupled channel deletes, everywhere it appears, the producer filters and biases, the
per-channel constants of pass-through ops (BN, PRelu, Mul/Add operands), and the consumer input
columns (Conv, ConvTranspose, Gemm/MatMul rows, flatten ranges); Split sizes, Slice bounds,
Reshape shapes, Resize sizes and depthwise ``group`` attributes follow. Every changed constant is
a new ``gs.Constant`` with a new unique name (``<old>_pruned``); initializers are never edited in
place, and users that slice a shared constant the same way share the new one.

Bias compensation: a removed channel is what the *zeroed original* computes when the channel's
producer filters are zero -- a constant (bias, carried through BN, activations, pools...; see
``const_fn`` in :mod:`.handlers`). Its contribution is folded into each consumer's bias:
``b'[o] += sum_k W[o, c, k] * v_c`` for a Conv (exact without padding; with padding the border
pixels differ), ``alpha * sum_rows B[rows(c), o] * v_c`` for Gemm/MatMul (exact; a MatMul
becomes a Gemm to hold the bias, a missing bias is added; a MatMul on ``[..., k]`` rows, which
cannot, takes it in the constant of its bias ``Add``, or in a new ``Add`` after it), the same over the kernel divided by
the stride product for a ConvTranspose (approximate); a grouped conv's output channel only takes
the removed channels of its own input block.

Grouped convs: the selection removes the same count from every block of their input and output
(:attr:`~.dependency.Group.blocks`), so the weight keeps the ``[g*co', ci', k..]`` layout and
``group`` is unchanged; the input columns are sliced per block (a blocked
:class:`~.spec.ParamRef`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import has_padding
from onnxcompress.pruning.dependency import Analysis
from onnxcompress.pruning.types import ROLE_W_IN, ROLE_W_OUT, Layer, RewriteContext
from onnxcompress.reconstruct.layerview import bias_add

__all__ = ["ApplyReport", "Namer", "PrunedLayer", "apply_pruning", "mask_channels", "mask_inputs", "removed_mask"]

log = logging.getLogger(__name__)


@dataclass
class PrunedLayer:
    """A weight layer whose input or output channels were removed (what reconstruction needs).

    Attributes:
        node: The rewritten node (a MatMul that took a bias is now a Gemm).
        kind: ``conv``, ``convtranspose``, ``gemm`` or ``matmul`` (before the rewrite).
        inp: Data input tensor name (unchanged).
        out: Output tensor name (unchanged, so it can be matched in the original model).
        in_axis: Weight axis of the input channels.
        kept_in: Kept positions along ``in_axis`` (indices into the original weight).
        kept_out: Kept output channels (indices into the original output).
        in_changed: Whether input channels were removed (only then is reconstruction useful).
        out_count: Number of output channels before pruning.
    """

    node: gs.Node
    kind: str
    inp: str
    out: str
    in_axis: int
    kept_in: np.ndarray
    kept_out: np.ndarray
    in_changed: bool = True
    out_count: int = 0


@dataclass
class ApplyReport:
    """What :func:`apply_pruning` did.

    Attributes:
        removed: Channels (components) removed.
        compensated: Consumer layers whose bias took removed channels' constant outputs.
        approximate: Of those, the ones where the fold is approximate (padding, ConvTranspose).
        uncompensated: Removed channel inputs whose constant value was unknown (dropped as 0).
        layers: Layers whose inputs or outputs shrank.
        constants: New constants created.
    """

    removed: int = 0
    compensated: int = 0
    approximate: int = 0
    uncompensated: int = 0
    layers: list[PrunedLayer] = field(default_factory=list)
    constants: int = 0


class Namer:
    """Fresh, deterministic tensor names for new constants; caches identical slices."""

    def __init__(self, graph: gs.Graph):
        self.names = set(graph.tensors().keys())
        for sub in graph.subgraphs(recursive=True):
            self.names.update(sub.tensors().keys())
        self.created = 0

    def fresh(self, base: str) -> str:
        """``base`` + ``_pruned`` (numbered if taken)."""
        name, i = f"{base}_pruned", 0
        while name in self.names:
            i += 1
            name = f"{base}_pruned_{i}"
        self.names.add(name)
        return name

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        """A new constant named after ``base``."""
        self.created += 1
        return gs.Constant(self.fresh(base), np.ascontiguousarray(values))


def removed_mask(analysis: Analysis, remove: dict[int, np.ndarray]) -> np.ndarray:
    """Per component: removed or not."""
    mask = np.zeros(len(analysis.comp_group), dtype=bool)
    for gi, local in remove.items():
        mask[analysis.groups[gi].comps[np.asarray(local, dtype=np.int64)]] = True
    return mask


def _kept(analysis: Analysis, rm: np.ndarray):
    cache: dict[str, np.ndarray] = {}

    def kept(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = np.flatnonzero(~rm[analysis.components(name)]) if name in analysis.offsets else np.arange(0)
        return cache[name]

    return kept


def _propagate(analysis: Analysis, rm: np.ndarray) -> tuple[dict[str, np.ndarray], set[str]]:
    """Per channel tensor: each channel's value in the zeroed original (NaN where not constant),
    and the tensors whose values hold only away from the borders (see ``NodeSpec.const_border``)."""
    values: dict[str, np.ndarray] = {}
    border: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name in values:
            return values[name]
        return np.full(analysis.counts.get(name, 0), np.nan)

    for spec in analysis.specs:
        if spec.const_fn is None:
            continue
        try:
            with np.errstate(all="ignore"):
                out = spec.const_fn(get)
        except (ValueError, IndexError, TypeError) as exc:  # shapes the handler did not foresee
            log.debug("prune_channels: no constant propagation through %s: %s", spec.node.name, exc)
            continue
        inexact = _inexact(analysis, spec, rm, values, border)
        for name, v in out.items():
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            if name in analysis.counts and len(v) == analysis.counts[name]:
                values[name] = v
                if inexact:
                    border.add(name)
    return values, border


def _inexact(analysis: Analysis, spec, rm: np.ndarray, values: dict[str, np.ndarray], border: set[str]) -> bool:
    """Whether ``spec``'s outputs inherit or create a border-only constant."""
    names = [t.name for t in spec.node.inputs if t.name in analysis.counts]
    if any(n in border for n in names):
        return True
    if not spec.const_border:
        return False
    for n in names:
        v = values.get(n)
        gone = rm[analysis.components(n)]
        if v is not None and np.any(gone & np.isfinite(v) & (v != 0)):
            return True
    return False




def _delta(layer: Layer, values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """Change of ``layer``'s output (per output channel) from the constant inputs ``values[mask]``."""
    node = layer.node
    w = np.asarray(node.inputs[1].values, dtype=np.float64)
    if layer.groups > 1:
        return _grouped_delta(layer, w, np.where(mask, values, 0.0)), layer.kind != "conv" or has_padding(node)
    v = values[mask]
    if layer.kind == "conv":
        return w[:, mask].reshape(w.shape[0], len(v), -1).sum(axis=2) @ v, has_padding(node)
    if layer.kind == "convtranspose":
        strides = float(np.prod(node.attrs.get("strides", [1])))
        per = w[mask].reshape(len(v), w.shape[1], -1).sum(axis=2)
        return (per.T @ v) / strides, True
    b = w if layer.in_axis == 0 else w.T
    alpha = float(node.attrs.get("alpha", 1.0)) if layer.kind == "gemm" else 1.0
    return alpha * (b[mask].T @ v), False


def _grouped_delta(layer: Layer, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """:func:`_delta` of a grouped Conv/ConvTranspose: block ``b``'s outputs only see block ``b``'s inputs.

    ``v`` holds the removed input channels' constants (0 elsewhere). Exact for a Conv without
    padding, approximate otherwise (like the dense case).
    """
    g = layer.groups
    sums = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)
    if layer.kind == "conv":  # [g*co, ci]: out = sum_j W[o, j] v[b*ci + j]
        co, ci = w.shape[0] // g, w.shape[1]
        return np.einsum("bpj,bj->bp", sums.reshape(g, co, ci), v.reshape(g, ci)).reshape(-1)
    ci, co = w.shape[0] // g, w.shape[1]  # ConvTranspose [g*ci, co]
    strides = float(np.prod(layer.node.attrs.get("strides", [1])))
    return np.einsum("bjp,bj->bp", sums.reshape(g, ci, co), v.reshape(g, ci)).reshape(-1) / strides


def _compensations(analysis: Analysis, rm: np.ndarray, report: ApplyReport) -> dict[int, np.ndarray]:
    """Layer node id -> bias delta over its original output channels."""
    values, border = _propagate(analysis, rm)
    deltas: dict[int, np.ndarray] = {}
    for layer in analysis.layers:
        if layer.inp not in analysis.offsets:
            continue
        gone = rm[analysis.components(layer.inp)]
        if not gone.any():
            continue
        v = values.get(layer.inp, np.full(len(gone), np.nan))
        unknown = gone & ~np.isfinite(v)
        report.uncompensated += int(unknown.sum())
        mask = gone & np.isfinite(v) & (v != 0)
        if not mask.any():
            continue
        delta, approx = _delta(layer, v, mask)
        deltas[id(layer.node)] = delta
        report.compensated += 1
        report.approximate += int(approx or layer.inp in border)
    return deltas


def _bias_values(layer: Layer, delta: np.ndarray) -> tuple[np.ndarray, int]:
    """The layer's full-size bias plus ``delta`` and its channel axis; sets Gemm ``beta`` to 1."""
    node = layer.node
    w = node.inputs[1].values
    old = node.inputs[2].values if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
    if layer.kind != "gemm":
        base = np.zeros(len(delta)) if old is None else old.astype(np.float64)
        return (base + delta).astype(w.dtype if old is None else old.dtype), 0
    beta = float(node.attrs.get("beta", 1.0))
    base = np.zeros(len(delta)) if old is None or beta == 0 else old.astype(np.float64) * beta
    if base.ndim and base.shape[-1] == 1:
        base = np.broadcast_to(base, base.shape[:-1] + (len(delta),))
    node.attrs["beta"] = 1.0
    out = base + delta
    return out.astype(w.dtype if old is None else old.dtype), out.ndim - 1


def _slice_params(analysis: Analysis, rm: np.ndarray, deltas: dict[int, np.ndarray], namer: Namer,
                  kept) -> None:
    """New constants for every sliced parameter (and compensated bias)."""
    by_input: dict[tuple[int, int], list] = {}
    nodes: dict[int, gs.Node] = {}
    for spec in analysis.specs:
        for ref in spec.params:
            by_input.setdefault((id(ref.node), ref.index), []).append(ref)
            nodes[id(ref.node)] = ref.node
    layers = {id(layer.node): layer for layer in analysis.layers}
    cache: dict[tuple, gs.Constant] = {}
    for (nid, index), refs in by_input.items():
        if index == 2 and nid in deltas:
            continue  # the compensated bias is written below
        const = refs[0].constant
        keys = []
        values = const.values
        for ref in sorted(refs, key=lambda r: r.axis):
            keep = ~rm[analysis.comp[analysis.offsets[ref.tensor] + ref.slots]]
            taken = ref.take(values, keep)
            if taken is not None:
                values = taken
                keys.append((ref.axis, keep.tobytes()))
        if keys:
            key = (id(const), tuple(keys))
            if key not in cache:
                cache[key] = namer.constant(const.name, values)
            nodes[nid].inputs[index] = cache[key]
    for nid, delta in deltas.items():
        layer = layers[nid]
        if layer.kind == "matmul" and analysis.info.rank(layer.node.inputs[0]) != 2:
            _add_bias(analysis, layer, delta, namer, kept)
        else:
            _write_bias(layer, delta, namer, kept)


def _write_bias(layer: Layer, delta: np.ndarray, namer: Namer, kept) -> None:
    node = layer.node
    values, axis = _bias_values(layer, delta)
    values = np.take(values, kept(layer.out), axis=axis)
    base = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name else f"{node.name or layer.out}_bias"
    bias = namer.constant(base, values)
    if layer.kind == "matmul":
        node.op = "Gemm"
        node.attrs.clear()
    if len(node.inputs) > 2:
        node.inputs[2] = bias
    else:
        node.inputs.append(bias)


def _add_bias(analysis: Analysis, layer: Layer, delta: np.ndarray, namer: Namer, kept) -> None:
    """Fold ``delta`` into a MatMul on ``[..., k]`` rows (it cannot become a Gemm): into the
    constant of the bias ``Add`` after it, else into a new ``Add`` that takes over its output."""
    node = layer.node
    values = np.take(delta, kept(layer.out))
    found = bias_add(node, analysis.info.outputs)
    if found is not None:
        add, index = found
        old = add.inputs[index]
        new = (np.asarray(old.values, np.float64) + values.reshape(old.values.shape)).astype(old.values.dtype)
        add.inputs[index] = namer.constant(old.name, new)
        return
    out = node.outputs[0]
    mid = gs.Variable(namer.fresh(out.name), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = mid
    bias = namer.constant(f"{node.name or out.name}_bias", values.astype(node.inputs[1].values.dtype))
    analysis.graph.nodes.append(gs.Node("Add", namer.fresh(f"{node.name or out.name}_bias_add"), inputs=[mid, bias],
                                        outputs=[out]))


def _changed(analysis: Analysis, kept, names: list[str]) -> bool:
    return any(n in analysis.counts and len(kept(n)) < analysis.counts[n] for n in names)


def apply_pruning(analysis: Analysis, remove: dict[int, np.ndarray], *, compensate: bool = True) -> ApplyReport:
    """Remove the chosen channels from ``analysis.graph`` in place.

    Args:
        analysis: A fresh analysis of the graph.
        remove: Group index -> group channel indices to remove.
        compensate: Fold removed channels' constant outputs into the consumers' biases.
    """
    rm = removed_mask(analysis, remove)
    report = ApplyReport(removed=int(rm.sum()))
    if not rm.any():
        return report
    kept = _kept(analysis, rm)
    deltas = _compensations(analysis, rm, report) if compensate else {}
    report.layers = _pruned_layers(analysis, kept)
    namer = Namer(analysis.graph)
    _slice_params(analysis, rm, deltas, namer, kept)
    ctx = RewriteContext(kept, namer.constant, analysis.graph, namer.fresh)
    for spec in analysis.specs:
        if spec.rewrite is not None and _changed(analysis, kept, [t.name for t in spec.tensors()]):
            spec.rewrite(ctx)
    _update_shapes(analysis, kept)
    report.constants = namer.created
    return report


def _pruned_layers(analysis: Analysis, kept) -> list[PrunedLayer]:
    out = []
    for layer in analysis.layers:
        w = layer.node.inputs[1].values
        full_in = w.shape[layer.in_axis] * (layer.groups if layer.kind == "conv" else 1)
        full_out = w.shape[layer.out_axis] * (layer.groups if layer.kind == "convtranspose" else 1)
        kept_in = kept(layer.inp) if layer.inp in analysis.counts else np.arange(full_in)
        kept_out = kept(layer.out) if layer.out in analysis.counts else np.arange(full_out)
        in_changed = len(kept_in) < full_in
        if in_changed or len(kept_out) < full_out:
            out.append(PrunedLayer(layer.node, layer.kind, layer.inp, layer.out, layer.in_axis,
                                   kept_in, kept_out, in_changed, int(full_out)))
    return out


def _update_shapes(analysis: Analysis, kept) -> None:
    tensors = analysis.graph.tensors()
    for name, count in analysis.counts.items():
        n = len(kept(name))
        t = tensors.get(name)
        if n == count or t is None or t.shape is None:
            continue
        shape = list(t.shape)
        shape[analysis.info.channel_axis(name, len(shape))] = n
        t.shape = shape


def _zero_refs(analysis: Analysis, remove: dict[int, np.ndarray], role: str) -> int:
    rm = removed_mask(analysis, remove)
    namer = Namer(analysis.graph)
    changed = 0
    for spec in analysis.specs:
        for ref in spec.params:
            if ref.role != role:
                continue
            values = ref.zero(ref.constant.values, rm[analysis.comp[analysis.offsets[ref.tensor] + ref.slots]])
            if values is not None:
                ref.node.inputs[ref.index] = namer.constant(ref.constant.name, values)
                changed += 1
    return changed


def mask_inputs(analysis: Analysis, remove: dict[int, np.ndarray]) -> int:
    """The exact reference of ``apply_pruning(..., compensate=False)``: zero, in place, the input
    columns of every weight layer that reads a chosen channel (the channels are still computed
    but nothing reads them any more). Padding or not, the pruned graph must match it to float
    rounding. Returns the number of weights changed.
    """
    return _zero_refs(analysis, remove, ROLE_W_IN)


def mask_channels(analysis: Analysis, remove: dict[int, np.ndarray]) -> int:
    """The zeroed original: zero the producer filters (not biases) of the chosen channels, in place.

    The graph keeps its shapes; each removed channel then outputs the constant that
    :func:`apply_pruning` assumes. New constants replace the changed weights. Returns the number
    of weights changed.
    """
    return _zero_refs(analysis, remove, ROLE_W_OUT)
