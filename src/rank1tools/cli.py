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
from .errors import InputError, Rank1Error

app = typer.Typer(
    name="rank1",
    help="Diagnose, reconstruct and extrapolate RLVR checkpoints from their nearly rank-1 weight updates.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON on stdout (for pipelines).")


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


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _render_model(report) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"model {report.source}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("tensors", str(report.tensors))
    t.add_row("parameters", f"{report.parameters:,}")
    t.add_row("size", _human_bytes(report.bytes))
    t.add_row("dtypes", ", ".join(f"{k}: {v}" for k, v in report.dtypes.items()))
    t.add_row("shards", str(report.shards))
    t.add_row("matrix modules", f"{report.matrix_modules} in {report.layers} layers ({report.matrix_parameters:,} parameters)")
    t.add_row("module types", ", ".join(f"{k}: {v}" for k, v in report.module_types.items()) or "none")
    t.add_row("lm_head", "tied to embedding" if report.lm_head_tied else "stored")
    if report.revision:
        t.add_row("revision", report.revision)
    Console().print(t)


def _render_run(report) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"run {report.source}: {len(report.checkpoints)} checkpoints", title_justify="left")
    for col in ("step", "layout", "weights", "dtypes", "tensors", "status"):
        t.add_column(col, justify="right" if col in ("step", "tensors") else "left")
    for c in report.checkpoints:
        status = "ok" if c.status == "ok" else f"[red]{c.problem}[/red]"
        t.add_row(str(c.step), c.layout, c.weights or "-", ", ".join(f"{k}: {v}" for k, v in c.dtypes.items()) or "-",
                  str(c.tensors or "-"), status)
    Console(width=max(120, Console().width)).print(t)


@app.command()
def inspect(
    source: str = typer.Argument(..., help="Model folder, .safetensors file, or run directory of step folders."),
    steps: Optional[str] = typer.Option(None, "--steps", help="For a run: steps to list, '50,100' or '10:100:10' (inclusive)."),
    as_json: bool = JSON_OPT,
) -> None:
    """What a model or training run holds: tensors, dtypes, shards, matrix modules, checkpoints.

    Reads safetensors headers only. For a run, exits 3 if any checkpoint is unusable (listed).
    """
    from .commands.inspect import inspect_source

    report = inspect_source(source, steps)
    if as_json:
        _print_json(report.to_dict())
    elif report.kind == "model":
        _render_model(report)
    else:
        _render_run(report)
    if report.kind == "run" and report.problems:
        first = report.problems[0]
        raise InputError(
            f"{source}: {len(report.problems)} of {len(report.checkpoints)} checkpoints unusable "
            f"(step {first.step}: {first.problem})"
        )


@app.command()
def demo(
    out: str = typer.Option("demo-out", "--out", help="Folder for the generated model and run."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = JSON_OPT,
) -> None:
    """Generate a small synthetic base model and RL run (TRL layout), then inspect both."""
    from .commands.demo import run_demo

    result = run_demo(out, force=force)
    if as_json:
        _print_json({"out": result.out, "base": result.base.to_dict(), "run": result.run.to_dict()})
        return
    _render_model(result.base)
    _render_run(result.run)


def main() -> None:
    try:
        app()
    except Rank1Error as e:
        sys.stderr.write(f"rank1: error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("rank1: interrupted\n")
        sys.exit(130)
    except Exception as e:  # one line for users; the traceback on request
        if os.environ.get("RANK1_DEBUG"):
            raise
        sys.stderr.write(f"rank1: internal error: {type(e).__name__}: {e} (set RANK1_DEBUG=1 for a traceback)\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
