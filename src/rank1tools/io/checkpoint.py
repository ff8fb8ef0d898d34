"""Checkpoint sources: a set of named tensors read lazily, one tensor (or slice) at a time.

A source is a Hugging Face model directory (`model.safetensors`, or shards listed in
`model.safetensors.index.json`), a single `.safetensors` file, or a PEFT adapter folder
(`adapter_config.json` + `adapter_model.safetensors`: opened as its adapter tensors with
`adapter_config` set; io/peft_adapter.py reads it on its base). Pickle weights (`.bin`, `.pt`)
are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..jsonutil import read_json_file
from ..modules import EMBEDDING_NAMES, LM_HEAD_NAME, split_expert_slice
from .safetensors_file import TensorEntry, read_entry, read_header

if TYPE_CHECKING:
    import torch  # annotations only: opening a checkpoint reads headers, without torch

SINGLE_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files of a model folder that travel with its weights (config, tokenizer, chat template, remote code).
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template*",
    "preprocessor_config.json",
    "configuration_*.py",
    "modeling_*.py",
    "tokenization_*.py",
)


class Checkpoint:
    """Named tensors of one model, listed from headers only and read on demand.

    Attributes:
        label: how the user named it (path or hub address), used in messages.
        weight_dir: folder holding the weight files.
        root: folder holding config.json/tokenizer files, or None for a bare file.
        entries: tensor name -> TensorEntry, in file order.
        config: parsed config.json, or None.
        lm_head_tied: True when `lm_head.weight` is not stored because it is tied to the embedding;
            reading `lm_head.weight` then returns the embedding.
        revision: resolved revision (commit sha) for remote sources, None locally.
        adapter_config: parsed adapter_config.json when the source is a PEFT adapter (its
            `entries` are then the adapter's tensors, to be read on a base: io/peft_adapter.py).
    """

    adapter_config: dict | None = None

    def __init__(
        self,
        label: str,
        weight_dir: Path,
        entries: dict[str, TensorEntry],
        config: dict | None,
        root: Path | None,
        revision: str | None = None,
    ):
        self.label = label
        self.weight_dir = weight_dir
        self.entries = entries
        self.config = config
        self.root = root
        self.revision = revision
        self.lm_head_tied = (
            LM_HEAD_NAME not in entries
            and self._embedding_name() is not None
            and (config is None or config.get("tie_word_embeddings", True) is not False)
        )

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self.entries)} tensors)"

    # ---- listing (headers only) ----
    @property
    def names(self) -> list[str]:
        """Stored tensor names, in file order."""
        return list(self.entries)

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(e.shard for e in self.entries.values()))

    @property
    def parameter_count(self) -> int:
        return sum(e.numel for e in self.entries.values())

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def dtypes(self) -> dict[str, int]:
        """safetensors dtype code -> number of tensors."""
        out: dict[str, int] = {}
        for e in self.entries.values():
            out[e.dtype] = out.get(e.dtype, 0) + 1
        return out

    def __contains__(self, name: str) -> bool:
        if name not in self.entries and (sliced := split_expert_slice(name)) is not None:
            parent = self.entries.get(sliced[0])
            return parent is not None and len(parent.shape) == 3 and sliced[1] < parent.shape[0]
        return name in self.entries or (name == LM_HEAD_NAME and self.lm_head_tied)

    def entry(self, name: str) -> TensorEntry:
        """The stored entry behind `name` (a tied lm_head resolves to the embedding)."""
        if name in self.entries:
            return self.entries[name]
        if name == LM_HEAD_NAME and self.lm_head_tied:
            return self.entries[self._embedding_name()]
        if name in self:  # one expert of a fused [num_experts, out, in] tensor: its contiguous bytes
            parent, index = split_expert_slice(name)
            e = self.entries[parent]
            per = e.nbytes // e.shape[0]
            offset = e.offset if e.offset < 0 else e.offset + index * per  # -1: remote, not downloaded yet
            return TensorEntry(name, e.dtype, tuple(e.shape[1:]), e.shard, offset, per)
        raise InputError(f"{self.label}: has no tensor {name!r}")

    def _embedding_name(self) -> str | None:
        for n in self.entries:
            if n.endswith(EMBEDDING_NAMES):
                return n
        return None

    def expect(self, names) -> None:
        """Declare the only tensors a command will read (a Hub source with the evict policy frees
        each shard once these are read). Nothing to do for local files."""

    # ---- reading (one tensor at a time) ----
    def shard_path(self, shard: str) -> Path:
        """Local path of a weight file (remote sources fetch it here)."""
        return self.weight_dir / shard

    def locate(self, name: str) -> tuple[Path, TensorEntry]:
        """Local file and entry of a tensor. The file is resolved first: a remote source
        downloads the shard there and may refine the entry (byte offsets) from its header."""
        path = self.shard_path(self.entry(name).shard)
        return path, self.entry(name)

    def read_raw(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor in its stored dtype, on CPU, bit-exact. `out`: a contiguous CPU uint8 tensor
        to read into, reused from read to read (`ReusedReads`); the result is then a view of it
        (sources that form the tensor instead of reading it return a new one)."""
        path, e = self.locate(name)
        return read_entry(path, e, out=out).reshape(e.shape)

    def read(
        self,
        name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The tensor (or rows [a, b) of it) upcast to `dtype` (default float32) on `device`."""
        import torch

        path, e = self.locate(name)
        if rows is None:
            flat = read_entry(path, e)
            shape = e.shape
        else:
            a, b = rows
            per_row = e.numel // e.shape[0] if e.shape and e.shape[0] else 0
            flat = read_entry(path, e, a * per_row, b * per_row)
            shape = (b - a, *e.shape[1:])
        # move in the stored dtype, then upcast: half the host-to-device traffic for bf16
        return flat.reshape(shape).to(device=device).to(torch.float32 if dtype is None else dtype)

    def read_flat(
        self, name: str, start: int, stop: int, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, upcast (default float32), as a 1-D tensor."""
        import torch

        path, e = self.locate(name)
        return read_entry(path, e, start, stop).to(device=device).to(torch.float32 if dtype is None else dtype)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a local model directory or `.safetensors` file (headers only)."""
    label = str(path)
    p = Path(path)
    if not p.exists():
        raise InputError(f"{label}: no such file or directory")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise _pickle_error(label, p.name)
        if p.suffix != ".safetensors":
            raise InputError(f"{label}: not a .safetensors file")
        if p.name == ADAPTER_FILE:
            raise InputError(f"{label}: a PEFT adapter file; give its folder (with {ADAPTER_CONFIG}) instead")
        return Checkpoint(label, p.parent, _read_single(p), None, None)
    config = read_config(p)
    if is_adapter_folder([f.name for f in p.iterdir()]):
        ckpt = Checkpoint(label, p, _read_single(p / adapter_file(label, [f.name for f in p.iterdir()])), config, p)
        ckpt.adapter_config = read_adapter_config(p / ADAPTER_CONFIG, f"{label}: {ADAPTER_CONFIG}")
        return ckpt
    index = p / INDEX_FILE
    if index.is_file():
        entries = _read_sharded(p, index)
    elif (p / SINGLE_FILE).is_file():
        entries = _read_single(p / SINGLE_FILE)
    else:
        files = sorted(f.name for f in p.glob("*.safetensors") if f.is_file())
        if len(files) == 1:
            entries = _read_single(p / files[0])
        elif files:
            raise InputError(
                f"{label}: {len(files)} .safetensors files but no {INDEX_FILE} to say which form the model"
            )
        else:
            pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise _pickle_error(label, pickles[0])
            raise InputError(f"{label}: no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE})")
    return Checkpoint(label, p, entries, config, p)


def is_adapter_folder(names) -> bool:
    """A folder listing (file names) that holds a PEFT adapter: its config or its weights."""
    return any(n == ADAPTER_CONFIG or n.startswith("adapter_model.") for n in names)


def adapter_file(label: str, names) -> str:
    """The adapter's weight file in a folder listing; a one-line InputError for a missing config,
    pickled weights (adapter_model.bin: never unpickled) or no weights."""
    names = set(names)
    if ADAPTER_CONFIG not in names:
        raise InputError(
            f"{label}: PEFT adapter weights without {ADAPTER_CONFIG} (its r, lora_alpha and targets are needed)"
        )
    if ADAPTER_FILE in names:
        return ADAPTER_FILE
    pickles = sorted(n for n in names if n.startswith("adapter_model.") and n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise _pickle_error(label, pickles[0])
    raise InputError(f"{label}: {ADAPTER_CONFIG} but no {ADAPTER_FILE} beside it")


def read_adapter_config(path: Path, where: str) -> dict:
    """Parsed adapter_config.json (checked in io/peft_adapter.py)."""
    data = read_json_file(path, ADAPTER_CONFIG, where)
    if not isinstance(data, dict):
        raise InputError(f"{where}: not a JSON object")
    return data


def read_config(folder: Path, where: str | None = None) -> dict | None:
    """Parsed config.json of a model folder, None if absent. `where`: how messages name the file."""
    cfg = folder / "config.json"
    if not cfg.exists():
        return None
    where = where or str(cfg)
    data = read_json_file(cfg, "config.json", where)
    if not isinstance(data, dict):
        raise InputError(f"{where}: config.json is not a JSON object")
    return data


def _read_single(path: Path) -> dict[str, TensorEntry]:
    entries, _ = read_header(path)
    if not entries:
        raise InputError(f"{path}: holds no tensors")
    return entries


def parse_weight_map(index: object, where: str) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of a parsed index file; `where` names the file."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{where}: unreadable index (no weight_map object)")
    bad = [v for v in weight_map.values() if not isinstance(v, str)]  # a list: the bad value may be None
    if bad:
        raise InputError(f"{where}: weight_map values must be file names, found {str(bad[0])[:80]!r}")
    if not weight_map:
        raise InputError(f"{where}: weight_map lists no tensors")
    return weight_map


def merge_shards(where: str, shards: list[tuple[str, dict[str, TensorEntry]]]) -> dict[str, TensorEntry]:
    """One name -> entry map from every shard's entries; a tensor in two shards is refused
    (which copy a reader would get depends on its order)."""
    entries: dict[str, TensorEntry] = {}
    for shard, shard_entries in shards:
        for name, e in shard_entries.items():
            if name in entries:
                raise InputError(f"{where}: tensor {name!r} is stored in both {entries[name].shard!r} and {shard!r}")
            entries[name] = e
    return entries


def check_weight_map(where: str, weight_map: dict[str, str], entries: dict[str, TensorEntry]) -> None:
    """The index and the shards' headers must agree both ways: every listed tensor is in the
    shard named, and every tensor of those shards is listed (else it would be counted silently)."""
    for name, shard in weight_map.items():
        if name not in entries or entries[name].shard != shard:
            raise InputError(f"{where}: maps tensor {name!r} to {shard!r}, which does not hold it")
    for name, e in entries.items():
        if name not in weight_map:
            raise InputError(f"{where}: shard {e.shard!r} holds tensor {name!r} that the index does not list")


def _read_sharded(folder: Path, index: Path) -> dict[str, TensorEntry]:
    weight_map = parse_weight_map(read_json_file(index, "index"), str(index))
    per_shard = []
    for shard in dict.fromkeys(weight_map.values()):
        # a plain name in this folder; checked without following symlinks, since a Hub cache
        # snapshot links every shard to a blob elsewhere
        if Path(shard).is_absolute() or os.path.dirname(os.path.normpath(shard)) != "" or shard in ("", ".", ".."):
            raise InputError(f"{index}: shard {shard!r} is not a file inside {folder}")
        sp = folder / shard
        if not sp.is_file():
            raise InputError(f"{index}: names shard {shard!r}, which does not exist")
        per_shard.append((shard, read_header(sp, shard)[0]))
    entries = merge_shards(str(index), per_shard)
    check_weight_map(str(index), weight_map, entries)
    return entries


def _pickle_error(label: str, filename: str) -> InputError:
    return InputError(
        f"{label}: {filename} is a pickle file; rank1tools reads only safetensors and never unpickles "
        "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
    )
