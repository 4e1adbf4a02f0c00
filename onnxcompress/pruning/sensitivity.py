"""Per-group pruning sensitivity: the predicted output error of removing each achievable number of
a group's channels, for the budget allocation of :mod:`.budget`.

* ``measured`` (calibration data): each group is pruned *alone* at a few probe counts (a quarter,
  half, three quarters of it and its cap) in the zeroed original (:func:`~.apply.mask_channels`'s
  model: the producers' filters of the chosen channels set to 0, which is what the pruned model
  computes before reconstruction) and the relative squared output error
  ``sum |y - y0|^2 / sum |y0|^2`` on the first ``samples`` calibration samples is measured (the
  worst over the float outputs); the curve between probes is linear, and made non-decreasing.
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
from onnxcompress.pruning.types import ROLE_W_OUT
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.session import make_session

__all__ = ["MaskedError", "importance_errors", "measured_errors"]

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
        self.reference = self._run()

    def _run(self) -> list[list[np.ndarray]]:
        session = make_session(self.model)
        return [session.run(self.outputs, feeds) for feeds in self.feeds]

    def error(self, remove: dict[int, np.ndarray]) -> float:
        """Worst relative squared error over the float outputs with ``remove``'s channels zeroed."""
        rm = removed_mask(self.analysis, remove)
        changed: dict[str, np.ndarray] = {}
        for ref in self.refs:
            name = ref.constant.name
            gone = rm[self.analysis.comp[self.analysis.offsets[ref.tensor] + ref.slots]]
            values = ref.zero(changed.get(name, ref.constant.values), gone)
            if values is not None:
                changed[name] = values
        saved = proto.swap_initializers(self.model, changed)
        try:
            got = self._run()
        finally:
            proto.swap_initializers(self.model, saved)
        return _relative_error(self.reference, got)


def _relative_error(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for k in range(len(ref[0]) if ref else 0):
        if not np.issubdtype(np.asarray(ref[0][k]).dtype, np.floating):
            continue
        num = sum(float(np.sum((np.asarray(g[k], np.float64) - np.asarray(r[k], np.float64)) ** 2))
                  for r, g in zip(ref, got))
        den = sum(float(np.sum(np.asarray(r[k], np.float64) ** 2)) for r in ref)
        worst = max(worst, num / den if den > 0 else (0.0 if num == 0 else np.inf))
    return worst


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
