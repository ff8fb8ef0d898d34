"""Parsers for option values given as text (--steps, --rank, --max-shard-size, numbers).

Pure and torch-free, so the CLI can refuse a bad value at once. Numbers are ASCII digits only:
`int()` and `\\d` also accept other scripts' digits (`int("٢٠") == 20`), which no user means.
Every refusal is a UsageError (exit code 2) with one line naming the option and the value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import UsageError

# the parsers io/ needs too live in values.py (io/ does not import this CLI-side module); re-exported here
from .values import INT64_MAX, SIZE_UNITS, ascii_int, parse_size, parse_steps  # noqa: F401

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")  # ASCII decimal, no `_`
_RANK_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")


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


def check_choice(value: str, option: str, choices: tuple[str, ...], message: str = "expected one of") -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r}: {message} {', '.join(choices)}")
    return value


def parse_number(
    value: str | float,
    option: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    integer: bool = False,
) -> float | int:
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
