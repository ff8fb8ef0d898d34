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

from rank1tools import plots
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
                rows.append({"module": f"model.layers.{layer}.{t}_proj.weight", "layer": layer, "type": t,
                             "step": s, "energy_1": e, "norm_frac_1": math.sqrt(e)})
    if extra:
        for name, t in (("model.embed_tokens.weight", "embedding"), ("lm_head.weight", "lm_head")):
            for s in STEPS:
                rows.append({"module": name, "layer": None, "type": t, "step": s, "energy_1": 0.2,
                             "norm_frac_1": 0.45})
        rows[3]["energy_1"] = math.nan  # a NaN cell must not break the means
    return rows


def fit_inputs(metric: bool = True, with_nan: bool = True) -> tuple[list[dict], dict[str, dict]]:
    rng = random.Random(1)
    rows, traj = [], {}
    for layer in range(LAYERS):
        for t in TYPES:
            name = f"model.layers.{layer}.{t}_proj.weight"
            r2s = 1.0 - rng.random() * 1.6  # some below -1 so clipping is exercised
            rows.append({"module": name, "layer": layer, "type": t,
                         "r2": (r2s + 0.1) if metric else None, "loo_r2": r2s if metric else None,
                         "r2_step": 1.0 - rng.random() * 0.8})
            scores = [rng.gauss(0, 1) for _ in STEPS]
            traj[name] = {"steps": STEPS, "scores": scores,
                          "metric": [0.4 + 0.05 * x + rng.gauss(0, 0.02) for x in scores] if metric else None,
                          "score_line": (0.4, 0.05) if metric else None, "step_line": (200.0, 50.0)}
    rows.append({"module": "lm_head.weight", "layer": None, "type": "lm_head",
                 "r2": 0.5 if metric else None, "loo_r2": 0.4 if metric else None, "r2_step": 0.3})
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
