"""Least-squares recovery, shared by pruning and factorization: "shrink first, then win the
accuracy back" with the original model as the teacher.

* :mod:`.lstsq` — streaming ridge least squares (XᵀX and XᵀY batch by batch, grouped problems).
* :mod:`.layerview` — a Conv/Gemm/MatMul node as a least-squares problem (im2col at sampled
  output positions, weights ↔ matrices).
* :mod:`.refit` — :func:`reconstruct_layers`, the refit of a student model against the teacher on
  calibration data, depth by depth (one pass over the data per depth, each running only the part
  of the two networks it needs); :func:`refit_summary` for pass statistics.
"""

from __future__ import annotations

from onnxcompress.reconstruct.refit import LayerStats, LayerTarget, reconstruct_layers, refit_summary

__all__ = ["LayerStats", "LayerTarget", "reconstruct_layers", "refit_summary"]
