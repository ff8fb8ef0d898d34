"""The backtest stages of `rank1 demo` (docs/commands/demo.md#the-backtest-beside-the-accuracy-table),
run on the trained run through the commands a user runs:

- `rank1 backtest` of the table's two history methods (relex rank 1 and linear lstsq, fitted on the
  window up to the cut, as their rows are), predicting every later checkpoint; with the base
  rollouts (the `model` extra) its output-space figures too;
- `rank1 extrapolate` of the same fits to every later step, each scored on the held-out set, so
  every backtest figure can be set against the accuracy its prediction actually reached: the
  Spearman rank correlation of each figure with the accuracy shortfall (real checkpoint's accuracy
  minus the prediction's) over all of them says which figures tracked the accuracy;
- `rank1 backtest --method linear --mode two-point` over the re-grounding segment that ends at the
  cut (the last REGROUND_INTERVALS checkpoint intervals): its recommended jump is the N of the
  re-grounded arm, M being that segment's length (commands/demo_reground.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from .backtest import DEFAULT_MAX_ERROR, BacktestOptions, backtest
from .extrapolate.registry import ExtrapolateOptions, extrapolate

# the methods of the demo's table whose fits backtest replays: row name -> method, fit options
BACKTESTED = {"relex": ("relex", {}), "linear": ("linear", {"mode": "lstsq"})}
# figure -> how it reads as a distance from the real update (larger: further off)
TRACKED_FIGURES = {
    "rel_error": lambda r: r["rel_error"],
    "cosine": lambda r: 1.0 - r["cosine"],
    "norm_ratio": lambda r: abs(math.log(r["norm_ratio"])) if r["norm_ratio"] > 0 else math.inf,
    "logprob_mad": lambda r: r.get("logprob_mad"),
    "kl": lambda r: r.get("kl"),
}
TRACKS = 0.7  # a figure "tracked" the accuracy when its rank correlation with the shortfall reaches this
REGROUND_INTERVALS = 2  # the auto re-grounding segment: this many checkpoint intervals


def reground_segment(steps: list[int], cut: int) -> int:
    """M of the auto re-grounding schedule: REGROUND_INTERVALS checkpoint intervals ending at the
    cut (the whole window when it holds fewer)."""
    window = [0, *(s for s in steps if s <= cut)]
    return cut - window[max(0, len(window) - 1 - REGROUND_INTERVALS)]


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (scipy's, ties averaged); None when either side is constant or
    a value is missing."""
    from scipy.stats import spearmanr  # scipy comes with scikit-learn

    if len(x) < 3 or any(v is None or not math.isfinite(v) for v in (*x, *y)):
        return None
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def tracking(points: list[dict]) -> dict:
    """figure -> Spearman ρ of the figure (as a distance) with the accuracy shortfall over `points`."""
    out = {}
    shortfall = [p["accuracy_real"] - p["accuracy_predicted"] for p in points]
    for figure, distance in TRACKED_FIGURES.items():
        values = [distance(p) for p in points]
        if all(v is None for v in values):
            continue
        out[figure] = spearman(values, shortfall)
    return out


def run_backtest_stages(
    root: Path, curve: dict[int, float], cut: int, config, device: str, stage, data: str | None
) -> dict:
    """The `backtest` object of results.json: per method, the backtest's overall rows with the
    predicted and real accuracies at every later step; which figures tracked the accuracy; the
    re-grounding segment's backtest and the N it recommends."""
    from ..demo import evaluate_checkpoint

    base, run = str(root / "base"), str(root / "run")
    steps = sorted(s for s in curve if s > 0)
    curve_steps = [s for s in steps if s > cut]
    methods, points = {}, []
    for name, (method, fit) in BACKTESTED.items():
        result = stage(
            f"backtest {name}",
            lambda method=method, fit=fit, name=name: backtest(
                base,
                [],
                str(root / f"backtest-{name}"),
                run=run,
                options=BacktestOptions(method=method, cuts=[cut], fit={**fit, "device": device}, data=data),
            ),
        )
        predicted = root / f"predicted-{name}"
        stage(
            f"extrapolate {name} to every later step",
            lambda method=method, fit=fit, predicted=predicted: extrapolate(
                base,
                str(predicted),
                options=ExtrapolateOptions(
                    method=method, run=run, history_until=cut, target_steps=curve_steps, device=device, **fit
                ),
            ),
        )
        accuracies = stage(
            f"evaluate {name} predictions",
            lambda predicted=predicted: {s: evaluate_checkpoint(predicted / f"step-{s}", config) for s in curve_steps},
        )
        rows = []
        for row in result.overall:
            s = row["target_step"]
            rows.append({**row, "accuracy_predicted": accuracies[s], "accuracy_real": curve[s]})
        cut_summary = result.summary["cuts"][0]
        methods[name] = {
            "out": result.out,
            "plots": result.plots,
            "recommended_jump": cut_summary["recommended_jump"],
            "rows": rows,
        }
        points += rows
    segment = reground_segment(steps, cut)
    two_point = stage(
        "backtest the re-grounding step",
        lambda: backtest(
            base,
            [],
            str(root / "backtest-reground"),
            run=run,
            options=BacktestOptions(
                method="linear",
                cuts=[cut],
                fit={"mode": "two-point", "from_step": cut - segment, "to_step": cut, "device": device},
                plots=False,
            ),
        ),
    )
    figures = tracking(points)
    return {
        "cut": cut,
        "max_error": DEFAULT_MAX_ERROR,
        "methods": methods,
        "tracking": figures,
        "tracked": sorted(f for f, rho in figures.items() if rho is not None and rho >= TRACKS),
        "not_tracked": sorted(f for f, rho in figures.items() if rho is None or rho < TRACKS),
        "reground": {
            "out": two_point.out,
            "segment": segment,
            "recommended_jump": two_point.summary["cuts"][0]["recommended_jump"],
            "rows": two_point.overall,
        },
    }
