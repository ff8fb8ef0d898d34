"""Figures for `rank1 decompose`, `rank1 fit-pls` and `rank1 linearity` (docs/formats.md, "Plots").

matplotlib is optional (the `plot` extra) and imported only inside the functions here, with the Agg
backend, so nothing ever opens a window. Every figure is written as PNG and SVG with the metadata
that would change from run to run (software version, date, random SVG ids) left out, so the same
rows give byte-identical files.
"""

from __future__ import annotations

import math
from pathlib import Path

INSTALL_HINT = "pip install 'rank1tools[plot]'"

# Same order as the spectrum summary (commands/spectrum_tables.py); unknown types go last, by name.
_TYPE_ORDER = ["q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "norm", "bias", "embedding", "lm_head", "other"]
_R2_KINDS = [("r2", "in-sample R²"), ("loo_r2", "leave-one-out R²"), ("r2_step", "R² vs step")]
_DPI = 100
_RC = {"svg.hashsalt": "rank1tools", "svg.fonttype": "path", "font.size": 9, "axes.titlesize": 10}


class PlotsUnavailable(Exception):
    """matplotlib is not installed."""

    def __init__(self, message: str | None = None):
        super().__init__(message or f"plots need matplotlib: {INSTALL_HINT}")


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotsUnavailable() from e
    return matplotlib, plt


# ---------------------------------------------------------------------------------------------
# helpers


def _num(v) -> float:
    """A float, NaN for None / non-numbers."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _nanmean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _type_key(t) -> tuple:
    t = str(t)
    return (_TYPE_ORDER.index(t) if t in _TYPE_ORDER else len(_TYPE_ORDER), t)


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{stem}.png", out_dir / f"{stem}.svg"
    fig.savefig(png, format="png", dpi=_DPI, metadata={"Software": None})
    fig.savefig(svg, format="svg", metadata={"Date": None})
    return [png, svg]


def _grid(rows: list[dict], key: str, step=None):
    """(layers, types, matrix) of the mean of `key` per (layer, type); rows without a layer are left
    out. With `step`, only the rows of that step count. Missing cells are NaN."""
    cells: dict = {}
    for r in rows:
        if r.get("layer") is None or (step is not None and r.get("step") != step):
            continue
        cells.setdefault((int(r["layer"]), str(r["type"])), []).append(_num(r.get(key)))
    layers = sorted({l for l, _ in cells})
    types = sorted({t for _, t in cells}, key=_type_key)
    mat = [[_nanmean(cells.get((l, t), [])) for t in types] for l in layers]
    return layers, types, mat


def _heatmap_panels(plt, grids, cmap, vmin, vmax, bar_label, title, out_dir, name) -> list[Path]:
    """One figure of layer × type heatmaps side by side (grids: (title, layers, types, matrix)),
    one colour scale; nothing when there is no grid."""
    if not grids:
        return []
    n_types = max(len(g[2]) for g in grids)
    n_layers = max(len(g[1]) for g in grids)
    w = max(3.2, 0.45 * n_types + 1.6)
    fig, axes = plt.subplots(1, len(grids), figsize=(w * len(grids) + 1.0, min(10, max(3.5, 0.25 * n_layers + 2))),
                             squeeze=False, layout="constrained")
    try:
        im = None
        for ax, (label, layers, types, mat) in zip(axes[0], grids):
            im = _heatmap(ax, plt, layers, types, mat, cmap, vmin, vmax)
            ax.set_title(label)
        fig.suptitle(title)
        fig.colorbar(im, ax=list(axes[0]), label=bar_label or "", fraction=0.05 if len(grids) > 1 else 0.08, pad=0.02)
        return _save(fig, out_dir, name)
    finally:
        plt.close(fig)


def _heatmap(ax, plt, layers, types, mat, cmap, vmin, vmax):
    import numpy as np

    arr = np.ma.masked_invalid(np.array(mat, dtype=float).reshape(len(layers), len(types)))
    cm = plt.get_cmap(cmap).with_extremes(bad="#d9d9d9")
    im = ax.imshow(arr, aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest", origin="lower")
    ax.set_xticks(range(len(types)), types, rotation=45 if len(types) > 6 else 0)
    step = max(1, math.ceil(len(layers) / 16))
    ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    return im


# ---------------------------------------------------------------------------------------------
# decompose


def decompose_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Figures from the spectrum rows of `rank1 decompose` (module, layer, type, step, energy_1,
    norm_frac_1, ...): energy_by_type (mean energy_1 and norm_frac_1 per module type over the steps)
    and energy_heatmap (energy_1 per layer and type at the last step; rows without a layer, such as
    embedding and lm_head, are left out). Returns the files written, PNG then SVG per figure; a
    figure with no data to show is not written."""
    matplotlib, plt = _pyplot()
    out_dir = Path(out_dir)
    written: list[Path] = []
    if not rows:
        return written
    with matplotlib.rc_context(_RC):
        # (1) energy_1 / norm_frac_1 over steps, one line per type
        types = sorted({str(r["type"]) for r in rows}, key=_type_key)
        steps = sorted({r["step"] for r in rows})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        try:
            for ax, key, label in ((axes[0], "energy_1", "energy₁ = σ₁² / ‖ΔW‖²"),
                                   (axes[1], "norm_frac_1", "norm fraction = σ₁ / ‖ΔW‖")):
                for t in types:
                    ys = [_nanmean([_num(r.get(key)) for r in rows if str(r["type"]) == t and r["step"] == s])
                          for s in steps]
                    ax.plot(steps, ys, marker="o", markersize=3, linewidth=1.3, label=t)
                ax.set_title(f"{key} by module type (mean over layers)")
                ax.set_xlabel("step")
                ax.set_ylabel(label)
                ax.grid(True, alpha=0.3)
            axes[1].legend(title="type", fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                           ncol=2 if len(types) > 12 else 1)
            fig.tight_layout()
            written += _save(fig, out_dir, "energy_by_type")
        finally:
            plt.close(fig)

        # (2) layer x type heatmap of energy_1 at the last step
        last = steps[-1]
        layers, htypes, mat = _grid(rows, "energy_1", step=last)
        if layers:
            fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(htypes) + 2.5), min(10, max(3.5, 0.25 * len(layers) + 2))))
            try:
                im = _heatmap(ax, plt, layers, htypes, mat, "viridis", 0.0, 1.0)
                ax.set_title(f"energy₁ at step {last}")
                fig.colorbar(im, ax=ax, label="energy₁")
                fig.tight_layout()
                written += _save(fig, out_dir, "energy_heatmap")
            finally:
                plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# fit-pls


def _present(rows: list[dict], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def _ranked(rows: list[dict], trajectories: dict, n: int = 5) -> tuple[str, list[dict], list[dict]]:
    """The ranking key and the n most / n least linear modules (finite key, with a trajectory)."""
    key = "loo_r2" if any(not math.isnan(_num(r.get("loo_r2"))) for r in rows) else "r2_step"
    cands = [r for r in rows if r["module"] in trajectories and not math.isnan(_num(r.get(key)))]
    cands.sort(key=lambda r: (-_num(r.get(key)), str(r["module"])))
    top = cands[:n]
    bottom = cands[max(n, len(cands) - n):][::-1]
    return key, top, bottom


def _fit_panel(ax, xs, ys, line, xlabel, ylabel, title):
    pts = [(x, y) for x, y in zip(xs, ys) if not (math.isnan(_num(x)) or math.isnan(_num(y)))]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, zorder=3)
    if line is not None and pts:
        a, b = _num(line[0]), _num(line[1])
        lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
        if not (math.isnan(a) or math.isnan(b)):
            ax.plot([lo, hi], [a + b * lo, a + b * hi], color="C3", linewidth=1.2)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def _short(name: str, width: int = 34) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _label(row: dict) -> str:
    """Short panel label: layer and type when the module has a layer, else the (shortened) name."""
    if row.get("layer") is not None:
        return f"layer {row['layer']} {row.get('type')}"
    return _short(str(row["module"]), 24)


def fit_plots(rows: list[dict], trajectories: dict[str, dict], out_dir: Path,
              metric_name: str | None) -> list[Path]:
    """Figures for `rank1 fit-pls`. rows: one dict per module with module, layer, type, r2, loo_r2,
    r2_step (NaN allowed; r2 and loo_r2 None without a metric). trajectories[module]: steps,
    scores, metric (or None), score_line (a, b) with metric ≈ a + b·score; step_scores (the scores
    of the fit against the step; default: scores) and step_line (a, b) with step ≈ a + b·step_score.

    r2_heatmap: one layer × type panel per R² kind present, on a shared diverging scale clipped to
    [-1, 1]. linear_modules: the 5 most and 5 least linear modules (by loo_r2 when there is one,
    else r2_step), the metric (when given) and the step against the PLS score, with the fitted
    lines. Returns the files written, PNG then SVG per figure; a figure with no data is not written."""
    matplotlib, plt = _pyplot()
    out_dir = Path(out_dir)
    written: list[Path] = []
    mname = metric_name or "metric"
    with matplotlib.rc_context(_RC):
        # (1) R² heatmaps
        kinds = [(k, label) for k, label in _R2_KINDS if _present(rows, k)]
        grids = [(label, *_grid(rows, k)) for k, label in kinds]
        grids = [(label, layers, types, [[v if math.isnan(v) else min(1.0, max(-1.0, v)) for v in row] for row in mat])
                 for label, layers, types, mat in grids if layers]
        written += _heatmap_panels(plt, grids, "RdBu", -1.0, 1.0, "R²",
                                   "PLS fit per module (R² clipped to [-1, 1]; grey: no value)", out_dir, "r2_heatmap")

        # (2) small multiples of the most / least linear modules
        key, top, bottom = _ranked(rows, trajectories)
        groups = [("most linear", top), ("least linear", bottom)]
        groups = [(g, sel) for g, sel in groups if sel]
        if groups:
            has_metric = any(trajectories[r["module"]].get("metric") is not None for _, sel in groups for r in sel)
            panels = ["metric", "step"] if has_metric else ["step"]
            ncols = max(len(sel) for _, sel in groups)
            nrows = len(groups) * len(panels)
            fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols + 0.4, 2.3 * nrows + 0.6), squeeze=False)
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
                            scores = list(tr.get("scores") or [])
                            title = f"{gname} #{ci + 1}: {_label(r)}\n{key} = {_num(r.get(key)):.3f}"
                            if panel == "metric":
                                metric = tr.get("metric")
                                _fit_panel(ax, scores, list(metric) if metric is not None else [],
                                           tr.get("score_line"), "PLS score", mname, title)
                            else:
                                step_scores = list(tr.get("step_scores") or scores)  # the step fit's own scores
                                _fit_panel(ax, step_scores, list(tr.get("steps") or []), tr.get("step_line"),
                                           "PLS score (step fit)", "step", title)
                fig.suptitle(f"Most and least linear modules (ranked by {key}); red: fitted line")
                fig.tight_layout()
                written += _save(fig, out_dir, "linear_modules")
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
        elements = _num(r.get("elements"))
        if not elements or math.isnan(elements):
            continue
        scale = _num(r.get("numel")) / elements
        above += _num(r.get("linear")) * scale
        changing += _num(r.get("changing")) * scale
    return above / changing if changing else math.nan


def linearity_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Figures for `rank1 linearity`. rows: one dict per tensor with tensor, layer, type, numel,
    explained_1, frac_r2_above_0.7, elements, changing, linear (None / NaN allowed).

    linear_fraction_by_type: per module type, the element-weighted share of changing elements with
    per-element R² > 0.7 (bars), each tensor's own share (dots) and the all-tensor figure (dashed).
    linearity_heatmap: layer × type panels of explained_1 (trajectory rank-1 explained variance) and
    of frac_r2_above_0.7 (mean over the tensors of a cell); tensors without a layer are left out.
    Returns the files written, PNG then SVG per figure; a figure with no data is not written."""
    matplotlib, plt = _pyplot()
    out_dir = Path(out_dir)
    written: list[Path] = []
    if not rows:
        return written
    with matplotlib.rc_context(_RC):
        types = sorted({str(r["type"]) for r in rows}, key=_type_key)
        fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(types) + 2.0), 4))
        try:
            xs = list(range(len(types)))
            ax.bar(xs, [_weighted_frac([r for r in rows if str(r["type"]) == t]) for t in types],
                   color="C0", alpha=0.6, label="element-weighted")
            for x, t in zip(xs, types):
                vals = sorted(v for r in rows if str(r["type"]) == t and not math.isnan(v := _num(r.get(_FRAC_KEY))))
                ax.scatter([x] * len(vals), vals, s=10, color="C1", zorder=3,
                           label="per tensor" if x == xs[0] else None)
            overall = _weighted_frac(rows)
            if not math.isnan(overall):
                ax.axhline(overall, color="C3", linestyle="--", linewidth=1.2, label=f"all tensors {overall:.1%}")
            ax.set_xticks(xs, types, rotation=45 if len(types) > 6 else 0)
            ax.set_ylim(0.0, 1.05)
            ax.set_xlabel("type")
            ax.set_ylabel("share of changing elements with R² > 0.7")
            ax.set_title("Per-element linearity over the window (static elements left out)")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
            fig.tight_layout()
            written += _save(fig, out_dir, "linear_fraction_by_type")
        finally:
            plt.close(fig)

        grids = [(label, *_grid(rows, key)) for key, label in
                 (("explained_1", "trajectory rank-1 explained variance"), (_FRAC_KEY, "share with R² > 0.7"))]
        written += _heatmap_panels(plt, [g for g in grids if g[1]], "viridis", 0.0, 1.0, None,
                                   "Linearity per layer and type (grey: no value)", out_dir, "linearity_heatmap")
    return written


def demo_accuracy_plot(curve: dict[int, float], cut: int, points: list[tuple[str, int, float]],
                       out_dir: Path) -> list[Path]:
    """accuracy (`rank1 demo`): the run's held-out accuracy by step (line), the cut of the
    extrapolations' history (dotted), and each synthesized model (name, step, accuracy) as a marker
    at the step it stands for. Returns the PNG and SVG written."""
    matplotlib, plt = _pyplot()
    with matplotlib.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(7, 4))
        try:
            steps = sorted(curve)
            ax.plot(steps, [curve[s] for s in steps], marker="o", color="black", label="run checkpoints")
            ax.axvline(cut, color="grey", linestyle=":", label=f"history ends (step {cut})")
            for (name, step, acc), marker in zip(points, "sDv^P*X"):
                ax.scatter([step], [acc], marker=marker, s=70, zorder=3, label=f"{name}: {acc:.1%}")
            ax.set_xlabel("GRPO step")
            ax.set_ylabel("held-out exact-match accuracy")
            ax.set_title("rank1 demo: accuracy of the run and of the synthesized checkpoints")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
            fig.tight_layout()
            return _save(fig, Path(out_dir), "accuracy")
        finally:
            plt.close(fig)
