"""Tests of the low-rank math: rank rules, SVD factors, whitening, Gram statistics, Tucker, VBMF, MACs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcompress.core.errors import InputError
from onnxcompress.lowrank.linalg import (
    DEFAULT_ENERGY,
    GramAccumulator,
    RankRule,
    conv_macs,
    dwsep_macs,
    energy_rank,
    evbmf,
    hooi,
    hosvd,
    lowrank_factors,
    mode_dot,
    psd_sqrt,
    relative_error,
    round_rank,
    spatial_kernels,
    spatial_matrix,
    spatial_svd_macs,
    svd,
    svd_macs,
    truncated_svd,
    tucker2_macs,
    tucker_to_tensor,
    unfold,
    vbmf_rank,
)

# ---------------------------------------------------------------- rank rules


def test_rule_defaults_and_conflicts() -> None:
    rule = RankRule.from_options({"round_to": 8})
    assert (rule.kind, rule.value, rule.round_to) == ("energy", DEFAULT_ENERGY, 8)
    assert RankRule.from_options({"rank": 5, "vbmf": False}).kind == "rank"
    assert RankRule.from_options({"vbmf": True}).describe() == "vbmf"
    with pytest.raises(InputError, match="rank, energy conflict"):
        RankRule.from_options({"rank": 4, "energy": 0.9})
    with pytest.raises(InputError, match="conflict"):
        RankRule.from_options({"rank_ratio": 0.5, "vbmf": True})
    for bad in ({"energy": 1.5}, {"rank_ratio": 0.0}, {"rank": 0}, {"round_to": 0}):
        with pytest.raises(InputError):
            RankRule.from_options(bad)


def test_rules_pick_ranks() -> None:
    s = np.array([4.0, 2.0, 1.0, 1.0, 0.5, 0.1])  # energies 16, 4, 1, 1, .25, .01 of 22.26
    shape = (6, 10)
    assert RankRule("energy", 0.7, 1).select(s, shape) == 1
    assert RankRule("energy", 0.85, 1).select(s, shape) == 2
    assert RankRule("energy", 0.9, 1).select(s, shape) == 3  # 20 / 22.26 = 0.898 is not enough
    assert RankRule("energy", 0.99, 1).select(s, shape) == 5
    assert RankRule("energy", 1.0, 1).select(s, shape) == 6
    assert RankRule("rank", 3, 1).select(s, shape) == 3
    assert RankRule("rank", 30, 1).select(s, shape) == 6  # capped at full rank
    assert RankRule("rank_ratio", 0.5, 1).select(s, shape) == 3
    assert RankRule("rank_ratio", 0.4, 1).select(s, shape) == 3  # 2.4 rounds up
    assert RankRule("rank", 3, 4).select(s, shape) == 4  # rounded up to a multiple of 4
    assert RankRule("rank", 5, 4).select(s, shape) == 6  # 8, capped at 6
    assert energy_rank(np.zeros(3), 0.9) == 1


@given(st.integers(1, 200), st.integers(1, 16), st.integers(1, 300))
@settings(max_examples=60, deadline=None)
def test_round_rank_properties(rank: int, multiple: int, full: int) -> None:
    r = round_rank(rank, multiple, full)
    assert 1 <= r <= full
    assert r == full or (r % multiple == 0 and r >= rank)


def test_joint_rank_for_several_matrices() -> None:
    spectra = [np.array([3.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0])]  # energies 9+1, 1+1+1 of 13
    assert RankRule("energy", 0.76, 1).raw_joint(spectra, (3, 4), 3) == 1  # 10/13 = .769
    assert RankRule("energy", 0.9, 1).raw_joint(spectra, (3, 4), 3) == 2  # 12/13
    assert RankRule("rank_ratio", 0.5, 1).raw_joint(spectra, (3, 4), 3) == 2
    assert RankRule("rank", 2, 1).raw_joint(spectra, (3, 4), 3) == 2


# ---------------------------------------------------------------- SVD and whitening


def test_svd_signs_deterministic_and_exact_at_full_rank() -> None:
    m = np.random.default_rng(0).standard_normal((7, 5))
    u, s, vt = svd(m)
    np.testing.assert_allclose((u * s) @ vt, m, atol=1e-12)
    assert np.all(u[np.argmax(np.abs(u), axis=0), np.arange(5)] > 0)
    a, b = truncated_svd(m, 5)
    np.testing.assert_allclose(a @ b, m, atol=1e-12)
    a, b = truncated_svd(m, 7)  # above the full rank: zero-padded
    assert a.shape == (7, 7) and b.shape == (7, 5)
    np.testing.assert_allclose(a @ b, m, atol=1e-12)


def test_error_falls_monotonically_with_rank() -> None:
    m = np.random.default_rng(1).standard_normal((12, 9))
    errors = [relative_error(m, np.matmul(*truncated_svd(m, r))) for r in range(1, 10)]
    assert all(x > y for x, y in itertools.pairwise(errors))
    assert errors[-1] < 1e-12
    s = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(errors[2], np.sqrt(np.sum(s[3:] ** 2) / np.sum(s ** 2)))  # Eckart-Young


def test_psd_sqrt() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6))
    sigma = x.T @ x / 50
    root, inv = psd_sqrt(sigma, damp=0.0)
    np.testing.assert_allclose(root @ root, sigma, atol=1e-10)
    np.testing.assert_allclose(root @ inv, np.eye(6), atol=1e-8)
    root, _ = psd_sqrt(sigma, damp=0.5)
    np.testing.assert_allclose(root @ root, sigma + 0.5 * np.trace(sigma) / 6 * np.eye(6), atol=1e-10)
    root, inv = psd_sqrt(np.zeros((3, 3)))
    np.testing.assert_allclose(root, np.eye(3))
    np.testing.assert_allclose(inv, np.eye(3))


def correlated(rng: np.random.Generator, n: int, mix: np.ndarray) -> np.ndarray:
    return rng.standard_normal((n, mix.shape[0])) @ mix


def test_whitened_factors_beat_plain_on_held_out_data() -> None:
    rng = np.random.default_rng(3)
    k, n, r = 24, 20, 4
    mix = rng.standard_normal((k, k)) * np.geomspace(5.0, 0.02, k)[:, None]  # anisotropic, correlated
    train, test = correlated(rng, 2000, mix), correlated(rng, 2000, mix)
    w = rng.standard_normal((k, n))
    sigma = train.T @ train / len(train)
    a_p, b_p, _ = lowrank_factors(w, r)
    a_w, b_w, _ = lowrank_factors(w, r, sigma=sigma, damp=1e-3)
    plain = np.linalg.norm(test @ (w - a_p @ b_p)) / np.linalg.norm(test @ w)
    whitened = np.linalg.norm(test @ (w - a_w @ b_w)) / np.linalg.norm(test @ w)
    assert whitened < 0.6 * plain
    assert relative_error(w, a_w @ b_w) > relative_error(w, a_p @ b_p)  # worse in weight space
    a_f, b_f, _ = lowrank_factors(w, k, sigma=sigma)
    np.testing.assert_allclose(a_f @ b_f, w, atol=1e-9)  # full rank stays exact


def test_gram_kinds_agree_with_the_full_gram() -> None:
    rng = np.random.default_rng(4)
    c, kh, kw = 3, 2, 3
    x = rng.standard_normal((40, c * kh * kw))
    grams = {}
    for kind in GramAccumulator.KINDS:
        acc = GramAccumulator(kind, c, (kh, kw))
        acc.add(x[:15])
        acc.add(x[15:])
        grams[kind] = acc.result()
    full = grams["full"].reshape(c, kh, kw, c, kh, kw)
    np.testing.assert_allclose(grams["full"], x.T @ x / 40)
    np.testing.assert_allclose(grams["channel"], np.einsum("ahwbhw->ab", full) / (kh * kw))
    np.testing.assert_allclose(grams["vertical"], np.einsum("ahwbgw->ahbg", full).reshape(c * kh, c * kh) / kw)
    blocks = np.stack([full[i, :, :, i].reshape(kh * kw, kh * kw) for i in range(c)])
    np.testing.assert_allclose(grams["blocks"], blocks)
    assert GramAccumulator("full", 2).result() is None


# ---------------------------------------------------------------- reshapes and MACs


def test_spatial_reshape_composes_to_the_kernel() -> None:
    w = np.random.default_rng(5).standard_normal((4, 3, 3, 2))
    m = spatial_matrix(w)
    assert m.shape == (3 * 3, 4 * 2)
    a, b = truncated_svd(m, min(m.shape))
    v, h = spatial_kernels(a, b, w.shape)
    assert v.shape == (8, 3, 3, 1) and h.shape == (4, 8, 1, 2)
    composed = np.einsum("kih,okw->oihw", v[..., 0], h[:, :, 0, :])  # H ∘ V as one kernel
    np.testing.assert_allclose(composed, w, atol=1e-12)


def test_mac_accounting() -> None:
    assert conv_macs(16, 32, (3, 3), 100) == 100 * 32 * 16 * 9
    assert conv_macs(16, 16, (3, 3), 10, group=16) == 10 * 16 * 9
    assert svd_macs(64, 32, 8, rows=2) == (2 * 64 * 32, 2 * 8 * 96)
    assert spatial_svd_macs(16, 32, (3, 3), 8, 20, 10) == (10 * 32 * 16 * 9, 20 * 8 * 16 * 3 + 10 * 32 * 8 * 3)
    assert tucker2_macs(16, 32, (3, 3), 4, 8, 40, 10) == (10 * 32 * 16 * 9, 40 * 4 * 16 + 10 * 8 * 4 * 9 + 10 * 32 * 8)
    assert dwsep_macs(16, 32, (3, 3), 2, 10) == (10 * 32 * 16 * 9, 10 * 32 * 9 + 10 * 32 * 32)


# ---------------------------------------------------------------- Tucker


def test_unfold_and_mode_dot() -> None:
    t = np.arange(24.0).reshape(2, 3, 4)
    assert unfold(t, 1).shape == (3, 8)
    np.testing.assert_array_equal(unfold(t, 1)[:, 0], t[0, :, 0])
    m = np.random.default_rng(6).standard_normal((5, 3))
    np.testing.assert_allclose(mode_dot(t, m, 1), np.einsum("ji,aib->ajb", m, t))


def test_hooi_beats_hosvd_and_is_exact_at_full_rank() -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((12, 10, 3, 3))
    modes, ranks = (0, 1), (4, 3)
    factors, spectra = hosvd(w, modes, ranks)
    assert [f.shape for f in factors] == [(12, 4), (10, 3)] and len(spectra[0]) == 12
    hosvd_core = w
    for mode, u in zip(modes, factors):
        hosvd_core = mode_dot(hosvd_core, u.T, mode)
    hosvd_err = relative_error(w, tucker_to_tensor(hosvd_core, factors, modes))
    core, hooi_factors = hooi(w, modes, ranks, iters=10)
    hooi_err = relative_error(w, tucker_to_tensor(core, hooi_factors, modes))
    assert hooi_err <= hosvd_err + 1e-12 and hooi_err < hosvd_err - 1e-4
    for u in hooi_factors:
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-10)
    full_core, full = hooi(w, modes, (12, 10), iters=2)
    np.testing.assert_allclose(tucker_to_tensor(full_core, full, modes), w, atol=1e-10)


def test_hooi_error_never_increases_with_more_sweeps() -> None:
    w = np.random.default_rng(8).standard_normal((9, 8, 2, 2))
    errors = []
    for iters in range(5):
        core, factors = hooi(w, (0, 1), (3, 3), iters=iters, tol=0.0)
        errors.append(relative_error(w, tucker_to_tensor(core, factors, (0, 1))))
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors))


# ---------------------------------------------------------------- VBMF


def low_rank_plus_noise(rng: np.random.Generator, shape: tuple[int, int], rank: int, noise: float) -> np.ndarray:
    l, m = shape
    u = np.linalg.qr(rng.standard_normal((l, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((m, rank)))[0]
    strength = noise * (np.sqrt(l) + np.sqrt(m)) * np.linspace(2.0, 6.0, rank)  # above the noise edge
    return (u * strength) @ v.T + noise * rng.standard_normal(shape)


@pytest.mark.parametrize("shape,rank,noise", [((60, 100), 5, 0.1), ((100, 60), 8, 0.5), ((40, 40), 3, 1.0),
                                              ((32, 288), 6, 0.05)])
def test_vbmf_recovers_the_true_rank(shape: tuple[int, int], rank: int, noise: float) -> None:
    rng = np.random.default_rng(9)
    s = np.linalg.svd(low_rank_plus_noise(rng, shape, rank, noise), compute_uv=False)
    est, sigma2, threshold = evbmf(s, shape)
    assert est == rank
    assert abs(sigma2 / noise ** 2 - 1) < 0.1
    assert s[rank - 1] > threshold > s[rank]
    assert vbmf_rank(s, shape) == rank
    assert RankRule("vbmf", 1.0, 8).select(s, shape) == 8  # rounded up like any rule


def test_vbmf_on_pure_noise_keeps_little() -> None:
    s = np.linalg.svd(np.random.default_rng(10).standard_normal((50, 80)), compute_uv=False)
    assert vbmf_rank(s, (50, 80)) == 1  # estimate 0, at least 1 kept
    assert evbmf(np.zeros(4), (4, 6))[0] == 0


def test_refit_holdout_merge_equals_one_accumulator() -> None:
    """Rows split into fit / held-out accumulators and merged back solve exactly like all rows at once."""
    from onnxcompress.reconstruct.lstsq import LstsqAccumulator
    from onnxcompress.reconstruct.refit import _merged

    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((2, 50, 6)) + 3.0, rng.standard_normal((2, 50, 4)) - 1.0
    whole, fit, hold = (LstsqAccumulator(6, 4, True, groups=2) for _ in range(3))
    whole.add(X, Y)
    fit.add(X[:, :30], Y[:, :30])
    hold.add(X[:, 30:], Y[:, 30:])
    merged = _merged(fit, hold)
    for g in range(2):
        w1, b1 = whole.solve(1e-3, group=g)
        w2, b2 = merged.solve(1e-3, group=g)
        np.testing.assert_allclose(w2, w1, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(b2, b1, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(merged.residual_norms(w1, b1, group=g), whole.residual_norms(w1, b1, group=g),
                                   rtol=1e-9)
