"""JSON helpers: reading JSON input files, and JSON-safe output for the CLI and written files."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import InputError


def read_json_file(path: str | Path, what: str, where: str | None = None) -> object:
    """The parsed JSON of an input file; any failure is an InputError naming the file.

    RecursionError included: json raises it on deeply nested input (`[[[[...`), a few kB suffice.
    `what` names the file's role in the message ("config.json", "index"); `where` how the message
    names the file (default: its path; a Hub source names it by its hf:// address, not the cache).
    """
    where = where or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{where}: cannot read {what} ({e.strerror or e})") from None
    except ValueError as e:  # UnicodeDecodeError
        raise InputError(f"{where}: unreadable {what} ({' '.join(str(e).split())[:200]})") from None
    return parse_json_text(text, what, where)


def parse_json_text(text: str, what: str, where: str) -> object:
    """json.loads with read_json_file's one-line errors (for text already read, e.g. to hash it)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{where}: unreadable {what} (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, int too long to convert
        raise InputError(f"{where}: unreadable {what} ({' '.join(str(e).split())[:200]})") from None


def json_safe(x):
    """NaN and infinities become null (JSON has no NaN); containers are converted recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
