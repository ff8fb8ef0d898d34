"""The log-prob store `rank1 logprobs` writes (docs/formats.md#log-prob-store): per step, the
teacher-forced log-probability of every scored token of the selected rollouts, in rollout order.

Layout of a store folder (`logprobs/` inside the command's output):

- `step-<S>.safetensors` per step S: one 1-D float32 tensor `logprobs` (all scored tokens of all
  sequences concatenated, sequence after sequence), its metadata recording the step, the store's
  scoring key and the checkpoint it was scored with (source, revision, content fingerprint);
- `tokens.safetensors`: the scored token ids (int64, same order);
- `manifest.json` (written last): format, version, the key, the rollouts file's hash, the scoring
  settings (convention, dtype, device, batch size), the base, per sequence its id, line, token
  count and offset, and the steps in step order with their checkpoints.

The scoring key is a hash of everything the numbers depend on but the checkpoint: the rollouts'
content, the selected sequences and their token ids, the base (its fingerprint), dtype, device type
and batch size. A step file is reused only when its key and its checkpoint match (by content,
io/fingerprint.py): an interrupted run, or a later run with more steps, scores only the steps it
lacks; a run with another key starts over. Reading checks all of it (one-line InputError, exit 3).
Knows nothing of models: the scoring is engine/model_scoring.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..jsonutil import read_json_file
from .checkpoint import Checkpoint
from .fingerprint import matches, source_record
from .outputs import follow_umask, output_errors

STORE_FORMAT = "rank1tools.logprobs"
STORE_FORMAT_VERSION = 1
STORE_DIR = "logprobs"  # the store's folder inside a logprobs output
MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.safetensors"
MAX_LOGPROB = 1e-4  # a log-probability is <= 0; this much above it is float rounding, more is corruption


def step_file(step: int) -> str:
    return f"step-{int(step)}.safetensors"


def digest(data: object) -> str:
    """SHA-256 of the canonical JSON of `data`."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def ids_digest(ids: list[int] | tuple[int, ...]) -> str:
    return hashlib.sha256(json.dumps(list(ids), separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class SequenceEntry:
    """One stored sequence: its rollout id (or None), file line, scored tokens and their offset."""

    id: str | int | None
    line: int
    tokens: int
    offset: int
    ids_sha256: str

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "line": self.line,
            "tokens": self.tokens,
            "offset": self.offset,
            "ids_sha256": self.ids_sha256,
        }


def _meta(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), "pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads((f.metadata() or {}).get("rank1tools", "{}"))
    except Exception as e:  # noqa: BLE001 (safetensors and json raise their own types)
        raise InputError(f"{path}: unreadable {what} ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: {what} without rank1tools metadata")
    return data, meta


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a safetensors file atomically (tmp + rename): a step is either whole or absent."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tmp = path.with_name(path.name + ".tmp")
    with output_errors(path):
        save_file(tensors, str(tmp), metadata={"rank1tools": json.dumps(meta, sort_keys=True)})
        follow_umask(tmp, directory=False)
        os.replace(tmp, path)


class LogprobStoreWriter:
    """The store being filled in a work folder: which steps it holds, writing one more."""

    def __init__(self, folder: Path, key: str, token_ids: torch.Tensor):
        self.folder = Path(folder)
        self.key = key
        self.tokens = int(token_ids.numel())
        with output_errors(self.folder):
            if not self.folder.exists():
                self.folder.mkdir(parents=True)
                follow_umask(self.folder, directory=True)
        _save(self.folder / TOKENS_FILE, {"ids": token_ids.to(torch.int64).contiguous()}, {"key": key})

    def holds(self, step: int, ck: Checkpoint) -> bool:
        """True when step `step` is stored for this key and was scored with checkpoint `ck`."""
        path = self.folder / step_file(step)
        if not path.is_file():
            return False
        try:
            data, meta = _meta(path, "log-prob step file")
        except InputError:
            return False  # damaged (e.g. a disk filled mid-write): scored again
        values = data.get("logprobs")
        record = meta.get("checkpoint")
        return (
            meta.get("key") == self.key
            and meta.get("step") == step
            and isinstance(record, dict)
            and isinstance(record.get("source"), str)
            and values is not None
            and values.dtype == torch.float32
            and tuple(values.shape) == (self.tokens,)
            and matches(record, ck)[0]
        )

    def write(self, step: int, ck: Checkpoint, values: torch.Tensor) -> None:
        if values.dtype != torch.float32 or tuple(values.shape) != (self.tokens,):
            raise ValueError(f"step {step}: expected {self.tokens} float32 log-probs, got {tuple(values.shape)}")
        meta = {"key": self.key, "step": int(step), "checkpoint": source_record(ck)}
        _save(self.folder / step_file(step), {"logprobs": values.contiguous()}, meta)

    def adopt(self, other: Path, steps: list[tuple[int, Checkpoint]]) -> list[int]:
        """Copy from store folder `other` (a previous output's) the step files of `steps` it holds
        for this key and checkpoint and this store lacks; the steps copied."""
        copied = []
        if not (Path(other) / MANIFEST).is_file():
            return copied
        for step, ck in steps:
            src = Path(other) / step_file(step)
            if self.holds(step, ck) or not src.is_file():
                continue
            dst = self.folder / step_file(step)
            tmp = dst.with_name(dst.name + ".tmp")
            with output_errors(dst):
                tmp.write_bytes(src.read_bytes())
                follow_umask(tmp, directory=False)
                os.replace(tmp, dst)
            if self.holds(step, ck):
                copied.append(step)
            else:
                dst.unlink()
        return copied

    def finish(self, manifest: dict, steps: list[int]) -> None:
        """Write the manifest (last) and remove step files of other steps (an earlier window's)."""
        keep = {step_file(s) for s in steps} | {TOKENS_FILE, MANIFEST}
        with output_errors(self.folder):
            for p in sorted(self.folder.iterdir()):
                if p.name not in keep:
                    p.unlink()
            (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def build_manifest(
    *,
    key: str,
    rollouts: dict,
    scoring: dict,
    base: Checkpoint,
    sequences: list[SequenceEntry],
    steps: list[tuple[int, Checkpoint]],
) -> dict:
    return {
        "format": STORE_FORMAT,
        "format_version": STORE_FORMAT_VERSION,
        "key": key,
        "rollouts": rollouts,
        "scoring": scoring,
        "base": source_record(base),
        "tokens": sum(s.tokens for s in sequences),
        "sequences": [s.to_dict() for s in sequences],
        "steps": [{"step": s, "file": step_file(s), **source_record(ck)} for s, ck in steps],
    }


@dataclass
class LogprobStore:
    """A store as read back: the manifest, its steps, sequences and the T × tokens matrix."""

    folder: Path
    manifest: dict
    steps: list[int]
    sequences: list[SequenceEntry]
    token_ids: torch.Tensor  # (tokens,) int64
    logprobs: torch.Tensor  # (T, tokens) float32, rows in step order


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder}: not a log-prob store (no {MANIFEST}; make one with rank1 logprobs)")
    m = read_json_file(path, "log-prob store manifest")
    if not isinstance(m, dict) or m.get("format") != STORE_FORMAT:
        got = m.get("format") if isinstance(m, dict) else None
        raise InputError(f"{path}: not a rank1tools log-prob store (format {got!r})")
    if m.get("format_version") != STORE_FORMAT_VERSION:
        raise InputError(
            f"{path}: log-prob store format_version {m.get('format_version')!r} is not supported "
            f"(this rank1tools reads {STORE_FORMAT_VERSION})"
        )
    return m


def _sequences(m: dict, path: Path) -> list[SequenceEntry]:
    seqs, offset = [], 0
    raw = m.get("sequences")
    if not isinstance(raw, list) or not raw or not _is_int(m.get("tokens"), 1):
        raise InputError(f"{path}: malformed log-prob store manifest (sequences or tokens missing)")
    for i, s in enumerate(raw):
        ok = (
            isinstance(s, dict)
            and (s.get("id") is None or (isinstance(s.get("id"), (str, int)) and not isinstance(s.get("id"), bool)))
            and _is_int(s.get("line"), 1)
            and _is_int(s.get("tokens"), 1)
            and s.get("offset") == offset
            and isinstance(s.get("ids_sha256"), str)
        )
        if not ok:
            raise InputError(
                f"{path}: sequence {i} of the manifest is malformed (id, line, tokens, offset, ids_sha256)"
            )
        seqs.append(SequenceEntry(s["id"], s["line"], s["tokens"], s["offset"], s["ids_sha256"]))
        offset += s["tokens"]
    if offset != m["tokens"]:
        raise InputError(f"{path}: the sequences hold {offset} tokens, the manifest says {m['tokens']}")
    return seqs


def read_logprob_store(folder: str | Path) -> LogprobStore:
    """The store in `folder` (a logprobs output's `logprobs/` folder, or the output itself),
    checked: manifest, sequence offsets, token ids against their hashes, each step file's step,
    key, shape, dtype and values (finite, <= 0). One-line InputError naming the file otherwise."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() and (folder / STORE_DIR / MANIFEST).is_file():
        folder = folder / STORE_DIR
    m = _manifest(folder)
    path = folder / MANIFEST
    key = m.get("key")
    raw_steps = m.get("steps")
    if not isinstance(key, str) or not isinstance(raw_steps, list) or not raw_steps:
        raise InputError(f"{path}: malformed log-prob store manifest (key or steps missing)")
    seqs = _sequences(m, path)
    N = m["tokens"]
    steps = []
    for i, s in enumerate(raw_steps):
        if not isinstance(s, dict) or not _is_int(s.get("step")) or s.get("file") != step_file(s["step"]):
            raise InputError(
                f"{path}: steps[{i}] is malformed (an integer step >= 0 and its file step-<step>.safetensors)"
            )
        if steps and s["step"] <= steps[-1]:
            raise InputError(f"{path}: steps are not in increasing order ({steps[-1]} then {s['step']})")
        steps.append(s["step"])
    ids_data, ids_meta = _meta(folder / TOKENS_FILE, "token id file")
    ids = ids_data.get("ids")
    if ids_meta.get("key") != key or ids is None or ids.dtype != torch.int64 or tuple(ids.shape) != (N,):
        raise InputError(f"{folder / TOKENS_FILE}: not the token ids of this store ({N} int64 ids with its key)")
    for s in seqs:
        if ids_digest(ids[s.offset : s.offset + s.tokens].tolist()) != s.ids_sha256:
            raise InputError(f"{folder / TOKENS_FILE}: the token ids of line {s.line} differ from the manifest's hash")
    rows = []
    for step in steps:
        p = folder / step_file(step)
        if not p.is_file():
            raise InputError(f"{p}: missing (the manifest lists step {step})")
        data, meta = _meta(p, "log-prob step file")
        values = data.get("logprobs")
        if meta.get("key") != key or meta.get("step") != step:
            raise InputError(f"{p}: holds step {meta.get('step')!r} of another store, not step {step} of this one")
        if values is None or values.dtype != torch.float32 or tuple(values.shape) != (N,):
            got = "missing" if values is None else f"{str(values.dtype).removeprefix('torch.')} {list(values.shape)}"
            raise InputError(f"{p}: tensor 'logprobs' is {got}, expected float32 [{N}]")
        if not bool(torch.isfinite(values).all()):
            raise InputError(f"{p}: non-finite log-probabilities (NaN or Inf)")
        if bool((values > MAX_LOGPROB).any()):
            raise InputError(f"{p}: a log-probability above 0 ({float(values.max()):.4g}); corrupt store")
        rows.append(values)
    return LogprobStore(folder, m, steps, seqs, ids, torch.stack(rows))
