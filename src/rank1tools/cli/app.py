"""The `rank1` application: shared options, progress on stderr, interrupt handling and `main`.

The commands live beside this module (one module per group of commands) and register on `app`.

Heavy modules (torch, scikit-learn) are imported inside the commands that need them, so
`rank1 --help` and option errors answer at once. Results go to stdout (a rich table, or JSON
with --json); progress and errors go to stderr. Exit codes: see rank1tools.errors.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from typer.core import TyperArgument, TyperCommand

from .. import __version__
from ..errors import Rank1Error, Terminated

app = typer.Typer(
    name="rank1",
    help="Diagnose, reconstruct and extrapolate RLVR checkpoints from their nearly rank-1 weight updates.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text: rich markup would turn "10:100:10" into an emoji
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _PlainArgument(TyperArgument):
    """An argument shown by its metavar alone: `BASE`, `[CHECKPOINT]...`, not typer's `{base}` or `<str>`."""

    def display_type_rich(self, ctx):
        return None

    def _usage_display_name(self) -> str:
        return self.metavar or self.name.upper()


class Rank1Command(TyperCommand):
    """Every rank1 command: arguments shown by their metavars (options carry theirs: PATH, STEPS, N)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperArgument:
                param.__class__ = _PlainArgument


def suggest_options(typed: str, command) -> list[str]:
    """The options of `command` a mistyped `typed` most likely meant: those it abbreviates, then the
    close spellings (difflib on the names without dashes, `_` read as `-`); never --help."""
    import difflib

    names = [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--") and o != "--help"]
    key = typed.split("=", 1)[0].lstrip("-").replace("_", "-").lower()
    if not key:
        return []
    found = [n for n in names if n[2:].startswith(key)]
    found += ["--" + n for n in difflib.get_close_matches(key, [n[2:] for n in names], n=3, cutoff=0.75)]
    return list(dict.fromkeys(found))[:3]


def one_step_selection(**given: str | None) -> tuple[str | None, str]:
    """The step selection as given under `--steps` or an alias (fit-pls --window; docs/cli.md, "Step
    selections"): (value, the option typed, for messages). Both at once is a usage error."""
    from ..errors import UsageError

    named = [(f"--{name.replace('_', '-')}", value) for name, value in given.items() if value is not None]
    if len(named) > 1:
        raise UsageError(f"{named[0][0]} and {named[1][0]} are one option (an alias): give it once")
    return (named[0][1], named[0][0]) if named else (None, "--steps")


RESUME_HINT = "the finished work is kept beside --out: rerun the same command to resume"


def set_hub_cache_policy(policy: str | None) -> None:
    if policy is not None:
        from ..io.hub_spec import set_cache_policy

        set_cache_policy(policy)


def check_output_early(out: str, force: bool, inputs: list) -> None:
    """Refuse a bad --out before any heavy import or input is opened (the command checks again,
    under its lock): option errors answer at once."""
    from ..io.hub_spec import is_hub_source
    from ..io.output_nesting import check_inner, check_outer
    from ..io.outputs import prepare_output

    target = prepare_output(out, force=force, inputs=[p for p in inputs if p and not is_hub_source(p)])
    check_outer(target, out, held=lambda _folder: False)
    check_inner(target, out)


def check_common_early(device: str) -> None:
    """--device's syntax, before torch is imported (the choice options are checked while parsing)."""
    from ..options import check_device

    check_device(device)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rank1tools {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def print_result_notes(result, *, warnings: bool = False) -> None:
    """A result's notes (and, with `warnings`, its warnings) on stderr, one `rank1: note:` line each;
    then why no plots were drawn, for a result that says."""
    for note in getattr(result, "notes", []):
        sys.stderr.write(f"rank1: note: {note}\n")
    if getattr(result, "plot_hint", None):
        sys.stderr.write(f"rank1: note: no plots: {result.plot_hint}\n")
    for w in getattr(result, "warnings", []) if warnings else []:
        sys.stderr.write(f"rank1: warning: {w}\n")


def stderr_progress(enabled: bool, description: str):
    """A rich progress bar on stderr: returns (context manager, callback(done, total))."""
    import contextlib

    if not enabled or not sys.stderr.isatty():  # a bar only on a terminal: nothing in logs and pipes
        return contextlib.nullcontext(), None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


_signal_state = {"terminated": False, "reported": False}


class interrupt_hint:
    """On Ctrl-C or SIGTERM, say what state the output is in (typer would exit 130 silently):
    `hint` while the output is not in place; once `out` is published, that it is complete."""

    def __init__(self, hint: str, out: str | None = None):
        self.hint = hint
        self.out = out

    def __enter__(self):
        return self

    def _state(self) -> str:
        from ..io.outputs import completed

        if self.out is not None and Path(os.path.realpath(self.out)) in completed:
            return f"the output is complete at {self.out}"
        return self.hint

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ray may turn our Terminated into a plain KeyboardInterrupt on its way out of a wait
            terminated = issubclass(exc_type, Terminated) or _signal_state["terminated"]
            what = "terminated" if terminated else "interrupted"
            sys.stderr.write(f"rank1: {what}: {self._state()}\n")
            _signal_state["reported"] = True
            raise typer.Exit(Terminated.exit_code if what == "terminated" else 130)
        return False


def _on_sigterm(signum, frame) -> None:
    _signal_state["terminated"] = True
    raise Terminated()


def _state_line(what: str) -> str:
    """`rank1: terminated|interrupted`, with the outputs already complete (a signal after publishing)."""
    from ..io.outputs import completed

    done = ", ".join(completed.values())
    return f"rank1: {what}: the output is complete at {done}\n" if done else f"rank1: {what}\n"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main() -> None:
    import signal

    import rank1tools

    from ..engine.executor_options import without_executor_args
    from ..io import outputs

    rank1tools.COMMAND_LINE = ["rank1", *without_executor_args(sys.argv[1:])]
    outputs.completed.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # clean up as for Ctrl-C, then exit 143
    _signal_state.update(terminated=False, reported=False)
    try:
        code = app(standalone_mode=False, prog_name="rank1")
        code = code if isinstance(code, int) else 0
        if code in (130, Terminated.exit_code) or _signal_state["terminated"]:  # typer swallows the interrupt
            code = Terminated.exit_code if _signal_state["terminated"] else 130
            if not _signal_state["reported"]:
                sys.stderr.write(_state_line("terminated" if code == Terminated.exit_code else "interrupted"))
        sys.exit(code)
    except Rank1Error as e:
        sys.stderr.write(f"rank1: error: {_one_line(e)}\n")
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # click's usage errors: one line, not click's three
        if any(c.__name__ == "NoArgsIsHelpError" for c in type(e).__mro__):
            e.show()
        else:
            ctx = getattr(e, "ctx", None)
            cmd = f"{ctx.command_path}: " if ctx is not None and ctx.parent else ""
            message = e.format_message()
            if type(e).__name__ == "NoSuchOption" and ctx is not None:  # click's own hint offered --help for --steps
                hint = suggest_options(e.option_name, ctx.command)
                message = f"No such option: {e.option_name}" + (f" (did you mean {' or '.join(hint)}?)" if hint else "")
            sys.stderr.write(f"rank1: error: {cmd}{_one_line(message)} (see --help)\n")
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt as e:
        sys.stderr.write(_state_line("terminated" if isinstance(e, Terminated) else "interrupted"))
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
        sys.stderr.write(
            f"rank1: internal error: {type(e).__name__}: {_one_line(e)} (set RANK1_DEBUG=1 for a traceback)\n"
        )
        sys.exit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        rank1tools.COMMAND_LINE = None  # later library calls in this process have no command line


def exit_on_gate(gate: dict | None, out: str) -> None:
    """--fail-below (--fail-above): everything was written; exit 5 with one line when the figure is
    below (above) the bar."""
    from ..commands.gate import GATE_EXIT_CODE

    if gate is not None and not gate["passed"]:
        relation, option = gate.get("relation", "is below"), gate.get("option", "--fail-below")
        sys.stderr.write(
            f"rank1: gate: {gate['figure']} {gate['value']} {relation} {option} {gate['threshold']} "
            f"(outputs written to {out})\n"
        )
        raise typer.Exit(GATE_EXIT_CODE)
