"""`rank1 extrapolate METHOD`: write the checkpoints AlphaRL, RELEX or a straight line predict.

One subcommand per method of commands/extrapolate/registry.py, each with its own flags and
--help; `rank1 extrapolate BASE --method M ...` is an alias of `rank1 extrapolate M BASE ...`
(ExtrapolateGroup rewrites it, so both forms run the same code and record the same command
line). A flag of another method is refused with one line naming the method(s) it belongs to
(docs/commands/extrapolate.md, "Subcommands, the `--method` alias and the flag rule"); that
parsing lives in cli/extrapolate_alias.py, the subcommands and their flags here.
"""

from __future__ import annotations

import sys

import typer

from ..commands.extrapolate.alpharl import CONTAINERS, R2_KINDS
from ..commands.extrapolate.base import REST_CHOICES
from ..commands.extrapolate.linear import MODES
from . import render
from .app import (
    RESUME_HINT,
    app,
    check_common_early,
    check_output_early,
    interrupt_hint,
    print_json,
    print_result_notes,
    set_hub_cache_policy,
    stderr_progress,
)
from .extrapolate_alias import ExtrapolateGroup, method_command
from .params import (
    BASE_ARG,
    CHECKPOINTS_ARG,
    DEVICE_OPT,
    DTYPE_OPT,
    EXCLUDE_OPT,
    FORCE_OPT,
    HUB_CACHE_OPT,
    JSON_OPT,
    QUIET_OPT,
    SHARD_OPT,
    ExecutorFlags,
    RunSpec,
    choice_option,
    include_option,
    number,
    out_option,
    with_executor,
    with_run,
)

extrapolate_app = typer.Typer(
    cls=ExtrapolateGroup,
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Write the checkpoint(s) a method predicts for later steps or a target metric.\n\n"
    "One subcommand per method, each with its own flags (rank1 extrapolate METHOD --help). "
    "`rank1 extrapolate BASE --method METHOD ...` is an alias of `rank1 extrapolate METHOD BASE ...`. "
    "A flag of another method exits 2 naming the method it belongs to.",
)
app.add_typer(extrapolate_app, name="extrapolate")

# ---- the options, declared once ----

OUT_OPT = out_option("Output checkpoint (one target) or parent of step-S / metric-Y folders.")
TARGET_STEP_OPT = typer.Option(
    None, "--target-step", metavar="STEPS", help="Step(s) to predict, e.g. 500 or 500,1000,2000."
)
INCLUDE_OPT = include_option()
FLAG_RATIO_OPT = typer.Option(
    4.0,
    "--flag-ratio",
    metavar="RATIO",
    parser=number("--flag-ratio", above=0),
    help="Flag tensors whose predicted update norm exceeds this many times a straight line's.",
)
HISTORY_ARG = typer.Argument(None, metavar=CHECKPOINTS_ARG, help="History checkpoints (or use --run).")
HISTORY_UNTIL_OPT = typer.Option(
    None, "--history-until", metavar="STEP", help="Use checkpoints up to this step (default all)."
)
REST_OPT = choice_option(
    "last", "--rest", REST_CHOICES, "Tensors not selected from the 'last' history checkpoint or the 'base'."
)


def _history(checkpoints, run_spec: RunSpec, history_until, rest, fit_window) -> dict:
    from ..options import parse_positive_int, parse_step

    return dict(
        checkpoints=checkpoints or [],
        run=run_spec.run,
        steps=run_spec.steps,
        hub_run=run_spec.hub_run,
        history_until=None if history_until is None else parse_step(history_until, "--history-until"),
        rest=rest,
        fit_window=None if fit_window is None else parse_positive_int(fit_window, "--fit-window"),
    )


def _common(target_step, include, exclude, dtype, device, max_shard_size, flag_ratio) -> dict:
    from ..options import parse_step_list

    # --max-shard-size: text, parsed once by the options class (values.shard_size)
    return dict(
        target_steps=parse_step_list(target_step, "--target-step") if target_step is not None else [],
        include=include or [],
        exclude=exclude or [],
        dtype=dtype,
        device=device,
        max_shard_size=max_shard_size,
        flag_ratio=flag_ratio,
    )


def _run(
    name: str,
    base: str,
    out: str,
    fields: dict,
    inputs: list,
    *,
    force: bool,
    device: str,
    hub_cache_policy: str | None,
    executor: ExecutorFlags,
    quiet: bool,
    as_json: bool,
) -> None:
    """Build and check the method's options (torch-free), check the output and the executor, then run."""
    from ..commands.extrapolate.registry import method

    m = method(name)
    options = m.options(**fields)
    check_common_early(device)
    check_output_early(out, force, [base, *inputs])
    exec_opts = executor.check()
    set_hub_cache_policy(hub_cache_policy)
    bar, update = stderr_progress(not quiet, f"extrapolate ({name})")
    with interrupt_hint(RESUME_HINT if exec_opts.is_ray else "nothing was written", out), bar:
        result = m.run(base, out, options=options, force=force, progress=update, executor=exec_opts)
    print_result_notes(result, warnings=True)
    for o in result.outputs:
        if o.warning:
            sys.stderr.write(f"rank1: warning: {o.path}: {o.warning}\n")
    if as_json:
        print_json(result.to_dict())
    else:
        render.extrapolate(result)


@extrapolate_app.command("relex", cls=method_command("relex"))
@with_run()
@with_executor
def relex(
    base: str = BASE_ARG,
    checkpoints: list[str] | None = HISTORY_ARG,
    out: str = OUT_OPT,
    run_spec: RunSpec = RunSpec(),
    history_until: str | None = HISTORY_UNTIL_OPT,
    target_step: str | None = TARGET_STEP_OPT,
    rank: str = typer.Option("1", "--rank", "-k", metavar="R", help="Trajectory rank r."),
    fit_window: str | None = typer.Option(
        None, "--fit-window", metavar="W", help="Fit the coefficient lines on the last W history points."
    ),
    position_index: bool = typer.Option(
        False, "--position-index", help="Fit on positions 0..T-1 as the reference code does (wrong for uneven spacing)."
    ),
    include: list[str] | None = INCLUDE_OPT,
    exclude: list[str] | None = EXCLUDE_OPT,
    rest: str = REST_OPT,
    dtype: str = DTYPE_OPT,
    flag_ratio: float = FLAG_RATIO_OPT,
    max_shard_size: str = SHARD_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    executor: ExecutorFlags = ExecutorFlags(),
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """RELEX: trajectory rank-r lines through a history of checkpoints, streamed, several target
    steps in one pass. Each output loads like the base and records how it was made."""
    from ..options import parse_positive_int

    fields = {
        **_common(target_step, include, exclude, dtype, device, max_shard_size, flag_ratio),
        **_history(checkpoints, run_spec, history_until, rest, fit_window),
        "rank": parse_positive_int(rank, "--rank"),
        "position_index": position_index,
    }
    _run(
        "relex",
        base,
        out,
        fields,
        [*(checkpoints or []), run_spec.run],
        force=force,
        device=device,
        hub_cache_policy=run_spec.hub_cache_policy,
        quiet=quiet,
        as_json=as_json,
        executor=executor,
    )


@extrapolate_app.command("linear", cls=method_command("linear"))
@with_run()
@with_executor
def linear(
    base: str = BASE_ARG,
    checkpoints: list[str] | None = HISTORY_ARG,
    out: str = OUT_OPT,
    run_spec: RunSpec = RunSpec(),
    history_until: str | None = HISTORY_UNTIL_OPT,
    target_step: str | None = TARGET_STEP_OPT,
    mode: str = choice_option(
        "lstsq", "--mode", MODES, "lstsq (per-element least squares over the history) or two-point."
    ),
    fit_window: str | None = typer.Option(
        None, "--fit-window", metavar="W", help="lstsq: fit on the last W checkpoints."
    ),
    from_step: str | None = typer.Option(
        None,
        "--from",
        metavar="STEP",
        help="two-point: first step (default the first history checkpoint; 0 is the base).",
    ),
    to_step: str | None = typer.Option(
        None, "--to", metavar="STEP", help="two-point: second step (default the last history checkpoint)."
    ),
    extrapolate_norms: bool = typer.Option(
        False, "--extrapolate-norms", help="Extrapolate norm weights too (default: copy them from the last checkpoint)."
    ),
    include: list[str] | None = INCLUDE_OPT,
    exclude: list[str] | None = EXCLUDE_OPT,
    rest: str = REST_OPT,
    dtype: str = DTYPE_OPT,
    flag_ratio: float = FLAG_RATIO_OPT,
    max_shard_size: str = SHARD_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    executor: ExecutorFlags = ExecutorFlags(),
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Straight lines through a history's weights (per-element least squares, or two points),
    streamed, several target steps in one pass. Each output loads like the base."""
    from ..options import parse_step

    fields = {
        **_common(target_step, include, exclude, dtype, device, max_shard_size, flag_ratio),
        **_history(checkpoints, run_spec, history_until, rest, fit_window),
        "mode": mode,
        "from_step": None if from_step is None else parse_step(from_step, "--from"),
        "to_step": None if to_step is None else parse_step(to_step, "--to"),
        "extrapolate_norms": extrapolate_norms,
    }
    _run(
        "linear",
        base,
        out,
        fields,
        [*(checkpoints or []), run_spec.run],
        force=force,
        device=device,
        hub_cache_policy=run_spec.hub_cache_policy,
        quiet=quiet,
        as_json=as_json,
        executor=executor,
    )


@extrapolate_app.command("alpharl", cls=method_command("alpharl"))
@with_executor
def alpharl(
    base: str = BASE_ARG,
    out: str = OUT_OPT,
    fits: str | None = typer.Option(None, "--fits", metavar="FITS_DIR", help="A fit-pls --out folder (fit store)."),
    target_metric: str | None = typer.Option(
        None, "--target-metric", metavar="VALUES", help="Target metric value(s) y*, e.g. 0.7 or 0.6,0.7,0.8."
    ),
    target_step: str | None = typer.Option(
        None, "--target-step", metavar="STEPS", help="Step(s) to predict, for a fit store fitted against the step."
    ),
    container: str = choice_option(
        "base",
        "--container",
        CONTAINERS,
        "Add the predicted update to 'base' (default) or to the window's 'last' checkpoint.",
    ),
    last_checkpoint: str | None = typer.Option(
        None,
        "--last-checkpoint",
        metavar="CHECKPOINT",
        help="--container last: the window's last checkpoint (default: as the fit store records it).",
    ),
    min_r2: float | None = typer.Option(
        None,
        "--min-r2",
        metavar="R2",
        parser=number("--min-r2", at_most=1),
        help="Modules whose R² is below this keep the container's value.",
    ),
    r2_kind: str = choice_option(
        "r2", "--r2", R2_KINDS, "Which R² --min-r2 reads: r2 (in-sample, the paper's), loo_r2 or r2_step."
    ),
    output_format: str = choice_option(
        "checkpoint",
        "--format",
        ("checkpoint", "peft"),
        "'checkpoint': merged checkpoints; 'peft': each target's rank-1 update as a PEFT LoRA adapter (container base).",
    ),
    hub_cache_policy: str | None = HUB_CACHE_OPT,
    include: list[str] | None = INCLUDE_OPT,
    exclude: list[str] | None = EXCLUDE_OPT,
    dtype: str = DTYPE_OPT,
    flag_ratio: float = FLAG_RATIO_OPT,
    max_shard_size: str = SHARD_OPT,
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    executor: ExecutorFlags = ExecutorFlags(),
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """AlphaRL: the update a fit-pls output predicts for a target metric, added to the base (or
    the window's last checkpoint). Reads no run: always local."""
    from ..options import parse_number_list

    fields = {
        **_common(target_step, include, exclude, dtype, device, max_shard_size, flag_ratio),
        "fits": fits,
        "container": container,
        "last_checkpoint": last_checkpoint,
        "min_r2": min_r2,
        "r2_kind": r2_kind,
        "output_format": output_format,
        "target_metrics": parse_number_list(target_metric, "--target-metric") if target_metric is not None else [],
    }
    _run(
        "alpharl",
        base,
        out,
        fields,
        [fits, last_checkpoint],
        force=force,
        device=device,
        hub_cache_policy=hub_cache_policy,
        quiet=quiet,
        as_json=as_json,
        executor=executor,
    )
