"""rank1 linearity's per-element R² figure (the RLVR-linearity reference's: base as step 0,
--min-change 1e-4, --min-distinct 4, mean and median R² of the kept elements) against an
independent numpy float64 implementation (squared Pearson correlation with the step, np.unique,
np.median) on a bf16 run streamed in several chunks; the existing share is unchanged; --sample is
deterministic and equals numpy on the same indices; bad option values exit 2 with one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.commands.linearity import LinearityOptions, linearity, sample_indices
from rank1tools.commands.linearity.element_r2 import HIST_BINS, histogram_median, median
from rank1tools.synthetic import LlamaShape, make_base, make_run

from _support import run_main

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = [10, 20, 30, 40, 50, 60]
FRAC = "frac_r2_above_0.7"
REF = {"with_base": True, "min_change": 1e-4, "min_distinct": 4}
REF_FLAGS = ["--with-base", "--min-change", "1e-4", "--min-distinct", "4"]


def _read(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).to(torch.float64).numpy().reshape(-1)
    return out


def reference(base, cks, name, *, with_base, min_change, min_distinct, idx=None) -> dict:
    """The reference's recipe in numpy float64: the kept elements' squared Pearson correlation with the step."""
    Y = np.stack([c[name] for c in cks])
    t = np.array(STEPS, dtype=np.float64)
    if with_base:
        Y, t = np.vstack([base[name][None, :], Y]), np.concatenate([[0.0], t])
    if idx is not None:
        Y = Y[:, idx]
    moved = (Y.max(0) - Y.min(0)) > min_change
    distinct = np.array([len(np.unique(Y[:, j])) for j in range(Y.shape[1])]) >= min_distinct
    keep = moved & distinct
    Yk = Y[:, keep]
    tc, yc = t - t.mean(), Yk - Yk.mean(0)
    r = (tc @ yc) / np.sqrt((tc @ tc) * (yc * yc).sum(0))
    return {
        "r2": r**2,
        "elements": Y.shape[1],
        "removed_min_change": int((~moved).sum()),
        "removed_min_distinct": int((moved & ~distinct).sum()),
    }


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A bf16 base and bf16 checkpoints: most elements move by a few rounding steps (staircases)."""
    root = tmp_path_factory.mktemp("linref")
    make_base(root / "base", SHAPE, dtype=torch.bfloat16)
    make_run(root / "run", STEPS, SHAPE, base_dtype=torch.bfloat16, dtype=torch.bfloat16)
    return root


def _refs(root: Path, sample=None, seed=0, **settings) -> dict[str, dict]:
    base = _read(root / "base")
    cks = [_read(root / "run" / f"checkpoint-{s}") for s in STEPS]
    return {n: reference(base, cks, n, idx=sample_indices(base[n].size, sample, seed, n), **settings) for n in base}


def _run(root: Path, out: Path, **opts):
    return linearity(
        str(root / "base"), [], str(out), run=str(root / "run"), options=LinearityOptions(plots=False, **opts)
    )


def test_reference_settings_match_numpy_per_tensor_and_pooled(bf16_run, tmp_path):
    refs = _refs(bf16_run, **REF)
    for chunk in (None, 700):  # one chunk per tensor, and many
        res = _run(bf16_run, tmp_path / f"o{chunk}", chunk=chunk, **REF)
        for row in res.rows:
            ref = refs[row["tensor"]]
            assert row["elements"] == ref["elements"]
            assert row["kept"] == len(ref["r2"]), row["tensor"]
            assert row["removed_min_change"] == ref["removed_min_change"]
            assert row["removed_min_distinct"] == ref["removed_min_distinct"]
            assert row["kept"] + row["removed_min_change"] + row["removed_min_distinct"] == row["elements"]
            assert row["r2_mean"] == pytest.approx(ref["r2"].mean(), abs=1e-12)
            assert row["r2_median"] == pytest.approx(np.median(ref["r2"]), abs=6e-8)  # float32-stored R²
        pooled = np.concatenate([v["r2"] for v in refs.values()])
        h = res.summary["headline"]
        assert h["r2_mean"] == pytest.approx(pooled.mean(), abs=1e-12)
        assert abs(h["r2_median"] - np.median(pooled)) <= 1 / HIST_BINS
        s = res.summary["element_r2"]
        assert s["kept"] == len(pooled) and s["evaluated"] == SHAPE.parameter_count
        assert s["removed_min_change"] == sum(v["removed_min_change"] for v in refs.values())
        assert s["removed_min_distinct"] == sum(v["removed_min_distinct"] for v in refs.values())
        assert s["removed_min_change"] > 1000 and s["removed_min_distinct"] > 1000  # both filters bite on bf16
        for t, g in res.summary["by_type"].items():
            vals = np.concatenate([refs[r["tensor"]]["r2"] for r in res.rows if r["type"] == t])
            assert g["r2_mean"] == pytest.approx(vals.mean(), abs=1e-12) and g["kept"] == len(vals)
            assert abs(g["r2_median"] - np.median(vals)) <= 1 / HIST_BINS
        layers = res.summary["by_layer"]
        assert [x["layer"] for x in layers] == [0, 1, None]
        for x in layers:
            vals = np.concatenate([refs[r["tensor"]]["r2"] for r in res.rows if r["layer"] == x["layer"]])
            assert x["r2_mean"] == pytest.approx(vals.mean(), abs=1e-12)
            assert abs(x["r2_median"] - np.median(vals)) <= 1 / HIST_BINS


def test_without_base_and_filters_the_figure_covers_every_changing_element(bf16_run, tmp_path):
    res = _run(bf16_run, tmp_path / "o", r2_stats=True)
    refs = _refs(bf16_run, with_base=False, min_change=0.0, min_distinct=2)
    for row in res.rows:
        ref = refs[row["tensor"]]
        assert row["kept"] == row["changing"] == len(ref["r2"]) and row["removed_min_distinct"] == 0
        assert row["r2_mean"] == pytest.approx(ref["r2"].mean(), abs=1e-12)
        assert row["r2_median"] == pytest.approx(np.median(ref["r2"]), abs=6e-8)
        # the share and the mean see the same R² (bf16 staircases can sit at exactly 0.7: a tie either side)
        assert int((ref["r2"] > 0.7 + 1e-9).sum()) <= row["linear"] <= int((ref["r2"] > 0.7 - 1e-9).sum())


def test_the_existing_outputs_are_unchanged_by_default_and_the_share_by_the_new_options(bf16_run, tmp_path):
    plain = _run(bf16_run, tmp_path / "plain")
    assert "element_r2" not in plain.summary and "r2_mean" not in plain.summary["headline"]
    assert "kept" not in plain.rows[0] and "r2_mean" not in plain.summary["mean"]
    ref = _run(bf16_run, tmp_path / "ref", **REF)
    assert ref.summary["headline"][FRAC] == plain.summary["headline"][FRAC]
    for a, b in zip(plain.rows, ref.rows):
        for k in ("explained_1", "coef_r2_1", FRAC, "static_fraction", "changing", "linear"):
            assert a[k] == b[k], (a["tensor"], k)
    with open(tmp_path / "plain" / "linearity.csv") as f:
        before = list(csv.reader(f))
    with open(tmp_path / "ref" / "linearity.csv") as f:
        after = list(csv.reader(f))
    width = len(before[0])
    assert after[0][width:] == ["kept", "removed_min_change", "removed_min_distinct", "r2_mean", "r2_median"]
    assert [r[:width] for r in after] == before  # new columns are added after the old ones, which keep their bytes
    with open(tmp_path / "ref" / "by_type.csv") as f:
        assert next(csv.reader(f))[-5:] == after[0][width:]
    prov = json.loads((tmp_path / "ref" / "rank1tools.json").read_text())["parameters"]
    assert prov["element_r2"] == REF
    assert "element_r2" not in json.loads((tmp_path / "plain" / "rank1tools.json").read_text())["parameters"]


def test_sample_is_deterministic_and_matches_numpy_on_the_same_indices(bf16_run, tmp_path):
    args = ["linearity", str(bf16_run / "base"), "--run", str(bf16_run / "run"), *REF_FLAGS, "--no-plots", "-q"]
    for name in ("a", "b"):
        r = run_main(*args, "--sample", "300", "--seed", "5", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    for f in ("linearity.csv", "by_type.csv", "summary.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    refs = _refs(bf16_run, sample=300, seed=5, **REF)
    rows = [json.loads(line) for line in (tmp_path / "a" / "linearity.jsonl").read_text().splitlines()]
    total = weight = 0.0
    for row in rows:
        ref = refs[row["tensor"]]
        assert row["elements"] == min(300, row["numel"]) and row["kept"] == len(ref["r2"])
        assert row["r2_mean"] == pytest.approx(ref["r2"].mean(), abs=1e-12)
        assert row["r2_median"] == pytest.approx(np.median(ref["r2"]), abs=6e-8)
        scale = row["numel"] / row["elements"]  # a sampled tensor weighs its size
        total, weight = total + scale * ref["r2"].sum(), weight + scale * len(ref["r2"])
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["headline"]["r2_mean"] == pytest.approx(total / weight, abs=1e-12)
    assert "seeded sample of up to 300" in summary["element_r2"]["note"]
    r = run_main(*args, "--sample", "300", "--seed", "6", "--out", str(tmp_path / "c"))
    assert (
        r.returncode == 0
        and (tmp_path / "c" / "linearity.csv").read_bytes() != (tmp_path / "a" / "linearity.csv").read_bytes()
    )


def test_cli_summary_json_and_heatmap(bf16_run, tmp_path):
    base = ["linearity", str(bf16_run / "base"), "--run", str(bf16_run / "run"), *REF_FLAGS]
    r = run_main(*base, "--out", str(tmp_path / "j"), "--no-plots", "-q", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    h = data["summary"]["headline"]
    assert {FRAC, "r2_mean", "r2_median"} <= set(h) and data["summary"]["element_r2"]["min_distinct"] == 4
    r = run_main(*base, "--out", str(tmp_path / "t"), "--no-plots", "-q")
    assert r.returncode == 0, r.stderr
    assert "per-element R² (RLVR linearity's figure): mean" in r.stdout and "base as step 0" in r.stdout
    assert "median R²" in r.stdout
    pytest.importorskip("matplotlib")
    r = run_main(*base, "--out", str(tmp_path / "p"), "-q")
    assert r.returncode == 0, r.stderr
    assert {"element_r2_heatmap.png", "element_r2_heatmap.svg"} <= {
        p.name for p in (tmp_path / "p" / "plots").iterdir()
    }


@pytest.mark.parametrize(
    "flags, option",
    [
        (["--min-change", "-1"], "--min-change"),
        (["--min-change", "nan"], "--min-change"),
        (["--min-change", "1_0"], "--min-change"),
        (["--min-distinct", "0"], "--min-distinct"),
        (["--min-distinct", "four"], "--min-distinct"),
    ],
)
def test_bad_values_exit_2_with_one_line(bf16_run, tmp_path, flags, option):
    out = tmp_path / "o"
    r = run_main("linearity", str(bf16_run / "base"), "--run", str(bf16_run / "run"), *flags, "--out", str(out))
    assert r.returncode == 2 and option in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_medians_against_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 10):
        v = rng.random(n).astype(np.float32)
        assert median(v) == pytest.approx(float(np.median(v.astype(np.float64))), abs=0)
    assert median(np.empty(0, np.float32)) is None
    v = rng.beta(5, 1, 100_001)
    counts = np.bincount(np.minimum((v * HIST_BINS).astype(np.int64), HIST_BINS - 1), minlength=HIST_BINS)
    assert abs(histogram_median(counts.astype(np.float64)) - np.median(v)) <= 1 / HIST_BINS
    assert histogram_median(np.zeros(HIST_BINS)) is None


def test_min_distinct_above_the_points_keeps_nothing_and_says_so(bf16_run, tmp_path):
    res = _run(bf16_run, tmp_path / "o", with_base=True, min_distinct=8)  # 7 points with the base
    assert any("--min-distinct 8 exceeds the 7 points" in n for n in res.notes)
    assert res.summary["element_r2"]["kept"] == 0 and res.summary["headline"]["r2_mean"] is None
    assert res.summary["headline"]["r2_median"] is None and all(r["r2_median"] is None for r in res.rows)


def test_a_tensors_figures_are_json_data_for_the_ray_ledger(bf16_run):
    """With --executor ray a task's figures are recorded as JSON (engine.tensor_units): they must
    read back equal, so a Ray run writes the same bytes as a local one."""
    from rank1tools.commands.linearity import _tensors_task
    from rank1tools.engine.tensor_units import TensorGroup
    from rank1tools.io.run_inputs import open_run_inputs

    inputs = open_run_inputs(str(bf16_run / "base"), [], str(bf16_run / "run"), None, None)
    cks = [c for _, c in inputs.checkpoints]
    names = ("model.embed_tokens.weight", "model.norm.weight")
    figs = _tensors_task(
        TensorGroup("0", names), inputs.base, cks, STEPS, 1, LinearityOptions(sample=500, **REF), "cpu"
    )
    assert json.loads(json.dumps(figs)) == figs
    assert figs[names[0]]["element_r2"]["kept"] > 0 and figs[names[0]]["sampled"] is True
