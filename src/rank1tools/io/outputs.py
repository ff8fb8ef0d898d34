"""Where a command may write: the output-folder contract (docs/cli.md, "What rank1 never does to your files").

Every command that writes enters `locked_output` (io/output_lock.py), built on this module, so the
rules hold once for all of them:

- the output path is resolved (symlinks and `..` included) before any check, and must not be
  empty, the filesystem root, an input, inside an input, or contain an input;
- work happens in a staging folder beside the target (`.NAME.tmp-PID-*`, or decompose's
  resumable `.NAME.partial`), renamed into place only when complete;
- an existing target is replaced only with `--force`, and only when rank1 wrote it (it holds
  `rank1tools.json`, or a rank1 manifest) or it is empty — never an arbitrary folder;
- one run at a time per target: an exclusive lock (`.NAME.lock`, flock; io/output_lock.py) is
  held for the whole run; a second run fails at once naming the holder. Holding the lock also proves that any
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
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError, UsageError
from ..signals import deferred_signals, pause_for_test

MARKER_FILE = "rank1tools.json"  # provenance record every rank1 output folder holds
MANIFESTS = ("manifest.json",)  # older outputs (factor stores) are recognised by their manifest's format
_STAGING_INFIXES = (".tmp-", ".old-")  # siblings that only a live run holding the lock may own
_HELD: dict[Path, object] = {}  # targets whose lock this process holds -> its io.output_lock.OutputLock
completed: dict[Path, str] = {}  # locked targets published by this process -> their label (the CLI clears it)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import, before any thread exists (os.umask is process-wide)


def follow_umask(path: Path, *, directory: bool) -> None:
    """Give `path` the permissions a plain mkdir/open would (mkdtemp makes 0700, safetensors 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # hf://, s3://, https://, file://


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
    if _URL.match(text):  # would make a local folder `hf:` (or `s3:`) holding `/org/name`
        raise UsageError(
            f"--out {text}: outputs are local paths, not URLs; write to a local folder "
            "(then upload it yourself, e.g. with `hf upload`)"
        )
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
            raise OutputError(
                f"{label}: output {where} an input ({inp}); outputs must not be inside or contain an input"
            )
    return target


def _rank1_mark(folder: Path) -> str | None:
    """None when `folder` was written by rank1 (its provenance record or a rank1 manifest); else
    what the message says: no rank1tools.json, or that it is there but invalid, and why (a
    manifest is only an older output's alternative mark: another tool's is not reported)."""
    problem = None
    for name, key in ((MARKER_FILE, "tool"), *((m, "format") for m in MANIFESTS)):
        f = folder / name
        why = None
        try:
            if not os.path.lexists(f):
                continue
            if f.is_symlink() or not f.is_file():
                why = "not a regular file"
            elif f.stat().st_size > (1 << 24):
                why = "larger than 16 MiB"
            else:
                data = json.loads(f.read_text(encoding="utf-8"))
                if isinstance(data, dict) and str(data.get(key, "")).startswith("rank1tools"):
                    return None
                why = f'no "{key}": "rank1tools" entry'
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            why = f"unreadable: {e.strerror}" if isinstance(e, OSError) and e.strerror else "not valid JSON"
        if name == MARKER_FILE:
            problem = f"{f} is invalid: {why}"
    return problem or f"no {MARKER_FILE}"


def is_rank1_output(folder: Path) -> bool:
    """True when `folder` was written by rank1 (its provenance record or a rank1 manifest)."""
    return _rank1_mark(folder) is None


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
    mark = None if empty else _rank1_mark(target)
    if mark is not None:
        raise OutputError(
            f"{label}: exists and was not written by rank1 ({mark}); "
            "--force replaces only rank1 output folders: remove it yourself or choose another --out"
        )


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
