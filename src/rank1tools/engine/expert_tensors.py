"""Writing fused expert tensors (`reconstruct`, `extrapolate --method alpharl`;
docs/formats.md#mixture-of-experts-tensors): a 3-D [num_experts, out, in] tensor is one matrix module
per expert (`NAME[e]`). Each expert is read and written on its own by the command's per-module
function, as a 2-D module is; the experts' results are stacked back into the fused layout the base
stores."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..math.reconstruct import RoundingStats
from ..modules import expert_slice_name, is_fused_experts


def selected_slices(name: str, shape: tuple[int, ...], selected: set[str]) -> list[str]:
    """Every expert slice name of fused tensor `name` when any of them is selected, else []."""
    if not is_fused_experts(name, shape):
        return []
    names = [expert_slice_name(name, e) for e in range(shape[0])]
    return names if any(n in selected for n in names) else []


class _SliceCollector:
    """Stands in for one rank's writer while the experts of a fused tensor are written: keeps each
    expert's stored matrix (in the fused tensor's output dtype) until all are there."""

    def __init__(self, writer, fused: str, slices: list[str]):
        self.specs = {s: writer.specs[fused] for s in slices}  # the dtype is the fused tensor's
        self.parts: dict[str, torch.Tensor] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.parts[name] = tensor


def write_fused(
    name: str, slices: list[str], writers, stats: list[dict], write_slice: Callable[[str, list, list[dict]], None]
) -> None:
    """Write fused tensor `name` into every rank's writer: `write_slice(slice, writers, stats)` writes
    each expert (reconstructed when selected, else the rest's values) into collectors; their matrices
    are stacked in expert order, and the experts' rounding figures added up under `name`."""
    collectors = [_SliceCollector(w, name, slices) for w in writers]
    slice_stats: list[dict] = [dict() for _ in writers]
    for s in slices:
        write_slice(s, collectors, slice_stats)
    for w, c, st, sst in zip(writers, collectors, stats, slice_stats):
        w.write(name, torch.stack([c.parts[s] for s in slices]))
        if sst:
            total = RoundingStats()
            for s in slices:
                if s in sst:
                    total.add(sst[s])
            st[name] = total
