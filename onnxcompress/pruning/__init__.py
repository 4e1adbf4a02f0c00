"""Structured channel pruning on ONNX graphs (Torch-Pruning's dependency groups, graph-level).

Modules:
    * :mod:`.types`: shared types (slots, :class:`~.types.NodeSpec`, :class:`~.types.ParamRef`, reasons).
    * :mod:`.handlers`: the op-type table -- how channel indices flow through each operator.
    * :mod:`.dependency`: :func:`analyze` builds coupled channels and :class:`Group` objects.
    * :mod:`.flow`: the same table read node by node, for walkers that follow one producer's
      channels (the ``equalize`` pass).
    * :mod:`.importance`: channel scores per group (``l1``, ``l2``, ``bn_scale``, ``activation``).
    * :mod:`.select`: which channels go (ratio, scope, ``max_group_ratio``, ``round_to``).
    * :mod:`.budget`: a MAC budget distributed over groups (the MAC model, greedy allocation).
    * :mod:`.sensitivity`: each group's predicted output error per removal count (measured on
      calibration data, or from importance).
    * :mod:`.apply`: rewrite the graph without them (with bias compensation), or zero them
      (``mask_channels``: the zeroed original; ``mask_inputs``: the exact reference without
      compensation).
    * :mod:`.prepare`: exact rewrites before the analysis (``Reshape`` chains merged).

The ``prune_channels`` pass (:mod:`onnxcompress.passes.prune_channels`) drives them. Every tensor's
channel axis is axis 1 (``[N, C, ...]`` and ``[N, C]``).
"""

from __future__ import annotations

from onnxcompress.pruning.apply import ApplyReport, PrunedLayer, apply_pruning, mask_channels, mask_inputs
from onnxcompress.pruning.dependency import Analysis, Group, analyze
from onnxcompress.pruning.handlers import HANDLERS
from onnxcompress.pruning.importance import CRITERIA, score_groups
from onnxcompress.pruning.prepare import merge_reshapes
from onnxcompress.pruning.select import Budget, Plan, plan_removal
from onnxcompress.pruning.types import FREEZE_REASONS

__all__ = [
    "CRITERIA",
    "FREEZE_REASONS",
    "HANDLERS",
    "Analysis",
    "ApplyReport",
    "Budget",
    "Group",
    "Plan",
    "PrunedLayer",
    "analyze",
    "apply_pruning",
    "mask_channels",
    "mask_inputs",
    "merge_reshapes",
    "plan_removal",
    "score_groups",
]
