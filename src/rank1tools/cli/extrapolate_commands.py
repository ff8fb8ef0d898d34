"""`rank1 extrapolate`: write the checkpoints AlphaRL, RELEX or a straight line predict."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from . import render
from .app import (BASE_ARG, CHECKPOINTS_ARG, COMMITS_OPT, DEVICE_OPT, EXECUTOR_OPT, FORCE_OPT, HUB_CACHE_OPT,
                  JSON_OPT, MAX_IN_FLIGHT_OPT, QUIET_OPT, RAY_ADDRESS_OPT, RAY_CPUS_OPT, RAY_GPUS_OPT, RAY_TIMEOUT_OPT, RESUME_HINT,
                  REVISIONS_OPT, SUBFOLDERS_OPT, Rank1Command, app, check_common_early, check_executor_early,
                  check_output_early, interrupt_hint, number, print_json, set_hub_cache_policy, stderr_progress)


@app.command(cls=Rank1Command)
def extrapolate(
    base: str = BASE_ARG,
    checkpoints: Optional[list[str]] = typer.Argument(None, metavar=CHECKPOINTS_ARG, help="relex/linear: history checkpoints (or use --run)."),
    out: str = typer.Option(..., "--out", "-o", metavar="PATH", help="Output checkpoint (one target) or parent of step-S / metric-Y folders."),
    method: str = typer.Option(..., "--method", metavar="alpharl|relex|linear", help="alpharl (from a fit-pls output), relex (trajectory rank-r) or linear."),
    run: Optional[str] = typer.Option(None, "--run", metavar="RUN_DIR", help="relex/linear: run directory of step folders."),
    steps: Optional[str] = typer.Option(None, "--steps", metavar="STEPS", help="With --run: '50,100' or '10:100:10' (inclusive)."),
    revisions: Optional[str] = REVISIONS_OPT,
    subfolders: bool = SUBFOLDERS_OPT,
    commits: bool = COMMITS_OPT,
    hub_cache_policy: Optional[str] = HUB_CACHE_OPT,
    history_until: Optional[str] = typer.Option(None, "--history-until", metavar="STEP", help="relex/linear: use checkpoints up to this step (default all)."),
    target_step: Optional[str] = typer.Option(None, "--target-step", metavar="STEPS", help="Step(s) to predict, e.g. 500 or 500,1000,2000."),
    rank: str = typer.Option("1", "--rank", "-k", metavar="R", help="relex: trajectory rank r."),
    fit_window: Optional[str] = typer.Option(None, "--fit-window", metavar="W", help="relex: fit the coefficient lines on the last W history points; linear lstsq: fit on the last W checkpoints."),
    position_index: bool = typer.Option(False, "--position-index", help="relex: fit on positions 0..T-1 as the reference code does (wrong for uneven spacing)."),
    mode: str = typer.Option("lstsq", "--mode", metavar="lstsq|two-point", help="linear: lstsq (per-element least squares over the history) or two-point."),
    from_step: Optional[str] = typer.Option(None, "--from", metavar="STEP", help="linear two-point: first step (default the first history checkpoint)."),
    to_step: Optional[str] = typer.Option(None, "--to", metavar="STEP", help="linear two-point: second step (default the last history checkpoint)."),
    extrapolate_norms: bool = typer.Option(False, "--extrapolate-norms", help="linear: extrapolate norm weights too (default: copy them from the last checkpoint)."),
    fits: Optional[str] = typer.Option(None, "--fits", metavar="FITS_DIR", help="alpharl: a fit-pls --out folder (fit store)."),
    target_metric: Optional[str] = typer.Option(None, "--target-metric", metavar="VALUES", help="alpharl: target metric value(s) y*, e.g. 0.7 or 0.6,0.7,0.8."),
    container: str = typer.Option("base", "--container", metavar="base|last", help="alpharl: add the predicted update to 'base' (default) or to the window's 'last' checkpoint."),
    last_checkpoint: Optional[str] = typer.Option(None, "--last-checkpoint", metavar="CHECKPOINT", help="alpharl --container last: the window's last checkpoint (default: as the fit store records it)."),
    min_r2: Optional[float] = typer.Option(None, "--min-r2", metavar="R2", parser=number("--min-r2", at_most=1), help="alpharl: modules whose R² is below this keep the container's value."),
    r2_kind: str = typer.Option("r2", "--r2", metavar="r2|loo_r2|r2_step", help="alpharl: which R² --min-r2 reads: r2 (in-sample, the paper's), loo_r2 or r2_step."),
    include: Optional[list[str]] = typer.Option(None, "--include", metavar="GLOB", help="Glob of tensor names (repeatable)."),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", metavar="GLOB", help="Glob of tensor names to leave out (repeatable)."),
    rest: str = typer.Option("last", "--rest", metavar="last|base", help="relex/linear: tensors not selected from the 'last' history checkpoint or the 'base'."),
    dtype: str = typer.Option("auto", "--dtype", metavar="auto|float32|bfloat16|float16", help="auto (base dtype), float32, bfloat16 or float16."),
    flag_ratio: float = typer.Option(4.0, "--flag-ratio", metavar="RATIO", parser=number("--flag-ratio", above=0), help="Flag tensors whose predicted update norm exceeds this many times a straight line's."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", metavar="SIZE", help="Largest shard file, e.g. 5GB, 500MB."),
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    executor: str = EXECUTOR_OPT,
    ray_address: Optional[str] = RAY_ADDRESS_OPT,
    ray_num_cpus: Optional[float] = RAY_CPUS_OPT,
    ray_num_gpus: Optional[float] = RAY_GPUS_OPT,
    max_in_flight: Optional[int] = MAX_IN_FLIGHT_OPT,
    ray_timeout: Optional[float] = RAY_TIMEOUT_OPT,
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Write the checkpoint(s) a method predicts for later steps or a target metric.

    relex and linear read the base and a history of checkpoints (streamed, several targets in one
    pass); alpharl reads a fit-pls output and the base. Each output loads like the base and
    records how it was made; a rounding report and per-tensor norm ratios come with it.
    """
    from ..options import (check_finite, parse_number_list, parse_positive_int, parse_size, parse_step, parse_step_list,
                           parse_steps)

    if steps is not None:
        parse_steps(steps)
    parse_size(max_shard_size)
    check_finite(flag_ratio, "--flag-ratio")
    if min_r2 is not None:
        check_finite(min_r2, "--min-r2")
    from ..commands.extrapolate import ExtrapolateOptions, check_options

    opts = ExtrapolateOptions(
        method=method, checkpoints=checkpoints or [], run=run, steps=steps,
        hub_run={"revisions": revisions, "subfolders": subfolders, "commits": commits},
        history_until=None if history_until is None else parse_step(history_until, "--history-until"),
        target_steps=parse_step_list(target_step, "--target-step") if target_step is not None else [],
        rank=parse_positive_int(rank, "--rank"),
        fit_window=None if fit_window is None else parse_positive_int(fit_window, "--fit-window"),
        position_index=position_index, mode=mode,
        from_step=None if from_step is None else parse_step(from_step, "--from"),
        to_step=None if to_step is None else parse_step(to_step, "--to"),
        extrapolate_norms=extrapolate_norms, fits=fits,
        target_metrics=parse_number_list(target_metric, "--target-metric") if target_metric is not None else [],
        container=container, last_checkpoint=last_checkpoint, min_r2=min_r2, r2_kind=r2_kind,
        include=include or [], exclude=exclude or [], rest=rest, dtype=dtype, device=device,
        max_shard_size=max_shard_size, flag_ratio=flag_ratio)
    check_options(opts)
    check_common_early(device, hub_cache_policy)
    check_output_early(out, force, [base, *(checkpoints or []), run, fits, last_checkpoint])
    exec_opts = check_executor_early(executor, ray_address, ray_num_cpus, ray_num_gpus, max_in_flight, ray_timeout)

    from ..commands.extrapolate import extrapolate as run_extrapolate

    set_hub_cache_policy(hub_cache_policy)
    bar, update = stderr_progress(not quiet, f"extrapolate ({method})")
    with interrupt_hint(RESUME_HINT if exec_opts.is_ray else "nothing was written", out), bar:
        result = run_extrapolate(base, out, options=opts, force=force, progress=update, executor=exec_opts)
    for note in result.notes:
        sys.stderr.write(f"rank1: note: {note}\n")
    for w in result.warnings:
        sys.stderr.write(f"rank1: warning: {w}\n")
    for o in result.outputs:
        if o.warning:
            sys.stderr.write(f"rank1: warning: {o.path}: {o.warning}\n")
    if as_json:
        print_json(result.to_dict())
    else:
        render.extrapolate(result)
