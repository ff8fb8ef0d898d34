"""io layer: where tensors come from and go to. Nothing here knows about SVD.

Exports are loaded on first use (PEP 562), so torch-free modules of this package (outputs) can be
imported by the CLI before any heavy import.
"""

from importlib import import_module

_EXPORTS = {
    "Checkpoint": "checkpoint",
    "open_checkpoint": "checkpoint",
    "check_compatible": "compat",
    "open_source": "sources",
    "is_hub_source": "sources",
    "RunCheckpoint": "runs",
    "discover_run": "runs",
    "select_steps": "runs",
    "ShardedWriter": "writer",
    "TensorSpec": "writer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
