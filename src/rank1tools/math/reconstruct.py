"""Rank-k reconstruction of an update (docs/concepts.md#rank-k-reconstruction-reconstruct) and what storing
it in a low dtype loses (docs/formats.md#rounding-report)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .finite import count_introduced_nonfinite
from .spectrum import frobenius


@dataclass
class RoundingStats:
    """How much of an intended update survives storage: counts and float64 squared norms."""

    updated: int = 0  # elements whose intended update is non-zero
    lost: int = 0  # ... of which the stored update is exactly zero (rounded away)
    err_sq: float = 0.0  # ||stored update - intended update||^2
    ref_sq: float = 0.0  # ||intended update||^2
    introduced_nonfinite: int = 0  # elements stored as NaN/Inf where the base is finite

    def add(self, other: RoundingStats) -> None:
        self.updated += other.updated
        self.lost += other.lost
        self.err_sq += other.err_sq
        self.ref_sq += other.ref_sq
        self.introduced_nonfinite += other.introduced_nonfinite

    @property
    def lost_fraction(self) -> float:
        return self.lost / self.updated if self.updated else 0.0

    @property
    def rel_error(self) -> float:
        """||stored - intended|| / ||intended||; NaN when a value involved is not finite (never a
        silent 0), 0 when nothing was meant to change."""
        if not (math.isfinite(self.err_sq) and math.isfinite(self.ref_sq)) or self.introduced_nonfinite:
            return math.nan
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else 0.0


def rounding_stats(base: torch.Tensor, intended: torch.Tensor, stored: torch.Tensor) -> RoundingStats:
    """Compare the intended update with the one that was stored.

    base: theta_0 in float32; intended: the float32 update meant to be added; stored: the written
    tensor (any dtype). The stored update is stored - base, computed in float32.
    """
    stored_update = stored.to(torch.float32) - base
    nz = intended != 0
    return RoundingStats(
        updated=int(nz.sum()),
        lost=int((nz & (stored_update == 0)).sum()),
        err_sq=frobenius(stored_update - intended) ** 2,
        ref_sq=frobenius(intended) ** 2,
        introduced_nonfinite=count_introduced_nonfinite(stored, base),
    )


def update_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """||A B^T||_F from the k x k Gram matrices, in float64: exact for any factors (not only
    orthonormal ones) and no pass over the m x n product."""
    A64, B64 = A.double(), B.double()
    return float(((A64.T @ A64) * (B64.T @ B64)).sum().clamp_min(0)) ** 0.5


def rank_k_scale(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: int, fro_full: float, *, alpha: float, norm_match: bool
) -> float:
    """The factor c of the written update c * dW_k: alpha * ||dW|| / ||dW_k|| with norm matching
    (0 when dW_k is 0), else alpha. ||dW_k|| from the k x k Gram matrices (`update_norm`)."""
    if not norm_match:
        return float(alpha)
    fk = update_norm(U[:, :k] * S[:k], V[:, :k])
    return float(alpha * fro_full / fk) if fk > 0 else 0.0


def apply_rank_k(
    base: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    k: int,
    fro_full: float,
    out_dtype: torch.dtype,
    *,
    alpha: float = 1.0,
    norm_match: bool = True,
    block_elems: int = 1 << 18,
) -> tuple[torch.Tensor, RoundingStats]:
    """Stored W = (theta_0 + alpha * (||dW|| / ||dW_k||) * dW_k).to(out_dtype), and its rounding stats.

    dW_k = sum_{i<=k} s_i u_i v_i^T; without norm matching the update is alpha * dW_k. ||dW_k||_F
    comes from the k x k Gram matrices (exact for nearly orthonormal float32 factors too). Update,
    add, cast and `rounding_stats` are fused over row blocks of about `block_elems` elements: no
    full-size update tensor is materialised, each block stays in cache.
    """
    A = U[:, :k] * S[:k]
    B = V[:, :k]
    A = A * rank_k_scale(U, S, V, k, fro_full, alpha=alpha, norm_match=norm_match)
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    stats = RoundingStats()
    rows = max(1, block_elems // max(1, base.shape[1]))
    for r in range(0, base.shape[0], rows):
        w0 = base[r : r + rows]
        upd = A[r : r + rows] @ B.T
        stored = (w0 + upd).to(out_dtype)
        out[r : r + rows] = stored
        stats.add(rounding_stats(w0, upd, stored))
    return out, stats
