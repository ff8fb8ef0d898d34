"""The figures of `rank1 logprobs` (commands/logprobs/figures.py) on planted T × tokens matrices,
against an independent numpy float64 computation (docs/commands/logprobs.md#figures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rank1tools.commands.logprobs.figures import BUCKETS, FRAC_KEY, bucket_of, compute_figures
from rank1tools.commands.logprobs.plan import select_sequences
from rank1tools.math.linefit import ElementFilter

STEPS = [0, 10, 20, 30, 50]


def _np_r2(t: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Squared Pearson correlation of each column with t (NaN for a constant column)."""
    tc = t - t.mean()
    Yc = Y - Y.mean(axis=0)
    syy = (Yc * Yc).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = (tc @ Yc) ** 2 / ((tc @ tc) * syy)
    return np.where(syy > 0, np.minimum(r2, 1.0), np.nan)


def _np_figures(t, Y, lengths, min_change, min_distinct):
    Y64 = Y.astype(np.float64)
    r2 = _np_r2(t, Y64)
    moved = (Y64.max(axis=0) - Y64.min(axis=0)) > min_change
    distinct = np.array([len(np.unique(Y[:, j])) for j in range(Y.shape[1])]) >= min_distinct
    keep = moved & distinct
    kept = r2[keep]
    return {
        "r2": r2,
        "keep": keep,
        "removed_change": int((~moved).sum()),
        "removed_distinct": int((moved & ~distinct).sum()),
        "frac": float((kept > 0.7).mean()),
        "mean": float(kept.mean()),
        "median": float(np.median(kept)),
    }


def test_a_planted_exactly_linear_matrix_gives_r2_one():
    t = np.array(STEPS, dtype=np.float64)
    rng = np.random.default_rng(0)
    slopes, starts = rng.normal(size=12) * 0.01, -rng.uniform(0.1, 5, size=12)
    Y = torch.tensor(starts[None, :] + slopes[None, :] * t[:, None], dtype=torch.float64)  # exact lines
    figs = compute_figures(STEPS, Y, [4, 8])
    # R² = 1 up to the float64 rounding of LineFit's one-pass sums (S_yy = Σy² − Tȳ²)
    assert np.allclose(figs.token_r2, 1.0, rtol=0, atol=1e-9)
    assert figs.overall == {
        "kept": 12,
        "linear": 12,
        FRAC_KEY: 1.0,
        "mean_r2": pytest.approx(1.0),
        "median_r2": pytest.approx(1.0),
    }
    assert np.allclose(figs.sum_r2, 1.0, rtol=0, atol=1e-9)  # a sum of lines is a line
    for b in figs.buckets:
        assert b[FRAC_KEY] == 1.0


@pytest.mark.parametrize("min_change,min_distinct", [(0.0, 2), (1e-4, 4), (0.05, 3)])
def test_figures_equal_numpy(min_change, min_distinct):
    rng = np.random.default_rng(1)
    T, lengths = len(STEPS), [5, 1, 9, 3]
    N = sum(lengths)
    t = np.array(STEPS, dtype=np.float64)
    Y = (-rng.uniform(0, 3, N)[None, :] + rng.normal(0, 0.1, (T, N)) + 0.01 * t[:, None] * rng.normal(size=N)).astype(
        np.float32
    )
    Y[:, 2] = Y[0, 2]  # a token whose log-prob never moves
    Y[:, 3] = np.where(np.arange(T) < 2, -1.0, -1.00001).astype(np.float32)  # moves by 1e-5, two values
    Y[:, 7] = np.array([-2, -2, -1.5, -1.5, -1], dtype=np.float32)  # three distinct values
    want = _np_figures(t, Y, lengths, min_change, min_distinct)
    figs = compute_figures(STEPS, torch.from_numpy(Y), lengths, ElementFilter(min_change, min_distinct))
    np.testing.assert_allclose(figs.token_r2, want["r2"], rtol=1e-12, atol=1e-12, equal_nan=True)
    assert (figs.keep == want["keep"]).all()
    assert (figs.removed_min_change, figs.removed_min_distinct) == (want["removed_change"], want["removed_distinct"])
    assert figs.overall["kept"] == int(want["keep"].sum())
    assert figs.overall[FRAC_KEY] == pytest.approx(want["frac"], abs=1e-15)
    assert figs.overall["mean_r2"] == pytest.approx(want["mean"], rel=1e-12)
    assert figs.overall["median_r2"] == pytest.approx(want["median"], rel=1e-12)
    # per sequence: the summed log-prob (float64) and its R²
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    sums = np.stack([Y[:, a:b].astype(np.float64).sum(axis=1) for a, b in zip(offsets[:-1], offsets[1:])], axis=1)
    np.testing.assert_allclose(figs.sums, sums, rtol=1e-12)
    np.testing.assert_allclose(figs.sum_r2, _np_r2(t, sums), rtol=1e-10)
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        k = want["keep"][a:b]
        assert figs.sequences[i]["kept"] == int(k.sum())
        if k.any():
            assert figs.sequences[i]["mean_r2"] == pytest.approx(float(want["r2"][a:b][k].mean()), rel=1e-12)
    # buckets: token j of n in third floor(3j/n)
    which = np.concatenate([[(3 * j) // n for j in range(n)] for n in lengths])
    for bi, b in enumerate(figs.buckets):
        assert b["bucket"] == BUCKETS[bi] and b["tokens"] == int((which == bi).sum())
        sel = want["r2"][(which == bi) & want["keep"]]
        assert b["kept"] == sel.size
        if sel.size:
            assert b[FRAC_KEY] == pytest.approx(float((sel > 0.7).mean()))
            assert b["median_r2"] == pytest.approx(float(np.median(sel)), rel=1e-12)
    # per step means
    for i, row in enumerate(figs.per_step):
        assert row["step"] == STEPS[i]
        assert row["mean_logprob_per_token"] == pytest.approx(float(Y[i].astype(np.float64).mean()), rel=1e-12)
        assert row["mean_logprob_per_sequence"] == pytest.approx(float(sums[i].mean()), rel=1e-12)


def test_buckets_are_thirds():
    assert bucket_of([1]).tolist() == [0]
    assert bucket_of([3, 6]).tolist() == [0, 1, 2, 0, 0, 1, 1, 2, 2]
    assert bucket_of([4]).tolist() == [0, 0, 1, 2]


def test_sequence_sample_is_seeded_and_sorted():
    a = select_sequences(100, 10, seed=3)
    assert a == sorted(a) and len(set(a)) == 10 and a == select_sequences(100, 10, seed=3)
    assert a != select_sequences(100, 10, seed=4)
    assert select_sequences(5, 10, seed=0) == [0, 1, 2, 3, 4] == select_sequences(5, None, seed=0)
