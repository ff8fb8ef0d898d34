"""How a tensor-wise command (`reconstruct`, `linearity`, `extrapolate --method relex|linear`) runs
its per-tensor work: in this process, or with `--executor ray` as Ray tasks (decompose works per
module, see commands/decompose). `run_tensor_groups` is the one entry point for both.

With Ray, the tensors are cut into units of work (`group_tensors`: one tensor, or consecutive small
tensors up to GROUP_BYTES, in the plan's order, so the units do not depend on the cluster). Each
unit is one Ray task (rank1tools.engine.executors.run_units) that opens the inputs itself, runs the
command's own per-tensor function on its tensors (the function the local path calls over all
tensors, so the bytes are the same) and writes what it produces straight into the output's
planned files; it returns only small per-tensor figures (rounding counts, fits), which the driver
records in the work folder's ledger (io.work_folder) and the command assembles in the plan's
order. A rerun of the same command after the driver or a worker died keeps the recorded units and
runs the rest.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError
from ..io.work_folder import UnitLedger, discard_unless_resumed, open_work_folder
from ..math.reconstruct import RoundingStats
from .executor_options import ExecutorOptions
from .executors import code_fingerprint, run_units

GROUP_BYTES = 64 << 20  # consecutive tensors share a task up to this many bytes (a few tasks per layer)
MIN_UNITS = 64  # ... or up to 1/64 of the model, so a small model still spreads over many tasks
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class TensorGroup:
    """A unit of work: consecutive tensors of the plan; `key` (its position) names its ledger record."""

    key: str
    names: tuple[str, ...]

    @property
    def label(self) -> str:
        if len(self.names) == 1:
            return f"tensor {self.names[0]!r}"
        return f"tensors {self.names[0]!r} .. {self.names[-1]!r} ({len(self.names)})"


def group_tensors(names: list[str], nbytes: Callable[[str], int], budget: int | None = None) -> list[TensorGroup]:
    """Consecutive tensors in `names` order, a group closed once it holds `budget` bytes or more
    (default: GROUP_BYTES, or 1/MIN_UNITS of all the bytes when that is less). The groups depend
    on the tensors only, never on the cluster, so a rerun elsewhere finds the same units."""
    if budget is None:
        budget = max(1, min(GROUP_BYTES, sum(nbytes(n) for n in names) // MIN_UNITS))
    groups: list[list[str]] = []
    size = budget
    for name in names:
        if size >= budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes(name)
    return [TensorGroup(f"{i:06d}", tuple(g)) for i, g in enumerate(groups)]


def plan_bytes(
    command: str, inputs: list, parameters: dict, groups: list[TensorGroup], extra: dict | None = None
) -> bytes:
    """What identifies a run's work folder: rank1tools' code, the command, its inputs (pinned
    revisions), parameters and units. A rerun with anything else changed starts over."""
    data = {
        "tool": code_fingerprint(),
        "command": command,
        "inputs": [{"source": c.label, "revision": c.revision} for c in inputs],
        "parameters": parameters,
        "units": [list(g.names) for g in groups],
        **(extra or {}),
    }
    return (json.dumps(data, indent=1, sort_keys=True, default=str) + "\n").encode()


def progress_counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    """A unit's `on_done(n)` turned into the command's `progress(done, total)` (tensors done)."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    return tick


def stats_record(stats: RoundingStats | None) -> dict | None:
    return None if stats is None else asdict(stats)


def stats_from(record: dict | None) -> RoundingStats | None:
    return None if record is None else RoundingStats(**record)


class TensorUnits:
    """A command's Ray run over tensor groups, in the resumable work folder of `target`.

    Usage::

        units = TensorUnits(target, plan)            # plan: plan_bytes(...)
        results = units.run(groups, task, args, executor, threads, on_done=...)
        ...  # write the output from `results` (tensor name -> the task's figures, JSON data)
        units.finish()                               # the output is in place: drop the work folder

    `task(group, *args)` returns {tensor name: JSON data}. The results are those recorded in the
    ledger (read back), whether recorded now or by an earlier run, so both give the same bytes.
    """

    def __init__(self, target: Path, plan: bytes):
        self.work = open_work_folder(target, PLAN_FILE, plan)
        self.ledger = UnitLedger(self.work)
        self.resumed = 0

    def forget(self) -> None:
        """Drop every recorded unit (their files were made anew, e.g. a damaged shard)."""
        shutil.rmtree(self.ledger.folder, ignore_errors=True)
        self.ledger = UnitLedger(self.work)

    def run(
        self,
        groups: list[TensorGroup],
        task: Callable,
        args: tuple,
        executor: ExecutorOptions,
        threads: int,
        *,
        on_done: Callable[[int], None] | None = None,
    ) -> dict[str, object]:
        results: dict[str, object] = {}
        todo = []
        kept = 0  # tensors of the recorded units
        for g in groups:
            rec = self.ledger.finished(g.key)
            if rec is not None and rec.get("names") == list(g.names):
                results.update(rec["tensors"])
                kept += len(g.names)
            else:
                todo.append(g)
        self.resumed = len(groups) - len(todo)
        if on_done and kept:
            on_done(kept)
        finished = self.resumed
        try:
            for g, res in run_units(todo, task, args, executor, threads, label=lambda g: g.label):
                results.update(self.ledger.record(g.key, {"names": list(g.names), "tensors": res})["tensors"])
                finished += 1
                if on_done:
                    on_done(len(g.names))
        except InputError:
            discard_unless_resumed(self.work, self.resumed > 0)  # bad data found by a fresh run: nothing to keep
            raise
        except Exception:  # e.g. Ray unreachable: a work folder with no finished unit holds nothing to resume
            discard_unless_resumed(self.work, finished > 0)
            raise
        return results

    def finish(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


def run_tensor_groups(
    task: Callable,
    args: tuple,
    names: list[str],
    *,
    units: TensorUnits | None,
    groups: list[TensorGroup] | None,
    executor: ExecutorOptions,
    on_done: Callable[[int], None],
    outs=None,
) -> dict[str, object]:
    """A command's per-tensor work over every tensor in `names`: `task(group, *args[, writers],
    on_tensor=...)`. Without `units`, in this process as one group, writing through the writers
    of `outs` (a CheckpointOutputs, for commands that write checkpoints); with `units`, as Ray
    tasks over `groups`, writing through the writers' shard placements. Returns {name: figures}."""
    if units is None:
        return task(TensorGroup("local", tuple(names)), *args, *([outs.writers] if outs else []), on_tensor=on_done)
    import torch  # noqa: PLC0415

    if outs is not None and not outs.resumed:
        units.forget()  # the shards were made anew: no recorded unit's tensors are in them
    placements = [[w.placement for w in outs.writers]] if outs else []
    results = units.run(groups, task, (*args, *placements), executor, torch.get_num_threads(), on_done=on_done)
    for w in outs.writers if outs else []:
        w.mark_written(names)
    return results
