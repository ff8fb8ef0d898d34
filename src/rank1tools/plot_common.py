"""What the figures of rank1tools.plots share: the optional matplotlib import, saving without
run-to-run metadata, module-type order, and layer × type heatmaps with their values in the cells
(docs/formats.md, "Plots")."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = "pip install 'rank1tools[plot]'"

# Same order as the spectrum summary (engine/spectrum_tables.py); unknown types go last, by name.
TYPE_ORDER = [
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "gate",
    "up",
    "gate_up",
    "down",
    "norm",
    "bias",
    "embedding",
    "lm_head",
    "other",
]
DPI = 100
ANNOTATE_MAX_LAYERS = 40  # past this a cell is a few pixels high: no room for its value
RC = {"svg.hashsalt": "rank1tools", "svg.fonttype": "path", "font.size": 9, "axes.titlesize": 10}


class PlotsUnavailable(Exception):
    """matplotlib is not installed."""

    def __init__(self, message: str | None = None):
        super().__init__(message or f"plots need matplotlib: {INSTALL_HINT}")


def draw_plots(draw: Callable[[], Iterable[Path]]) -> tuple[list[str], str | None]:
    """A command's --plots: the files `draw()` writes, or none and the install hint without matplotlib."""
    try:
        return [str(p) for p in draw()], None
    except PlotsUnavailable:
        return [], f"plots need matplotlib: {INSTALL_HINT}"


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotsUnavailable() from e
    return matplotlib, plt


# ---------------------------------------------------------------------------------------------
# helpers


def num(v) -> float:
    """A float, NaN for None / non-numbers."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def nanmean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def steps_label(steps) -> str:
    """`steps 10..50` (the first..last of `steps`), `step 50` for one, `no steps` for none."""
    steps = sorted({int(s) for s in steps if s is not None})
    if not steps:
        return "no steps"
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}..{steps[-1]}"


def type_key(t) -> tuple:
    t = str(t)
    return (TYPE_ORDER.index(t) if t in TYPE_ORDER else len(TYPE_ORDER), t)


_CAPTURES: list[dict[str, str]] = []  # open captured_svg() blocks, innermost last


@contextmanager
def captured_svg():
    """Inside the block, figures are not written: each one's SVG text goes into the yielded dict
    under its stem (`rank1 report` inlines them in its page; docs/commands/report.md#the-page)."""
    figures: dict[str, str] = {}
    _CAPTURES.append(figures)
    try:
        yield figures
    finally:
        _CAPTURES.remove(figures)


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    if _CAPTURES:
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        _CAPTURES[-1][stem] = buf.getvalue()
        return [Path(out_dir) / f"{stem}.svg"]
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{stem}.png", out_dir / f"{stem}.svg"
    fig.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
    fig.savefig(svg, format="svg", metadata={"Date": None})
    return [png, svg]


def grid(rows: list[dict], key: str, step=None, column: str = "type", order=type_key):
    """(layers, columns, matrix) of the mean of `key` per (layer, row[column]): by module type, or
    e.g. by expert (column="expert", order=plots_experts.expert_key). Rows without a layer or
    without that column (a dense module's expert) are left out; with `step`, only the rows of that
    step count. Missing cells are NaN."""
    cells: dict = {}
    for r in rows:
        if r.get("layer") is None or r.get(column) is None or (step is not None and r.get("step") != step):
            continue
        cells.setdefault((int(r["layer"]), r[column]), []).append(num(r.get(key)))
    layers = sorted({layer for layer, _ in cells})
    cols = sorted({c for _, c in cells}, key=order)
    mat = [[nanmean(cells.get((layer, c), [])) for c in cols] for layer in layers]
    return layers, cols, mat


def heatmap_panels(
    plt, grids, cmap, vmin, vmax, bar_label, title, out_dir, name, *, fit_scale=False, labels=None
) -> list[Path]:
    """One figure of layer × type heatmaps side by side (grids: (title, layers, types, matrix)),
    one colour scale; nothing when there is no grid. Cells show their value (labels: the matrices
    of values to print, default the grids' own); with `fit_scale`, grids too tall to print values
    in get a colour scale from their data's range instead of [vmin, vmax]."""
    if not grids:
        return []
    n_types = max(len(g[2]) for g in grids)
    n_layers = max(len(g[1]) for g in grids)
    if fit_scale and n_layers > ANNOTATE_MAX_LAYERS:
        vmin, vmax = data_range([g[3] for g in grids], vmin, vmax)
        bar_label = f"{bar_label or ''} (scale fit to the data)".strip()
    w = max(3.2, 0.45 * n_types + 1.6)
    fig, axes = plt.subplots(
        1,
        len(grids),
        figsize=(w * len(grids) + 1.0, min(10, max(3.5, 0.25 * n_layers + 2))),
        squeeze=False,
        layout="constrained",
    )
    try:
        im = None
        for i, (ax, (label, layers, types, mat)) in enumerate(zip(axes[0], grids)):
            im = heatmap(ax, plt, layers, types, mat, cmap, vmin, vmax, labels[i] if labels else None)
            ax.set_title(label)
        fig.suptitle(title)
        fig.colorbar(im, ax=list(axes[0]), label=bar_label or "", fraction=0.05 if len(grids) > 1 else 0.08, pad=0.02)
        return save(fig, out_dir, name)
    finally:
        plt.close(fig)


def data_range(mats, lo: float, hi: float) -> tuple[float, float]:
    """(min, max) of the finite values of `mats`; (lo, hi) when they hold fewer than two distinct."""
    vals = [v for mat in mats for row in mat for v in row if not math.isnan(v)]
    if not vals or max(vals) - min(vals) < 1e-12:
        return lo, hi
    return min(vals), max(vals)


def cell_text(v: float) -> str:
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"


def heatmap(ax, plt, layers, types, mat, cmap, vmin, vmax, labels=None):
    """imshow of a layer × type matrix (NaN grey); each cell's value printed in it when the grid
    has at most ANNOTATE_MAX_LAYERS layers (labels: the values to print, default `mat`)."""
    import numpy as np

    arr = np.ma.masked_invalid(np.array(mat, dtype=float).reshape(len(layers), len(types)))
    cm = plt.get_cmap(cmap).with_extremes(bad="#d9d9d9")
    im = ax.imshow(arr, aspect="auto", cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest", origin="lower")
    if len(layers) <= ANNOTATE_MAX_LAYERS:
        shown = labels if labels is not None else mat
        size = 7 if len(types) <= 10 and len(layers) <= 24 else 5
        for i in range(len(layers)):
            for j in range(len(types)):
                v = num(shown[i][j])
                if math.isnan(v):
                    continue
                r, g, b, _ = im.cmap(im.norm(arr[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
                ax.text(j, i, cell_text(v), ha="center", va="center", fontsize=size, color="white" if dark else "black")
    ax.set_xticks(range(len(types)), types, rotation=45 if len(types) > 6 else 0)
    step = max(1, math.ceil(len(layers) / 16))
    ax.set_yticks(range(0, len(layers), step), [str(layer) for layer in layers[::step]])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    return im
