"""GRPO pieces: sampling with old log-probs, group-normalised advantages, the clipped objective.

Advantages (Group Relative Policy Optimization, as in DeepSeekMath and TRL's GRPOTrainer):
    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)
with the sample standard deviation (Bessel-corrected, n - 1, as torch.std and TRL) over the G
completions of one prompt, eps = 1e-4. A group whose rewards are all equal has A = 0.

Objective per completion token t of completion i, with ratio rho = pi(token) / pi_old(token):
    L = -min(rho * A_i, clip(rho, 1 - clip_eps, 1 + clip_eps) * A_i)
averaged over all completion tokens of the batch (every completion has the same length). No KL
term. pi_old is the policy that sampled the batch (its log-probs come from the sampling pass, which
uses a key/value cache: equal to the training forward's up to float rounding); the batch is
optimised over in mu >= 2 passes, so from the second pass on rho != 1 and the clip bounds the update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ADV_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """Advantages of rewards shaped (prompts, group): (r - group mean) / (group sample std + eps)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)  # unbiased (n - 1)
    return (rewards - mean) / (std + eps)


def clipped_objective(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float, tokens: int | None = None
) -> torch.Tensor:
    """Mean over tokens of -min(rho A, clip(rho, 1-eps, 1+eps) A); logp / old_logp (n, length),
    advantages (n,). `tokens`: the count to divide by when rows with A = 0 (whose terms are 0)
    were left out of logp, so that the value and gradient equal those of the full batch."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    return -torch.minimum(unclipped, clipped).sum() / (logp.numel() if tokens is None else tokens)


def clip_fraction(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> float:
    """Share of tokens whose term is clipped (ratio outside the band on the side the advantage pushes)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    return float(clipped.float().mean())


def completion_logprobs(
    model, prompts: torch.Tensor, completions: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log pi(completion token | prefix) under softmax(logits / temperature), shape (n, length)."""
    seq = torch.cat([prompts, completions], dim=1)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1 :].float() / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), 2, completions[:, :, None])[:, :, 0]


def sample(
    model, prompts: torch.Tensor, length: int, generator: torch.Generator, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions (n, length) sampled token by token from softmax(logits / temperature), and
    their log-probabilities under that same distribution (the pi_old of the clipped objective)."""
    with torch.inference_mode():
        cache = model.new_cache()
        nxt = prompts
        tokens, logps = [], []
        for _ in range(length):
            logits = model(nxt, cache)[:, -1].float() / temperature
            logp = F.log_softmax(logits, dim=-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator)
            tokens.append(nxt)
            logps.append(torch.gather(logp, 1, nxt))
        completions, old_logp = torch.cat(tokens, dim=1), torch.cat(logps, dim=1)
    # copies made outside inference mode: autograd may use them
    return completions.clone(), old_logp.clone()
