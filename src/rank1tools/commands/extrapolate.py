"""`rank1 extrapolate`: synthesize later checkpoints (SPEC §4 AlphaRL, §5 RELEX, §6 linear).

This module holds what the three methods share: the options, the result, target folders and the
norm-ratio flag. Each method is its own module (extrapolate_alpharl, extrapolate_relex,
extrapolate_linear) with one entry point taking (base, out, options, force, progress) and
returning an `ExtrapolateResult`; `extrapolate` dispatches.

Several targets are written in one pass over the inputs: one target writes OUT itself, several
write OUT/step-S (or OUT/metric-Y) each, as `reconstruct` does for several ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.executors import ExecutorOptions
from ..errors import UsageError
from ..jsonutil import json_safe
from ..options import check_choice, number_label

METHODS = ("alpharl", "relex", "linear")
MODES = ("lstsq", "two-point")
CONTAINERS = ("base", "last")
REST_CHOICES = ("last", "base")
R2_KINDS = ("r2", "loo_r2", "r2_step")
REPORT_FILE = "rank1tools-extrapolation.json"
# A tensor's predicted update is flagged when its norm exceeds this many times what a straight
# line from the base predicts: ‖ΔW_last‖ · s / t_last for a step target, ‖ΔW_last‖ for a metric
# target (docs/extrapolation.md). A flag is a warning, never a refusal.
NORM_RATIO_FLAG = 4.0


@dataclass
class ExtrapolateOptions:
    method: str = "relex"
    # history (relex, linear): CHECKPOINT arguments or --run [--steps], cut at --history-until
    checkpoints: list[str] = field(default_factory=list)
    run: str | None = None
    steps: str | None = None
    hub_run: dict | None = None
    history_until: int | None = None
    target_steps: list[int] = field(default_factory=list)
    # relex
    rank: int = 1
    fit_window: int | None = None
    position_index: bool = False
    # linear
    mode: str = "lstsq"
    from_step: int | None = None
    to_step: int | None = None
    extrapolate_norms: bool = False
    # alpharl
    fits: str | None = None
    target_metrics: list[float] = field(default_factory=list)
    container: str = "base"
    last_checkpoint: str | None = None  # container last: default the fit store's record of it
    min_r2: float | None = None
    r2_kind: str = "r2"
    # every method
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    rest: str = "last"  # relex/linear: tensors not selected come from the last history checkpoint or the base
    dtype: str = "auto"
    device: str = "auto"
    max_shard_size: str | int = "5GB"
    flag_ratio: float = NORM_RATIO_FLAG


@dataclass
class TargetOutput:
    """One written checkpoint: its target, folder, rounding figures and flagged tensors."""

    target: float
    kind: str  # step | metric
    path: str
    lost_fraction: float
    rel_error: float
    updated_elements: int
    warning: str | None
    flagged: list[dict] = field(default_factory=list)  # {"tensor", "norm_ratio", "limit"}
    norm_ratio_median: float | None = None
    norm_ratio_max: float | None = None


@dataclass
class ExtrapolateResult:
    out: str
    method: str
    history_steps: list[int]
    outputs: list[TargetOutput]
    tensors: list[dict]  # per extrapolated tensor: method figures, norm_ratio per target
    parameters: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe({
            "out": self.out, "method": self.method, "history_steps": self.history_steps,
            "parameters": self.parameters, "notes": self.notes, "warnings": self.warnings,
            "outputs": [{"target": o.target, "kind": o.kind, "path": o.path, "lost_fraction": o.lost_fraction,
                         "rel_error": o.rel_error, "updated_elements": o.updated_elements, "warning": o.warning,
                         "norm_ratio_median": o.norm_ratio_median, "norm_ratio_max": o.norm_ratio_max,
                         "flagged": o.flagged} for o in self.outputs],
        })


def target_folder(kind: str, value: float) -> str:
    """Folder of one target among several: step-500, metric-0.7."""
    return f"{kind}-{number_label(value)}"


def flag_limit(kind: str, target: float, last_step: int | None, flag_ratio: float) -> float:
    """The norm ratio above which a tensor is flagged (see NORM_RATIO_FLAG)."""
    if kind == "step" and last_step:
        return flag_ratio * max(1.0, target / last_step)
    return flag_ratio


def check_options(options: ExtrapolateOptions) -> None:
    """Option checks that need no input (the CLI runs them before importing torch)."""
    check_choice(options.method, "--method", METHODS)
    check_choice(options.mode, "--mode", MODES)
    check_choice(options.container, "--container", CONTAINERS)
    check_choice(options.rest, "--rest", REST_CHOICES)
    check_choice(options.r2_kind, "--r2", R2_KINDS)
    check_choice(options.dtype, "--dtype", ("auto", "float32", "bfloat16", "float16"))
    if options.method == "alpharl":
        if not options.fits:
            raise UsageError("--method alpharl needs --fits FIT_PLS_OUT (a fit-pls output)")
        if not options.target_metrics and not options.target_steps:
            raise UsageError("--method alpharl needs --target-metric Y (or --target-step S for a fit against the step)")
    else:
        if not options.target_steps:
            raise UsageError(f"--method {options.method} needs --target-step S")
        if options.rank < 1:
            raise UsageError(f"--rank {options.rank}: must be at least 1")
        if options.fit_window is not None and options.fit_window < 2:
            raise UsageError(f"--fit-window {options.fit_window}: at least 2 (a line needs two points)")


def extrapolate(base: str, out: str, *, options: ExtrapolateOptions, force: bool = False,
                progress: Callable[[int, int], None] | None = None,
                executor: ExecutorOptions = ExecutorOptions()) -> ExtrapolateResult:
    """Write the checkpoint(s) predicted by `options.method` for every target. `executor`: where
    relex / linear compute and write the tensors (rank1tools.executors)."""
    check_options(options)
    if options.method == "alpharl":
        if executor.is_ray:
            raise UsageError("--executor ray applies to --method relex and linear (alpharl reads no run: it is fast locally)")
        from .extrapolate_alpharl import extrapolate_alpharl

        return extrapolate_alpharl(base, out, options=options, force=force, progress=progress)
    if options.method == "relex":
        from .extrapolate_relex import extrapolate_relex as run
    else:
        from .extrapolate_linear import extrapolate_linear as run
    return run(base, out, options=options, force=force, progress=progress, executor=executor)
