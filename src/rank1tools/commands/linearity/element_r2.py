"""The RLVR-linearity reference's per-element figure in `rank1 linearity`: the mean and median
per-element R² of the elements a filter keeps, optionally with the base as step 0
(docs/concepts.md#per-element-linearity-filters, docs/commands/linearity.md).

Per tensor (one streamed pass, chunk by chunk): the filter (math.linefit.ElementFilter) removes
the elements whose range is at most `min_change` and those with fewer than `min_distinct` distinct
values; the kept elements' R² are summed in float64 (the mean is exact), stored as float32 in one
buffer of the tensor's evaluated size (4 bytes per element, one tensor at a time: the median is the
median of those float32 values, within 3e-8 of the float64 one) and counted in a histogram of
HIST_BINS equal bins over [0, 1]. A group of tensors (overall, a type, a layer) pools its tensors'
kept elements, each tensor weighing numel / elements (1 without `--sample`): its mean is exact, its
median is read off the pooled histogram (linear inside the bin that holds half the weight: within
1 / HIST_BINS of the exact pooled median), since holding every R² of a model is not affordable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...math.linefit import ElementFilter, LineFit

HIST_BINS = 1 << 14  # pooled medians within 1 / 16384 ≈ 6.1e-5
COLUMNS = ["kept", "removed_min_change", "removed_min_distinct", "r2_mean", "r2_median"]


@dataclass(frozen=True)
class ElementR2Settings:
    """Which elements the figure keeps and whether the base joins the fits as step 0."""

    with_base: bool = False
    min_change: float = 0.0
    min_distinct: int = 2

    @property
    def filter(self) -> ElementFilter:
        return ElementFilter(self.min_change, self.min_distinct)


class TensorR2:
    """One tensor's kept per-element R², accumulated over its chunks (`add`), then `figures()`."""

    def __init__(self, settings: ElementR2Settings, steps: list[int], elements: int, device):
        self.settings = settings
        self.filter = settings.filter
        self.t = torch.tensor([0, *steps] if settings.with_base else steps, dtype=torch.float64, device=device)
        self.values = np.empty(elements, dtype=np.float32)
        self.kept = 0
        self.total = 0.0
        self.removed_change = self.removed_distinct = 0
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)

    def add(self, Y: torch.Tensor, base: torch.Tensor, r2: torch.Tensor) -> None:
        """Y: T × n values of the chunk's evaluated elements, `base` their base values (n,), `r2`
        their R² without the base (reused when the base is not a point of the fit)."""
        if self.settings.with_base:
            Y = torch.cat([base[None, :], Y])
            r2 = LineFit().fit(self.t, Y).r2_
        keep, by_change, by_distinct = self.filter.apply(Y)
        flat = keep & torch.isnan(r2)  # S_yy rounds to 0 in float64: no R², as a static element
        vals = r2[keep & ~flat]
        self.removed_change += by_change + int(flat.sum())
        self.removed_distinct += by_distinct
        n = vals.numel()
        if n:
            self.total += float(vals.sum())
            bins = (vals * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
            self.hist += torch.bincount(bins, minlength=HIST_BINS).cpu().numpy()
            self.values[self.kept : self.kept + n] = vals.to(torch.float32).cpu().numpy()
            self.kept += n

    def figures(self) -> dict:
        """JSON data (a Ray task returns it): counts, the R² sum, the median, the sparse histogram."""
        nz = np.flatnonzero(self.hist)
        return {
            "kept": self.kept,
            "removed_min_change": self.removed_change,
            "removed_min_distinct": self.removed_distinct,
            "r2_sum": self.total,
            "r2_median": median(self.values[: self.kept]),
            "r2_hist": {"bins": nz.tolist(), "counts": self.hist[nz].tolist()},
        }


def median(values: np.ndarray) -> float | None:
    """np.median's value (the mean of the two middle values for an even count), in float64."""
    n = len(values)
    if not n:
        return None
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(values, [lo, hi])
    return (float(part[lo]) + float(part[hi])) / 2


def row_columns(figs: dict) -> dict:
    """A tensor's row entries: COLUMNS, and the R² sum and histogram its groups pool."""
    kept = figs["kept"]
    return {
        "kept": kept,
        "removed_min_change": figs["removed_min_change"],
        "removed_min_distinct": figs["removed_min_distinct"],
        "r2_mean": figs["r2_sum"] / kept if kept else None,
        "r2_median": figs["r2_median"],
        "r2_sum": figs["r2_sum"],  # for the groups (`pooled`), not a column
        "r2_hist": figs["r2_hist"],
    }


def histogram_median(weights: np.ndarray) -> float | None:
    """The weighted median of values binned into len(weights) equal bins over [0, 1]: linear
    inside the bin where the cumulative weight reaches half the total (the grouped median)."""
    total = float(weights.sum())
    if total <= 0:
        return None
    cum = np.cumsum(weights)
    b = int(np.searchsorted(cum, total / 2))
    before = float(cum[b - 1]) if b else 0.0
    inside = float(weights[b])
    frac = (total / 2 - before) / inside if inside > 0 else 0.0
    return (b + min(max(frac, 0.0), 1.0)) / len(weights)


def pooled(rows: list[dict]) -> dict:
    """A group's figure over its tensors' kept elements, each tensor weighing numel / elements:
    `r2_mean` exact, `r2_median` from the pooled histogram; raw counts over the evaluated elements."""
    weights = np.zeros(HIST_BINS, dtype=np.float64)
    total = kept_w = 0.0
    for r in rows:
        scale = r["numel"] / r["elements"]
        h = r["r2_hist"]
        np.add.at(weights, np.asarray(h["bins"], dtype=np.int64), np.asarray(h["counts"], dtype=np.float64) * scale)
        total += r["r2_sum"] * scale
        kept_w += r["kept"] * scale
    return {
        "r2_mean": total / kept_w if kept_w else None,
        "r2_median": histogram_median(weights),
        "kept": sum(r["kept"] for r in rows),
        "removed_min_change": sum(r["removed_min_change"] for r in rows),
        "removed_min_distinct": sum(r["removed_min_distinct"] for r in rows),
    }


def by_layer(rows: list[dict]) -> list[dict]:
    """`pooled` per layer index, in layer order; the tensors outside the blocks (layer None) last."""
    layers: dict = {}
    for r in rows:
        layers.setdefault(r["layer"], []).append(r)
    order = sorted(layers, key=lambda layer: (layer is None, layer if layer is not None else 0))
    return [{"layer": layer, "tensors": len(layers[layer]), **pooled(layers[layer])} for layer in order]


def settings_record(settings: ElementR2Settings, rows: list[dict], sample: int | None) -> dict:
    """summary.json's `element_r2`: the settings, the counts and what the figures are."""
    evaluated = sum(r["elements"] for r in rows)
    base = "with the base as step 0" if settings.with_base else "over the window's checkpoints (base left out)"
    return {
        "with_base": settings.with_base,
        "min_change": settings.min_change,
        "min_distinct": settings.min_distinct,
        "evaluated": evaluated,
        "kept": sum(r["kept"] for r in rows),
        "removed_min_change": sum(r["removed_min_change"] for r in rows),
        "removed_min_distinct": sum(r["removed_min_distinct"] for r in rows),
        "histogram_bins": HIST_BINS,
        "note": (
            f"mean and median per-element linear R² against the step, {base}, of the elements whose "
            f"range exceeds {settings.min_change:g} and that take at least {settings.min_distinct} distinct "
            f"values (the RLVR-linearity reference: base as step 0, 1e-4, 4 distinct values); the overall, type and layer means are exact "
            f"over the pooled kept elements (a tensor weighs numel / elements), their medians come from a "
            f"{HIST_BINS}-bin histogram (within {1 / HIST_BINS:.1e}); a tensor's median is exact"
            + (f"; on a seeded sample of up to {sample} elements per tensor" if sample else "")
        ),
    }
