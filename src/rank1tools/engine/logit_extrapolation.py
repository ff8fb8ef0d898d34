"""Decoding from two checkpoints' logits, extrapolated along the line through them.

At every step the next token is chosen from `logits_A + α (logits_B − logits_A)` (float32), where
A and B are two checkpoints of one run, A before B, and α = (S − A) / (B − A) for a target step S
(α = 1 is B itself, α > 1 extrapolates past B, 0 < α < 1 interpolates between them; see
docs/concepts.md#logit-extrapolation). With one model (`LogitExtrapolation.single`) the same loop
is plain decoding, so plain and extrapolated generation share one implementation.

- Each model keeps its own KV cache (a transformers DynamicCache per model and batch): a step runs
  one forward pass of each model over the new token only.
- Batches are left-padded, with attention masks and position ids counted from each row's first
  real token, so a sequence's logits do not depend on its batch (to float rounding).
- A sequence that finishes (an EOS token, or `max_new_tokens`) leaves the batch at once: its rows
  are dropped from both caches (DynamicCache.batch_select_indices).
- Sampling draws each sequence from its own CPU generator seeded by (seed, prompt, sample)
  (engine/sampling.py): the same seed gives the same samples whatever the batch size, on a given
  device and dtype.

Prompts follow the scoring convention (engine/model_scoring.py): a `prompt` string after the
tokenizer's leading special tokens, or chat `messages` rendered with the chat template
(add_generation_prompt=True), so a completion written here is scored by `rank1 logprobs` on the
tokens it was generated from. A completion's text is what its tokens add to the prompt's decoded
text (`completion_text`), special tokens kept; the EOS that ended one is not part of it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InputError, UsageError
from .model_scoring import Prompt, import_transformers, model_context, prompt_token_ids
from .sampling import SamplingOptions, choose_token, sequence_generator


def extrapolation_alpha(step_a: int, step_b: int, target_step: float) -> tuple[float, str | None]:
    """α = (S − A) / (B − A) for checkpoints at steps A < B and a target step S, and a note when
    S < B (that interpolates between the checkpoints, or goes back past A, instead of
    extrapolating). A ≥ B is a UsageError (exit 2)."""
    if step_a >= step_b:
        raise UsageError(
            f"the earlier checkpoint's step ({step_a}) must be before the later one's ({step_b}); "
            "pass the later checkpoint as MODEL and the earlier one to --extrapolate-from"
        )
    alpha = (target_step - step_a) / (step_b - step_a)
    note = None
    if target_step < step_b:
        what = "interpolates between" if target_step >= step_a else "goes back past"
        note = (
            f"--target-step {target_step:g} is before the later checkpoint (step {step_b}): "
            f"α = {alpha:g} {what} the two checkpoints instead of extrapolating"
        )
    return alpha, note


def combine_logits(logits_a, logits_b, alpha: float | None):
    """logits_A + α (logits_B − logits_A), in float32; logits_B alone when α is None."""
    if alpha is None:
        return logits_b.float()
    a = logits_a.float()
    return a + alpha * (logits_b.float() - a)


@functools.cache
def _forward_params(model_class) -> frozenset:
    return frozenset(inspect.signature(model_class.forward).parameters)


def model_step(model, cache, **inputs):
    """`model`'s logits at the last position of `inputs` (input_ids, attention_mask,
    position_ids), extending `cache` in place. Recent transformers 5.x name the cache argument
    `cache` (`past_key_values` before, deprecated since); only the last position's logits are computed where the
    model takes `logits_to_keep`."""
    params = _forward_params(type(model))
    extra = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return model(**inputs, **extra).logits[:, -1, :]


def new_cache(model):
    """An empty transformers DynamicCache for `model`, built from its config where this version
    takes one (so sliding-window and other per-layer cache kinds are the model's own)."""
    transformers = import_transformers()
    try:
        return transformers.DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return transformers.DynamicCache()


def _vocab_rows(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


SPECIAL_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def vocabulary_difference(model_a, model_b, tokenizer_a=None, tokenizer_b=None) -> str | None:
    """What makes two models' vocabularies differ, in one line, or None when they agree: the
    rows of their output embeddings, then (when both tokenizers are given) the token → id maps
    and the special token ids."""
    rows_a, rows_b = _vocab_rows(model_a), _vocab_rows(model_b)
    if rows_a != rows_b:
        return f"output embeddings have {rows_a} rows (A) and {rows_b} rows (B)"
    if tokenizer_a is None or tokenizer_b is None:
        return None
    vocab_a, vocab_b = tokenizer_a.get_vocab(), tokenizer_b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        return f"tokenizers have {len(vocab_a)} tokens (A) and {len(vocab_b)} tokens (B)"
    for token in sorted(vocab_a):
        if vocab_b.get(token) != vocab_a[token]:
            where_b = f"id {vocab_b[token]}" if token in vocab_b else "no id"
            return f"token {token!r} has id {vocab_a[token]} in A's tokenizer and {where_b} in B's"
    for role in SPECIAL_ROLES:
        ida, idb = getattr(tokenizer_a, role, None), getattr(tokenizer_b, role, None)
        if ida != idb:
            return f"{role.removesuffix('_id')} is {ida} in A's tokenizer and {idb} in B's"
    return None


@dataclass
class Completion:
    """One generated sequence: `token_ids` (without the EOS that ended it), `text` (its
    decoding, special tokens kept), `finish_reason` ('eos' or 'length'), and with keep_logits the
    (steps, V) float32 CPU logits each token was chosen from."""

    prompt_index: int
    sample: int
    prompt_length: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logits: object = None


@dataclass
class _Job:
    prompt_index: int
    sample: int
    ids: list[int]
    max_new: int


class LogitExtrapolation:
    """A decoder over `logits_A + α (logits_B − logits_A)` of two causal LMs with one vocabulary.

    `model_a`, `model_b`: transformers causal LMs (e.g. engine/model_loading.CausalLM(...).model,
    two instances), on one device; `tokenizer`: their tokenizer (checked against the models'
    output rows; pass `tokenizer_a` too to compare A's own). `alpha`: the weight of B. Build one
    from steps with `at_step`, or a plain decoder with `single`. `eos_ids`: token ids that end a
    sequence (default: the tokenizer's EOS and model B's generation config's).
    """

    def __init__(self, model_a, model_b, tokenizer, *, alpha: float, tokenizer_a=None, eos_ids=None):
        models = [m for m in (model_a, model_b) if m is not None]
        if model_a is not None:
            diff = vocabulary_difference(model_a, model_b, tokenizer_a, tokenizer)
            if diff is not None:
                raise InputError(f"the two checkpoints have different vocabularies: {diff}")
            if next(model_a.parameters()).device != next(model_b.parameters()).device:
                raise UsageError("the two models must be on one device")
        if not len(tokenizer) <= _vocab_rows(model_b):
            raise InputError(
                f"the tokenizer has {len(tokenizer)} tokens, the model's output only {_vocab_rows(model_b)}"
            )
        self.models = models
        self.alpha = None if model_a is None else float(alpha)
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids) if eos_ids is not None else _default_eos(tokenizer, model_b)
        self.device = next(model_b.parameters()).device
        self.note: str | None = None  # set by at_step when the target step interpolates
        self.context = min((c for c in map(model_context, models) if c is not None), default=None)

    @classmethod
    def single(cls, model, tokenizer, *, eos_ids=None) -> LogitExtrapolation:
        """Plain decoding from one model, through the same loop."""
        return cls(None, model, tokenizer, alpha=1.0, eos_ids=eos_ids)

    @classmethod
    def at_step(
        cls, model_a, model_b, tokenizer, *, step_a: int, step_b: int, target_step: float, **kwargs
    ) -> LogitExtrapolation:
        """The decoder whose α = (S − A) / (B − A) (extrapolation_alpha); its `note` says when
        S < B interpolates."""
        alpha, note = extrapolation_alpha(step_a, step_b, target_step)
        decoder = cls(model_a, model_b, tokenizer, alpha=alpha, **kwargs)
        decoder.note = note
        return decoder

    def combine(self, logits_a, logits_b):
        """logits_A + α (logits_B − logits_A) in float32 (logits_B alone for a single model)."""
        return combine_logits(logits_a, logits_b, self.alpha)

    def _forward(self, ids, mask, positions, caches):
        """One forward pass of each model over `ids` (the new tokens), extending its own cache;
        the combined float32 logits of every row's last position."""
        outs = [
            model_step(model, cache, input_ids=ids, attention_mask=mask, position_ids=positions)
            for model, cache in zip(self.models, caches, strict=True)
        ]
        return self.combine(outs[0] if len(outs) == 2 else None, outs[-1])

    def generate(
        self,
        prompts: Sequence[Prompt],
        options: SamplingOptions = SamplingOptions(),
        *,
        n: int = 1,
        batch_size: int = 8,
        labels: Sequence[str] | None = None,
        keep_logits: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """`n` completions of every prompt (strings or chat messages), in order (prompt 0's
        samples 0..n−1, then prompt 1's ...). `labels` name the prompts in errors (e.g.
        "prompts.jsonl: line 3"); every prompt is tokenized and checked before the first forward
        pass. `progress(done, total)` is called as sequences finish."""
        names = labels or [f"prompt {i}" for i in range(len(prompts))]
        ids = [prompt_token_ids(self.tokenizer, p, names[i]) for i, p in enumerate(prompts)]
        return self.generate_ids(
            ids, options, n=n, batch_size=batch_size, labels=names, keep_logits=keep_logits, progress=progress
        )

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        options: SamplingOptions = SamplingOptions(),
        *,
        n: int = 1,
        batch_size: int = 8,
        labels: Sequence[str] | None = None,
        keep_logits: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """As `generate`, from token ids (the prompts as the models read them)."""
        import torch  # noqa: PLC0415

        options.check()
        if n < 1 or batch_size < 1:
            raise ValueError("n and batch_size must be at least 1")
        jobs = []
        for i, ids in enumerate(prompt_ids):
            room = (
                options.max_new_tokens if self.context is None else min(options.max_new_tokens, self.context - len(ids))
            )
            if room < 1 or not ids:
                name = labels[i] if labels else f"prompt {i}"
                raise InputError(
                    f"{name}: the prompt is {len(ids)} tokens, leaving no room to generate in the model's context of {self.context}"
                    if ids
                    else f"{name}: empty prompt"
                )
            jobs += [_Job(i, k, list(ids), room) for k in range(n)]
        done: list[Completion] = []
        with torch.inference_mode():
            for lo in range(0, len(jobs), batch_size):
                done += self._decode_batch(jobs[lo : lo + batch_size], options, keep_logits)
                if progress is not None:
                    progress(len(done), len(jobs))
        return done

    def _decode_batch(self, jobs: list[_Job], options: SamplingOptions, keep_logits: bool) -> list[Completion]:
        import torch  # noqa: PLC0415

        width = max(len(j.ids) for j in jobs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):  # left padding: every row's last token is at the end
            ids[row, width - len(job.ids) :] = torch.tensor(job.ids, dtype=torch.long)
            mask[row, width - len(job.ids) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        caches = [new_cache(model) for model in self.models]
        generators = [
            None if options.greedy else sequence_generator(options.seed, j.prompt_index, j.sample) for j in jobs
        ]
        tokens: list[list[int]] = [[] for _ in jobs]
        kept: list[list] = [[] for _ in jobs]
        finish: list[str | None] = [None] * len(jobs)
        alive = list(range(len(jobs)))  # job index of each batch row
        logits = self._forward(ids, mask, positions, caches)
        last = positions[:, -1]
        while True:
            cpu = logits.detach().to(device="cpu", dtype=torch.float32)
            for row, j in enumerate(alive):
                token = choose_token(cpu[row], options, generators[j])
                if keep_logits:
                    kept[j].append(cpu[row].clone())
                if token in self.eos_ids:
                    finish[j] = "eos"
                    continue
                tokens[j].append(token)
                if len(tokens[j]) >= jobs[j].max_new:
                    finish[j] = "length"
            rows = [row for row, j in enumerate(alive) if finish[j] is None]
            if not rows:
                break
            if len(rows) < len(alive):  # finished sequences leave the batch and both caches
                keep = torch.tensor(rows, dtype=torch.long, device=self.device)
                for cache in caches:
                    cache.batch_select_indices(keep)
                mask, last = mask[keep], last[keep]
                alive = [alive[row] for row in rows]
            new = torch.tensor([[tokens[j][-1]] for j in alive], dtype=torch.long, device=self.device)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            last = last + 1
            logits = self._forward(new, mask, last[:, None], caches)
        return [
            Completion(
                prompt_index=job.prompt_index,
                sample=job.sample,
                prompt_length=len(job.ids),
                token_ids=tokens[j],
                text=completion_text(self.tokenizer, job.ids, tokens[j]),
                finish_reason=finish[j],
                logits=torch.stack(kept[j]) if keep_logits else None,
            )
            for j, job in enumerate(jobs)
        ]


def completion_text(tokenizer, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> str:
    """The text `token_ids` add after the prompt: decode(prompt + tokens) minus decode(prompt),
    special tokens kept. Decoding the tokens alone can lose text (a SentencePiece tokenizer drops
    the leading space of a text's first token), and then prompt + completion would not re-tokenize
    into the generated tokens; decode(tokens) only where the prompt's text is not a prefix."""
    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=False)
    full = tokenizer.decode([*prompt_ids, *token_ids], skip_special_tokens=False)
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.decode(list(token_ids), skip_special_tokens=False)


def _default_eos(tokenizer, model) -> set[int]:
    found: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))
    return found
