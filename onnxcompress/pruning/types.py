"""Types shared by the pruning modules: graph facts, per-node channel specs, parameter references.

A *channel tensor* is a non-constant tensor of rank >= 2 whose channel axis (axis 1, NCHW or
``[N, C]``) has a static size. Its channels are *slots*; the handlers (:mod:`.handlers`) say, node
by node, which slots are the same channel (links), which are born free in a node (sources: the
output channels of a Conv/Gemm/MatMul with constant weights), which constants are indexed by
which slots (:class:`ParamRef`) and what cannot be touched (freezes and pins, with a reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

__all__ = [
    "CHANNEL_AXIS",
    "FREEZE_REASONS",
    "ROLE_B_OUT",
    "ROLE_GAMMA",
    "ROLE_PARAM",
    "ROLE_W_IN",
    "ROLE_W_OUT",
    "R_BROADCAST",
    "R_CONSTANT",
    "R_CONTROL_FLOW",
    "R_EXCLUDED",
    "R_GRAPH_INPUT",
    "R_GRAPH_OUTPUT",
    "R_GROUPED",
    "R_HEADS",
    "R_LAST_AXIS",
    "R_MISMATCH",
    "R_MOVES_AXIS",
    "R_NONCONST",
    "R_NORMALIZES",
    "R_NO_HANDLER",
    "R_REDUCES",
    "R_RESHAPE",
    "R_RESHAPE_TARGET",
    "R_SHAPE_READ",
    "R_SHARED",
    "R_TRAINING",
    "R_UNKNOWN_DIM",
    "R_UNSUPPORTED",
    "GraphInfo",
    "Layer",
    "NodeSpec",
    "ParamRef",
    "RewriteContext",
    "slug",
]

log = logging.getLogger(__name__)

#: Every tensor's channel axis.
CHANNEL_AXIS = 1

R_NO_HANDLER = "no_handler"
R_CONTROL_FLOW = "control_flow"
R_GRAPH_INPUT = "graph_input"
R_GRAPH_OUTPUT = "graph_output"
R_UNKNOWN_DIM = "unknown_channel_dim"
R_MISMATCH = "channel_count_mismatch"
R_NONCONST = "non_constant_weight"
R_GROUPED = "grouped_conv"
R_SHARED = "shared_weight"
R_EXCLUDED = "excluded"
R_REDUCES = "reduces_over_channels"
R_MOVES_AXIS = "channel_axis_moved"
R_RESHAPE = "reshape_mixes_channels"
R_RESHAPE_TARGET = "reshape_target_untraced"
R_BROADCAST = "broadcast_mismatch"
R_CONSTANT = "constant_channels"
R_UNSUPPORTED = "unsupported_attributes"
R_SHAPE_READ = "shape_read"
R_TRAINING = "training_mode"
R_LAST_AXIS = "channels_not_on_axis_1"
R_HEADS = "attention_heads"
R_NORMALIZES = "normalizes_over_channels"

#: Every reason (a decline code) a channel, and so its group, can be frozen or pinned.
FREEZE_REASONS = (
    R_NO_HANDLER, R_CONTROL_FLOW, R_GRAPH_INPUT, R_GRAPH_OUTPUT, R_UNKNOWN_DIM, R_MISMATCH, R_NONCONST,
    R_GROUPED, R_SHARED, R_EXCLUDED, R_REDUCES, R_MOVES_AXIS, R_RESHAPE, R_RESHAPE_TARGET, R_BROADCAST,
    R_CONSTANT, R_UNSUPPORTED, R_SHAPE_READ, R_TRAINING, R_LAST_AXIS, R_HEADS, R_NORMALIZES,
)

ROLE_W_OUT = "w_out"  #: A producer's output filters (weight), used by importance scores.
ROLE_B_OUT = "b_out"  #: A producer's bias.
ROLE_W_IN = "w_in"  #: A consumer's input columns.
ROLE_GAMMA = "gamma"  #: A BatchNormalization scale (``bn_scale`` criterion).
ROLE_PARAM = "param"  #: Any other per-channel constant (BN shift/stats, PRelu slope, Mul/Add operand).


def slug(reason: str) -> str:
    """``reason`` as a stats-key fragment (``"no handler"`` -> ``"no_handler"``; a code is its own slug)."""
    return "".join(c if c.isalnum() else "_" for c in reason.lower()).strip("_")


@dataclass(eq=False)
class ParamRef:
    """Axis ``axis`` of constant input ``index`` of ``node`` follows the channels of ``tensor``.

    A *blocked* reference (``block_axis`` set; grouped convolutions) splits the constant into
    ``len(slots)`` equal blocks along ``block_axis``; in block ``b``, position ``p`` along
    ``axis`` is channel ``slots[b, p]`` (a grouped Conv weight ``[g*co, ci, k, k]``: the
    ``ci`` columns of block ``b`` read input channels ``b*ci .. b*ci+ci-1``). Every block must
    lose the same number of positions (the selection guarantees it).

    Attributes:
        node: The node that reads the constant.
        index: Input index of the constant.
        axis: Axis of the constant (non-negative).
        tensor: The channel tensor that axis follows.
        slots: For each position along ``axis``, the channel of ``tensor`` it belongs to
            (``[blocks, positions]`` for a blocked reference).
        role: One of the ``ROLE_*`` tags.
        block_axis: The axis split into blocks, or ``None``.
    """

    node: gs.Node
    index: int
    axis: int
    tensor: str
    slots: np.ndarray
    role: str
    block_axis: int | None = None

    @property
    def constant(self) -> gs.Constant:
        """The constant this reference slices."""
        return self.node.inputs[self.index]

    def _blocks(self, values: np.ndarray) -> list[np.ndarray]:
        return np.split(values, len(self.slots), axis=self.block_axis)

    def norms(self, power: int) -> np.ndarray:
        """Sum of ``|v|**power`` over everything but ``axis``, per position (shaped like ``slots``)."""
        values = np.asarray(self.constant.values, dtype=np.float64)
        parts = [values] if self.block_axis is None else self._blocks(values)
        out = []
        for part in parts:
            flat = np.abs(np.moveaxis(part, self.axis, 0).reshape(part.shape[self.axis], -1)) ** power
            out.append(flat.sum(axis=1))
        return out[0] if self.block_axis is None else np.stack(out)

    def take(self, values: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
        """``values`` without the positions where ``keep`` (shaped like ``slots``) is False;
        ``None`` when nothing goes.

        Raises:
            ValueError: A blocked reference whose blocks would keep different counts.
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return None
        if self.block_axis is None:
            return np.take(values, np.flatnonzero(keep), axis=self.axis)
        counts = keep.sum(axis=1)
        if len(set(counts.tolist())) != 1:
            raise ValueError(f"{self.constant.name}: blocks keep different counts {counts.tolist()}")
        parts = [np.take(part, np.flatnonzero(k), axis=self.axis) for part, k in zip(self._blocks(values), keep)]
        return np.concatenate(parts, axis=self.block_axis)

    def zero(self, values: np.ndarray, gone: np.ndarray) -> np.ndarray | None:
        """A copy of ``values`` with the positions where ``gone`` is True set to 0 (``None``: none)."""
        gone = np.asarray(gone, dtype=bool)
        if not gone.any():
            return None
        out = np.array(values, copy=True)
        parts = [out] if self.block_axis is None else self._blocks(out)  # views into ``out``
        for part, g in zip(parts, [gone] if self.block_axis is None else gone):
            index = [slice(None)] * part.ndim
            index[self.axis] = np.flatnonzero(g)
            part[tuple(index)] = 0
        return out


@dataclass(eq=False)
class Layer:
    """A weight layer reading a channel tensor (for bias compensation and reconstruction).

    Attributes:
        node: Conv, ConvTranspose, Gemm or MatMul with a constant weight (input 1).
        kind: ``conv``, ``convtranspose``, ``gemm`` or ``matmul``.
        inp: Name of the data input.
        out: Name of the output.
        in_axis: Axis of the weight that follows the input channels.
        out_axis: Axis of the weight that follows the output channels.
        groups: ``group`` of a grouped (not depthwise) Conv/ConvTranspose, else 1.
    """

    node: gs.Node
    kind: str
    inp: str
    out: str
    in_axis: int
    out_axis: int
    groups: int = 1


@dataclass
class GraphInfo:
    """Static facts about a graph that handlers read: shapes, constants, opset.

    Attributes:
        shapes: Tensor name -> dims (``None`` where unknown); absent when the rank is unknown.
        opset: Default-domain opset.
        outputs: Names of the graph outputs.
        last_axis: Channels are on the last axis (a MatMul's output) instead of axis 1. Pruning
            never sets it; a walker following a MatMul's channels does (``equalize``), and then
            only the ops of :data:`.handlers.LAST_AXIS_OPS` are followed.
        symbols: Tensor name -> the symbolic name of each dim (``None`` where none), as shape
            inference left them: two dims of one name are equal (the batch of two tensors).
        last: Tensors of rank >= 3 whose channels are on the last axis (a transformer's
            ``[batch, seq, dim]`` activations, found by :func:`.layout.last_axis_tensors`);
            every other tensor has its channels on :data:`CHANNEL_AXIS`.
    """

    shapes: dict[str, tuple[int | None, ...]]
    opset: int
    outputs: frozenset[str] = frozenset()
    last_axis: bool = False
    symbols: dict[str, tuple[str | None, ...]] = field(default_factory=dict)
    last: frozenset[str] = frozenset()

    def same_dim(self, a: str, i: int, b: str, j: int) -> bool:
        """Whether dim ``i`` of tensor ``a`` is known to equal dim ``j`` of tensor ``b``."""
        sa, sb = self.shapes.get(a), self.shapes.get(b)
        if sa is None or sb is None or i >= len(sa) or j >= len(sb):
            return False
        if sa[i] is not None and sb[j] is not None:
            return sa[i] == sb[j]
        na, nb = self.symbols.get(a, ()), self.symbols.get(b, ())
        return i < len(na) and j < len(nb) and na[i] is not None and na[i] == nb[j]

    def shape(self, tensor: gs.Tensor) -> tuple[int | None, ...] | None:
        """Dims of ``tensor`` (constants: their array's shape)."""
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in np.shape(tensor.values))
        return self.shapes.get(tensor.name)

    def rank(self, tensor: gs.Tensor) -> int | None:
        """Rank of ``tensor`` or ``None``."""
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def axis(self, rank: int) -> int:
        """The channel axis of a rank-``rank`` tensor: :data:`CHANNEL_AXIS`, or the last one."""
        return rank - 1 if self.last_axis else CHANNEL_AXIS

    def channel_axis(self, name: str, rank: int) -> int:
        """The channel axis of tensor ``name`` of rank ``rank`` (the last one for :attr:`last` tensors)."""
        return rank - 1 if self.last_axis or name in self.last else CHANNEL_AXIS

    def channels(self, tensor: gs.Tensor) -> int | None:
        """Static size of the channel axis, or ``None`` (unknown, or rank < 2; < 1 on the last axis)."""
        shape = self.shape(tensor)
        on_last = self.last_axis or tensor.name in self.last
        if shape is None or len(shape) <= (0 if on_last else CHANNEL_AXIS):
            return None
        return shape[len(shape) - 1 if on_last else CHANNEL_AXIS]

    @staticmethod
    def const(tensor: gs.Tensor | None) -> np.ndarray | None:
        """Values of a dense constant, else ``None``."""
        if isinstance(tensor, gs.Constant) and isinstance(tensor.values, np.ndarray):
            return tensor.values
        return None


ConstFn = Callable[[Callable[[str], np.ndarray]], dict[str, np.ndarray]]


@dataclass(eq=False)
class RewriteContext:
    """What a node rewrite (Split sizes, Slice bounds, Reshape shape, ``group``) may use.

    Attributes:
        kept: Tensor name -> kept channel indices (every channel tensor of the graph).
        constant: ``constant(base_name, values)`` makes a new uniquely named ``gs.Constant``.
        graph: The graph being pruned (a rewrite that must add a node appends it here).
        fresh: ``fresh(base_name)`` is a new unused tensor or node name.
        made: Tensors that rewrites made, by a key of their choosing, so that several rewrites
            that need the same new node share it.
    """

    kept: Callable[[str], np.ndarray]
    constant: Callable[[str, np.ndarray], gs.Constant]
    graph: gs.Graph | None = None
    fresh: Callable[[str], str] | None = None
    made: dict = field(default_factory=dict)

    def count(self, name: str) -> int:
        """Number of channels ``name`` keeps."""
        return len(self.kept(name))


@dataclass(eq=False)
class NodeSpec:
    """How channels flow through one node (built by a handler).

    Attributes:
        node: The node.
        info: Graph facts.
        links: ``(tensor a, channels of a, tensor b, channels of b)``: pairwise the same channel.
        sources: Output tensors whose channels are born here (removable filters).
        pins: ``(tensor, channels, reason)``: channels that can never be removed.
        freezes: ``(tensor, reason)``: every channel of the tensor is frozen.
        params: Constants indexed by channels.
        touched: Names of the tensors this spec accounts for; other channel tensors of the
            node are frozen with :data:`R_NO_HANDLER`.
        layer: Set for weight layers (compensation, reconstruction).
        const_fn: Value of every output channel when the input channels are constants (and
            sources output their bias): ``const_fn(values_of) -> {output name: per-channel}``.
        const_border: ``const_fn`` holds only away from the spatial borders when a removed input
            channel's constant is non-zero (a padded depthwise conv, a depthwise ConvTranspose);
            compensation downstream is then reported approximate.
        rewrite: Edits the node's non-parameter inputs/attributes after pruning.
        blocks: ``(tensor, block of each channel)``: the channels of ``tensor`` form equal blocks
            (a grouped conv's input or output) and every block must lose as many channels as
            every other one.
    """

    node: gs.Node
    info: GraphInfo
    links: list[tuple[str, np.ndarray, str, np.ndarray]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    pins: list[tuple[str, np.ndarray, str]] = field(default_factory=list)
    freezes: list[tuple[str, str]] = field(default_factory=list)
    params: list[ParamRef] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    layer: Layer | None = None
    const_fn: ConstFn | None = None
    const_border: bool = False
    rewrite: Callable[[RewriteContext], None] | None = None
    blocks: list[tuple[str, np.ndarray]] = field(default_factory=list)

    def tensors(self) -> list[gs.Tensor]:
        """The node's named non-constant inputs and outputs."""
        return [t for t in [*self.node.inputs, *self.node.outputs] if t.name and not isinstance(t, gs.Constant)]

    def freeze(self, tensors: list[gs.Tensor] | None, reason: str) -> NodeSpec:
        """Freeze ``tensors`` (default: all of the node's tensors); returns ``self``."""
        for t in self.tensors() if tensors is None else tensors:
            if t.name and not isinstance(t, gs.Constant):
                self.freezes.append((t.name, reason))
                self.touched.add(t.name)
        return self

    def link(self, a: gs.Tensor, ia: np.ndarray, b: gs.Tensor, ib: np.ndarray) -> None:
        """Channels ``ia`` of ``a`` are channels ``ib`` of ``b`` (a constant side pins the other)."""
        self.touched.update(t.name for t in (a, b))
        if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
            var, idx = (b, ib) if isinstance(a, gs.Constant) else (a, ia)
            if not isinstance(var, gs.Constant):
                self.pins.append((var.name, np.asarray(idx, np.int64), R_CONSTANT))
            return
        if self.info.channels(a) is None or self.info.channels(b) is None:
            self.freeze([a, b], R_UNKNOWN_DIM)
            return
        self.links.append((a.name, np.asarray(ia, np.int64), b.name, np.asarray(ib, np.int64)))

    def identity(self, a: gs.Tensor, b: gs.Tensor) -> bool:
        """Link every channel of ``a`` to the same channel of ``b``; False (frozen) on a mismatch."""
        ca, cb = self.info.channels(a), self.info.channels(b)
        if ca is None or cb is None or ca != cb:
            self.freeze([a, b], R_UNKNOWN_DIM if ca is None or cb is None else R_MISMATCH)
            return False
        self.link(a, np.arange(ca), b, np.arange(cb))
        return True

    def param(self, index: int, axis: int, tensor: gs.Tensor, role: str, slots: np.ndarray | None = None) -> None:
        """Axis ``axis`` of constant input ``index`` follows ``tensor`` (default: channel i <-> i)."""
        values = self.info.const(self.node.inputs[index])
        n = values.shape[axis]
        slots = np.arange(n) if slots is None else np.asarray(slots, np.int64)
        self.params.append(ParamRef(self.node, index, axis, tensor.name, slots, role))

    def blocked_param(self, index: int, axis: int, block_axis: int, tensor: gs.Tensor, role: str,
                      slots: np.ndarray) -> None:
        """Like :meth:`param` for a constant split into ``len(slots)`` blocks along ``block_axis``."""
        self.params.append(ParamRef(self.node, index, axis, tensor.name, np.asarray(slots, np.int64), role,
                                    block_axis))
