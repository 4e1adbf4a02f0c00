"""Attention-head pruning: remove whole heads of every multi-head attention block."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.core import serde
from onnxcompress.core.attention import AttentionBlock, find_blocks
from onnxcompress.core.errors import InputError
from onnxcompress.core.pass_api import Numerics, Option, Pass, PassContext, PassResult, register
from onnxcompress.pruning.heads import block_problem, head_scores, prune_block, select_heads, weight_scores
from onnxcompress.reconstruct.refit import LayerTarget, reconstruct_layers, refit_summary

__all__ = ["R_NO_ATTENTION", "R_NO_CALIB", "PruneHeads"]

log = logging.getLogger(__name__)

R_NO_ATTENTION = "no_attention_block"
R_NO_CALIB = "reconstruction_needs_calibration"
R_RECONSTRUCT_FAILED = "reconstruction_failed"


@register
class PruneHeads(Pass):
    """Removes the least important attention heads of every multi-head attention block.

    Before: ``O(concat_h softmax(Q_h K_hᵀ/√dh) V_h)`` with ``H`` heads.
    After:  the same over the kept heads only: Q/K/V lose the output columns of the removed heads
    (weights and biases; onnxruntime's packed QKV weight in each of its three sections), ``O``
    loses their input rows, and every literal that counts heads is rewritten in a copy (``H`` in
    the head-splitting Reshape targets, literal or inside a computed ``Concat``; ``H·dh`` in the
    merging ones; ``num_heads``, ``qkv_hidden_sizes``, ``q_num_heads``/``kv_num_heads``).

    Math:
        Blocks come from :func:`onnxcompress.core.attention.find_blocks` (decomposed, Gemm-based,
        ``com.microsoft.Attention``, opset-23 ``Attention``). Without reconstruction the pruned
        model equals the original with the removed heads' rows of ``O`` zeroed. A head's score
        (``criterion=auto`` with calibration data, ``contribution``) is the L2 norm over the
        calibration tokens of its term ``C_h·W_O[h]`` in the block output (context times its rows of
        ``O``: exactly what removing it takes away); without data (``weight``) ``‖W_V[h]‖·‖W_O[h]‖``.
        ``scope=local`` removes ``round(ratio·H)`` heads of every block; ``global`` ranks all heads
        by score divided by their block's mean. ``min_heads`` are always kept per block. With
        ``reconstruct`` and calibration data, each pruned ``O`` is refitted by least squares to the
        original model's output of the same node (:func:`onnxcompress.reconstruct.refit.reconstruct_layers`,
        layer by layer on the already-refitted student).

    Declines:
        ``no_attention_block`` (nothing found); per block: the recognition's reasons
        (``no_qk_matmul_before_softmax``, ``projection_not_found``, ``head_shape_mismatch``,
        ``dynamic_head_count``, ``grouped_query_attention``, ``past_key_value_inputs``, ...), and
        ``shared_weight``, ``non_constant_weight``, ``graph_output_inside_block``,
        ``head_tensor_read_outside_block`` (anything but a batch/seq ``Shape`` reads a head tensor),
        ``shared_shape_subgraph``, ``per_head_attention_bias``;
        ``reconstruction_needs_calibration`` / ``reconstruction_failed``.

    Stats:
        ``blocks_found``, ``blocks_pruned``, ``heads_before``, ``heads_after``, ``heads_removed``,
        ``criterion_<name>``, ``reconstructed_layers``, ``reconstruct_error_before``/``_after``.
    """

    name = "prune_heads"
    numerics = Numerics.LOSSY
    options: ClassVar[Mapping[str, Option]] = {
        "ratio": Option(float, 0.25, "fraction of each block's heads to remove", interval="[0, 1)"),
        "scope": Option(str, "local", "local: same ratio per block; global: one ranking", choices=("local", "global")),
        "min_heads": Option(int, 1, "heads always kept per block", interval="[1, inf)"),
        "criterion": Option(str, "auto", "head importance (auto: contribution with --calib, else weight)",
                            choices=("auto", "contribution", "weight")),
        "reconstruct": Option(bool, True, "least-squares refit of each pruned output projection (needs --calib)"),
    }

    def needs_calibration(self) -> bool:
        """``criterion=contribution`` scores heads on calibration data."""
        return bool(self.opts["criterion"] == "contribution")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        """Find the blocks, score and select heads, rewrite, then refit ``O`` if asked."""
        result = PassResult()
        found = find_blocks(graph)
        for u in found.unrecognised:
            result.decline(u.node, u.reason, logger=ctx.logger)
        blocks = self._prunable(graph, found.attention, result, ctx)
        result.stats["blocks_found"] = len(found.attention)
        result.stats["heads_before"] = sum(b.heads for b in found.attention)
        if not found.attention and not found.unrecognised:
            result.decline("graph", R_NO_ATTENTION, logger=ctx.logger)
        original = serde.to_model(graph) if blocks else None
        keep = select_heads(self._scores(original, blocks, ctx, result), self.opts["ratio"], self.opts["scope"],
                            self.opts["min_heads"]) if blocks else {}
        pruned = [b for b in blocks if len(keep[b.name]) < b.heads]
        for b in pruned:
            prune_block(graph, b, keep[b.name])
        removed = sum(b.heads - len(keep[b.name]) for b in pruned)
        result.stats.update(blocks_pruned=len(pruned), heads_removed=removed,
                            heads_after=result.stats["heads_before"] - removed)
        result.modified = bool(pruned)
        if pruned:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if pruned and self.opts["reconstruct"] and original is not None:
            result.graph = self._reconstruct(original, graph, pruned, ctx, result)
        return result

    @staticmethod
    def _prunable(graph: gs.Graph, blocks: list[AttentionBlock], result: PassResult,
                  ctx: PassContext) -> list[AttentionBlock]:
        out = []
        for b in blocks:
            problem = block_problem(graph, b)
            if problem is None:
                out.append(b)
            else:
                result.decline(b.name, problem, logger=ctx.logger)
        return out

    def _scores(self, model: onnx.ModelProto | None, blocks: list[AttentionBlock], ctx: PassContext,
                result: PassResult) -> dict[str, np.ndarray]:
        criterion = self.opts["criterion"]
        if criterion == "auto":
            criterion = "contribution" if ctx.calib is not None else "weight"
        result.stats[f"criterion_{criterion}"] = len(blocks)
        if criterion == "weight" or model is None:
            return {b.name: weight_scores(b) for b in blocks}
        return head_scores(model, blocks, ctx.calib, progress=ctx.progress)

    @staticmethod
    def _reconstruct(original: onnx.ModelProto, graph: gs.Graph, blocks: list[AttentionBlock], ctx: PassContext,
                     result: PassResult) -> gs.Graph | None:
        if ctx.calib is None:
            result.decline("reconstruct", R_NO_CALIB, logger=ctx.logger)
            return None
        targets = [LayerTarget.of(b.o.node, graph) for b in blocks if b.o is not None]
        try:
            fixed, stats = reconstruct_layers(graph, original, targets, ctx.calib, seed=ctx.seed, progress=ctx.progress)
        except InputError as exc:
            result.decline("reconstruct", R_RECONSTRUCT_FAILED, str(exc).splitlines()[0] if str(exc) else "",
                           logger=ctx.logger)
            return None
        result.stats.update(refit_summary(stats))
        return fixed
