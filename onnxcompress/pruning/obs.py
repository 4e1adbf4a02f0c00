"""Data-driven channel selection (``criterion=obs``): the channels whose removal costs the group's
dense readers the least output error once their other input features are refitted (an Optimal
Brain Surgeon on input channels, in the manner of GPTQ/OBC).

For every group and every dense reader ``r`` of its channels (a Conv with ``group`` 1, a Gemm or a
MatMul, :func:`~.sensitivity.dense_reader`), the Gram matrix ``H = XᵀX`` of the reader's input
features (Conv: im2col patches, ``k·k`` features per input channel, channel-major; Gemm/MatMul:
the input columns) is accumulated on calibration data from the graph being pruned (the original
in the first round) with the reconstruction's accumulator
(:class:`~onnxcompress.reconstruct.lstsq.LstsqAccumulator`, centered when the reader's refit fits a
bias) and dampened like GPTQ: ``H + λI``, ``λ = damp · mean(diag H)``. Removing the features ``b``
of one channel, every other feature refitted optimally, raises the reader's squared output error
by ``ΔE_b = tr(W_bᵀ ([H⁻¹]_bb)⁻¹ W_b)``; a channel's cost is the sum over the readers of
``ΔE_b / E_r`` (``E_r = tr(WᵀHW)``, the reader's output energy, so readers are comparable).
Greedily, the cheapest removable channel goes and every reader's weights and inverse are updated
for it (``W -= H⁻¹[:, b] ([H⁻¹]_bb)⁻¹ W_b``, ``H⁻¹ -= H⁻¹[:, b] ([H⁻¹]_bb)⁻¹ H⁻¹[b, :]``), until
``limit`` of the group is gone (or the count a uniform budget fixes); the channels left are
ranked by their cost at that point.

The order is returned as scores (the cumulative cost at each channel's removal, made strictly
increasing), so the budget (``ratio``, ``macs``, ``allocate``, ``round_to``) decides how many go
per group and :func:`~.select.choose` takes the greedy's first ``n``: the greedy's own choice for
``n``, whatever the count.

Cap: a reader with more than ``max_features`` features keeps a seeded subset of each input
channel's features (kernel positions; for a Flatten→Gemm the ``H·W`` rows of each group channel;
the features of other groups' channels in proportion), at least one per channel; a reader whose
input has more channels than ``max_features`` makes its group fall back. Fallbacks (the caller
scores them with the default criterion), by reason: ``grouped_conv`` (grouped-conv blocks
constrain the group), ``reader_not_dense`` (a ConvTranspose, a grouped conv or a shared weight
reads it), ``no_dense_reader``, ``too_many_features``. A depthwise conv is a channel-wise op on the
way (its outputs are the same group's channels): a group read through one is scored at the dense
layer after it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcompress.core import serde
from onnxcompress.core.graph import node_label
from onnxcompress.pruning.dependency import Analysis, Group
from onnxcompress.pruning.sensitivity import dense_reader
from onnxcompress.pruning.types import ROLE_W_IN, ParamRef
from onnxcompress.reconstruct.layerview import LayerView, bias_add, layer_view, sample_rows
from onnxcompress.reconstruct.lstsq import LstsqAccumulator

__all__ = ["OBS_FALLBACKS", "ObsOptions", "ObsReport", "obs_scores", "removal_cost"]

log = logging.getLogger(__name__)

#: Reasons a group is not scored by ``obs`` (and falls back to the default criterion).
OBS_FALLBACKS = ("grouped_conv", "reader_not_dense", "no_dense_reader", "too_many_features")


@dataclass(frozen=True)
class ObsOptions:
    """Settings of :func:`obs_scores`.

    Attributes:
        max_features: Features kept per reader (seeded subsampling above it).
        damp: Relative dampening of ``H`` (``λ = damp · mean(diag H)``).
        limit: Greedy removals per group, as a fraction of it (the budget's ``max_group_ratio``).
        counts: Group index -> greedy removals, when the budget already fixes them (a uniform
            ratio): the greedy stops there (the rest is ranked by its cost at that point).
        seed: Seed of the subsampling and of the tie-breaking.
        max_rows: Rows (output positions) drawn per run and reader.
        batch_size: Calibration batch size.
        memory: Bytes of Gram matrices accumulated in one pass over the data (groups are split
            into passes; at least one group per pass).
    """

    max_features: int = 4096
    damp: float = 0.01
    limit: float = 0.9
    counts: Mapping[int, int] | None = None
    seed: int = 0
    max_rows: int = 2048
    batch_size: int = 32
    memory: int = 512 * 2**20


@dataclass
class ObsReport:
    """What :func:`obs_scores` did.

    Attributes:
        values: Group index -> scores (greedy order: lower goes first).
        fallbacks: Group name -> reason (:data:`OBS_FALLBACKS`) for the groups not scored.
        readers: Reader Gram matrices accumulated (one per group and reader).
        features_max: Most features of one reader after the cap.
        subsampled: Readers whose features were subsampled.
        rows_min: Fewest rows one reader's ``H`` was accumulated from.
        passes: Passes over the calibration data.
    """

    values: dict[int, np.ndarray] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)
    readers: int = 0
    features_max: int = 0
    subsampled: int = 0
    rows_min: int = 0
    passes: int = 0


@dataclass(eq=False)
class _Reader:
    """One dense reader of one group: its view, the features kept and each one's group channel."""

    ref: ParamRef
    view: LayerView
    feats: np.ndarray
    owner: np.ndarray
    acc: LstsqAccumulator
    rng: np.random.Generator
    full: int

    @property
    def input(self) -> str:
        return self.ref.node.inputs[0].name

    def add(self, x: np.ndarray, max_rows: int) -> None:
        """Accumulate the kept features of input ``x``'s sampled rows."""
        rows = sample_rows(self.view.n_rows(x), max_rows, self.rng)
        for X in self.view.feature_chunks(x, rows):
            part = X[0][:, self.feats]
            self.acc.add(part, np.zeros((len(part), 1), part.dtype))


def _keep_features(unit: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a seeded subset of the features, at least one per ``unit`` (same share of each)."""
    share = cap / len(unit)
    order = np.argsort(unit, kind="stable")
    cuts = np.flatnonzero(np.diff(unit[order])) + 1
    keep = [np.sort(rng.choice(part, max(1, math.floor(share * len(part))), replace=False))
            for part in np.split(order, cuts)]
    return np.sort(np.concatenate(keep))


def _reader(group: Group, ref: ParamRef, k: int, opts: ObsOptions) -> _Reader | None:
    """The reader of ``group`` through ``ref`` (``None``: too many input channels for the cap)."""
    node = ref.node
    bias = node.inputs[2].values if len(node.inputs) > 2 else None
    view = layer_view(node, node.inputs[1].values, bias, dtype=np.float32)
    local = group.tensors[ref.tensor][ref.slots]
    per = view.n_features // len(local)
    owner = np.repeat(local, per)
    unit = np.repeat(np.arange(len(local)), per) if node.op == "Conv" else np.where(local >= 0, local, -1)
    rng = np.random.default_rng([opts.seed, group.index, k])
    feats = np.arange(len(owner))
    if len(owner) > opts.max_features:
        if len(np.unique(unit)) > opts.max_features:
            return None
        feats = _keep_features(unit, opts.max_features, rng)
    centered = view.fit_bias or bias_add(node) is not None
    acc = LstsqAccumulator(len(feats), 1, centered, precision="float32")
    return _Reader(ref, view, feats, owner[feats], acc, rng, len(owner))


def _readers(group: Group, opts: ObsOptions) -> list[_Reader] | str:
    """The dense readers of ``group``, or why it falls back."""
    if group.blocks is not None:
        return "grouped_conv"
    refs = [r for r in group.params if r.role == ROLE_W_IN]
    if not refs:
        return "no_dense_reader"
    if not all(dense_reader(r) for r in refs):
        return "reader_not_dense"
    out = []
    for k, ref in enumerate(refs):
        reader = _reader(group, ref, k, opts)
        if reader is None:
            return "too_many_features"
        out.append(reader)
    return out


def removal_cost(hbb: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """``tr(W_bᵀ ([H⁻¹]_bb)⁻¹ W_b)`` for a stack of blocks (``hbb`` ``[m, s, s]``, the inverse's
    diagonal blocks; ``wb`` ``[m, s, T]``, the weight rows): the least squared output error that
    removing each block's features adds when the other features are refitted."""
    outer = wb @ wb.transpose(0, 2, 1)  # W_b·W_bᵀ [m, s, s]: tr(W_bᵀ A W_b) = <A, W_b·W_bᵀ>
    return np.einsum("msu,msu->m", np.linalg.inv(hbb), outer)


def _spd_inverse(h: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix (Cholesky; eigenvalues clipped if that fails)."""
    import scipy.linalg  # imported where used, like the solver

    try:
        factor, info = scipy.linalg.lapack.dpotrf(h, lower=0)
        if info == 0:
            inv, info = scipy.linalg.lapack.dpotri(factor, lower=0)
            if info == 0:
                return np.triu(inv) + np.triu(inv, 1).T
    except np.linalg.LinAlgError:
        pass
    vals, vecs = np.linalg.eigh(h)
    return (vecs / np.maximum(vals, 1e-12 * max(float(vals.max()), 1e-300))) @ vecs.T


class _Surgeon:
    """One reader's ``W`` and dampened ``H⁻¹``, updated as channels go.

    ``H⁻¹`` is kept as the initial inverse minus a low-rank term ``L·Lᵀ`` (one ``s``-column block
    per removal: ``H⁻¹[:, b]·M^(-1/2)``, ``M = [H⁻¹]_bb``), and its diagonal blocks (what the costs
    need) are updated in place: each removal costs ``O(F·r·s)`` (``r`` features removed so far)
    instead of a full ``F×F`` update."""

    def __init__(self, reader: _Reader, size: int, damp: float):
        h = reader.acc.covariance()
        self.w = reader.view.to_matrix()[0][0][reader.feats].astype(np.float64)
        energy = float(np.sum(self.w * (h @ self.w)))
        self.scale = 1.0 / energy if energy > 0 else 0.0
        lam = damp * float(np.mean(np.diag(h))) if len(h) else 0.0
        h[np.diag_indices_from(h)] += lam if lam > 0 else 1.0
        self.hinv = _spd_inverse(h)
        self.blocks = [np.flatnonzero(reader.owner == c) for c in range(size)]
        self.sizes = np.array([len(b) for b in self.blocks])
        self.low = np.zeros((len(h), 0))
        self.used = 0
        #: block size -> (channels, their feature indices [m, s], current diagonal blocks [m, s, s])
        self.stacks = {}
        for s in np.unique(self.sizes[self.sizes > 0]):
            chans = np.flatnonzero(self.sizes == s)
            idx = np.stack([self.blocks[c] for c in chans])
            self.stacks[int(s)] = (chans, idx, self.hinv[idx[:, :, None], idx[:, None, :]])
        self.where = {int(c): (int(s), i) for s, (chans, _, _) in self.stacks.items() for i, c in enumerate(chans)}

    def costs(self, channels: np.ndarray) -> np.ndarray:
        """Scaled ``ΔE`` of removing each of ``channels`` now."""
        out = np.zeros(len(channels))
        if self.scale == 0.0:
            return out
        for chans, idx, diag in self.stacks.values():
            rows = np.searchsorted(chans, channels)
            hit = (rows < len(chans)) & (chans[np.minimum(rows, len(chans) - 1)] == channels)
            if hit.any():
                sel = rows[hit]
                out[hit] = removal_cost(diag[sel], self.w[idx[sel]]) * self.scale
        return out

    def remove(self, channel: int) -> None:
        """Refit the other features for ``channel``'s removal (OBS update of ``W`` and ``H⁻¹``)."""
        b = self.blocks[channel]
        if not len(b):
            return
        g = self.hinv[:, b] - self.low[:, :self.used] @ self.low[b, :self.used].T  # current H⁻¹[:, b]
        vals, vecs = np.linalg.eigh((g[b] + g[b].T) / 2)
        root = vecs / np.sqrt(np.maximum(vals, 1e-12 * max(float(vals.max()), 1e-300)))  # M^(-1/2), up to a rotation
        c = g @ root
        self.w -= c @ (root.T @ self.w[b])
        self.w[b] = 0.0
        if self.used + len(b) > self.low.shape[1]:
            grow = max(len(b), self.low.shape[1])
            self.low = np.concatenate([self.low, np.zeros((len(self.low), grow))], axis=1)
        self.low[:, self.used:self.used + len(b)] = c
        self.used += len(b)
        for _chans, idx, diag in self.stacks.values():
            cb = c[idx]  # [m, s, len(b)]
            diag -= np.einsum("msk,muk->msu", cb, cb)
        s, i = self.where[int(channel)]
        self.stacks[s][2][i] = np.eye(s)  # removed: never a candidate again; keep the block invertible


def _greedy(group: Group, readers: list[_Reader], opts: ObsOptions) -> np.ndarray:
    """Scores of ``group``'s channels in the greedy removal order (see the module docstring)."""
    n = group.size
    surgeons = [_Surgeon(r, n, opts.damp) for r in readers if r.acc.n_samples]
    left = group.removable.copy()
    steps = min(int(left.sum()), n - 1, math.floor(opts.limit * n + 1e-9))
    if opts.counts is not None:
        steps = min(steps, opts.counts.get(group.index, 0))
    tiebreak = np.random.default_rng([opts.seed, group.index]).permutation(n)
    order, raw, total = [], [], 0.0
    for _ in range(steps):
        idx = np.flatnonzero(left)
        cost = sum((s.costs(idx) for s in surgeons), np.zeros(len(idx)))
        best = int(np.lexsort((tiebreak[idx], cost))[0])
        total += max(float(cost[best]), 0.0)
        order.append(int(idx[best]))
        raw.append(total)
        for s in surgeons:
            s.remove(int(idx[best]))
        left[idx[best]] = False
    idx = np.flatnonzero(left)
    if len(idx):
        cost = total + np.maximum(sum((s.costs(idx) for s in surgeons), np.zeros(len(idx))), 0.0)
        rank = np.lexsort((tiebreak[idx], cost))
        order += idx[rank].tolist()
        raw += cost[rank].tolist()
    return _strict_scores(n, order, raw)


def _strict_scores(n: int, order: list[int], raw: list[float]) -> np.ndarray:
    """Scores increasing strictly along ``order`` (at least ``raw``); channels not in it score highest."""
    top = max(raw, default=0.0)
    step = 1e-9 * top if top > 0 else 1e-9
    values = np.empty(len(order))
    prev = -np.inf
    for i, r in enumerate(raw):
        prev = values[i] = max(r, prev + step)
    out = np.full(n, (prev if len(order) else 0.0) + max(top, 1.0))
    out[np.asarray(order, dtype=np.int64)] = values
    return out


def _passes(plans: list[tuple[Group, list[_Reader]]], memory: int) -> list[list[tuple[Group, list[_Reader]]]]:
    """Groups split into passes whose Gram matrices take at most ``memory`` bytes (one group at least)."""
    out: list[list] = []
    used = memory + 1
    for plan in plans:
        size = sum(8 * len(r.feats) ** 2 for r in plan[1])
        if used + size > memory:
            out.append([])
            used = 0
        out[-1].append(plan)
        used += size
    return out


def obs_scores(analysis: Analysis, groups: list[Group], calib: Any, opts: ObsOptions = ObsOptions(), *,
               progress: bool = False) -> ObsReport:
    """Greedy OBS scores of ``groups`` on ``calib`` (see the module docstring)."""
    from onnxcompress.runtime.capture import CAPTURE_BUDGET, capture

    report = ObsReport()
    plans = []
    for g in groups:
        found = _readers(g, opts)
        if isinstance(found, str):
            report.fallbacks[g.name] = found
            log.debug("prune_channels: group %s: obs falls back (%s)", g.name, found)
        else:
            plans.append((g, found))
    model = serde.to_model(analysis.graph) if plans else None
    for batch in _passes(plans, opts.memory):
        readers = [r for _, rs in batch for r in rs]

        def consume(_batch: Any, tensors: dict[str, np.ndarray], readers: list[_Reader] = readers) -> None:
            for r in readers:
                r.add(tensors[r.input], opts.max_rows)

        capture(model, sorted({r.input for r in readers}), calib, consume, batch_size=opts.batch_size,
                progress=progress, max_bytes=CAPTURE_BUDGET)
        report.passes += 1
        for g, rs in batch:
            report.values[g.index] = _greedy(g, rs, opts)
            _count(report, rs)
            log.debug("prune_channels: obs order of %s from %s", g.name,
                      ", ".join(f"{node_label(r.ref.node)} ({len(r.feats)}/{r.full} features, "
                                f"{r.acc.n_samples} rows)" for r in rs))
            for r in rs:
                r.acc = None  # type: ignore[assignment]  # free the Gram matrix
    return report


def _count(report: ObsReport, readers: list[_Reader]) -> None:
    for r in readers:
        report.readers += 1
        report.features_max = max(report.features_max, len(r.feats))
        report.subsampled += int(len(r.feats) < r.full)
        rows = r.acc.n_samples
        report.rows_min = rows if report.rows_min == 0 else min(report.rows_min, rows)
