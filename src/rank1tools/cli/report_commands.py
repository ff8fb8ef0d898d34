"""`rank1 report`: one self-contained HTML page of a run's analysis (docs/commands/report.md)."""

from __future__ import annotations

import sys

import typer

from .app import Rank1Command, app, interrupt_hint, print_json, print_result_notes
from .params import FORCE_OPT, JSON_OPT, QUIET_OPT, out_option


@app.command(cls=Rank1Command)
def report(
    folders: list[str] = typer.Argument(
        ...,
        metavar="DIR...",
        help="Outputs rank1 wrote: decompose, fit-pls, linearity, extrapolate, reconstruct, backtest, logprobs, demo.",
    ),
    out: str = out_option("The HTML file to write (e.g. report.html)."),
    force: bool = FORCE_OPT,
    as_json: bool = JSON_OPT,
    quiet: bool = QUIET_OPT,
) -> None:
    """One self-contained HTML page of the outputs: the verdict, the run, spectra, fits, linearity,
    extrapolations, backtests, log-probs and a demo's accuracy, with the figures inline."""
    from ..io.output_file import check_output_file, html_written_by_rank1

    check_output_file(out, force=force, written_by=html_written_by_rank1, inside_outputs=True)
    from ..commands.report import report as run_report

    with interrupt_hint("nothing was written", out):
        result = run_report(folders, out, force=force)
    print_result_notes(result)
    if as_json:
        print_json(result.to_dict())
        return
    if not quiet:
        sys.stderr.write(f"rank1 report: {len(result.inputs)} outputs read; sections: {', '.join(result.sections)}\n")
    sys.stdout.write(
        f"wrote {result.out} ({len(result.verdict)} verdict lines, {len(result.sections)} sections, "
        f"{result.figures} figures)\n"
    )
