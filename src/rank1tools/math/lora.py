"""LoRA factors of a rank-k update (docs/formats.md#lora-adapters-export-lora): B A = c * dW_k.

Pure tensor functions: `rank1 export-lora` feeds them the top-k SVD of an update and writes what
they return with io/lora_adapter.py.
"""

from __future__ import annotations

import torch


def lora_factors(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: int, scale: float):
    """(B, A) with B A = scale * U_k diag(S_k) V_k^T, split evenly between the two factors:
    B = U_k diag(sqrt(S_k)) * sqrt(|scale|) (m x k), A = diag(sqrt(S_k)) V_k^T * sqrt(|scale|)
    (k x n); a negative scale's sign goes into B. Both float32 and contiguous.

    Even split: B and A get the same column / row norms (sqrt(s_i |c|)), so neither factor holds
    the whole magnitude and a low output dtype rounds both alike.
    """
    root = S[:k].to(torch.float32).clamp_min(0).sqrt() * abs(float(scale)) ** 0.5
    B = U[:, :k].to(torch.float32) * root
    if scale < 0:
        B = -B
    A = (V[:, :k].to(torch.float32) * root).T
    return B.contiguous(), A.contiguous()
