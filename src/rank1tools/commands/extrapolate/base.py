"""What every extrapolation method shares: the common options, the result, target folders and the
norm-ratio flag (docs/commands/extrapolate.md).

A method is a module of this package holding its options dataclass (a subclass of
`CommonOptions` declaring the CLI flags of its own fields in `FLAGS`) and an entry point
`run(base, out, *, options, force, progress, executor) -> ExtrapolateResult`; `registry.py` names
it. Several targets are written in one pass over the inputs: one target writes OUT itself,
several write OUT/step-S (or OUT/metric-Y) each, as `reconstruct` does for several ranks.

Torch-free: the CLI builds and checks the options before any heavy import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from ...errors import UsageError
from ...jsonutil import json_safe
from ...options import DTYPE_CHOICES, check_choice, number_label
from ...values import StepSelection, shard_size

REPORT_FILE = "rank1tools-extrapolation.json"
REST_CHOICES = ("last", "base")  # relex, linear: where tensors not selected come from
# A tensor's predicted update is flagged when its norm exceeds this many times what a straight
# line from the base predicts: ‖ΔW_last‖ · s / t_last for a step target, ‖ΔW_last‖ for a metric
# target (docs/extrapolation.md). A flag is a warning, never a refusal.
NORM_RATIO_FLAG = 4.0


@dataclass
class CommonOptions:
    """The options every method takes. A subclass adds its own fields and names their CLI flags
    in `FLAGS` (field -> flag); `check()` runs at construction, so a library caller gets the
    checks the CLI runs. --max-shard-size is held in bytes (text parsed here, values.shard_size)."""

    method: ClassVar[str] = ""
    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {}  # the method's own fields -> their CLI flags

    target_steps: list[int] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    dtype: str = "auto"
    device: str = "auto"
    max_shard_size: int | str = "5GB"
    flag_ratio: float = NORM_RATIO_FLAG

    def __post_init__(self) -> None:
        self.max_shard_size = shard_size(self.max_shard_size)
        self.check()

    def check(self) -> None:
        """Checks that need no input (the CLI runs them before importing torch)."""
        check_choice(self.dtype, "--dtype", DTYPE_CHOICES)
        if not math.isfinite(self.flag_ratio) or self.flag_ratio <= 0:
            raise UsageError(f"--flag-ratio {self.flag_ratio}: must be greater than 0")


@dataclass
class HistoryOptions(CommonOptions):
    """What the methods reading a history of checkpoints (relex, linear) add: CHECKPOINT arguments
    or --run [--steps] (a Hub run: `hub_run`, docs/cli.md), cut at --history-until; tensors not
    selected come from --rest (the last history checkpoint or the base). --steps is held as a
    StepSelection (a library caller's text parsed here)."""

    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "checkpoints": ("CHECKPOINT",),
        "run": ("--run",),
        "steps": ("--steps",),
        "hub_run": ("--revisions", "--subfolders", "--commits"),
        "history_until": ("--history-until",),
        "rest": ("--rest",),
        "fit_window": ("--fit-window",),
    }

    checkpoints: list[str] = field(default_factory=list)
    run: str | None = None
    steps: StepSelection | str | None = None
    hub_run: dict | None = None
    history_until: int | None = None
    rest: str = "last"
    fit_window: int | None = None

    def __post_init__(self) -> None:
        self.steps = StepSelection.of(self.steps)
        super().__post_init__()

    def check(self) -> None:
        super().check()
        check_choice(self.rest, "--rest", REST_CHOICES)
        if not self.target_steps:
            raise UsageError(f"--method {self.method} needs --target-step S")
        if self.fit_window is not None and self.fit_window < 2:
            raise UsageError(f"--fit-window {self.fit_window}: at least 2 (a line needs two points)")


def own_flags(options: type[CommonOptions]) -> dict[str, tuple[str, ...]]:
    """The flags of a method's own fields (beyond CommonOptions), inherited ones included."""
    flags: dict[str, tuple[str, ...]] = {}
    for klass in reversed(options.__mro__):
        flags.update(vars(klass).get("FLAGS", {}))
    return flags


class MethodRun(Protocol):
    """A method's entry point (its module's `run`): write every target's checkpoint."""

    def __call__(
        self,
        base: str,
        out: str,
        *,
        options: CommonOptions,
        force: bool = False,
        progress: Callable[[int, int], None] | None = None,
        executor=None,
    ) -> ExtrapolateResult: ...


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
        return json_safe(
            {
                "out": self.out,
                "method": self.method,
                "history_steps": self.history_steps,
                "parameters": self.parameters,
                "notes": self.notes,
                "warnings": self.warnings,
                "outputs": [
                    {
                        "target": o.target,
                        "kind": o.kind,
                        "path": o.path,
                        "lost_fraction": o.lost_fraction,
                        "rel_error": o.rel_error,
                        "updated_elements": o.updated_elements,
                        "warning": o.warning,
                        "norm_ratio_median": o.norm_ratio_median,
                        "norm_ratio_max": o.norm_ratio_max,
                        "flagged": o.flagged,
                    }
                    for o in self.outputs
                ],
            }
        )


def target_folder(kind: str, value: float) -> str:
    """Folder of one target among several: step-500, metric-0.7."""
    return f"{kind}-{number_label(value)}"


def flag_limit(kind: str, target: float, last_step: int | None, flag_ratio: float) -> float:
    """The norm ratio above which a tensor is flagged (see NORM_RATIO_FLAG)."""
    if kind == "step" and last_step:
        return flag_ratio * max(1.0, target / last_step)
    return flag_ratio
