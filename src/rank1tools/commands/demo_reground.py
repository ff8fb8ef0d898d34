"""The re-grounded arm of `rank1 demo --reground M:N` (docs/commands/demo.md#re-grounded-grpo): GRPO
from the same warm-up base and seed as the plain run, jumping N steps ahead every M steps
(rank1tools.demo.reground), and how many optimizer steps each arm needs to reach 90 % and 100 % of
plain GRPO's final accuracy.

An optimizer step is one GRPO step (one sampled batch and its Adam passes), the unit of the run's
checkpoints; the virtual step adds the steps jumped so far.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UsageError

REGROUND_DIR = "reground"
THRESHOLDS = (0.9, 1.0)  # shares of plain GRPO's final accuracy


AUTO = "auto"  # M: the re-grounding segment ending at the cut; N: what its backtest recommends
OFF = "none"


def parse_reground(value: str) -> tuple[int, int] | str | None:
    """Parse --reground: "auto" (the default: the schedule the demo's backtest recommends), "none"
    (no re-grounded arm) or "M:N" (M >= 1 optimizer steps per segment, N >= 0 steps jumped);
    one-line errors, exit 2."""
    if value == AUTO:
        return AUTO
    if value == OFF:
        return None
    parts = value.split(":")
    try:
        m, n = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        m = n = None
    if m is None or n is None:
        raise UsageError(f"--reground: expected auto, none or M:N (two integers, e.g. 8:8), got {value!r}")
    if m < 1:
        raise UsageError(f"--reground: M (optimizer steps per segment) must be at least 1, got {value!r}")
    if n < 0:
        raise UsageError(f"--reground: N (steps jumped) must be at least 0, got {value!r}")
    return m, n


def steps_to_reach(curve: list[dict], level: float, key: str = "step") -> int | None:
    """The first point of `curve` (ascending steps) whose accuracy reaches `level`: its `key`; None when never."""
    for point in curve:
        if point["accuracy"] >= level:
            return point[key]
    return None


def reground_table(plain: dict[int, float], arm: list[dict]) -> list[dict]:
    """One row per arm: optimizer (and virtual) steps to reach each share of plain's final accuracy,
    and the accuracy after as many optimizer steps as plain's final."""
    final = max(plain)
    plain_curve = [{"step": s, "virtual_step": s, "accuracy": a} for s, a in sorted(plain.items())]
    at_final = {p["step"]: p["accuracy"] for p in arm}.get(final)
    rows = []
    for name, curve, acc in (("plain GRPO", plain_curve, plain[final]), ("re-grounded GRPO", arm, at_final)):
        row: dict = {"arm": name, "accuracy_at_final_step": acc}
        for share in THRESHOLDS:
            level = share * plain[final]
            row[f"steps_to_{round(share * 100)}"] = steps_to_reach(curve, level)
            row[f"virtual_steps_to_{round(share * 100)}"] = steps_to_reach(curve, level, "virtual_step")
        rows.append(row)
    return rows


def speedups(rows: list[dict]) -> dict:
    """Plain's optimizer steps over the re-grounded arm's, per threshold (None when either never reaches it or 0)."""
    plain, arm = rows
    out = {}
    for share in THRESHOLDS:
        key = f"steps_to_{round(share * 100)}"
        a, b = plain[key], arm[key]
        out[f"speedup_{round(share * 100)}"] = a / b if a and b else None
    return out


def run_reground_arm(
    root: Path,
    config,
    train_steps: int,
    jump_steps: int,
    plain: dict[int, float],
    say: Callable[[str], None],
    schedule: str = "given",
) -> dict:
    """Train the arm into root/reground/run from root/base; the `reground` object of results.json.
    `schedule`: "given" (--reground M:N) or "backtest" (auto: M:N from the demo's backtest)."""
    from ..demo.reground import train_reground_arm

    say(f"re-grounded GRPO: {train_steps} steps, then jump {jump_steps} ahead, from the same base and seed ...")
    arm = train_reground_arm(root / "base", root / REGROUND_DIR, config, train_steps, jump_steps, say)
    rows = reground_table(plain, arm.curve)
    return {
        "schedule": schedule,
        "train_steps": train_steps,
        "jump_steps": jump_steps,
        "run": str(arm.run),
        "plain_final_accuracy": plain[max(plain)],
        "curve": arm.curve,
        "jumps": arm.jumps,
        "table": rows,
        **speedups(rows),
        "plots": [],
    }


def reground_plot(plain: dict[int, float], arm: dict, root: Path) -> list[str]:
    """Both arms' accuracy curves (plots_reground), into root/reground; [] without the plot extra."""
    from ..plot_common import plots_available
    from ..plots_reground import reground_accuracy_plot

    if not plots_available():
        return []
    label = f"{arm['train_steps']}:{arm['jump_steps']}"
    return [str(p) for p in reground_accuracy_plot(plain, arm["curve"], label, root / REGROUND_DIR)]
