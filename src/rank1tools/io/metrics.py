"""Per-checkpoint metrics files for `fit-pls`: step -> value of one metric. Torch-free.

Formats (docs/formats.md, "Metrics files"):
  * CSV (comma; tab when the header has tabs and no comma, as `.tsv` files) and JSON Lines
    (`.jsonl`, `.ndjson`): one row per record, a step column and metric columns;
  * a JSON object `{"10": 0.5, ...}` (metric `value`), or a JSON list of row objects
    (`[{"step": 10, "value": 0.5}, ...]` is the simplest);
  * a Hugging Face / TRL `trainer_state.json`: rows are the entries of `log_history`.

The step column is the first of STEP_COLUMNS found (any row), or `step_column` when given. Every
other column with at least one number is a metric (`available`, in file order). Without `metric`,
the one metric that is not bookkeeping (`is_bookkeeping`) is chosen. Only the chosen metric's
values are checked: an empty CSV cell or a JSON null is a missing value (its step goes to
`missing_steps` unless another row gives it a value); a row without the column (JSON) simply did
not log it. Every refusal is one-line InputError (exit code 3) naming the file and the row.

The file must be a regular file of at most `max_metrics_bytes()` (RANK1_MAX_METRICS_BYTES,
default 256 MiB) holding text: a FIFO or device, a larger file, or a NUL byte is refused before
parsing. Parsing is linear in the file's size (a JSON object with a duplicated key is refused).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, UsageError
from ..jsonutil import json_lines, parse_json_text
from ..values import INT64_MAX, ascii_int
from .text_files import read_text_file

STEP_COLUMNS = ("step", "global_step", "Step", "_step")
# Never chosen by default (still selectable with --metric): epoch counters, clocks, throughput.
BOOKKEEPING = frozenset({"epoch", "_runtime", "_timestamp", "timestamp", "time", "wall_time", "total_flos"})
BOOKKEEPING_SUFFIXES = ("_runtime", "_per_second", "_timestamp")

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_STEP_TEXT = re.compile(r"([0-9]+)(?:\.0*)?")
ENV_MAX_BYTES = "RANK1_MAX_METRICS_BYTES"
DEFAULT_MAX_BYTES = 256 << 20  # far above any real run's log; bounds the memory a hostile file can take
SHOWN_COLUMNS = 30  # column lists in messages are cut after this many


@dataclass
class Metrics:
    path: str
    metric: str
    values: dict[int, float]  # step -> value, in step order
    available: list[str]  # metric names in the file, in file order
    sha256: str  # hex digest of the file's bytes
    missing_steps: list[int] = field(default_factory=list)  # steps whose value is empty / null
    step_column: str = "step"
    format: str = "csv"  # csv, tsv, jsonl, json, trainer_state


def is_bookkeeping(name: str) -> bool:
    return name in BOOKKEEPING or name.endswith(BOOKKEEPING_SUFFIXES)


class _Bad(Exception):
    """A cell's problem, phrased without the file and row (added by the caller)."""


def _show(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _value(raw: object, text: bool) -> float | None:
    """A metric cell: a finite float, or None for an empty cell / null; else _Bad. Strings are
    numbers only in CSV / TSV (`text`); in JSON a number must be a JSON number."""
    if raw is None:
        return None
    if isinstance(raw, str) and text:
        text = raw.strip()
        if text == "":
            return None
        if _NON_FINITE.fullmatch(text):
            raise _Bad(f"value {_show(raw)} is not finite")
        if not _NUMBER.fullmatch(text):
            raise _Bad(f"value {_show(raw)} is not a number")
        value = float(text)
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except OverflowError:
            raise _Bad(f"value {_show(raw)} is too large") from None
    else:
        raise _Bad(f"value {_show(raw)} is not a number")
    if not math.isfinite(value):
        raise _Bad(f"value {_show(raw)} is not finite")
    return value


def _is_number(raw: object, text: bool) -> bool:
    if isinstance(raw, str) and text:
        text = raw.strip()
        return bool(_NUMBER.fullmatch(text) or _NON_FINITE.fullmatch(text))
    return isinstance(raw, (int, float)) and not isinstance(raw, bool)


def _step(raw: object) -> int:
    """A step: ASCII digits (`10`, or `10.0` when integral), or a JSON integer / integral float."""
    if isinstance(raw, str):
        text = raw.strip()
        m = _STEP_TEXT.fullmatch(text)
        value = ascii_int(m.group(1)) if m else None
        if value is None:
            if re.fullmatch(r"-[0-9]+(?:\.[0-9]*)?", text):
                raise _Bad(f"step {_show(raw)} is negative")
            raise _Bad(f"step {_show(raw)} is not a non-negative integer" if text else "step is empty")
        return value
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise _Bad(f"step {_show(raw)} is not a non-negative integer")
    if isinstance(raw, float) and not (math.isfinite(raw) and raw.is_integer()):
        raise _Bad(f"step {_show(raw)} is not an integer")
    if raw < 0:
        raise _Bad(f"step {_show(raw)} is negative")
    if raw > INT64_MAX:
        raise _Bad(f"step {_show(raw)} is too large")
    return int(raw)


# --- reading the formats into rows: (where, {column: raw cell}) -------------------------------------


def _csv_rows(text: str, where: str) -> tuple[list[tuple[str, dict]], list[str], str]:
    header = next((line for line in io.StringIO(text) if line.strip()), "")
    delimiter = "\t" if "\t" in header and "," not in header else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[str, dict]] = []
    columns: list[str] | None = None
    try:
        for record in reader:
            if not record or all(not c.strip() for c in record):
                continue  # blank line
            if columns is None:
                columns = [c.strip() for c in record]
                if "" in columns:
                    raise InputError(f"{where}: line {reader.line_num}: header has an empty column name")
                counts = Counter(columns)
                dup = next((c for c in columns if counts[c] > 1), None)
                if dup is not None:
                    raise InputError(f"{where}: line {reader.line_num}: column {dup!r} appears twice in the header")
                continue
            if len(record) != len(columns):
                raise InputError(
                    f"{where}: line {reader.line_num}: {len(record)} cells, but the header has {len(columns)} columns"
                )
            rows.append((f"line {reader.line_num}", dict(zip(columns, record))))
    except csv.Error as e:
        raise InputError(f"{where}: line {reader.line_num}: unreadable CSV ({e})") from None
    if columns is None:
        raise InputError(f"{where}: empty metrics file")
    return rows, columns, "tsv" if delimiter == "\t" else "csv"


def _jsonl_rows(text: str, where: str) -> list[tuple[str, dict]]:
    rows = []
    for n, obj, at in json_lines(text, where):
        if not isinstance(obj, dict):
            raise InputError(f"{at}: expected a JSON object, found {type(obj).__name__}")
        rows.append((f"line {n}", obj))
    return rows


def _list_rows(items: list, prefix: str, where: str) -> list[tuple[str, dict]]:
    rows = []
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise InputError(f"{where}: {prefix}[{i}]: expected a JSON object, found {type(obj).__name__}")
        rows.append((f"{prefix}[{i}]", obj))
    return rows


def _columns(rows: list[tuple[str, dict]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, cells in rows:
        seen.update(dict.fromkeys(cells))
    return list(seen)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:SHOWN_COLUMNS]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_COLUMNS else "")


def max_metrics_bytes() -> int:
    """The largest metrics file read: $RANK1_MAX_METRICS_BYTES (bytes) if set, else 256 MiB."""
    raw = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    value = ascii_int(raw)  # ASCII digits only, as every number rank1 reads (no 1_000, no other scripts' digits)
    if not value:
        raise UsageError(f"{ENV_MAX_BYTES}={raw!r}: expected a positive number of bytes")
    return value


def _detect(path: Path, text: str) -> str:
    ext = path.suffix.lower()
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"
    if ext == ".json":
        return "json"
    if ext in (".csv", ".tsv"):
        return "csv"
    start = text.lstrip()
    if start.startswith("["):
        return "json"
    if start.startswith("{"):
        lines = list(itertools.islice((line for line in io.StringIO(text) if line.strip()), 2))
        if len(lines) > 1:
            try:
                if isinstance(json.loads(lines[0]), dict):
                    return "jsonl"
            except (ValueError, RecursionError):
                pass
        return "json"
    return "csv"


# --- the reader ------------------------------------------------------------------------------------


def read_metrics(path: str | Path, metric: str | None = None, step_column: str | None = None) -> Metrics:
    """Read one metric (step -> value) from a metrics file; see the module docstring."""
    where = str(path)
    p = Path(path)
    data = read_text_file(
        p, where, "metrics file", max_metrics_bytes(), f"set {ENV_MAX_BYTES}=BYTES to raise it", "not CSV or JSON text"
    )
    sha = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: metrics file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InputError(f"{where}: empty metrics file")

    kind = _detect(p, text)
    columns: list[str]
    if kind == "csv":
        rows, columns, kind = _csv_rows(text, where)
    elif kind == "jsonl":
        rows = _jsonl_rows(text, where)
        columns = _columns(rows)
    else:
        obj = parse_json_text(
            text, "metrics file", where, unique_keys=True
        )  # the bytes hashed above, not a second read
        if isinstance(obj, dict) and "log_history" in obj:
            if not isinstance(obj["log_history"], list):
                raise InputError(f"{where}: log_history is not a list")
            kind = "trainer_state"
            rows = _list_rows(obj["log_history"], "log_history", where)
        elif isinstance(obj, dict):
            rows = [(f"key {k!r}", {"step": k, "value": v}) for k, v in obj.items()]
        elif isinstance(obj, list):
            rows = _list_rows(obj, "", where)
        else:
            raise InputError(
                f"{where}: expected a JSON object {{step: value}}, a list of rows, "
                f"or a trainer_state.json with log_history; found {type(obj).__name__}"
            )
        columns = _columns(rows)
    if not rows:
        raise InputError(f"{where}: no rows in the metrics file")

    shown = _shown(columns)
    if step_column is not None:
        if step_column not in columns:  # a name the file lacks: fix the command line (exit 2, docs/cli.md)
            raise UsageError(f"{where}: no step column {step_column!r} (columns: {shown})")
        step_name = step_column
    else:
        step_name = next((c for c in STEP_COLUMNS if c in columns), None)
        if step_name is None:
            raise InputError(
                f"{where}: no step column ({' / '.join(STEP_COLUMNS)}; choose one with --step-column); columns: {shown}"
            )
    text = kind in ("csv", "tsv")
    numeric: set[str] = set()  # one pass over the cells (a column-by-row scan is quadratic on sparse JSON rows)
    for _, cells in rows:
        for c, raw in cells.items():
            if c not in numeric and _is_number(raw, text):
                numeric.add(c)
    available = [c for c in columns if c in numeric and c != step_name and c not in STEP_COLUMNS]

    if metric is None:
        candidates = [c for c in available if not is_bookkeeping(c)]
        if not candidates:
            raise InputError(f"{where}: no metric column (columns: {shown})")
        if len(candidates) > 1:
            raise UsageError(f"{where}: several metrics ({_shown(candidates)}); choose one with --metric")
        metric = candidates[0]
    elif metric not in available:  # absent: fix --metric (2); a column without numbers: fix the file (3)
        error = InputError if metric in columns else UsageError
        raise error(f"{where}: no metric {metric!r} (available: {_shown(available) or 'none'})")

    values: dict[int, float] = {}
    first: dict[int, str] = {}
    empty: set[int] = set()
    for loc, cells in rows:
        try:
            if step_name not in cells:
                if text:
                    raise _Bad(f"no {step_name!r}")
                if metric in cells:
                    raise _Bad(f"{metric!r} without {step_name!r}")
                continue  # a JSON row without the step and without the metric: another kind of entry
            if metric not in cells:
                continue
            step = _step(cells[step_name])
            value = _value(cells[metric], text)
        except _Bad as e:
            raise InputError(f"{where}: {loc}: {e}") from None
        if value is None:
            empty.add(step)
            continue
        if step in values and values[step] != value:
            raise InputError(
                f"{where}: {loc}: step {step} has {metric} {value!r}, but {first[step]} gave {values[step]!r}"
            )
        values.setdefault(step, value)
        first.setdefault(step, loc)
    if not values:
        raise InputError(f"{where}: no values of {metric!r} in the metrics file")
    return Metrics(
        path=where,
        metric=metric,
        values=dict(sorted(values.items())),
        available=available,
        sha256=sha,
        missing_steps=sorted(empty - values.keys()),
        step_column=step_name,
        format=kind,
    )


def align(metrics: Metrics, steps: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(steps with a checkpoint and a value, checkpoint steps without a value, value steps without
    a checkpoint), each sorted ascending and without repeats."""
    have = set(metrics.values)
    ckpt = set(steps)
    return sorted(ckpt & have), sorted(ckpt - have), sorted(have - ckpt)
