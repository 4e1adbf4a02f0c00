"""Low-rank factorization on the graph: the layer model, declines and the rewrite into factors.

The pieces the ``factorize_*`` passes share (their common base,
:class:`onnxcompress.passes._factorize.FactorizePass`, drives them): candidate layers and their
declines, input shapes, rewriting one node into its factors, releasing replaced weights. The math
(truncated SVD, rank rules, HOSVD/HOOI, empirical VBMF, the spatial reshape, MAC accounting, input
statistics and whitening) lives in :mod:`onnxcompress.lowrank.linalg`.

Driver (``FactorizePass.run``):
    1. Every node of the pass's op types is a candidate; it is declined with a code (``excluded``,
       ``weight_not_constant``, ``grouped_conv``, ``tiny_layer``, ...) or becomes a :class:`FactorLayer` (input
       shapes come from shape inference at batch 1, other symbolic input dims at the run's
       ``ctx.dims``: ``--dim``, else the calibration data's shapes, else the guessed defaults).
    2. Data-aware (option ``data_aware``, default on when ``ctx.calib`` is given): one ORT run of
       the *original* model over at most ``samples`` calibration samples captures every
       candidate's input; im2col rows (at most ``max_positions`` per batch, drawn with
       ``ctx.seed``) feed the :class:`GramAccumulator` the pass asks for.
    3. Each layer is factorized; a layer whose factors need ``>= max_mac_ratio`` × its MACs is
       declined (``does_not_pay``, detail ``MAC ratio ... >= ..., ranks ...``). Otherwise the node is replaced, at
       its place in the node list, by its factors: the first reads the node's input, the last
       writes the node's output tensor (names downstream and graph outputs keep) and takes its
       bias; weights are new constants, so a shared weight stays intact for its other users.
    4. Data-aware refit: :func:`~onnxcompress.reconstruct.refit.reconstruct_layers` refits each last
       factor (weight and bias) by ridge least squares so that its output matches the original
       node's output tensor in the original model (the teacher) on the calibration data, layer
       by layer in topological order with the already-refitted student's inputs. A last factor
       whose bias is not a constant per-output vector is not refit (``refit_skipped``).
       A share ``refit_holdout`` of the sampled rows is held out of the fit: the ridge is chosen
       on them and a refit that does not beat the unrefit factor there is rejected
       (``refit_rejected``), which stops the overfitting of wide last factors (e.g. dwsep's
       pointwise conv, ``C_in·m`` features) when few or small calibration images give barely more
       rows than features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core.graph import Names, weight_layout
from onnxcompress.core.shapes import Dims, concrete_shapes
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.data import CalibSource

__all__ = [
    "R_EXCLUDED",
    "R_WEIGHT",
    "R_LAYOUT",
    "R_ATTRS",
    "R_GROUPED",
    "R_TINY",
    "R_NOT_PAY",
    "R_NO_STATS",
    "R_POINTWISE",
    "require_dense_kxk",
    "COMMON_REASONS",
    "MAX_GRAM_DIM",
    "Decline",
    "Done",
    "FactorLayer",
    "LimitedSource",
    "Factor",
    "Factorization",
    "attr_text",
    "conv_attrs",
    "input_shapes",
    "refittable",
    "release_weights",
    "rewrite_layer",
]

log = logging.getLogger(__name__)


R_EXCLUDED = "excluded"
R_WEIGHT = "weight_not_constant"
R_LAYOUT = "unsupported_layout"
R_ATTRS = "unsupported_attributes"
R_GROUPED = "grouped_conv"  # grouped or depthwise
R_TINY = "tiny_layer"
R_NOT_PAY = "does_not_pay"
R_NO_STATS = "calibration_statistics_failed"
R_POINTWISE = "pointwise_conv"  # 1x1: factorize_svd's

#: Layers whose whitening matrix would be larger than this (per side) are factorized plainly.
MAX_GRAM_DIM = 4096

#: Decline codes every ``factorize_*`` pass may give (``does_not_pay`` has the MAC ratio and ranks as detail).
COMMON_REASONS = (R_EXCLUDED, R_WEIGHT, R_LAYOUT, R_ATTRS, R_GROUPED, R_TINY, R_NOT_PAY, R_NO_STATS)


class Decline(Exception):
    """Raised by a pass hook to leave the current node alone: decline ``code`` with ``detail``."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(code)
        self.code, self.detail = code, detail


def require_dense_kxk(node: gs.Node, weight: np.ndarray) -> None:
    """Raise :class:`Decline` unless ``node`` is a dense (group 1) Conv with a non-1×1 kernel."""
    if weight.ndim < 3:
        raise Decline(R_LAYOUT)
    if weight_layout(node).group != 1:
        raise Decline(R_GROUPED)
    if all(k == 1 for k in weight.shape[2:]):
        raise Decline(R_POINTWISE)


@dataclass
class FactorLayer:
    """A candidate node and what the driver knows about it.

    Attributes:
        node: The node (Gemm, MatMul or Conv with ``group`` 1).
        where: Its name (else its first output's name).
        kind: ``gemm``, ``matmul``, ``conv1x1``, ``spatial``, ``tucker`` or ``dwsep``.
        weight: The constant weight in ONNX layout and dtype.
        attrs: The node's attributes.
        bias: The bias / ``C`` input (passed to the last factor unchanged), if any.
        opset: The graph's default-domain opset.
        in_spatial: Input spatial size (Conv; at the run's dims; guessed when inference could not
            tell it, then ``spatial_known`` is False).
        out_spatial: Output spatial size (Conv).
        rows: Rows per sample (Gemm 1, MatMul the product of the input's leading dims).
        spatial_known: Whether ``in_spatial`` was inferred (else its MACs are estimates).
        sigma: The input statistics the factorization is whitened by (data-aware mode).
    """

    node: gs.Node
    where: str
    kind: str
    weight: np.ndarray
    attrs: dict
    bias: gs.Tensor | None
    opset: int
    in_spatial: tuple[int, ...] = ()
    out_spatial: tuple[int, ...] = ()
    rows: int = 1
    sigma: np.ndarray | None = None
    spatial_known: bool = True

    @property
    def channels(self) -> tuple[int, int]:
        """``(inputs, outputs)``: ``(K, N)`` for Gemm/MatMul, ``(C_in, C_out)`` for Conv."""
        layout = weight_layout(self.node, self.weight.ndim)
        return layout.in_channels(self.weight.shape), layout.out_channels(self.weight.shape)

    @property
    def kernel(self) -> tuple[int, ...]:
        """Conv kernel size (``()`` for Gemm/MatMul)."""
        return tuple(self.weight.shape[2:]) if self.weight.ndim > 2 else ()


@dataclass
class Factor:
    """One node of a factorization: op, weight (ONNX layout, float64) and attributes.

    ``bias`` is a new constant bias (the first Gemm before opset 11, whose ``C`` is required);
    the last factor takes the original bias tensor instead.
    """

    op: str
    suffix: str
    weight: np.ndarray
    attrs: dict
    bias: np.ndarray | None = None


@dataclass
class Factorization:
    """What replaces one layer: its factors in order, the product and its cost."""

    factors: list[Factor]
    approx: np.ndarray
    ranks: tuple[int, ...]
    macs: tuple[int, int]


@dataclass
class Done:
    layer: FactorLayer
    fz: Factorization
    last: str
    target: str
    error: float


def attr_text(value: object) -> object:
    """Attribute values as gs gives them, with bytes decoded."""
    return value.decode() if isinstance(value, bytes) else value


class LimitedSource(CalibSource):
    """At most ``limit`` samples of another source (0: all)."""

    def __init__(self, source: CalibSource, limit: int):
        super().__init__(getattr(source, "specs", []), limit or None)
        self.source = source
        self.description = getattr(source, "description", "data")

    def batches(self, batch_size: int = 32) -> Iterator[Batch]:
        """The wrapped source's batches, the last one cut so that at most ``limit`` samples come out."""
        seen = 0
        for batch in self.source.batches(batch_size):
            if self.limit is not None and seen >= self.limit:
                return
            take = len(batch) if self.limit is None else min(len(batch), self.limit - seen)
            if take < len(batch):
                labels = None if batch.labels is None else batch.labels[:take]
                batch = Batch({k: v[:take] for k, v in batch.feeds.items()}, labels)
            seen += take
            yield batch


def input_shapes(model: onnx.ModelProto, names: set[str], dims: Dims | None = None) -> dict[str, tuple[int, ...]]:
    """Fully known shapes of the tensors ``names`` at batch 1, other symbolic input dims at the run's
    ``dims`` (``None``: the defaults of :func:`onnxcompress.core.shapes.concrete_inputs`); onnxruntime's
    symbolic inference fills what onnx's gives up on (a transformer's rows after a computed ``Slice``)."""
    return {name: shape for name, shape in concrete_shapes(model, dims, batch=1, filled=True).items() if name in names}


def conv_attrs(attrs: Mapping[str, object]) -> dict:
    return {k: attr_text(v) for k, v in attrs.items()}


def release_weights(layer: FactorLayer, fz: Factorization) -> None:
    """Drop the arrays a rewritten layer no longer needs, keeping their shapes and dtypes.

    The original weight (now out of the graph unless shared), the float64 product and factors
    would otherwise live, for every layer, until the pass ends: on a big model more than the
    weights' size again. What the stats and the refit read later (``shape``, ``size``,
    ``dtype``) stays right: each array becomes a read-only, zero-byte broadcast of its shape.
    """
    layer.weight = _shape_only(layer.weight)
    fz.approx = _shape_only(fz.approx)
    for factor in fz.factors:
        factor.weight = _shape_only(factor.weight)


def _shape_only(array: np.ndarray) -> np.ndarray:
    """A zero-byte, read-only array with ``array``'s shape and dtype (its values are all zero)."""
    return np.broadcast_to(np.zeros((), dtype=array.dtype), array.shape)


def refittable(layer: FactorLayer) -> bool:
    """Whether :func:`reconstruct_layers` can refit the last factor (a constant, per-output bias)."""
    if layer.bias is None:
        return True
    if not isinstance(layer.bias, gs.Constant) or not isinstance(layer.bias.values, np.ndarray):
        return False
    b, n = layer.bias.values, layer.channels[1]
    return b.size == 1 or (b.size == n and b.shape[-1] == n)


def rewrite_layer(graph: gs.Graph, names: Names, layer: FactorLayer, fz: Factorization) -> str:
    """Replace ``layer.node`` by the factors, in place in the node list; returns the last factor's name.

    The first factor reads the node's input, the last one writes the node's output tensor (so
    downstream and graph-output names are kept) and takes its bias. New constants are
    ``<node>_<suffix>_W`` (and ``_B``), intermediate tensors ``<node>_<suffix>_Y``.
    """
    node = layer.node
    index = next(i for i, n in enumerate(graph.nodes) if n is node)
    x, out = node.inputs[0], node.outputs[0]
    dtype = layer.weight.dtype
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.pop(index)
    new_nodes, current = [], x
    for i, f in enumerate(fz.factors):
        last = i == len(fz.factors) - 1
        name = names.fresh(f"{layer.where}_{f.suffix}")
        inputs = [current, gs.Constant(names.fresh(f"{name}_W"), np.ascontiguousarray(f.weight.astype(dtype)))]
        if f.bias is not None:
            inputs.append(gs.Constant(names.fresh(f"{name}_B"), np.ascontiguousarray(f.bias.astype(dtype))))
        if last and layer.bias is not None:
            inputs.append(layer.bias)
        y = out if last else gs.Variable(names.fresh(f"{name}_Y"), dtype=dtype)
        new_nodes.append(gs.Node(f.op, name, dict(f.attrs), inputs, [y]))
        current = y
    graph.nodes[index:index] = new_nodes
    return new_nodes[-1].name
