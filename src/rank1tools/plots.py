"""Figures for `rank1 decompose`, `rank1 fit-pls` and `rank1 linearity` (docs/formats.md, "Plots").

matplotlib is optional (the `plot` extra) and imported only inside the functions here, with the Agg
backend, so nothing ever opens a window. Every figure is written as PNG and SVG with the metadata
that would change from run to run (software version, date, random SVG ids) left out, so the same
rows give byte-identical files.

What every figure shows, so that it reads on its own: the steps it covers in its title; the value
of every heatmap cell printed in the cell (grids of up to plot_common.ANNOTATE_MAX_LAYERS layers; larger grids
of a 0..1 figure get a colour scale fit to their data instead); PLS scores oriented so that the
metric (or the step) rises with them, since a PLS score's sign is arbitrary; fit points coloured by
their step.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import plot_common as common
from .plot_common import INSTALL_HINT, PlotsUnavailable, plots_available, steps_label

__all__ = [
    "INSTALL_HINT",
    "PlotsUnavailable",
    "decompose_plots",
    "demo_accuracy_plot",
    "fit_plots",
    "linearity_plots",
    "oriented",
    "plots_available",
    "steps_label",
]

_R2_KINDS = [("r2", "in-sample R²"), ("loo_r2", "leave-one-out R²"), ("r2_step", "R² vs step")]


# ---------------------------------------------------------------------------------------------
# decompose


def decompose_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Figures from the spectrum rows of `rank1 decompose` (module, layer, type, step, energy_1,
    norm_frac_1, ...): energy_by_type (mean energy_1 and norm_frac_1 per module type over the steps)
    and energy_heatmap (energy_1 per layer and type at the last step; rows without a layer, such as
    embedding and lm_head, are left out). Returns the files written, PNG then SVG per figure; a
    figure with no data to show is not written."""
    matplotlib, plt = common.pyplot()
    out_dir = Path(out_dir)
    written: list[Path] = []
    if not rows:
        return written
    with matplotlib.rc_context(common.RC):
        # (1) energy_1 / norm_frac_1 over steps, one line per type
        types = sorted({str(r["type"]) for r in rows}, key=common.type_key)
        steps = sorted({r["step"] for r in rows})
        span = steps_label(steps)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        try:
            for ax, key, label in (
                (axes[0], "energy_1", "energy₁ = σ₁² / ‖ΔW‖²"),
                (axes[1], "norm_frac_1", "norm fraction = σ₁ / ‖ΔW‖"),
            ):
                for t in types:
                    ys = [
                        common.nanmean([common.num(r.get(key)) for r in rows if str(r["type"]) == t and r["step"] == s])
                        for s in steps
                    ]
                    ax.plot(steps, ys, marker="o", markersize=3, linewidth=1.3, label=t)
                ax.set_title(f"{key} by module type (mean over layers), {span}")
                ax.set_xlabel("step")
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
            axes[1].legend(
                title="type", fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=2 if len(types) > 12 else 1
            )
            fig.tight_layout()
            written += common.save(fig, out_dir, "energy_by_type")
        finally:
            plt.close(fig)

        # (2) layer x type heatmap of energy_1 at the last step
        last = steps[-1]
        layers, htypes, mat = common.grid(rows, "energy_1", step=last)
        if layers:
            fig, ax = plt.subplots(
                figsize=(max(4.5, 0.6 * len(htypes) + 2.5), min(10, max(3.5, 0.25 * len(layers) + 2)))
            )
            try:
                vmin, vmax, bar = 0.0, 1.0, "energy₁"
                if len(layers) > common.ANNOTATE_MAX_LAYERS:  # no room for the values: a scale fit to the data
                    vmin, vmax = common.data_range([mat], vmin, vmax)
                    bar = "energy₁ (scale fit to the data)"
                im = common.heatmap(ax, plt, layers, htypes, mat, "viridis", vmin, vmax)
                ax.set_title(f"energy₁ at step {last} (run: {span})")
                fig.colorbar(im, ax=ax, label=bar)
                fig.tight_layout()
                written += common.save(fig, out_dir, "energy_heatmap")
            finally:
                plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# fit-pls


def _present(rows: list[dict], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def _ranked(rows: list[dict], trajectories: dict, n: int = 5) -> tuple[str, list[dict], list[dict]]:
    """The ranking key and the n most / n least linear modules (finite key, with a trajectory)."""
    key = "loo_r2" if any(not math.isnan(common.num(r.get("loo_r2"))) for r in rows) else "r2_step"
    cands = [r for r in rows if r["module"] in trajectories and not math.isnan(common.num(r.get(key)))]
    cands.sort(key=lambda r: (-common.num(r.get(key)), str(r["module"])))
    top = cands[:n]
    bottom = cands[max(n, len(cands) - n) :][::-1]
    return key, top, bottom


def oriented(scores: list, line) -> tuple[list[float], tuple[float, float] | None]:
    """The scores and their line y ≈ a + b·score, flipped when b < 0 so that y rises with the
    score. A PLS score's sign is arbitrary (the fit is the same with −score and −b); the plots show
    every module the same way round. The fit store keeps the fit's own sign (docs/formats.md)."""
    scores = [common.num(x) for x in scores]
    if line is None:
        return scores, None
    a, b = common.num(line[0]), common.num(line[1])
    if b < 0:
        return [-x for x in scores], (a, -b)
    return scores, (a, b)


def _fit_panel(ax, xs, ys, line, xlabel, ylabel, title, steps, norm):
    """y against the (oriented) score, points coloured by their step, the fitted line in red."""
    pts = [(x, y, s) for x, y, s in zip(xs, ys, steps) if not (math.isnan(common.num(x)) or math.isnan(common.num(y)))]
    if pts:
        ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            c=[p[2] for p in pts],
            cmap="viridis",
            norm=norm,
            s=18,
            zorder=3,
            edgecolors="black",
            linewidths=0.3,
        )
    if line is not None and pts:
        a, b = common.num(line[0]), common.num(line[1])
        lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
        if not (math.isnan(a) or math.isnan(b)):
            ax.plot([lo, hi], [a + b * lo, a + b * hi], color="C3", linewidth=1.2)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def _short(name: str, width: int = 34) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _label(row: dict) -> str:
    """Short panel label: layer and type when the module has a layer, else the (shortened) name."""
    if row.get("layer") is not None:
        return f"layer {row['layer']} {row.get('type')}"
    return _short(str(row["module"]), 24)


def fit_plots(
    rows: list[dict], trajectories: dict[str, dict], out_dir: Path, metric_name: str | None, steps=None
) -> list[Path]:
    """Figures for `rank1 fit-pls`. rows: one dict per module with module, layer, type, r2, loo_r2,
    r2_step (NaN allowed; r2 and loo_r2 None without a metric). trajectories[module]: steps,
    scores, metric (or None), score_line (a, b) with metric ≈ a + b·score; step_scores (the scores
    of the fit against the step; default: scores) and step_line (a, b) with step ≈ a + b·step_score.

    r2_heatmap: one layer × type panel per R² kind present, on a shared diverging scale clipped to
    [-1, 1], each cell's (unclipped) value printed in it. linear_modules: the 5 most and 5 least
    linear modules (by loo_r2 when there is one, else r2_step), the metric (when given) and the step
    against the PLS score oriented so that they rise with it, points coloured by step, with the
    fitted lines. Titles name the steps (`steps`, default: the trajectories'). Returns the files
    written, PNG then SVG per figure; a figure with no data is not written."""
    matplotlib, plt = common.pyplot()
    out_dir = Path(out_dir)
    written: list[Path] = []
    mname = metric_name or "metric"
    if steps is None:
        steps = [s for tr in trajectories.values() for s in (tr.get("steps") or [])]
    span = steps_label(steps)
    with matplotlib.rc_context(common.RC):
        # (1) R² heatmaps
        kinds = [(k, label) for k, label in _R2_KINDS if _present(rows, k)]
        grids = [(label, *common.grid(rows, k)) for k, label in kinds]
        grids = [g for g in grids if g[1]]
        clipped = [
            (label, layers, types, [[v if math.isnan(v) else min(1.0, max(-1.0, v)) for v in row] for row in mat])
            for label, layers, types, mat in grids
        ]
        written += common.heatmap_panels(
            plt,
            clipped,
            "RdBu",
            -1.0,
            1.0,
            "R² (colour clipped to [-1, 1])",
            f"PLS fit per module, {span} (grey: no value)",
            out_dir,
            "r2_heatmap",
            labels=[g[3] for g in grids],
        )

        # (2) small multiples of the most / least linear modules
        key, top, bottom = _ranked(rows, trajectories)
        groups = [("most linear", top), ("least linear", bottom)]
        groups = [(g, sel) for g, sel in groups if sel]
        if groups:
            has_metric = any(trajectories[r["module"]].get("metric") is not None for _, sel in groups for r in sel)
            panels = ["metric", "step"] if has_metric else ["step"]
            ncols = max(len(sel) for _, sel in groups)
            nrows = len(groups) * len(panels)
            all_steps = [s for _, sel in groups for r in sel for s in (trajectories[r["module"]].get("steps") or [])]
            norm = matplotlib.colors.Normalize(min(all_steps, default=0), max(all_steps, default=1))
            fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols + 1.2, 2.3 * nrows + 0.6), squeeze=False)
            try:
                for gi, (gname, sel) in enumerate(groups):
                    for pi, panel in enumerate(panels):
                        row = gi * len(panels) + pi
                        for ci in range(ncols):
                            ax = axes[row][ci]
                            if ci >= len(sel):
                                ax.set_visible(False)
                                continue
                            r = sel[ci]
                            tr = trajectories[r["module"]]
                            steps = list(tr.get("steps") or [])
                            scores = list(tr.get("scores") or [])
                            title = f"{gname} #{ci + 1}: {_label(r)}\n{key} = {common.num(r.get(key)):.3f}"
                            if panel == "metric":
                                metric = tr.get("metric")
                                xs, line = oriented(scores, tr.get("score_line"))
                                _fit_panel(
                                    ax,
                                    xs,
                                    list(metric) if metric is not None else [],
                                    line,
                                    "PLS score",
                                    mname,
                                    title,
                                    steps,
                                    norm,
                                )
                            else:
                                xs, line = oriented(tr.get("step_scores") or scores, tr.get("step_line"))
                                _fit_panel(ax, xs, steps, line, "PLS score (step fit)", "step", title, steps, norm)
                fig.suptitle(
                    f"Most and least linear modules, {span} (ranked by {key}); red: fitted line; "
                    f"scores oriented so that {mname if has_metric else 'the step'} rises with them"
                )
                fig.tight_layout(rect=(0, 0, 0.93, 1))
                bar = fig.add_axes((0.945, 0.15, 0.012, 0.7))
                fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis"), cax=bar, label="step")
                written += common.save(fig, out_dir, "linear_modules")
            finally:
                plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# linearity

_FRAC_KEY = "frac_r2_above_0.7"


def _weighted_frac(rows: list[dict]) -> float:
    """Element-weighted share of changing elements with R² > 0.7 (counts scaled to numel)."""
    above = changing = 0.0
    for r in rows:
        elements = common.num(r.get("elements"))
        if not elements or math.isnan(elements):
            continue
        scale = common.num(r.get("numel")) / elements
        above += common.num(r.get("linear")) * scale
        changing += common.num(r.get("changing")) * scale
    return above / changing if changing else math.nan


def linearity_plots(rows: list[dict], out_dir: Path, steps: list[int] | None = None) -> list[Path]:
    """Figures for `rank1 linearity`. rows: one dict per tensor with tensor, layer, type, numel,
    explained_1, frac_r2_above_0.7, elements, changing, linear (None / NaN allowed).

    linear_fraction_by_type: per module type, the element-weighted share of changing elements with
    per-element R² > 0.7 (bars), each tensor's own share (dots) and the all-tensor figure (dashed).
    linearity_heatmap: layer × type panels of explained_1 (trajectory rank-1 explained variance) and
    of frac_r2_above_0.7 (mean over the tensors of a cell), values printed in the cells; tensors
    without a layer are left out. element_r2_heatmap (rows with r2_mean, `linearity --r2-stats`):
    the same layout of r2_mean and r2_median, the mean and median per-element R² of the kept
    elements (RLVR linearity's heatmap; a cell holding two tensors, e.g. a block's two norms,
    shows the mean of their figures). `steps`: the window, named in the titles. Returns the files
    written, PNG then SVG per figure; a figure with no data is not written."""
    matplotlib, plt = common.pyplot()
    out_dir = Path(out_dir)
    written: list[Path] = []
    if not rows:
        return written
    span = steps_label(steps or [])
    with matplotlib.rc_context(common.RC):
        types = sorted({str(r["type"]) for r in rows}, key=common.type_key)
        fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(types) + 2.0), 4))
        try:
            xs = list(range(len(types)))
            ax.bar(
                xs,
                [_weighted_frac([r for r in rows if str(r["type"]) == t]) for t in types],
                color="C0",
                alpha=0.6,
                label="element-weighted",
            )
            for x, t in zip(xs, types):
                vals = sorted(
                    v for r in rows if str(r["type"]) == t and not math.isnan(v := common.num(r.get(_FRAC_KEY)))
                )
                ax.scatter(
                    [x] * len(vals), vals, s=10, color="C1", zorder=3, label="per tensor" if x == xs[0] else None
                )
            overall = _weighted_frac(rows)
            if not math.isnan(overall):
                ax.axhline(overall, color="C3", linestyle="--", linewidth=1.2, label=f"all tensors {overall:.1%}")
            ax.set_xticks(xs, types, rotation=45 if len(types) > 6 else 0)
            ax.set_ylim(0.0, 1.05)
            ax.set_xlabel("type")
            ax.set_ylabel("share of changing elements with R² > 0.7")
            ax.set_title(f"Per-element linearity over {span} (static elements left out)")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
            fig.tight_layout()
            written += common.save(fig, out_dir, "linear_fraction_by_type")
        finally:
            plt.close(fig)

        grids = [
            (label, *common.grid(rows, key))
            for key, label in (
                ("explained_1", "trajectory rank-1 explained variance"),
                (_FRAC_KEY, "share with R² > 0.7"),
            )
        ]
        written += common.heatmap_panels(
            plt,
            [g for g in grids if g[1]],
            "viridis",
            0.0,
            1.0,
            None,
            f"Linearity per layer and type, {span} (grey: no value)",
            out_dir,
            "linearity_heatmap",
            fit_scale=True,
        )
        if any("r2_mean" in r for r in rows):  # --r2-stats: the RLVR-linearity reference's heatmap
            grids = [
                (label, *common.grid(rows, key))
                for key, label in (("r2_mean", "mean per-element R²"), ("r2_median", "median per-element R²"))
            ]
            written += common.heatmap_panels(
                plt,
                [g for g in grids if g[1]],
                "Blues",
                0.0,
                1.0,
                "R² of the kept elements",
                f"Per-element R² per layer and type, {span} (grey: no value)",
                out_dir,
                "element_r2_heatmap",
            )
    return written


def demo_accuracy_plot(
    curve: dict[int, float], cut: int, points: list[tuple[str, int, float]], out_dir: Path
) -> list[Path]:
    """accuracy (`rank1 demo`): the run's held-out accuracy by step (line), the cut of the
    extrapolations' history (dotted), and each synthesized model (name, step, accuracy) as a marker
    at the step it stands for. Returns the PNG and SVG written."""
    matplotlib, plt = common.pyplot()
    with matplotlib.rc_context(common.RC):
        fig, ax = plt.subplots(figsize=(7, 4))
        try:
            steps = sorted(curve)
            ax.plot(steps, [curve[s] for s in steps], marker="o", color="black", label="run checkpoints")
            ax.axvline(cut, color="grey", linestyle=":", label=f"history ends (step {cut})")
            for (name, step, acc), marker in zip(points, "sDv^P*X"):
                ax.scatter([step], [acc], marker=marker, s=70, zorder=3, label=f"{name}: {acc:.1%}")
            ax.set_xlabel("GRPO step")
            ax.set_ylabel("held-out exact-match accuracy")
            ax.set_title(f"rank1 demo, {steps_label(steps)}: accuracy of the run\nand of the synthesized checkpoints")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
            fig.tight_layout()
            return common.save(fig, Path(out_dir), "accuracy")
        finally:
            plt.close(fig)
