"""`rank1 backtest`: how far this run's early window predicts its own later checkpoints
(docs/commands/backtest.md). For every cut, the method `extrapolate` runs (relex or linear,
with the same options) is fitted on the checkpoints up to the cut and predicts every later
checkpoint the run holds; the predicted update is compared with the real one, per tensor and
overall, against the jump length. plan.py: options and the per-cut passes; figures.py: the
comparison and the recommended jump; output_space.py: with --data, the predicted model against the
real checkpoint on fixed rollouts; tables.py: the files, and `read_recommended_jump`, the N a
backtest output recommends (for the re-grounding callback).

Streaming: one tensor at a time; each cut's fit reads that tensor's chunks of the cut's history
as `extrapolate` does (so a history checkpoint is read once per cut that holds it), and each
predicted chunk is compared with the same elements of the later checkpoint, read then.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...engine.executor_options import ExecutorOptions
from ...jsonutil import json_safe
from ...values import StepSelection
from .plan import DEFAULT_MAX_ERROR, BacktestOptions

__all__ = ["DEFAULT_MAX_ERROR", "BacktestOptions", "BacktestResult", "backtest"]


@dataclass
class BacktestResult:
    out: str
    method: str
    steps: list[int]
    overall: list[dict]  # one row per cut × later checkpoint
    summary: dict
    notes: list[str] = field(default_factory=list)
    gate: dict | None = None
    plots: list[str] = field(default_factory=list)
    plot_hint: str | None = None

    def to_dict(self) -> dict:
        return json_safe(
            {
                "out": self.out,
                "method": self.method,
                "steps": self.steps,
                "summary": self.summary,
                "overall": self.overall,
                "notes": self.notes,
                "gate": self.gate,
                "plots": self.plots,
            }
        )


def fail_above_gate(summary_cuts: list[dict], threshold: float | None) -> dict | None:
    """--fail-above X: fails when some cut's overall error at its longest jump (to the run's
    last checkpoint) exceeds X (docs/commands/backtest.md#the-gate)."""
    from ..gate import fail_above_gate as gate

    errors = [c["longest"]["rel_error"] for c in summary_cuts]
    worst = math.nan if any(math.isnan(e) for e in errors) else max(errors)
    return gate("overall relative update error at the longest jump", worst, threshold)


def backtest(
    base: str,
    checkpoints: list[str],
    out: str,
    *,
    run: str | None = None,
    steps: StepSelection | str | None = None,
    hub_run: dict | None = None,
    options: BacktestOptions,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BacktestResult:
    """Fit at every cut, predict every later checkpoint, write the tables, summary and plots to `out`."""
    from ...engine.tensor_units import progress_counter
    from ...io.compat import check_compatible
    from ...io.output_lock import locked_output
    from ...io.outputs import output_errors, staged_output
    from ...io.run_inputs import open_run_inputs
    from ...io.writer import provenance, write_provenance
    from ...plot_common import draw_plots
    from .figures import MeasureSink, check_memory, compared_names, measure_tensor
    from .plan import plan_cuts
    from .tables import build_rows, summarize, write_tables

    options.check()
    source_fields = {"checkpoints": checkpoints, "run": run, "steps": steps, "hub_run": hub_run}
    inputs = open_run_inputs(base, checkpoints, run, steps, hub_run)
    cuts = plan_cuts(base, inputs, options, source_fields, ExecutorOptions())
    names = compared_names(cuts)
    later = {id(c): (s, c) for cp in cuts for s, c in zip(cp.targets, cp.target_checkpoints)}
    for s, ck in later.values():  # headers only: every later checkpoint holds the compared tensors
        check_compatible(inputs.base, ck, names, label=f"{ck.label} (step {s})")
        ck.expect(names)
    check_memory(cuts, names)
    rollouts = None
    if options.data is not None:  # checked before any tensor is read
        from ...engine.model_scoring import import_transformers
        from ...io.rollouts import read_rollouts

        import_transformers()
        rollouts = read_rollouts(options.data)
    notes = list(dict.fromkeys(n for cp in cuts for n in (*cp.history_pass.history.notes, *cp.history_pass.notes)))
    sinks = [MeasureSink(cp.target_checkpoints) for cp in cuts]
    tick = progress_counter(progress, len(names))
    local = [*inputs.local_paths(), *([Path(options.data)] if options.data is not None else [])]
    with locked_output(out, force=force, inputs=local) as target:
        for name in names:
            measure_tensor(name, cuts, sinks)
            if tick:
                tick(1)
        overall, tensors = build_rows(cuts, sinks, names)
        if options.data is not None:
            from ...engine.model_loading import ModelOptions
            from .output_space import output_figures

            space = output_figures(inputs.base, cuts, names, rollouts, options.data, options.model or ModelOptions())
            for row in overall:
                row.update(space[(row["cut"], row["target_step"])])
        parameters = {
            "method": options.method,
            "method_parameters": {str(cp.cut): cp.history_pass.params for cp in cuts},
            "fit": options.fit,
            "cuts": [cp.cut for cp in cuts],
            "steps": [s for s, _ in inputs.checkpoints if s != 0],
            "step_source": inputs.step_source,
        }
        summary = summarize(cuts, overall, options.max_error, None, parameters)
        gate = fail_above_gate(summary["cuts"], options.fail_above)
        summary["gate"] = gate
        with staged_output(target, force=force, label=out) as staging:
            with output_errors(staging):
                write_tables(staging, overall, tensors, summary)
                used = [inputs.base, *(c for s, c in inputs.checkpoints if s != 0)]
                used += [options.data] if options.data is not None else []
                write_provenance(
                    staging,
                    provenance("backtest", used, {**parameters, "options": asdict(options)}),
                )
                plots, hint = ([], None)
                if options.plots:
                    from ...plots_backtest import backtest_plots

                    plots, hint = draw_plots(lambda: backtest_plots(overall, summary, staging / "plots"))
    return BacktestResult(
        out=out,
        method=options.method,
        steps=parameters["steps"],
        overall=overall,
        summary=summary,
        notes=notes,
        gate=gate,
        plots=[str(Path(out) / Path(p).relative_to(staging)) for p in plots],
        plot_hint=hint,
    )
