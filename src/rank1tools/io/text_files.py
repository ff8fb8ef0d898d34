"""Reading a small text input file whole, safely: a regular file only (a FIFO would block, a
device never end), at most a stated size, and no NUL byte (a binary file is refused after its
first block, before the rest is read). Torch-free; used for metrics files (io/metrics.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError

SNIFF_BYTES = 1 << 16  # read first: a binary file is refused before the rest is read


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _refuse_binary(data: bytes, offset: int, where: str, what: str, expected: str) -> None:
    at = data.find(b"\x00")
    if at >= 0:
        raise InputError(f"{where}: {what} is binary (NUL byte at byte {offset + at}), {expected}")


def read_text_file(path: Path, where: str, what: str, limit: int, raise_hint: str, expected: str) -> bytes:
    """The bytes of the regular file `path` of at most `limit` bytes, without a NUL byte; else a
    one-line InputError "WHERE: WHAT is ..." (`raise_hint`: how to raise the limit; `expected`:
    what the file should be, for the binary refusal). Opened without blocking (a FIFO with no
    writer would block open() forever) and checked on the open descriptor, so what is read is
    what was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InputError(f"{where}: cannot read {what} ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{where}: {what} is {_file_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise InputError(f"{where}: {what} is {st.st_size} bytes, above the limit of {limit} ({raise_hint})")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            head = f.read(SNIFF_BYTES)
            _refuse_binary(head, 0, where, what, expected)
            rest = f.read(limit + 1 - len(head))  # a file growing while read stops at the limit
        except OSError as e:
            raise InputError(f"{where}: cannot read {what} ({e.strerror or e})") from None
    if len(head) + len(rest) > limit:
        raise InputError(f"{where}: {what} is above the limit of {limit} bytes ({raise_hint})")
    _refuse_binary(rest, len(head), where, what, expected)
    return head + rest
