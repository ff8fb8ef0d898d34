"""Benchmark: `loo_r2` (all folds from full-data downdates) against refitting sklearn's
PLSRegression(n_components=1, scale=True) on each leave-one-out fold, on a T=50 x d=14336 matrix.
Medians of REPS runs of each, in the same process; writes results/pls.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.cross_decomposition import PLSRegression

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from rank1tools.math.pls import loo_r2, r2_score

T, D, REPS = 50, 14336, 3


def naive_loo_r2(X: np.ndarray, y: np.ndarray) -> float:
    pred = np.empty(len(y))
    for t in range(len(y)):
        keep = np.arange(len(y)) != t
        pred[t] = PLSRegression(n_components=1, scale=True).fit(X[keep], y[keep]).predict(X[t:t + 1]).ravel()[0]
    return r2_score(y, pred)


def _median_time(fn, *args) -> tuple[float, float]:
    times, value = [], float("nan")
    for _ in range(REPS):
        start = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    rng = np.random.default_rng(0)
    y = np.sort(rng.normal(size=T))
    X = 0.02 * np.outer(y, rng.normal(size=D)) + rng.normal(size=(T, D))  # weak planted signal in noise
    warnings.simplefilter("ignore")
    ours_s, ours = _median_time(loo_r2, X, y)
    naive_s, naive = _median_time(naive_loo_r2, X, y)
    res = {"machine": "2 cores, no GPU", "T": T, "d": D, "reps": REPS, "ours_s": round(ours_s, 4),
           "naive_s": round(naive_s, 4), "speedup": round(naive_s / ours_s, 1), "max_abs_diff": abs(ours - naive),
           "loo_r2": ours}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "pls.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"loo_r2 {ours_s:.4f}s  naive sklearn loop {naive_s:.4f}s  speedup {naive_s / ours_s:.1f}x  "
          f"max |diff| {abs(ours - naive):.2e}")


if __name__ == "__main__":
    main()
