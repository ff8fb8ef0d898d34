"""Choosing the next token from a row of logits: greedy, temperature and top-p (nucleus) sampling.

Determinism (docs/concepts.md#logit-extrapolation): every sequence draws from its own
`torch.Generator`, living on the CPU and seeded from (seed, prompt index, sample index) alone
(`sequence_seed`), and the logits it draws from are moved to the CPU in float32 first. So the
tokens a sequence gets depend on its seed and its logits only, never on which other sequences
share its batch or when they finish; the logits themselves depend on the device and dtype, so a
seed gives the same samples on a given device (and dtype), not across devices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are chosen. `temperature` 0 is greedy (argmax; `top_p` and `seed` unused);
    otherwise logits / temperature, kept to the smallest set of tokens whose probability reaches
    `top_p` (1 keeps all), then drawn with the sequence's generator. At most `max_new_tokens`
    tokens per completion."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self) -> None:
        """One-line UsageErrors for values no decoder could use (torch-free)."""
        if not self.temperature >= 0.0:
            raise UsageError(f"--temperature {self.temperature}: expected a number >= 0 (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens}: expected a whole number >= 1")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed {self.seed}: expected a whole number >= 0")


def sequence_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sequence's generator: a hash of (seed, prompt, sample), so it does not
    depend on the batch the sequence runs in (63 bits, as torch.Generator.manual_seed takes)."""
    digest = hashlib.sha256(f"rank1tools-generate:{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sequence_generator(seed: int, prompt_index: int, sample_index: int):
    """A CPU torch.Generator seeded with `sequence_seed` (see the module docstring)."""
    import torch  # noqa: PLC0415

    return torch.Generator(device="cpu").manual_seed(sequence_seed(seed, prompt_index, sample_index))


def choose_token(logits, options: SamplingOptions, generator=None) -> int:
    """The next token for one sequence from its (V,) logits (any device, any float dtype; read
    as float32 on the CPU). Greedy takes the first largest logit, as torch.argmax does."""
    import torch  # noqa: PLC0415

    row = logits.detach().to(device="cpu", dtype=torch.float32)
    if options.greedy:
        return int(torch.argmax(row))
    probs = torch.softmax(row / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        keep = before < options.top_p  # the first token is always kept
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
