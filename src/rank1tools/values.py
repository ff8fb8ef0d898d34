"""Plain values written as text, parsed the same everywhere: ASCII integers, byte sizes, step selections.

Pure and torch-free, and below every layer: io/ reads step numbers from folder names and metrics
files with these, and options.py (the CLI-side option parsers) re-exports them. A value is parsed
once: the CLI parses what the user typed into a typed value (`StepSelection`, bytes from
`shard_size`) and hands that down; a library caller's text is parsed by the same function where
the value enters (`StepSelection.of`, `shard_size`), which passes a typed value through. Numbers are ASCII
digits only: `int()` and `\\d` also accept other scripts' digits (`int("٢٠") == 20`), which no user
means. Every refusal is a UsageError (exit code 2) with one line naming the option and the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from .errors import UsageError

INT64_MAX = 2**63 - 1  # steps and counts end up in int64 tensors and JSON readers' int64
_ASCII_INT = re.compile(r"[0-9]+")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")
SIZE_UNITS = {
    "": 1,
    "b": 1,
    # decimal, as huggingface_hub.serialization.parse_size_to_int (and save_pretrained's "5GB")
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def ascii_int(text: str) -> int | None:
    """A non-negative integer written in ASCII digits and below 2**63, else None."""
    if not _ASCII_INT.fullmatch(text) or len(text.lstrip("0")) > 19:
        return None
    value = int(text)
    return value if value <= INT64_MAX else None


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    """Bytes from `5GB`, `500MB`, `2GiB` or a plain number of bytes; units are case-insensitive.
    A fractional value (`1.5GB`) is allowed as in huggingface_hub; the result must be >= 1 byte."""
    m = _SIZE.fullmatch(str(text).strip())
    unit = m.group(2).lower() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise UsageError(f"{option} {text!r}: expected a size like 5GB, 500MB or a number of bytes")
    value = int(Decimal(m.group(1)) * SIZE_UNITS[unit])  # Decimal: exact, no float rounding
    if value < 1:
        raise UsageError(f"{option} {text!r}: must be at least 1 byte")
    return value


def shard_size(value: int | str, option: str = "--max-shard-size") -> int:
    """--max-shard-size in bytes: text (`5GB`) parsed by parse_size, a number of bytes kept (at
    least 1). The one place the option's value is normalised (the CLI, and the options classes of
    reconstruct and extrapolate for a library caller's text)."""
    if isinstance(value, str):
        return parse_size(value, option)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{option} {value!r}: must be at least 1 byte")
    return value


def steps_text(steps: list[int]) -> str:
    """Checkpoint steps for a message: all of up to 8, else the first two, ..., the last."""
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def parse_steps(spec: str, option: str = "--steps") -> tuple[str, object]:
    """Parse a step selection (`--steps`, or an alias: the message names `option`, the one typed): a
    list `50,100,200` -> ("list", [50, 100, 200]), or an inclusive range `START:STOP[:EVERY]` with
    optional parts -> ("range", (start, stop, every)), None for a missing part."""
    bad = UsageError(f"{option} {spec!r}: expected a list like 50,100,200 or a range like 10:100:10")
    s = str(spec).strip()
    if ":" in s:
        parts = [p.strip() for p in s.split(":")]
        if len(parts) > 3:
            raise bad
        values = [None if p == "" else ascii_int(p) for p in parts] + [None] * (3 - len(parts))
        if any(v is None and p != "" for v, p in zip(values, parts)):
            raise bad
        start, stop, every = values
        if every == 0:
            raise bad
        return "range", (start, stop, every)
    items = [p.strip() for p in s.split(",")]
    steps = [ascii_int(p) for p in items]
    if any(v is None for v in steps):  # also an empty item: "10,,20", "5,", ""
        raise bad
    return "list", steps


@dataclass(frozen=True)
class StepSelection:
    """A parsed step selection (docs/cli.md#step-selections): the listed steps `listed`, or the
    inclusive range `start:stop:every` (None for a missing part). `text` is the selection as typed
    (what outputs record) and `option` the option it was typed under (`--steps`, or an alias such
    as fit-pls --window), which every message about it names."""

    text: str
    kind: str  # "list" or "range"
    listed: tuple[int, ...] = ()
    start: int | None = None
    stop: int | None = None
    every: int | None = None
    option: str = "--steps"

    @classmethod
    def parse(cls, text: str, option: str = "--steps") -> StepSelection:
        kind, value = parse_steps(text, option)
        if kind == "list":
            return cls(text, kind, tuple(value), option=option)
        start, stop, every = value
        return cls(text, kind, start=start, stop=stop, every=every, option=option)

    @classmethod
    def of(cls, value: StepSelection | str | None, option: str = "--steps") -> StepSelection | None:
        """The one entry point: a selection passes through, text is parsed (once), None is None."""
        if value is None or isinstance(value, StepSelection):
            return value
        return cls.parse(value, option)

    def missing(self, steps: Iterable[int]) -> list[int]:
        """Listed steps that `steps` lacks, in the order given (a range misses none)."""
        have = set(steps)
        return [s for s in self.listed if s not in have]

    def pick(self, steps: Iterable[int]) -> list[int]:
        """The steps of `steps` selected: a list's steps (sorted, once each; check `missing` first),
        or those of `steps` inside the range, in their order."""
        if self.kind == "list":
            return sorted(set(self.listed))
        return [s for s in steps if self.contains(s)]

    def contains(self, step: int) -> bool:
        if self.kind == "list":
            return step in self.listed
        return (
            (self.start is None or step >= self.start)
            and (self.stop is None or step <= self.stop)
            and (self.every is None or (step - (self.start or 0)) % self.every == 0)
        )

    def __str__(self) -> str:
        return self.text
