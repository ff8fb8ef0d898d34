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


# the derived figures' bounds, in the spectrum table's order (docs/formats.md)
BOUND_FIGURES = ["energy_1_bound", "energy_k_bound", "energy_rank1pct_bound", "norm_frac_1_bound", "stable_rank_bound"]


def figure_bounds(sigmas: list[float], bounds: list[float] | None, fro: float, shape: tuple[int, int]) -> dict:
    """sigma_i_bound and the bounds the sigma bounds imply for the derived figures
    (docs/concepts.md#certified-bounds-of-the-spectrum): with |sigma_i - true| <= b_i,

        energy_j:    sum_{i<=j} (2 sigma_i b_i + b_i^2) / fro^2     (j = 1, k, rank-1%)
        norm_frac_1: b_1 / fro
        stable_rank: fro^2 / (sigma_1 - b_1)^2 - fro^2 / sigma_1^2  (inf when b_1 >= sigma_1)

    ||dW||_F is taken as exact (float64-reduced: 1e-8 relative, below every bound here).
    `bounds` None (a factor store written before bounds were recorded): every bound NaN; NaN too
    wherever the figure itself is undefined."""
    nan = float("nan")
    k = len(sigmas)
    keys = [f"sigma_{i + 1}_bound" for i in range(k)]
    keys += BOUND_FIGURES
    if bounds is None or k == 0 or fro <= 0:
        out = dict.fromkeys(keys, nan)
        if bounds is not None:
            out.update({f"sigma_{i + 1}_bound": b for i, b in enumerate(bounds)})
        return out
    fro2 = fro * fro
    cum, acc = [], 0.0
    for s, b in zip(sigmas, bounds):
        acc += 2 * s * b + b * b
        cum.append(acc / fro2)
    k1pct = rank_for_fraction(0.01, shape)
    s1, b1 = sigmas[0], bounds[0]
    return {
        **{f"sigma_{i + 1}_bound": b for i, b in enumerate(bounds)},
        "energy_1_bound": cum[0],
        "energy_k_bound": cum[-1],
        "energy_rank1pct_bound": cum[k1pct - 1] if k1pct <= k else nan,
        "norm_frac_1_bound": b1 / fro,
        "stable_rank_bound": (fro2 / ((s1 - b1) ** 2) - fro2 / (s1 * s1))
        if b1 < s1
        else (nan if s1 <= 0 else math.inf),
    }
