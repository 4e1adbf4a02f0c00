"""Structured channel pruning: remove whole channels (filters) and everything that depends on them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.errors import InputError
from onnxcompress.core.graph import check_names, const_values, node_label
from onnxcompress.core.metrics import model_metrics
from onnxcompress.core.pass_api import BN_GAMMA, Numerics, Option, Pass, PassContext, PassResult, register
from onnxcompress.pruning.apply import ApplyReport, PrunedLayer, apply_pruning
from onnxcompress.pruning.budget import BudgetPlan, ChannelModel, MacModel, allocate, plan_for_counts
from onnxcompress.pruning.dependency import Analysis, analyze
from onnxcompress.pruning.importance import CRITERIA, Scores, normalize, score_groups
from onnxcompress.pruning.obs import ObsOptions, ObsReport
from onnxcompress.pruning.prepare import merge_reshapes
from onnxcompress.pruning.select import Budget, eligible_groups, levels, plan_removal, uniform_count
from onnxcompress.pruning.sensitivity import MaskedError, RefitMaskedError, importance_errors, measured_errors
from onnxcompress.pruning.types import slug
from onnxcompress.reconstruct.layerview import SUPPORTED_OPS
from onnxcompress.reconstruct.refit import LayerStats, LayerTarget, reconstruct_layers, refit_summary

__all__ = [
    "MACS_TOLERANCE",
    "POOLS",
    "R_NO_CALIB",
    "R_SMALL",
    "PruneChannels",
    "activation_after",
]

log = logging.getLogger(__name__)

#: Module providing least-squares reconstruction, and what the pass needs from it.

R_NO_CALIB = "reconstruction_needs_calibration"
R_RECONSTRUCT_OP = "reconstruction_unsupported_op"
R_RECONSTRUCT_FAILED = "reconstruction_failed"
R_SMALL = "group_smaller_than_round_to"

#: Producers of a pooled vector (an SE/attention block's input): ``se=stats`` refits only the bias of its readers.
POOLS = ("GlobalAveragePool", "ReduceMean")

#: Largest gap between the achieved and the target MAC ratio (``macs=``) that passes without a warning.
MACS_TOLERANCE = 0.02


def _macs(graph: gs.Graph, ctx: PassContext) -> int:
    """The graph's MACs at the run's dims."""
    return model_metrics(serde.to_model(graph), ctx.dims).macs


def _param_count(graph: gs.Graph) -> int:
    return int(sum(np.size(t.values) for t in graph.tensors().values() if isinstance(t, gs.Constant)))


@register
class PruneChannels(Pass):
    """Removes the least important channels of every conv/linear layer (structured pruning).

    Before: ``y = Conv2(Relu(BN(Conv1(x, W1[C]))), W2[:, C])``
    After:  ``y = Conv2(Relu(BN(Conv1(x, W1[K]))), W2[:, K])`` with ``K`` the kept channels and
    ``b2' = b2 + sum_{c removed} sum_k W2[:, c, k] * relu(bn(b1[c]))``.

    Math:
        A dependency analysis (:mod:`onnxcompress.pruning.dependency`) finds the channels that
        must go together: pass-through ops keep channel ``c``; residual ``Add``/``Mul`` and SE
        gates couple the channels of every producer feeding them; Concat/Split/Slice shift
        offsets; depthwise convs tie input ``c`` to outputs ``[c*m, (c+1)*m)``; Flatten/Reshape
        into a Gemm tie ``c`` to rows ``[c*HW, (c+1)*HW)``; a Reshape that splits channels into
        blocks (``[b, 4*16, n] -> [b, 4, 16, n]``) removes whole blocks, one with a constant,
        ``0``/``-1`` or computed target keeps the channel (a literal count is rewritten, in a
        copy); a channel shuffle (Reshape -> Transpose -> Reshape, ``g`` groups) removes one
        channel of every group at once; a grouped conv (``group=g``) splits
        its input and output channels into ``g`` blocks that must each lose the same count
        (weight ``[g*co, ci, k, k] -> [g*co', ci', k, k]``, ``group`` unchanged); producers whose
        channels share such blocks and would each be frozen alone (ShuffleNet's stage streams)
        form one group with one budget. Each *group*
        (all channels sharing the same producers) is scored (``criterion``: ``l1``/``l2``
        filter norms, ``bn_scale`` ``|gamma|``, ``activation`` mean ``|x|`` on calibration data,
        ``auto`` (default): ``bn_scale`` where the group has a BN, ``activation`` for transformer
        FFN neurons when calibration data is given, else ``l1``; ``obs`` (calibration data,
        :mod:`onnxcompress.pruning.obs`): per group and dense reader (Conv ``group`` 1, Gemm,
        MatMul) the Gram matrix ``H = XᵀX`` of the reader's input features (im2col patches, ``k·k``
        per channel) on the graph being pruned, dampened by ``obs_damp · mean(diag H)``, at most
        ``obs_features`` features per reader (seeded subsampling of kernel positions above it);
        removing a channel's features ``b`` with the others refitted costs
        ``tr(W_bᵀ ([H⁻¹]_bb)⁻¹ W_b)``, summed over the readers each divided by its output energy;
        the cheapest goes, ``W`` and ``H⁻¹`` are updated, and so on: the budget sets how many go,
        this order which; a group with grouped-conv blocks or a reader that is not dense is scored
        as ``auto`` does, stats ``obs_fallback_<reason>``) and the lowest
        ``ratio`` of it is removed (``scope=global``: one ranking of scores normalised by each
        group's mean; block-constrained groups: the lowest ``k`` of every block). A removed channel outputs the constant ``act(bias)`` in the *zeroed original*
        (its filter set to 0); that constant is folded into the next layer's bias -- exactly
        for 1x1 convs without padding, Gemm and MatMul, approximately (border pixels) for
        padded kxk convs and ConvTranspose. ``steps=N`` prunes ``1-(1-ratio)^(1/N)`` per round,
        re-analysing and re-scoring each time; with ``refit_steps=true`` the layers changed so far
        are refitted (against the original) after every round but the last, so the next round
        scores, measures and prunes the refitted model. Before the analysis, ``Reshape(Reshape(x))``
        chains are merged (exact; tf2onnx's ``[N,C,1,1] -> [N,1,1,C] -> [N,C]`` flatten would
        otherwise freeze the last stage). Transformers: the channels of ``[batch, seq, dim]``
        activations are on the last axis (:mod:`onnxcompress.pruning.layout`); a MatMul with a
        constant 2-D weight (or a ``Reshape [s, d] -> Gemm -> Reshape [1, s, d]``) is a weight
        layer on token rows, so an FFN's intermediate neurons (up columns, bias, GELU in any
        form, down rows) are a group; the residual stream freezes at its LayerNormalization
        (``normalizes_over_channels``) and the Q/K/V channels at the reshape into heads
        (``attention_heads``: ``prune_heads`` removes whole heads). The down projection's
        compensation goes into its bias ``Add``, which its refit fits too. Shapes are traced with the symbolic input dims fixed
        where the run knows them (``ctx.dims.known()``: ``--dim``, else the calibration data's
        shapes; guessed values are never used), so a Flatten of a spatially symbolic tensor has a
        known size when the data gives it (else its group freezes, ``unknown_channel_dim``).

    Fires when:
        A group has removable channels: every producer has constant weights, every op on the
        way has a handler, and no channel is a graph input/output (``protect_io``), excluded,
        or read by something that would change meaning. Run it before ``fold_bn`` for
        ``criterion=bn_scale``/``auto`` (or after: the gammas fold_bn keeps in the context slot
        :data:`~onnxcompress.core.pass_api.BN_GAMMA` are used; an optional read). Needs
        calibration data with ``criterion=activation``.

    Declines:
        One decline per frozen group, with the code of its main reason (from
        :data:`~onnxcompress.pruning.types.FREEZE_REASONS`: ``no_handler``, ``grouped_conv`` --
        blocks that span several groups one of which can prune alone, or channels spread over
        some blocks only --, ``reduces_over_channels``,
        ``reshape_mixes_channels`` (the batch dim changes, or channels neither stay, merge nor
        split evenly), ``reshape_target_untraced`` (a computed target whose channel entry cannot
        be traced or rewritten), ``graph_input``/``graph_output``, ``shared_weight``,
        ``non_constant_weight``, ``unknown_channel_dim``, ``control_flow``, ``excluded``, ...),
        ``group_smaller_than_round_to`` per group left alone because it is smaller than
        ``round_to``. An ``exclude`` name that matches no node or tensor is an error (with the
        closest names).
        With ``reconstruct`` and calibration data, every Conv/Gemm/MatMul whose input channels
        were removed is refitted by least squares to the original model's output of the same
        node (``onnxcompress.reconstruct.refit.reconstruct_layers``; ``out_keep`` selects the
        kept output channels; ``se=stats``: a layer reading a ``GlobalAveragePool``/``ReduceMean``,
        one row per sample, keeps its weights on the kept channels and only its bias is refitted,
        ``b = mean(Y) − mean(X)·W``: the original's output mean; ``post_act=true``: for a layer whose
        output only feeds a ReLU or a hard-swish (``HardSwish``, or Paddle's ``x·Clip(x+3, 0, 6)/6``),
        a target where the original's activation is flat (``t <= 0``, ``<= −3``) becomes the
        layer's current output clipped to ``[t, 0]`` (``[t, −3]``): the error that counts is the one
        after the activation, one Gauss-Newton-like step from the pruned weights; ``refit_holdout=F`` (default 0.2, as factorization's): a share
        ``F`` of each layer's sampled rows is held out, the ridge (``1e-4``, ``1e-2`` or ``1`` relative) with the
        least held-out error is kept and a refit that does not beat the pruned weights there is rejected --
        deep layers with few rows per feature otherwise fit the calibration set and blow up on other
        inputs); without calibration data, for other ops or when it fails it
        declines (``reconstruction_needs_calibration``, ``reconstruction_unsupported_op``,
        ``reconstruction_failed``).

    Budget:
        ``macs=M`` (instead of ``ratio``; both, or ``macs`` with ``scope``, is a parse error)
        removes channels until the model's MACs at the run's dims are about ``M`` times the
        original's, group by group where it costs the least predicted error per MAC saved
        (:mod:`onnxcompress.pruning.budget`); the predicted error of each group at each removal
        count is measured on ``sens_samples`` calibration samples with the group pruned alone, or
        without data is the share of its importance removed (:mod:`onnxcompress.pruning.sensitivity`);
        ``sensitivity=refit`` measures it with the dense Conv/Gemm/MatMul readers of the zeroed
        channels refitted by least squares to their own outputs on the same samples (what the
        reconstruction will recover, to first order; stats ``sensitivity`` ``measured_refit``).
        ``ratio=R:allocate=sensitivity`` spends a channel budget the same way: ``R`` of all the
        eligible groups' channels go, group by group where the predicted error per channel removed
        is least (the same allocator on a :class:`~onnxcompress.pruning.budget.ChannelModel`);
        ``allocate=uniform`` (default) removes ``R`` of every group.
        The measured error is the worst relative squared error over the float outputs and over
        the blocks of an output's axis-1 channels of clearly different scale (a YOLO head's box
        rows and class-score rows, as the lossy gate slices them).
        ``max_group_ratio`` caps every group; ``round_to`` sets the steps. The achieved ratio
        (``macs_ratio``) is measured on the pruned graph; a miss larger than
        :data:`MACS_TOLERANCE` (frozen or capped groups, or coarse steps) is logged as a warning.
        With ``steps=N`` round ``k`` aims at ``M**(k/N)`` (coarse steps may then undershoot).
        ``dry_run=true`` computes the plan as one round (``ratio`` or ``macs``) and changes
        nothing: stats ``plan`` (one row per prunable group: ``group``, ``anchor``, ``kept``,
        ``total``, ``macs`` after, ``predicted_error``).

    Stats:
        ``macs_target``, ``macs_predicted``, ``macs_ratio``, ``sensitivity`` (``measured``, ``measured_refit`` or
        ``importance``), ``predicted_error``, ``plan`` (``macs=`` or ``dry_run``), ``dry_run``;
        ``groups_found``, ``groups_pruned``, ``groups_frozen``, ``groups_frozen_<reason>``,
        ``reshapes_merged`` (when any),
        ``groups_skipped_small``, ``channels_before``/``channels_after``,
        ``params_before``/``params_after``, ``channels_removed``, ``channels_pinned`` (channels
        of prunable groups that may not go, e.g. concatenated with a graph input),
        ``bias_compensated``, ``bias_compensation_approx``, ``channels_uncompensated``,
        ``channels_restored`` (given back so no tensor is empty), ``bn_scale_fallback_l1``,
        ``criterion_<name>`` (groups scored with each criterion, e.g. ``auto`` gives
        ``criterion_bn_scale`` and ``criterion_l1``), with ``criterion=obs`` ``obs_fallback`` and
        ``obs_fallback_<reason>`` (groups scored as ``auto``: ``grouped_conv``, ``reader_not_dense``,
        ``no_dense_reader``, ``too_many_features``), ``obs_readers`` (Gram matrices accumulated),
        ``obs_features_max`` (most features of one), ``obs_readers_subsampled``, ``obs_rows_min``
        (fewest rows one was accumulated from), ``obs_passes`` (passes over the calibration data),
        ``groups_round_to_relaxed`` (grouped-conv
        groups whose block counts allow no multiple of ``round_to``),
        ``reconstructed_layers``, ``reconstruct_error_before``/``reconstruct_error_after`` (mean
        relative output error of the refitted layers on calibration data),
        ``reconstruct_per_layer`` (one row per refitted layer: ``node``, ``op``,
        ``error_before``/``error_after`` -- ``‖X·W + b − Y‖ / ‖Y‖`` with the pruned and the refitted
        weights --, ``rows`` used and ``features`` solved for per group, bias included; with
        ``refit_holdout`` also ``holdout_before``/``holdout_after``, ``ridge`` and ``rejected``),
        ``reconstruct_rejected`` (``refit_holdout``: refits rejected on the held-out rows).
    """

    name = "prune_channels"
    numerics = Numerics.LOSSY
    options: ClassVar[Mapping[str, Option]] = {
        "ratio": Option(float, 0.3, "fraction of each group's channels to remove", interval="[0, 1)"),
        "macs": Option(float, None, "target MAC ratio of the whole model at the run's dims, distributed over groups "
                       "by sensitivity (measured on --calib, else importance); excludes ratio and scope",
                       interval="(0, 1]"),
        "sens_samples": Option(int, 64, "calibration samples used to measure each group's sensitivity (macs=)",
                               interval="[1, inf)"),
        "sensitivity": Option(str, "masked", "macs= with --calib: measure each group's error with its channels "
                              "zeroed (masked), or zeroed and their dense readers refitted by least squares (refit)",
                              choices=("masked", "refit")),
        "allocate": Option(str, "uniform", "ratio=: remove the same ratio of every group (uniform), or the ratio of "
                           "all prunable channels, spread over groups by sensitivity (measured on --calib, else "
                           "importance) and capped by max_group_ratio", choices=("uniform", "sensitivity")),
        "dry_run": Option(bool, False, "compute the per-group plan (stats 'plan') and change nothing"),
        "criterion": Option(str, "auto", "channel importance (auto: bn_scale where a BN follows, activation for transformer FFN neurons with calibration data, else l1; obs: the greedy order of least reader output error after an optimal refit, on --calib)",
                            choices=CRITERIA),
        "obs_features": Option(int, 4096, "criterion=obs: input features per reader (kernel positions subsampled, "
                               "seeded, above it)", interval="[1, inf)"),
        "obs_damp": Option(float, 0.01, "criterion=obs: relative dampening of each reader's Gram matrix "
                           "(lambda = obs_damp * mean diagonal)", interval="(0, inf)"),
        "scope": Option(str, "local", "local: same ratio per group; global: one ranking", choices=("local", "global")),
        "max_group_ratio": Option(float, 0.9, "never remove more than this fraction of a group", interval="(0, 1]"),
        "round_to": Option(int, 8, "kept channels a multiple of N (groups with >= N channels; smaller ones are left alone)",
                           interval="[1, inf)"),
        "exclude": Option(list, [], "node or tensor names whose groups are frozen"),
        "protect_io": Option(bool, True, "never change the channels of graph outputs"),
        "steps": Option(int, 1, "prune gradually in N rounds, re-scoring each round", interval="[1, inf)"),
        "refit_steps": Option(bool, False, "with steps=N and reconstruct: refit after every round, so the next "
                              "round scores and measures the refitted model (else one refit at the end)"),
        "reconstruct": Option(bool, True, "least-squares reconstruction of the next layers (needs --calib)"),
        "refit_holdout": Option(float, 0.2, "share of the sampled calibration rows held out of each refit to choose "
                                "its ridge and reject a refit that does not beat the pruned weights there (0: off, "
                                "a plain least-squares fit on every row)",
                                interval="[0, 1)"),
        "post_act": Option(bool, False, "refit a layer followed by ReLU/hard-swish only where the original's "
                           "activation is not flat (targets in the flat region just need to stay there)"),
        "se": Option(str, "refit", "layers reading a global pool (SE/attention scales): refit (least squares) or "
                     "stats (keep their weights, refit the bias to the original's output mean)",
                     choices=("refit", "stats")),
        "seed": Option(int, None, "tie-breaking seed (default: the pipeline's seed)"),
    }

    reads = (BN_GAMMA,)

    def __init__(self, **opts):
        self.given = frozenset(opts)
        super().__init__(**opts)

    def check_options(self) -> None:
        """``macs`` excludes ``ratio`` and ``scope`` (it sets every group's ratio itself);
        ``refit_steps`` needs ``steps >= 2`` and ``reconstruct``; ``obs_*`` need ``criterion=obs``.

        Raises:
            InputError: Both given, ``refit_steps`` without rounds to refit between, or ``obs_*``
                without ``criterion=obs``.
        """
        if self.opts["criterion"] != "obs" and {"obs_features", "obs_damp"} & self.given:
            raise InputError(f"pass {self.name}: obs_features/obs_damp apply to criterion=obs only")
        if self.opts["refit_steps"] and (self.opts["steps"] < 2 or not self.opts["reconstruct"]):
            raise InputError(f"pass {self.name}: refit_steps=true needs steps >= 2 and reconstruct=true")
        if self.opts["allocate"] == "sensitivity" and "scope" in self.given:
            raise InputError(f"pass {self.name}: allocate=sensitivity sets every group's ratio itself; "
                             "scope= applies to allocate=uniform only")
        if self.opts["macs"] is not None:
            both = sorted({"ratio", "scope", "allocate"} & self.given)
            if both:
                raise InputError(f"pass {self.name}: give ratio= (uniform) or macs= (a MAC budget), not both "
                                 f"(got macs and {both[0]})")

    def needs_calibration(self) -> bool:
        """``criterion=activation``/``obs`` score channels on calibration data."""
        return bool(self.opts["criterion"] in ("activation", "obs"))

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Analyse, score, select and remove channels ``steps`` times; then reconstruct if asked."""
        o = self.opts
        result = PassResult()
        merged = merge_reshapes(graph)
        if merged:
            result.stats["reshapes_merged"] = merged
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        check_names(graph, o["exclude"], owner=self.name, tensors=True)
        seed = ctx.seed if o["seed"] is None else o["seed"]
        if o["dry_run"]:
            return self._dry_run(graph, ctx, result, seed)
        original = serde.to_model(graph) if o["reconstruct"] and ctx.calib is not None else None
        result.stats["params_before"] = _param_count(graph)
        macs_before = _macs(graph, ctx) if o["macs"] is not None else None
        given = graph
        graph, pruned, layers = self._rounds(graph, ctx, result, seed, macs_before, original)
        result.stats["groups_pruned"] = len(pruned)
        result.stats["channels_after"] = result.stats["channels_before"] - result.stats.get("channels_removed", 0)
        result.stats["params_after"] = _param_count(graph)
        if macs_before:
            result.stats["macs_ratio"] = round(_macs(graph, ctx) / macs_before, 4)
            self._check_budget(result, ctx)
        result.modified = bool(pruned)
        result.graph = graph if graph is not given else None  # refit_steps: a refitted copy
        if pruned and o["reconstruct"]:
            refitted = self._reconstruct(original, graph, [p for p in layers.values() if p.in_changed], ctx,
                                         result, seed)
            if refitted is not None:
                result.graph = refitted
                result.stats["params_after"] = _param_count(refitted)
        return result

    def _rounds(self, graph: gs.Graph, ctx: PassContext, result: PassResult, seed: int, macs_before: int | None,
                original: onnx.ModelProto | None) -> tuple[gs.Graph, set[str], dict[str, PrunedLayer]]:
        """The ``steps`` rounds of analysis, scoring, selection and removal (with ``refit_steps``, a
        refit after every round but the last); the pruned graph, the groups pruned, the layers changed."""
        o = self.opts
        step_ratio = 1.0 - (1.0 - o["ratio"]) ** (1.0 / o["steps"])
        budget = Budget(step_ratio, o["scope"], o["max_group_ratio"], o["round_to"], seed)
        pruned: set[str] = set()
        layers: dict[str, PrunedLayer] = {}
        for step in range(o["steps"]):
            analysis = analyze(graph, protect_io=o["protect_io"], exclude=o["exclude"],
                               dims=ctx.dims.known() if ctx.dims is not None else None)
            if step == 0:
                self._report_groups(analysis, result, ctx)
            goal = None if macs_before is None else macs_before * o["macs"] ** ((step + 1) / o["steps"])
            removed = self._step(analysis, budget, ctx, result, first=step == 0, goal=goal)
            if removed is None:
                break
            pruned.update(analysis.groups[gi].name for gi, ch in removed[0].items() if len(ch))
            _merge_layers(layers, removed[1].layers)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            if o["refit_steps"] and o["reconstruct"] and step + 1 < o["steps"]:
                refitted = self._reconstruct(original, graph, [p for p in layers.values() if p.in_changed], ctx,
                                             result, seed)
                graph = graph if refitted is None else refitted
        return graph, pruned, layers

    def _dry_run(self, graph: gs.Graph, ctx: PassContext, result: PassResult, seed: int) -> PassResult:
        """The plan as one round (stats ``plan``: one row per prunable group); the graph is untouched."""
        o = self.opts
        analysis = analyze(graph, protect_io=o["protect_io"], exclude=o["exclude"],
                           dims=ctx.dims.known() if ctx.dims is not None else None)
        self._report_groups(analysis, result, ctx)
        budget = Budget(o["ratio"], o["scope"], o["max_group_ratio"], o["round_to"], seed)
        scores = self._score(analysis, ctx, budget)
        values = normalize(scores.values) if budget.scope == "global" else scores.values
        goal = None if o["macs"] is None else _macs(graph, ctx) * o["macs"]
        plan = self._budget_plan(analysis, values, budget, ctx, goal)
        self._plan_stats(plan, result)
        result.stats["dry_run"] = True
        result.modified = False
        return result

    def _budget_plan(self, analysis: Analysis, values: dict[int, np.ndarray], budget: Budget, ctx: PassContext,
                     goal: float | None) -> BudgetPlan:
        """Removals per group: the MAC ``goal`` met by sensitivity, or (``None``) ``budget``'s ratio: of
        every group (``allocate=uniform``) or of all the groups' channels, spread by sensitivity."""
        groups = eligible_groups(analysis, values, budget)
        steps = {g.index: levels(g, values[g.index], budget) for g in groups}
        metrics = model_metrics(serde.to_model(analysis.graph), ctx.dims)
        model = MacModel(analysis, {n.name: n.macs for n in metrics.per_node}, metrics.macs)
        spread = goal is None and self._spreads()
        if ctx.calib is not None and (goal is not None or spread):
            refit = self.opts["sensitivity"] == "refit"
            evaluate = (RefitMaskedError if refit else MaskedError)(analysis, ctx.calib, samples=self.opts["sens_samples"])
            errors = measured_errors(evaluate, groups, values, steps, budget, progress=ctx.progress)
            method = "measured_refit" if refit else "measured"
        else:
            errors = {g.index: importance_errors(g, values[g.index], steps[g.index], budget) for g in groups}
            method = "importance"
        if spread:
            counts = allocate(groups, steps, errors, ChannelModel(groups), 1.0 - budget.ratio, method).counts
            return plan_for_counts(groups, steps, errors, counts, model, None, method)
        if goal is None:
            counts = {gi: len(ch) for gi, ch in plan_removal(analysis, values, budget).remove.items()}
            return plan_for_counts(groups, steps, errors, counts, model, None, method)
        target = min(goal / model.total, 1.0) if model.total > 0 else 1.0
        return allocate(groups, steps, errors, model, target, method)

    def _spreads(self) -> bool:
        """``ratio`` is a budget of all the groups' channels spread by sensitivity (not ``macs``)."""
        return self.opts["macs"] is None and self.opts["allocate"] == "sensitivity"

    @staticmethod
    def _plan_stats(plan: BudgetPlan, result: PassResult) -> None:
        if plan.target is not None:
            result.stats["macs_target"] = round(plan.target, 4)
        result.stats["macs_predicted"] = round(plan.predicted, 4)
        result.stats["sensitivity"] = plan.method
        result.stats["predicted_error"] = round(plan.error, 6)
        result.stats["plan"] = plan.as_dicts()

    def _check_budget(self, result: PassResult, ctx: PassContext) -> None:
        """Warn when the achieved MAC ratio misses the target by more than :data:`MACS_TOLERANCE`."""
        target, got = self.opts["macs"], result.stats["macs_ratio"]
        result.stats["macs_target"] = target
        if abs(got - target) > MACS_TOLERANCE:
            ctx.logger.warning("prune_channels: MAC ratio %.3f, target %.3f (%s)", got, target,
                               "frozen or capped groups leave too little to prune" if got > target else
                               "the MAC model missed")

    def _step(self, analysis: Analysis, budget: Budget, ctx: PassContext, result: PassResult,
              first: bool, goal: float | None = None) -> tuple[dict[int, np.ndarray], ApplyReport] | None:
        """One round: score, select, apply. ``None`` when nothing is removed."""
        scores = self._score(analysis, ctx, budget)
        if first:
            result.stats["bn_scale_fallback_l1"] = len(scores.fallbacks)
            for name, n in sorted(scores.used.items()):
                result.stats[f"criterion_{name}"] = n
            _obs_stats(scores.obs, result, ctx)
        values = normalize(scores.values) if budget.scope == "global" else scores.values
        counts = None
        if goal is not None or self._spreads():
            bplan = self._budget_plan(analysis, values, budget, ctx, goal)
            self._plan_stats(bplan, result)
            counts = bplan.counts
        plan = plan_removal(analysis, values, budget, counts=counts)
        if first:
            result.stats["groups_skipped_small"] = len(plan.skipped_small)
            for name in plan.skipped_small:
                result.decline(name, R_SMALL, logger=ctx.logger)
        if plan.relaxed:
            result.count("groups_round_to_relaxed", len(plan.relaxed))
        if plan.total == 0:
            return None
        report = apply_pruning(analysis, plan.remove)
        result.count("channels_removed", report.removed)
        result.count("channels_restored", plan.restored)
        result.count("bias_compensated", report.compensated)
        result.count("bias_compensation_approx", report.approximate)
        result.count("channels_uncompensated", report.uncompensated)
        ctx.logger.debug("prune_channels: removed %d channels in %d groups", report.removed, len(plan.remove))
        return plan.remove, report

    def _score(self, analysis: Analysis, ctx: PassContext, budget: Budget) -> Scores:
        """Every prunable group's channel scores under ``criterion``."""
        o = self.opts
        counts = None  # a uniform local ratio fixes every group's count: the greedy stops there
        if o["criterion"] == "obs" and o["macs"] is None and not self._spreads() and budget.scope == "local":
            counts = {g.index: uniform_count(g, budget) for g in analysis.groups if g.frozen is None}
        obs = ObsOptions(max_features=o["obs_features"], damp=o["obs_damp"], limit=budget.max_group_ratio,
                         counts=counts, seed=budget.seed)
        return score_groups(analysis, o["criterion"], calib=ctx.calib, gammas=ctx.get(BN_GAMMA),
                            progress=ctx.progress, obs=obs)

    @staticmethod
    def _report_groups(analysis: Analysis, result: PassResult, ctx: PassContext) -> None:
        result.stats["groups_found"] = len(analysis.groups)
        result.stats["groups_frozen"] = 0
        result.stats["channels_before"] = sum(g.size for g in analysis.groups)
        for g in analysis.groups:
            if g.frozen is None:
                if not g.removable.all():
                    result.count("channels_pinned", int((~g.removable).sum()))
                continue
            result.count("groups_frozen")
            result.count(f"groups_frozen_{slug(g.frozen)}")
            result.decline(g.name, g.frozen, logger=ctx.logger)
            ctx.logger.debug("prune_channels: group %s frozen by %s", g.name, "; ".join(g.blockers))

    def _reconstruct(self, original: onnx.ModelProto | None, graph: gs.Graph, layers: list[PrunedLayer],
                     ctx: PassContext, result: PassResult, seed: int) -> gs.Graph | None:
        """Refit the consumers of removed channels against the unpruned model; the new graph or None."""
        if ctx.calib is None or original is None:
            result.decline("reconstruct", R_NO_CALIB, logger=ctx.logger)
            return None
        targets = []
        for layer in sorted(layers, key=lambda p: p.out):
            if layer.node.op not in SUPPORTED_OPS:
                result.decline(node_label(layer.node), R_RECONSTRUCT_OP, logger=ctx.logger)
                continue
            out_keep = layer.kept_out.tolist() if len(layer.kept_out) < layer.out_count else None
            target = LayerTarget.of(layer.node, graph, layer.out, out_keep)
            pooled = any(n.op in POOLS for n in layer.node.inputs[0].inputs) and self.opts["se"] == "stats"
            act = activation_after(layer.node.outputs[0]) if self.opts["post_act"] and target.target == layer.out else None
            targets.append(replace(target, bias_only=pooled, activation=act))
        if not targets:
            return None
        try:
            fixed, stats = reconstruct_layers(graph, original, targets, ctx.calib, seed=seed,
                                              progress=ctx.progress, holdout=self.opts["refit_holdout"])
        except InputError as exc:
            ctx.logger.debug("prune_channels: reconstruction failed: %s", exc)
            result.decline("reconstruct", R_RECONSTRUCT_FAILED, str(exc).splitlines()[0] if str(exc) else "",
                           logger=ctx.logger)
            return None
        _reconstruct_stats(stats, result)
        return fixed


def _obs_stats(report: ObsReport | None, result: PassResult, ctx: PassContext) -> None:
    """``criterion=obs``: groups scored with the default criterion (by reason), features and rows."""
    if report is None:
        return
    result.stats["obs_fallback"] = len(report.fallbacks)
    for name, reason in sorted(report.fallbacks.items()):
        result.count(f"obs_fallback_{reason}")
        ctx.logger.info("prune_channels: group %s scored with the default criterion (obs: %s)", name, reason)
    result.stats.update(obs_readers=report.readers, obs_features_max=report.features_max,
                        obs_readers_subsampled=report.subsampled, obs_rows_min=report.rows_min,
                        obs_passes=report.passes)


def activation_after(tensor: gs.Tensor) -> str | None:
    """``relu`` or ``hardswish`` when ``tensor`` is only read by that activation (``HardSwish``, or the
    ``x * Clip(x + 3, 0, 6) / 6`` of Paddle exports), else ``None``."""
    readers = list({id(n): n for n in tensor.outputs}.values())
    ops = sorted(n.op for n in readers)
    if ops in (["Relu"], ["HardSwish"]):
        return ops[0].lower()
    if ops != ["Add", "Mul"]:
        return None
    add = readers[0] if readers[0].op == "Add" else readers[1]
    three = [const_values(t) for t in add.inputs if t is not tensor]
    clips = add.outputs[0].outputs
    if len(three) != 1 or three[0] is None or not np.allclose(three[0], 3.0) or [n.op for n in clips] != ["Clip"]:
        return None
    low = const_values(clips[0].inputs[1]) if len(clips[0].inputs) > 1 else clips[0].attrs.get("min")
    return "hardswish" if low is not None and np.allclose(low, 0.0) else None


def _reconstruct_stats(stats: list[LayerStats], result: PassResult) -> None:
    result.stats.update(refit_summary(stats))
    result.stats["reconstruct_per_layer"] = [_layer_row(s) for s in stats]
    if any(s.ridge is not None for s in stats):  # refit_holdout: a ridge was chosen per layer
        result.stats["reconstruct_rejected"] = sum(1 for s in stats if s.rejected)


def _layer_row(s: LayerStats) -> dict[str, object]:
    """One row of ``reconstruct_per_layer`` (with ``refit_holdout``: the held-out errors, the ridge
    chosen and whether the refit was rejected)."""
    row: dict[str, object] = {"node": s.node, "op": s.op_type, "error_before": round(s.error_before, 6),
                              "error_after": round(s.error_after, 6), "rows": s.positions,
                              "features": s.kept_features // max(1, s.groups) + 1}
    if s.ridge is not None:
        row.update(holdout_before=round(s.holdout_before or 0.0, 6), holdout_after=round(s.holdout_after or 0.0, 6),
                   ridge=s.ridge, rejected=s.rejected)
    return row


def _merge_layers(layers: dict[str, PrunedLayer], new: list[PrunedLayer]) -> None:
    """Compose kept indices across steps (keyed by output name, which pruning never renames)."""
    for layer in new:
        old = layers.get(layer.out)
        if old is not None:
            layer.kept_in = old.kept_in[layer.kept_in]
            layer.kept_out = old.kept_out[layer.kept_out]
            layer.kind, layer.out_count = old.kind, old.out_count
            layer.in_changed = layer.in_changed or old.in_changed
        layers[layer.out] = layer
