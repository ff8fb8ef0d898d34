"""Logit extrapolation as a `transformers` model, so `model.generate(...)` runs it where users evaluate.

`extrapolated_model(model_a, model_b, alpha)` returns a PreTrainedModel (GenerationMixin) whose
forward pass runs both models and returns `logits_A + α (logits_B − logits_A)` (float32), so
greedy search, sampling, logits processors and stopping criteria of `generate` apply to the
combined logits unchanged (docs/commands/generate.md#inside-transformers-generate).

Why not a LogitsProcessor: a processor receives the ids and one model's scores; the second
model's logits need their own forward pass over the same ids, with their own KV cache, which
only a model can run. So the pair is wrapped as one model:

- `generate` believes the wrapper has no cache (its generation config sets use_cache=False, and
  it is handed the whole sequence at every step); the wrapper keeps one DynamicCache per model
  and, when the ids it gets extend the ids of its previous call by one token, runs both models
  over that token only. Anything else (a new prompt, beam search reordering rows) starts both
  caches afresh, which is correct, only slower.
- Position ids are counted from each row's first real token (attention mask), as
  engine/logit_extrapolation.py does, so left-padded batches give each row its own logits.

The wrapper's config is a copy of B's; its `generation_config` a copy of B's with use_cache off.
"""

from __future__ import annotations

import copy
import functools

from .logit_extrapolation import combine_logits, model_step, new_cache, vocabulary_difference
from .model_scoring import import_transformers


@functools.cache
def _wrapper_class():
    import torch  # noqa: PLC0415

    transformers = import_transformers()
    output_type = transformers.modeling_outputs.CausalLMOutputWithPast

    class ExtrapolatedCausalLM(transformers.PreTrainedModel, transformers.GenerationMixin):
        """Two causal LMs as one: logits_A + α (logits_B − logits_A) (module docstring)."""

        main_input_name = "input_ids"
        # the attention runs inside model_a and model_b, with their own settings
        _supports_sdpa = _supports_flash_attn = _supports_flex_attn = _supports_attention_backend = True

        def __init__(self, model_a, model_b, alpha: float):
            super().__init__(copy.deepcopy(model_b.config))
            self.model_a, self.model_b, self.alpha = model_a, model_b, float(alpha)
            self.generation_config = copy.deepcopy(model_b.generation_config)
            self.generation_config.use_cache = False  # the caches are the wrapper's own
            self._previous = None  # (ids of the last call, [cache A, cache B])

        def reset(self) -> None:
            """Drop the two caches (they are otherwise kept until the next sequence starts)."""
            self._previous = None

        def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
            return {"input_ids": input_ids, "attention_mask": attention_mask}

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
            prev = self._previous
            extends = (
                prev is not None
                and prev[0].shape[0] == input_ids.shape[0]
                and prev[0].shape[1] == input_ids.shape[1] - 1
                and torch.equal(prev[0], input_ids[:, :-1])
            )
            if extends:
                new, new_positions, caches = input_ids[:, -1:], positions[:, -1:], prev[1]
            else:
                new, new_positions = input_ids, positions
                caches = [new_cache(self.model_a), new_cache(self.model_b)]
            with torch.no_grad():
                a, b = (
                    model_step(m, c, input_ids=new, attention_mask=attention_mask, position_ids=new_positions)
                    for m, c in zip((self.model_a, self.model_b), caches, strict=True)
                )
            self._previous = (input_ids.detach().clone(), caches)
            return output_type(logits=combine_logits(a, b, self.alpha)[:, None, :])

    return ExtrapolatedCausalLM


def extrapolated_model(model_a, model_b, alpha: float):
    """A transformers model whose `generate` decodes from logits_A + α (logits_B − logits_A).

        wrapped = extrapolated_model(model_a, model_b, alpha=2.0)
        out = wrapped.generate(**tokenizer(prompts, return_tensors="pt", padding=True,
                                           padding_side="left"), max_new_tokens=64, do_sample=False)

    Both models must share a vocabulary (refused otherwise, naming the difference) and a device.
    """
    from ..errors import InputError  # noqa: PLC0415

    diff = vocabulary_difference(model_a, model_b)
    if diff is not None:
        raise InputError(f"the two checkpoints have different vocabularies: {diff}")
    return _wrapper_class()(model_a, model_b, alpha).eval()
