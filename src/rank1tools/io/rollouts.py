"""Reading a rollouts file: JSONL, one JSON object per line, each a prompt and its completion.

A line holds `prompt` (a string) or `messages` (a chat: a non-empty list of objects with string
`role` and `content`, rendered later with the tokenizer's chat template), a non-empty string
`completion`, and optionally `id` (a string or an integer, unique in the file). Other fields are
kept aside untouched (a generator records its checkpoints there). A prompts file (`read_prompts`,
the input of `rank1 generate`) has the same lines without `completion`. Blank lines are skipped but
counted, so line numbers are the file's. Every refusal is one InputError line naming the file and
the line (exit 3). The file is read through io/text_files.py (regular file, bounded size, no NUL
byte). Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..jsonutil import json_lines
from .text_files import read_text_file

ENV_MAX_BYTES = "RANK1_MAX_ROLLOUTS_BYTES"
DEFAULT_MAX_BYTES = 1 << 30  # bounds the memory a hostile file can take; far above a usual eval set
KNOWN_FIELDS = ("id", "prompt", "messages", "completion")


class _PromptFields:
    """The prompt of a line (Rollout, PromptLine): exactly one of `prompt` and `messages` is set."""

    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None

    def chat(self) -> list[dict[str, str]] | None:
        """The messages as a chat template takes them, or None for a plain prompt."""
        if self.messages is None:
            return None
        return [{"role": r, "content": c} for r, c in self.messages]

    def prompt_input(self) -> str | list[dict[str, str]]:
        """The prompt as the model-running code takes it (engine/model_scoring.Prompt): the
        `prompt` string, or the chat messages."""
        return self.prompt if self.messages is None else self.chat()


@dataclass(frozen=True)
class Rollout(_PromptFields):
    """One line of a rollouts file: exactly one of `prompt` and `messages` is set."""

    line: int  # 1-based line number in the file
    completion: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    id: str | int | None = None
    extra: dict = field(default_factory=dict)  # the line's other fields, as read


def max_rollouts_bytes() -> int:
    raw = os.environ.get(ENV_MAX_BYTES)
    if raw is None or raw == "":
        return DEFAULT_MAX_BYTES
    if not raw.isascii() or not raw.isdigit() or int(raw) <= 0:
        raise InputError(f"{ENV_MAX_BYTES}={raw!r}: expected a positive number of bytes")
    return int(raw)


def _messages(value: object, at: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{at}: `messages` must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InputError(f"{at}: messages[{i}] is {type(m).__name__}, expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InputError(f"{at}: messages[{i}].role must be a non-empty string")
        if not isinstance(content, str):
            raise InputError(f"{at}: messages[{i}].content must be a string")
        out.append((role, content))
    return tuple(out)


def _prompt_fields(obj: object, at: str) -> tuple[str | None, tuple | None, str | int | None]:
    """(prompt, messages, id) of a line's object: the checks rollouts and prompts files share."""
    if not isinstance(obj, dict):
        raise InputError(f"{at}: expected a JSON object, found {type(obj).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        which = "both" if has_prompt else "neither"
        raise InputError(f"{at}: expected exactly one of `prompt` and `messages`, found {which}")
    prompt = messages = None
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise InputError(f"{at}: `prompt` must be a string, found {type(prompt).__name__}")
    else:
        messages = _messages(obj["messages"], at)
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise InputError(f"{at}: `id` must be a string or an integer, found {type(rid).__name__}")
    return prompt, messages, rid


def _rollout(obj: object, n: int, at: str) -> Rollout:
    prompt, messages, rid = _prompt_fields(obj, at)
    if "completion" not in obj:
        raise InputError(f"{at}: missing `completion`")
    completion = obj["completion"]
    if not isinstance(completion, str):
        raise InputError(f"{at}: `completion` must be a string, found {type(completion).__name__}")
    if not completion:
        raise InputError(f"{at}: empty `completion` (nothing to score)")
    extra = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
    return Rollout(line=n, completion=completion, prompt=prompt, messages=messages, id=rid, extra=extra)


def _check_unique_id(rid, ids: dict, n: int, at: str) -> None:
    if rid is not None:
        if rid in ids:
            raise InputError(f"{at}: id {rid!r} already used on line {ids[rid]}")
        ids[rid] = n


def parse_rollouts(text: str, where: str) -> list[Rollout]:
    """The rollouts of JSONL `text` (see the module docstring); `where` names the file in errors."""
    rollouts: list[Rollout] = []
    ids: dict[str | int, int] = {}
    for n, obj, at in json_lines(text, where):
        r = _rollout(obj, n, at)
        _check_unique_id(r.id, ids, n, at)
        rollouts.append(r)
    if not rollouts:
        raise InputError(f"{where}: no rollouts (the file has no non-blank line)")
    return rollouts


def _read_jsonl_text(path: str | Path, what: str) -> str:
    where = str(path)
    data = read_text_file(
        Path(path),
        where,
        what,
        max_rollouts_bytes(),
        f"set {ENV_MAX_BYTES}=BYTES to raise it",
        "not JSONL text",
    )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{where}: line {line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_rollouts(path: str | Path) -> list[Rollout]:
    """The rollouts of the JSONL file `path`, in file order; one-line InputError otherwise."""
    return parse_rollouts(_read_jsonl_text(path, "rollouts file"), str(path))


# ---- prompts files: the same lines without a completion (the input of `rank1 generate`) ----


@dataclass(frozen=True)
class PromptLine(_PromptFields):
    """One line of a prompts file: exactly one of `prompt` and `messages` is set. A `completion`
    field is ignored (a rollouts file serves as a prompts file); other fields are kept in `extra`."""

    line: int
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    id: str | int | None = None
    extra: dict = field(default_factory=dict)


def parse_prompts(text: str, where: str) -> list[PromptLine]:
    """The prompts of JSONL `text`: rollout lines without `completion` (same checks, same errors)."""
    prompts: list[PromptLine] = []
    ids: dict[str | int, int] = {}
    for n, obj, at in json_lines(text, where):
        prompt, messages, rid = _prompt_fields(obj, at)
        _check_unique_id(rid, ids, n, at)
        extra = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
        prompts.append(PromptLine(line=n, prompt=prompt, messages=messages, id=rid, extra=extra))
    if not prompts:
        raise InputError(f"{where}: no prompts (the file has no non-blank line)")
    return prompts


def read_prompts(path: str | Path) -> list[PromptLine]:
    """The prompts of the JSONL file `path`, in file order; one-line InputError otherwise."""
    return parse_prompts(_read_jsonl_text(path, "prompts file"), str(path))
