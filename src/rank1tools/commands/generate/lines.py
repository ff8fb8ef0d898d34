"""The lines `rank1 generate` writes: rollouts (io/rollouts.py) with the generation recorded in each.

A line is `id`, `prompt` or `messages`, `completion`, the prompt line's other fields (an answer
field, metadata), then `prompt_id`, `sample`, `finish_reason`, `completion_tokens`, `correct` (with
--answer-field) and `generation`, the provenance object every line carries (io/output_file.py):
tool, model, checkpoint steps, α, sampling settings, device and dtype. Fields of the prompt line
with those names are replaced. The same inputs give the same bytes. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ...errors import InputError
from ...io.rollouts import PromptLine

WRITTEN_FIELDS = ("prompt_id", "sample", "finish_reason", "completion_tokens", "correct", "generation")


def prompt_ids(prompts: Sequence[PromptLine]) -> list[str | int]:
    """Each prompt's id: its `id`, else `line-N` (N its line in the file)."""
    return [p.id if p.id is not None else f"line-{p.line}" for p in prompts]


def line_ids(prompts: Sequence[PromptLine], n: int, where: str) -> list[list[str | int]]:
    """The `id` of every completion (per prompt, per sample): the prompt's id when n = 1, else
    `ID#k`; one-line InputError naming both lines when two would be equal."""
    seen: dict[str | int, int] = {}
    out = []
    for p, pid in zip(prompts, prompt_ids(prompts), strict=True):
        ids = [pid] if n == 1 else [f"{pid}#{k}" for k in range(n)]
        for i in ids:
            if i in seen:
                raise InputError(
                    f"{where}: line {p.line}: its completions would be named {i!r}, as line {seen[i]}'s are; "
                    "give the prompts distinct ids"
                )
            seen[i] = p.line
        out.append(ids)
    return out


def completion_line(
    prompt: PromptLine,
    *,
    line_id: str | int,
    prompt_id: str | int,
    sample: int,
    completion: str,
    finish_reason: str,
    tokens: int,
    generation: dict,
    correct: bool | None = None,
) -> str:
    """One JSONL line (with its newline)."""
    obj: dict = {"id": line_id}
    if prompt.messages is not None:
        obj["messages"] = prompt.chat()
    else:
        obj["prompt"] = prompt.prompt
    obj["completion"] = completion
    obj.update({k: v for k, v in prompt.extra.items() if k not in WRITTEN_FIELDS})
    obj.update(prompt_id=prompt_id, sample=sample, finish_reason=finish_reason, completion_tokens=tokens)
    if correct is not None:
        obj["correct"] = correct
    obj["generation"] = generation
    return json.dumps(obj, ensure_ascii=False) + "\n"
