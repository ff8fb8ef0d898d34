"""Trajectory rank-r (RELEX, docs/extrapolation.md#extrapolate-relex-trajectory-rank-r) through the Gram
matrix, so a tensor is never held T times.

M is the T × d matrix whose rows are the flattened updates ΔW_t of one tensor (uncentred).
G = M Mᵀ is accumulated over column chunks (`gram_update`); its eigendecomposition gives the
left singular vectors U and σ = √λ (`TrajectoryBasis`). The right singular vectors are
V_r = Mᵀ U_r / σ_r, and any combination Σᵢ cᵢ Vᵢ equals Mᵀ w with w = U_r (c / σ_r)
(`TrajectoryBasis.weights`): a prediction is a weighted sum of the checkpoints' updates, made
chunk by chunk in a second pass. Coefficient and direction flip together, so no sign alignment
is needed; a canonical sign is still fixed so that reported coefficients are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Eigenvalues below this fraction of the largest are numerical zeros of the float64 Gram matrix
# (a tensor that does not move, or r above the trajectory's rank): their direction is undefined
# and they contribute nothing.
RELATIVE_EIG_FLOOR = 1e-12


def gram_update(G: torch.Tensor | None, M: torch.Tensor) -> torch.Tensor:
    """G + M Mᵀ in float64 (M: T × n chunk of the trajectory matrix, any float dtype)."""
    M64 = M.to(torch.float64)
    g = M64 @ M64.T
    return g if G is None else G.add_(g)


@dataclass
class TrajectoryBasis:
    """Top-r left singular structure of M from G = M Mᵀ.

    eigenvalues: all T eigenvalues of G, descending, clamped at 0 (σᵢ² of M).
    U: T × r left singular vectors (columns), sign-canonical (largest-magnitude entry positive);
       a column whose eigenvalue is a numerical zero is all zeros.
    sigma: r singular values (0 for those columns).
    """

    eigenvalues: torch.Tensor
    U: torch.Tensor
    sigma: torch.Tensor

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def explained_variance(self) -> float:
        """Σ_{i≤r} λᵢ / Σ λᵢ (NaN when the tensor does not move at all)."""
        total = float(self.eigenvalues.sum())
        return float(self.eigenvalues[: self.rank].sum()) / total if total > 0 else float("nan")

    def coefficients(self) -> torch.Tensor:
        """C = M V_r = U_r σ_r: T × r, one row per checkpoint (float64)."""
        return self.U * self.sigma

    def weights(self, c: torch.Tensor) -> torch.Tensor:
        """w (T,) with Mᵀ w = Σᵢ cᵢ Vᵢ for coefficients c (r,); zero-σ components contribute 0."""
        safe = torch.where(self.sigma > 0, self.sigma, torch.ones_like(self.sigma))
        return self.U @ torch.where(self.sigma > 0, c.to(torch.float64) / safe, torch.zeros_like(safe))


def trajectory_basis(G: torch.Tensor, r: int) -> TrajectoryBasis:
    """The top-r eigenpairs of the float64 Gram matrix G (T × T), deterministic in sign."""
    T = G.shape[0]
    if not 1 <= r <= T:
        raise ValueError(f"rank {r} outside 1..{T}")
    lam, vec = torch.linalg.eigh(G.to(torch.float64))
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)  # descending
    U = vec[:, :r].clone()
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(r, device=U.device)])
    U = U * torch.where(signs == 0, torch.ones_like(signs), signs)
    floor = RELATIVE_EIG_FLOOR * float(lam[0]) if T else 0.0
    live = lam[:r] > floor
    U[:, ~live] = 0.0
    sigma = torch.where(live, lam[:r].sqrt(), torch.zeros_like(lam[:r]))
    return TrajectoryBasis(eigenvalues=lam, U=U, sigma=sigma)


def combine(M: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mᵀ w for a T × n chunk, in float64: the chunk of Σₜ wₜ ΔW_t."""
    return w.to(torch.float64) @ M.to(torch.float64)
