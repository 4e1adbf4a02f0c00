"""k-means weight sharing: one codebook of ``2^bits`` values per layer, each weight an index.

1-D weighted k-means (Lloyd) on the layer's values: the values are sorted once, so each
iteration assigns by the midpoints between neighbouring centroids (a binary search) and
recomputes the centroids from prefix sums — ``O(k log n)`` per iteration after the sort.
Initialisation is deterministic: the centroids start at the (weighted) quantiles
``(i + 0.5) / k`` of a seeded sample of the values. Weights per value (e.g. the input
Hessian's diagonal ``H_kk`` for every weight of row ``k``) make the codebook minimise the
output error's diagonal approximation instead of the plain weight error.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SAMPLE", "kmeans_codebook"]

#: Values sampled for the initial quantiles.
SAMPLE = 1 << 18


def _init(values: np.ndarray, weights: np.ndarray, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.choice(values.size, SAMPLE, replace=False) if values.size > SAMPLE else np.arange(values.size)
    v, wt = values[idx], weights[idx]
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(wt[order])
    targets = (np.arange(k) + 0.5) / k * cum[-1]
    return v[np.minimum(np.searchsorted(cum, targets), v.size - 1)].astype(np.float64)


def kmeans_codebook(w: np.ndarray, bits: int, *, weights: np.ndarray | None = None, seed: int = 0,
                    iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """``(codebook [2^bits] float32 ascending, indices uint8 like w)`` minimising
    ``Σ weight·(w − codebook[index])²``."""
    k = 1 << bits
    values = np.asarray(w, np.float64).reshape(-1)
    wts = np.ones_like(values) if weights is None else np.broadcast_to(weights, w.shape).reshape(-1).astype(np.float64)
    wts = np.maximum(wts, 0) + 1e-12
    order = np.argsort(values, kind="stable")
    sv, sw = values[order], wts[order]
    cw = np.concatenate([[0.0], np.cumsum(sw)])
    cwv = np.concatenate([[0.0], np.cumsum(sw * sv)])
    cent = np.unique(_init(values, wts, k, seed))
    for _ in range(iters):
        cuts = np.concatenate([[0], np.searchsorted(sv, (cent[1:] + cent[:-1]) / 2), [sv.size]])
        mass = cw[cuts[1:]] - cw[cuts[:-1]]
        new = np.where(mass > 0, (cwv[cuts[1:]] - cwv[cuts[:-1]]) / np.where(mass > 0, mass, 1), cent)
        if np.allclose(new, cent, rtol=0, atol=1e-12):
            break
        cent = np.sort(new)
    if cent.size < k:  # fewer distinct values than centroids: pad above the largest
        cent = np.concatenate([cent, cent[-1] + np.arange(1, k - cent.size + 1)])
    idx = np.clip(np.searchsorted((cent[1:] + cent[:-1]) / 2, values), 0, k - 1)
    return cent.astype(np.float32), idx.reshape(np.shape(w)).astype(np.uint8)
