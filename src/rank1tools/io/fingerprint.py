"""Which checkpoint a store was made from, by content rather than by path (docs/formats.md,
"Factor store", "Identity of the base and the checkpoints").

A local checkpoint's fingerprint is a SHA-256 over its tensor listing (names, dtypes, shapes,
sorted by name) and a sample of its tensor bytes: for each tensor the first and last
SAMPLE_BYTES and two windows at positions derived from its name. It is independent of the path,
of the sharding and of the file order, reads a few hundred bytes per tensor, and tells a model
with other weights of the same shapes from the one recorded (it does not prove that no single
value was edited). A Hub checkpoint is identified by the commit sha the Hub resolved, as before.

Stores written before fingerprints existed are identified by path (or Hub revision) as they were,
with a note saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import InputError
from .checkpoint import Checkpoint
from .hub_spec import is_hub_source

SCHEME = "rank1tools.sample-sha256.v1"
SAMPLE_BYTES = 64  # per window; four windows per tensor


def _windows(name: str, nbytes: int) -> list[tuple[int, int]]:
    """(start, length) of the sampled byte windows of one tensor's data (deterministic)."""
    if nbytes <= 4 * SAMPLE_BYTES:
        return [(0, nbytes)]
    seed = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:16], "little")
    span = nbytes - SAMPLE_BYTES
    return [(0, SAMPLE_BYTES), (seed % span, SAMPLE_BYTES), ((seed >> 64) % span, SAMPLE_BYTES), (span, SAMPLE_BYTES)]


def fingerprint(ck: Checkpoint) -> dict | None:
    """{"scheme", "sha256"} of a local checkpoint's content; None for a Hub source (its revision
    identifies it). Computed once per Checkpoint object."""
    if is_hub_source(ck.label):
        return None
    cached = getattr(ck, "_rank1_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    composed = getattr(ck, "fingerprint_parts", None)
    if composed is not None:  # a PEFT adapter on its base (io/peft_adapter.py): its parts' content
        parts, salt = composed()
        h.update(salt)
        for part in parts:
            h.update(fingerprint(part)["sha256"].encode())
        ck._rank1_fingerprint = fp = {"scheme": SCHEME, "sha256": h.hexdigest()}
        return fp
    fds: dict[str, int] = {}
    try:
        for name in sorted(ck.entries):
            e = ck.entries[name]
            h.update(json.dumps([name, e.dtype, list(e.shape), e.nbytes]).encode("utf-8", "surrogatepass"))
            path = ck.shard_path(e.shard)
            try:
                fd = fds.get(e.shard)
                if fd is None:
                    fd = fds[e.shard] = os.open(path, os.O_RDONLY)
                for start, length in _windows(name, e.nbytes):
                    data = os.pread(fd, length, e.offset + start)
                    if len(data) != length:
                        raise InputError(f"{path}: unexpected end of file in tensor {name!r} (truncated?)")
                    h.update(data)
            except OSError as err:
                raise InputError(f"{path}: cannot read ({err.strerror or err})") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    fp = {"scheme": SCHEME, "sha256": h.hexdigest()}
    ck._rank1_fingerprint = fp
    return fp


def source_record(ck: Checkpoint) -> dict:
    """What a store records of an input: how it was named, the Hub revision, the fingerprint."""
    return {"source": ck.label, "revision": ck.revision, "fingerprint": fingerprint(ck)}


def recorded_fingerprint(record: dict) -> dict | None:
    """The usable fingerprint of a store's record (None: none recorded, or another scheme)."""
    fp = record.get("fingerprint")
    if isinstance(fp, dict) and fp.get("scheme") == SCHEME and isinstance(fp.get("sha256"), str):
        return fp
    return None


def matches(record: dict, ck: Checkpoint) -> tuple[bool, bool]:
    """(is `ck` the checkpoint `record` describes, was that decided by content). By content when
    the record holds a fingerprint and `ck` is local; else by path or Hub revision (same_source)."""
    fp = recorded_fingerprint(record)
    if fp is not None and not is_hub_source(ck.label):
        return fingerprint(ck) == fp, True
    return same_source(record["source"], record.get("revision"), ck.label, ck.revision), False


def check_base(record: dict, ck: Checkpoint, where: str, what: str, notes: list[str]) -> None:
    """Refuse `ck` as the base of store `where` unless it is the base `record` describes (one-line
    InputError saying whether the content or the path differs); a store without a fingerprint is
    accepted by path as before, with a note in `notes`."""
    same, by_content = matches(record, ck)
    src = record["source"]
    if not same:
        why = ""
        if by_content:
            why = (
                ": the same path now holds other weights (content fingerprint differs)"
                if same_source(src, None, ck.label, None)
                else " (content fingerprint differs)"
            )
        raise InputError(f"{where}: {what} was made from base {src}, not {ck.label}{why}")
    if not by_content and not is_hub_source(src):
        notes.append(
            f"{where}: {what} records no content fingerprint of its base (made by an older rank1tools): "
            f"base {ck.label} accepted by its path only; rerun rank1 decompose to record one"
        )


def same_source(a: str, a_rev: str | None, b: str, b_rev: str | None) -> bool:
    """Two source strings name the same checkpoint: equal, the same local path, or the same Hub
    repository at the same resolved revision."""
    if a == b:
        return True
    if a.startswith("hf://") or b.startswith("hf://"):
        return a_rev is not None and a_rev == b_rev and a.split("@")[0] == b.split("@")[0]
    return Path(a).resolve() == Path(b).resolve()
