"""The demo's verifiable task: integer addition written as text, answer digits reversed.

A problem is two `digits`-digit operands, zero-padded, and the answer has digits + 1 digits,
zero-padded and written least significant digit first (the order in which the carries are
computed, which a tiny model learns faster than the usual order):

    digits 2 (the demo):  prompt "47+96="     completion "341"    (47 + 96 = 143, reversed)
    digits 3:             prompt "047+596="   completion "3460"   (047 + 596 = 0643, reversed)

Prompts and completions have a fixed length, so batches need no padding. The reward is 1.0 for
an exact match of the whole completion, else 0.0. The held-out evaluation set is a seeded random
sample of all digit pairs, disjoint from the pairs training draws from; accuracy is greedy
exact-match on it.
"""

from __future__ import annotations

import torch

from .tokenizer import BOS_ID, VOCAB, decode


def answer_text(a: int, b: int, digits: int) -> str:
    return f"{a + b:0{digits + 1}d}"[::-1]


def prompt_text(a: int, b: int, digits: int) -> str:
    return f"{a:0{digits}d}+{b:0{digits}d}="


def reward(prompt: str, completion: str) -> float:
    """1.0 when `completion` is exactly the reversed, zero-padded sum the prompt asks for, else 0.0.
    A prompt that is not `A+B=` with equal-width digit operands gets 0.0."""
    body = prompt.removesuffix("=")
    parts = body.split("+")
    if not prompt.endswith("=") or len(parts) != 2 or len(parts[0]) != len(parts[1]) or not parts[0]:
        return 0.0
    if not all(p.isascii() and p.isdigit() for p in parts):
        return 0.0
    return 1.0 if completion == answer_text(int(parts[0]), int(parts[1]), len(parts[0])) else 0.0


class AdditionTask:
    """All `digits`-digit pairs (a, b), split once by `seed` into a held-out set of `eval_size`
    pairs and a training pool of the rest.

    Token tensors: prompts (n, 2*digits + 3) = <s> a '+' b '=' ; answers (n, digits + 1)."""

    def __init__(self, digits: int, seed: int, eval_size: int):
        self.digits = digits
        self.prompt_len = 2 * digits + 3
        self.answer_len = digits + 1
        count = 10 ** (2 * digits)
        if not 0 < eval_size < count:
            raise ValueError(f"eval_size must be in 1..{count - 1} for {digits}-digit operands")
        perm = torch.randperm(count, generator=torch.Generator().manual_seed(10_007 * seed + 17))
        self.eval_pairs = perm[:eval_size]  # in random order: any prefix is a random subset
        self.train_pairs = perm[eval_size:]
        self.eval_prompts, self.eval_answers = self.tokens(self.eval_pairs)

    def operands(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pairs // 10**self.digits, pairs % 10**self.digits

    def tokens(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt ids, answer ids) of pair indices, built arithmetically (no string round trip)."""
        a, b = self.operands(pairs)
        zero, plus, eq = VOCAB["0"], VOCAB["+"], VOCAB["="]
        p10 = 10 ** torch.arange(self.digits - 1, -1, -1)  # most significant digit first
        a_digits = (a[:, None] // p10) % 10 + zero
        b_digits = (b[:, None] // p10) % 10 + zero
        n = len(pairs)
        prompts = torch.cat(
            [torch.full((n, 1), BOS_ID), a_digits, torch.full((n, 1), plus), b_digits, torch.full((n, 1), eq)], dim=1
        )
        s = a + b
        answers = (s[:, None] // 10 ** torch.arange(self.answer_len)) % 10 + zero  # least significant first
        return prompts, answers

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n training problems drawn uniformly (with replacement) from the training pool."""
        idx = torch.randint(len(self.train_pairs), (n,), generator=generator)
        return self.tokens(self.train_pairs[idx])

    def texts(self, pairs: torch.Tensor) -> list[tuple[str, str]]:
        """(prompt, completion) strings of pair indices (for messages and tests)."""
        prompts, answers = self.tokens(pairs)
        return [(decode(p), decode(a)) for p, a in zip(prompts.tolist(), answers.tolist())]


def rewards(completions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Exact-match reward per row of completion ids (n, answer_len): 1.0 or 0.0, float32."""
    return (completions == answers).all(dim=1).to(torch.float32)


@torch.inference_mode()
def greedy(model, prompts: torch.Tensor, length: int, batch: int = 1024) -> torch.Tensor:
    """Greedy completions (n, length) of prompts (n, p); the whole prefix is recomputed at each
    token (sequences are ~10 tokens: no KV cache needed)."""
    out = []
    for start in range(0, len(prompts), batch):
        seq = prompts[start : start + batch]
        for _ in range(length):
            nxt = model(seq)[:, -1].argmax(dim=-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        out.append(seq[:, prompts.shape[1] :])
    return torch.cat(out)


@torch.inference_mode()
def greedy_correct(model, prompts: torch.Tensor, answers: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Whether greedy decoding reproduces each answer exactly (bool, n), in one teacher-forced pass:
    greedy decoding emits the answer iff, at every answer position, the argmax given the correct
    prefix is the correct token (the first wrong argmax is where greedy decoding would leave it)."""
    out = []
    for start in range(0, len(prompts), batch):
        p, a = prompts[start : start + batch], answers[start : start + batch]
        logits = model(torch.cat([p, a[:, :-1]], dim=1))[:, p.shape[1] - 1 :]
        out.append((logits.argmax(dim=-1) == a).all(dim=1))
    return torch.cat(out)


def accuracy(model, task: AdditionTask, limit: int | None = None) -> float:
    """Greedy exact-match accuracy on the held-out set (its first `limit` problems when given)."""
    was_training = model.training
    model.eval()
    try:
        correct = greedy_correct(model, task.eval_prompts[:limit], task.eval_answers[:limit])
    finally:
        model.train(was_training)
    return int(correct.sum()) / len(correct)
