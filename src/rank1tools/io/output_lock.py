"""The lock of an output target, held for a whole run (docs/cli.md, "One run per output"), and
`locked_output`, which every command that writes enters first. See io/outputs.py for the contract.

Torch-free.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError
from .output_nesting import check_inner, check_outer, lock_file, read_holder
from .outputs import _HELD, _STAGING_INFIXES, check_replaceable, output_errors, resolve_output


class OutputLock:
    """Exclusive lock on an output target for the whole run (see module doc).

    The lock file `.NAME.lock` beside the target holds the holder's pid and command line, for the
    message a second run prints. It is removed on release; a killed holder's file is harmless
    (the kernel drops the flock with the process) and is reused by the next run.
    """

    def __init__(self, target: Path, label: str):
        self.target = target
        self.label = label
        self.path = lock_file(target)  # where the nesting checks look for a live run
        self.fd: int | None = None
        self.removed_stale: list[str] = []
        self.created: list[Path] = []  # folders made for the lock file, outermost first

    def acquire(self) -> OutputLock:
        self.created = _make_parents(self.target.parent)
        try:
            self._lock()
        except BaseException:
            self._remove_created()
            raise
        _HELD[self.target] = self
        self.removed_stale = remove_stale_staging(self.target)
        return self

    def _lock(self) -> None:
        busy = 0
        while True:
            try:
                with output_errors(self.path):
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OutputError:
                if os.path.isdir(self.target.parent) or busy > 100:
                    raise
                busy += 1  # the folder was removed by a run that made it and was refused: make it again
                self.created += _make_parents(self.target.parent)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if _only_probed(fd) and busy < 2000:  # another run looking (output_nesting): a moment
                    os.close(fd)
                    busy += 1
                    time.sleep(0.001)
                    continue
                holder = read_holder(fd)
                os.close(fd)
                raise OutputError(
                    f"{self.label}: another rank1 run is writing this output ({holder}); "
                    "wait for it to finish or stop it"
                ) from None
            # the previous holder may have unlinked the file between our open and our lock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        record = json.dumps({"pid": os.getpid(), "argv": _argv()}).encode()
        try:
            with output_errors(self.path):
                os.ftruncate(fd, 0)
                os.write(fd, record)  # the fd is at offset 0: freshly opened
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.pop(self.target, None)
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """Remove the folders made for the lock file that stayed empty (a refused or failed run
        leaves nothing, not even an empty folder in the place another run is about to publish)."""
        for folder in reversed(self.created):
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.created = []

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_staging(target: Path) -> list[str]:
    """Remove `.NAME.tmp-*` and `.NAME.old-*` beside `target`: only call with the target's lock held."""
    removed = []
    try:
        siblings = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in siblings:
        if any(entry.name.startswith(f".{target.name}{infix}") for infix in _STAGING_INFIXES):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    continue
            removed.append(entry.name)
    return removed


def _argv() -> list[str]:
    import rank1tools

    return rank1tools.COMMAND_LINE or [sys.argv[0]]


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p `folder`; returns the folders it made, outermost first."""
    missing = [f for f in (folder, *folder.parents) if not os.path.lexists(f)][::-1]
    made = []
    with output_errors(folder):
        for f in missing:
            try:
                os.mkdir(f)
            except FileExistsError:
                continue
            made.append(f)
    return made


def _only_probed(fd: int) -> bool:
    """True when the lock held on `fd`'s file is shared (another run probing it, output_nesting),
    not a run's exclusive lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


@contextmanager
def locked_output(out: str | os.PathLike, *, force: bool, inputs=(), label: str | None = None):
    """Resolve, check and lock an output target for the whole `with` block; yields the real path.
    Re-entrant in one process: a target this process holds already is yielded as it is.
    An output inside or around another one is refused (io/output_nesting.py), before anything is
    created and again under the lock."""
    label = label or os.fspath(out)
    target = resolve_output(out, inputs=inputs, label=label)
    if target in _HELD:  # held by this process already (the demo holds its folder around its steps)
        check_replaceable(target, force=force, label=label)
        yield target
        return
    check_outer(target, label, held=_HELD.__contains__)
    lock = OutputLock(target, label).acquire()
    try:
        check_outer(target, label, held=_HELD.__contains__)  # a run that started meanwhile
        check_replaceable(target, force=force, label=label)  # under the lock: no other run can change it now
        check_inner(target, label)
        yield target
    finally:
        lock.release()
