"""Straight lines through series over training steps: the fitting vocabulary of every extrapolation.

One OLS line y ≈ intercept + slope·t per column of Y (T × n), in float64: RELEX fits its r
coefficient series (docs/extrapolation.md#extrapolate-relex-trajectory-rank-r), `linear --mode lstsq`
and `linearity` fit every element of a tensor (docs/extrapolation.md#extrapolate-linear-weight-space-line).
`LineFit` is a small estimator in scikit-learn's manner (fit / predict, fitted attributes end in
`_`); `two_point` is the RLVR-linearity reference's extrapolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

R2_LINEAR = 0.7  # RLVR linearity's threshold: an element "evolves linearly" when its R² exceeds this
FRAC_KEY = f"frac_r2_above_{R2_LINEAR}"  # "frac_r2_above_0.7": the share's name in every table and summary


class LineFit:
    """Least-squares line per column: Y[:, j] ≈ y_mean_[j] + slope_[j] · (t − t_mean_).

    Fitted attributes (float64 tensors on Y's device): `t_mean_` (float), `y_mean_`, `slope_`,
    `intercept_` (the value at t = 0), `r2_` (coefficient of determination per column; NaN for a
    column that does not change, whose line is flat and exact; None with `LineFit(r2=False)`).
    """

    def __init__(self, r2: bool = True):
        self.r2 = r2  # False: skip the R² (S_yy costs two more passes over Y; r2_ is then None)

    def fit(self, t, Y: torch.Tensor) -> LineFit:
        Y = Y.to(torch.float64)
        if Y.ndim == 1:
            Y = Y[:, None]
        t = torch.as_tensor(t, dtype=torch.float64, device=Y.device).reshape(-1)
        if t.numel() != Y.shape[0]:
            raise ValueError(f"t has {t.numel()} points but Y has {Y.shape[0]} rows")
        if t.numel() < 2:
            raise ValueError("a line needs at least 2 points")
        self.t_mean_ = float(t.mean())
        tc = t - self.t_mean_
        stt = float(tc @ tc)
        if stt == 0:
            raise ValueError("all points are at the same step")
        # Σ(t − t̄) = 0, so S_ty = (t − t̄)·Y needs no centred copy of Y (one BLAS pass), and
        # S_yy = Σy² − T·ȳ²; for a constant column both terms are exact in float64 (float32 data:
        # squares fit in 48 bits), so such a column gets S_yy = 0 exactly and R² NaN.
        self.y_mean_ = Y.mean(dim=0)
        sty = tc @ Y
        self.slope_ = sty / stt
        self.intercept_ = self.y_mean_ - self.slope_ * self.t_mean_
        if not self.r2:
            self.r2_ = None
            return self
        syy = ((Y * Y).sum(dim=0) - t.numel() * self.y_mean_ * self.y_mean_).clamp_min(0)
        # R² = 1 − SS_res/SS_tot = (S_ty)² / (S_tt · S_yy) for a line with intercept
        r2 = sty * sty / (stt * syy)
        self.r2_ = torch.where(syy > 0, r2.clamp(max=1.0), torch.full_like(r2, math.nan))
        return self

    def predict(self, s: float) -> torch.Tensor:
        """The fitted value of every column at step `s` (float64)."""
        return self.y_mean_ + self.slope_ * (float(s) - self.t_mean_)


def fraction_above(r2: torch.Tensor, threshold: float = R2_LINEAR) -> tuple[int, int, int]:
    """(columns with R² > threshold, columns that change, all columns). A column that does not
    change over the window has no R² (NaN) and is counted only in the last figure."""
    nan = int(torch.isnan(r2).sum())
    return int((r2 > threshold).sum()), r2.numel() - nan, int(r2.numel())  # NaN > x is False


def distinct_counts(Y: torch.Tensor) -> torch.Tensor:
    """Per column of Y (T × n), how many distinct values it takes (exact comparison)."""
    if Y.ndim == 1:
        Y = Y[:, None]
    ordered = Y.sort(dim=0).values
    return (ordered[1:] != ordered[:-1]).sum(dim=0) + 1


@dataclass(frozen=True)
class ElementFilter:
    """Which series count in a per-element R² figure: the RLVR-linearity reference keeps an element
    whose range over the window exceeds `min_change` (max − min > 1e-4 there) and that takes at
    least `min_distinct` distinct values (4 there: a bf16 element moved by one or two rounding steps
    is a staircase no line fits). The defaults keep every element that changes at all
    (docs/concepts.md#per-element-linearity-filters)."""

    min_change: float = 0.0
    min_distinct: int = 2

    def __post_init__(self):
        if not (self.min_change >= 0 and math.isfinite(self.min_change)):
            raise ValueError(f"min_change must be a finite number >= 0, got {self.min_change}")
        if self.min_distinct < 1:
            raise ValueError(f"min_distinct must be at least 1, got {self.min_distinct}")

    def apply(self, Y: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(kept columns as a bool mask, columns the change filter removed, columns the distinct
        filter removed among those the change filter kept)."""
        if Y.ndim == 1:
            Y = Y[:, None]
        moved = (Y.max(dim=0).values.to(torch.float64) - Y.min(dim=0).values.to(torch.float64)) > self.min_change
        distinct = distinct_counts(Y) >= self.min_distinct
        keep = moved & distinct
        return keep, int((~moved).sum()), int((moved & ~distinct).sum())


def two_point(value_a: torch.Tensor, value_b: torch.Tensor, a: float, b: float, s: float) -> torch.Tensor:
    """theta(s) = theta_a + (s − a)/(b − a) · (theta_b − theta_a), in float64
    (docs/extrapolation.md#extrapolate-linear-weight-space-line)."""
    if a == b:
        raise ValueError("the two points are at the same step")
    va, vb = value_a.to(torch.float64), value_b.to(torch.float64)
    return va + ((float(s) - a) / (b - a)) * (vb - va)


def positions_for(steps: list[int], targets: list[float]) -> tuple[list[float], list[float]]:
    """The RELEX reference code's x-axis: positions 0, 1, ..., T−1 instead of the steps, and the
    target steps mapped onto it with the window's mean spacing, (s − t₁)/h̄. Equal to fitting on
    steps when the checkpoints are evenly spaced; wrong (on purpose, to reproduce the reference)
    when they are not."""
    if len(steps) < 2:
        raise ValueError("need at least 2 steps")
    h = (steps[-1] - steps[0]) / (len(steps) - 1)
    return [float(i) for i in range(len(steps))], [(s - steps[0]) / h for s in targets]
