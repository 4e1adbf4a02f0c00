"""Empirical bias correction of quantized layers: where the bias sits, streaming channel means, rewrites.

A quantized layer is a Conv / ConvTranspose / Gemm / MatMul whose weight (input 1) is a
``DequantizeLinear`` of a constant integer tensor. Its *bias site* is where a per-output-channel
constant is added to its result:

* Conv / ConvTranspose / Gemm: input 2 — an int32 ``DequantizeLinear`` (``scale = s_in * s_w``,
  what :mod:`onnxcompress.quant.placement` writes), a float constant (``weights_only``), or nothing
  (a bias is then created: int32 behind a DQ when the layer's input is dequantized, else float);
* MatMul: the constant operand of the one ``Add`` that consumes its output (directly or through
  its Q/DQ pair), a float constant or a ``DequantizeLinear`` of an 8-bit constant.

The *measured tensor* is the output of the node that adds the bias (the layer itself, or that
``Add``), before any output QuantizeLinear: its per-channel mean is compared with the same
tensor of a reference model. :func:`reference_name` finds that tensor's name in the reference:
the same name, or the name the Q/DQ pair after it restores.

Rewrites never edit a constant in place: a corrected bias is a new constant (and a new
DequantizeLinear when quantized), so a bias shared with other nodes is copied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, broadcast_along, const_values, node_label, opt_input, weight_layout
from onnxcompress.core.pass_api import PassResult, Slot
from onnxcompress.quant.params import INT32_MAX, QParams, activation_params, quantize_bias, quantize_values
from onnxcompress.quant.sensitivity import REFERENCE_BUDGET
from onnxcompress.runtime.batching import Batch

__all__ = [
    "ChannelMoments",
    "KeptValues",
    "FloatStatistics",
    "FLOAT_STATISTICS",
    "BiasSite",
    "find_sites",
    "assign_levels",
    "reference_name",
    "dequantized_reference",
    "bias_values",
    "apply_correction",
    "sort_appended",
    "R_NOT_QUANTIZED",
    "R_WEIGHT",
    "R_LAYOUT",
    "R_NO_BIAS_PATH",
    "R_BIAS_CONST",
    "R_BIAS_CHANNELS",
    "R_NO_INT32",
]

log = logging.getLogger(__name__)

R_NOT_QUANTIZED = "weight_not_quantized"  # no DequantizeLinear of an integer constant
R_WEIGHT = "weight_not_constant"
R_LAYOUT = "unsupported_weight_layout"
R_NO_BIAS_PATH = "no_bias_path"  # MatMul output not read by one Add with a constant
R_BIAS_CONST = "bias_not_constant"
R_BIAS_CHANNELS = "bias_not_per_channel"
R_NO_INT32 = "no_int32_bias"  # input or weight scale not per tensor / per output channel

_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class ChannelMoments:
    """Streaming per-channel mean and variance (memory: 3 vectors).

    The sums behind the mean are float64 (each value is widened as it is added); the sums of
    squares behind the variance are taken in the arrays' own precision (float32 for activations)
    and added up in float64: the variance only feeds reported statistics, and widening every value
    a second time doubled the cost of this class on a ResNet-50.

    Args:
        axis: The channel axis of the arrays given to :meth:`update` (negative counts from the end).
        variance: Also sum the squares (:meth:`var`); off where only the mean is used.
    """

    def __init__(self, axis: int, variance: bool = True):
        self.axis, self.variance = axis, variance
        self.total: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        """Add every element of ``array`` to its channel's sums.

        Axis 0 is the sample axis (unless it is the channel axis): samples are added one by one,
        so the sums do not depend on how the samples were cut into batches."""
        values = np.asarray(array)
        axis = self.axis % values.ndim
        channels = values.shape[axis]
        if self.total is None:
            self.total, self.squares = np.zeros(channels), np.zeros(channels)
        if channels != len(self.total):
            raise ValueError(f"channel count changed from {len(self.total)} to {channels}")
        if values.ndim == 1 or axis == 0:  # no sample axis to split on
            self._add(values.reshape(1, channels, -1))
        else:  # one sample at a time: the same sums however the samples are split into batches
            for sample in values:
                self._add(sample.reshape(-1, channels, int(np.prod(values.shape[axis + 1:], dtype=np.int64))))
        self.count += values.size // max(channels, 1)

    def _add(self, block: np.ndarray) -> None:
        """Add ``[rows, channels, positions]``: float64 sums, squares in ``block``'s precision."""
        self.total += np.add.reduce(block, axis=2, dtype=np.float64).sum(axis=0)
        if self.variance:
            self.squares += np.einsum("rcp,rcp->c", block, block)

    @property
    def channels(self) -> int:
        """Number of channels seen (0 before the first update)."""
        return 0 if self.total is None else len(self.total)

    def mean(self) -> np.ndarray:
        """Per-channel mean."""
        return self.total / max(self.count, 1)

    def var(self) -> np.ndarray:
        """Per-channel (population) variance (with ``variance`` on)."""
        if not self.variance:
            raise ValueError("these moments were gathered without their variance")
        return np.maximum(self.squares / max(self.count, 1) - np.square(self.mean()), 0.0)


class KeptValues:
    """Values of a few tensors, run by run, kept while they fit in
    :data:`~onnxcompress.quant.sensitivity.REFERENCE_BUDGET` (past it: dropped for good).

    :meth:`arrays` stacks them by sample (when axis 0 is the sample axis of every run and the runs
    stack); :meth:`runs` gives them run by run, for a consumer whose batches are those runs
    (e.g. a fixed-batch model's sequence-first ``[T, 1, C]`` output, which cannot be cut by sample).
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.parts: list[tuple[int, dict[str, np.ndarray]]] | None = [] if names else None
        self.used = 0

    def add(self, values: dict[str, np.ndarray], samples: int) -> None:
        """Keep ``values``' tensors of :attr:`names` (one run of ``samples`` samples)."""
        if self.parts is None:
            return
        # copies: an onnxruntime output is a view that keeps its session's whole memory arena alive
        part = {n: np.array(values[n], copy=True) for n in self.names}
        self.used += sum(v.nbytes for v in part.values())
        self.parts = None if self.used > REFERENCE_BUDGET else [*self.parts, (samples, part)]

    def arrays(self) -> dict[str, np.ndarray] | None:
        """``{name: values of every sample}``; ``None`` when dropped, never asked for, or when the
        runs do not stack along a sample axis 0 (ragged shapes, or axis 0 is not the samples)."""
        if not self.parts:
            return None
        first = self.parts[0][1]
        for samples, part in self.parts:
            if any(v.ndim == 0 or v.shape[0] != samples or v.shape[1:] != first[n].shape[1:] for n, v in part.items()):
                return None
        return {n: np.concatenate([p[n] for _, p in self.parts]) for n in self.names}

    def runs(self) -> list[tuple[int, list[np.ndarray]]] | None:
        """``[(samples, values in names order)]`` per run (``None`` when dropped or never asked for)."""
        if not self.parts:
            return None
        return [(samples, [p[n] for n in self.names]) for samples, p in self.parts]


class FloatStatistics:
    """What ``bias_correction`` needs from the float model, gathered in another pass's run of it
    over the same data (``quantize_int8``'s calibration): per-channel moments of layer outputs
    and the graph outputs (:class:`KeptValues`). Fed batch by batch through :meth:`update`.

    Attributes:
        source: The calibration source the run read (reused only for the same object).
        batch_size: Its batch size.
        moments: ``{float tensor name: moments}`` (axis 1 for Conv/ConvTranspose/Gemm outputs,
            -1 for the Add after a MatMul).
        kept: The graph outputs' values over every sample.
        samples: Samples seen.
    """

    def __init__(self, source, batch_size: int, axes: dict[str, int], outputs: list[str]):
        self.source, self.batch_size = source, batch_size
        self.moments = {name: ChannelMoments(axis) for name, axis in axes.items()}
        self.kept = KeptValues(outputs)
        self.samples = 0

    @classmethod
    def for_graph(cls, graph: gs.Graph, source, batch_size: int) -> FloatStatistics:
        """Statistics of the float ``graph``'s layer outputs (what :class:`BiasSite` measures) and
        graph outputs; :attr:`names` are the tensors a run must capture for them."""
        axes = {}
        for node in graph.nodes:
            out = node.outputs[0] if node.outputs else None
            if node.op in ("Conv", "ConvTranspose", "Gemm"):
                axes[out.name] = 1
            elif node.op == "MatMul" and len(out.outputs) == 1 and out.outputs[0].op == "Add":
                axes[out.outputs[0].outputs[0].name] = -1
        return cls(source, batch_size, axes, [t.name for t in graph.outputs])

    @property
    def names(self) -> list[str]:
        """The tensors :meth:`update` reads."""
        return list(dict.fromkeys([*self.moments, *self.kept.names]))

    def update(self, batch: Batch, values: dict[str, np.ndarray]) -> None:
        """Add one run's tensors (a :data:`~onnxcompress.runtime.capture.Consumer`)."""
        for name, m in self.moments.items():
            m.update(values[name])
        self.kept.add(values, len(batch))
        self.samples += len(batch)


#: :class:`FloatStatistics` of the float model ``quantize_int8`` quantized, gathered during its
#: calibration run; ``bias_correction`` uses them instead of running that model again.
FLOAT_STATISTICS = Slot("float_statistics", FloatStatistics, "the float model's channel statistics",
                        "channel moments and outputs of the float model from quantize_int8's calibration run")


@dataclass
class BiasSite:
    """One quantized layer and where its bias is added.

    Attributes:
        node: The quantized Conv / ConvTranspose / Gemm / MatMul.
        target: The node that adds the bias (``node``, or the Add after a MatMul).
        slot: Input index of the bias on ``target``; ``None`` when there is no bias yet.
        axis: Channel axis of the measured tensor (``target``'s output).
        channels: Number of output channels.
        level: 1 + the highest level among the sites upstream (sites of one level are measured
            in the same model run).
    """

    node: gs.Node
    target: gs.Node
    slot: int | None
    axis: int
    channels: int
    level: int = 1

    @property
    def measured(self) -> gs.Tensor:
        """The tensor whose channel means are compared with the reference."""
        return self.target.outputs[0]

    @property
    def label(self) -> str:
        """The layer's label in stats and declines."""
        return node_label(self.node)

    @property
    def bias_scale_divisor(self) -> float:
        """Gemm's ``beta`` (the bias input is multiplied by it), else 1."""
        return float(self.target.attrs.get("beta", 1.0)) if self.target.op == "Gemm" else 1.0


# ------------------------------------------------------------------------------- finding sites


def _producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    if tensor is not None and tensor.inputs and tensor.inputs[0].op == op:
        return tensor.inputs[0]
    return None


def _dq_params(dq: gs.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """``(values, scale, zero point, axis)`` of a DequantizeLinear of constants, else ``None``."""
    values, scale = const_values(dq.inputs[0]), const_values(opt_input(dq, 1))
    zp_t = opt_input(dq, 2)
    zp = const_values(zp_t) if zp_t is not None else np.zeros((), values.dtype if values is not None else np.uint8)
    if values is None or scale is None or zp is None:
        return None
    return values, scale, zp, int(dq.attrs.get("axis", 1))


def _weight_values(node: gs.Node) -> tuple[np.ndarray | None, str | None]:
    """The integer weight of a quantized layer, or ``(None, reason)``."""
    w_t = opt_input(node, 1)
    dq = _producer(w_t, "DequantizeLinear")
    if dq is None:
        return None, (R_NOT_QUANTIZED if const_values(w_t) is not None else R_WEIGHT)
    params = _dq_params(dq)
    if params is None:
        return None, R_WEIGHT
    if params[0].dtype.kind not in "iu":
        return None, R_NOT_QUANTIZED
    return params[0], None


def _channels(node: gs.Node, w: np.ndarray) -> int | None:
    conv = node.op in ("Conv", "ConvTranspose")
    if (conv and w.ndim < 3) or (not conv and w.ndim != 2):
        return None
    return weight_layout(node, w.ndim).out_channels(w.shape)


def bias_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The float values of a constant bias (plain, or dequantized from constants), else ``None``."""
    values = const_values(tensor)
    if values is not None:
        return values.astype(np.float64) if values.dtype.kind == "f" else None
    dq = _producer(tensor, "DequantizeLinear")
    params = _dq_params(dq) if dq is not None else None
    if params is None:
        return None
    q, scale, zp, axis = params
    return (q.astype(np.float64) - broadcast_along(zp, q.ndim, axis)) * broadcast_along(scale.astype(np.float64), q.ndim, axis)


def _per_channel(values: np.ndarray, channels: int) -> bool:
    if values.size == 1:
        return True
    return values.size == channels and values.ndim >= 1 and values.shape[-1] == channels


def _bias_add(node: gs.Node) -> tuple[gs.Node, int] | None:
    """The Add reading ``node``'s output (directly or through Q→DQ) and its constant slot."""
    out = node.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == "QuantizeLinear":
        q_out = out.outputs[0].outputs[0]
        if len(q_out.outputs) != 1 or q_out.outputs[0].op != "DequantizeLinear":
            return None
        out = q_out.outputs[0].outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return None
    slot = 1 if add.inputs[0] is out else 0
    return add, slot


def _site(node: gs.Node) -> tuple[BiasSite | None, str | None]:
    w, reason = _weight_values(node)
    if w is None:
        return None, reason
    channels = _channels(node, w)
    if channels is None:
        return None, R_LAYOUT
    if node.op == "MatMul":
        found = _bias_add(node)
        if found is None:
            return None, R_NO_BIAS_PATH
        target, slot, axis = found[0], found[1], -1
    else:
        target, slot, axis = node, (2 if opt_input(node, 2) is not None else None), 1
    if slot is not None:
        values = bias_values(target.inputs[slot])
        if values is None:
            return None, (R_NO_BIAS_PATH if node.op == "MatMul" else R_BIAS_CONST)
        if not _per_channel(values, channels):
            return None, R_BIAS_CHANNELS
    elif _new_int32_params(node, channels) is False:
        return None, R_NO_INT32
    return BiasSite(node, target, slot, axis, channels), None


def find_sites(graph: gs.Graph, result: PassResult, logger: logging.Logger | None = None) -> list[BiasSite]:
    """Every quantized layer with a bias site, in graph order; the others are declined in ``result``."""
    sites = []
    for node in graph.nodes:
        if node.op not in _COMPUTE:
            continue
        site, reason = _site(node)
        if site is None:
            result.decline(node_label(node), reason, logger=logger)
        else:
            sites.append(site)
    return sites


def assign_levels(graph: gs.Graph, sites: list[BiasSite]) -> None:
    """Set each site's level: 1 + the highest level of the sites it depends on (``graph`` sorted)."""
    by_target = {id(s.target): s for s in sites}
    levels: dict[str, int] = {}
    for node in graph.nodes:
        level = max((levels.get(t.name, 0) for t in node.inputs if t.name), default=0)
        site = by_target.get(id(node))
        if site is not None:
            level += 1
            site.level = level
        for out in node.outputs:
            levels[out.name] = level


# ----------------------------------------------------------------------------------- reference


def reference_name(tensor: gs.Tensor, produced: set[str]) -> str | None:
    """``tensor``'s name in a reference model producing ``produced``: the same name, or the name
    restored by the Q→DQ pair that alone reads it; ``None`` if neither exists there."""
    if tensor.name in produced:
        return tensor.name
    if len(tensor.outputs) == 1 and tensor.outputs[0].op == "QuantizeLinear":
        q_out = tensor.outputs[0].outputs[0]
        dqs = [n for n in q_out.outputs if n.op == "DequantizeLinear"]
        if len(dqs) == 1 and dqs[0].outputs[0].name in produced:
            return dqs[0].outputs[0].name
    return None


def dequantized_reference(graph: gs.Graph) -> gs.Graph:
    """A copy of the QDQ graph ``graph`` with every activation Q→DQ pair replaced by Identity.

    Weights and biases stay dequantized from their integers: this "fake-float" reference differs
    from the quantized model only by activation quantization (not by weight rounding).
    """
    copy = graph.copy()
    for node in copy.nodes:
        if node.op != "DequantizeLinear":
            continue
        q = _producer(node.inputs[0], "QuantizeLinear")
        if q is None or isinstance(q.inputs[0], gs.Constant):
            continue
        node.op, node.attrs, node.inputs = "Identity", {}, [q.inputs[0]]
    copy.cleanup(remove_unused_graph_inputs=False).toposort()
    return copy


# ------------------------------------------------------------------------------------- rewrite


def _new_int32_params(node: gs.Node, channels: int) -> tuple[float, QParams] | None | bool:
    """``(s_in, weight params)`` for a new int32 bias of a layer whose input is dequantized;
    ``None`` when the input is float (a float bias is made); ``False`` when impossible."""
    if node.op == "ConvTranspose":
        return None
    dq_in = _producer(node.inputs[0], "DequantizeLinear")
    if dq_in is None:
        return None
    in_params = _dq_params(dq_in) if isinstance(dq_in.inputs[0], gs.Constant) else None
    s_in = const_values(opt_input(dq_in, 1))
    w_dq = _producer(node.inputs[1], "DequantizeLinear")
    w_scale = const_values(opt_input(w_dq, 1))
    if in_params is not None or s_in is None or s_in.size != 1 or w_scale is None:
        return False
    w_axis = int(w_dq.attrs.get("axis", 1)) % max(w_dq.inputs[0].values.ndim, 1)
    out_axis = weight_layout(node).out_axis
    if w_scale.size == 1:
        return float(s_in.reshape(())), QParams(w_scale.reshape(()).astype(np.float32), np.zeros((), np.int8))
    if w_scale.size != channels or w_axis != out_axis:
        return False
    return float(s_in.reshape(())), QParams(w_scale.reshape(-1).astype(np.float32),
                                            np.zeros(channels, np.int8), 0)


def _add_dq(graph: gs.Graph, names: Names, base: str, q: np.ndarray, scale: gs.Tensor, zp: gs.Tensor,
            axis: int | None) -> gs.Variable:
    data = gs.Constant(names.fresh(f"{base}_quantized"), np.array(q, order="C"))
    out = gs.Variable(names.fresh(f"{base}_dequantized"), dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": axis} if axis is not None else {}
    graph.nodes.append(gs.Node("DequantizeLinear", names.fresh(f"{base}_DequantizeLinear"), attrs,
                               [data, scale, zp], [out]))
    return out


def _const(names: Names, base: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(names.fresh(base), np.array(value, order="C"))


def _requantize(graph: gs.Graph, names: Names, base: str, dq: gs.Node, new: np.ndarray,
                result: PassResult) -> gs.Variable:
    """A new DQ of ``new`` (float): int32 keeps the scale (it must be ``s_in * s_w``); 8-bit per
    tensor gets parameters fitted to the new values; other layouts keep theirs (values clipped)."""
    q, scale, zp, axis = _dq_params(dq)
    if q.dtype != np.int32 and scale.size == 1:
        p = activation_params(float(new.min(initial=0.0)), float(new.max(initial=0.0)),
                              symmetric=zp.dtype == np.int8)
        new_q = quantize_values(new, p)
        return _add_dq(graph, names, base, new_q, _const(names, f"{base}_scale", p.scale),
                       _const(names, f"{base}_zero_point", p.zero_point), None)
    info = np.iinfo(q.dtype)
    lo, hi = (-INT32_MAX, INT32_MAX) if q.dtype == np.int32 else (info.min, info.max)
    raw = np.round(new / broadcast_along(scale.astype(np.float64), new.ndim, axis)) + broadcast_along(zp, new.ndim, axis)
    result.count("bias_clipped", int(np.count_nonzero((raw < lo) | (raw > hi))))
    new_q = np.clip(raw, lo, hi).astype(q.dtype)
    return _add_dq(graph, names, base, new_q, dq.inputs[1], opt_input(dq, 2) or _const(
        names, f"{base}_zero_point", np.zeros(np.shape(scale), q.dtype)), dq.attrs.get("axis"))


def _shaped(values: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``values`` (size 1 or per channel) plus ``delta`` (per channel), in ``values``' layout."""
    if values.size == 1:
        return values.reshape(-1)[0] + delta
    return values + delta.reshape(values.shape)


def apply_correction(graph: gs.Graph, names: Names, site: BiasSite, delta: np.ndarray, result: PassResult) -> None:
    """Add ``delta`` (per channel, in the measured tensor's units) to ``site``'s bias (Gemm: to
    ``beta * C``; a new C gets ``beta = 1``).

    The old bias constant (and its DequantizeLinear) is left for cleanup, never edited.
    """
    delta = np.asarray(delta, np.float64)
    base = f"{site.label}_bias_corrected"
    if site.slot is None:
        _create_bias(graph, names, site, delta, base, result)
        return
    delta = delta / site.bias_scale_divisor
    old = site.target.inputs[site.slot]
    if len([n for n in old.outputs if n is not site.target]) or any(t is old for t in graph.outputs):
        result.count("bias_copied")
    new = _shaped(bias_values(old), delta)
    dq = _producer(old, "DequantizeLinear")
    if dq is None:
        site.target.inputs[site.slot] = _const(names, base, new.astype(np.float32))
    else:
        site.target.inputs[site.slot] = _requantize(graph, names, base, dq, new, result)


def _create_bias(graph: gs.Graph, names: Names, site: BiasSite, delta: np.ndarray, base: str,
                 result: PassResult) -> None:
    params = _new_int32_params(site.node, site.channels)
    if params is None or params is False:
        tensor = _const(names, base, delta.astype(np.float32))
    else:
        s_in, w_params = params
        q, p = quantize_bias(delta, s_in, w_params)
        result.count("bias_clipped", int(np.count_nonzero(np.abs(q.astype(np.int64)) >= INT32_MAX)))
        tensor = _add_dq(graph, names, base, q, _const(names, f"{base}_scale", p.scale),
                         _const(names, f"{base}_zero_point", p.zero_point), p.axis)
    node = site.node
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0  # there was no C: beta was unused (and QGemm wants 1)
    if len(node.inputs) > 2:
        node.inputs[2] = tensor
    else:
        node.inputs.append(tensor)
    result.count("bias_added")


def sort_appended(graph: gs.Graph, start: int) -> None:
    """Reorder ``graph.nodes``, sorted up to ``start`` and followed by nodes reading only constants
    (what :func:`apply_correction` appends), exactly as ``graph.toposort()`` would, in linear time.

    onnx-graphsurgeon sorts stably by depth, the nodes met in a walk of the list, producers first:
    on such a list the appended nodes (depth 0) come after the other depth-0 nodes, in the order
    of their first reader. Other lists (an appended node reading a computed tensor, subgraphs)
    get ``graph.toposort()``.
    """
    old, new = graph.nodes[:start], graph.nodes[start:]
    if not new:
        return
    if any(t.inputs for n in new for t in n.inputs) or any(True for n in graph.nodes for _ in n.subgraphs()):
        graph.toposort()
        return
    where = {id(n): i for i, n in enumerate(old)}
    first: dict[int, tuple[int, int]] = {}
    for i, node in enumerate(old):
        for j, t in enumerate(node.inputs):
            for producer in t.inputs:
                first.setdefault(id(producer), (i, j))
    if any(id(n) not in first or id(n) in where for n in new):  # an unread appended node
        graph.toposort()
        return
    end = next((i for i, n in enumerate(old) if any(t.inputs for t in n.inputs)), len(old))
    graph.nodes = old[:end] + sorted(new, key=lambda n: first[id(n)]) + old[end:]
