"""Run discovery on the Hub (`discover_hub_run`): branches matching a glob (step = trailing integer of
the name), step folders (`checkpoint-N/`, ...) of one revision, or commits whose message says "step N".
Each checkpoint found is an `hf://ORG/NAME@<sha>[/SUBFOLDER]` source, pinned to its sha.
"""

from __future__ import annotations

import fnmatch
import re

from ..errors import InputError, UsageError
from ..values import ascii_int
from .checkpoint import INDEX_FILE, PICKLE_SUFFIXES
from .hub_errors import _hub_errors
from .hub_open import resolve_revision
from .hub_spec import HubSpec, _api, _offline, _storage_folder, parse_hub_spec
from .runs import _VERL_WEIGHT_DIRS, RunCheckpoint, _match, name_problem, one_of_step

# [0-9], not \d: \d and int() also take other scripts' digits
_TRAILING_INT = re.compile(r"([0-9]+)$")
_COMMIT_STEP = re.compile(r"step[ _-]?([0-9]+)", re.IGNORECASE)


def step_from_name(name: str) -> int | None:
    """Step number of a branch or folder name: its trailing integer (step_50, main-step-000000050, checkpoint-50)."""
    m = _TRAILING_INT.search(name)
    return ascii_int(m.group(1)) if m else None


def step_from_commit(title: str, message: str = "") -> int | None:
    """Step number of a commit: 'step N' (also step_N, step-N, stepN) in its title, else its message."""
    for text in (title, message):
        m = _COMMIT_STEP.search(text or "")
        if m and ascii_int(m.group(1)) is not None:
            return ascii_int(m.group(1))
    return None


def discover_hub_run(
    spec: str, *, revisions: str | None = None, subfolders: bool = False, commits: bool = False
) -> list[RunCheckpoint]:
    """A Hub run's checkpoints, ordered by step; each `weights` is an `hf://ORG/NAME@<sha>[/SUB]` source.

    revisions: glob over branch names (`step_*`), step = trailing integer of the name;
    subfolders: step folders (checkpoint-N/, global_step_N/, global_stepN_hf/) at one revision;
    commits: commits of one revision's history whose message says "step N" (newest wins on repeats).
    """
    chosen = [
        m
        for m, on in (("--revisions", revisions is not None), ("--subfolders", subfolders), ("--commits", commits))
        if on
    ]
    if len(chosen) != 1:
        raise UsageError(
            f"{spec}: choose one Hub discovery mode: --revisions GLOB, --subfolders or --commits"
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    hs = parse_hub_spec(spec)
    label = str(spec)
    if _offline() and not revisions:
        raise InputError(
            f"{label}: {chosen[0]} lists the repo on the Hub, which HF_HUB_OFFLINE=1 forbids "
            "(--revisions works offline from the cached branch refs)"
        )
    if revisions is not None:
        return _discover_branches(hs, label, revisions)
    if subfolders:
        return _discover_subfolders(hs, label)
    return _discover_commits(hs, label)


def _discover_branches(hs: HubSpec, label: str, pattern: str) -> list[RunCheckpoint]:
    if hs.revision is not None:
        raise UsageError(f"{label}: --revisions picks the revisions; give the repo without @REVISION")
    if _offline():
        refs_dir = _storage_folder(hs.repo_id) / "refs"
        branches = (
            {p.name: p.read_text().strip() for p in refs_dir.iterdir() if p.is_file()} if refs_dir.is_dir() else {}
        )
    else:
        with _hub_errors(label, hs.repo_id, None, "the list of branches"):
            refs = _api().list_repo_refs(hs.repo_id)
        branches = {b.name: b.target_commit for b in refs.branches}
    matched = sorted(b for b in branches if fnmatch.fnmatchcase(b, pattern))
    found: dict[int, RunCheckpoint] = {}
    unnamed: list[RunCheckpoint] = []  # matched, but no usable step: listed, never skipped silently
    for b in matched:
        step = step_from_name(b)
        if step is None:
            unnamed.append(
                RunCheckpoint(
                    None,
                    hs.address(revision=b),
                    "hub-branch",
                    None,
                    "branch name ends in no step number (digits 0-9, below 2**63)",
                )
            )
            continue
        if step in found:
            raise InputError(f"{label}: step {step} appears twice (branches {found[step].path.split('@')[-1]}, {b})")
        sha = branches[b]
        found[step] = RunCheckpoint(step, hs.address(revision=b), "hub-branch", hs.address(revision=sha))
    if not found:
        where = " in the local cache" if _offline() else ""
        raise InputError(
            f"{label}: no branch matching {pattern!r} ends in a step number{where} "
            f"(branches: {', '.join(sorted(branches)[:12]) or 'none'})"
        )
    return [found[s] for s in sorted(found)] + unnamed


def _discover_subfolders(hs: HubSpec, label: str) -> list[RunCheckpoint]:
    from huggingface_hub.hf_api import RepoFile

    sha = resolve_revision(hs, label)
    base = f"{hs.subfolder}/" if hs.subfolder else ""
    with _hub_errors(label, hs.repo_id, sha, f"folder {hs.subfolder}" if hs.subfolder else None):
        items = list(_api().list_repo_tree(hs.repo_id, path_in_repo=hs.subfolder, revision=sha, recursive=True))
    files = [it.path[len(base) :] for it in items if isinstance(it, RepoFile) and it.path.startswith(base)]
    by_folder: dict[str, list[str]] = {}
    for f in files:
        top, _, rest = f.partition("/")
        if rest:
            by_folder.setdefault(top, []).append(rest)
    found: dict[int, RunCheckpoint] = {}
    unnamed: list[RunCheckpoint] = []
    for folder in sorted(by_folder):
        m = _match(folder)
        if m is None:
            continue
        layout, step = m
        inner = by_folder[folder]
        path = hs.address(revision=hs.revision, subfolder=base + folder)
        if step is None:  # named like a step folder, no usable step: listed, not skipped
            unnamed.append(RunCheckpoint(None, path, f"hub-subfolder/{layout}", None, name_problem(folder)))
            continue
        rc = None
        for cand in _VERL_WEIGHT_DIRS if layout == "verl" else (".",):
            prefix = "" if cand == "." else cand + "/"
            names = [r[len(prefix) :] for r in inner if r.startswith(prefix) and "/" not in r[len(prefix) :]]
            if any(n.endswith(".safetensors") or n == INDEX_FILE for n in names):
                sub = base + folder + ("" if cand == "." else "/" + cand)
                rc = RunCheckpoint(step, path, f"hub-subfolder/{layout}", hs.address(revision=sha, subfolder=sub))
                break
        if rc is None:
            pickles = sorted(r for r in inner if r.endswith(PICKLE_SUFFIXES))
            problem = (
                (
                    f"unsupported: only pickle/trainer shards ({pickles[0]}{', ...' if len(pickles) > 1 else ''}); "
                    "convert to safetensors first"
                )
                if pickles
                else "unsupported: no safetensors weights in this folder"
            )
            rc = RunCheckpoint(step, path, f"hub-subfolder/{layout}", None, problem)
        found[step] = one_of_step(found[step], rc, label) if step in found else rc
    if not found and not unnamed:
        raise InputError(
            f"{label}: no checkpoint folders (checkpoint-N, global_step_N, global_stepN_hf) at revision {sha[:12]}"
        )
    return [found[s] for s in sorted(found)] + unnamed


def _discover_commits(hs: HubSpec, label: str) -> list[RunCheckpoint]:
    with _hub_errors(label, hs.repo_id, hs.revision, "the commit history"):
        history = _api().list_repo_commits(hs.repo_id, revision=hs.revision)
    found: dict[int, RunCheckpoint] = {}
    for c in history:  # newest first: a step pushed twice keeps its latest commit
        step = step_from_commit(c.title, c.message)
        if step is None or step in found:
            continue
        title = " ".join((c.title or "").split())[:60]
        found[step] = RunCheckpoint(
            step, f"{hs.address(revision=c.commit_id[:12])} ({title})", "hub-commit", hs.address(revision=c.commit_id)
        )
    if not found:
        raise InputError(
            f"{label}: no commit message with a step number (like 'Training in progress, step 50') in "
            f"the history of {hs.revision or 'the default branch'} ({len(history)} commits)"
        )
    return [found[s] for s in sorted(found)]
