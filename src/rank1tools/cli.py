"""`rank1` command line: parse options, call a command, render the result.

Heavy modules (torch, scikit-learn) are imported inside the commands that need them, so
`rank1 --help` and option errors answer at once. Results go to stdout (a rich table, or JSON
with --json); progress and errors go to stderr. Exit codes: see rank1tools.errors.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

from . import __version__
from .errors import InputError, Rank1Error, Terminated
from . import render
from .jsonutil import json_safe as _json_safe

app = typer.Typer(
    name="rank1",
    help="Diagnose, reconstruct and extrapolate RLVR checkpoints from their nearly rank-1 weight updates.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text: rich markup would turn "10:100:10" into an emoji
    context_settings={"help_option_names": ["-h", "--help"]},
)

JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON on stdout (for pipelines).")
REVISIONS_OPT = typer.Option(None, "--revisions", help="Hub run: branches matching this glob, e.g. 'step_*' (step = trailing number).")
SUBFOLDERS_OPT = typer.Option(False, "--subfolders", help="Hub run: step folders (checkpoint-N/ ...) at one revision.")
COMMITS_OPT = typer.Option(False, "--commits", help="Hub run: commits whose message says 'step N'.")
HUB_CACHE_OPT = typer.Option(None, "--hub-cache-policy", help="Hub shards: 'keep' in the cache (default) or 'evict' once read.")


def _set_hub_cache_policy(policy: str | None) -> None:
    if policy is not None:
        from .io.hub_spec import set_cache_policy

        set_cache_policy(policy)


def _check_output_early(out: str, force: bool, inputs: list) -> None:
    """Refuse a bad --out before any heavy import or input is opened (the command checks again,
    under its lock): option errors answer at once."""
    from .io.hub_spec import is_hub_source
    from .io.outputs import prepare_output

    prepare_output(out, force=force, inputs=[p for p in inputs if p and not is_hub_source(p)])


def _check_common_early(device: str, hub_cache_policy: str | None) -> None:
    from .options import check_choice, check_device

    check_device(device)
    if hub_cache_policy is not None:
        check_choice(hub_cache_policy, "--hub-cache-policy", ("keep", "evict"))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rank1tools {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


@app.command()
def inspect(
    source: str = typer.Argument(..., help="Model folder, .safetensors file, run directory of step folders, or a Hub "
                                 "source hf://ORG/NAME, optionally @REVISION and /SUBFOLDER."),
    steps: Optional[str] = typer.Option(None, "--steps", help="For a run: steps to list, '50,100' or '10:100:10' (inclusive)."),
    revisions: Optional[str] = REVISIONS_OPT,
    subfolders: bool = SUBFOLDERS_OPT,
    commits: bool = COMMITS_OPT,
    hub_cache_policy: Optional[str] = HUB_CACHE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """What a model or training run holds: tensors, dtypes, shards, matrix modules, checkpoints.

    Reads safetensors headers only. For a run, exits 3 if any checkpoint is unusable (listed).
    """
    if steps is not None:
        from .options import parse_steps

        parse_steps(steps)
    if hub_cache_policy is not None:
        _check_common_early("auto", hub_cache_policy)
    from .commands.inspect import inspect_source

    _set_hub_cache_policy(hub_cache_policy)
    report = inspect_source(source, steps, revisions=revisions, subfolders=subfolders, commits=commits)
    if as_json:
        _print_json(report.to_dict())
    elif report.kind == "model":
        render.model(report)
    else:
        render.run(report)
    if report.kind == "run" and report.problems:
        first = report.problems[0]
        raise InputError(
            f"{source}: {len(report.problems)} of {len(report.checkpoints)} checkpoints unusable "
            f"({'step ' + str(first.step) if first.step is not None else first.path}: {first.problem})"
        )


def _stderr_progress(enabled: bool, description: str):
    """A rich progress bar on stderr: returns (context manager, callback(done, total))."""
    import contextlib

    if not enabled or not sys.stderr.isatty():  # a bar only on a terminal: nothing in logs and pipes
        return contextlib.nullcontext(), None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


_signal_state = {"terminated": False, "reported": False}


class _interrupt_hint:
    """On Ctrl-C or SIGTERM, say what state the output is in (typer would exit 130 silently)."""

    def __init__(self, hint: str):
        self.hint = hint

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            what = "terminated" if issubclass(exc_type, Terminated) else "interrupted"
            sys.stderr.write(f"rank1: {what}: {self.hint}\n")
            _signal_state["reported"] = True
            raise typer.Exit(Terminated.exit_code if what == "terminated" else 130)
        return False


@app.command()
def decompose(
    base: str = typer.Argument(..., help="Base model (θ₀): folder, .safetensors file or hf:// repo."),
    checkpoints: Optional[list[str]] = typer.Argument(None, help="Checkpoints θ_t (or use --run)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder: spectrum tables and factor store."),
    run: Optional[str] = typer.Option(None, "--run", help="Run directory of step folders instead of CHECKPOINT args."),
    steps: Optional[str] = typer.Option(None, "--steps", help="With --run: '50,100' or '10:100:10' (inclusive)."),
    revisions: Optional[str] = REVISIONS_OPT,
    subfolders: bool = SUBFOLDERS_OPT,
    commits: bool = COMMITS_OPT,
    hub_cache_policy: Optional[str] = HUB_CACHE_OPT,
    rank: str = typer.Option("8", "--rank", "-k", help="Singular triplets kept per module and step."),
    exact: bool = typer.Option(False, "--exact", help="Full SVD (torch.linalg.svd) instead of randomized."),
    include: Optional[list[str]] = typer.Option(None, "--include", help="Glob of tensor names (repeatable); replaces the default matrix-module set."),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", help="Glob of tensor names to leave out (repeatable)."),
    all_2d: bool = typer.Option(False, "--all-2d", help="Also embeddings, lm_head and other 2-D tensors."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    plots: bool = typer.Option(False, "--plots", help="Also draw energy_1/norm_frac_1 over steps and a layer x type heatmap (OUT/plots)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and rank1 wrote it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = JSON_OPT,
) -> None:
    """Spectra of ΔW = θ_t − θ₀ for every matrix module and checkpoint (matrix rank-1, SPEC §1).

    Writes spectrum.csv / spectrum.jsonl, summary.json and a factor store (top-k σ, u, v per
    module and step). Rerunning an interrupted command resumes it.
    """
    from .options import parse_positive_int, parse_steps

    rank_k = parse_positive_int(rank, "--rank")
    if steps is not None:
        parse_steps(steps)
    _check_common_early(device, hub_cache_policy)
    _check_output_early(out, force, [base, *(checkpoints or []), run])

    from .commands.decompose import DecomposeOptions
    from .commands.decompose import decompose as run_decompose

    _set_hub_cache_policy(hub_cache_policy)
    hub_run = {"revisions": revisions, "subfolders": subfolders, "commits": commits}
    opts = DecomposeOptions(rank=rank_k, exact=exact, include=include or [], exclude=exclude or [],
                            all_2d=all_2d, device=device, plots=plots)
    bar, update = _stderr_progress(not quiet, "decompose")
    with _interrupt_hint("finished modules are kept; rerun the same command to resume"), bar:
        result = run_decompose(base, checkpoints or [], out, run=run, steps=steps, hub_run=hub_run, options=opts, force=force,
                               progress=update)
    if result.resumed_modules:
        sys.stderr.write(f"rank1: resumed: {result.resumed_modules} modules were already done\n")
    for module, step in result.fallbacks:
        sys.stderr.write(f"rank1: note: {module} at step {step}: randomized SVD missed the accuracy bar, used exact\n")
    if result.plot_hint:
        sys.stderr.write(f"rank1: note: no plots: {result.plot_hint}\n")
    if as_json:
        _print_json(_json_safe(result.to_dict()))
    else:
        render.decompose(result)


@app.command()
def reconstruct(
    base: str = typer.Argument(..., help="Base model (θ₀): folder, .safetensors file or hf:// repo."),
    checkpoint: str = typer.Argument(..., help="Checkpoint θ_t whose update is reduced to rank k."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (one rank) or parent of rank-K folders (several)."),
    rank: str = typer.Option(..., "--rank", "-k", help="Rank: 8, a fraction of min(m, n) like 1%, or a list 1,2,4,8."),
    alpha: float = typer.Option(1.0, "--alpha", help="Scale of the (norm-matched) rank-k update."),
    no_norm_match: bool = typer.Option(False, "--no-norm-match", help="Add α·ΔW_k as is, without rescaling to ‖ΔW‖."),
    rest: str = typer.Option("base", "--rest", help="Tensors not selected: 'base' (reference code) or 'checkpoint'."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (base dtype), float32, bfloat16 or float16."),
    include: Optional[list[str]] = typer.Option(None, "--include", help="Glob of tensor names (repeatable); replaces the default matrix-module set."),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", help="Glob of tensor names to leave out (repeatable)."),
    all_2d: bool = typer.Option(False, "--all-2d", help="Also embeddings, lm_head and other 2-D tensors."),
    exact: bool = typer.Option(False, "--exact", help="Full SVD (torch.linalg.svd) instead of randomized."),
    factors: Optional[str] = typer.Option(None, "--factors", help="A decompose --out folder: take σ, u, v and ‖ΔW‖ from it."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard file, e.g. 5GB, 500MB."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    hub_cache_policy: Optional[str] = HUB_CACHE_OPT,
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and rank1 wrote it."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = JSON_OPT,
) -> None:
    """Write checkpoints that keep only the top-k part of each module's update (AlphaRL Eq. 1-3, SPEC §2).

    W = θ₀ + α·(‖ΔW‖/‖ΔW_k‖)·ΔW_k per selected module; other tensors from --rest. Reports how
    much of the update the output dtype rounds away.
    """
    from .options import check_choice, check_finite, parse_ranks, parse_size

    parse_ranks(rank)
    parse_size(max_shard_size)
    check_choice(rest, "--rest", ("base", "checkpoint"))  # reconstruct.REST_CHOICES / DTYPE_CHOICES (torch-free here)
    check_choice(dtype, "--dtype", ("auto", "float32", "bfloat16", "float16"))
    check_finite(alpha, "--alpha")
    _check_common_early(device, hub_cache_policy)
    _check_output_early(out, force, [base, checkpoint, factors])

    from .commands.reconstruct import ReconstructOptions
    from .commands.reconstruct import reconstruct as run_reconstruct

    _set_hub_cache_policy(hub_cache_policy)
    opts = ReconstructOptions(rank=rank, alpha=alpha, norm_match=not no_norm_match, rest=rest, dtype=dtype,
                              include=include or [], exclude=exclude or [], all_2d=all_2d, exact=exact,
                              device=device, factors=factors, max_shard_size=max_shard_size)
    bar, update = _stderr_progress(not quiet, "reconstruct")
    with _interrupt_hint("nothing was written"), bar:
        result = run_reconstruct(base, checkpoint, out, options=opts, force=force, progress=update)
    for note in result.notes:
        sys.stderr.write(f"rank1: note: {note}\n")
    for o in result.outputs:
        if o.warning:
            sys.stderr.write(f"rank1: warning: rank {o.rank}: {o.warning}\n")
    if as_json:
        _print_json(_json_safe(result.to_dict()))
    else:
        render.reconstruct(result)


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
    from .options import check_finite, parse_positive_int, parse_steps

    min_ck = parse_positive_int(min_checkpoints, "--min-checkpoints")
    if window is not None:
        parse_steps(window)
    if fail_below is not None:
        check_finite(fail_below, "--fail-below")
    _check_output_early(out, force, [factors, metrics])

    from .commands.fit_pls import GATE_EXIT_CODE, FitPlsOptions
    from .commands.fit_pls import fit_pls as run_fit_pls

    opts = FitPlsOptions(metrics=metrics, metric=metric, step_column=step_column, window=window, relative=relative,
                         min_checkpoints=min_ck, fail_below=fail_below, plots=not no_plots)
    bar, update = _stderr_progress(not quiet, "fit-pls")
    with _interrupt_hint("nothing was written"), bar:
        result = run_fit_pls(factors, out, options=opts, force=force, progress=update)
    if result.plot_hint:
        sys.stderr.write(f"rank1: note: no plots: {result.plot_hint}\n")
    if as_json:  # the warning goes with the JSON to stderr; the rich summary shows it itself
        for w in result.warnings:
            sys.stderr.write(f"rank1: warning: {w}\n")
        _print_json(result.to_dict())
    else:
        render.fit_pls(result)
    if result.gate is not None and not result.gate["passed"]:
        g = result.gate
        sys.stderr.write(f"rank1: gate: {g['figure']} {g['value']} is below --fail-below {g['threshold']} "
                         f"(outputs written to {out})\n")
        raise typer.Exit(GATE_EXIT_CODE)


@app.command()
def demo(
    out: str = typer.Option("demo-out", "--out", help="Folder for the generated model, run and results."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and rank1 wrote it."),
    as_json: bool = JSON_OPT,
) -> None:
    """The main job on an embedded default: a synthetic bf16 base and TRL run (steps 10..50),
    inspected, decomposed (OUT/decompose) and reconstructed at rank 1 (OUT/rank-1)."""
    _check_output_early(out, force, [])
    from .commands.demo import run_demo

    result = run_demo(out, force=force)
    if as_json:
        _print_json(_json_safe({"out": result.out, "base": result.base.to_dict(), "run": result.run.to_dict(),
                                "decompose": result.decompose.to_dict(),
                                "reconstruct": result.reconstruct.to_dict()}))
        return
    render.model(result.base)
    render.run(result.run)
    render.decompose(result.decompose)
    render.reconstruct(result.reconstruct)


def _on_sigterm(signum, frame) -> None:
    _signal_state["terminated"] = True
    raise Terminated()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main() -> None:
    import signal

    import rank1tools

    rank1tools.COMMAND_LINE = ["rank1", *sys.argv[1:]]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # clean up as for Ctrl-C, then exit 143
    _signal_state.update(terminated=False, reported=False)
    try:
        code = app(standalone_mode=False, prog_name="rank1")
        code = code if isinstance(code, int) else 0
        if code in (130, Terminated.exit_code) or _signal_state["terminated"]:  # typer swallows the interrupt
            code = Terminated.exit_code if _signal_state["terminated"] else 130
            if not _signal_state["reported"]:
                sys.stderr.write("rank1: terminated\n" if code == Terminated.exit_code else "rank1: interrupted\n")
        sys.exit(code)
    except Rank1Error as e:
        sys.stderr.write(f"rank1: error: {_one_line(e)}\n")
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # click's usage errors: one line, not click's three
        if any(c.__name__ == "NoArgsIsHelpError" for c in type(e).__mro__):
            e.show()
        else:
            cmd = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) is not None and e.ctx.parent else ""
            sys.stderr.write(f"rank1: error: {cmd}{_one_line(e.format_message())} (see --help)\n")
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt as e:
        sys.stderr.write("rank1: terminated\n" if isinstance(e, Terminated) else "rank1: interrupted\n")
        sys.exit(Terminated.exit_code if isinstance(e, Terminated) else 130)
    except OSError as e:  # an OS error no command mapped: still one line, with the path
        if os.environ.get("RANK1_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename is not None else ""
        sys.stderr.write(f"rank1: error: {where}{e.strerror or e} (set RANK1_DEBUG=1 for a traceback)\n")
        sys.exit(1)
    except Exception as e:  # one line for users; the traceback on request
        if os.environ.get("RANK1_DEBUG"):
            raise
        sys.stderr.write(f"rank1: internal error: {type(e).__name__}: {_one_line(e)} (set RANK1_DEBUG=1 for a traceback)\n")
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        rank1tools.COMMAND_LINE = None  # later library calls in this process have no command line


if __name__ == "__main__":
    main()
