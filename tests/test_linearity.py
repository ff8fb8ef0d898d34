"""rank1 linearity against an independent numpy float64 computation (dense M, np.linalg.svd for the
explained variance and the coefficient series, np.polyfit for per-element R²): a synthetic bf16 base
with fp32 checkpoints streamed in several chunks, planted exactly-linear / static / random-walk
elements on uneven steps, --sample on the same indices, tables re-read, CLI exit codes and the gate."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.commands.linearity import LinearityOptions, linearity, sample_indices
from rank1tools.commands.linearity.tables import tensor_labels
from rank1tools.synthetic import LlamaShape, make_base, make_run, write_model

from _support import run_main

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = [10, 20, 30, 40, 50]
UNEVEN = [3, 10, 40, 41, 100, 160]
FRAC = "frac_r2_above_0.7"


# ---- independent reference ----------------------------------------------------------------------


def _read(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor as float64 (from its stored dtype), read with safetensors itself."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).to(torch.float64).numpy()
    return out


def _r2(t: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """R² of an OLS line per column (np.polyfit); NaN for a column that does not change."""
    coef = np.polyfit(t, Y, 1)
    pred = coef[0][None, :] * t[:, None] + coef[1][None, :]
    sst = ((Y - Y.mean(axis=0)) ** 2).sum(axis=0)
    ssr = ((Y - pred) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sst > 0, 1.0 - ssr / sst, np.nan)


def reference(base: dict, cks: list[dict], steps: list[int], name: str, r: int, idx=None) -> dict:
    t = np.array(steps, dtype=np.float64)
    theta = np.stack([c[name].reshape(-1) for c in cks])  # T × d
    M = theta - base[name].reshape(-1)[None, :]
    U, S, _ = np.linalg.svd(M, full_matrices=False)
    lam = S**2
    Y = theta if idx is None else theta[:, idx]
    r2 = _r2(t, Y)
    changing = ~np.isnan(r2)
    return {
        "explained_1": lam[0] / lam.sum(),
        "explained_r": lam[:r].sum() / lam.sum(),
        "coef_r2": _r2(t, U[:, :r] * S[:r]),
        "elements": Y.shape[1],
        "changing": int(changing.sum()),
        "linear": int((r2[changing] > 0.7).sum()),
    }


def _check_row(row: dict, ref: dict, r: int) -> None:
    assert row["elements"] == ref["elements"] and row["changing"] == ref["changing"]
    assert row["linear"] == ref["linear"], row["tensor"]
    assert row[FRAC] == pytest.approx(ref["linear"] / ref["changing"], abs=1e-12)
    assert row["static_fraction"] == pytest.approx(1 - ref["changing"] / ref["elements"], abs=1e-12)
    assert row["explained_1"] == pytest.approx(ref["explained_1"], abs=1e-6)
    assert row["explained_r"] == pytest.approx(ref["explained_r"], abs=1e-6)
    assert row["coef_r2_1"] == pytest.approx(ref["coef_r2"][0], abs=1e-6)
    for i in range(1, r):
        assert row[f"coef_r2_{i + 1}"] == pytest.approx(ref["coef_r2"][i], abs=1e-4), (row["tensor"], i)


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A bf16 base and a TRL run of fp32 checkpoints (the planted rank-1 drift plus noise)."""
    root = tmp_path_factory.mktemp("lin")
    make_base(root / "base", SHAPE, dtype=torch.bfloat16)
    make_run(root / "run", STEPS, SHAPE, base_dtype=torch.bfloat16, dtype=torch.float32, noise=3e-4)
    return root


def _planted(root: Path, kind: str, steps=UNEVEN, seed=0) -> Path:
    """base + run of planted tensors: `linear` θ_t = θ₀ + (a + b·t)·mask (static where mask is 0),
    `walk` θ_t = θ₀ + cumulative Gaussian steps (a random walk per element)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "model.layers.0.mlp.up_proj.weight": (24, 16),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.1.self_attn.q_proj.weight": (16, 16),
        "model.layers.1.self_attn.q_proj.bias": (16,),
    }
    base = {n: rng.standard_normal(s) * 0.02 for n, s in shapes.items()}
    a = {n: rng.standard_normal(s) * 1e-3 for n, s in shapes.items()}
    b = {n: rng.standard_normal(s) * 1e-4 for n, s in shapes.items()}
    mask = {n: (rng.random(s) > 0.25).astype(np.float64) for n, s in shapes.items()}
    walk = {n: np.zeros(s) for n in shapes for s in [shapes[n]]}
    write_model(root / "base", {n: torch.tensor(v, dtype=torch.float32) for n, v in base.items()})
    for t in steps:
        tensors = {}
        for n in shapes:
            if kind == "linear":
                d = (a[n] + b[n] * t) * mask[n]
            else:
                walk[n] = walk[n] + rng.standard_normal(shapes[n]) * 1e-3
                d = walk[n]
            tensors[n] = torch.tensor(base[n] + d, dtype=torch.float32)
        write_model(root / "run" / f"checkpoint-{t}", tensors)
    return root


def _all_refs(root: Path, steps, r, sample=None, seed=0):
    base = _read(root / "base")
    cks = [_read(root / "run" / f"checkpoint-{s}") for s in steps]
    refs = {}
    for name in base:
        idx = sample_indices(base[name].size, sample, seed, name)
        refs[name] = reference(base, cks, steps, name, r, idx)
    return refs


# ---- figures ------------------------------------------------------------------------------------


def test_bf16_base_fp32_run_matches_dense_reference_streamed_in_chunks(synth, tmp_path):
    refs = _all_refs(synth, STEPS, 2)
    for chunk in (None, 1000):  # one chunk per tensor, and many (1000 does not divide any size)
        res = linearity(
            str(synth / "base"),
            [],
            str(tmp_path / f"o{chunk}"),
            run=str(synth / "run"),
            options=LinearityOptions(rank=2, chunk=chunk, plots=False),
        )
        assert res.steps == STEPS and res.rank == 2
        assert sorted(r["tensor"] for r in res.rows) == sorted(SHAPE.shapes())  # every tensor (tied: no lm_head)
        for row in res.rows:
            _check_row(row, refs[row["tensor"]], 2)
            assert row["T"] == 5 and row["sampled"] is False
    types = {r["tensor"]: r["type"] for r in res.rows}
    assert types["model.embed_tokens.weight"] == "embedding" and types["model.norm.weight"] == "norm"
    assert types["model.layers.1.mlp.down_proj.weight"] == "down"
    # element-weighted headline from the reference counts
    h = res.summary["headline"]
    assert h[FRAC] == pytest.approx(sum(v["linear"] for v in refs.values()) / sum(v["changing"] for v in refs.values()))
    assert h["static_fraction"] == 0.0


def test_planted_exact_lines_on_uneven_steps_with_static_elements(tmp_path):
    root = _planted(tmp_path, "linear")
    res = linearity(
        str(root / "base"),
        [],
        str(tmp_path / "o"),
        run=str(root / "run"),
        options=LinearityOptions(rank=3, plots=False),
    )
    refs = _all_refs(root, UNEVEN, 3)
    for row in res.rows:
        _check_row(row, refs[row["tensor"]], 1)
        assert row[FRAC] == 1.0  # every changing element is a line in the step
        assert row["coef_r2_1"] == pytest.approx(1.0, abs=1e-9)  # on the actual steps, not positions 0..T-1
        assert row["explained_1"] > 0.99
    static = sum(r["numel"] - r["changing"] for r in res.rows) / sum(r["numel"] for r in res.rows)
    assert 0.1 < static < 0.4
    assert res.summary["headline"][FRAC] == 1.0
    assert res.summary["headline"]["static_fraction"] == pytest.approx(static)
    labels = {r["tensor"]: (r["layer"], r["type"]) for r in res.rows}
    assert labels["model.layers.1.self_attn.q_proj.bias"] == (1, "bias")
    assert labels["model.layers.0.input_layernorm.weight"] == (0, "norm")


def test_random_walk_is_not_linear_and_the_gate_exits_5_after_writing(tmp_path):
    root = _planted(tmp_path, "walk", steps=[10, 20, 30, 40, 50, 60, 70, 80])
    refs = _all_refs(root, [10, 20, 30, 40, 50, 60, 70, 80], 1)
    headline = sum(v["linear"] for v in refs.values()) / sum(v["changing"] for v in refs.values())
    assert headline < 0.6
    out = tmp_path / "o"
    r = run_main(
        "linearity",
        str(root / "base"),
        "--run",
        str(root / "run"),
        "--out",
        str(out),
        "--fail-below",
        "0.7",
        "--no-plots",
        "-q",
        "--json",
    )
    assert r.returncode == 5, r.stderr
    assert "rank1: gate: element-weighted frac_r2_above_0.7" in r.stderr and "below --fail-below 0.7" in r.stderr
    data = json.loads(r.stdout)
    assert data["gate"]["passed"] is False and data["gate"]["value"] == pytest.approx(headline)
    assert json.loads((out / "summary.json").read_text())["headline"][FRAC] == pytest.approx(headline)
    assert (out / "linearity.csv").is_file() and (out / "rank1tools.json").is_file()
    ok = run_main(
        "linearity",
        str(root / "base"),
        "--run",
        str(root / "run"),
        "--out",
        str(tmp_path / "p"),
        "--fail-below",
        f"{headline - 0.01}",
        "--no-plots",
        "-q",
    )
    assert ok.returncode == 0, ok.stderr
    assert "of the changing elements have per-element linear R² > 0.7" in ok.stdout


def test_sample_is_deterministic_and_equals_the_exact_figure_on_the_same_indices(synth, tmp_path):
    outs = []
    for name in ("a", "b"):
        r = run_main(
            "linearity",
            str(synth / "base"),
            "--run",
            str(synth / "run"),
            "--out",
            str(tmp_path / name),
            "--sample",
            "700",
            "--seed",
            "3",
            "--no-plots",
            "-q",
        )
        assert r.returncode == 0, r.stderr
        outs.append((tmp_path / name / "linearity.csv").read_bytes())
    assert outs[0] == outs[1]
    refs = _all_refs(synth, STEPS, 1, sample=700, seed=3)
    rows = [json.loads(line) for line in (tmp_path / "a" / "linearity.jsonl").read_text().splitlines()]
    for row in rows:
        _check_row(row, refs[row["tensor"]], 1)
        assert row["sampled"] is (row["numel"] > 700) and row["elements"] == min(700, row["numel"])
    # the headline weighs each tensor by its size, not by its sample
    est = [
        (row["numel"] * row["linear"] / row["elements"], row["numel"] * row["changing"] / row["elements"])
        for row in rows
    ]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["headline"][FRAC] == pytest.approx(sum(a for a, _ in est) / sum(c for _, c in est))
    other = sample_indices(4608, 700, 4, "model.embed_tokens.weight")
    assert not np.array_equal(other, sample_indices(4608, 700, 3, "model.embed_tokens.weight"))


def test_sample_indices_are_a_uniform_sorted_subset():
    assert sample_indices(100, 100, 0, "x") is None and sample_indices(100, None, 0, "x") is None
    numel = 3 * (1 << 20) + 5  # several sampling blocks
    idx = sample_indices(numel, 3000, 0, "w")
    assert idx.dtype == np.int64 and len(idx) == 3000 and len(np.unique(idx)) == 3000
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < numel
    np.testing.assert_array_equal(idx, sample_indices(numel, 3000, 0, "w"))
    counts = np.histogram(idx, bins=6, range=(0, numel))[0]
    assert np.all(np.abs(counts - 500) < 110)  # binomial-like sd ≈ 20 per sixth


def test_tables_reread(synth, tmp_path):
    out = tmp_path / "o"
    res = linearity(
        str(synth / "base"), [], str(out), run=str(synth / "run"), options=LinearityOptions(rank=7, plots=False)
    )  # capped at T = 5
    assert res.rank == 5 and any("capped" in n for n in res.notes)
    with open(out / "linearity.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == (
        ["tensor", "layer", "type", "numel", "T", "explained_1", "explained_r"]
        + [f"coef_r2_{i}" for i in range(1, 6)]
        + [FRAC, "static_fraction", "elements", "changing", "linear", "sampled"]
    )
    jsonl = [json.loads(line) for line in (out / "linearity.jsonl").read_text().splitlines()]
    for row, j, want in zip(rows, jsonl, res.rows):
        for k in ("explained_1", "explained_r", "coef_r2_1", FRAC):
            assert float(row[k]) == want[k] and j[k] == want[k]  # repr round-trip: exact
        assert row["layer"] == ("" if want["layer"] is None else str(want["layer"]))
        assert int(row["linear"]) == want["linear"] and j["changing"] == want["changing"]
    with open(out / "by_type.csv") as f:
        by_type = {r["type"]: r for r in csv.DictReader(f)}
    assert list(by_type) == ["q", "k", "v", "o", "gate", "up", "down", "norm", "embedding"]
    for t, g in by_type.items():
        mine = [r for r in res.rows if r["type"] == t]
        assert int(g["tensors"]) == len(mine)
        assert float(g[FRAC]) == pytest.approx(sum(r["linear"] for r in mine) / sum(r["changing"] for r in mine))
        assert float(g["mean_explained_1"]) == pytest.approx(np.mean([r["explained_1"] for r in mine]))
    summary = json.loads((out / "summary.json").read_text())
    least = sorted(res.rows, key=lambda r: r[FRAC])[:10]
    assert [x["tensor"] for x in summary["least_linear"]] == [r["tensor"] for r in least]
    prov = json.loads((out / "rank1tools.json").read_text())
    assert prov["command"] == "linearity" and prov["parameters"]["rank"] == 5 and len(prov["inputs"]) == 6


def test_include_exclude_and_labels(synth, tmp_path):
    res = linearity(
        str(synth / "base"),
        [],
        str(tmp_path / "o"),
        run=str(synth / "run"),
        options=LinearityOptions(include=["*layers.1.*"], exclude=["*norm*"], plots=False),
    )
    assert sorted(r["tensor"] for r in res.rows) == sorted(
        n for n in SHAPE.shapes() if "layers.1." in n and "norm" not in n
    )
    assert tensor_labels("transformer.h.3.ln_1.weight", (8,)) == (3, "norm")
    assert tensor_labels("transformer.ln_f.weight", (8,)) == (None, "norm")
    assert tensor_labels("transformer.wpe.weight", (16, 8)) == (None, "other")
    assert tensor_labels("transformer.h.0.attn.c_attn.weight", (24, 8)) == (0, "qkv")
    assert tensor_labels("lm_head.weight", (96, 8)) == (None, "lm_head")


# ---- CLI: errors, step 0, plots -----------------------------------------------------------------


def test_too_few_checkpoints_and_bad_rank_write_nothing(synth, tmp_path):
    out = tmp_path / "o"
    r = run_main("linearity", str(synth / "base"), "--run", str(synth / "run"), "--steps", "40:50", "--out", str(out))
    assert r.returncode == 3 and "2 checkpoints in the window" in r.stderr and r.stderr.count("\n") == 1
    r = run_main("linearity", str(synth / "base"), "--run", str(synth / "run"), "--rank", "0", "--out", str(out))
    assert r.returncode == 2 and "--rank" in r.stderr
    r = run_main("linearity", str(synth / "base"), "--run", str(synth / "run"), "--sample", "0", "--out", str(out))
    assert r.returncode == 2 and "--sample" in r.stderr
    assert not out.exists() and not any(p.name.startswith(".o.") for p in tmp_path.iterdir())


def test_step_zero_is_left_out(tmp_path):
    make_base(tmp_path / "base", SHAPE)
    make_run(tmp_path / "run", [0, 25, 50], SHAPE)
    r = run_main("linearity", str(tmp_path / "base"), "--run", str(tmp_path / "run"), "--out", str(tmp_path / "o"))
    assert r.returncode == 3 and "steps [25, 50]" in r.stderr and not (tmp_path / "o").exists()


def test_non_finite_checkpoint_is_an_input_error(tmp_path):
    root = _planted(tmp_path, "linear", steps=[1, 2, 3])
    ck = root / "run" / "checkpoint-2" / "model.safetensors"
    with safe_open(str(ck), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    write_model(ck.parent, tensors, extras=False)
    r = run_main("linearity", str(root / "base"), "--run", str(root / "run"), "--out", str(tmp_path / "o"))
    assert r.returncode == 3 and "model.layers.0.mlp.up_proj.weight" in r.stderr and "non-finite" in r.stderr
    assert not (tmp_path / "o").exists()


def test_plots_are_deterministic_and_a_missing_matplotlib_gives_the_note(synth, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    for name in ("a", "b"):
        r = run_main("linearity", str(synth / "base"), "--run", str(synth / "run"), "--out", str(tmp_path / name), "-q")
        assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (tmp_path / "a" / "plots").iterdir())
    assert files == [
        "linear_fraction_by_type.png",
        "linear_fraction_by_type.svg",
        "linearity_heatmap.png",
        "linearity_heatmap.svg",
    ]
    for f in files:
        assert (tmp_path / "a" / "plots" / f).read_bytes() == (tmp_path / "b" / "plots" / f).read_bytes()
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    r = run_main("linearity", str(synth / "base"), "--run", str(synth / "run"), "--out", str(tmp_path / "c"), "-q")
    assert r.returncode == 0
    assert "rank1: note: no plots: plots need matplotlib: pip install 'rank1tools[plot]'" in r.stderr
    assert (tmp_path / "c" / "linearity.csv").is_file() and not (tmp_path / "c" / "plots").exists()
    assert math.isfinite(json.loads((tmp_path / "c" / "summary.json").read_text())["headline"][FRAC])


def test_element_filter_matches_numpy():
    from rank1tools.math.linefit import ElementFilter

    rng = np.random.default_rng(3)
    Y = np.round(rng.standard_normal((6, 400)) * rng.choice([1e-6, 1e-3, 1.0], size=400), 3)
    Y[:, :20] = Y[:1, :20]  # constant columns
    for min_change, min_distinct in [(0.0, 2), (1e-4, 4), (0.5, 3)]:
        keep, by_change, by_distinct = ElementFilter(min_change, min_distinct).apply(torch.from_numpy(Y))
        moved = (Y.max(0) - Y.min(0)) > min_change
        distinct = np.array([len(np.unique(Y[:, j])) for j in range(Y.shape[1])]) >= min_distinct
        assert keep.numpy().tolist() == (moved & distinct).tolist()
        assert by_change == int((~moved).sum())
        assert by_distinct == int((moved & ~distinct).sum())
