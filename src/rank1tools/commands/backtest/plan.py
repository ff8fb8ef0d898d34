"""`rank1 backtest`'s options and plan (docs/commands/backtest.md): which cuts, and for each the
history pass `extrapolate` would run on the checkpoints up to the cut, targeting every later
checkpoint of the run.

The fit is not copied here: each cut's pass is the method's own (relex.relex_pass,
linear.linear_pass), built from the method options `extrapolate` takes, with --history-until at
the cut and --target-step at the run's later steps. Torch-free until `plan_cuts` runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import UsageError
from ...values import steps_text
from ..extrapolate.registry import METHODS, make_options

# A jump holds while its relative update error ‖Δ̂ − Δ‖/‖Δ‖ stays below this: then the predicted
# update's cosine with the real one is at least √(1 − 0.5²) ≈ 0.87 and its norm within 0.5..1.5×
# the real one's (docs/commands/backtest.md#the-default---max-error).
DEFAULT_MAX_ERROR = 0.5
METHOD_CHOICES = ("relex", "linear")  # the methods that fit a history of checkpoints
OWN_FIELDS = ("target_steps", "history_until")  # set per cut by backtest


@dataclass
class BacktestOptions:
    """The method, its options as `extrapolate` takes them (`fit`: field -> value, e.g.
    {"rank": 2} or {"mode": "two-point"}; --include/--exclude/--rest/--device too), the cuts
    (steps), the error bar of the recommended jump, the gate, and with `data` the rollouts and
    `model` options (engine.model_loading.ModelOptions) of the output-space figures."""

    method: str = "linear"
    cuts: list[int] = field(default_factory=list)
    fit: dict = field(default_factory=dict)
    max_error: float = DEFAULT_MAX_ERROR
    fail_above: float | None = None
    plots: bool = True
    data: str | None = None  # rollouts (the logprobs format): output-space figures
    model: object | None = None  # engine.model_loading.ModelOptions for --data (default: its defaults)

    def check(self) -> None:
        """Checks that need no input (the CLI runs them before importing torch)."""
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r}: expected one of {', '.join(METHOD_CHOICES)}")
        if self.method not in METHOD_CHOICES:
            raise UsageError(
                f"--method {self.method}: backtest takes {' or '.join(METHOD_CHOICES)} (methods that fit a "
                "history of checkpoints)"
            )
        if not self.cuts:
            raise UsageError("backtest needs --cuts STEPS (e.g. 8,16,24)")
        seen = set()
        for c in self.cuts:
            if c < 1:
                raise UsageError(f"--cuts {c}: a cut is a checkpoint step, at least 1")
            if c in seen:
                raise UsageError(f"--cuts: step {c} given twice")
            seen.add(c)
        if not (math.isfinite(self.max_error) and self.max_error > 0):
            raise UsageError(f"--max-error {self.max_error}: must be a finite number greater than 0")
        if self.fail_above is not None and not (math.isfinite(self.fail_above) and self.fail_above >= 0):
            raise UsageError(f"--fail-above {self.fail_above}: must be a finite number, at least 0")
        if self.model is not None:
            self.model.check()
        for name in OWN_FIELDS:
            if name in self.fit:
                raise UsageError(f"{name} is set by --cuts in backtest: leave it out of the method options")
        make_options(self.method, **self.fit, target_steps=[max(self.cuts) + 1])  # the method's own checks

    def __post_init__(self) -> None:
        self.cuts = sorted(self.cuts)
        self.check()


@dataclass
class CutPlan:
    """One cut: its history pass (extrapolate's, targeting every later checkpoint), the later
    checkpoints and where the fit's window starts (the first step the fit reads; the base is 0)."""

    cut: int
    history_pass: object  # commands.extrapolate.history.HistoryPass
    targets: list[int]
    target_checkpoints: list
    window_start: int

    @property
    def window_length(self) -> int:
        """Steps the fit's window spans: the cut − its first step."""
        return self.cut - self.window_start


def plan_cuts(base: str, inputs, options: BacktestOptions, source_fields: dict, executor) -> list[CutPlan]:
    """Check every cut against the run (`inputs`: io.run_inputs.RunInputs, all its checkpoints)
    and build its pass; a bad cut is a usage error naming it, before any tensor is read."""
    from ..extrapolate import linear, relex

    passes = {"relex": relex.relex_pass, "linear": linear.linear_pass}
    pairs = [(s, c) for s, c in inputs.checkpoints if s != 0]
    steps = [s for s, _ in pairs]
    if not steps:
        raise UsageError("backtest: the run holds no checkpoint besides step 0")
    plans = []
    for cut in options.cuts:
        if cut > steps[-1]:
            raise UsageError(f"--cuts {cut} is past the last checkpoint (step {steps[-1]})")
        if cut not in steps:
            raise UsageError(f"--cuts {cut} is not a checkpoint step of the run ({steps_text(steps)})")
        if cut == steps[-1]:
            raise UsageError(f"--cuts {cut} is the last checkpoint: no later checkpoint to predict")
        before = [s for s in steps if s <= cut]
        if len(before) < 2:
            raise UsageError(
                f"--cuts {cut}: {len(before)} checkpoint up to the cut besides the base (step {before[0]}); "
                f"--method {options.method} fits at least 2"
            )
        later = [(s, c) for s, c in pairs if s > cut]
        fields = {**options.fit, **source_fields, "history_until": cut, "target_steps": [s for s, _ in later]}
        try:
            p = passes[options.method](base, make_options(options.method, **fields), executor, inputs)
        except UsageError as e:
            raise UsageError(f"--cuts {cut}: {e}") from None
        start = p.params["fit_steps"][0] if "fit_steps" in p.params else p.params["from"]
        plans.append(CutPlan(cut, p, [s for s, _ in later], [c for _, c in later], start))
    return plans
