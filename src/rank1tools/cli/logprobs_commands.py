"""`rank1 logprobs`: how linearly the teacher-forced log-probs of fixed rollouts evolve over a run
(docs/commands/logprobs.md). Options -> commands.logprobs -> rendering."""

from __future__ import annotations

import typer

from .app import (
    RESUME_HINT,
    Rank1Command,
    app,
    check_common_early,
    check_output_early,
    exit_on_gate,
    interrupt_hint,
    print_json,
    print_result_notes,
    set_hub_cache_policy,
    stderr_progress,
)
from .params import (
    BASE_ARG,
    BATCH_SIZE_OPT,
    CHECKPOINTS_ARG,
    DEVICE_OPT,
    FORCE_OPT,
    JSON_OPT,
    MODEL_DTYPE_OPT,
    QUIET_OPT,
    RunSpec,
    number,
    out_option,
    parse_seed,
    with_run,
)


@app.command(cls=Rank1Command)
@with_run(steps_help="With --run: the checkpoints to score, '50,100' or '10:100:10' (inclusive).")
def logprobs(
    base: str = BASE_ARG,
    checkpoints: list[str] | None = typer.Argument(
        None, metavar=CHECKPOINTS_ARG, help="Checkpoints θ_t (or use --run)."
    ),
    data: str = typer.Option(
        ..., "--data", metavar="ROLLOUTS", help="Rollouts JSONL: prompt (or messages) and completion per line."
    ),
    out: str = out_option("Output folder: the log-prob store, tables, summary and plots."),
    run_spec: RunSpec = RunSpec(),
    no_base: bool = typer.Option(False, "--no-base", help="Leave the base out of the trajectory (default: step 0)."),
    sample: str | None = typer.Option(
        None, "--sample", metavar="N", help="Score a seeded uniform sample of N sequences (default all)."
    ),
    seed: str = typer.Option("0", "--seed", metavar="SEED", help="Seed of --sample."),
    min_change: float = typer.Option(
        0.0,
        "--min-change",
        metavar="X",
        parser=number("--min-change", at_least=0),
        help="Keep a token when its log-prob's range over the steps exceeds X (reference: 1e-4).",
    ),
    min_distinct: int = typer.Option(
        2,
        "--min-distinct",
        metavar="N",
        parser=number("--min-distinct", at_least=1, integer=True),
        help="... and it takes at least N distinct values (reference: 4).",
    ),
    fail_below: float | None = typer.Option(
        None,
        "--fail-below",
        metavar="SHARE",
        parser=number("--fail-below", at_least=0, at_most=1),
        help="Exit 5 (after writing) when the share of kept tokens with R² > 0.7 is below this.",
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="Do not draw plots."),
    device: str = DEVICE_OPT,
    dtype: str = MODEL_DTYPE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """How linearly the teacher-forced log-probs of fixed rollouts evolve over the checkpoints.

    Scores every completion token under the base (step 0) and each checkpoint, one model in
    memory, into a resumable store; reports per-token R² against the step (share > 0.7, mean,
    median), per-sequence summed log-prob trajectories and position buckets.
    """
    from ..options import parse_positive_int

    n_sample = None if sample is None else parse_positive_int(sample, "--sample")
    seed_value = parse_seed(seed)
    check_common_early(device)
    check_output_early(out, force, [base, *(checkpoints or []), run_spec.run, data])

    from ..commands.logprobs import LogprobsOptions
    from ..commands.logprobs import logprobs as run_logprobs
    from ..engine.model_loading import ModelOptions

    set_hub_cache_policy(run_spec.hub_cache_policy)
    opts = LogprobsOptions(
        sample=n_sample,
        seed=seed_value,
        with_base=not no_base,
        min_change=min_change,
        min_distinct=min_distinct,
        fail_below=fail_below,
        plots=not no_plots,
        model=ModelOptions(device=device, dtype=dtype, batch_size=batch_size),
    )
    bar, update = stderr_progress(not quiet, "logprobs")
    with interrupt_hint(RESUME_HINT, out), bar:
        result = run_logprobs(
            base,
            checkpoints or [],
            out,
            data=data,
            run=run_spec.run,
            steps=run_spec.steps,
            hub_run=run_spec.hub_run,
            options=opts,
            force=force,
            progress=update,
        )
    print_result_notes(result)
    if as_json:
        print_json(result.to_dict())
    else:
        _render(result)
    exit_on_gate(result.gate, out)


def _render(result) -> None:
    """The summary: a table of the token figures overall and per bucket, and one headline line."""
    from rich.markup import escape

    from .render import _column, _console, _table, steps_text

    s, console = result.summary, _console()

    def f(v, pct=False):
        return "-" if v is None else (f"{v:.1%}" if pct else f"{v:.3f}")

    t = _table("token log-prob linearity")
    for col in ("tokens", "count", "kept", "R² > 0.7", "mean R²", "median R²"):
        _column(t, col, right=col != "tokens")
    h = s["headline"]
    rows = [("[bold]all[/bold]", s["tokens"], h), *((escape(n), b["tokens"], b) for n, b in s["buckets"].items())]
    for label, count, g in rows:
        t.add_row(
            label, str(count), str(g["kept"]), f(g["frac_r2_above_0.7"], True), f(g["r2_mean"]), f(g["r2_median"])
        )
    console.print(t)
    flt = s["filter"]
    console.print(
        f"{result.sequences} sequences, {result.tokens} scored tokens, {steps_text(result.steps)}\nfilter: {flt['removed_min_change']} tokens removed by --min-change {flt['min_change']}, "
        f"{flt['removed_min_distinct']} by --min-distinct {flt['min_distinct']}; {flt['kept']} of {s['tokens']} kept"
    )
    q = s["sequence_sums"]
    console.print(
        f"summed log-prob per sequence: {f(q['frac_r2_above_0.7'], True)} of {q['sequences']} sequences "
        f"with R² > 0.7 (mean R² {f(q['r2_mean'])})"
    )
    if result.reused_steps:
        console.print(f"steps reused from the store: {', '.join(map(str, result.reused_steps))}")
    console.print(f"wrote {escape(result.out)}")
