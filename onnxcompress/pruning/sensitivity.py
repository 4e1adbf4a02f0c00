"""Per-group pruning sensitivity: the predicted output error of removing each achievable number of
a group's channels, for the budget allocation of :mod:`.budget`.

* ``measured`` (calibration data): each group is pruned *alone* at a few probe counts (a quarter,
  half, three quarters of it and its cap) in the zeroed original (:func:`~.apply.mask_channels`'s
  model: the producers' filters of the chosen channels set to 0, which is what the pruned model
  computes before reconstruction) and the relative squared output error
  ``sum |y - y0|^2 / sum |y0|^2`` on the first ``samples`` calibration samples is measured (the
  worst over the float outputs and over their blocks of channels of clearly different scale, as
  the gate slices them: a YOLO head's box rows and class-score rows); the curve between probes is linear, and made non-decreasing.
* ``measured_refit`` (:class:`RefitMaskedError`): as ``measured``, with the dense Conv/Gemm/MatMul
  readers of the zeroed channels refitted by ridge least squares to their own outputs (normal
  equations accumulated once, solved per probe for the kept inputs): what reconstruction recovers.
* ``importance`` (no data): the fraction of the group's importance (its channel scores) removed.

Groups are pruned alone, so the allocation treats errors as additive: a first-order model, made
honest by measuring the achieved MACs and the output error afterwards.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxcompress.core import proto, serde
from onnxcompress.pruning.apply import removed_mask
from onnxcompress.pruning.dependency import Analysis, Group
from onnxcompress.pruning.select import Budget, choose
from onnxcompress.pruning.types import ROLE_W_IN, ROLE_W_OUT
from onnxcompress.reconstruct.layerview import SUPPORTED_OPS, layer_view
from onnxcompress.reconstruct.lstsq import DEFAULT_RIDGE, LstsqAccumulator
from onnxcompress.reconstruct.refit import DEFAULT_MAX_POSITIONS
from onnxcompress.runtime.fidelity import MAX_SLICE_CHANNELS, auto_slices
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session

__all__ = ["MaskedError", "RefitMaskedError", "dense_reader", "importance_errors", "measured_errors"]

log = logging.getLogger(__name__)

#: Fractions of a group probed by :func:`measured_errors` (plus the group's cap).
PROBES = (0.25, 0.5, 0.75)


class MaskedError:
    """Relative output error of the graph with some group channels zeroed, on calibration data.

    Args:
        analysis: The dependency analysis of the graph (not modified).
        calib: A calibration source.
        samples: Use the first ``samples`` samples.
        batch_size: Batch size of the runs.
    """

    def __init__(self, analysis: Analysis, calib, samples: int = 64, batch_size: int = 32):
        self.analysis = analysis
        self.model = serde.to_model(analysis.graph)
        self.refs = [ref for spec in analysis.specs for ref in spec.params if ref.role == ROLE_W_OUT]
        self.feeds = []
        seen = 0
        for batch in calib.batches(batch_size):
            if seen >= samples:
                break
            take = min(len(batch), samples - seen)
            self.feeds.append({k: v[:take] for k, v in batch.feeds.items()})
            seen += take
        self.samples = seen
        self.outputs = [o.name for o in self.model.graph.output]
        # copies: an onnxruntime output is a view that keeps its session's whole memory arena alive
        self.reference = [[np.array(out, copy=True) for out in outs] for outs in self._run()]

    def _changes(self, rm: np.ndarray, changed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """New initializer values (on top of ``changed``): the producers' filters of the removed
        channels (mask ``rm``) zeroed."""
        changed = {} if changed is None else changed
        for ref in self.refs:
            name = ref.constant.name
            gone = rm[self.analysis.comp[self.analysis.offsets[ref.tensor] + ref.slots]]
            values = ref.zero(changed.get(name, ref.constant.values), gone)
            if values is not None:
                changed[name] = values
        return changed

    def _run(self) -> list[list[np.ndarray]]:
        session = make_session(self.model)
        return [session.run(self.outputs, feeds) for feeds in self.feeds]

    def error(self, remove: dict[int, np.ndarray]) -> float:
        """Worst relative squared error over the float outputs with ``remove``'s channels zeroed."""
        saved = proto.swap_initializers(self.model, self._changes(removed_mask(self.analysis, remove)))
        try:
            got = self._run()
        finally:
            proto.swap_initializers(self.model, saved)
        return _relative_error(self.reference, got)


class RefitMaskedError(MaskedError):
    """:class:`MaskedError` with the readers of the zeroed channels refitted: each dense Conv /
    Gemm / MatMul reading a group's channels gets, for the channels kept, the ridge least-squares
    weights and bias that best reproduce its output on the same samples (normal equations
    accumulated once on the unpruned model, :class:`~onnxcompress.reconstruct.lstsq.LstsqAccumulator`,
    solved per probe with ``keep``): the error the pass's reconstruction leaves, to first order.

    Args:
        max_rows: Rows drawn per batch and layer (seeded) for the normal equations.
    """

    def __init__(self, analysis: Analysis, calib, samples: int = 64, batch_size: int = 32,
                 max_rows: int = DEFAULT_MAX_POSITIONS):
        super().__init__(analysis, calib, samples, batch_size)
        self.readers = [ref for spec in analysis.specs for ref in spec.params if dense_reader(ref)]
        nodes = list({id(r.node): r.node for r in self.readers}.values())
        self.views, self.accs = {}, {}
        for node in nodes:
            bias = node.inputs[2].values if len(node.inputs) > 2 else None
            view = layer_view(node, node.inputs[1].values, bias, fit_bias=bias is not None)
            self.views[id(node)] = view
            self.accs[id(node)] = LstsqAccumulator(view.n_features, view.n_targets, view.fit_bias)
        names = [n for node in nodes for n in (node.inputs[0].name, node.outputs[0].name)]
        names = [n for n in dict.fromkeys(names) if n not in self.feeds[0]] if self.feeds else []
        if nodes and self.feeds:
            session = make_session(proto.with_outputs(self.model, names))
            rng = np.random.default_rng(0)
            for feeds in self.feeds:
                got = {**feeds, **dict(zip(names, session.run(names, feeds)))}
                for node in nodes:
                    x, y = got[node.inputs[0].name], got[node.outputs[0].name]
                    for X, Y in self.views[id(node)].pairs(x, y, max_positions=max_rows, rng=rng):
                        self.accs[id(node)].add(X, Y)

    def _changes(self, rm: np.ndarray, changed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        changed = {} if changed is None else changed
        gone_by_node: dict[int, tuple] = {}
        for ref in self.readers:
            gone = rm[self.analysis.comp[self.analysis.offsets[ref.tensor] + ref.slots]]
            if gone.any():
                prev = gone_by_node.get(id(ref.node), (ref.node, np.zeros(len(gone), bool)))[1]
                gone_by_node[id(ref.node)] = (ref.node, prev | gone)
        for key, (node, gone) in gone_by_node.items():
            view, acc = self.views[key], self.accs[key]
            kept = np.flatnonzero(~gone)
            keep = view.feature_keep(kept)[0] if node.op == "Conv" else kept
            w, b = acc.solve(DEFAULT_RIDGE, keep=keep)
            full = np.zeros((1, view.n_features, view.n_targets))
            full[0, keep] = w
            weight, bias = view.from_matrix(full, None if b is None else b[None])
            changed[node.inputs[1].name] = weight.astype(node.inputs[1].values.dtype)
            if bias is not None:
                changed[node.inputs[2].name] = bias.astype(node.inputs[2].values.dtype).reshape(node.inputs[2].shape)
        return super()._changes(rm, changed)  # then the zeroed filters, also of a refitted reader


def dense_reader(ref) -> bool:
    """An input-column reference of a Conv (``group`` 1) / Gemm / MatMul weight, the weight not shared."""
    node = ref.node
    return (ref.role == ROLE_W_IN and ref.index == 1 and ref.block_axis is None and node.op in SUPPORTED_OPS
            and int(node.attrs.get("group", 1)) == 1 and len(ref.slots) == np.shape(node.inputs[1].values)[ref.axis]
            and len(node.inputs[1].outputs) == 1)


def _relative_error(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """Worst relative squared error over the float outputs and, for an output whose channels (axis 1)
    fall into blocks of clearly different scale (a YOLO head's boxes and class scores,
    :func:`~onnxcompress.runtime.fidelity.auto_slices`, as the lossy gate slices it), over each block."""
    worst = 0.0
    for k in range(len(ref[0]) if ref else 0):
        if not np.issubdtype(np.asarray(ref[0][k]).dtype, np.floating):
            continue
        num, den = _channel_sums([r[k] for r in ref], [g[k] for g in got])
        count = sum(np.size(r[k]) for r in ref) / max(len(den), 1)
        spans = [(0, len(den))] + auto_slices(np.sqrt(den / max(count, 1.0))) if len(den) <= MAX_SLICE_CHANNELS else []
        for a, b in spans or [(0, len(den))]:
            n, d = float(num[a:b].sum()), float(den[a:b].sum())
            worst = max(worst, n / d if d > 0 else (0.0 if n == 0 else np.inf))
    return worst


def _channel_sums(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per channel of axis 1 (one channel below rank 3): summed squared error and squared reference."""
    num = den = 0.0
    for r, g in zip(ref, got):
        r64, g64 = np.asarray(r, np.float64), np.asarray(g, np.float64)
        axes = tuple(i for i in range(r64.ndim) if i != 1) if r64.ndim >= 3 else None
        num = num + np.atleast_1d(np.sum((g64 - r64) ** 2, axis=axes))
        den = den + np.atleast_1d(np.sum(r64 ** 2, axis=axes))
    return np.asarray(num, np.float64), np.asarray(den, np.float64)


def importance_errors(group: Group, scores: np.ndarray, levels: list[int], budget: Budget) -> np.ndarray:
    """Fraction of ``group``'s (non-negative) importance removed at each of ``levels``."""
    s = np.maximum(np.asarray(scores, np.float64), 0.0)
    total = float(s.sum())
    out = []
    for n in levels:
        chosen = choose(group, scores, n, budget)[0] if n else np.arange(0)
        out.append(float(s[chosen].sum()) / total if total > 0 else len(chosen) / group.size)
    return np.maximum.accumulate(np.asarray(out))


def measured_errors(evaluate: MaskedError, groups: list[Group], scores: dict[int, np.ndarray],
                    levels: dict[int, list[int]], budget: Budget, progress: bool = False) -> dict[int, np.ndarray]:
    """Group index -> measured error at each of its levels (see the module docstring)."""
    out = {}
    for g in track(groups, "pruning sensitivity", enabled=progress):
        lv = levels[g.index]
        wants = sorted({_snap(lv, f * g.size) for f in PROBES} | {lv[-1]} - {0})
        xs, ys = [0], [0.0]
        for want in wants:
            chosen = choose(g, scores[g.index], want, budget)[0]
            if len(chosen) <= xs[-1]:
                continue
            xs.append(len(chosen))
            ys.append(evaluate.error({g.index: chosen}))
        out[g.index] = np.maximum.accumulate(np.interp(lv, xs, ys))
        log.debug("prune_channels: sensitivity of %s: %s", g.name,
                  ", ".join(f"{x}/{g.size}: {y:.3g}" for x, y in zip(xs[1:], ys[1:])))
    return out


def _snap(levels: list[int], x: float) -> int:
    """The level nearest ``x``."""
    return min(levels, key=lambda v: (abs(v - x), v))
