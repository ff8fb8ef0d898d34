"""Streaming, shard-aware checkpoint writer.

The shard plan (which tensor goes to which `model-0000i-of-0000N.safetensors`) is made up front
from names, shapes and dtypes with huggingface_hub's planner, so every shard's header and every
tensor's byte offset are known before any data exists. Tensors are then written one at a time,
in any order, with `pwrite`: memory stays at one tensor whatever the model size (safetensors'
own `save_file` needs a whole shard in memory). Everything goes to a temporary directory beside
the target, renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch

import rank1tools

from .. import __version__
from .checkpoint import AUX_PATTERNS, INDEX_FILE, Checkpoint  # noqa: F401 (AUX_PATTERNS: importable from here)
from .outputs import MARKER_FILE, follow_umask, make_staging, output_errors, prepare_output, publish
from .safetensors_file import TORCH_TO_SAFETENSORS

PROVENANCE_FILE = MARKER_FILE  # every rank1 output folder holds it: how --force recognises one


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the writer will receive: name, shape and the dtype it is stored in."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def plan_safetensors(specs: list[TensorSpec]) -> tuple[bytes, dict[str, int], int]:
    """The file safetensors would write for `specs` in this order, planned from names, shapes and
    dtypes alone: (the 8-byte length and JSON header, each tensor's absolute data offset, the file
    size). Data starts 8-byte aligned, as safetensors writes it."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for s in specs:
        header[s.name] = {
            "dtype": TORCH_TO_SAFETENSORS[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [pos, pos + s.nbytes],
        }
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return (
        len(raw).to_bytes(8, "little") + raw,
        {s.name: start + header[s.name]["data_offsets"][0] for s in specs},
        start + pos,
    )


class ShardedWriter:
    """Write a checkpoint folder tensor by tensor.

    Usage::

        with ShardedWriter(out, specs, max_shard_size="5GB", force=False) as w:
            for spec in specs:
                w.write(spec.name, tensor)
            w.commit(copy_from=base, provenance={...})

    Leaving the block without `commit` (an exception) removes the temporary directory: no partial output.
    """

    def __init__(
        self,
        out_dir: str | Path,
        specs: list[TensorSpec],
        *,
        max_shard_size: int | str = "5GB",
        force: bool = False,
        staging: Path | None = None,
    ):
        from huggingface_hub.serialization import split_state_dict_into_shards_factory

        self.label = str(out_dir)
        self.force = force
        self.out = prepare_output(out_dir, force=force)
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise ValueError("duplicate tensor names in writer specs")
        # `staging`: a fixed folder (in a resumable work folder) whose planned shard files are kept
        # when they are intact, instead of a fresh `.NAME.tmp-*` one; it is then never removed here
        self.keep = staging is not None
        self.tmp = staging if staging is not None else make_staging(self.out)
        self.resumed = False  # every planned shard file was found intact in `staging`
        try:
            self.split = split_state_dict_into_shards_factory(
                self.specs,
                get_storage_size=lambda s: s.nbytes,
                filename_pattern="model{suffix}.safetensors",
                max_shard_size=max_shard_size,
            )
            where: dict[str, tuple[str, int]] = {}
            with output_errors(self.tmp):
                if self.keep and not self.tmp.exists():
                    self.tmp.mkdir(parents=True)
                    follow_umask(self.tmp, directory=True)
                found = [
                    self._create_shard(self.tmp / filename, [self.specs[n] for n in names], where)
                    for filename, names in self.split.filename_to_tensors.items()
                ]
            self.resumed = self.keep and all(found)
        except BaseException:
            self.abort()
            raise
        self.placement = ShardPlacement(self.specs, where)
        self._pending = set(self.specs)
        self._filled: dict[str, int] = {}
        self.committed = False

    def _create_shard(self, path: Path, specs: list[TensorSpec], where: dict) -> bool:
        """Create a planned shard (header, then sparse data); True when it was kept instead: a kept
        staging folder already holds it with this header and size."""
        prefix, offsets, size = plan_safetensors(specs)
        where.update({name: (str(path), at) for name, at in offsets.items()})
        if self.keep and path.is_file() and not path.is_symlink() and path.stat().st_size == size:
            with open(path, "rb") as f:
                if f.read(len(prefix)) == prefix:
                    return True
        with open(path, "wb") as f:
            f.write(prefix)
            f.truncate(size)  # sparse until written
        return False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store one tensor (cast to its planned dtype; moved to CPU)."""
        self.placement.write(name, tensor)
        self._pending.discard(name)

    def write_range(self, name: str, start: int, values: torch.Tensor) -> None:
        """Store elements [start, start + n) of the flattened tensor (a streaming pass writes a
        tensor chunk by chunk, never holding it whole). The tensor counts as written once its
        ranges cover every element; callers write disjoint ranges."""
        n = self.placement.write_range(name, start, values)
        spec = self.specs[name]
        self._filled[name] = self._filled.get(name, 0) + n
        if self._filled[name] >= spec.numel:
            self._pending.discard(name)

    def mark_written(self, names) -> None:
        """Count `names` as written: another process (a Ray task) wrote them through `placement`."""
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            raise KeyError(f"writer was not told about tensor {unknown[0]!r}")
        self._pending.difference_update(names)

    def commit(
        self,
        *,
        copy_from: Checkpoint | None = None,
        output_dtype: torch.dtype | None = None,
        provenance: dict | None = None,
        extra_json: dict[str, object] | None = None,
        untie_word_embeddings: bool = False,
    ) -> Path:
        """Finish: index, auxiliary files, provenance, `extra_json` reports (file name -> data);
        rename into place. Returns the output path. `untie_word_embeddings`: see copy_aux_files."""
        if self._pending:
            raise RuntimeError(f"writer: {len(self._pending)} tensors never written, e.g. {sorted(self._pending)[0]!r}")
        with output_errors(self.tmp):
            self._finish(copy_from, output_dtype, provenance, extra_json, untie_word_embeddings)
        publish(self.tmp, self.out, force=self.force, label=self.label)
        self.committed = True
        return self.out

    def _finish(self, copy_from, output_dtype, provenance, extra_json, untie_word_embeddings=False) -> None:
        if self.split.is_sharded:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                "weight_map": dict(sorted(self.split.tensor_to_filename.items())),
            }
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if copy_from is not None and copy_from.root is not None:
            copy_aux_files(copy_from.root, self.tmp, output_dtype, untie_word_embeddings=untie_word_embeddings)
        if provenance is not None:
            write_provenance(self.tmp, provenance)
        for filename, data in (extra_json or {}).items():
            (self.tmp / filename).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def abort(self) -> None:
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()


class ShardPlacement:
    """Where each planned tensor's bytes go (shard file and byte offset), with the planned dtypes:
    a small picklable handle, so a Ray task writes its tensors into the planned shards itself
    (positional writes: tasks never overlap, and no tensor passes through the driver)."""

    def __init__(self, specs: dict[str, TensorSpec], where: dict[str, tuple[str, int]]):
        self.specs = specs
        self.where = where

    def _flat(self, name: str, values: torch.Tensor) -> tuple[TensorSpec, torch.Tensor]:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"writer was not told about tensor {name!r}")
        return spec, values.detach().to(device="cpu", dtype=spec.dtype).contiguous().reshape(-1)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store one whole tensor (cast to its planned dtype; moved to CPU)."""
        spec = self.specs.get(name)
        if spec is not None and tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r}: shape {list(tensor.shape)}, planned {list(spec.shape)}")
        self.write_range(name, 0, tensor)

    def write_range(self, name: str, start: int, values: torch.Tensor) -> int:
        """Store elements [start, start + n) of the flattened tensor; returns n."""
        spec, t = self._flat(name, values)
        if start < 0 or start + t.numel() > spec.numel:
            raise ValueError(f"tensor {name!r}: range [{start}, {start + t.numel()}) outside its {spec.numel} elements")
        path, offset = self.where[name]
        if t.numel():
            view = memoryview(t.view(torch.uint8).numpy()).cast("B")
            with output_errors(path):
                _pwrite(path, view, offset + start * t.element_size())
        return t.numel()


def _pwrite(path: str, view: memoryview, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)


def copy_aux_files(
    src: Path, dst: Path, output_dtype: torch.dtype | None, *, untie_word_embeddings: bool = False
) -> list[str]:
    """Copy config/tokenizer/chat-template files; set config's dtype field to `output_dtype`, and
    `tie_word_embeddings` to false when asked (the output stores its own lm_head)."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and any(fnmatch(f.name, p) for p in AUX_PATTERNS):
            shutil.copyfile(f, dst / f.name)  # a new file under the user's umask (copy2 would keep the source's mode)
            copied.append(f.name)
    cfg_path = dst / "config.json"
    if (output_dtype is not None or untie_word_embeddings) and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        changed = untie_word_embeddings and cfg.get("tie_word_embeddings") is not False
        if changed:
            cfg["tie_word_embeddings"] = False
        if output_dtype is not None:
            name = str(output_dtype).removeprefix("torch.")
            keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
            if any(cfg.get(k) != name for k in keys):
                changed = True
                for k in keys:
                    cfg[k] = name
        if changed:
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return copied


def write_provenance(folder: Path, record: dict) -> None:
    """Write `rank1tools.json`: how the folder was made, and the mark that rank1 wrote it."""
    data = {"tool": "rank1tools", "version": __version__, **record}
    (folder / PROVENANCE_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def provenance(command: str, inputs: list[Checkpoint | str], parameters: dict) -> dict:
    """How an output was made: command (and CLI command line), inputs with resolved revisions
    (a plain path string, e.g. a factor store, has none), parameters."""
    return {
        "command": command,
        "argv": rank1tools.COMMAND_LINE,
        "inputs": [
            {"source": c, "revision": None} if isinstance(c, str) else {"source": c.label, "revision": c.revision}
            for c in inputs
        ],
        "parameters": parameters,
    }
