"""`rank1 backtest`: how far a jump holds on this run (docs/commands/backtest.md).
Options -> commands.backtest -> rendering. The method options are extrapolate's (relex: --rank,
--fit-window, --position-index; linear: --mode, --fit-window, --from, --to, --extrapolate-norms);
one of the other method exits 2 with the same one line as extrapolate's flag rule."""

from __future__ import annotations

import typer

from ..commands.backtest.plan import DEFAULT_MAX_ERROR, METHOD_CHOICES
from ..commands.extrapolate.base import REST_CHOICES
from ..commands.extrapolate.linear import MODES
from ..options import DTYPE_CHOICES as MODEL_DTYPES
from .app import (
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
    CHECKPOINTS_ARG,
    DEVICE_OPT,
    EXCLUDE_OPT,
    FORCE_OPT,
    JSON_OPT,
    QUIET_OPT,
    RunSpec,
    choice_option,
    include_option,
    number,
    out_option,
    with_run,
)


@app.command(cls=Rank1Command)
@with_run()
def backtest(
    base: str = BASE_ARG,
    checkpoints: list[str] | None = typer.Argument(None, metavar=CHECKPOINTS_ARG, help="Checkpoints (or use --run)."),
    out: str = out_option("Output folder: tables, summary.json and plots."),
    run_spec: RunSpec = RunSpec(),
    method: str = choice_option(..., "--method", METHOD_CHOICES, "The extrapolation method to backtest."),
    cuts: str = typer.Option(
        ...,
        "--cuts",
        metavar="STEPS",
        help="Checkpoint steps to fit up to, e.g. 8,16,24: each predicts every later one.",
    ),
    max_error: float = typer.Option(
        DEFAULT_MAX_ERROR,
        "--max-error",
        metavar="X",
        parser=number("--max-error", above=0),
        help="The recommended jump is the longest whose overall relative update error stays below X.",
    ),
    fail_above: float | None = typer.Option(
        None,
        "--fail-above",
        metavar="X",
        parser=number("--fail-above", at_least=0),
        help="Exit 5 (after writing) when a cut's overall error at its longest jump exceeds X.",
    ),
    rank: str | None = typer.Option(None, "--rank", "-k", metavar="R", help="relex: trajectory rank r (default 1)."),
    position_index: bool = typer.Option(False, "--position-index", help="relex: fit on positions 0..T-1."),
    mode: str | None = choice_option(None, "--mode", MODES, "linear: lstsq (default) or two-point."),
    fit_window: str | None = typer.Option(
        None, "--fit-window", metavar="W", help="relex, linear lstsq: fit on the last W checkpoints up to the cut."
    ),
    from_step: str | None = typer.Option(
        None, "--from", metavar="STEP", help="linear two-point: first step (0: base)."
    ),
    to_step: str | None = typer.Option(None, "--to", metavar="STEP", help="linear two-point: second step."),
    extrapolate_norms: bool = typer.Option(
        False, "--extrapolate-norms", help="linear: extrapolate norm weights (default: held at the cut)."
    ),
    include: list[str] | None = include_option(),
    exclude: list[str] | None = EXCLUDE_OPT,
    rest: str = choice_option(
        "last", "--rest", REST_CHOICES, "Tensors not selected held at the cut ('last') or the 'base'."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        metavar="ROLLOUTS",
        help="Rollouts JSONL (as for logprobs): also compare the predicted model with the real checkpoint on them.",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        metavar="N",
        parser=number("--batch-size", at_least=1, integer=True),
        help="With --data: sequences per forward pass (default 8).",
    ),
    model_dtype: str | None = choice_option(
        None, "--dtype", MODEL_DTYPES, "With --data: compute dtype (default auto: float32 on CPU, the config's on GPU)."
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="Do not draw plots."),
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """How far this run's early window predicts its own later checkpoints.

    For every cut, fits the method on the checkpoints up to the cut exactly as `rank1 extrapolate`
    would, predicts every later checkpoint, and reports the relative error, cosine and norm ratio of
    the predicted update against the real one, per tensor and overall, against the jump length;
    the recommended jump (N for re-grounding) is the longest whose overall error stays below
    --max-error.
    """
    from ..options import parse_positive_int, parse_step, parse_step_list

    fit: dict = {"include": include or [], "exclude": exclude or [], "rest": rest, "device": device}
    given = {
        "rank": None if rank is None else parse_positive_int(rank, "--rank"),
        "position_index": position_index or None,
        "mode": mode,
        "fit_window": None if fit_window is None else parse_positive_int(fit_window, "--fit-window"),
        "from_step": None if from_step is None else parse_step(from_step, "--from"),
        "to_step": None if to_step is None else parse_step(to_step, "--to"),
        "extrapolate_norms": extrapolate_norms or None,
    }
    fit.update({k: v for k, v in given.items() if v is not None})

    from ..commands.backtest.plan import BacktestOptions
    from ..errors import UsageError

    model = None
    if data is not None:
        from ..engine.model_loading import ModelOptions

        model = ModelOptions(device=device, dtype=model_dtype or "auto", batch_size=batch_size or 8)
    elif batch_size is not None or model_dtype is not None:
        raise UsageError(f"{'--batch-size' if batch_size is not None else '--dtype'} applies with --data")
    opts = BacktestOptions(
        method=method,
        cuts=parse_step_list(cuts, "--cuts"),
        fit=fit,
        max_error=max_error,
        fail_above=fail_above,
        plots=not no_plots,
        data=data,
        model=model,
    )
    check_common_early(device)
    check_output_early(out, force, [base, *(checkpoints or []), run_spec.run, data])

    from ..commands.backtest import backtest as run_backtest

    set_hub_cache_policy(run_spec.hub_cache_policy)
    bar, update = stderr_progress(not quiet, f"backtest ({method})")
    with interrupt_hint("nothing was written", out), bar:
        result = run_backtest(
            base,
            checkpoints or [],
            out,
            run=run_spec.run,
            steps=run_spec.steps,
            hub_run=run_spec.hub_run,
            options=opts,
            force=force,
            progress=update,
        )
    print_result_notes(result)  # the plot hint's note included
    if as_json:
        print_json(result.to_dict())
    else:
        _render(result)
    exit_on_gate(result.gate, out)


def _render(result) -> None:
    """One table of the overall figures per cut × later checkpoint, then each cut's recommended jump."""
    from rich.markup import escape

    from .render import _column, _console, _table

    console = _console()

    def f(v, fmt=".3f"):
        return "-" if v is None or v != v else format(v, fmt)

    space = any(r.get("kl") is not None for r in result.overall)
    t = _table(f"backtest of --method {result.method}: overall predicted update vs the real one")
    cols = ("cut", "target", "jump", "× window", "rel. error", "cosine", "norm ratio")
    for col in cols + (("|Δ log-prob|", "KL") if space else ()):
        _column(t, col, right=True)
    for r in result.overall:
        cells = [str(r["cut"]), str(r["target_step"]), str(r["jump"]), f(r["jump_windows"], ".2f")]
        cells += [f(r["rel_error"]), f(r["cosine"]), f(r["norm_ratio"])]
        cells += [f(r["logprob_mad"], ".4f"), f(r["kl"], ".4f")] if space else []
        t.add_row(*cells)
    console.print(t)
    s = result.summary
    for c in s["cuts"]:
        more = " (every jump the run holds: it may go further)" if c["limited_by_run"] else ""
        console.print(
            f"cut {c['cut']} (window {c['window_length']} steps): recommended jump {c['recommended_jump']} steps "
            f"= {f(c['recommended_jump_windows'], '.2f')} windows at --max-error {s['max_error']}{more}"
        )
    console.print(f"wrote {escape(result.out)}")
