"""Sign conventions for singular vectors (docs/concepts.md#signs)."""

from __future__ import annotations

import torch


def canonicalize_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive.

    Ties in magnitude go to the first index (argmax), so the choice is deterministic.
    sigma u v^T is unchanged.
    """
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0)).squeeze(0))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


def align_to_next(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectory alignment of one triplet over checkpoints (rows = checkpoints t_1..t_T).

    Walking from the last checkpoint backwards, flip (u_t, v_t) together when
    cos(u_t, u_{t+1}) < 0, as the AlphaRL reference code does. U: (T, m), V: (T, n).
    Vectorised: with d_t = <u_t, u_{t+1}> of the stored vectors, row t's sign is the product of
    sign(d) from t to the end (each flip of u_{t+1} reverses the test for u_t).
    """
    if U.shape[0] < 2:
        return U.clone(), V.clone()
    dots = (U[:-1].double() * U[1:].double()).sum(dim=1)
    step = torch.where(dots < 0, -1.0, 1.0)
    signs = torch.ones(U.shape[0], dtype=torch.float64)
    signs[:-1] = torch.flip(torch.cumprod(torch.flip(step, [0]), 0), [0])
    return U * signs.to(U.dtype)[:, None], V * signs.to(V.dtype)[:, None]
