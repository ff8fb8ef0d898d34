"""The rank-1 power path (math/power_top.py): certified against numpy's float64 SVD on planted
spectra, honest bounds when forced to stop early, and the block path wherever it cannot certify."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rank1tools.math.power_top import PowerTop, power_top1
from rank1tools.math.spectrum import frobenius
from rank1tools.math.svd import ROUNDING_REL, SAFETY, SIGMA_REL_TOL, SIN_TOL, TAIL_REL_TOL, topk_svd


def _planted(m: int, n: int, sigmas: list[float], noise: float, seed: int) -> torch.Tensor:
    """sum_i sigmas[i] u_i v_i^T plus dense Gaussian noise of Frobenius norm `noise` (float32)."""
    g = np.random.default_rng(seed)
    U = np.linalg.qr(g.standard_normal((m, len(sigmas))))[0]
    V = np.linalg.qr(g.standard_normal((n, len(sigmas))))[0]
    M = (U * sigmas) @ V.T
    E = g.standard_normal((m, n))
    return torch.from_numpy(M + noise * E / np.linalg.norm(E)).float()


def _nearby(v: np.ndarray, angle: float, seed: int) -> torch.Tensor:
    """A unit vector at `angle` radians from v (the previous checkpoint's vector of a drifting run)."""
    w = np.random.default_rng(seed).standard_normal(v.shape)
    w -= (w @ v) * v
    return torch.from_numpy(math.cos(angle) * v + math.sin(angle) * w / np.linalg.norm(w)).float()


SPECTRA = {  # m, n, sigma_1.., noise: RL-like updates whose top direction holds most of the energy
    "separated": (300, 200, [1.0, 0.1, 0.05], 0.05),
    "noise tail": (200, 320, [1.0], 0.4),
    "clustered tail": (256, 256, [1.0, 0.3, 0.3, 0.29, 0.29], 0.1),
    "wide": (64, 500, [2e-3, 1e-4], 3e-4),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("side", ["v", "u"])
def test_certified_top_triplet_matches_float64(name, side):
    m, n, sigmas, noise = SPECTRA[name]
    M = _planted(m, n, sigmas, noise, seed=len(name))
    U, S, Vt = np.linalg.svd(M.double().numpy(), full_matrices=False)
    start = _nearby(U[:, 0] if side == "u" else Vt[0], 0.1, seed=3)
    p = power_top1(M, start, frobenius(M), transpose=side == "u")
    assert p.passed and p.steps % 2 == 0 and 2 <= p.steps <= 8
    assert abs(p.sigma - S[0]) <= p.bound  # the recorded bound holds
    assert p.bound <= 1.01 * SIGMA_REL_TOL * S[0]
    assert abs(p.u.double().numpy() @ U[:, 0]) >= 0.9999
    assert abs(p.v.double().numpy() @ Vt[0]) >= 0.9999
    # the exact relation of the side it ended on, and the residual of the other
    Md = M.double()
    u, v = p.u.double(), p.v.double()
    rho = (Md.T @ u - p.sigma * v).norm() if side == "v" else (Md @ v - p.sigma * u).norm()
    assert float(rho) / p.sigma == pytest.approx(p.residual, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_a_forced_early_stop_records_an_honest_bound(name):
    """With bars loose enough to pass after one step, the bound recorded still covers the true error."""
    m, n, sigmas, noise = SPECTRA[name]
    M = _planted(m, n, sigmas, noise, seed=7)
    U, S, Vt = np.linalg.svd(M.double().numpy(), full_matrices=False)
    p = power_top1(M, _nearby(Vt[0], 0.3, seed=5), frobenius(M), transpose=False, sigma_tol=10.0, sin_tol=100.0)
    assert p.passed and p.steps == 2
    # the residual bound itself, before the SAFETY margin and the rounding allowance, covers the error
    assert (p.bound - ROUNDING_REL * p.sigma) / SAFETY >= abs(p.sigma - S[0]) > 1e-4 * S[0]
    assert p.sigma <= S[0] * (1 + 1e-6)  # a Rayleigh value never exceeds sigma_1 (float32 rounding aside)


def test_no_gap_no_certificate():
    """A top direction holding less than half the energy: no rigorous gap, so no pass (2 steps spent)."""
    M = _planted(200, 150, [1.0, 0.95, 0.9], 0.2, seed=1)
    _, S, Vt = np.linalg.svd(M.double().numpy(), full_matrices=False)
    assert S[0] ** 2 < 0.5 * float((S**2).sum())
    p = power_top1(M, _nearby(Vt[0], 0.01, seed=2), frobenius(M), transpose=False)
    assert p == PowerTop(False, 2)


def test_a_start_far_off_gives_up_after_four_iterations():
    # sigma_2 = 0.68 sigma_1: a gap from the first step, but a slow convergence from half a radian
    M = _planted(300, 200, [1.0, 0.68], 0.05, seed=4)
    _, _, Vt = np.linalg.svd(M.double().numpy(), full_matrices=False)
    p = power_top1(M, _nearby(Vt[0], 0.5, seed=6), frobenius(M), transpose=False)
    assert not p.passed and p.steps == 8
    assert power_top1(M, _nearby(Vt[0], 0.5, seed=6), frobenius(M), transpose=False, max_iterations=40).passed


def test_topk_svd_uses_it_only_at_rank_1_from_a_warm_start_under_the_loose_tail():
    M = _planted(300, 200, [1.0, 0.1], 0.05, seed=9)
    U, S, Vt = np.linalg.svd(M.double().numpy(), full_matrices=False)
    start = (_nearby(U[:, 0], 0.05, 1)[:, None], _nearby(Vt[0], 0.05, 2)[:, None])
    r = topk_svd(M, 1, start=start, adaptive=True, tail_tol=TAIL_REL_TOL)
    assert r.method == "power" and r.U.shape == (300, 1) and r.V.shape == (200, 1) and r.S.shape == (1,)
    assert abs(float(r.S[0]) - S[0]) <= r.bounds[0]
    assert abs(float(r.U[:, 0].double() @ torch.from_numpy(U[:, 0]))) >= math.cos(math.asin(SIN_TOL))
    # sigma_1's tolerance: the schedule before issue #25, bit for bit (no power path)
    assert topk_svd(M, 1, start=start, adaptive=True, tail_tol=SIGMA_REL_TOL).method == "randomized"
    assert topk_svd(M, 1, adaptive=True, tail_tol=TAIL_REL_TOL).method == "randomized"  # no warm start
    assert topk_svd(M, 2, start=start, adaptive=True, tail_tol=TAIL_REL_TOL).method == "randomized"
    # rescaled matrices (outside the safe range) pass the scaled norm along: the same triplet
    big = topk_svd(M * 2.0**60, 1, start=start, adaptive=True, tail_tol=TAIL_REL_TOL)
    assert big.method == "power" and float(big.S[0]) == pytest.approx(float(r.S[0]) * 2.0**60, rel=1e-6)


def test_topk_svd_falls_back_to_the_block_path_and_counts_both():
    M = _planted(200, 150, [1.0, 0.95, 0.9], 0.2, seed=1)
    _, S, Vt = np.linalg.svd(M.double().numpy(), full_matrices=False)
    start = (torch.zeros(200, 1), _nearby(Vt[0], 0.01, 2)[:, None])
    r = topk_svd(M, 1, start=start, adaptive=True, tail_tol=TAIL_REL_TOL)
    plain = topk_svd(M, 1, start=start, adaptive=True, tail_tol=SIGMA_REL_TOL)
    assert r.method == plain.method == "randomized"
    assert r.iterations == plain.iterations + 2 and torch.equal(r.S, plain.S)
    assert abs(float(r.S[0]) - S[0]) <= r.bounds[0]
