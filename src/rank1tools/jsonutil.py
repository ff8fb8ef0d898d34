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


class DuplicateKey(ValueError):
    """A JSON object names the same key twice (json.loads would keep the last value silently)."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} appears twice in one JSON object")
        self.key = key


def unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    """object_pairs_hook refusing a duplicated key (DuplicateKey)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return obj


def duplicate_key_line(text: str) -> int:
    """Line (1-based) of the first duplicated key of `text` (error path only: parsed again with
    json's pure-Python scanner, which tells where the offending object starts, and its members
    walked to the key's second occurrence)."""
    from json.decoder import JSONObject, scanstring
    from json.scanner import py_make_scanner

    found: list[int] = []

    def parse_object(s_and_end, *args, **kw):
        try:
            return JSONObject(s_and_end, *args, **kw)
        except DuplicateKey:
            if not found:  # the innermost object: the first to complete with a duplicate
                found.append(s_and_end[1])
            raise

    decoder = json.JSONDecoder(object_pairs_hook=unique_pairs)
    decoder.parse_object = parse_object
    decoder.scan_once = py_make_scanner(decoder)
    try:
        decoder.decode(text)
    except DuplicateKey:
        pass
    if not found:
        return 1
    plain = json.JSONDecoder()
    pos, seen, ws = found[0], set(), " \t\n\r"
    while True:  # members of the object: "key" : value , ...
        while text[pos] in ws + ",":
            pos += 1
        key_at = pos
        key, pos = scanstring(text, pos + 1)
        if key in seen:
            return text.count("\n", 0, key_at) + 1
        seen.add(key)
        while text[pos] in ws + ":":
            pos += 1
        _, pos = plain.raw_decode(text, pos)


def parse_json_text(text: str, what: str, where: str, *, unique_keys: bool = False) -> object:
    """json.loads with read_json_file's one-line errors (for text already read, e.g. to hash it).
    `unique_keys`: an object with a duplicated key is refused, naming the key and its line."""
    try:
        return json.loads(text, object_pairs_hook=unique_pairs if unique_keys else None)
    except DuplicateKey as e:
        raise InputError(f"{where}: line {duplicate_key_line(text)}: {e} ({what})") from None
    except RecursionError:
        raise InputError(f"{where}: unreadable {what} (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, int too long to convert
        raise InputError(f"{where}: unreadable {what} ({' '.join(str(e).split())[:200]})") from None


def json_lines(text: str, where: str):
    """(line number, parsed value, "WHERE: line N") of every non-blank line of JSONL `text`, with
    one-line InputErrors naming the line (a duplicated key, bad JSON, nesting too deep). Lines end at
    "\n" only (JSON strings may hold other line separators, such as U+2028)."""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        at = f"{where}: line {n}"
        try:
            obj = json.loads(line, object_pairs_hook=unique_pairs)
        except DuplicateKey as e:
            raise InputError(f"{at}: {e}") from None
        except RecursionError:
            raise InputError(f"{at}: unreadable JSON (nested too deeply)") from None
        except ValueError as e:  # JSONDecodeError, int too long to convert
            raise InputError(f"{at}: unreadable JSON ({' '.join(str(e).split())[:200]})") from None
        yield n, obj, at


def json_safe(x):
    """NaN and infinities become null (JSON has no NaN); containers are converted recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
