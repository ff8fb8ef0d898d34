"""Reading one tensor from checkpoint after checkpoint into memory reused from read to read.

`rank1 decompose` reads a module's tensor from the base and from every checkpoint of a run. A fresh
buffer per read is fresh pages, which the kernel faults in and zeroes one 4 KiB page at a time;
with two worker threads of one process the faults also queue on the process's memory-map lock.
On the 135M benchmark run that was about 240,000 faults and a fifth of the decomposition's time
(docs/benchmarks.md#decompose_run). A `ReusedReads` keeps one stored-dtype buffer and a few float32
buffers for the whole trajectory instead.
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint


class ReusedReads:
    """float32 copies of one tensor (or one expert slice) from successive checkpoints, each in one of
    `slots` reused CPU buffers, read through one reused stored-dtype buffer.

    `float32(ck, name, slot)` returns a view of buffer `slot`, valid until the next read into the same
    slot: a consumer that holds one update while the next is read uses two slots in turn. The
    values are those of `ck.read_raw(name).to(torch.float32)`, bit for bit; each buffer is allocated at
    its first use, at the tensor's size (the same memory as a fresh read, without the page faults
    of a new allocation per read). Not thread-safe: one reader thread at a time (the consumer of
    the float32 views may be another thread)."""

    def __init__(self, slots: int = 2) -> None:
        self._raw: torch.Tensor | None = None
        self._f32: list[torch.Tensor | None] = [None] * slots

    def float32(self, ck: Checkpoint, name: str, slot: int) -> torch.Tensor:
        raw = self.raw(ck, name)
        buf = self._f32[slot]
        if buf is None or buf.numel() < raw.numel():
            buf = self._f32[slot] = torch.empty(raw.numel(), dtype=torch.float32)
        out = buf[: raw.numel()].view(raw.shape)
        out.copy_(raw)
        return out

    def raw(self, ck: Checkpoint, name: str) -> torch.Tensor:
        """`ck.read_raw(name)` through the reused stored-dtype buffer: a view of it, valid until the
        next read."""
        nbytes = ck.entry(name).nbytes
        if self._raw is None or self._raw.numel() < nbytes:
            self._raw = torch.empty(nbytes, dtype=torch.uint8)
        return ck.read_raw(name, out=self._raw)
