"""Base/checkpoint compatibility: same tensor names and shapes (dtypes may differ)."""

from __future__ import annotations

from ..errors import InputError
from .checkpoint import Checkpoint


def check_compatible(base: Checkpoint, other: Checkpoint) -> None:
    """Raise InputError naming the first tensor that differs in presence or shape.

    A tied `lm_head` that one side omits counts as present (it is the embedding).
    """
    for name, e in base.entries.items():
        if name not in other:
            raise InputError(f"{other.label}: lacks tensor {name!r} that base {base.label} has")
        shape = other.entry(name).shape
        if shape != e.shape:
            raise InputError(
                f"tensor {name!r}: shape {list(shape)} in {other.label} but {list(e.shape)} in base {base.label}"
            )
    for name in other.entries:
        if name not in base:
            raise InputError(f"{other.label}: has tensor {name!r} that base {base.label} lacks")
        if base.entry(name).shape != other.entries[name].shape:
            raise InputError(
                f"tensor {name!r}: shape {list(other.entries[name].shape)} in {other.label} "
                f"but {list(base.entry(name).shape)} in base {base.label}"
            )
