"""Finite-value checks: the rule that no written tensor gains a NaN/Inf its base did not have.

Pure functions on tensors; the commands turn a failed check into a one-line error naming the
tensor. Each check is one elementwise pass, done once per written tensor.
"""

from __future__ import annotations

import torch


def all_finite(x: torch.Tensor) -> bool:
    """True when every element is finite (integer tensors always are)."""
    if not x.is_floating_point():
        return True
    return bool(torch.isfinite(x).all())


def count_introduced_nonfinite(stored: torch.Tensor, base: torch.Tensor | None) -> int:
    """Number of elements where `stored` is non-finite and `base` is finite (None: all finite)."""
    if not stored.is_floating_point():
        return 0
    bad = ~torch.isfinite(stored)
    if base is not None and base.is_floating_point():
        bad &= torch.isfinite(base.to(stored.device))
    return int(bad.sum())


def introduces_nonfinite(stored: torch.Tensor, base: torch.Tensor | None) -> bool:
    """True when `stored` holds a non-finite value at an element where `base` is finite."""
    return count_introduced_nonfinite(stored, base) > 0


def nonfinite_update_cause(base: torch.Tensor, checkpoint: torch.Tensor) -> str:
    """Why theta_t - theta_0 is not finite: "base" or "checkpoint" (an input holds NaN/Inf), else
    "overflow" (both finite, the float32 difference is not)."""
    if not all_finite(base):
        return "base"
    return "checkpoint" if not all_finite(checkpoint) else "overflow"


def max_abs(x: torch.Tensor) -> float:
    """Largest |value| as a Python float (NaN ignored; 0 for an empty tensor)."""
    if x.numel() == 0:
        return 0.0
    a = x.abs()
    if a.is_floating_point():
        a = torch.nan_to_num(a, nan=0.0, posinf=float("inf"))
    return float(a.max())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_max(dtype: torch.dtype) -> float:
    """Largest finite value of a floating dtype."""
    return float(torch.finfo(dtype).max)
