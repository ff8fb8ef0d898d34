"""`rank1 report`: one self-contained HTML page of a run's analysis (docs/commands/report.md).

Reads the outputs rank1 wrote (recognised by their provenance or manifest: inputs.py), and writes
one file: the verdict first (verdict.py), then the run and a section per kind of input present, in
a fixed order (sections_*.py), with the commands' own figures inline as SVG (figures.py) and no
script, stylesheet or image outside the file (html.py). The file is written as every rank1 output
is (io/output_file.staged_file): staged beside the target and renamed into place, replacing only a
page rank1 wrote, and only with --force. The same inputs give the same bytes: nothing in the page
comes from the clock or the machine, only from the inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ...io.output_file import html_written_by_rank1, staged_file
from ...io.outputs import output_errors
from .figures import MISSING, FigureMaker
from .html import Html, Section, page, paragraph
from .inputs import Input, recognise_all
from .sections_outputs import (
    backtests_section,
    demo_section,
    extrapolations_section,
    logprobs_section,
    reconstructions_section,
)
from .sections_weights import fits_section, linearity_section, run_section, spectra_section
from .verdict import Statement, verdict

__all__ = ["ReportResult", "build_page", "report"]


@dataclass
class ReportResult:
    out: str
    inputs: list[dict]
    sections: list[str]
    verdict: list[str]
    figures: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "inputs": self.inputs,
            "sections": self.sections,
            "verdict": self.verdict,
            "figures": self.figures,
            "notes": self.notes,
        }


def _verdict_section(statements: list[Statement]) -> Section:
    sec = Section("verdict", "Verdict", "what the figures say; each number is a value of the file named under it")
    if statements:
        sec.add(Html("<ul>" + "".join(s.html() for s in statements) + "</ul>"))
    else:
        sec.add(
            paragraph(
                "The inputs hold no figure the verdict reads (spectra, linearity, fits, extrapolations, backtests)."
            )
        )
    return sec


def _of(inputs: list[Input], kind: str) -> list[Input]:
    return [i for i in inputs if i.kind == kind]


def build_page(inputs: list[Input], names: list[str]) -> tuple[str, list[Section], list[Statement], FigureMaker]:
    """The page's text, its sections, the verdict's statements and the figure maker (its count)."""
    figs = FigureMaker()
    statements = verdict(inputs)
    sections = [_verdict_section(statements), run_section(inputs)]
    if _of(inputs, "decompose"):
        sections.append(spectra_section(_of(inputs, "decompose"), figs))
    if _of(inputs, "fit-pls"):
        sections.append(fits_section(_of(inputs, "fit-pls"), figs))
    if _of(inputs, "linearity"):
        sections.append(linearity_section(_of(inputs, "linearity"), figs))
    if _of(inputs, "extrapolate"):
        sections.append(extrapolations_section(_of(inputs, "extrapolate")))
    if _of(inputs, "reconstruct"):
        sections.append(reconstructions_section(_of(inputs, "reconstruct")))
    if _of(inputs, "backtest"):
        sections.append(backtests_section(_of(inputs, "backtest"), figs))
    if _of(inputs, "logprobs"):
        sections.append(logprobs_section(_of(inputs, "logprobs")))
    for demo in _of(inputs, "demo"):
        if (demo.path / "results.json").is_file():
            sections.append(demo_section(demo, figs))
    if not figs.available:
        sections[0].add(paragraph(f"The figures are not drawn: {MISSING}.", "warn"))
    title = "rank1 report: " + ", ".join(dict.fromkeys(os.path.basename(os.path.normpath(n)) or n for n in names))
    steps = next((s.subtitle for s in sections if s.id == "run" and s.subtitle), "")
    subtitle = f"{len(inputs)} rank1 outputs" + (f"; {steps}" if steps else "")
    footer = "Written by rank1 report from the outputs listed under The run; self-contained: no script, no network."
    return page(title, subtitle, sections, footer), sections, statements, figs


def report(inputs: list[str], out: str, *, force: bool = False) -> ReportResult:
    """Recognise `inputs`, build the page and write it to `out` (staged, then renamed into place)."""
    found = recognise_all(inputs)
    text, sections, statements, figs = build_page(found, inputs)
    data = text.encode("utf-8")
    # the page may lie inside an input folder (demo-out/report.html): it is one new file there,
    # written after every input was read, and never read back as an input
    with staged_file(out, force=force, label=out, written_by=html_written_by_rank1, inside_outputs=True) as staging:
        with output_errors(staging):
            with open(staging, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    notes = [] if figs.available else [f"no figures: {MISSING}"]
    return ReportResult(
        out=out,
        inputs=[{"path": i.label, "kind": i.kind} for i in found],
        sections=[s.id for s in sections],
        verdict=[s.text() for s in statements],
        figures=figs.count,
        notes=notes,
    )
