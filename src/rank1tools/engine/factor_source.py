"""A checkpoint's decomposition taken from a factor store (`--factors` of reconstruct and
export-lora): the store opened on the base, the checkpoint found in it, every module present and
enough triplets held, each checked with a one-line error naming the store (docs/formats.md#factor-store)."""

from __future__ import annotations

from ..errors import InputError, UsageError
from ..io.checkpoint import Checkpoint
from ..io.factor_store import FactorStore


def factors_for(
    path: str, base: Checkpoint, ck: Checkpoint, label: str, needed: dict[str, int], notes: list[str]
) -> tuple[FactorStore, int]:
    """(the store at `path`, the position of checkpoint `ck` (given as `label`) in it); `needed`:
    module -> the triplets the caller will read of it."""
    store = FactorStore(path)
    store.check_base(base, notes)
    step_index = store.find_checkpoint(ck)
    if step_index < 0:
        raise InputError(f"{path}: factor store holds no decomposition of {label}")
    missing = [n for n in needed if n not in store.modules]
    if missing:
        raise InputError(f"{path}: factor store has no module {missing[0]!r}")
    short = [n for n, k in needed.items() if k > store.rank]
    if short:
        raise UsageError(
            f"--rank needs {needed[short[0]]} triplets of {short[0]} but {path} holds {store.rank}; "
            "rerun decompose with a larger --rank or drop --factors"
        )
    return store, step_index
