"""Least-squares layer reconstruction: shrink first, then win the accuracy back.

A compressed model (the *student*) is refitted layer by layer so that each refitted node's output on
calibration data matches the same tensor of the original model (the *teacher*), with no gradients:
for a node ``y = x·W + b`` the input activations ``X`` come from the student and the targets ``Y``
from the teacher, and ``W, b`` are the ridge least-squares solution. The same machinery serves
channel pruning (refit the consumer of pruned channels), low-rank factorization (refit the last
factor) and quantization bias correction.

Three modules:

* :mod:`onnxcompress.reconstruct.lstsq` — :class:`LstsqAccumulator` streams ``XᵀX``, ``XᵀY`` and moments
  batch by batch and solves the ridge normal equations (``solve(keep=...)`` solves for a subset of
  the features from the same statistics: pruning can try several channel sets without re-running
  the model).
* :mod:`onnxcompress.reconstruct.layerview` — :class:`LayerView` (:func:`layer_view`) maps a Conv / Gemm /
  MatMul input to feature rows (im2col for Conv, per group), its output to target rows and its
  weights to ``[groups, features, targets]`` and back.
* this module — :func:`reconstruct_layers` drives the refit of a list of :class:`LayerTarget` by
  depth (one pass over the data per depth; the layers of one depth together), the student's
  activations coming from the already-refitted student, and writes the new weights. Each pass runs
  only the segments of the student and of the teacher it needs
  (:class:`onnxcompress.runtime.segments.SegmentRunner`), so the two networks are run about once
  each in total, in batches of up to ``batch_size`` samples even for a fixed-batch model.

Memory: per batch, the frontier tensors later passes start from (in memory up to ``cache_bytes``,
then in a temporary folder), the current batch's activations (a run takes at most ``input_bytes``
of inputs), the im2col matrix for at most ``chunk_bytes`` worth of sampled rows, and the normal
equations (``groups × features²`` per layer of the round): nothing grows with the number of samples
but the spilled frontier on disk.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.graph import Names, const_values, node_label, opt_input
from onnxcompress.reconstruct.layerview import CHUNK_BYTES, SUPPORTED_OPS, LayerView, bias_add, layer_view
from onnxcompress.reconstruct.lstsq import DEFAULT_RIDGE, PRECISIONS, LstsqAccumulator
from onnxcompress.runtime.batching import Batch
from onnxcompress.runtime.data import CalibSource
from onnxcompress.runtime.progress import track
from onnxcompress.runtime.segments import CACHE_BYTES, SegmentRunner, batch_count, batches, subgraph_names

__all__ = ["DEFAULT_MAX_POSITIONS", "DEFAULT_ROWS_PER_FEATURE", "RIDGE_STEPS", "LayerStats", "LayerTarget",
           "reconstruct_layers", "refit_summary"]

log = logging.getLogger(__name__)

#: Default bound on the output positions (rows) sampled per batch and layer.
DEFAULT_MAX_POSITIONS = 4096

#: Default bound on the input bytes of one ORT run (about 13 images of 224×224×3 float32).
INPUT_BYTES = 8 * 2**20

#: Default bound on the rows per feature of one layer over all the data (rows ≫ features: subsample).
DEFAULT_ROWS_PER_FEATURE = 128.0

#: With a holdout, the relative ridges tried are ``ridge`` times these; the best on the held-out rows wins.
RIDGE_STEPS = (1.0, 1e2, 1e4)


@dataclass(frozen=True)
class LayerTarget:
    """One node of the student to refit.

    Attributes:
        node: The student node's name (or, for unnamed nodes, its first output's name).
        target: The teacher tensor its output must match (its pre-activation output).
        in_keep: Input channels of the node to keep (feature indices for Gemm/MatMul; see
            :func:`channel_features` for Flatten→Gemm). The others get zero weights, so the
            layout is unchanged and a later surgery can remove them. ``None``: all. For a student
            whose channels were already removed, leave this ``None``.
        out_keep: Channels of ``target`` that the node's outputs correspond to, when the node's
            own outputs were pruned.
        fit_bias: Solve for a bias (default: Conv/Gemm yes, MatMul no; a MatMul on ``[..., k]``
            rows followed by an ``Add`` of a constant bias fits that bias, and ``target`` is
            then the Add's output).
        bias_only: Keep the weights, solve for the bias alone, ``mean(Y) − mean(X)·W`` (few rows: SE's pooled vector).
        activation: The teacher's activation after ``target`` (``relu``, ``hardswish``): its flat region is relaxed
            (:meth:`~onnxcompress.reconstruct.layerview.LayerView.relax`; the errors are then on relaxed targets).
    """

    node: str
    target: str
    in_keep: Sequence[int] | None = None
    out_keep: Sequence[int] | None = None
    fit_bias: bool | None = None
    bias_only: bool = False
    activation: str | None = None

    @classmethod
    def of(cls, node: gs.Node, graph: gs.Graph, target: str | None = None,
           out_keep: Sequence[int] | None = None) -> LayerTarget:
        """Refit ``node`` to ``target`` (default: its output's name); a MatMul whose output only
        feeds the ``Add`` of a constant bias (a transformer's linear layer on ``[..., k]`` rows)
        is refit with that bias, against the Add's output."""
        found = bias_add(node, {t.name for t in graph.outputs}) if node.op == "MatMul" else None
        if found is None:
            return cls(node=node_label(node), target=target or node.outputs[0].name, out_keep=out_keep)
        return cls(node=node_label(node), target=found[0].outputs[0].name, out_keep=out_keep, fit_bias=True)


@dataclass
class LayerStats:
    """What one refit did.

    ``error_before``/``error_after`` are ``‖X·W + b − Y‖ / ‖Y‖`` on the calibration rows used
    (student inputs, teacher targets) with the old and the new weights. With a holdout,
    ``holdout_before``/``holdout_after`` are the same on the held-out rows (not fitted), ``ridge``
    the relative ridge that did best there, and ``rejected`` says the refit did not beat the old
    weights on them, so the node was left as it was (``weight``/``bias`` are then its old inputs).
    """

    node: str
    op_type: str
    target: str
    error_before: float
    error_after: float
    samples: int
    positions: int
    groups: int
    features: int
    kept_features: int
    solver: str
    weight: str
    bias: str | None = None
    holdout_before: float | None = None
    holdout_after: float | None = None
    ridge: float | None = None
    rejected: bool = False
    upcast: bool = False

    @property
    def underdetermined(self) -> bool:
        """Fewer rows than unknowns per group (kept features and the bias): the refit mostly
        follows the ridge."""
        return self.positions < self.kept_features // max(1, self.groups) + 1


def refit_summary(stats: Sequence[LayerStats]) -> dict[str, float | int]:
    """Pass statistics of a reconstruction: layers, mean relative errors before/after, rows used
    vs features (sums, the least ratio), layers with fewer rows than features and layers whose
    normal equations went to float64."""
    if not stats:
        return {"reconstructed_layers": 0}
    ratios = [s.positions / max(1, s.kept_features // max(1, s.groups) + 1) for s in stats]
    return {"reconstructed_layers": len(stats),
            "reconstruct_error_before": round(float(np.mean([s.error_before for s in stats])), 6),
            "reconstruct_error_after": round(float(np.mean([s.error_after for s in stats])), 6),
            "reconstruct_rows": int(sum(s.positions for s in stats)),
            "reconstruct_features": int(sum(s.kept_features for s in stats)),
            "reconstruct_min_rows_per_feature": round(float(min(ratios)), 2),
            "reconstruct_underdetermined": sum(1 for s in stats if s.underdetermined),
            "reconstruct_float64": sum(1 for s in stats if s.upcast)}


@dataclass
class _Plan:
    target: LayerTarget
    index: int
    label: str
    input: str


@dataclass
class _Options:
    ridge: float
    batch_size: int
    max_positions: int | None
    seed: int
    progress: bool
    threads: int
    chunk_bytes: int = CHUNK_BYTES
    holdout: float = 0.0
    precision: str = "auto"
    rows_per_feature: float | None = None
    cache_bytes: int = CACHE_BYTES
    n_batches: int = 0
    run_share: float = 1.0
    stats: list[LayerStats] = field(default_factory=list)


def _const_input(node: gs.Node, i: int, label: str) -> np.ndarray | None:
    tensor = opt_input(node, i)
    if tensor is None:
        return None
    values = const_values(tensor)
    if values is None:
        raise InputError(f"node {label!r}: input {i} ({tensor.name!r}) is not a constant initializer")
    return values


def _resolve(graph: gs.Graph, layers: Sequence[LayerTarget]) -> list[_Plan]:
    by_name: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for key in ([node.name] if node.name else []) + [t.name for t in node.outputs[:1]]:
            by_name.setdefault(key, i)
    plans, seen = [], set()
    for t in layers:
        if t.node not in by_name:
            raise InputError(f"no node named {t.node!r} in the student")
        idx = by_name[t.node]
        node = graph.nodes[idx]
        if idx in seen:
            raise InputError(f"node {t.node!r} is listed twice")
        if node.op not in SUPPORTED_OPS:
            raise InputError(f"node {t.node!r}: cannot reconstruct {node.op} (only {sorted(SUPPORTED_OPS)})")
        _const_input(node, 1, t.node)
        seen.add(idx)
        plans.append(_Plan(t, idx, t.node, node.inputs[0].name))
    return sorted(plans, key=lambda p: p.index)


def _ancestors(graph: gs.Graph, name: str, producer: dict[str, int]) -> set[int]:
    found: set[int] = set()
    stack = [name]
    while stack:
        idx = producer.get(stack.pop())
        if idx is None or idx in found:
            continue
        found.add(idx)
        node = graph.nodes[idx]
        stack.extend([x.name for x in node.inputs] + sorted(subgraph_names(node)))
    return found


def _rounds(graph: gs.Graph, plans: list[_Plan], together: bool) -> list[list[_Plan]]:
    """``plans`` (topologically sorted) by depth: a plan's round is one after the last round of a
    plan its input depends on, so the layers of a round are independent and refit on one pass."""
    if not together:
        return [[p] for p in plans]
    producer = {o.name: i for i, n in enumerate(graph.nodes) for o in n.outputs if o.name}
    depth: dict[int, int] = {}
    for plan in plans:
        deps = _ancestors(graph, plan.input, producer)
        depth[plan.index] = 1 + max((depth[p.index] for p in plans if p.index in deps and p.index in depth), default=-1)
    rounds: list[list[_Plan]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for plan in plans:
        rounds[depth[plan.index]].append(plan)
    return rounds


class _Runs:
    """The student and the teacher, each run only where a round needs it (:class:`SegmentRunner`)."""

    def __init__(self, graph: gs.Graph, teacher: onnx.ModelProto, data: CalibSource, opts: _Options):
        half = opts.cache_bytes // 2  # the budget is shared by the two frontiers
        self.student = SegmentRunner(graph, threads=opts.threads, cache_bytes=half)
        self.teacher = SegmentRunner(serde.to_graph(teacher), threads=opts.threads, cache_bytes=half)
        self.data, self.batch_size, self.stacked = data, opts.batch_size, False

    def plan_batches(self, plans: list[_Plan], input_bytes: int) -> None:
        """Samples per run: ``batch_size``, fewer when their inputs pass ``input_bytes`` (large images:
        the activations of a run are a multiple of its inputs). A fixed-batch model's samples are
        stacked when both graphs compute the same that way (checked on the first batch)."""
        first = next(iter(self.data.batches(self.batch_size)), None)
        if first is None:
            return
        per_sample = max(1, sum(v.nbytes for v in first.feeds.values()) // max(1, len(first)))
        fixed = {s.batch_dim_static() for s in self.data.specs} - {None}
        native = max(fixed) if fixed else 1
        self.batch_size = max(native, min(self.batch_size, input_bytes // per_sample))
        if not fixed or self.batch_size <= native:
            return
        first = next(iter(batches(self.data, self.batch_size)))
        self.stacked = self.student.batchable([p.input for p in plans], first, native) and \
            self.teacher.batchable([p.target.target for p in plans], first, native)
        log.debug("fixed batch %d: %s", native, f"stacked into batches of {self.batch_size}" if self.stacked
                  else "run at that size")

    def source(self) -> Iterator[Batch]:
        return batches(self.data, self.batch_size) if self.stacked else self.data.batches(self.batch_size)

    def count(self) -> int:
        """Batches per pass (as many as :meth:`source` yields; from the files' headers when they tell)."""
        return batch_count(self.data, self.batch_size) if self.stacked else self.data.batch_count(self.batch_size)

    def prepare(self, group: list[_Plan], later: list[_Plan]) -> None:
        stale = self.student.topo.downstream(p.index for p in group + later)
        self.student.prepare([p.input for p in group], [p.input for p in later], stale)
        try:
            self.teacher.prepare([p.target.target for p in group], [p.target.target for p in later], set())
        except KeyError as exc:
            raise InputError(f"teacher has no tensor {exc.args[0]!r} computed from its inputs") from None

    def batches(self) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray], int]]:
        """``(index, student tensors, teacher tensors, samples)`` per batch."""
        for index, batch in enumerate(self.source()):
            yield index, self.student.run(index, batch), self.teacher.run(index, batch), len(batch)

    def close(self) -> None:
        self.student.close()
        self.teacher.close()


def _views(graph: gs.Graph, plans: list[_Plan], dtype: type) -> list[LayerView]:
    views = []
    for p in plans:
        node = graph.nodes[p.index]
        weight = _const_input(node, 1, p.label)
        bias = _const_input(node, 2, p.label)
        found = bias_add(node) if node.op == "MatMul" and p.target.fit_bias else None
        if found is not None:
            bias = np.asarray(found[0].inputs[found[1]].values).reshape(-1)
        views.append(layer_view(node, weight, bias, fit_bias=p.target.fit_bias, out_keep=p.target.out_keep,
                                dtype=dtype, activation=p.target.activation))
    return views


def _row_caps(views: list[LayerView], opts: _Options) -> list[int | None]:
    """Rows drawn per batch and layer: ``max_positions``, and with ``rows_per_feature`` at most that
    many rows per feature over all the data (seeded subsampling when rows ≫ features)."""
    caps = []
    for view in views:
        cap = None if opts.max_positions is None else math.ceil(opts.max_positions * opts.run_share)
        if opts.rows_per_feature is not None and opts.n_batches:
            share = math.ceil(opts.rows_per_feature * (view.n_features + 1) / opts.n_batches)
            cap = share if cap is None else min(cap, share)
        caps.append(cap)
    return caps


def _refit_round(graph: gs.Graph, plans: list[_Plan], runs: _Runs, opts: _Options) -> None:
    dtype = np.float64 if opts.precision == "float64" else np.float32
    views = _views(graph, plans, dtype)

    def accumulator(v: LayerView) -> LstsqAccumulator:
        return LstsqAccumulator(v.n_features, v.n_targets, v.fit_bias, groups=v.groups, precision=opts.precision,
                                ridge_hint=opts.ridge)

    accs = [accumulator(v) for v in views]
    holds = [accumulator(v) for v in views] if opts.holdout > 0 else None
    rngs = [np.random.default_rng([opts.seed, p.index]) for p in plans]
    splits = [np.random.default_rng([opts.seed, p.index, 1]) for p in plans]
    positions, caps, samples, count = [0] * len(plans), _row_caps(views, opts), 0, 0
    for _, tensors, targets, n in runs.batches():
        samples, count = samples + n, count + 1
        for i, (plan, view) in enumerate(zip(plans, views)):
            x, y = tensors[plan.input], targets[plan.target.target]
            for X, Y in view.pairs(x, y, max_positions=caps[i], rng=rngs[i], chunk_bytes=opts.chunk_bytes):
                if holds is None:
                    accs[i].add(X, Y)
                else:
                    _add_split(accs[i], holds[i], X, Y, opts.holdout, splits[i])
                positions[i] += X.shape[1]
    if samples == 0:
        raise InputError("no calibration samples")
    opts.n_batches = count
    for i, (plan, view, acc, pos) in enumerate(zip(plans, views, accs, positions)):
        hold = None if holds is None else holds[i]
        opts.stats.append(_finish(graph, plan, view, acc, opts.ridge, samples, pos, hold))


def _add_split(fit: LstsqAccumulator, hold: LstsqAccumulator, X: np.ndarray, Y: np.ndarray,
               share: float, rng: np.random.Generator) -> None:
    """Add each row of ``(X, Y)`` to ``hold`` with probability ``share``, else to ``fit``."""
    mask = rng.random(X.shape[-2]) < share
    for acc, rows in ((fit, ~mask), (hold, mask)):
        if rows.any():
            acc.add(X[..., rows, :], Y[..., rows, :])


def _merged(a: LstsqAccumulator, b: LstsqAccumulator) -> LstsqAccumulator:
    """An accumulator holding the rows of both ``a`` and ``b`` (``b``'s statistics moved to ``a``'s shift)."""
    out = copy.deepcopy(a)
    d, e, n = b.x0 - a.x0, b.y0 - a.y0, b.n_samples  # rows of b, shifted by a's: Xs_b + d, Ys_b + e
    out.xx += b.xx + d[:, :, None] * b.sx[:, None, :] + b.sx[:, :, None] * d[:, None, :] \
        + n * d[:, :, None] * d[:, None, :]
    out.xy += b.xy + d[:, :, None] * b.sy[:, None, :] + b.sx[:, :, None] * e[:, None, :] \
        + n * d[:, :, None] * e[:, None, :]
    out.sx += b.sx + n * d
    out.sy += b.sy + n * e
    out.yy += b.yy + 2 * e * b.sy + n * e * e
    out.n_samples += n
    return out


def _holdout_sums(view: LayerView, hold: LstsqAccumulator, w: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(‖residual‖², ‖Y‖²)`` of weights ``w, b`` (``[groups, ...]``) on the held-out rows."""
    res = ysq = 0.0
    for g in range(view.groups):
        r, y = hold.residual_norms(w[g], b[g] if view.fit_bias else None, group=g)
        res, ysq = res + r, ysq + y
    return res, ysq


def _choose_ridge(view: LayerView, acc: LstsqAccumulator, hold: LstsqAccumulator, keeps: list[np.ndarray] | None,
                  ridge: float) -> tuple[float, float, float, bool]:
    """The ridge (of ``ridge·RIDGE_STEPS``) with the least held-out residual; whether it beats the old weights.

    Returns ``(ridge, held-out relative error before, after, accepted)``.
    """
    w_cur, b_cur = view.to_matrix()
    before, ysq = _holdout_sums(view, hold, w_cur, b_cur)
    best = None
    for r in (ridge * step for step in RIDGE_STEPS):
        w, b, _, _ = _solve_layer(view, acc, keeps, r)
        after, _ = _holdout_sums(view, hold, w, b)
        if best is None or after < best[1]:
            best = (r, after)
    rel = (lambda v: math.sqrt(v / ysq)) if ysq > 0 else (lambda v: 0.0)
    return best[0], rel(before), rel(best[1]), best[1] < before


def _solve_layer(view: LayerView, acc: LstsqAccumulator, keeps: list[np.ndarray] | None,
                 ridge: float, bias_only: bool = False) -> tuple[np.ndarray, np.ndarray, list[float], set[str]]:
    """New ``(W, b)``, ``[res_before², res_after², ‖Y‖²]`` summed over groups, solvers used (``mean``: bias_only)."""
    w_cur, b_cur = view.to_matrix()
    w_new, b_new = np.zeros_like(w_cur), b_cur.copy()
    sums, solvers = [0.0, 0.0, 0.0], set()
    for g in range(view.groups):
        keep = None if keeps is None else keeps[g]
        fixed = (w_cur[g] if keep is None else w_cur[g][keep]) if bias_only and view.fit_bias else None
        w, b = acc.solve(ridge, keep=keep, group=g, fixed=fixed)
        solvers.add(acc.last_solver)
        before, ysq = acc.residual_norms(w_cur[g], b_cur[g] if view.fit_bias else None, group=g)
        after, _ = acc.residual_norms(w, b, keep=keep, group=g)
        w_new[g][slice(None) if keep is None else keep] = w
        if b is not None:
            b_new[g] = b
        sums = [sums[0] + before, sums[1] + after, sums[2] + ysq]
    return w_new, b_new, sums, solvers


def _finish(graph: gs.Graph, plan: _Plan, view: LayerView, acc: LstsqAccumulator,
            ridge: float, samples: int, positions: int, hold: LstsqAccumulator | None = None) -> LayerStats:
    keeps = view.feature_keep(plan.target.in_keep)
    checked: tuple[float, float, float, bool] | None = None
    acc, hold = (_merged(acc, hold), None) if hold is not None and plan.target.bias_only else (acc, hold)
    if hold is not None and hold.n_samples > 0 and acc.n_samples > 0:
        checked = _choose_ridge(view, acc, hold, keeps, ridge)
        ridge = checked[0]
        acc = _merged(acc, hold)  # the chosen ridge, solved on every row
    w_new, b_new, (before, after, ysq), solvers = _solve_layer(view, acc, keeps, ridge, plan.target.bias_only)
    if checked is not None and not checked[3]:
        node = graph.nodes[plan.index]
        weight, bias_t = node.inputs[1].name, opt_input(node, 2)
        bias = None if bias_t is None else bias_t.name
        after = before
    else:
        weight, bias = _write(graph, plan.index, view, w_new, b_new)
    rel = (lambda r: math.sqrt(r / ysq)) if ysq > 0 else (lambda r: 0.0)
    kept = view.n_features * view.groups if keeps is None else sum(len(k) for k in keeps)
    stats = LayerStats(plan.label, view.op_type, plan.target.target, rel(before), rel(after), samples, positions,
                       view.groups, view.n_features * view.groups, kept, "+".join(sorted(solvers)), weight, bias)
    stats.upcast = acc.upcast or (hold is not None and hold.upcast)
    if checked is not None:
        stats.ridge, stats.holdout_before, stats.holdout_after, stats.rejected = \
            checked[0], checked[1], checked[2], not checked[3]
    if stats.underdetermined:
        log.warning("refit %s: under-determined, %d rows for %d features per group (more calibration data "
                    "or a larger max_positions helps)", stats.node, positions, kept // max(1, view.groups) + 1)
    log.info("refit %s (%s): relative error %.4g -> %.4g on %d samples, %d positions%s",
             stats.node, stats.op_type, stats.error_before, stats.error_after, samples, positions,
             "" if checked is None else f"; held out {checked[1]:.4g} -> {checked[2]:.4g} (ridge {checked[0]:g})"
             + (": rejected, weights kept" if not checked[3] else ""))
    return stats


def _write(graph: gs.Graph, index: int, view: LayerView, W: np.ndarray,
           b: np.ndarray) -> tuple[str, str | None]:
    """Point the node at new constants holding the refit (the old ones stay for other readers)."""
    node = graph.nodes[index]
    names = Names(graph)
    weight, bias = view.from_matrix(W, b if view.fit_bias else None)
    old_w, old_b = node.inputs[1], opt_input(node, 2)
    node.inputs[1] = _new_constant(graph, names, f"{old_w.name}_refit", weight.astype(old_w.values.dtype))
    new_b = None
    found = bias_add(node) if node.op == "MatMul" and bias is not None else None
    if found is not None:  # the bias lives in the Add after the MatMul
        add, i = found
        old_b = add.inputs[i]
        new_b = _new_constant(graph, names, f"{old_b.name}_refit", bias.astype(old_b.values.dtype).reshape(old_b.shape))
        add.inputs[i] = new_b
    elif bias is not None:
        bdtype = old_b.values.dtype if old_b is not None else old_w.values.dtype
        base = f"{old_b.name}_refit" if old_b is not None else f"{node_label(node)}_bias_refit"
        new_b = _new_constant(graph, names, base, bias.astype(bdtype).reshape(-1))
        if len(node.inputs) > 2:
            node.inputs[2] = new_b
        else:
            node.inputs.append(new_b)
    for key, value in view.attr_updates.items():
        node.attrs.pop(key, None)  # an updated attribute is written last, as a new one
        node.attrs[key] = value
    _drop_unused_inputs(graph, [old_w, old_b])
    return node.inputs[1].name, None if new_b is None else new_b.name


def _new_constant(graph: gs.Graph, names: Names, base: str, array: np.ndarray) -> gs.Constant:
    """A constant with a fresh name (also a graph input before IR 4, which requires that)."""
    const = gs.Constant(names.fresh(base), array)
    if graph.ir_version is not None and graph.ir_version < 4:
        graph.inputs.append(const)
    return const


def _drop_unused_inputs(graph: gs.Graph, tensors: list[gs.Tensor | None]) -> None:
    """Take constants no node reads any more out of the graph inputs (where IR < 4 lists them)."""
    for tensor in tensors:
        if tensor is not None and not tensor.outputs and not any(t is tensor for t in graph.outputs):
            graph.inputs[:] = [t for t in graph.inputs if t is not tensor]


def reconstruct_layers(student: gs.Graph, teacher: onnx.ModelProto, layers: Sequence[LayerTarget],
                       data: CalibSource, *, ridge: float = DEFAULT_RIDGE, batch_size: int = 32,
                       max_positions: int | None = DEFAULT_MAX_POSITIONS, seed: int = 0,
                       progress: bool = False, group_independent: bool = True, threads: int = 0,
                       chunk_bytes: int = CHUNK_BYTES, holdout: float = 0.0, precision: str = "auto",
                       rows_per_feature: float | None = DEFAULT_ROWS_PER_FEATURE,
                       cache_bytes: int = CACHE_BYTES, input_bytes: int = INPUT_BYTES) -> tuple[gs.Graph, list[LayerStats]]:
    """Refit ``layers`` of ``student`` so that their outputs match tensors of ``teacher``.

    Layers are refit by depth, one pass over the data per depth (see the module); inputs come from
    the student with every earlier depth refitted, targets from the teacher on the same batch, so
    errors do not compound. Each refit writes new initializers (the old arrays are never modified;
    one nobody uses any more is removed).

    Args:
        student: The compressed model's graph (not modified; topologically sorted).
        teacher: The original model; must take the same inputs.
        layers: What to refit (Conv, Gemm or MatMul nodes with constant weights).
        data: Calibration samples (read once per round).
        ridge: Relative ridge (see :meth:`LstsqAccumulator.solve`).
        batch_size: Samples per ORT run (see ``input_bytes``).
        max_positions: Rows per batch and layer, sampled with ``seed`` (``None``: all).
        seed: Seed of the row sampling.
        progress: Show a progress bar over the rounds.
        group_independent: Refit the layers of one depth in one round (same result as one layer
            per round, fewer passes).
        threads: ORT intra-op threads (0: one per core).
        chunk_bytes: Bound on one chunk of the im2col feature matrix.
        holdout: Share of the sampled rows (drawn with ``seed``) kept out of the fit, in ``[0, 1)``:
            each layer is solved for every ridge of ``ridge·RIDGE_STEPS``, the best on the held-out
            rows is taken, and the refit is rejected (``LayerStats.rejected``, weights kept) unless
            it beats the old weights there (a guard against overfitting on few rows).
        precision: Products of the normal equations in ``float32``, ``float64`` or ``auto``
            (float32 unless float64 matters next to the ridge; :class:`LstsqAccumulator`).
        rows_per_feature: At most this many rows per feature (and bias) per layer over all the
            data, drawn with ``seed`` (``None``: only ``max_positions``); the data is counted first.
        cache_bytes: Frontier bytes held in memory before spilling to a temporary folder.
        input_bytes: Bound on the input bytes of one ORT run: larger inputs, fewer samples per run
            (``max_positions`` in proportion), so the activations' memory is bounded.

    Returns:
        ``(graph, stats)``: the refitted copy and one :class:`LayerStats` per layer, in the order
        they were refitted.

    Raises:
        InputError: Unknown or unsupported node, non-constant weights, a missing teacher tensor,
            shapes that do not match, or no data.
    """
    graph = student.copy()
    graph.producer_name, graph.producer_version = student.producer_name, student.producer_version
    plans = _resolve(graph, layers)
    if not 0.0 <= holdout < 1.0:
        raise InputError(f"holdout={holdout}: must lie in [0, 1)")
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r}: one of {', '.join(PRECISIONS)}")
    opts = _Options(ridge, batch_size, max_positions, seed, progress, threads, chunk_bytes, holdout, precision,
                    rows_per_feature, cache_bytes)
    _run_rounds(graph, _rounds(graph, plans, group_independent), teacher, data, opts, input_bytes)
    return graph, opts.stats


def _run_rounds(graph: gs.Graph, rounds: list[list[_Plan]], teacher: onnx.ModelProto, data: CalibSource,
                opts: _Options, input_bytes: int) -> None:
    runs = _Runs(graph, teacher, data, opts)
    runs.plan_batches([p for g in rounds for p in g], input_bytes)
    opts.run_share = runs.batch_size / opts.batch_size
    if opts.rows_per_feature is not None:
        opts.n_batches = runs.count()
    n = sum(len(g) for g in rounds)
    try:
        for r, group in enumerate(track(rounds, f"refitting {n} layers in {len(rounds)} rounds",
                                        total=len(rounds), enabled=opts.progress)):
            log.debug("refitting %s in one round", [p.label for p in group])
            runs.prepare(group, [p for g in rounds[r + 1:] for p in g])
            _refit_round(graph, group, runs, opts)
    finally:
        runs.close()
    log.debug("reconstruction: %d rounds, student %d segments (%d nodes), teacher %d segments (%d nodes)",
              len(rounds), runs.student.segments, runs.student.nodes_run, runs.teacher.segments,
              runs.teacher.nodes_run)
