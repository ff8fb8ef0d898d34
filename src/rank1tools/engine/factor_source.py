"""A checkpoint's decomposition for reconstruct and export-lora: taken from a factor store
(`--factors`: the store opened on the base, the checkpoint found in it, every module present and
enough triplets held, each checked with a one-line error naming the store; docs/formats.md#factor-store),
or each module's top-k computed from theta_t - theta_0 (`update_topk`)."""

from __future__ import annotations

import math

import torch

from ..errors import InputError, UsageError
from ..io.checkpoint import Checkpoint
from ..io.factor_store import FactorStore
from ..math.finite import all_finite, max_abs, nonfinite_update_cause
from ..math.signs import canonicalize_signs
from ..math.spectrum import delta, frobenius
from ..math.svd import topk_svd
from .checkpoint_outputs import nonfinite_error


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


def update_topk(
    name: str,
    base: Checkpoint,
    ck: Checkpoint,
    store: FactorStore | None,
    step_index: int,
    k: int,
    *,
    exact: bool,
    device: torch.device,
    w0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """U, S, V (the top k, canonical signs) and ||dW||_F of one module's update: the store's when
    given (at `step_index`), else the top-k SVD of theta_t - theta_0
    (docs/concepts.md#the-top-k-svd-and-its-accuracy-certificate). `w0`: the base tensor in float32
    on `device`, when the caller holds it already. NaN/Inf in either tensor, an update that
    overflows float32 and singular values beyond float32 are one-line InputErrors naming the tensor."""
    if store is not None:
        f = store.load(name)
        U, S, V = (f[key][step_index][..., :k].to(device) for key in ("U", "S", "V"))
        return U, S, V, float(f["fro"][step_index])
    if w0 is None:
        w0 = base.read(name, device=device)
    d = delta(ck.read(name, device=device), w0)
    fro = frobenius(d)
    if not math.isfinite(fro):  # NaN/Inf in the base or the checkpoint, or theta_t - theta_0 overflows
        theirs = ck.read_raw(name)  # error path only
        cause = nonfinite_update_cause(w0, theirs)
        if cause != "overflow":
            raise nonfinite_error((base if cause == "base" else ck).label, name)
        raise InputError(
            f"{ck.label}: the update of tensor {name!r} overflows float32 "
            f"(|values| up to {max(max_abs(theirs), max_abs(w0)):.3g} in base and checkpoint)"
        )
    res = topk_svd(d, k, exact=exact, fro=fro, bounds=False)
    del d
    if not all_finite(res.S):
        raise InputError(
            f"{ck.label}: the update of tensor {name!r} has singular values beyond float32 (||dW||_F = {fro:.3g})"
        )
    U, V = canonicalize_signs(res.U, res.V)
    return U, res.S, V, fro
