"""Outputs inside or around other outputs (docs/cli.md, "What rank1 will never do to your files").

rank1 replaces an output folder whole (its publishing swaps the folder; `--force` replaces it), so
an output must not lie inside another one, nor contain one:

- inside or around the output of a live run (its `.NAME.lock` is held): that run's swap would
  delete this output, or this one's would delete that run's. Checked before anything is created
  and again under the run's own lock: each of two racing runs takes its lock first and then
  looks, so at least one of them sees the other;
- inside an existing rank1 output folder: a later `--force` on that folder, or a rerun of the
  command that wrote it, would delete this output with it. A process may write inside an output
  whose lock it holds itself (the demo writes its analyses inside its own folder);
- inside a staging or work folder of a run (`.NAME.tmp-*`, `.NAME.old-*`, `.NAME.partial`):
  it is removed when that run ends, or by the next one.

A live run is found by probing its lock file with a shared lock, released at once; the file is
never created here. Torch-free.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import OutputError
from .outputs import is_rank1_output

_STAGING_NAME = re.compile(r"\..+\.(?:tmp-\d+-.*|old-\d+-.*|partial)", re.DOTALL)
_LOCK_NAME = re.compile(r"\..+\.lock", re.DOTALL)


def lock_file(target: Path) -> Path:
    """The lock file of an output target: `.NAME.lock` beside it."""
    return target.parent / f".{target.name}.lock"


def live_holder(path: Path) -> str | None:
    """'pid N: COMMAND' when a live rank1 run holds the lock file `path`, else None."""
    try:  # O_NONBLOCK: a FIFO planted under a lock file's name must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            return read_holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return f"pid {int(data['pid'])}: {' '.join(map(str, data.get('argv') or []))}".strip()
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "pid unknown"


def check_outer(target: Path, label: str, held: Callable[[Path], bool], *, inside_outputs: bool = False) -> None:
    """Refuse `target` inside a live run's output, a rank1 output or a staging folder (module doc).
    `held(folder)`: this process holds the lock of `folder` (its own output: allowed).
    `inside_outputs`: a finished rank1 output may hold it (`rank1 report`'s page in demo-out)."""
    for outer in target.parents:
        if outer.parent == outer:
            break
        if _STAGING_NAME.fullmatch(outer.name):
            raise OutputError(
                f"{label}: lies inside {outer}, a staging folder of a rank1 run (removed when that "
                "run ends); choose another --out"
            )
        if held(outer):
            continue
        holder = live_holder(lock_file(outer))
        if holder is not None:
            raise OutputError(
                f"{label}: lies inside {outer}, the output of another rank1 run that is still "
                f"writing ({holder}); it would be deleted when that run finishes: wait for it or "
                "choose another --out"
            )
        if not inside_outputs and is_rank1_output(outer):
            raise OutputError(
                f"{label}: lies inside {outer}, an output folder of rank1; rank1 replaces its "
                "outputs whole (--force, a rerun), which would delete this one: choose an --out "
                "outside it"
            )


def check_inner(target: Path, label: str) -> None:
    """Refuse `target` when a live run writes an output inside it (its swap would delete that one)."""
    if target.is_symlink() or not target.is_dir():
        return
    for folder, _dirs, files in os.walk(target):  # symlinks are not followed
        for name in files:
            if _LOCK_NAME.fullmatch(name):
                holder = live_holder(Path(folder) / name)
                if holder is not None:
                    inner = Path(folder) / name[1 : -len(".lock")]
                    raise OutputError(
                        f"{label}: contains {inner}, the output of another rank1 run that is still "
                        f"writing ({holder}); replacing {label} would delete it: wait for it or "
                        "choose another --out"
                    )
