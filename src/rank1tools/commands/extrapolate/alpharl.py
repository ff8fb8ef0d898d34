"""`rank1 extrapolate alpharl`: the update AlphaRL predicts for a target metric, from a fit-pls
output and the base (docs/extrapolation.md). This module holds its options and flags (torch-free,
the CLI checks them before any heavy import); the write pass is alpharl_write.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from ...engine.executor_options import ExecutorOptions
from ...errors import UsageError
from ...options import check_choice
from .base import CommonOptions, ExtrapolateResult

CONTAINERS = ("base", "last")
R2_KINDS = ("r2", "loo_r2", "r2_step")
OUTPUT_FORMATS = ("checkpoint", "peft")


@dataclass
class AlpharlOptions(CommonOptions):
    """`rank1 extrapolate alpharl`: the fit store, the targets (a metric, or the step for a store
    fitted against the step), the container and the R² gate."""

    method: ClassVar[str] = "alpharl"
    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "fits": ("--fits",),
        "target_metrics": ("--target-metric",),
        "container": ("--container",),
        "last_checkpoint": ("--last-checkpoint",),
        "min_r2": ("--min-r2",),
        "r2_kind": ("--r2",),
        "output_format": ("--format",),
    }

    fits: str | None = None
    target_metrics: list[float] = field(default_factory=list)
    container: str = "base"
    last_checkpoint: str | None = None  # container last: default the fit store's record of it
    min_r2: float | None = None
    r2_kind: str = "r2"
    output_format: str = "checkpoint"  # checkpoint | peft (a rank-1 LoRA adapter per target: alpharl_adapter.py)

    def check(self) -> None:
        super().check()
        check_choice(self.container, "--container", CONTAINERS)
        check_choice(self.r2_kind, "--r2", R2_KINDS)
        check_choice(self.output_format, "--format", OUTPUT_FORMATS)
        if self.output_format == "peft" and self.container != "base":
            raise UsageError(
                "--format peft writes the update as an adapter on the base: it takes --container base only"
            )
        if self.min_r2 is not None and not math.isfinite(self.min_r2):
            raise UsageError(f"--min-r2 {self.min_r2}: must be a finite number")
        if not self.fits:
            raise UsageError("--method alpharl needs --fits FIT_PLS_OUT (a fit-pls output)")
        if not self.target_metrics and not self.target_steps:
            raise UsageError("--method alpharl needs --target-metric Y (or --target-step S for a fit against the step)")


def extrapolate_alpharl(
    base: str,
    out: str,
    *,
    options: AlpharlOptions,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    executor: ExecutorOptions = ExecutorOptions(),
) -> ExtrapolateResult:
    """Write the checkpoint AlphaRL predicts for each target (one pass over the container). It
    reads no run: fast locally, so `executor` must be local."""
    if executor.is_ray:
        raise UsageError(
            "--executor ray applies to --method relex and linear (alpharl reads no run: it is fast locally)"
        )
    options.check()
    from .alpharl_write import write_alpharl

    return write_alpharl(base, out, options=options, force=force, progress=progress)


run = extrapolate_alpharl
