"""Where a command may write: the output-folder contract (docs/cli.md, "What rank1 never does to your files").

Every command that writes goes through this module, so the rules hold once for all of them:

- the output path is resolved (symlinks and `..` included) before any check, and must not be
  empty, the filesystem root, an input, inside an input, or contain an input;
- work happens in a staging folder beside the target (`.NAME.tmp-PID-*`, or decompose's
  resumable `.NAME.partial`), renamed into place only when complete;
- an existing target is replaced only with `--force`, and only when rank1 wrote it (it holds
  `rank1tools.json`, or a rank1 manifest) or it is empty — never an arbitrary folder;
- one run at a time per target: an exclusive lock (`.NAME.lock`, flock) is held for the whole
  run; a second run fails at once naming the holder. Holding the lock also proves that any
  `.NAME.tmp-*` / `.NAME.old-*` sibling is a leftover of a killed run, so it is removed;
- no output inside or around another live run's output, inside a rank1 output or inside a
  staging folder (io/output_nesting.py);
- publishing is never cut by Ctrl-C/SIGTERM (rank1tools.signals): the output is either the old
  one or the new one, no `.NAME.old-*` is left, and `completed` tells the CLI which outputs are
  complete, for the line it prints on an interrupt;
- files and folders follow the user's umask (mkdtemp and safetensors would make them private).

Torch-free: the CLI validates `--out` before any heavy import.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError, UsageError
from ..signals import deferred_signals, pause_for_test

MARKER_FILE = "rank1tools.json"  # provenance record every rank1 output folder holds
MANIFESTS = ("manifest.json",)  # older outputs (factor stores) are recognised by their manifest's format
_STAGING_INFIXES = (".tmp-", ".old-")  # siblings that only a live run holding the lock may own
_HELD: dict[Path, "OutputLock"] = {}  # targets whose lock this process holds
completed: dict[Path, str] = {}  # locked targets published by this process -> their label (the CLI clears it)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import, before any thread exists (os.umask is process-wide)


def follow_umask(path: Path, *, directory: bool) -> None:
    """Give `path` the permissions a plain mkdir/open would (mkdtemp makes 0700, safetensors 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)


def _as_text(out: str | os.PathLike) -> str:
    text = os.fspath(out)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise UsageError("--out is empty; name the output folder")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"--out {text.encode('utf-8', 'surrogateescape')!r}: the path is not valid UTF-8") from None
    if "\x00" in text:
        raise UsageError("--out contains a NUL character")
    return text


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def resolve_output(out: str | os.PathLike, *, inputs=(), label: str | None = None) -> Path:
    """The real path `out` names, checked against every input; nothing is written.

    `inputs`: local paths the command reads (model folders, files, run folders, stores). An input
    that is a file counts as that file; a folder as the whole folder.
    """
    text = _as_text(out)
    label = label or text
    target = _real(text)
    if target.parent == target or target.name in ("", ".", ".."):
        raise OutputError(f"{label}: refusing to write to {target} (the filesystem root)")
    for inp in inputs:
        src = _real(inp)
        if _inside(target, src) or _inside(src, target):
            where = "is" if target == src else ("is inside" if _inside(target, src) else "contains")
            raise OutputError(f"{label}: output {where} an input ({inp}); outputs must not be inside or contain an input")
    return target


def is_rank1_output(folder: Path) -> bool:
    """True when `folder` was written by rank1 (its provenance record or a rank1 manifest)."""
    for name, key in ((MARKER_FILE, "tool"), *((m, "format") for m in MANIFESTS)):
        f = folder / name
        try:
            if f.is_symlink() or not f.is_file() or f.stat().st_size > (1 << 24):
                continue
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and str(data.get(key, "")).startswith("rank1tools"):
            return True
    return False


def check_replaceable(target: Path, *, force: bool, label: str) -> None:
    """Refuse an existing `target` unless --force and rank1 wrote it (or it is empty)."""
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputError(f"{label}: exists and is not a directory")
    if not force:
        raise OutputError(f"{label}: already exists; pass --force to replace it")
    try:
        empty = not any(os.scandir(target))
    except OSError as e:
        raise OutputError(f"{label}: cannot read the existing folder ({e.strerror or e})") from None
    if not empty and not is_rank1_output(target):
        raise OutputError(f"{label}: exists and was not written by rank1 (no {MARKER_FILE}); "
                          "--force replaces only rank1 output folders: remove it yourself or choose another --out")


def prepare_output(out: str | os.PathLike, *, force: bool, inputs=(), label: str | None = None) -> Path:
    """Resolve and check an output location (see module doc); returns the real target path."""
    target = resolve_output(out, inputs=inputs, label=label)
    check_replaceable(target, force=force, label=label or os.fspath(out))
    return target


@contextmanager
def output_errors(label: str | os.PathLike):
    """Turn OS errors while writing (read-only place, full disk, missing permission) into an
    OutputError that names the path: exit 4, not an internal error."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise _write_error(e.filename if e.filename is not None else label, e.errno, e.strerror or str(e)) from None
    except Exception as e:
        # safetensors' writer reports an OS error as SafetensorError("... (os error 28)"), not OSError
        code = _SAFETENSORS_OS_ERROR.search(str(e)) if type(e).__name__ == "SafetensorError" else None
        if code is None:
            raise
        raise _write_error(label, int(code[1]), os.strerror(int(code[1]))) from None


_SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _write_error(where, code: int | None, reason: str) -> OutputError:
    if code in (errno.ENOSPC, errno.EDQUOT):
        reason += "; free some space and rerun"
    return OutputError(f"{where}: cannot write ({reason})")


def make_staging(target: Path) -> Path:
    """A fresh staging folder beside `target`, named so a later run can tell it is stale."""
    with output_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        with output_errors(tmp):
            follow_umask(tmp, directory=True)
        pause_for_test("staged")
    except BaseException:  # a signal too: the caller never saw the folder, so it cannot remove it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def publish(staging: Path, target: Path, *, force: bool, label: str) -> None:
    """Move a complete staging folder into place; an existing target (checked again, it may
    have appeared since the start) is swapped out and removed."""
    check_replaceable(target, force=force, label=label)
    # not cut by a signal: between the two renames the target is absent, and the old one must go
    own = target in _HELD  # a run's own output (not a part of it published into its staging folder)
    with deferred_signals(), output_errors(target):
        if os.path.lexists(target):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / "x")
            pause_for_test("publishing")
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            pause_for_test("publishing")
            os.replace(staging, target)
        if own:  # before a held signal takes effect, at the block's end: the line it prints says so
            completed[target] = label
    if own:
        pause_for_test("published")


@contextmanager
def staged_output(target: Path, *, force: bool, label: str):
    """A staging folder for the `with` block, published to `target` when the block succeeds and
    removed when it (or the publishing) fails: no partial output either way."""
    staging = None
    try:
        staging = make_staging(target)
        yield staging
        publish(staging, target, force=force, label=label)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


class OutputLock:
    """Exclusive lock on an output target for the whole run (see module doc).

    The lock file `.NAME.lock` beside the target holds the holder's pid and command line, for the
    message a second run prints. It is removed on release; a killed holder's file is harmless
    (the kernel drops the flock with the process) and is reused by the next run.
    """

    def __init__(self, target: Path, label: str):
        self.target = target
        self.label = label
        self.path = target.parent / f".{target.name}.lock"
        self.fd: int | None = None
        self.removed_stale: list[str] = []
        self.created: list[Path] = []  # folders made for the lock file, outermost first

    def acquire(self) -> "OutputLock":
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
                raise OutputError(f"{self.label}: another rank1 run is writing this output ({holder}); "
                                  "wait for it to finish or stop it") from None
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

    def __enter__(self) -> "OutputLock":
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


def read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return f"pid {int(data['pid'])}: {' '.join(map(str, data.get('argv') or []))}".strip()
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "pid unknown"


@contextmanager
def locked_output(out: str | os.PathLike, *, force: bool, inputs=(), label: str | None = None):
    """Resolve, check and lock an output target for the whole `with` block; yields the real path.
    An output inside or around another one is refused (io/output_nesting.py), before anything is
    created and again under the lock."""
    from .output_nesting import check_inner, check_outer

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
