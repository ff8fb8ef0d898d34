"""Update deltas and the matrix-spectrum figures of docs/concepts.md#matrix-spectrum-decompose."""

from __future__ import annotations

import math

import torch


def delta(checkpoint: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Delta W = theta_t - theta_0 in float32 from the upcast values (never in bf16/fp16)."""
    return checkpoint.to(torch.float32) - base.to(torch.float32)


FRO_CHUNK = 1 << 20  # elements per float64 chunk: the float64 copy stays small
FRO_BLOCK = 1024  # float32 tensors: elements per float32 partial sum (see frobenius)


def frobenius(x: torch.Tensor) -> float:
    """||x||_F reduced in float64, never through a float64 copy of the whole tensor.

    float32 input (the deltas): the norms of blocks of FRO_BLOCK elements are taken in float32
    (torch's blocked summation: relative error ~1e-7 per block) and their squares added in float64;
    the result agrees with an all-float64 reduction to ~1e-8 relative (64 x 176) .. 1e-9 (4096 x 4096)
    and costs an eighth of it.
    Where float32 squares could overflow (|x| > ~1e19) or lose the result to underflow (RMS below
    1e-10), or for other dtypes, the elements are converted to float64 chunk by chunk instead."""
    flat = x.reshape(-1)
    n = flat.numel()
    if flat.dtype == torch.float32 and n >= FRO_BLOCK:
        nb = n // FRO_BLOCK
        sq = float(torch.linalg.vector_norm(flat[: nb * FRO_BLOCK].view(nb, FRO_BLOCK), dim=1).double().square().sum())
        if nb * FRO_BLOCK < n:
            sq += float(torch.linalg.vector_norm(flat[nb * FRO_BLOCK :], dtype=torch.float64)) ** 2
        if math.isfinite(sq) and sq > n * 1e-20:  # no block overflowed, and underflow cannot matter
            return sq**0.5
    if n <= FRO_CHUNK:
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    sq = 0.0
    for start in range(0, n, FRO_CHUNK):
        sq += float(torch.linalg.vector_norm(flat[start : start + FRO_CHUNK], dtype=torch.float64)) ** 2
    return sq**0.5


def rank_for_fraction(fraction: float, shape: tuple[int, int]) -> int:
    """k = ceil(fraction * min(m, n)), at least 1 ("rank-1%" is fraction 0.01)."""
    return max(1, math.ceil(fraction * min(shape) - 1e-12))


def spectrum_figures(sigmas: list[float], fro: float, base_fro: float, shape: tuple[int, int]) -> dict:
    """fro, sigma_i, energy_1, energy_k, energy_rank1pct, norm_frac_1, stable_rank, rel_update.

    Energies divide by ||dW||_F^2 computed from the data, so only the top k are needed.
    Undefined ratios (dW = 0, or rank-1% beyond the k computed) are NaN.
    """
    nan = float("nan")
    k = len(sigmas)
    fro2 = fro * fro
    cum = []
    acc = 0.0
    for s in sigmas:
        acc += s * s
        cum.append(acc / fro2 if fro2 > 0 else nan)
    k1pct = rank_for_fraction(0.01, shape)
    s1 = sigmas[0] if sigmas else nan
    return {
        "fro": fro,
        "rel_update": fro / base_fro if base_fro > 0 else nan,
        **{f"sigma_{i + 1}": s for i, s in enumerate(sigmas)},
        "energy_1": cum[0] if cum else nan,
        "energy_k": cum[-1] if cum else nan,
        "rank1pct_k": k1pct,
        "energy_rank1pct": cum[k1pct - 1] if k1pct <= k else nan,
        "norm_frac_1": s1 / fro if fro > 0 else nan,
        "stable_rank": fro2 / (s1 * s1) if s1 > 0 else nan,
    }
