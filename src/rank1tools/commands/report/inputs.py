"""What `rank1 report` reads: each folder recognised by the record rank1 leaves in it
(docs/commands/report.md#inputs) — its provenance `rank1tools.json` (`command`), or for a factor
store or fit store written before provenance existed, its manifest's `format` — and the tables
the sections and the verdict are made of. A demo folder stands for itself (results.json) and for the
command outputs inside it. Anything else is refused with one line naming the folder (exit 3)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InputError
from ...io.outputs import MARKER_FILE
from ...jsonutil import json_lines, read_json_file

PROVENANCE = MARKER_FILE
EXTRAPOLATION = "rank1tools-extrapolation.json"
ROUNDING = "rank1tools-rounding.json"
# the commands whose outputs the page shows, in the order of its sections
KINDS = ("decompose", "fit-pls", "linearity", "extrapolate", "reconstruct", "backtest", "logprobs", "demo")
_MANIFEST_KINDS = {"rank1tools.factors": "decompose", "rank1tools.pls-fits": "fit-pls"}
_MAX_JSON = 1 << 28  # a table file larger than this is not one rank1 wrote for these commands


@dataclass
class Input:
    """One recognised output: its kind (a command name), folder, the name the page gives it (as
    typed; `DEMO/sub` inside a demo), its provenance record ({} for an older store) and, for
    extrapolate and reconstruct, the checkpoint folders it wrote (one, or one per target/rank)."""

    kind: str
    path: Path
    label: str
    provenance: dict
    targets: list[Path] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    def json(self, name: str, folder: Path | None = None) -> dict:
        """A JSON object file of this output (read once)."""
        path = (folder or self.path) / name
        if path not in self._cache:
            self._cache[path] = read_json(path)
        return self._cache[path]

    def jsonl(self, name: str) -> list[dict]:
        """The rows of one of this output's JSON Lines tables (read once)."""
        path = self.path / name
        if path not in self._cache:
            self._cache[path] = read_jsonl(path)
        return self._cache[path]

    def where(self, name: str, folder: Path | None = None) -> str:
        """How the page names one of this output's files: its label, then the file."""
        rel = "" if folder is None or folder == self.path else f"{folder.name}/"
        return f"{self.label.rstrip('/')}/{rel}{name}"


def _read_record(path: Path, key: str) -> dict | None:
    """The JSON object in `path` when its `key` starts with "rank1tools"; None when absent or not rank1's."""
    if not path.is_file():
        return None
    data = read_json_file(path, path.name)
    if isinstance(data, dict) and str(data.get(key, "")).startswith("rank1tools"):
        return data
    return None


def _kind(folder: Path) -> tuple[str | None, dict | None]:
    """(kind, provenance) of a rank1 output folder; (None, record or None) when it is not one the page shows."""
    record = _read_record(folder / PROVENANCE, "tool")
    if record is not None:
        command = str(record.get("command", ""))
        return (command if command in KINDS else None), record
    manifest = _read_record(folder / "manifest.json", "format")
    if manifest is not None and manifest.get("format") in _MANIFEST_KINDS:
        return _MANIFEST_KINDS[manifest["format"]], {}
    return None, None


def _targets(folder: Path, record: dict, marker: str) -> list[Path]:
    """The checkpoint folders an extrapolate/reconstruct output holds: itself, or those its
    provenance lists under `outputs` (each holding `marker`)."""
    if (folder / marker).is_file():
        return [folder]
    names = record.get("outputs") or []
    return [folder / str(n) for n in names if isinstance(n, str) and (folder / n / marker).is_file()]


def _recognised(folder: Path, label: str, known: tuple[str | None, dict | None] | None = None) -> Input | None:
    """The output in `folder`, or None; `known`: its `_kind`, when the caller has read it already."""
    kind, record = known or _kind(folder)
    if kind is None:
        return None
    found = Input(kind, folder, label, record or {})
    if kind == "extrapolate":
        found.targets = _targets(folder, found.provenance, EXTRAPOLATION)
    elif kind == "reconstruct":
        found.targets = _targets(folder, found.provenance, ROUNDING)
    return found


def recognise(arg: str) -> list[Input]:
    """The outputs `arg` names: one, or a demo and the outputs inside it (in name order)."""
    folder = Path(arg)
    if not folder.exists():
        raise InputError(f"{arg}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{arg}: not a folder; rank1 report reads output folders rank1 wrote")
    kind, record = _kind(folder)
    if kind is None:
        what = f"a `rank1 {record.get('command')}` output" if record else "not an output folder rank1 wrote"
        raise InputError(
            f"{arg}: {what}; rank1 report reads the outputs of {', '.join(KINDS)} "
            f"(recognised by their {PROVENANCE} or manifest.json)"
        )
    found = [_recognised(folder, arg, (kind, record))]
    if kind == "demo":
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
            inner = _recognised(child, f"{arg.rstrip('/')}/{child.name}")
            if inner is not None and inner.kind != "demo":
                found.append(inner)
    return found


def recognise_all(args: list[str]) -> list[Input]:
    """Every output the arguments name, each folder once (the first name given for it)."""
    seen: set[str] = set()
    inputs: list[Input] = []
    for arg in args:
        for inp in recognise(arg):
            real = os.path.realpath(inp.path)
            if real not in seen:
                seen.add(real)
                inputs.append(inp)
    return inputs


# ---------------------------------------------------------------------------------------------
# the tables


def read_json(path: Path) -> dict:
    """A JSON object file of an output; InputError naming it otherwise."""
    if not path.is_file():
        raise InputError(f"{path}: missing (the output is incomplete: rerun the command that wrote it)")
    if path.stat().st_size > _MAX_JSON:
        raise InputError(f"{path}: larger than {_MAX_JSON >> 20} MiB; not a table rank1 wrote")
    data = read_json_file(path, path.name)
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object")
    return data


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines table (null read as NaN where a number is expected by the caller)."""
    if not path.is_file():
        raise InputError(f"{path}: missing (the output is incomplete: rerun the command that wrote it)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    rows = []
    for _, row, at in json_lines(text, str(path)):  # one-line errors, nesting too deep included
        if not isinstance(row, dict):
            raise InputError(f"{at}: not a JSON object")
        rows.append(row)
    return rows


def number(value) -> float:
    """A table's number as a float; NaN for null or a non-number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)
