"""Low-rank factorization (SVD, spatial SVD, Tucker-2, depthwise-separable).

* :mod:`.linalg` — the math on float64 arrays: truncated SVD, rank rules, whitening, HOSVD/HOOI,
  empirical VBMF, the spatial reshape, MAC accounting.
* :mod:`.factorize` — the graph side: candidate layers and their declines, rewriting a node
  into its factors.

The ``factorize_*`` passes drive them through their common base,
:class:`onnxcompress.passes._factorize.FactorizePass`.
"""

from __future__ import annotations

from onnxcompress.lowrank.linalg import RULES, GramAccumulator, RankRule

__all__ = ["RULES", "GramAccumulator", "RankRule"]
