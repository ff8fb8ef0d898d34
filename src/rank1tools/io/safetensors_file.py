"""One safetensors file: header-only listing and byte-range reads of single tensors.

Headers are parsed here, from the header bytes only (no tensor data read). Data is read with `os.preadv`
into a fresh buffer rather than through safetensors' memory map: pages of a mapped file count
as resident while it is open, so streaming a 16 GB checkpoint through mmap shows 16 GB RSS.
Reading exactly the bytes of one tensor (or of a row/element range of it) keeps memory at
one tensor, and a truncated file is detected from its header before any data is read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> bytes per element. Headers are parsed without torch (`rank1 inspect`
# never imports it); the torch dtypes are looked up only when a tensor is read or written.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}


def _torch_tables() -> tuple[dict, dict]:
    import torch

    codes = {c: getattr(torch, n) for c, n in _TORCH_NAMES.items() if hasattr(torch, n)}  # U16.. from torch 2.3
    return codes, {v: k for k, v in codes.items()}


def __getattr__(name: str):
    """SAFETENSORS_DTYPES (code -> torch dtype) and TORCH_TO_SAFETENSORS, built on first use so that
    importing this module (to read headers) does not import torch."""
    if name in ("SAFETENSORS_DTYPES", "TORCH_TO_SAFETENSORS"):
        codes, back = _torch_tables()
        globals().update(SAFETENSORS_DTYPES=codes, TORCH_TO_SAFETENSORS=back)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: shard file (relative name), absolute offset, size."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    shard: str  # file name relative to the checkpoint's weight folder
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        codes = globals().get("SAFETENSORS_DTYPES") or __getattr__("SAFETENSORS_DTYPES")  # built once
        if self.dtype not in codes:
            raise InputError(f"tensor {self.name!r}: dtype {self.dtype} needs a newer torch")
        return codes[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


def read_header(path: Path, shard: str | None = None) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a safetensors header: tensor entries and the `__metadata__` dict.

    Checks what safetensors itself would refuse later (truncated file, offsets that overlap,
    leave holes or do not match shape x dtype) so that a corrupt file fails before any work.
    Parsed here rather than by huggingface_hub, whose TensorInfo multiplies the shape out before
    any check: a shape like ["x", 10**12] would build a terabyte string.
    """
    path = Path(path)
    shard = shard or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise InputError(
                    f"{path}: truncated or not a safetensors file (header of {header_len} bytes, file of {size})"
                )
            if header_len > MAX_HEADER_BYTES:
                raise InputError(
                    f"{path}: corrupt safetensors header (header of {header_len} bytes, "
                    f"more than the {MAX_HEADER_BYTES} safetensors allows)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    infos, metadata = parse_header_bytes(raw, str(path))
    return _entries(path, shard, infos, 8 + header_len, size), metadata


def parse_header_bytes(raw: bytes, where: str) -> tuple[dict[str, HeaderInfo], dict]:
    """The JSON header of a safetensors file (without its 8-byte length): tensor name -> HeaderInfo,
    and `__metadata__`. Only the JSON structure is checked here; entry_from_info checks the values."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:  # json on deeply nested input
        raise InputError(f"{where}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # not UTF-8, not JSON
        raise InputError(f"{where}: corrupt safetensors header ({_one_line(e)[:200]})") from None
    if not isinstance(header, dict):
        raise InputError(f"{where}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{where}: corrupt safetensors header (__metadata__ is not an object)")
    infos = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise InputError(
                f"{where}: corrupt safetensors header (tensor {name!r} needs dtype, shape and data_offsets)"
            )
        infos[name] = HeaderInfo(info["dtype"], info["shape"], info["data_offsets"])
    return infos, metadata


@dataclass(frozen=True)
class HeaderInfo:
    """One tensor's header entry as found in the JSON (types not checked yet), like
    huggingface_hub's TensorInfo."""

    dtype: object
    shape: object
    data_offsets: object


def entry_from_info(where: str, shard: str, name: str, info, data_start: int | None) -> TensorEntry:
    """A TensorEntry from a huggingface_hub TensorInfo, checking dtype and byte size against the shape.

    `data_start` is where the data area begins in the file; None when not known yet (a remote
    header before its shard is downloaded): the offset is then -1.
    """
    dtype, shape, offsets = info.dtype, info.shape, info.data_offsets
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InputError(
            f"{where}: tensor {name!r} has unsupported dtype {dtype if isinstance(dtype, str) and dtype.isalnum() else _short(dtype)}"
        )
    # JSON numbers may be floats or booleans (True == 1 in Python), and negative sizes would let
    # a truncated file add up: only non-negative ints are dimensions and offsets
    if not isinstance(shape, (list, tuple)) or not all(_is_count(s) for s in shape):
        raise InputError(
            f"{where}: corrupt safetensors header: tensor {name!r} has invalid shape {_short(shape)} "
            "(expected a list of non-negative integers)"
        )
    if not (
        isinstance(offsets, (list, tuple))
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise InputError(
            f"{where}: corrupt safetensors header: tensor {name!r} has invalid data_offsets {_short(offsets)} "
            "(expected [begin, end] with 0 <= begin <= end)"
        )
    begin, end = offsets
    shape = tuple(shape)
    itemsize = DTYPE_SIZES[dtype]
    numel = 0 if 0 in shape else 1
    for s in shape:
        numel *= s
        if len(shape) > 64 and numel * itemsize > end - begin:  # a hostile shape: stop before a huge product
            break
    if end - begin != numel * itemsize:
        needs = "needs more" if len(shape) > 64 else f"needs {numel * itemsize}"
        raise InputError(
            f"{where}: tensor {name!r} occupies {end - begin} bytes but shape {_short(list(shape))} {dtype} {needs}"
        )
    return TensorEntry(name, dtype, shape, shard, -1 if data_start is None else data_start + begin, end - begin)


def _entries(
    path: Path, shard: str, infos: dict[str, HeaderInfo], data_start: int, size: int
) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, info in infos.items():
        entries[name] = e = entry_from_info(str(path), shard, name, info, data_start)
        spans.append((e.offset - data_start, e.offset - data_start + e.nbytes, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise InputError(f"{path}: tensor {name!r} data offsets overlap or leave a hole (corrupt file)")
        pos = end
    if data_start + pos != size:
        raise InputError(
            f"{path}: file is {size} bytes but its header describes {data_start + pos} (truncated or corrupt)"
        )
    return entries


def read_bytes(path: Path, offset: int, nbytes: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read `nbytes` at `offset` into a new uint8 tensor (no memory map), or into the first `nbytes`
    of `out` (a contiguous CPU uint8 tensor, returned as that view): memory reused from read to read
    has no fresh pages for the kernel to fault in and zero, which a fresh buffer of a few MB has."""
    import torch

    if out is None:
        buf = torch.empty(nbytes, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() < nbytes:
        raise ValueError(f"out must be a contiguous CPU uint8 tensor of at least {nbytes} bytes")
    else:
        buf = out.reshape(-1)[:nbytes]
    if nbytes == 0:
        return buf
    view = memoryview(buf.numpy()).cast("B")
    try:  # an input that vanished or changed permissions mid-run: bad input (exit 3), not a crash
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        done = 0
        while done < nbytes:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise InputError(f"{path}: read error at byte {offset + done} ({e.strerror or e})") from None
            if n <= 0:
                raise InputError(f"{path}: unexpected end of file at byte {offset + done} (truncated?)")
            done += n
    finally:
        os.close(fd)
    return buf


def read_entry(
    path: Path, entry: TensorEntry, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor, in its stored dtype, as a 1-D CPU tensor
    (a view of `out` when given: `read_bytes`)."""
    stop = entry.numel if stop is None else stop
    if not 0 <= start <= stop <= entry.numel:
        raise ValueError(f"element range [{start}, {stop}) outside tensor {entry.name!r} of {entry.numel} elements")
    itemsize = entry.nbytes // entry.numel if entry.numel else 1
    raw = read_bytes(path, entry.offset + start * itemsize, (stop - start) * itemsize, out)
    return raw.view(entry.torch_dtype)


def _is_count(x) -> bool:
    return type(x) is int and x >= 0  # not isinstance: bool is an int subclass


def _short(x) -> str:
    """A JSON value for a message: one line, at most 60 characters."""
    text = " ".join(repr(x).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
