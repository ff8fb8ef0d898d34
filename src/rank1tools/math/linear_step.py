"""The per-element straight-line step, on tensors in memory: one implementation for
`rank1 extrapolate --method linear` (which streams it over file chunks) and for re-grounding
(`rank1tools.integrations.trl.ReGroundCallback`, on the live model's weights)
(docs/extrapolation.md#extrapolate-linear-weight-space-line, docs/reground.md).

Updates are measured from an origin θ₀ (a base checkpoint, or a re-grounding segment's start) at
step 0: row t of `updates` is θ_t − θ₀ in float32 at step `steps[t]`. `lstsq` fits one least-squares
line per element through the rows; `two-point` is the RLVR-linearity reference's
θ(s) = θ_a + (s − a)/(b − a)·(θ_b − θ_a), a step that is not a row being the origin (update 0).
Predicted updates are float64; θ̂ = θ₀ (in float64) + update, cast to the stored dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..modules import is_norm_parameter
from .linefit import LineFit, two_point

LINE_MODES = ("lstsq", "two-point")
NORMS_CHOICES = ("copy", "extrapolate")  # norm weights: taken from the later point, or extrapolated
TENSORS_CHOICES = ("all", "matrices")  # every floating tensor, or the 2-D ones only
CHUNK = 1 << 21  # elements per chunk of an in-memory tensor (its float64 working copies: 16 MiB each)


def line_updates(
    updates: torch.Tensor,
    steps: Sequence[float],
    targets: Sequence[float],
    *,
    mode: str = "lstsq",
    from_step: float | None = None,
    to_step: float | None = None,
) -> Iterator[torch.Tensor]:
    """The predicted float64 update θ̂(s) − θ₀ at every target s, one at a time (W × n float32
    `updates` at `steps`; `two-point` defaults: the first and the last row)."""
    if mode == "lstsq":
        fit = LineFit(r2=False).fit(list(steps), updates)
        for s in targets:
            yield fit.predict(s)
        return
    if mode != "two-point":
        raise ValueError(f"mode must be one of {LINE_MODES}, got {mode!r}")
    row = {float(s): k for k, s in enumerate(steps)}
    a = float(steps[0] if from_step is None else from_step)
    b = float(steps[-1] if to_step is None else to_step)
    value_a = updates[row[a]] if a in row else torch.zeros_like(updates[0])  # not a row: the origin
    for s in targets:
        yield two_point(value_a, updates[row[b]], a, b, s)  # θ_a − θ₀ + f·(θ_b − θ_a), float64


def is_extrapolated(name: str, tensor: torch.Tensor, *, norms: str = "copy", tensors: str = "all") -> bool:
    """Whether a tensor moves on its line (else it keeps its value at the latest point): floating
    tensors; with tensors="matrices" the 2-D ones only; with norms="copy" not the norm weights
    (modules.is_norm_parameter: the reference copies them from the later checkpoint)."""
    if not tensor.is_floating_point():
        return False
    if tensors == "matrices" and tensor.ndim < 2:
        return False
    return not (norms == "copy" and is_norm_parameter(name, tuple(tensor.shape)))


def tensor_updates(
    origin: torch.Tensor,
    points: Sequence[torch.Tensor],
    steps: Sequence[float],
    target: float,
    *,
    mode: str = "lstsq",
    from_step: float | None = None,
    to_step: float | None = None,
    chunk: int = CHUNK,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One tensor's predicted update at `target`, chunk by chunk over its flattened elements:
    (first element, θ₀ chunk in float32, the latest point's float32 update, the float64 predicted update). `points`: the tensor at `steps` (any dtype
    and device; read one chunk at a time onto the origin's device)."""
    flat0 = origin.reshape(-1)
    flats = [p.detach().reshape(-1) for p in points]
    n = flat0.numel()
    for lo in range(0, n, chunk) if n else []:
        hi = min(lo + chunk, n)
        base = flat0[lo:hi].to(torch.float32)
        rows = torch.stack([f[lo:hi].to(device=base.device, dtype=torch.float32) for f in flats])
        rows.sub_(base)  # float32 updates, as `extrapolate` computes them from files
        update = next(line_updates(rows, steps, [target], mode=mode, from_step=from_step, to_step=to_step))
        yield lo, base, rows[-1], update


def extrapolate_state(
    origin: dict[str, torch.Tensor],
    points: Sequence[dict[str, torch.Tensor]],
    steps: Sequence[float],
    target: float,
    *,
    mode: str = "lstsq",
    from_step: float | None = None,
    to_step: float | None = None,
    norms: str = "copy",
    tensors: str = "all",
) -> dict[str, torch.Tensor]:
    """θ̂(target) for a whole state dict in memory (the latest point's dtype): extrapolated tensors
    on their lines from `origin` (step 0) through `points` (at `steps`), the others the latest point's."""
    latest = points[-1]
    out = {}
    for name, value in latest.items():
        if not is_extrapolated(name, value, norms=norms, tensors=tensors):
            out[name] = value.clone()
            continue
        flat = torch.empty(value.numel(), dtype=value.dtype, device=value.device)
        for lo, base, _, update in tensor_updates(
            origin[name], [p[name] for p in points], steps, target, mode=mode, from_step=from_step, to_step=to_step
        ):
            flat[lo : lo + base.numel()] = (base.to(torch.float64) + update).to(value.dtype)
        out[name] = flat.reshape(value.shape)
    return out
