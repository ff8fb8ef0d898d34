"""Training-run layouts: find a run's checkpoints and their step numbers.

Recognised step folders (direct children of the run directory):
  HF Trainer / TRL   checkpoint-N/                weights in the folder
  verl               global_step_N/               weights in actor/huggingface/, huggingface/ or the folder
  OpenRLHF           global_stepN_hf/             weights in the folder
A step folder whose only weights are trainer-internal shards (verl FSDP `model_world_size_*.pt`,
DeepSpeed `*.pt`) is listed with a `problem`, never skipped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UsageError
from .checkpoint import INDEX_FILE, SINGLE_FILE, PICKLE_SUFFIXES

_LAYOUTS = (
    ("trl", re.compile(r"^checkpoint-(\d+)$")),
    ("verl", re.compile(r"^global_step_(\d+)$")),
    ("openrlhf", re.compile(r"^global_step(\d+)_hf$")),
)
_VERL_WEIGHT_DIRS = ("actor/huggingface", "huggingface", ".")


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint of a run.

    `weights` is the source to open with `open_source` (a local folder, or an `hf://` address);
    None when unsupported, with `problem` saying why.
    """

    step: int
    path: str
    layout: str
    weights: str | None
    problem: str | None = None


def looks_like_run(folder: Path) -> bool:
    return folder.is_dir() and any(_match(c.name) for c in folder.iterdir() if c.is_dir())


def discover_run(run_dir: str | Path) -> list[RunCheckpoint]:
    """All step folders of a run, ordered by step."""
    run = Path(run_dir)
    if not run.exists():
        raise InputError(f"{run_dir}: no such directory")
    if not run.is_dir():
        raise InputError(f"{run_dir}: a run must be a directory of step folders")
    found: dict[int, RunCheckpoint] = {}
    for child in sorted(run.iterdir()):
        m = _match(child.name) if child.is_dir() else None
        if m is None:
            continue
        layout, step = m
        ckpt = _locate_weights(child, layout, step)
        if step in found:
            raise InputError(f"{run_dir}: step {step} appears twice ({Path(found[step].path).name}, {child.name})")
        found[step] = ckpt
    if not found:
        raise InputError(
            f"{run_dir}: no checkpoint folders (checkpoint-N, global_step_N, global_stepN_hf) in this directory"
        )
    return [found[s] for s in sorted(found)]


def _match(name: str) -> tuple[str, int] | None:
    for layout, pattern in _LAYOUTS:
        m = pattern.match(name)
        if m:
            return layout, int(m.group(1))
    return None


def _has_safetensors(folder: Path) -> bool:
    return folder.is_dir() and ((folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
                                or any(folder.glob("*.safetensors")))


def _locate_weights(folder: Path, layout: str, step: int) -> RunCheckpoint:
    candidates = _VERL_WEIGHT_DIRS if layout == "verl" else (".",)
    for sub in candidates:
        w = folder / sub if sub != "." else folder
        if _has_safetensors(w):
            return RunCheckpoint(step, str(folder), layout, str(w))
    pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        hint = ("merge the FSDP shards to a Hugging Face folder first (python -m verl.model_merger merge "
                f"--backend fsdp --local_dir {folder}/actor --target_dir {folder}/actor/huggingface)"
                if layout == "verl" else "save with safe_serialization=True or convert to safetensors first")
        return RunCheckpoint(step, str(folder), layout, None,
                             f"unsupported: only pickle/trainer shards ({pickles[0]}{', ...' if len(pickles) > 1 else ''}); {hint}")
    return RunCheckpoint(step, str(folder), layout, None, "unsupported: no safetensors weights in this folder")


def parse_steps(spec: str) -> tuple[str, object]:
    """Parse `--steps`: a list `50,100,200` or an inclusive range `START:STOP[:EVERY]` (ends optional)."""
    s = spec.strip()
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) > 3:
                raise ValueError
            start = int(parts[0]) if parts[0] else None
            stop = int(parts[1]) if len(parts) > 1 and parts[1] else None
            every = int(parts[2]) if len(parts) > 2 and parts[2] else None
            if every is not None and every <= 0:
                raise ValueError
            return "range", (start, stop, every)
        steps = [int(x) for x in s.split(",") if x.strip()]
        if not steps:
            raise ValueError
        return "list", steps
    except ValueError:
        raise UsageError(f"--steps {spec!r}: expected a list like 50,100,200 or a range like 10:100:10") from None


def select_steps(checkpoints: list[RunCheckpoint], spec: str | None) -> list[RunCheckpoint]:
    """The checkpoints named by a `--steps` spec (all when None), in step order."""
    if spec is None:
        return list(checkpoints)
    kind, value = parse_steps(spec)
    by_step = {c.step: c for c in checkpoints}
    if kind == "list":
        missing = [s for s in value if s not in by_step]
        if missing:
            raise UsageError(f"--steps: no checkpoint for step {missing[0]} (run has steps {_fmt(sorted(by_step))})")
        return [by_step[s] for s in sorted(set(value))]
    start, stop, every = value
    out = [c for c in checkpoints
           if (start is None or c.step >= start) and (stop is None or c.step <= stop)
           and (every is None or (c.step - (start or 0)) % every == 0)]
    if not out:
        raise UsageError(f"--steps {spec!r} selects no checkpoint (run has steps {_fmt(sorted(by_step))})")
    return out


def _fmt(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")


def infer_step(source: str) -> int | None:
    """The training step named by a checkpoint path (`.../checkpoint-500`, `global_step_50/actor/huggingface`)."""
    for part in reversed(Path(str(source).split("@")[0]).parts):
        m = _match(part)
        if m:
            return m[1]
    return None
