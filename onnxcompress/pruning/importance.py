"""Channel importance per group, aggregated over every member of the group.

Criteria:
    * ``l1`` / ``l2``: norm of each producer's output filter (``W[o]`` of a Conv, column/row of a
      Gemm/MatMul weight, ``W[:, o]`` of a ConvTranspose), summed over the group's producers
      (``l2``: square root of the summed squares). With ``include_inputs`` the consumers' input
      columns are added too.
    * ``bn_scale``: ``|gamma|`` of every BatchNormalization in the group (plus the gammas that
      ``fold_bn`` kept in the ``BN_GAMMA`` context slot for producers it folded into). A group
      without any BN falls back to ``l1`` and is reported.
    * ``activation``: mean ``|x|`` per channel over calibration data, for the tensors the
      group's consumers read (or the producers' outputs when nothing reads them).
    * ``auto``: ``bn_scale`` for every group that has a BatchNormalization (or kept gammas),
      ``activation`` for the groups of transformer linear layers (:func:`last_axis_group`: FFN
      neurons) when calibration data is given, ``l1`` for the others -- the same scores as
      ``bn_scale``, but the ``l1`` groups are the expected case, not a fallback
      (:attr:`Scores.used` counts each).
    * ``obs`` (calibration data): the greedy order of least output error of the group's dense
      readers with their other inputs refitted (:mod:`.obs`); a group it cannot score (grouped
      conv, a reader that is not dense, too many features) is scored as ``auto`` does and listed
      in :attr:`Scores.obs`'s fallbacks.

:func:`normalize` divides each group's scores by their mean, which makes scores of different
groups comparable for a global ranking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.pruning.dependency import Analysis, Group
from onnxcompress.pruning.obs import ObsOptions, ObsReport, obs_scores
from onnxcompress.pruning.types import ROLE_GAMMA, ROLE_W_IN, ROLE_W_OUT, ParamRef

__all__ = ["CRITERIA", "Scores", "activation_scores", "bn_scores", "last_axis_group", "normalize", "score_groups",
           "weight_scores"]

log = logging.getLogger(__name__)

#: Valid ``criterion`` values.
CRITERIA = ("auto", "l1", "l2", "bn_scale", "activation", "obs")


@dataclass
class Scores:
    """Per group (by index), one score per group channel; higher means more important.

    Attributes:
        values: Group index -> scores.
        fallbacks: Names of groups scored with ``l1`` because ``bn_scale`` had nothing to use.
        used: Criterion actually used -> number of groups scored with it.
        obs: What ``criterion=obs`` did (its fallbacks, features, rows), else ``None``.
    """

    values: dict[int, np.ndarray] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)
    obs: ObsReport | None = None

    def record(self, index: int, values: np.ndarray, criterion: str) -> None:
        """Store one group's scores and count the criterion used."""
        self.values[index] = values
        self.used[criterion] = self.used.get(criterion, 0) + 1


def _accumulate(group: Group, ref: ParamRef, per_position: np.ndarray, out: np.ndarray) -> None:
    """Add ``per_position`` (one value per position along ``ref.axis``) into the group's channels."""
    local = group.tensors.get(ref.tensor)
    if local is None:
        return
    idx = local[ref.slots]
    ok = idx >= 0
    np.add.at(out, idx[ok], per_position[ok])


def weight_scores(group: Group, norm: str = "l1", include_inputs: bool = False) -> np.ndarray:
    """``l1`` or ``l2`` norms of the group's producer filters (and consumer columns)."""
    power = 1 if norm == "l1" else 2
    roles = (ROLE_W_OUT, ROLE_W_IN) if include_inputs else (ROLE_W_OUT,)
    out = np.zeros(group.size)
    for ref in group.params:
        if ref.role in roles:
            _accumulate(group, ref, ref.norms(power), out)
    return out if power == 1 else np.sqrt(out)


def bn_scores(group: Group, gammas: dict[str, np.ndarray] | None = None) -> np.ndarray | None:
    """Summed ``|gamma|`` of the group's BNs, or ``None`` if the group has none."""
    out = np.zeros(group.size)
    found = False
    for ref in group.params:
        if ref.role == ROLE_GAMMA:
            _accumulate(group, ref, np.abs(np.asarray(ref.constant.values, np.float64)), out)
            found = True
    for name in group.source_tensors:
        gamma = (gammas or {}).get(name)
        local = group.tensors.get(name)
        if gamma is not None and local is not None and len(gamma) == len(local):
            ok = local >= 0
            np.add.at(out, local[ok], np.abs(np.asarray(gamma, np.float64))[ok])
            found = True
    return out if found else None


def _activation_tensors(analysis: Analysis, group: Group) -> list[str]:
    names = sorted({layer.inp for layer in analysis.layers if layer.inp in group.tensors})
    return names or sorted(t for t in group.source_tensors if t in group.tensors)


class _AbsMean:
    """Streaming per-channel mean of ``|x|`` (channels on axis 1, or the last axis for ``last``)."""

    def __init__(self, last: frozenset[str] = frozenset()) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.last = last

    def __call__(self, batch: Any, tensors: dict[str, np.ndarray]) -> None:
        for name, x in tensors.items():
            x = np.abs(np.asarray(x, dtype=np.float64))
            axis = x.ndim - 1 if name in self.last else 1
            per_channel = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
            self.sums[name] = self.sums.get(name, 0.0) + per_channel.sum(axis=1)
            self.counts[name] = self.counts.get(name, 0) + per_channel.shape[1]

    def mean(self, name: str) -> np.ndarray:
        return self.sums[name] / max(self.counts[name], 1)


def activation_scores(analysis: Analysis, groups: list[Group], calib: Any, *, batch_size: int = 32,
                      progress: bool = False) -> dict[int, np.ndarray]:
    """Mean ``|activation|`` per group channel over ``calib``.

    Raises:
        InputError: No calibration data.
    """
    if calib is None:
        raise InputError("prune_channels: criterion=activation needs calibration data (give --calib or calib=...)")
    from onnxcompress.runtime.capture import capture

    wanted = {g.index: _activation_tensors(analysis, g) for g in groups}
    names = sorted({n for ns in wanted.values() for n in ns})
    acc = _AbsMean(analysis.info.last)
    if names:
        capture(serde.to_model(analysis.graph), names, calib, acc, batch_size=batch_size, progress=progress)
    out = {}
    for g in groups:
        score = np.zeros(g.size)
        for name in wanted[g.index]:
            local = g.tensors[name]
            ok = local >= 0
            sums = np.bincount(local[ok], weights=acc.mean(name)[ok], minlength=g.size)
            score += sums / np.maximum(np.bincount(local[ok], minlength=g.size), 1)
        out[g.index] = score
    return out


def last_axis_group(analysis: Analysis, group: Group) -> bool:
    """Whether ``group`` is the channels of transformer linear layers: one of its tensors has its
    channels on the last axis (:attr:`~.types.GraphInfo.last`), or a producer reads a ``Reshape``
    of such a tensor (``[1, s, d] -> [s, d] -> Gemm``)."""
    last = analysis.info.last
    if not last:
        return False
    if any(name in last for name in group.tensors):
        return True
    for spec in analysis.specs:
        if spec.layer is not None and spec.layer.out in group.source_tensors:
            x = spec.node.inputs[0]
            if any(n.op == "Reshape" and n.inputs[0].name in last for n in x.inputs):
                return True
    return False


def score_groups(analysis: Analysis, criterion: str, *, calib: Any = None, gammas: dict[str, np.ndarray] | None = None,
                 include_inputs: bool = False, progress: bool = False, obs: ObsOptions | None = None) -> Scores:
    """Scores of every non-frozen group of ``analysis`` under ``criterion`` (``obs``: with ``obs``'s
    settings, default :class:`~.obs.ObsOptions`).

    Raises:
        InputError: Unknown criterion, or ``activation``/``obs`` without calibration data.
    """
    if criterion not in CRITERIA:
        raise InputError(f"prune_channels: unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    groups = [g for g in analysis.groups if g.frozen is None]
    scores = Scores()
    if criterion == "obs":
        if calib is None:
            raise InputError("prune_channels: criterion=obs needs calibration data (give --calib or calib=...)")
        scores.obs = obs_scores(analysis, groups, calib, obs or ObsOptions(), progress=progress)
        for index, values in sorted(scores.obs.values.items()):
            scores.record(index, values, "obs")
        criterion, groups = "auto", [g for g in groups if g.index not in scores.values]
    measured = groups if criterion == "activation" else []
    if criterion == "auto" and calib is not None:
        measured = [g for g in groups if last_axis_group(analysis, g)]
    if measured or criterion == "activation":
        for index, values in activation_scores(analysis, measured, calib, progress=progress).items():
            scores.record(index, values, "activation")
    if criterion == "activation":
        return scores
    for g in groups:
        if g.index in scores.values:
            continue
        if criterion in ("bn_scale", "auto"):
            found = bn_scores(g, gammas)
            if found is not None:
                scores.record(g.index, found, "bn_scale")
                continue
            if criterion == "bn_scale":
                scores.fallbacks.append(g.name)
                log.debug("prune_channels: group %s has no BatchNormalization; scoring it with l1", g.name)
        norm = "l2" if criterion == "l2" else "l1"
        scores.record(g.index, weight_scores(g, norm, include_inputs), norm)
    return scores


def normalize(values: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each group's scores divided by their mean (all ones when the mean is 0)."""
    out = {}
    for index, s in values.items():
        mean = float(np.mean(s)) if len(s) else 0.0
        out[index] = s / mean if mean > 0 and np.isfinite(mean) else np.ones_like(s)
    return out
