"""Training-run layouts: find a run's checkpoints and their step numbers.

Recognised step folders (direct children of the run directory):
  HF Trainer / TRL   checkpoint-N/                weights in the folder
  verl               global_step_N/               weights in actor/huggingface/, huggingface/ or the folder
  OpenRLHF           global_stepN_hf/             weights in the folder
  DeepSpeed          global_stepN/                engine state (*.pt); beside global_stepN_hf/ (OpenRLHF
                                                  keeps both in one folder) the _hf folder is step N
A step folder whose only weights are trainer-internal shards (verl FSDP `model_world_size_*.pt`,
DeepSpeed `*.pt`) is listed with a `problem`, never skipped silently; so is a child named with a
layout's prefix that is not a step folder (`checkpoint-abc`, a file `checkpoint-20`, a broken link).
A child that only looks like one — another case (`Checkpoint-25`) or hidden (`.checkpoint-5`, as a
save in progress may be named) — is not a step folder: `lookalikes` lists them for a note, and a
run without any step folder is refused naming them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UsageError
from ..values import StepSelection, ascii_int, parse_steps  # noqa: F401 (parse_steps: importable from here)
from .checkpoint import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE

# [0-9], not \d: \d and int() also take other scripts' digits (checkpoint-٢٠ is not step 20)
_LAYOUTS = (
    ("trl", re.compile(r"^checkpoint-([0-9]+)$")),
    ("verl", re.compile(r"^global_step_([0-9]+)$")),
    ("openrlhf", re.compile(r"^global_step([0-9]+)_hf$")),
    ("deepspeed", re.compile(r"^global_step([0-9]+)$")),
)
# A child whose name starts so is meant as a step folder: listed even when it cannot be used.
_PREFIXES = (("checkpoint-", "trl"), ("global_step_", "verl"), ("global_step", "openrlhf"))
_VERL_WEIGHT_DIRS = ("actor/huggingface", "huggingface", ".")
# Bounds on the search for pickle shards that explains an unusable folder: verl keeps them at
# actor/*.pt (depth 2), and a folder linked to / must not make `inspect` walk the filesystem.
_PICKLE_SEARCH_DEPTH = 2
_PICKLE_SEARCH_ENTRIES = 10_000


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint of a run.

    `weights` is the source to open with `open_source` (a local folder, or an `hf://` address);
    None when unsupported, with `problem` saying why. `step` is None for a child named like a step
    folder whose step cannot be read (`checkpoint-abc`): it is listed, never skipped, and no
    `--steps` selects it.
    """

    step: int | None
    path: str
    layout: str
    weights: str | None
    problem: str | None = None


def _lookalike(name: str) -> bool:
    """A name a layout does not match, but would match in lower case without leading dots."""
    if _match(name) is not None:
        return False
    plain = name.lstrip(".").lower()
    return _match(plain) is not None


def lookalikes(run_dir: str | Path) -> list[str]:
    """Names of the run directory's children that look like step folders but are not (another
    case, hidden): skipped by discover_run, listed in a note so that they are not lost silently."""
    try:
        return sorted(c.name for c in Path(run_dir).iterdir() if _lookalike(c.name))
    except OSError:
        return []


def lookalike_note(run_dir: str | Path, names: list[str]) -> str:
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return (
        f"{run_dir}: skipped {len(names)} folder{'s' if len(names) > 1 else ''} that look like checkpoints but do "
        f"not match the layout (checkpoint-N, global_step_N, global_stepN_hf: lower case, not hidden): {shown}"
    )


def looks_like_run(folder: Path) -> bool:
    """A directory with a child named like a step folder (look-alikes included, so that a run of
    only `Checkpoint-N` folders is refused naming them, not read as a model without weights)."""
    return folder.is_dir() and any(_step_folder_layout(c.name) or _lookalike(c.name) for c in folder.iterdir())


def discover_run(run_dir: str | Path) -> list[RunCheckpoint]:
    """All step folders of a run, ordered by step; unnamed ones (step None) last, by name."""
    run = Path(run_dir)
    if not run.exists():
        raise InputError(f"{run_dir}: no such directory")
    if not run.is_dir():
        raise InputError(f"{run_dir}: a run must be a directory of step folders")
    found: dict[int, RunCheckpoint] = {}
    unnamed: list[RunCheckpoint] = []
    for child in sorted(run.iterdir()):
        ckpt = _classify(child)
        if ckpt is None:
            continue
        if ckpt.step is None:
            unnamed.append(ckpt)
            continue
        if ckpt.step in found:
            ckpt = one_of_step(found[ckpt.step], ckpt, str(run_dir))
        found[ckpt.step] = ckpt
    if not found and not unnamed:
        seen = lookalikes(run)
        also = (
            (
                f"; seen but not matching the layout (case, hidden): {', '.join(seen[:10])}"
                + (", ..." if len(seen) > 10 else "")
            )
            if seen
            else ""
        )
        raise InputError(
            f"{run_dir}: no checkpoint folders (checkpoint-N, global_step_N, global_stepN_hf) in this directory{also}"
        )
    return [found[s] for s in sorted(found)] + unnamed


def one_of_step(a: RunCheckpoint, b: RunCheckpoint, where: str) -> RunCheckpoint:
    """The checkpoint to keep of two with the same step: the weights of an OpenRLHF `global_stepN_hf`
    over DeepSpeed's engine state `global_stepN` beside it; any other pair is an error."""
    if {a.layout.rsplit("/", 1)[-1], b.layout.rsplit("/", 1)[-1]} == {"openrlhf", "deepspeed"}:
        return a if a.layout.endswith("openrlhf") else b
    raise InputError(f"{where}: step {a.step} appears twice ({Path(a.path).name}, {Path(b.path).name})")


def _step_folder_layout(name: str) -> str | None:
    """The layout a child's name claims (by prefix), or None for an unrelated entry."""
    return next((layout for prefix, layout in _PREFIXES if name.startswith(prefix)), None)


def _match(name: str) -> tuple[str, int | None] | None:
    """(layout, step) of a step folder name; step None when the name has a layout's prefix but no
    usable step number; None for an unrelated name."""
    for layout, pattern in _LAYOUTS:
        m = pattern.match(name)
        if m:
            return layout, ascii_int(m.group(1))
    layout = _step_folder_layout(name)
    return None if layout is None else (layout, None)


def name_problem(name: str) -> str | None:
    """Why a step folder name gives no step (None when it does)."""
    for _, pattern in _LAYOUTS:
        m = pattern.match(name)
        if m:
            return None if ascii_int(m.group(1)) is not None else "step number too large (at most 2**63 - 1)"
    return "not a step folder name (checkpoint-N, global_step_N, global_stepN_hf; N in digits 0-9)"


def _classify(child: Path) -> RunCheckpoint | None:
    """The RunCheckpoint of a run directory's child, None for an unrelated entry."""
    m = _match(child.name)
    if m is None:
        return None
    layout, step = m
    if step is None:
        return RunCheckpoint(None, str(child), layout, None, name_problem(child.name))
    if child.is_symlink() and not child.exists():
        return RunCheckpoint(step, str(child), layout, None, "broken symbolic link")
    if not child.is_dir():
        return RunCheckpoint(step, str(child), layout, None, "not a directory")
    return _locate_weights(child, layout, step)


def _find_pickles(folder: Path) -> list[str]:
    """Pickle files at most _PICKLE_SEARCH_DEPTH levels down (relative paths, sorted), looking at
    no more than _PICKLE_SEARCH_ENTRIES entries and not following links to folders."""
    found: list[str] = []
    seen = 0
    level = [folder]
    for _ in range(_PICKLE_SEARCH_DEPTH):
        below = []
        for d in level:
            try:
                with os.scandir(d) as it:
                    for entry in it:
                        seen += 1
                        if seen > _PICKLE_SEARCH_ENTRIES:
                            return sorted(found)
                        if entry.is_dir(follow_symlinks=False):
                            below.append(entry.path)
                        elif entry.name.endswith(PICKLE_SUFFIXES):
                            found.append(os.path.relpath(entry.path, folder))
            except OSError:  # unreadable subfolder: nothing to report from it
                continue
        level = below
    return sorted(found)


def _has_safetensors(folder: Path) -> bool:
    return folder.is_dir() and (
        (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file() or any(folder.glob("*.safetensors"))
    )


def _locate_weights(folder: Path, layout: str, step: int) -> RunCheckpoint:
    candidates = _VERL_WEIGHT_DIRS if layout == "verl" else (".",)
    for sub in candidates:
        w = folder / sub if sub != "." else folder
        if _has_safetensors(w):
            return RunCheckpoint(step, str(folder), layout, str(w))
    pickles = _find_pickles(folder)
    if pickles:
        hint = (
            "merge the FSDP shards to a Hugging Face folder first (python -m verl.model_merger merge "
            f"--backend fsdp --local_dir {folder}/actor --target_dir {folder}/actor/huggingface)"
            if layout == "verl"
            else "save with safe_serialization=True or convert to safetensors first"
        )
        return RunCheckpoint(
            step,
            str(folder),
            layout,
            None,
            f"unsupported: only pickle/trainer shards ({pickles[0]}{', ...' if len(pickles) > 1 else ''}); {hint}",
        )
    return RunCheckpoint(step, str(folder), layout, None, "unsupported: no safetensors weights in this folder")


def select_steps(checkpoints: list[RunCheckpoint], steps: StepSelection | str | None) -> list[RunCheckpoint]:
    """The checkpoints a `--steps` selection names (all when None, unnamed ones included), in step
    order; a library caller's text is parsed here (StepSelection.of)."""
    selection = StepSelection.of(steps)
    if selection is None:
        return list(checkpoints)
    checkpoints = [c for c in checkpoints if c.step is not None]
    by_step = {c.step: c for c in checkpoints}
    has = f"run has steps {_fmt(sorted(by_step))}"
    missing = selection.missing(by_step)
    if missing:
        raise UsageError(f"{selection.option}: no checkpoint for step {missing[0]} ({has})")
    if selection.kind == "list":
        return [by_step[s] for s in selection.pick(by_step)]
    out = [c for c in checkpoints if selection.contains(c.step)]
    if not out:
        raise UsageError(f"{selection.option} {selection.text!r} selects no checkpoint ({has})")
    return out


def _fmt(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")


def infer_step(source: str) -> int | None:
    """The training step named by a checkpoint path (`.../checkpoint-500`, `global_step_50/actor/huggingface`)."""
    for part in reversed(Path(str(source).split("@")[0]).parts):
        m = _match(part)
        if m and m[1] is not None:
            return m[1]
    return None
