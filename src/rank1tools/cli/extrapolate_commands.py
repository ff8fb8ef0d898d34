"""`rank1 extrapolate METHOD`: write the checkpoints AlphaRL, RELEX or a straight line predict.

One subcommand per method of commands/extrapolate/registry.py, each with its own flags and
--help; `rank1 extrapolate BASE --method M ...` is an alias of `rank1 extrapolate M BASE ...`
(ExtrapolateGroup rewrites it, so both forms run the same code and record the same command
line). A flag of another method is refused with one line naming the method(s) it belongs to
(docs/commands/extrapolate.md, "Subcommands, the `--method` alias and the flag rule").
"""

from __future__ import annotations

import sys

import typer
from typer._click.core import Context  # typer vendors click: its contexts and usage errors
from typer._click.exceptions import NoSuchOption
from typer._click.exceptions import UsageError as ClickUsageError

from ..commands.extrapolate.alpharl import CONTAINERS, R2_KINDS
from ..commands.extrapolate.base import REST_CHOICES
from ..commands.extrapolate.linear import MODES
from ..commands.extrapolate.registry import METHODS
from . import render
from .app import (
    RESUME_HINT,
    Rank1Command,
    app,
    check_common_early,
    check_output_early,
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

METHOD_NAMES = tuple(METHODS)


def rewrite_method_alias(args: list[str]) -> list[str]:
    """`BASE ... --method M ...` (or `--method=M`) -> `M BASE ...`; the subcommand form as it is.
    Both at once must agree. Only tokens before a `--` are options."""
    from ..errors import UsageError

    end = args.index("--") if "--" in args else len(args)
    found, rest, i = [], [], 0
    while i < end:
        tok = args[i]
        if tok == "--method":
            if i + 1 >= end:
                raise UsageError(f"--method needs a value: {', '.join(METHOD_NAMES)}")
            found.append(args[i + 1])
            i += 2
            continue
        if tok.startswith("--method="):
            found.append(tok.split("=", 1)[1])
        else:
            rest.append(tok)
        i += 1
    rest += args[end:]
    if not found:
        return args
    if len(set(found)) > 1:
        raise UsageError(f"--method given twice ({found[0]}, {found[1]}): give it once")
    name = found[0]
    if name not in METHOD_NAMES:
        raise UsageError(f"--method {name!r}: expected one of {', '.join(METHOD_NAMES)}")
    if rest and rest[0] in METHOD_NAMES:
        if rest[0] != name:
            raise UsageError(f"--method {name} and the subcommand {rest[0]} disagree: give one of them")
        return rest
    return [name, *rest]


class ExtrapolateGroup(typer.core.TyperGroup):
    """`rank1 extrapolate`: the methods as subcommands, `--method M` as an alias."""

    alias_options = ("--method",)  # options the group itself reads (docs: the alias)

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not args or args[0] in ("-h", "--help"):
            return super().parse_args(ctx, args)
        rewritten = rewrite_method_alias(args)
        if rewritten is args and args[0] not in self.commands:  # no method given
            head = args[: args.index("--")] if "--" in args else args
            if "-h" in head or "--help" in head:
                return super().parse_args(ctx, ["--help"])
            _no_method(ctx, self, args)
        if rewritten is not args:
            _record_command_line(args, rewritten)
        return super().parse_args(ctx, rewritten)


def _record_command_line(args: list[str], rewritten: list[str]) -> None:
    """Record the subcommand form in the provenance's argv (rank1tools.COMMAND_LINE): the alias and
    the subcommand form write the same bytes."""
    import rank1tools

    from ..engine.executors import without_executor_args

    line = rank1tools.COMMAND_LINE
    if line and "extrapolate" in line:
        at = line.index("extrapolate") + 1
        if line[at:] == without_executor_args(args):
            rank1tools.COMMAND_LINE = [*line[:at], *without_executor_args(rewritten)]


def _options(params: list, args: list[str]):
    """The option tokens of `args` (`--flag` or `--flag=value`, up to `--`), with the options'
    values skipped: (flag as typed, known to `params`)."""
    own = {o: p for p in params for o in (*p.opts, *p.secondary_opts)}
    i = 0
    while i < len(args) and args[i] != "--":
        tok = args[i]
        flag = tok.split("=", 1)[0]
        takes_value = flag in own and own[flag].param_type_name == "option" and not own[flag].is_flag
        if flag.startswith("-") and len(flag) > 1 and not _is_number(flag):
            yield flag, flag in own
        i += 2 if takes_value and "=" not in tok else 1


def _is_number(text: str) -> bool:
    return text[1:2].isdigit() or text[1:2] == "."


def _no_method(ctx: Context, group, args: list[str]) -> None:
    """No subcommand and no --method: an unknown flag gets the usual hint (against every method's
    flags), else the usage error asks for a method."""
    from ..errors import UsageError

    params, seen = [], set()
    for name in METHOD_NAMES:
        for p in group.commands[name].params:
            if p.name not in seen:
                seen.add(p.name)
                params.append(p)
    for flag, known in _options(params, args):
        if not known:
            union = typer.core.TyperCommand(name="extrapolate", params=params)
            raise NoSuchOption(flag, ctx=Context(union, info_name="extrapolate", parent=ctx.parent))
    raise UsageError(
        "extrapolate needs a method: rank1 extrapolate alpharl|relex|linear BASE ... "
        "(or --method M; see rank1 extrapolate --help)"
    )


class MethodCommand(Rank1Command):
    """One method's subcommand: a flag of another method is refused naming the method(s) it
    belongs to (registry.foreign_flag_error), before click calls it unknown."""

    method_name = ""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        from ..commands.extrapolate.registry import foreign_flag_error

        for flag, known in _options(self.params, args):
            error = None if known else foreign_flag_error(flag, self.method_name)
            if error is not None:
                raise error
        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as e:
            if "unexpected extra argument" in e.format_message():
                error = foreign_flag_error("CHECKPOINT", self.method_name)
                if error is not None:
                    raise error from None
            raise


def _method_command(name: str):
    return type(f"{name.capitalize()}Command", (MethodCommand,), {"method_name": name})


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
    check_common_early(device, hub_cache_policy)
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


@extrapolate_app.command("relex", cls=_method_command("relex"))
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


@extrapolate_app.command("linear", cls=_method_command("linear"))
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


@extrapolate_app.command("alpharl", cls=_method_command("alpharl"))
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
