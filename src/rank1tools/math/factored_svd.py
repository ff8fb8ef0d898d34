"""Exact top-k SVD of a low-rank product L R from its factors (docs/concepts.md#lora-updates).

For M = L R with L (m, r) and R (r, n), r small: L = Q_L T_L and R^T = Q_R T_R (thin QR), so
M = Q_L (T_L T_R^T) Q_R^T and the SVD of the r x r core C = T_L T_R^T = U_c diag(S) V_c^T gives
M's: U = Q_L U_c, V = Q_R V_c. Exact up to rounding, O((m + n) r^2) work, and the m x n matrix is
never formed. Computed in float64, returned in float32 like `math.svd.topk_svd`.
"""

from __future__ import annotations

import torch

from .svd import ROUNDING_REL, TopK


def factored_topk(L: torch.Tensor, R: torch.Tensor, k: int) -> tuple[TopK, float]:
    """(top-k triplets of L R, ||L R||_F). `k` at most the inner dimension r (the rest of the
    spectrum is zero; a caller wanting more forms the product). `method` is "factored"."""
    if L.dim() != 2 or R.dim() != 2 or L.shape[1] != R.shape[0]:
        raise ValueError(f"factors of shapes {list(L.shape)}, {list(R.shape)} do not multiply")
    r = L.shape[1]
    if not 1 <= k <= min(r, L.shape[0], R.shape[1]):
        raise ValueError(f"rank {k} outside 1..{min(r, L.shape[0], R.shape[1])} for factors of inner size {r}")
    Q_l, T_l = torch.linalg.qr(L.double())
    Q_r, T_r = torch.linalg.qr(R.double().T)
    Uc, S, Vch = torch.linalg.svd(T_l @ T_r.T)
    fro = float(torch.linalg.vector_norm(S))  # ||M||_F: Q_L and Q_R have orthonormal columns
    U = (Q_l @ Uc[:, :k]).float().contiguous()
    V = (Q_r @ Vch[:k].T).float().contiguous()
    # float64 work, float32 values: each within float32's rounding, the bound an exact SVD records
    bounds = [ROUNDING_REL * float(S[0])] * k
    return TopK(U, S[:k].float().contiguous(), V, "factored", bounds=bounds), fro
