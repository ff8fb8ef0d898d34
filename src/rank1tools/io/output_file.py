"""A single output FILE (rank1 generate's JSONL), under the same contract as output folders (io/outputs.py).

- the path is resolved and checked against the inputs, and against live runs' and rank1 outputs
  (io/output_nesting.py), as a folder target is;
- one run at a time: the target's lock `.NAME.lock` (io/output_lock.OutputLock) is held for the
  whole run;
- the lines are written to a staging file beside the target (`.NAME.tmp-PID-*`), renamed over
  the target only when complete (os.replace: the file is the old one or the new one, never a
  part); a failed or interrupted run removes it, and a stale one is removed by the next run;
- an existing target is replaced only with `--force`, and only when rank1 wrote it: an empty
  file, or a JSONL file whose first line carries `"generation": {"tool": "rank1tools ..."}`
  (every line rank1 writes carries its provenance; there is no header line and no sidecar, so
  nothing is written outside the file the user named).

Torch-free.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError
from ..signals import deferred_signals, pause_for_test
from .output_lock import OutputLock
from .output_nesting import check_inner, check_outer
from .outputs import _HELD, completed, follow_umask, output_errors, resolve_output

PROVENANCE_KEY = "generation"  # the object every line rank1 writes into a JSONL output carries
_FIRST_LINE_LIMIT = 1 << 24


def _written_by_rank1(path: Path) -> str | None:
    """None when the file at `path` is empty or its first line carries rank1's provenance; else why not."""
    try:
        with open(path, "rb") as f:
            first = f.readline(_FIRST_LINE_LIMIT)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not first.strip():
        return None if os.path.getsize(path) == 0 else "its first line is blank"
    try:
        obj = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "its first line is not JSON"
    tool = obj.get(PROVENANCE_KEY, {}).get("tool") if isinstance(obj, dict) else None
    if isinstance(tool, str) and tool.startswith("rank1tools"):
        return None
    return f'its first line has no "{PROVENANCE_KEY}": {{"tool": "rank1tools ..."}} record'


def html_written_by_rank1(path: Path) -> str | None:
    """None when the file at `path` is empty or a page `rank1 report` wrote: its first 512 bytes
    hold `<meta name="generator" content="rank1tools ...">`; else why not."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not head:
        return None
    if b'<meta name="generator" content="rank1tools' in head:
        return None
    return 'no <meta name="generator" content="rank1tools ..."> near its start'


def check_replaceable_file(target: Path, *, force: bool, label: str, written_by=None) -> None:
    """Refuse an existing `target` unless it is a regular file, --force is given and rank1 wrote it
    (`written_by(path)`: None when rank1 wrote it, else why not; default: a JSONL file's first line)."""
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_file():
        raise OutputError(f"{label}: exists and is not a regular file")
    if not force:
        raise OutputError(f"{label}: already exists; pass --force to replace it")
    why = (written_by or _written_by_rank1)(target)
    if why is not None:
        raise OutputError(
            f"{label}: exists and was not written by rank1 ({why}); "
            "--force replaces only files rank1 wrote: remove it yourself or choose another --out"
        )


def check_output_file(
    out: str | os.PathLike,
    *,
    force: bool,
    inputs=(),
    label: str | None = None,
    written_by=None,
    inside_outputs: bool = False,
) -> Path:
    """Resolve and check an output file before anything is opened (the run checks again, under its
    lock); `written_by`, `inside_outputs`: as for staged_file."""
    label = label or os.fspath(out)
    target = resolve_output(out, inputs=inputs, label=label)
    check_outer(target, label, held=_HELD.__contains__, inside_outputs=inside_outputs)
    check_replaceable_file(target, force=force, label=label, written_by=written_by)
    return target


@contextmanager
def staged_file(
    out: str | os.PathLike,
    *,
    force: bool,
    inputs=(),
    label: str | None = None,
    written_by=None,
    inside_outputs: bool = False,
):
    """Lock and check the output file `out`, yield a staging file beside it to write, and rename it
    over `out` when the block succeeds; on any failure the staging file is removed and `out` is
    untouched. Yields the staging path (the target is `resolve_output(out)`). `written_by`: how an
    existing file is recognised as rank1's (check_replaceable_file); `inside_outputs`: the file may
    lie inside a finished rank1 output folder (check_outer)."""
    label = label or os.fspath(out)
    target = resolve_output(out, inputs=inputs, label=label)
    check_outer(target, label, held=_HELD.__contains__, inside_outputs=inside_outputs)
    lock = OutputLock(target, label).acquire()
    staging = None
    try:
        check_outer(
            target, label, held=_HELD.__contains__, inside_outputs=inside_outputs
        )  # a run that started meanwhile
        check_inner(target, label)
        check_replaceable_file(target, force=force, label=label, written_by=written_by)
        with output_errors(target):
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
            os.close(fd)
            staging = Path(name)
            follow_umask(staging, directory=False)
        pause_for_test("staged")
        yield staging
        check_replaceable_file(target, force=force, label=label, written_by=written_by)
        with deferred_signals(), output_errors(target):
            pause_for_test("publishing")
            os.replace(staging, target)
            staging = None
            completed[target] = label
    finally:
        if staging is not None:
            try:
                os.unlink(staging)
            except OSError:
                pass
        lock.release()
