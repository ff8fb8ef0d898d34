"""Resumable work folders: `.NAME.partial` beside an output target, and the ledger of the units
of work finished in it.

A command that can be resumed (decompose; reconstruct, linearity and extrapolate with `--executor
ray`) works in `.NAME.partial/` instead of a throw-away `.NAME.tmp-*` folder. Its plan file (the
inputs, options and plan of the work, as bytes) says which command the folder belongs to: the
same command rerun after an interruption finds the same plan and keeps the finished units; any
other command starts over. The ledger records each finished unit's small results in
`units/<key>.json`, written atomically after the unit's files are complete, so a unit is either
recorded and whole or redone. Keys are made by the caller from unit positions, never from tensor
names (a name never becomes a path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import OutputError
from .outputs import follow_umask, output_errors

_KEY = re.compile(r"[0-9a-z_-]{1,64}")


def partial_folder(target: Path) -> Path:
    """Where the work for `target` happens: `.NAME.partial` beside it."""
    return target.parent / f".{target.name}.partial"


def open_work_folder(target: Path, plan_file: str, plan: bytes) -> Path:
    """The work folder of `target`, kept when it holds this `plan` (same command: resume), made
    anew otherwise; `plan` is (re)written to `plan_file` inside it."""
    work = partial_folder(target)
    with output_errors(work):
        if os.path.lexists(work) and (work.is_symlink() or not work.is_dir()):
            raise OutputError(f"{work}: exists and is not a folder that rank1 made; remove it and rerun")
        if work.exists() and (not (work / plan_file).is_file() or (work / plan_file).read_bytes() != plan):
            shutil.rmtree(work)  # an interrupted run of a different command: start over
        if not work.exists():
            work.mkdir(parents=True)
            follow_umask(work, directory=True)
        (work / plan_file).write_bytes(plan)
    return work


def discard_unless_resumed(work: Path, resumed: bool) -> None:
    """A data error found mid-run: drop the work folder, unless it holds work of an earlier run
    (a rerun after the input is fixed still keeps that)."""
    if not resumed:
        shutil.rmtree(work, ignore_errors=True)


def make_folder(folder: Path) -> Path:
    """`folder` (inside a work folder), created under the user's umask when missing."""
    with output_errors(folder):
        if not folder.exists():
            folder.mkdir(parents=True)
            follow_umask(folder, directory=True)
    return folder


class UnitLedger:
    """The finished units of a work folder: `units/<key>.json` each, holding the unit's results."""

    def __init__(self, work: Path):
        self.folder = make_folder(work / "units")

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"ledger key {key!r}: letters, digits, '_' and '-' only")
        return self.folder / f"{key}.json"

    def finished(self, key: str) -> dict | None:
        """The results recorded for `key`, or None when the unit is not finished (or its record is damaged)."""
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return None
        return data if isinstance(data, dict) and data.get("key") == key else None

    def record(self, key: str, results: dict) -> dict:
        """Record `key` as finished with `results` (JSON data: floats round-trip exactly, NaN included);
        returns the record as `finished` will read it back."""
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        text = json.dumps({"key": key, **results}, sort_keys=True)
        with output_errors(path):
            tmp.write_text(text + "\n", encoding="utf-8")
            os.replace(tmp, path)
        return json.loads(text)
