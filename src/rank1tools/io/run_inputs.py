"""A run as the streaming commands read it: the base, checkpoints in step order, and chunks of
one tensor across all of them.

Every pass over a run (decompose, linearity, extrapolate) opens its inputs with `open_run_inputs`
and, where it works element-wise or on the trajectory matrix, reads with `trajectory_chunks`:
elements [a, b) of one tensor from the base and from each of T checkpoints, so memory is
O(T × chunk) whatever the tensor size. Nothing here computes a delta or a fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError, UsageError
from ..values import StepSelection
from .checkpoint import Checkpoint
from .runs import infer_step, lookalike_note, lookalikes, select_steps
from .sources import discover_checkpoints, is_hub_source, open_source

# Elements of the T × chunk block read at once (float32: 32 MiB). The chunk is this budget divided
# by T, so a pass's peak memory does not grow with the number of checkpoints.
CHUNK_BUDGET = 1 << 23
MIN_CHUNK = 1 << 14


@dataclass
class RunInputs:
    """The base and the checkpoints of a run (step order); `step_source` is 'trainer' when steps
    come from the trainer's folder names, 'position' (1, 2, ...) when they could not be read."""

    base: Checkpoint
    checkpoints: list[tuple[int, Checkpoint]]
    step_source: str
    run: str | None = None
    notes: list[str] = field(default_factory=list)  # for the user: e.g. run folders that look like checkpoints

    @property
    def steps(self) -> list[int]:
        return [s for s, _ in self.checkpoints]

    def sources(self) -> list[Checkpoint]:
        return [self.base, *(c for _, c in self.checkpoints)]

    def local_paths(self) -> list[Path]:
        """Every local input (the run folder included): what an output may not overlap."""
        paths = [Path(c.label) for c in self.sources() if not is_hub_source(c.label)]
        if self.run and not is_hub_source(self.run):
            paths.append(Path(self.run))
        return paths

    def until(self, step: int | None, option: str = "--history-until") -> RunInputs:
        """The checkpoints at or before `step` (all when None)."""
        if step is None:
            return self
        if step > self.steps[-1]:
            raise UsageError(f"{option} {step} is past the last checkpoint (step {self.steps[-1]})")
        kept = [(s, c) for s, c in self.checkpoints if s <= step]
        if not kept:
            raise UsageError(f"{option} {step} is before the first checkpoint (step {self.steps[0]})")
        return RunInputs(self.base, kept, self.step_source, self.run, self.notes)


def open_run_inputs(
    base: str, checkpoints: list[str], run: str | None, steps: StepSelection | str | None, hub_run: dict | None = None
) -> RunInputs:
    """Open the base and the checkpoints: CHECKPOINT arguments (steps read from their paths, else
    their positions 1, 2, ...) or `--run` with an optional `--steps` selection. `hub_run`:
    discovery options for a Hub run (revisions / subfolders / commits)."""
    if run and checkpoints:
        raise UsageError("give checkpoints as arguments or --run, not both")
    if not run and not checkpoints:
        raise UsageError("no checkpoints: give CHECKPOINT... or --run RUN_DIR")
    if steps and not run:
        raise UsageError("--steps selects checkpoints of a --run")
    base_ckpt = open_source(base)
    if base_ckpt.adapter_config is not None:
        raise InputError(f"{base}: BASE is a PEFT adapter; give the model it was trained on")
    pairs: list[tuple[int, Checkpoint]] = []
    if run:
        for rc in select_steps(discover_checkpoints(run, **(hub_run or {})), steps):
            if rc.weights is None:
                raise InputError(f"{rc.path}: " + (f"step {rc.step}: " if rc.step is not None else "") + rc.problem)
            pairs.append((rc.step, open_source(rc.weights, base=base_ckpt)))
        skipped = [] if is_hub_source(run) else lookalikes(run)
        notes = [lookalike_note(run, skipped)] if skipped else []
        return RunInputs(base_ckpt, pairs, "trainer", run, notes + _adapter_notes(pairs))
    inferred = [infer_step(c) for c in checkpoints]
    step_source = (
        "trainer" if all(s is not None for s in inferred) and len(set(inferred)) == len(inferred) else "position"
    )
    for i, c in enumerate(checkpoints):
        pairs.append((inferred[i] if step_source == "trainer" else i + 1, open_source(c, base=base_ckpt)))
    pairs.sort(key=lambda p: p[0])
    return RunInputs(base_ckpt, pairs, step_source, None, _adapter_notes(pairs))


def _adapter_notes(pairs: list[tuple[int, Checkpoint]]) -> list[str]:
    """The notes of PEFT adapters read on the base (a base that may not be theirs), each once."""
    return list(dict.fromkeys(n for _, c in pairs for n in getattr(c, "notes", [])))


def prefetched(tasks: list, read: Callable, enabled: bool = True) -> Iterator:
    """Yield (task, read(task)), reading the next task in a background thread (one ahead)."""
    if not enabled:
        for t in tasks:
            yield t, read(t)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        it = iter(tasks)
        cur = next(it, None)
        fut = pool.submit(read, cur) if cur is not None else None
        while fut is not None:
            nxt = next(it, None)
            data = fut.result()
            fut = pool.submit(read, nxt) if nxt is not None else None
            yield cur, data
            cur = nxt


@dataclass
class TrajectoryChunk:
    """Elements [start, stop) of one flattened tensor: the base's (n,) and every checkpoint's
    (T, n), upcast to float32 on the device."""

    start: int
    stop: int
    base: torch.Tensor
    values: torch.Tensor


def chunk_elements(T: int, budget: int = CHUNK_BUDGET) -> int:
    """Elements per chunk for T checkpoints: the T × chunk block stays within `budget` elements."""
    return max(MIN_CHUNK, budget // max(1, T))


def trajectory_chunks(
    base: Checkpoint,
    checkpoints: list[Checkpoint],
    name: str,
    *,
    chunk: int | None = None,
    device: torch.device | str = "cpu",
    prefetch: bool = True,
) -> Iterator[TrajectoryChunk]:
    """Stream tensor `name` across the base and `checkpoints` in element chunks (file order of
    the flattened tensor), reading the next chunk in a background thread. A tied `lm_head` of
    the base reads as its embedding."""
    numel = base.entry(name).numel
    size = chunk or chunk_elements(len(checkpoints))
    ranges = [(a, min(a + size, numel)) for a in range(0, numel, size)] or [(0, 0)]

    def read(rng):
        a, b = rng
        return base.read_flat(name, a, b), [c.read_flat(name, a, b) for c in checkpoints]

    for (a, b), (b0, rows) in prefetched(ranges, read, prefetch):
        values = torch.stack(rows) if rows else torch.empty((0, b - a))
        yield TrajectoryChunk(a, b, b0.to(device), values.to(device))
