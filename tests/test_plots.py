"""Plots for `rank1 decompose` and `rank1 fit-pls` (rank1tools.plots): valid PNG / SVG files,
byte-identical output for the same rows, no crash on rows without a layer or with NaN / None R²,
and PlotsUnavailable when matplotlib cannot be imported."""

from __future__ import annotations

import math
import random
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from rank1tools import plot_common, plots
from rank1tools.plots import (
    PlotsUnavailable,
    decompose_plots,
    fit_plots,
    plots_available,
)

TYPES = ["q", "k", "v", "o", "gate", "up", "down"]
LAYERS = 4
STEPS = [0, 100, 200, 300, 400]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def spectrum_rows(extra: bool = True) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for layer in range(LAYERS):
        for t in TYPES:
            base = 0.3 + 0.08 * TYPES.index(t)
            for s in STEPS:
                e = min(1.0, base + 0.1 * layer / LAYERS + rng.uniform(-0.03, 0.03) - s / 4000)
                rows.append(
                    {
                        "module": f"model.layers.{layer}.{t}_proj.weight",
                        "layer": layer,
                        "type": t,
                        "step": s,
                        "energy_1": e,
                        "norm_frac_1": math.sqrt(e),
                    }
                )
    if extra:
        for name, t in (("model.embed_tokens.weight", "embedding"), ("lm_head.weight", "lm_head")):
            for s in STEPS:
                rows.append({"module": name, "layer": None, "type": t, "step": s, "energy_1": 0.2, "norm_frac_1": 0.45})
        rows[3]["energy_1"] = math.nan  # a NaN cell must not break the means
    return rows


def fit_inputs(metric: bool = True, with_nan: bool = True) -> tuple[list[dict], dict[str, dict]]:
    rng = random.Random(1)
    rows, traj = [], {}
    for layer in range(LAYERS):
        for t in TYPES:
            name = f"model.layers.{layer}.{t}_proj.weight"
            r2s = 1.0 - rng.random() * 1.6  # some below -1 so clipping is exercised
            rows.append(
                {
                    "module": name,
                    "layer": layer,
                    "type": t,
                    "r2": (r2s + 0.1) if metric else None,
                    "loo_r2": r2s if metric else None,
                    "r2_step": 1.0 - rng.random() * 0.8,
                }
            )
            scores = [rng.gauss(0, 1) for _ in STEPS]
            traj[name] = {
                "steps": STEPS,
                "scores": scores,
                "metric": [0.4 + 0.05 * x + rng.gauss(0, 0.02) for x in scores] if metric else None,
                "score_line": (0.4, 0.05) if metric else None,
                "step_line": (200.0, 50.0),
            }
    rows.append(
        {
            "module": "lm_head.weight",
            "layer": None,
            "type": "lm_head",
            "r2": 0.5 if metric else None,
            "loo_r2": 0.4 if metric else None,
            "r2_step": 0.3,
        }
    )
    if with_nan:
        rows[0]["r2_step"] = math.nan
        rows[1]["loo_r2"] = math.nan if metric else None
        rows[2]["r2"] = math.nan if metric else None
    return rows, traj


def check_files(paths: list[Path], stems: list[str]) -> None:
    import matplotlib.image as mpimg

    assert [p.name for p in paths] == [f"{s}.{ext}" for s in stems for ext in ("png", "svg")]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC
            img = mpimg.imread(p)
            assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0
        else:
            root = ET.parse(p).getroot()
            assert root.tag in ("svg", "{http://www.w3.org/2000/svg}svg")


def test_decompose_plots_write_png_and_svg(tmp_path):
    paths = decompose_plots(spectrum_rows(), tmp_path)
    check_files(paths, ["energy_by_type", "energy_heatmap"])


def test_decompose_plots_are_deterministic(tmp_path):
    a = decompose_plots(spectrum_rows(), tmp_path / "a")
    b = decompose_plots(spectrum_rows(), tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_decompose_heatmap_skipped_without_layers(tmp_path):
    rows = [r for r in spectrum_rows() if r["layer"] is None]
    paths = decompose_plots(rows, tmp_path)
    check_files(paths, ["energy_by_type"])
    assert decompose_plots([], tmp_path / "empty") == []


def test_fit_plots_with_metric(tmp_path):
    rows, traj = fit_inputs(metric=True)
    paths = fit_plots(rows, traj, tmp_path, "accuracy")
    check_files(paths, ["r2_heatmap", "linear_modules"])


def test_fit_plots_without_metric(tmp_path):
    rows, traj = fit_inputs(metric=False)
    paths = fit_plots(rows, traj, tmp_path, None)
    check_files(paths, ["r2_heatmap", "linear_modules"])


def test_fit_plots_are_deterministic(tmp_path):
    rows, traj = fit_inputs(metric=True)
    a = fit_plots(rows, traj, tmp_path / "a", "accuracy")
    b = fit_plots(rows, traj, tmp_path / "b", "accuracy")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_fit_plots_all_nan_and_few_modules(tmp_path):
    rows, traj = fit_inputs(metric=True)
    rows = rows[:3] + rows[-1:]
    for r in rows:
        r["r2"] = r["loo_r2"] = r["r2_step"] = math.nan
    paths = fit_plots(rows, traj, tmp_path / "nan", "acc")
    check_files(paths, ["r2_heatmap"])  # nothing to rank: no linear_modules figure
    rows, traj = fit_inputs(metric=False)
    paths = fit_plots(rows[:3], traj, tmp_path / "few", None)  # fewer than 10 modules: no overlap
    check_files(paths, ["r2_heatmap", "linear_modules"])


def test_missing_matplotlib_raises_plots_unavailable(tmp_path, monkeypatch):
    assert plots_available()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert not plots_available()
    with pytest.raises(PlotsUnavailable, match=r"rank1tools\[plot\]"):
        decompose_plots(spectrum_rows(), tmp_path)
    with pytest.raises(PlotsUnavailable):
        fit_plots(*fit_inputs(), tmp_path, "acc")
    assert plots.INSTALL_HINT in str(PlotsUnavailable())


# ---- what every figure shows (issue #20): oriented scores, points by step, cell values, steps ----


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save, by file stem, inspected before they close."""
    import numpy as np

    seen: dict[str, dict] = {}
    real_save = plot_common.save

    def spy(fig, out_dir, stem):
        axes = []
        for ax in fig.axes:
            texts = [t.get_text() for t in ax.texts]
            scatters = [(np.asarray(c.get_offsets()), c.get_array()) for c in ax.collections if len(c.get_offsets())]
            lines = [np.asarray(line.get_xydata()) for line in ax.get_lines()]
            images = [(im.get_array(), im.norm.vmin, im.norm.vmax) for im in ax.get_images()]
            axes.append(
                {
                    "title": ax.get_title(),
                    "ylabel": ax.get_ylabel(),
                    "xlabel": ax.get_xlabel(),
                    "texts": texts,
                    "scatters": scatters,
                    "lines": lines,
                    "images": images,
                    "visible": ax.get_visible(),
                }
            )
        seen[stem] = {"suptitle": fig._suptitle.get_text() if fig._suptitle else "", "axes": axes}
        return real_save(fig, out_dir, stem)

    monkeypatch.setattr(plot_common, "save", spy)
    return seen


def _falling_fit_inputs():
    """Modules whose PLS score falls with the metric and the step (score_line b < 0) for even
    layers, rises for odd ones: the sign a PLS fit gives is arbitrary."""
    rng = random.Random(2)
    rows, traj = [], {}
    for layer in range(LAYERS):
        for t in TYPES:
            name = f"model.layers.{layer}.{t}_proj.weight"
            sign = -1.0 if layer % 2 == 0 else 1.0
            metric = [0.3 + 0.0005 * s + rng.gauss(0, 0.005) for s in STEPS]
            scores = [sign * (m - 0.4) / 0.05 for m in metric]
            step_scores = [sign * (s - 200) / 50 for s in STEPS]
            rows.append(
                {
                    "module": name,
                    "layer": layer,
                    "type": t,
                    "r2": 0.9 + rng.random() / 20,
                    "loo_r2": 0.8 + rng.random() / 10,
                    "r2_step": 0.95,
                }
            )
            traj[name] = {
                "steps": STEPS,
                "scores": scores,
                "metric": metric,
                "score_line": (0.4, sign * 0.05),
                "step_scores": step_scores,
                "step_line": (200.0, sign * 50.0),
            }
    return rows, traj


def test_fit_plot_scores_are_oriented_so_the_metric_and_step_rise(tmp_path, figures):
    import numpy as np

    rows, traj = _falling_fit_inputs()
    fit_plots(rows, traj, tmp_path, "accuracy")
    panels = [ax for ax in figures["linear_modules"]["axes"] if ax["visible"] and ax["xlabel"].startswith("PLS score")]
    assert len(panels) == 20  # 5 most + 5 least linear, metric and step panels
    for ax in panels:
        ((xy, colours),) = ax["scatters"]
        assert np.corrcoef(xy[:, 0], xy[:, 1])[0, 1] > 0.9, ax["title"]  # the y value rises with the score
        (line,) = ax["lines"]
        assert line[1, 1] > line[0, 1], ax["title"]  # the fitted line rises too
        # the plotted line is still the fit: it passes through the points (falling sign flipped with the score)
        slope = (line[1, 1] - line[0, 1]) / (line[1, 0] - line[0, 0])
        assert slope == pytest.approx(50.0 if ax["ylabel"] == "step" else 0.05)
        # points coloured by their step
        assert list(colours) == STEPS, ax["title"]
    assert "steps 0..400" in figures["linear_modules"]["suptitle"]
    assert "accuracy rises" in figures["linear_modules"]["suptitle"]


def test_oriented_keeps_rising_scores_and_flips_falling_ones():
    assert plots.oriented([1.0, 2.0], (0.5, 2.0)) == ([1.0, 2.0], (0.5, 2.0))
    assert plots.oriented([1.0, 2.0], (0.5, -2.0)) == ([-1.0, -2.0], (0.5, 2.0))
    assert plots.oriented([1.0], None) == ([1.0], None)


def test_heatmap_cells_show_their_values(tmp_path, figures):
    rows, traj = fit_inputs(metric=True, with_nan=False)
    rows[5]["loo_r2"] = -2.5  # coloured as -1, printed as itself
    fit_plots(rows, traj, tmp_path, "accuracy")
    panels = figures["r2_heatmap"]["axes"]
    by_title = {ax["title"]: ax for ax in panels if ax["images"]}
    assert set(by_title) == {"in-sample R²", "leave-one-out R²", "R² vs step"}
    for key, label in (("r2", "in-sample R²"), ("loo_r2", "leave-one-out R²"), ("r2_step", "R² vs step")):
        # one printed value per (layer, type) cell, row-major from layer 0, the unclipped value
        want = [plot_common.cell_text(r[key]) for r in rows if r["layer"] is not None]
        got = by_title[label]["texts"]
        assert sorted(got) == sorted(want), label
    assert "-2.50" in by_title["leave-one-out R²"]["texts"]
    assert "steps 0..400" in figures["r2_heatmap"]["suptitle"]


def test_decompose_and_linearity_figures_name_the_steps_and_print_cells(tmp_path, figures):
    decompose_plots(spectrum_rows(), tmp_path / "d")
    assert all("steps 0..400" in ax["title"] for ax in figures["energy_by_type"]["axes"] if ax["title"])
    (heat,) = [ax for ax in figures["energy_heatmap"]["axes"] if ax["images"]]
    assert "steps 0..400" in heat["title"] and "step 400" in heat["title"]
    assert len(heat["texts"]) == LAYERS * len(TYPES)
    lin_rows = _linearity_rows(LAYERS)
    plots.linearity_plots(lin_rows, tmp_path / "l", [10, 20, 30, 40])
    assert "steps 10..40" in figures["linear_fraction_by_type"]["axes"][0]["title"]
    assert "steps 10..40" in figures["linearity_heatmap"]["suptitle"]
    cells = [ax for ax in figures["linearity_heatmap"]["axes"] if ax["images"]]
    assert [len(ax["texts"]) for ax in cells] == [LAYERS * len(TYPES)] * 2
    assert sorted(cells[0]["texts"]) == sorted(plot_common.cell_text(r["explained_1"]) for r in lin_rows)


def _linearity_rows(layers: int) -> list[dict]:
    rng = random.Random(3)
    return [
        {
            "tensor": f"model.layers.{layer}.{t}_proj.weight",
            "layer": layer,
            "type": t,
            "numel": 100,
            "explained_1": 0.91 + 0.04 * rng.random(),
            "frac_r2_above_0.7": 0.2 + 0.1 * rng.random(),
            "elements": 100,
            "changing": 100,
            "linear": 25,
        }
        for layer in range(layers)
        for t in TYPES
    ]


def test_tall_heatmap_gets_a_colour_scale_fit_to_its_data(tmp_path, figures):
    """80 layers: no room for values in the cells, so the 0.91–0.95 panel is not one flat colour."""
    rows = _linearity_rows(80)
    plots.linearity_plots(rows, tmp_path, [10, 20, 30])
    cells = [ax for ax in figures["linearity_heatmap"]["axes"] if ax["images"]]
    assert all(not ax["texts"] for ax in cells)
    _, vmin, vmax = cells[0]["images"][0]
    values = [r[k] for r in rows for k in ("explained_1", "frac_r2_above_0.7")]
    assert (vmin, vmax) == (min(values), max(values))
