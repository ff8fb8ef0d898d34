"""The optional exact-match scorer of `rank1 generate --answer-field NAME` (docs/commands/generate.md#scoring).

A completion's answer is the content of its last `\\boxed{...}` (braces balanced), else its last
number; it is correct when it equals the prompt line's answer field: as numbers when both read as
numbers (commas dropped, so "1,000" = "1000.0"), else as text with surrounding spaces stripped.
Anything finer (units, LaTeX, multiple choice) is the user's verifier's job. Torch-free.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = "\\boxed{"


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` whose braces close, or None."""
    at = text.rfind(_BOXED)
    while at != -1:
        depth, i = 1, at + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[at + len(_BOXED) : i - 1]
        at = text.rfind(_BOXED, 0, at)
    return None


def extract_answer(text: str) -> str | None:
    """The last `\\boxed{}` content, else the last number, of a completion (None: neither)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> float | None:
    cleaned = text.strip().replace(",", "")
    if not _NUMBER.fullmatch(cleaned):
        return None
    return float(cleaned)


def is_correct(completion: str, reference: object) -> bool:
    """Whether the completion's answer (extract_answer) equals `reference` (a string or a number)."""
    answer = extract_answer(completion)
    if answer is None:
        return False
    want = str(reference).strip()
    a, b = _as_number(answer), _as_number(want)
    if a is not None and b is not None:
        return a == b
    return answer == want
