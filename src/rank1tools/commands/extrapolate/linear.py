"""`rank1 extrapolate linear`: weight-space straight lines (docs/extrapolation.md).

`--mode lstsq` (default): per element, the least-squares line through the updates ΔW_t of the
last W history checkpoints (all by default), θ̂(s) = θ₀ + Δ̄ + slope·(s − t̄) (each element's R² is
`rank1 linearity`'s job: computing it here would triple the fit's cost). `--mode two-point`: the
reference code's θ̂(s) = θ_a + (s − a)/(b − a)·(θ_b − θ_a) for two history steps a ≠ b (default the
first and the last; `--from 0` is the base, the re-grounding recipe's θ₀ + α(θ_M − θ₀)). Both are computed on float32 updates in float64 and streamed in element
chunks (math/linear_step.line_updates, the step re-grounding runs on the live model): one pass,
O(W × chunk) memory. Norm weights are copied from the last history checkpoint
(the reference's behaviour) unless --extrapolate-norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...engine.executor_options import ExecutorOptions
from ...errors import UsageError
from ...options import check_choice
from ...values import steps_text
from .base import ExtrapolateResult, HistoryOptions

if TYPE_CHECKING:
    from ...io.run_inputs import RunInputs
    from .history import History, HistoryPass
    from .history_write import TargetSink

MODES = ("lstsq", "two-point")


@dataclass
class LinearOptions(HistoryOptions):
    """`rank1 extrapolate linear`: the history options, the mode, its two points and the norms."""

    method: ClassVar[str] = "linear"
    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "mode": ("--mode",),
        "from_step": ("--from",),
        "to_step": ("--to",),
        "extrapolate_norms": ("--extrapolate-norms",),
    }

    mode: str = "lstsq"
    from_step: int | None = None
    to_step: int | None = None
    extrapolate_norms: bool = False

    def check(self) -> None:
        check_choice(self.mode, "--mode", MODES)
        super().check()


def extrapolate_linear(
    base: str,
    out: str,
    *,
    options: LinearOptions,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    executor: ExecutorOptions = ExecutorOptions(),
) -> ExtrapolateResult:
    """Write θ̂(s) for every --target-step s from straight lines through the history's weights."""
    from .history_write import write_pass

    return write_pass(linear_pass(base, options, executor), out, options, force, progress, executor)


def linear_pass(
    base: str, options: LinearOptions, executor: ExecutorOptions = ExecutorOptions(), inputs: RunInputs | None = None
) -> HistoryPass:
    """The checked history, plan and per-tensor lines giving θ̂(s) for every --target-step s."""
    from .history import HistoryPass, check_history_tensors, open_history, plan_tensors, window_size

    options.check()  # a caller may have changed a field since construction
    two = options.mode == "two-point"
    if not two and (options.from_step is not None or options.to_step is not None):
        raise UsageError("--from/--to apply to --mode two-point")
    if two and options.fit_window is not None:
        raise UsageError("--fit-window applies to --mode lstsq (two-point uses --from and --to)")
    h = open_history(base, options, executor, inputs)  # `inputs`: history.open_history
    T = len(h.steps)
    plan = plan_tensors(h, options, copy_norms=not options.extrapolate_norms)
    if two:
        a = h.steps[0] if options.from_step is None else options.from_step
        b = h.steps[-1] if options.to_step is None else options.to_step
        for flag, s in (("--from", a), ("--to", b)):
            if s not in h.steps and not (flag == "--from" and s == 0):  # --from 0: the base
                raise UsageError(f"{flag} {s} is not a history step ({steps_text(h.steps)}, or --from 0 for the base)")
        if a == b:
            raise UsageError(f"--from and --to are both step {a}: a line needs two different steps")
        read = sorted({h.steps.index(x) for x in (a, b) if x in h.steps} | {T - 1})
        params = {"mode": "two-point", "from": a, "to": b, "extrapolate_norms": options.extrapolate_norms}

        def one(name: str, sink: TargetSink) -> dict:
            return _two_point_tensor(h, name, sink, read, a, b)
    else:
        W = window_size(options, T)
        read = list(range(T - W, T))
        params = {
            "mode": "lstsq",
            "fit_window": W,
            "fit_steps": h.steps[-W:],
            "extrapolate_norms": options.extrapolate_norms,
        }

        def one(name: str, sink: TargetSink) -> dict:
            return _lstsq_tensor(h, name, sink, read)

    check_history_tensors(h, plan, read)
    notes = []
    copied = plan.norms
    if copied:
        notes.append(
            f"{len(copied)} norm weights copied from the last history checkpoint (step {h.steps[-1]}); "
            "--extrapolate-norms extrapolates them too"
        )
    return HistoryPass(h, plan, one, read, {**params, "copied_norms": copied}, notes)


def _ratio(sq_pred: float, sq_last: float) -> float:
    return math.sqrt(sq_pred / sq_last) if sq_last > 0 else math.nan


def _lstsq_tensor(h: History, name: str, sink: TargetSink, read: list[int]) -> dict:
    import torch

    from ...math.linear_step import line_updates
    from .history import history_chunks, nonfinite_history

    cks = [h.checkpoints[i] for i in read]
    t = [float(h.steps[i]) for i in read]
    sq_last, sq_pred = 0.0, [0.0] * len(h.targets)
    total = 0
    for ch in history_chunks(h, cks, name):
        M = ch.values.sub_(ch.base)  # W × n float32 updates, in place
        # no per-element R² here: it triples the cost of the fit; `rank1 linearity` reports it
        for j, d in enumerate(line_updates(M, t, h.targets, mode="lstsq")):
            sq_pred[j] += float(d @ d)
            sink.write(j, name, ch.start, ch.base, d)
        sq_last += float(torch.linalg.vector_norm(M[-1], dtype=torch.float64)) ** 2
        total += M.shape[1]
    if not all(math.isfinite(v) for v in (sq_last, *sq_pred)):
        raise nonfinite_history(h, name, cks)
    common = {"numel": total, "last_update_norm": math.sqrt(sq_last)}
    return {"common": common, "per_target": [{"norm_ratio": _ratio(q, sq_last)} for q in sq_pred]}


def _two_point_tensor(h: History, name: str, sink: TargetSink, read: list[int], a: int, b: int) -> dict:
    import torch

    from ...math.linear_step import line_updates
    from .history import history_chunks, nonfinite_history

    cks = [h.checkpoints[i] for i in read]
    t = [float(h.steps[i]) for i in read]  # a step that is not read (--from 0) is the base: update 0
    sq_last, sq_pred = 0.0, [0.0] * len(h.targets)
    for ch in history_chunks(h, cks, name):
        M = ch.values.sub_(ch.base)
        for j, d in enumerate(line_updates(M, t, h.targets, mode="two-point", from_step=a, to_step=b)):
            sq_pred[j] += float(d @ d)
            sink.write(j, name, ch.start, ch.base, d)
        sq_last += float(torch.linalg.vector_norm(M[-1], dtype=torch.float64)) ** 2  # read ends at the last step
    if not all(math.isfinite(v) for v in (sq_last, *sq_pred)):
        raise nonfinite_history(h, name, cks)
    return {
        "common": {"numel": h.base.entry(name).numel, "last_update_norm": math.sqrt(sq_last)},
        "per_target": [{"norm_ratio": _ratio(q, sq_last)} for q in sq_pred],
    }


run = extrapolate_linear
