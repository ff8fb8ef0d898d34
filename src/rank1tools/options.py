"""Parsers for option values given as text (--steps, --rank, --max-shard-size, numbers).

Pure and torch-free, so the CLI can refuse a bad value at once. Numbers are ASCII digits only:
`int()` and `\\d` also accept other scripts' digits (`int("٢٠") == 20`), which no user means.
Every refusal is a UsageError (exit code 2) with one line naming the option and the value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from .errors import UsageError

INT64_MAX = 2**63 - 1  # steps and counts end up in int64 tensors and JSON readers' int64
_ASCII_INT = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # ASCII decimal, no `_`
_RANK_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")
SIZE_UNITS = {
    "": 1, "b": 1,
    # decimal, as huggingface_hub.serialization.parse_size_to_int (and save_pretrained's "5GB")
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def ascii_int(text: str) -> int | None:
    """A non-negative integer written in ASCII digits and below 2**63, else None."""
    if not _ASCII_INT.fullmatch(text) or len(text.lstrip("0")) > 19:
        return None
    value = int(text)
    return value if value <= INT64_MAX else None


def parse_positive_int(text: str, option: str) -> int:
    """An integer option given as text: ASCII digits, at least 1."""
    value = ascii_int(str(text).strip())
    if value is None or value < 1:
        raise UsageError(f"{option} {text!r}: expected a positive integer")
    return value


MIN_CHECKPOINTS = 3  # fit-pls: a line through 2 points always fits


def check_min_checkpoints(n: int) -> int:
    if n < MIN_CHECKPOINTS:
        raise UsageError(f"--min-checkpoints {n}: at least {MIN_CHECKPOINTS} (a line through 2 points always fits)")
    return n


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
class RankSpec:
    """A rank as a count (`8`) or a fraction of min(m, n) (`1%`)."""

    text: str
    count: int | None = None
    fraction: float | None = None

    def resolve(self, shape: tuple[int, ...]) -> int:
        if self.count is not None:
            return self.count
        from .math.spectrum import rank_for_fraction  # noqa: PLC0415 (torch only when a rank is used)

        return rank_for_fraction(self.fraction, (shape[0], shape[1]))

    @property
    def folder(self) -> str:
        return "rank-" + self.text.replace("%", "pct")


def parse_ranks(spec: str) -> list[RankSpec]:
    """`8`, `1%`, or a comma list `1,2,4,8` / `1%,8`."""
    if not str(spec).strip():
        raise UsageError("--rank: give at least one rank")
    out = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            raise UsageError(f"--rank {spec!r}: empty item in the list")
        m = _RANK_PERCENT.fullmatch(part)
        if m:
            frac = float(m.group(1)) / 100
            if not 0 < frac <= 1:
                raise UsageError(f"--rank {part}: a percentage must be in (0%, 100%]")
            out.append(RankSpec(part, fraction=frac))
            continue
        count = ascii_int(part[1:] if part.startswith("-") else part)
        if count is None:
            raise UsageError(f"--rank {part!r}: expected an integer (8) or a percentage of min(m, n) (1%)")
        if part.startswith("-") or count < 1:
            raise UsageError(f"--rank {part}: must be at least 1")
        out.append(RankSpec(part, count=count))
    if len({r.folder for r in out}) != len(out):
        raise UsageError(f"--rank {spec}: a rank is repeated")
    return out


_DEVICE = re.compile(r"auto|cpu|cuda(?::[0-9]{1,4})?")


def check_device(spec: str) -> str:
    """`--device` syntax (auto, cpu, cuda, cuda:N), checked without importing torch; whether the
    device exists is checked when the command starts (rank1tools.device)."""
    if not _DEVICE.fullmatch(str(spec)):
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return spec


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # --dtype of the commands writing checkpoints


def check_choice(value: str, option: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r}: expected one of {', '.join(choices)}")
    return value


def parse_number(value: str | float, option: str, *, at_least: float | None = None, above: float | None = None,
                 at_most: float | None = None, integer: bool = False) -> float | int:
    """A numeric option: ASCII decimal text (`0.5`, `-2`, `1e-3`; an integer option: digits only),
    finite, within the given bounds. Python's own literals beyond that are refused, because float()
    and int() would read them silently: `0_5` as 5, `1_0` as 10, `inf`, `nan`, other scripts' digits."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # a default, already a number
        number, text = value, value
    else:
        text = str(value).strip()
        if integer:
            number = ascii_int(text)
            if number is None:
                raise UsageError(f"{option} {value!r}: expected a whole number in ASCII digits, like 3")
        else:
            if not _NUMBER.fullmatch(text):
                raise UsageError(f"{option} {value!r}: expected a number in ASCII digits, like 0.5, -2 or 1e-3")
            number = float(text)
    if not math.isfinite(number):
        raise UsageError(f"{option} {text}: must be a finite number")
    if at_least is not None and number < at_least:
        raise UsageError(f"{option} {text}: must be at least {number_label(at_least)}")
    if above is not None and number <= above:
        raise UsageError(f"{option} {text}: must be greater than {number_label(above)}")
    if at_most is not None and number > at_most:
        raise UsageError(f"{option} {text}: must be at most {number_label(at_most)}")
    return number


def check_finite(value: float, option: str) -> float:
    import math

    if not math.isfinite(value):
        raise UsageError(f"{option} {value}: must be a finite number")
    return value


def parse_step_list(text: str, option: str) -> list[int]:
    """Steps given as `500` or `500,1000,2000` (ASCII digits; duplicates kept once, in order given)."""
    items = [p.strip() for p in str(text).split(",")]
    steps = [ascii_int(p) for p in items]
    if any(v is None for v in steps):
        raise UsageError(f"{option} {text!r}: expected a step or a list of steps like 500,1000")
    return list(dict.fromkeys(steps))


def parse_step(text: str, option: str) -> int:
    """One step (ASCII digits): `--history-until`, `--from`, `--to` (a list there was read as its first item)."""
    value = ascii_int(str(text).strip())
    if value is None:
        raise UsageError(f"{option} {text!r}: expected one step, like 500")
    return value


def parse_number_list(text: str, option: str) -> list[float]:
    """Finite real numbers given as `0.7` or `0.6,0.7,0.8` (ASCII; duplicates kept once)."""
    items = [p.strip() for p in str(text).split(",")]
    if not all(_NUMBER.fullmatch(p) for p in items):
        raise UsageError(f"{option} {text!r}: expected a number or a list of numbers like 0.6,0.7")
    values = [float(p) for p in items]
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option} {text!r}: numbers must be finite")
    return list(dict.fromkeys(values))


def number_label(value: float) -> str:
    """A number as a folder-name part: shortest round-trip text, `0.7`, `1.7`, `-0.5`, `1e-05`."""
    return repr(float(value)) if not float(value).is_integer() else str(int(value))
