"""Base/checkpoint compatibility: same tensor names and shapes (dtypes may differ)."""

from __future__ import annotations

from ..errors import InputError
from .checkpoint import Checkpoint


def check_compatible(base: Checkpoint, other: Checkpoint, names: list[str] | None = None,
                     label: str | None = None) -> None:
    """Raise InputError naming the first tensor that differs in presence or shape.

    `names`: check only these base tensors (a command that reads a selection; other tensors of
    `other` may then differ). `label`: how to name `other` in messages (default its label).
    A tied `lm_head` that one side omits counts as present (it is the embedding).
    """
    who = label or other.label
    for name in base.entries if names is None else names:
        if name not in other:
            raise InputError(f"{who}: lacks tensor {name!r} that base {base.label} has")
        shape, want = other.entry(name).shape, base.entry(name).shape
        if shape != want:
            raise InputError(f"tensor {name!r}: shape {list(shape)} in {who} but {list(want)} in base {base.label}")
    if names is not None:
        return
    for name in other.entries:
        if name not in base:
            raise InputError(f"{who}: has tensor {name!r} that base {base.label} lacks")
        if base.entry(name).shape != other.entries[name].shape:
            raise InputError(f"tensor {name!r}: shape {list(other.entries[name].shape)} in {who} "
                             f"but {list(base.entry(name).shape)} in base {base.label}")
