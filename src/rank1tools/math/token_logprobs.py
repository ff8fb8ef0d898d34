"""Log-probabilities of the tokens a causal model was fed (teacher forcing), from its logits.

Pure tensor code (no model, no tokenizer): the model-running part is engine/model_scoring.py.
The convention (which tokens are scored) is on docs/concepts.md.
"""

from __future__ import annotations

import torch


def gather_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[b, t] | input_ids[b, :t]) for every scored position (b, t), in row-major
    order (row 0's scored positions first, left to right), as float32.

    `logits` (B, L, V): a causal LM's output, where logits[b, t] predicts the token at t + 1;
    `input_ids` (B, L); `scored` (B, L) bool: True where the token is scored. Position 0 has no
    logits predicting it and cannot be scored. The log_softmax runs in float32 on the rows that
    predict a scored token only (memory: scored tokens × vocabulary, not B × L × vocabulary), so
    padding, wherever it sits, changes nothing. Split the result per row with scored.sum(1).
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or scored.shape != input_ids.shape:
        raise ValueError(
            f"expected logits (B, L, V), input_ids and scored (B, L); got {tuple(logits.shape)}, "
            f"{tuple(input_ids.shape)}, {tuple(scored.shape)}"
        )
    rows, ids = scored_log_softmax(logits, input_ids, scored)
    return rows.gather(-1, ids[:, None]).squeeze(-1)


def scored_log_softmax(
    logits: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) float32 log-softmax of the next-token distribution predicting each scored token, and
    the (N,) scored token ids, in gather_token_logprobs' order (whose checks it shares)."""
    if scored.dtype != torch.bool:
        raise ValueError(f"scored must be a bool mask, got {scored.dtype}")
    if bool(scored[:, 0].any()):
        raise ValueError("position 0 cannot be scored: no token precedes it")
    target = scored[:, 1:]
    rows = logits[:, :-1][target].float()  # (N, V): the logits predicting each scored token
    ids = input_ids[:, 1:][target].to(torch.long)
    return torch.log_softmax(rows, dim=-1), ids
