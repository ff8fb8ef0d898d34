"""`rank1 fit-pls`: commands that fit lines to a run's trajectories."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .. import render
from .app import (JSON_OPT, check_output_early, interrupt_hint, print_json, stderr_progress, app)


@app.command("fit-pls")
def fit_pls(
    factors: str = typer.Argument(..., help="A decompose --out folder (factor store)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder: tables, summary, plots and the fit store."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Metric per checkpoint step: CSV/TSV, JSON Lines, JSON, or trainer_state.json."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Which metric of --metrics (default: the only one)."),
    step_column: Optional[str] = typer.Option(None, "--step-column", help="Step column of a CSV/JSONL metrics file."),
    window: Optional[str] = typer.Option(None, "--window", help="Checkpoint steps to fit, inclusive START:STOP, e.g. 10:200."),
    relative: bool = typer.Option(False, "--relative", help="Divide the metric by its value at the window's last checkpoint."),
    min_checkpoints: str = typer.Option("3", "--min-checkpoints", help="Fewest checkpoints to fit (at least 3)."),
    fail_below: Optional[float] = typer.Option(None, "--fail-below", help="Exit 5 (after writing) when mean LOO R² (or R²_step without --metrics) is below this."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Do not draw plots."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and rank1 wrote it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = JSON_OPT,
) -> None:
    """How linear each module's rank-1 trajectory x_t = σ₁u₁ is against a metric and the step (SPEC §3).

    One-component PLS per module: in-sample R², leave-one-out R² and R²_step; tables, plots and a
    fit store for extrapolate --method alpharl. Reads only the factor store.
    """
    from ..options import check_finite, parse_positive_int, parse_steps

    min_ck = parse_positive_int(min_checkpoints, "--min-checkpoints")
    if window is not None:
        parse_steps(window)
    if fail_below is not None:
        check_finite(fail_below, "--fail-below")
    check_output_early(out, force, [factors, metrics])

    from ..commands.fit_pls import GATE_EXIT_CODE, FitPlsOptions
    from ..commands.fit_pls import fit_pls as run_fit_pls

    opts = FitPlsOptions(metrics=metrics, metric=metric, step_column=step_column, window=window, relative=relative,
                         min_checkpoints=min_ck, fail_below=fail_below, plots=not no_plots)
    bar, update = stderr_progress(not quiet, "fit-pls")
    with interrupt_hint("nothing was written"), bar:
        result = run_fit_pls(factors, out, options=opts, force=force, progress=update)
    if result.plot_hint:
        sys.stderr.write(f"rank1: note: no plots: {result.plot_hint}\n")
    if as_json:  # the warning goes with the JSON to stderr; the rich summary shows it itself
        for w in result.warnings:
            sys.stderr.write(f"rank1: warning: {w}\n")
        print_json(result.to_dict())
    else:
        render.fit_pls(result)
    if result.gate is not None and not result.gate["passed"]:
        g = result.gate
        sys.stderr.write(f"rank1: gate: {g['figure']} {g['value']} is below --fail-below {g['threshold']} "
                         f"(outputs written to {out})\n")
        raise typer.Exit(GATE_EXIT_CODE)
