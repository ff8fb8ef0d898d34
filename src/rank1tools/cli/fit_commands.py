"""`rank1 fit-pls` and `rank1 linearity`: commands that fit lines to a run's trajectories."""

from __future__ import annotations

import sys

import typer

from . import render
from .app import (
    RESUME_HINT,
    Rank1Command,
    app,
    check_common_early,
    check_output_early,
    exit_on_gate,
    interrupt_hint,
    one_step_selection,
    print_json,
    print_result_notes,
    set_hub_cache_policy,
    stderr_progress,
)
from .params import (
    BASE_ARG,
    CHECKPOINTS_ARG,
    DEVICE_OPT,
    EXCLUDE_OPT,
    FORCE_OPT,
    JSON_OPT,
    QUIET_OPT,
    STEPS_HELP,
    ExecutorFlags,
    RunSpec,
    include_option,
    number,
    out_option,
    parse_seed,
    steps_option,
    with_executor,
    with_run,
)


@app.command("fit-pls", cls=Rank1Command)
def fit_pls(
    factors: str = typer.Argument(..., metavar="FACTORS_DIR", help="A decompose --out folder (factor store)."),
    out: str = out_option("Output folder: tables, summary, plots and the fit store."),
    metrics: str | None = typer.Option(
        None,
        "--metrics",
        metavar="FILE",
        help="Metric per checkpoint step: CSV/TSV, JSON Lines, JSON, or trainer_state.json.",
    ),
    metric: str | None = typer.Option(
        None, "--metric", metavar="NAME", help="Which metric of --metrics (default: the only one)."
    ),
    step_column: str | None = typer.Option(
        None, "--step-column", metavar="NAME", help="Step column of a CSV/JSONL metrics file."
    ),
    steps: str | None = steps_option(f"Checkpoint steps to fit: {STEPS_HELP}."),
    window: str | None = typer.Option(None, "--window", metavar="STEPS", help="Alias of --steps."),
    relative: bool = typer.Option(
        False, "--relative", help="Divide the metric by its value at the window's last checkpoint."
    ),
    min_checkpoints: str = typer.Option(
        "3", "--min-checkpoints", metavar="N", help="Fewest checkpoints to fit (at least 3)."
    ),
    fail_below: float | None = typer.Option(
        None,
        "--fail-below",
        metavar="R2",
        parser=number("--fail-below", at_most=1),
        help="Exit 5 (after writing) when mean LOO R² (or R²_step without --metrics) is below this.",
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="Do not draw plots."),
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """How linear each module's rank-1 trajectory x_t = σ₁u₁ is against a metric and the step (AlphaRL).

    One-component PLS per module: in-sample R², leave-one-out R² and R²_step; tables, plots and a
    fit store for extrapolate alpharl. Reads only the factor store.
    """
    from ..options import check_min_checkpoints, parse_positive_int
    from ..values import StepSelection

    min_ck = check_min_checkpoints(parse_positive_int(min_checkpoints, "--min-checkpoints"))
    selection = StepSelection.of(*one_step_selection(steps=steps, window=window))
    check_output_early(out, force, [factors, metrics])

    from ..commands.fit_pls import FitPlsOptions
    from ..commands.fit_pls import fit_pls as run_fit_pls

    opts = FitPlsOptions(
        metrics=metrics,
        metric=metric,
        step_column=step_column,
        window=selection,
        relative=relative,
        min_checkpoints=min_ck,
        fail_below=fail_below,
        plots=not no_plots,
    )
    bar, update = stderr_progress(not quiet, "fit-pls")
    with interrupt_hint("nothing was written", out), bar:
        result = run_fit_pls(factors, out, options=opts, force=force, progress=update)
    if result.plot_hint:
        sys.stderr.write(f"rank1: note: no plots: {result.plot_hint}\n")
    if as_json:  # the warning goes with the JSON to stderr; the rich summary shows it itself
        for w in result.warnings:
            sys.stderr.write(f"rank1: warning: {w}\n")
        print_json(result.to_dict())
    else:
        render.fit_pls(result)
    exit_on_gate(result.gate, out)


@app.command(cls=Rank1Command)
@with_run(steps_help="With --run: the window, '50,100' or '10:100:10' (inclusive).")
@with_executor
def linearity(
    base: str = BASE_ARG,
    checkpoints: list[str] | None = typer.Argument(
        None, metavar=CHECKPOINTS_ARG, help="Checkpoints θ_t (or use --run)."
    ),
    out: str = out_option("Output folder: tables, summary and plots."),
    run_spec: RunSpec = RunSpec(),
    rank: str = typer.Option(
        "1",
        "--rank",
        "-k",
        metavar="R",
        help="Trajectory rank r for explained_r and coef_r2_1..r (capped at the checkpoints).",
    ),
    include: list[str] | None = include_option(
        "Glob of tensor names (repeatable); default every tensor with 2+ elements."
    ),
    exclude: list[str] | None = EXCLUDE_OPT,
    sample: str | None = typer.Option(
        None,
        "--sample",
        metavar="N",
        help="Per-element R² on a seeded uniform sample of N elements per tensor (default all).",
    ),
    seed: str = typer.Option("0", "--seed", metavar="SEED", help="Seed of --sample."),
    fail_below: float | None = typer.Option(
        None,
        "--fail-below",
        metavar="SHARE",
        parser=number("--fail-below", at_least=0, at_most=1),
        help="Exit 5 (after writing) when the share of changing elements with R² > 0.7 is below this.",
    ),
    r2_stats: bool = typer.Option(
        False,
        "--r2-stats",
        help="Also the mean and median per-element R² of the kept elements (RLVR linearity's figure); "
        "implied by --with-base, --min-change and --min-distinct.",
    ),
    with_base: bool = typer.Option(
        False, "--with-base", help="The base as step 0 in the fits of --r2-stats (not in the share above 0.7)."
    ),
    min_change: float | None = typer.Option(
        None,
        "--min-change",
        metavar="X",
        parser=number("--min-change", at_least=0),
        help="--r2-stats keeps elements whose range (max − min) exceeds X (default 0; the reference: 1e-4).",
    ),
    min_distinct: str | None = typer.Option(
        None,
        "--min-distinct",
        metavar="N",
        help="--r2-stats keeps elements with at least N distinct values (default 2; the reference: 4).",
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="Do not draw plots."),
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    executor: ExecutorFlags = ExecutorFlags(),
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """How linear the run is per tensor, before trusting extrapolate relex or linear.

    Over the window (step 0 excluded): trajectory rank-1 / rank-r explained variance, R² of the
    top coefficient series against the step, and the share of elements whose per-element linear
    R² exceeds 0.7 (static elements reported apart). One streaming pass per tensor; read-only.
    """
    from ..options import parse_positive_int

    rank_r = parse_positive_int(rank, "--rank")
    n_sample = None if sample is None else parse_positive_int(sample, "--sample")
    seed_value = parse_seed(seed)
    distinct = None if min_distinct is None else parse_positive_int(min_distinct, "--min-distinct")
    check_common_early(device)
    check_output_early(out, force, [base, *(checkpoints or []), run_spec.run])
    exec_opts = executor.check()

    from ..commands.linearity import LinearityOptions
    from ..commands.linearity import linearity as run_linearity

    set_hub_cache_policy(run_spec.hub_cache_policy)
    opts = LinearityOptions(
        rank=rank_r,
        include=include or [],
        exclude=exclude or [],
        sample=n_sample,
        seed=seed_value,
        fail_below=fail_below,
        plots=not no_plots,
        device=device,
        r2_stats=r2_stats or min_change is not None or distinct is not None,
        with_base=with_base,
        min_change=0.0 if min_change is None else min_change,
        min_distinct=2 if distinct is None else distinct,
    )
    bar, update = stderr_progress(not quiet, "linearity")
    with interrupt_hint(RESUME_HINT if exec_opts.is_ray else "nothing was written", out), bar:
        result = run_linearity(
            base,
            checkpoints or [],
            out,
            run=run_spec.run,
            steps=run_spec.steps,
            hub_run=run_spec.hub_run,
            options=opts,
            force=force,
            progress=update,
            executor=exec_opts,
        )
    print_result_notes(result)
    if as_json:
        print_json(result.to_dict())
    else:
        render.linearity(result)
    exit_on_gate(result.gate, out)
