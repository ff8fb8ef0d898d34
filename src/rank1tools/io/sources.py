"""One entry point from a user's source string to a Checkpoint.

Local paths open directly; `hf://ORG/NAME[@REVISION][/SUBFOLDER]` sources go through the Hub
modules (io/hub_open.py, io/hub_runs.py), imported only when used; the address syntax
(io/hub_spec.py) is light and imported here. The dependency points one way: this module imports the
Hub modules, none of them imports this one.
"""

from __future__ import annotations

from .checkpoint import Checkpoint, open_checkpoint
from .hub_spec import HUB_PREFIX, is_hub_source  # noqa: F401 (HUB_PREFIX: importable from here)


def open_source(spec: str, *, base: Checkpoint | None = None) -> Checkpoint:
    """Open a local model folder / .safetensors file, or a Hub repo (headers only). A PEFT adapter
    folder opens as its adapter tensors, or, given `base`, as the checkpoint it makes of that base
    (io/peft_adapter.py)."""
    if is_hub_source(spec):
        from .hub_open import open_hub_checkpoint  # noqa: PLC0415 (Hub client only when needed)

        ckpt = open_hub_checkpoint(spec)
    else:
        ckpt = open_checkpoint(spec)
    if base is not None and ckpt.adapter_config is not None:
        from .peft_adapter import on_base  # noqa: PLC0415

        return on_base(ckpt, base)
    return ckpt


def discover_checkpoints(
    run: str, *, revisions: str | None = None, subfolders: bool = False, commits: bool = False
) -> list:
    """A run's checkpoints (RunCheckpoint, step order): a local run directory, or a Hub repo by
    branch glob (`revisions`), `checkpoint-N/` subfolders, or commits whose message names a step."""
    from ..errors import UsageError
    from .runs import discover_run

    if revisions is not None or subfolders or commits:
        if not is_hub_source(run):
            raise UsageError(f"{run}: --revisions, --subfolders and --commits apply to hf:// sources only")
        from .hub_runs import discover_hub_run  # noqa: PLC0415

        return discover_hub_run(run, revisions=revisions, subfolders=subfolders, commits=commits)
    if is_hub_source(run):
        raise UsageError(f"{run}: a Hub run needs --revisions GLOB, --subfolders or --commits")
    return discover_run(run)
