"""Teacher-forced log-probabilities of completions under a `transformers` causal LM.

Which tokens are scored (docs/concepts.md#teacher-forced-log-probabilities):

- the prompt's text is the `prompt` string, preceded by the special tokens the tokenizer puts
  before a text (a Llama tokenizer's `<s>`; never those it puts after one, such as an
  `add_eos_token` tokenizer's `</s>`), or a chat (`messages`) rendered with the tokenizer's chat
  template with add_generation_prompt=True and tokenized without special tokens (the template
  writes its own);
- prompt text + completion text are tokenized jointly, the same way, into the ids the model reads;
- the completion's tokens are the joint ids from the first position where they differ from the
  prompt's own ids (the prompt's length when the joint ids start with the prompt's ids, the usual
  case). When the tokenizer merges the prompt's last characters with the completion's first ones
  into one token, that token is scored as a completion token, so the scored tokens always cover the
  whole completion; the prompt part it absorbs is then predicted with it;
- each scored token's log-probability is taken given every joint id before it.

`transformers` is an optional extra, imported lazily (`import_transformers`). Padding does not
change the numbers: each row's positions are counted from its first real token, so left and right
padding give the same log-probabilities (to float rounding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import InputError, UsageError
from ..io.rollouts import Rollout

INSTALL_HINT = "pip install 'rank1tools[model]'"
PADDING_SIDES = ("right", "left")

Prompt = str | Sequence[Mapping[str, str]]  # a prompt string, or chat messages {role, content}


def import_transformers():
    """The `transformers` module, or a one-line UsageError with the install hint."""
    try:
        import transformers  # noqa: PLC0415 (optional extra, only for commands that run a model)
    except ImportError:
        raise UsageError(f"running a model needs transformers, which is not installed: {INSTALL_HINT}") from None
    return transformers


@dataclass(frozen=True)
class TokenizedPair:
    """A prompt + completion as the model reads it: ids[start:] are the scored tokens."""

    ids: tuple[int, ...]
    start: int  # first scored position (>= 1)
    prompt_length: int  # tokens of the prompt tokenized alone (== start unless the boundary merged)

    @property
    def scored_count(self) -> int:
        return len(self.ids) - self.start


def prompt_text(tokenizer, prompt: Prompt, where: str) -> tuple[str, bool]:
    """The prompt's text and whether the tokenizer's leading special tokens go before it."""
    if isinstance(prompt, str):
        return prompt, True
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(
            f"{where}: a chat prompt (`messages`) needs a tokenizer with a chat template; this one has none"
        )
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return text, False


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (a Llama tokenizer's `<s>`; none for
    most chat models), found by tokenizing one character with and without special tokens. Those
    it puts after a text (an `add_eos_token` tokenizer's `</s>`) are left out: a prompt + completion
    is scored as the text the model continued, not as a closed document."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for at in range(len(full) - len(plain) + 1):
        if full[at : at + len(plain)] == plain:
            return full[:at]
    return []


def _ids(tokenizer, text: str, prefix: list[int]) -> list[int]:
    return [*prefix, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def _prompt_parts(tokenizer, prompt: Prompt, where: str) -> tuple[str, list[int]]:
    """The prompt's text and the special token ids that go before it (module docstring)."""
    text, special = prompt_text(tokenizer, prompt, where)
    return text, leading_special_ids(tokenizer) if special else []


def prompt_token_ids(tokenizer, prompt: Prompt, where: str = "prompt") -> list[int]:
    """The ids a prompt is read as, alone: what generation continues (engine/logit_extrapolation.py)
    under the convention scoring uses, so a generated completion is scored after the tokens it was
    generated after. A one-line InputError for a prompt with no token."""
    ids = _ids(tokenizer, *_prompt_parts(tokenizer, prompt, where))
    if not ids:
        raise InputError(f"{where}: the prompt has no token to continue (empty prompt and no BOS token)")
    return ids


def tokenize_pair(
    tokenizer, prompt: Prompt, completion: str, where: str = "input", max_length: int | None = None
) -> TokenizedPair:
    """Joint ids of prompt + completion and the first scored position (the module docstring's
    convention). A one-line InputError naming `where` for an empty completion, a completion that
    adds no token, a first scored token with nothing before it, or ids past `max_length`."""
    if not completion:
        raise InputError(f"{where}: empty completion (nothing to score)")
    text, prefix = _prompt_parts(tokenizer, prompt, where)
    prompt_ids = _ids(tokenizer, text, prefix)
    ids = _ids(tokenizer, text + completion, prefix)
    start = 0
    limit = min(len(ids), len(prompt_ids))
    while start < limit and ids[start] == prompt_ids[start]:
        start += 1
    if start >= len(ids):
        raise InputError(f"{where}: the completion adds no token to the prompt's tokens")
    if start == 0:
        raise InputError(
            f"{where}: the first completion token has nothing before it to be predicted from (empty prompt and no BOS token)"
        )
    if max_length is not None and len(ids) > max_length:
        raise InputError(
            f"{where}: prompt + completion are {len(ids)} tokens, past the model's context of {max_length}"
        )
    return TokenizedPair(ids=tuple(ids), start=start, prompt_length=len(prompt_ids))


def model_context(model) -> int | None:
    """The model's maximum number of positions, when its config states one."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def score_tokenized(model, pairs: Sequence[TokenizedPair], *, padding_side: str = "right"):
    """One forward pass over `pairs` padded into a batch; per pair, a float32 CPU tensor of its
    scored tokens' log-probabilities (ids[start:], in order). Deterministic for a model, device and
    batch; position ids are counted from each row's first real token, so the padding side changes
    nothing but float rounding."""
    import torch  # noqa: PLC0415

    from ..math.token_logprobs import gather_token_logprobs  # noqa: PLC0415

    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if not pairs:
        return []
    logits, ids, scored = forward_pairs(model, pairs, padding_side=padding_side)
    flat = gather_token_logprobs(logits, ids, scored).cpu()
    return list(torch.split(flat, [p.scored_count for p in pairs]))


def forward_pairs(model, pairs: Sequence[TokenizedPair], *, padding_side: str = "right"):
    """One forward pass over `pairs` padded into a batch (score_tokenized's batching): (logits
    (B, L, V), ids (B, L), scored (B, L) bool mask), on the model's device."""
    import torch  # noqa: PLC0415

    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    device = next(model.parameters()).device
    width = max(len(p.ids) for p in pairs)
    ids = torch.zeros((len(pairs), width), dtype=torch.long)  # pad id 0: masked out, never scored
    real = torch.zeros((len(pairs), width), dtype=torch.bool)
    scored = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, p in enumerate(pairs):
        at = width - len(p.ids) if padding_side == "left" else 0
        ids[row, at : at + len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
        real[row, at : at + len(p.ids)] = True
        scored[row, at + p.start : at + len(p.ids)] = True
    positions = (real.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(
            input_ids=ids.to(device),
            attention_mask=real.to(device=device, dtype=torch.long),
            position_ids=positions.to(device),
            use_cache=False,
        ).logits
    return logits, ids.to(device), scored.to(device)


def score_completions(
    model,
    tokenizer,
    items: Sequence[tuple[Prompt, str]],
    *,
    batch_size: int = 8,
    padding_side: str = "right",
    labels: Sequence[str] | None = None,
):
    """Per (prompt, completion) of `items`, in order, the float32 log-probabilities of its
    completion tokens given everything before them (module docstring), `batch_size` at a time.
    Every item is tokenized and checked before the first forward pass; `labels` name the items
    in errors (e.g. "rollouts.jsonl: line 4")."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if labels is not None and len(labels) != len(items):
        raise ValueError("labels must name every item")
    context = model_context(model)
    pairs = [
        tokenize_pair(tokenizer, prompt, completion, labels[i] if labels else f"item {i}", context)
        for i, (prompt, completion) in enumerate(items)
    ]
    return score_batches(model, pairs, batch_size, padding_side=padding_side)


def score_batches(model, pairs: Sequence[TokenizedPair], batch_size: int, *, padding_side: str = "right"):
    """score_tokenized over `pairs`, `batch_size` at a time: per pair, in order, its scored tokens'
    float32 log-probabilities."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = []
    for lo in range(0, len(pairs), batch_size):
        out.extend(score_tokenized(model, pairs[lo : lo + batch_size], padding_side=padding_side))
    return out


def score_rollouts(model, tokenizer, rollouts: Sequence[Rollout], where: str, *, batch_size: int = 8):
    """score_completions over the rollouts of a file (io/rollouts.py), in file order; errors name
    the file `where` and the rollout's line."""
    items = [(r.prompt_input(), r.completion) for r in rollouts]
    labels = [f"{where}: line {r.line}" for r in rollouts]
    return score_completions(model, tokenizer, items, batch_size=batch_size, labels=labels)
