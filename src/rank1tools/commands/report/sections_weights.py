"""The page's sections about the weights (docs/commands/report.md#sections): the run (base,
checkpoints, sources with revisions, the command lines), spectra (decompose), fits (fit-pls) and
linearity, each from its output's own tables and drawn by the command's own plotting code."""

from __future__ import annotations

import shlex

from ...plot_common import type_key
from ...plots import decompose_plots, fit_plots, linearity_plots
from .figures import UNWRITTEN, FigureMaker
from .html import Section, Table, code, heading, paragraph
from .inputs import Input, number
from .verdict import OVERFIT_GAP


def command_line(provenance: dict) -> str:
    argv = provenance.get("argv")
    if isinstance(argv, list) and argv:
        return shlex.join(str(a) for a in argv)
    return "(called from Python)" if provenance else "(no provenance: written before rank1tools.json existed)"


def _checkpoints(inputs: list[Input]) -> tuple[dict | None, list[dict]]:
    """(base, checkpoints) as the first factor store's manifest records them (source, revision,
    fingerprint, step), else as the first provenance's inputs (source, revision)."""
    for inp in inputs:
        if inp.kind == "decompose" and (inp.path / "manifest.json").is_file():
            manifest = inp.json("manifest.json")
            return manifest.get("base"), [c for c in manifest.get("checkpoints") or [] if isinstance(c, dict)]
    for inp in inputs:
        listed = [i for i in inp.provenance.get("inputs") or [] if isinstance(i, dict)]
        if listed:
            return listed[0], listed[1:]
    return None, []


def _revision(entry: dict) -> str:
    rev = entry.get("revision")
    fp = entry.get("fingerprint")
    if rev:
        return f"revision {rev}"
    if isinstance(fp, dict) and fp.get("sha256"):
        return f"local, content sha256 {str(fp['sha256'])[:12]}…"
    return "local"


def run_section(inputs: list[Input]) -> Section:
    base, checkpoints = _checkpoints(inputs)
    sec = Section("run", "The run")
    if base is not None:
        sec.add(paragraph(f"Base: {base.get('source')} ({_revision(base)})"))
    if checkpoints:
        steps = [c.get("step") for c in checkpoints]
        sec.subtitle = f"{len(checkpoints)} checkpoints" + (
            f", steps {steps[0]}..{steps[-1]}" if all(isinstance(s, int) for s in steps) else ""
        )
        sec.add(
            Table(
                ["step", "checkpoint", "revision"],
                [[c.get("step", "–"), str(c.get("source")), _revision(c)] for c in checkpoints],
                caption="checkpoints (as the first input records them)",
            )
        )
    sec.add(heading("Inputs and the commands that wrote them"))
    sec.add(
        Table(
            ["input", "command", "rank1tools", "command line"],
            [
                [inp.label, inp.kind, str(inp.provenance.get("version", "–")), code(command_line(inp.provenance))]
                for inp in inputs
            ],
            numeric=set(),
        )
    )
    return sec


def _by_type_table(by_type: dict, keys: list[tuple[str, str]], count: str, caption: str) -> Table:
    types = sorted(by_type, key=type_key)
    return Table(
        ["module type", *(label for _, label in keys), count],
        [
            [t, *(number(by_type[t].get(k)) for k, _ in keys), by_type[t].get("n", by_type[t].get("tensors"))]
            for t in types
        ],
        caption=caption,
    )


def spectra_section(inputs: list[Input], figs: FigureMaker) -> Section:
    sec = Section("spectra", "Spectra: how rank-1 is each update", "from rank1 decompose")
    for inp in inputs:
        summary = inp.json("summary.json")
        rows = inp.jsonl("spectrum.jsonl")
        sec.add(heading(inp.label))
        overall = summary.get("overall") or {}
        sec.add(
            paragraph(
                f"{len(rows)} (module, step) rows; mean energy_1 {number(overall.get('energy_1')):.4f}, "
                f"norm_frac_1 {number(overall.get('norm_frac_1')):.4f} (energy_1 = σ₁²/‖ΔW‖², norm_frac_1 = σ₁/‖ΔW‖)."
            )
        )
        for f in figs.draw(
            lambda rows=rows: decompose_plots(rows, UNWRITTEN),
            {
                "energy_by_type": "mean energy_1 and norm_frac_1 over the steps, by module type",
                "energy_heatmap": "energy_1 by layer × module type at the last step",
            },
        ):
            sec.add(f)
        keys = [("energy_1", "energy_1"), ("norm_frac_1", "norm_frac_1")]
        by_step = summary.get("by_step") or {}
        sec.add(
            Table(
                ["step", "energy_1", "norm_frac_1", "modules"],
                [
                    [int(s), number(v.get("energy_1")), number(v.get("norm_frac_1")), v.get("n")]
                    for s, v in by_step.items()
                ],
                caption="mean by step",
            )
        )
        sec.add(_by_type_table(summary.get("by_type") or {}, keys, "rows", "mean by module type"))
    return sec


def fits_section(inputs: list[Input], figs: FigureMaker) -> Section:
    sec = Section("fits", "Fits: does the rank-1 direction predict the metric", "from rank1 fit-pls")
    for inp in inputs:
        summary = inp.json("summary.json")
        rows = inp.jsonl("fits.jsonl")
        manifest = inp.json("manifest.json") if (inp.path / "manifest.json").is_file() else {}
        metric = (manifest.get("metric") or {}).get("name") if isinstance(manifest.get("metric"), dict) else None
        window = manifest.get("window") or []
        sec.add(heading(inp.label))
        sec.add(
            paragraph(
                f"{len(rows)} modules fitted against {('the metric ' + str(metric)) if metric else 'the step'}"
                + (f", steps {window[0]}..{window[-1]}" if window else "")
                + "."
            )
        )
        mean = summary.get("mean") or {}
        r2, loo = number(mean.get("r2")), number(mean.get("loo_r2"))
        if r2 - loo > OVERFIT_GAP:
            sec.add(
                paragraph(
                    f"Overfit: mean in-sample R² {r2:.2f} but leave-one-out R² {loo:.2f}. With far more "
                    "coordinates than checkpoints PLS fits any metric in-sample; do not extrapolate to new "
                    "metric values from this fit.",
                    "warn",
                )
            )
        # the fit store keeps no per-step scores (they need the factor store): the heatmap only,
        # its title naming the window
        for f in figs.draw(
            lambda rows=rows, metric=metric, window=window: fit_plots(rows, {}, UNWRITTEN, metric, steps=window),
            {"r2_heatmap": "R² by layer × module type (in-sample, leave-one-out, against the step)"},
        ):
            sec.add(f)
        kinds = [
            (k, label) for k, label in (("r2", "R²"), ("loo_r2", "LOO R²"), ("r2_step", "R² vs step")) if k in mean
        ]
        sec.add(_by_type_table(summary.get("by_type") or {}, kinds, "modules", "mean R² by module type"))
        key = summary.get("ranked_by", "r2_step")
        for part in ("most_linear", "least_linear"):
            ranked = summary.get(part) or []
            if ranked:
                sec.add(
                    Table(
                        ["module", key],
                        [[str(r.get("module")), number(r.get(key))] for r in ranked],
                        caption=f"{part.replace('_', ' ')} modules (by {key})",
                    )
                )
    return sec


def linearity_section(inputs: list[Input], figs: FigureMaker) -> Section:
    sec = Section("linearity", "Linearity: is the trajectory a line", "from rank1 linearity")
    for inp in inputs:
        summary = inp.json("summary.json")
        rows = inp.jsonl("linearity.jsonl")
        steps = summary.get("steps") or []
        headline = summary.get("headline") or {}
        sec.add(heading(inp.label))
        sec.add(
            paragraph(
                f"{len(rows)} tensors over {len(steps)} checkpoints"
                + (f" (steps {steps[0]}..{steps[-1]})" if steps else "")
                + f". {headline.get('note', '')}"
            )
        )
        captions = {
            "linear_fraction_by_type": "share of changing elements with per-element R² > 0.7, by module type",
            "linearity_heatmap": "trajectory EV (explained_1) and the linear share by layer × module type",
        }
        if any("r2_mean" in r for r in rows):  # linearity --r2-stats
            captions["element_r2_heatmap"] = "per-element R² (mean and median) by layer × module type"
        for f in figs.draw(lambda rows=rows, steps=steps: linearity_plots(rows, UNWRITTEN, steps), captions):
            sec.add(f)
        by_type = summary.get("by_type") or {}
        sec.add(
            _by_type_table(
                by_type,
                [
                    ("mean_explained_1", "trajectory EV"),
                    ("mean_coef_r2_1", "coefficient R²"),
                    ("frac_r2_above_0.7", "share R² > 0.7"),
                    ("static_fraction", "static"),
                ],
                "tensors",
                "by module type (EV and coefficient R²: means over tensors; shares weighted by elements)",
            )
        )
        sec.add(
            Table(
                ["tensor", "type", "trajectory EV", "coefficient R²", "share R² > 0.7"],
                [
                    [
                        str(r.get("tensor")),
                        str(r.get("type")),
                        number(r.get("explained_1")),
                        number(r.get("coef_r2_1")),
                        number(r.get("frac_r2_above_0.7")),
                    ]
                    for r in rows
                ],
                caption="every tensor",
            )
        )
    return sec
