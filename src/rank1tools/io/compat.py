"""Base/checkpoint compatibility: same tensor names and shapes (dtypes may differ)."""

from __future__ import annotations

from ..errors import InputError
from ..modules import LM_HEAD_NAME
from .checkpoint import Checkpoint


def check_compatible(
    base: Checkpoint, other: Checkpoint, names: list[str] | None = None, label: str | None = None
) -> None:
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
            raise InputError(
                f"tensor {name!r}: shape {list(other.entries[name].shape)} in {who} "
                f"but {list(base.entry(name).shape)} in base {base.label}"
            )


def untied_head(base: Checkpoint, others: list[Checkpoint]) -> bool:
    """True when the base ties lm_head to its embedding (stores none) but a checkpoint stores its
    own `lm_head.weight`: training untied it, and the head is then a tensor of its own (whose base
    value is the embedding, which `base.read(LM_HEAD_NAME)` returns)."""
    return base.lm_head_tied and any(LM_HEAD_NAME in o.entries for o in others)


def tensor_shapes(base: Checkpoint, others: list[Checkpoint]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors a command may select: the base's, plus `lm_head.weight` when a
    checkpoint unties it (see `untied_head`), last, where transformers saves it."""
    shapes = {n: e.shape for n, e in base.entries.items()}
    if untied_head(base, others):
        shapes[LM_HEAD_NAME] = base.entry(LM_HEAD_NAME).shape
    return shapes
