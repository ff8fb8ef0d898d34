"""The figures of `rank1 logprobs` from the T × tokens log-prob matrix (docs/commands/logprobs.md#figures).

Pure computation on tensors, float64 throughout (the matrix is float32; read exactly into float64):

- per token, R² of its log-prob's least-squares line against the step (math/linefit.LineFit);
- the token filter (math/linefit.ElementFilter: --min-change, --min-distinct), counted per filter;
- over the kept tokens: the share with R² > 0.7 (R2_LINEAR), the mean and the median R²;
- per sequence: the summed log-prob per step, its R² against the step, and the token figures of
  its kept tokens;
- per position bucket (early / middle / late third of each completion's tokens): the token figures;
- per step: the mean log-prob per token and per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ...math.linefit import FRAC_KEY, R2_LINEAR, ElementFilter, LineFit

BUCKETS = ("early", "middle", "late")


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def r2_figures(r2: np.ndarray) -> dict:
    """{kept, linear, frac_r2_above_0.7, r2_mean, r2_median} of the R² values of the kept tokens
    (float64; the median is the middle value, the mean of the two middle ones for an even count)."""
    n = int(r2.size)
    linear = int((r2 > R2_LINEAR).sum())
    return {
        "kept": n,
        "linear": linear,
        FRAC_KEY: linear / n if n else None,
        "r2_mean": float(r2.mean()) if n else None,
        "r2_median": float(np.median(r2)) if n else None,
    }


def bucket_of(lengths: list[int]) -> np.ndarray:
    """Per token of sequences of `lengths` tokens (concatenated), its bucket 0, 1, 2: token j of a
    sequence of n tokens is in bucket floor(3 j / n) (a third each, the early one first)."""
    parts = [(3 * np.arange(n, dtype=np.int64)) // n for n in lengths]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _r2(t: torch.Tensor, Y: torch.Tensor) -> np.ndarray:
    """LineFit's per-column R² of float64 `Y`, fitted on Y minus its column means: the same lines
    and R², but LineFit's one-pass S_yy = Σy² − Tȳ² no longer cancels the digits of a log-prob of
    -10 that moves by 1e-5 (R² exact to ~1e-11 instead of ~1e-6)."""
    return LineFit().fit(t, Y - Y.mean(dim=0)).r2_.numpy()


@dataclass
class Figures:
    """Everything the tables and the summary report (see the module docstring)."""

    token_r2: np.ndarray  # (tokens,) float64, NaN for a token whose log-prob does not change
    keep: np.ndarray  # (tokens,) bool: kept by the filter
    removed_min_change: int
    removed_min_distinct: int
    overall: dict  # r2_figures over the kept tokens
    sequences: list[dict]  # per sequence: tokens, r2_figures of its kept tokens, sum_r2, sums per step
    sums: np.ndarray  # (T, sequences) float64: summed log-prob per sequence and step
    sum_r2: np.ndarray  # (sequences,) float64 R² of the summed log-prob against the step
    buckets: list[dict]
    per_step: list[dict]


def compute_figures(
    steps: list[int], Y: torch.Tensor, lengths: list[int], token_filter: ElementFilter = ElementFilter()
) -> Figures:
    """The figures of the log-prob matrix `Y` (T × tokens, rows in the order of `steps`) whose
    columns are the tokens of sequences of `lengths` tokens, one after the other."""
    if Y.ndim != 2 or Y.shape[0] != len(steps) or Y.shape[1] != sum(lengths):
        raise ValueError(f"Y is {tuple(Y.shape)}; expected ({len(steps)}, {sum(lengths)})")
    t = torch.tensor(steps, dtype=torch.float64)
    Yd = Y.to(torch.float64)
    r2 = _r2(t, Yd)
    keep_t, removed_change, removed_distinct = token_filter.apply(Y)
    keep = keep_t.numpy()
    overall = r2_figures(r2[keep])

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    sums = torch.stack([Yd[:, a:b].sum(dim=1) for a, b in zip(offsets[:-1], offsets[1:])], dim=1)
    sum_r2 = _r2(t, sums)
    sequences = []
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        k = keep[a:b]
        sequences.append(
            {
                "tokens": int(b - a),
                **r2_figures(r2[a:b][k]),
                "sum_r2": _num(float(sum_r2[i])),
                "sum_logprob_first": float(sums[0, i]),
                "sum_logprob_last": float(sums[-1, i]),
            }
        )

    which = bucket_of(lengths)
    buckets = [
        {"bucket": name, "tokens": int((which == b).sum()), **r2_figures(r2[(which == b) & keep])}
        for b, name in enumerate(BUCKETS)
    ]
    per_token = Yd.mean(dim=1)
    per_sequence = sums.mean(dim=1)
    per_step = [
        {"step": s, "mean_logprob_per_token": float(per_token[i]), "mean_logprob_per_sequence": float(per_sequence[i])}
        for i, s in enumerate(steps)
    ]
    return Figures(
        token_r2=r2,
        keep=keep,
        removed_min_change=removed_change,
        removed_min_distinct=removed_distinct,
        overall=overall,
        sequences=sequences,
        sums=sums.numpy(),
        sum_r2=sum_r2,
        buckets=buckets,
        per_step=per_step,
    )
