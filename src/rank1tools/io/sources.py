"""One entry point from a user's source string to a Checkpoint.

Local paths open directly; `hf://ORG/NAME[@REVISION][/SUBFOLDER]` sources go through the Hub
module (io/hub.py), imported only when used.
"""

from __future__ import annotations

from .checkpoint import Checkpoint, open_checkpoint

HUB_PREFIX = "hf://"


def is_hub_source(spec: str) -> bool:
    return str(spec).startswith(HUB_PREFIX)


def open_source(spec: str) -> Checkpoint:
    """Open a local model folder / .safetensors file, or a Hub repo (headers only)."""
    if is_hub_source(spec):
        from .hub import open_hub_checkpoint  # noqa: PLC0415 (Hub client only when needed)

        return open_hub_checkpoint(spec)
    return open_checkpoint(spec)


def discover_checkpoints(run: str, *, revisions: str | None = None, subfolders: bool = False,
                         commits: bool = False) -> list:
    """A run's checkpoints (RunCheckpoint, step order): a local run directory, or a Hub repo by
    branch glob (`revisions`), `checkpoint-N/` subfolders, or commits whose message names a step."""
    from ..errors import UsageError
    from .runs import discover_run

    if revisions is not None or subfolders or commits:
        if not is_hub_source(run):
            raise UsageError(f"{run}: --revisions, --subfolders and --commits apply to hf:// sources only")
        from .hub import discover_hub_run  # noqa: PLC0415

        return discover_hub_run(run, revisions=revisions, subfolders=subfolders, commits=commits)
    if is_hub_source(run):
        raise UsageError(f"{run}: a Hub run needs --revisions GLOB, --subfolders or --commits")
    return discover_run(run)
