"""`--fail-below X`: the CI gate of the commands that measure linearity (fit-pls, linearity, logprobs);
`--fail-above X`: backtest's, on an error.

The command writes everything, then the CLI exits 5 when the gate did not pass (docs/cli.md#exit-codes).
"""

from __future__ import annotations

import math

GATE_EXIT_CODE = 5  # --fail-below: outputs written, but the figure is below the bar


def fail_below_gate(figure: str, value: float | None, threshold: float | None) -> dict | None:
    """The gate record of `figure` (its name in the one-line message) against `threshold`; None
    without --fail-below. A figure that could not be computed (None or NaN) does not pass."""
    if threshold is None:
        return None
    passed = value is not None and not math.isnan(value) and value >= threshold
    return {"figure": figure, "value": value, "threshold": threshold, "passed": bool(passed)}


def fail_above_gate(figure: str, value: float | None, threshold: float | None) -> dict | None:
    """As fail_below_gate, for a figure that must not exceed `threshold` (backtest's error)."""
    if threshold is None:
        return None
    passed = value is not None and not math.isnan(value) and value <= threshold
    return {
        "figure": figure,
        "value": value,
        "threshold": threshold,
        "passed": bool(passed),
        "option": "--fail-above",
        "relation": "is above",
    }
