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
