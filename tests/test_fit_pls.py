"""rank1 fit-pls on planted factor stores: exact lines give R² = 1, noise gives a high in-sample but
a non-positive leave-one-out R² (and the warning), a planted sign flip is undone, tables agree with
an independent sklearn fit, metrics are aligned and listed, the CI gate exits 5 after writing."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from sklearn.cross_decomposition import PLSRegression

from rank1tools.synthetic import write_factor_store

from _support import run_main, tree_snapshot

STEPS = [10, 20, 30, 40, 50, 60, 70]
TYPES = ["q", "k", "v", "o", "gate", "up", "down"]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _store(folder, make_x, n_layers=2, d_out=24, d_in=16, seed=0, flip_at=None):
    """One module per (layer, type); x_t = make_x(rng, module index) of shape (T, d_out), stored as
    sigma_1 = |x_t| and u_1 = x_t / |x_t| (optionally sign-flipped with v at checkpoint flip_at)."""
    rng = np.random.default_rng(seed)
    modules, planted = {}, {}
    for layer in range(n_layers):
        for j, t in enumerate(TYPES):
            name = f"model.layers.{layer}.{'mlp' if t in ('gate', 'up', 'down') else 'self_attn'}.{t}_proj.weight"
            X = make_x(rng, layer * len(TYPES) + j)
            S = np.linalg.norm(X, axis=1)
            U = X / S[:, None]
            V = _unit(rng.standard_normal((len(STEPS), d_in)))
            if flip_at is not None:
                U[flip_at], V[flip_at] = -U[flip_at], -V[flip_at]
            modules[name] = {"U": U, "S": S, "V": V, "layer": layer, "type": t}
            planted[name] = X
    write_factor_store(folder, STEPS, modules)
    return planted


ACC = np.array([0.20, 0.28, 0.33, 0.41, 0.44, 0.52, 0.55])  # accuracy rising unevenly


def _line(rng, i, d_out=24):
    a, b = rng.standard_normal(d_out), rng.standard_normal(d_out)
    return a[None, :] + ACC[:, None] * b[None, :] * (1 + i % 3)


def _metrics_csv(path, steps=STEPS, values=ACC):
    path.write_text("step,accuracy,loss\n" + "".join(f"{s},{v},{1 - v}\n" for s, v in zip(steps, values)))
    return path


def _rows(out):
    return {r["module"]: r for r in map(json.loads, (out / "fits.jsonl").read_text().splitlines())}


def _sk_r2(X, y):
    pls = PLSRegression(n_components=1, scale=True).fit(X, y)
    pred = pls.predict(X).ravel()
    return 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()


def test_exact_line_gives_r2_one_and_matches_sklearn(tmp_path):
    planted = _store(tmp_path / "store", _line)
    out = tmp_path / "out"
    r = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--metrics",
        str(_metrics_csv(tmp_path / "m.csv")),
        "--metric",
        "accuracy",
        "--out",
        str(out),
        "--json",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["metric"] == "accuracy" and data["steps"] == STEPS and data["warnings"] == []
    rows = _rows(out)
    assert len(rows) == 14
    for name, X in planted.items():
        assert rows[name]["r2"] == pytest.approx(1.0, abs=1e-9)
        assert rows[name]["loo_r2"] == pytest.approx(1.0, abs=1e-9)
        S = np.linalg.norm(X, axis=1).astype(np.float32)  # the store holds float32 factors
        stored = S.astype(np.float64)[:, None] * (X / np.linalg.norm(X, axis=1)[:, None]).astype(np.float32)
        assert rows[name]["r2_step"] == pytest.approx(_sk_r2(stored, np.array(STEPS, float)), abs=1e-9)
        assert rows[name]["x_norm_last"] == pytest.approx(np.linalg.norm(X[-1]), rel=1e-6)
    assert data["summary"]["mean"]["loo_r2"] == pytest.approx(1.0, abs=1e-9)
    assert data["summary"]["share_loo_above_0.9"] == 1.0
    # the fit store predicts the metric from x without refitting: y = a + b * ((x - mean)/scale) . w
    name = next(iter(planted))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(m for m in manifest["modules"] if m["name"] == name)
    with safe_open(str(out / entry["file"]), "pt") as f:
        fit = {k: f.get_tensor(k).double().numpy() for k in f.keys()}
    scores = ((planted[name] - fit["x_mean"]) / fit["x_scale"]) @ fit["x_weights"]
    a, b = fit["score_line"]
    assert np.allclose(a + b * scores, ACC, atol=1e-6)
    assert manifest["format"] == "rank1tools.pls-fits" and manifest["target"] == "metric"
    assert manifest["metric"]["name"] == "accuracy" and len(manifest["metric"]["sha256"]) == 64


def test_sign_flip_mid_trajectory_is_undone(tmp_path):
    _store(tmp_path / "store", _line, flip_at=3)
    out = tmp_path / "out"
    r = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--metrics",
        str(_metrics_csv(tmp_path / "m.csv")),
        "--metric",
        "accuracy",
        "--out",
        str(out),
        "-q",
        "--no-plots",
    )
    assert r.returncode == 0, r.stderr
    assert all(row["loo_r2"] == pytest.approx(1.0, abs=1e-9) for row in _rows(out).values())


def test_noise_fits_in_sample_but_not_held_out_and_warns(tmp_path):
    _store(tmp_path / "store", lambda rng, i: rng.standard_normal((len(STEPS), 400)), d_out=400)
    out = tmp_path / "out"
    r = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--metrics",
        str(_metrics_csv(tmp_path / "m.csv")),
        "--metric",
        "accuracy",
        "--out",
        str(out),
        "--json",
        "-q",
        "--no-plots",
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["summary"]["mean"]
    assert s["r2"] > 0.8 and s["loo_r2"] <= 0
    assert "leave-one-out R²" in r.stderr and "rank1: warning:" in r.stderr


def test_step_only_and_the_gate(tmp_path):
    _store(tmp_path / "store", _line)
    ok = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "a"),
        "--fail-below",
        "0.5",
        "-q",
        "--json",
        "--no-plots",
    )
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["gate"]["figure"] == "mean r2_step" and data["gate"]["passed"] is True
    assert data["metric"] is None and all(r["loo_r2"] is None for r in _rows(tmp_path / "a").values())
    bad = run_main(
        "fit-pls", str(tmp_path / "store"), "--out", str(tmp_path / "b"), "--fail-below", "0.999999", "-q", "--no-plots"
    )
    assert bad.returncode == 5, bad.stderr
    assert "rank1: gate: mean r2_step" in bad.stderr
    assert (tmp_path / "b" / "fits.csv").is_file() and (tmp_path / "b" / "manifest.json").is_file()


def test_metric_alignment_lists_both_sides_and_relative(tmp_path):
    _store(tmp_path / "store", _line)
    steps = STEPS[1:] + [80]  # no metric for step 10; a metric row for step 80 has no checkpoint
    vals = np.append(ACC[1:], 0.6)
    out = tmp_path / "out"
    r = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--metrics",
        str(_metrics_csv(tmp_path / "m.csv", steps, vals)),
        "--metric",
        "accuracy",
        "--relative",
        "--out",
        str(out),
        "--json",
        "-q",
        "--no-plots",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["steps"] == STEPS[1:] and d["checkpoints_without_metric"] == [10]
    assert d["metric_steps_without_checkpoint"] == [80]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoints_without_metric"] == [10] and manifest["metric_steps_without_checkpoint"] == [80]
    shown = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--metrics",
        str(tmp_path / "m.csv"),
        "--metric",
        "accuracy",
        "--out",
        str(tmp_path / "shown"),
        "-q",
        "--no-plots",
    )
    assert "checkpoints without a metric (not fitted): steps 10\n" in shown.stdout
    assert "metric rows without a checkpoint (not fitted): steps 80\n" in shown.stdout
    with safe_open(str(out / json.loads((out / "manifest.json").read_text())["modules"][0]["file"]), "pt") as f:
        assert np.allclose(f.get_tensor("targets").numpy(), ACC[1:] / ACC[-1])  # relative to the last in the window


def test_long_step_lists_are_summarised_on_the_terminal_and_complete_in_json(tmp_path):
    """A 1000-step metrics file against 7 checkpoints: the terminal gets the count with the first and
    last step (one short line), --json and the manifest the full list of 993 steps."""
    _store(tmp_path / "store", _line)
    steps = list(range(1, 1001))
    m = tmp_path / "m.csv"
    m.write_text("step,accuracy\n" + "".join(f"{s},{0.2 + 0.35 * s / 1000 + 0.01 * (s % 3)}\n" for s in steps))
    shown = run_main(
        "fit-pls", str(tmp_path / "store"), "--metrics", str(m), "--out", str(tmp_path / "a"), "-q", "--no-plots"
    )
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.startswith("metric rows without a checkpoint"))
    assert line == "metric rows without a checkpoint (not fitted): 993 steps, 1 .. 1000 (all of them in --json)"
    assert len(shown.stdout) < 3000  # the old output listed every step (about 5,000 characters)
    data = json.loads(
        run_main(
            "fit-pls",
            str(tmp_path / "store"),
            "--metrics",
            str(m),
            "--out",
            str(tmp_path / "b"),
            "-q",
            "--no-plots",
            "--json",
        ).stdout
    )
    assert data["metric_steps_without_checkpoint"] == [s for s in steps if s not in STEPS]
    assert (
        json.loads((tmp_path / "b" / "manifest.json").read_text())["metric_steps_without_checkpoint"]
        == data["metric_steps_without_checkpoint"]
    )


@pytest.mark.parametrize("relative", [False, True], ids=["plain", "relative"])
def test_constant_metric_is_bad_input_before_any_output(tmp_path, relative):
    """A metric that does not change over the fitted checkpoints has no R² (0/0): exit 3 with one
    line naming the file, the metric and its value, and nothing written (it crashed after writing)."""
    _store(tmp_path / "store", _line)
    m = _metrics_csv(tmp_path / "m.csv", values=np.full(len(STEPS), 0.5))
    before = tree_snapshot(tmp_path)
    for extra in ([], ["--json"]):
        r = run_main(
            "fit-pls",
            str(tmp_path / "store"),
            "--metrics",
            str(m),
            "--metric",
            "accuracy",
            "--out",
            str(tmp_path / "out"),
            "-q",
            *(["--relative"] if relative else []),
            *extra,
        )
        assert r.returncode == 3, r.stderr
        assert r.stdout == "" and r.stderr.count("\n") == 1
        assert r.stderr == (
            f"rank1: error: {m}: accuracy is 0.5 at all 7 checkpoints fitted (steps 10..70): a "
            "constant metric has nothing to fit; choose another --metric or --steps, or leave out "
            "--metrics to fit against the step\n"
        )
        assert tree_snapshot(tmp_path) == before


def test_empty_factor_store_is_bad_input_before_any_output(tmp_path):
    write_factor_store(tmp_path / "store", STEPS, {})
    m = _metrics_csv(tmp_path / "m.csv")
    before = tree_snapshot(tmp_path)
    for extra in ([], ["--metrics", str(m), "--metric", "accuracy"]):
        r = run_main("fit-pls", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "-q", *extra)
        assert (r.returncode, r.stdout) == (3, ""), r.stderr
        assert r.stderr == f"rank1: error: {tmp_path / 'store'}: the factor store holds no modules: nothing to fit\n"
        assert tree_snapshot(tmp_path) == before


def test_summary_renders_when_every_figure_is_missing(capsys):
    """The terminal summary shows "-" for a figure that is undefined (no fitted module, every LOO fold
    degenerate) instead of crashing after the outputs were written."""
    from rank1tools.cli import render
    from rank1tools.commands.fit_pls import FitPlsResult, summarize

    rows = [
        {
            "module": "model.layers.0.self_attn.q_proj.weight",
            "layer": 0,
            "type": "q",
            "n": 5,
            "r2": None,
            "loo_r2": float("nan"),
            "r2_step": None,
        }
    ]
    summary, _ = summarize(rows, with_metric=True)
    render.fit_pls(FitPlsResult(out="o", steps=[1, 2, 3], metric="acc", rows=rows, summary=summary))
    out = capsys.readouterr().out
    assert "share of modules with leave-one-out R² > 0.9: -" in out
    assert "│ all         │            - │                - │       - │       1 │" in out
    assert "most linear" not in out and out.endswith("-> o\n")


def test_window_and_too_few_checkpoints(tmp_path):
    _store(tmp_path / "store", _line)
    r = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--window",
        "30:50",
        "--out",
        str(tmp_path / "w"),
        "-q",
        "--json",
        "--no-plots",
    )
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == [30, 40, 50]
    before = tree_snapshot(tmp_path)
    r = run_main("fit-pls", str(tmp_path / "store"), "--window", "60:", "--out", str(tmp_path / "x"), "-q")
    assert r.returncode == 3 and "fewer than --min-checkpoints 3" in r.stderr and r.stderr.count("\n") == 1
    r = run_main("fit-pls", str(tmp_path / "store"), "--min-checkpoints", "2", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "at least 3" in r.stderr
    r = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--metrics",
        str(_metrics_csv(tmp_path / "m.csv")),
        "--metric",
        "nope",
        "--out",
        str(tmp_path / "x"),
    )
    assert r.returncode == 2 and "accuracy" in r.stderr  # a name the file lacks: fix --metric; the error lists them
    assert tree_snapshot(tmp_path) == {**before, "m.csv": tree_snapshot(tmp_path)["m.csv"]}


def test_tables_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    _store(tmp_path / "store", _line)
    out = tmp_path / "out"
    r = run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--metrics",
        str(_metrics_csv(tmp_path / "m.csv")),
        "--metric",
        "accuracy",
        "--out",
        str(out),
        "--json",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    plots = json.loads(r.stdout)["plots"]
    assert plots and all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in plots)
    assert {p.rsplit("/", 1)[-1] for p in plots} >= {"r2_heatmap.png", "r2_heatmap.svg", "linear_modules.png"}
    with open(out / "by_layer_type.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 14 and {r["type"] for r in table} == set(TYPES)
    assert all(float(r["mean_loo_r2"]) == pytest.approx(1.0, abs=1e-9) for r in table)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["most_linear"]) == 10 and len(summary["least_linear"]) == 10
    assert not math.isnan(summary["mean"]["r2_step"])


def test_vectorised_alignment_equals_the_reference_loop():
    """align_to_next (cumulative signs) makes exactly the reference code's backward-walk decisions."""
    import torch

    from rank1tools.math.signs import align_to_next

    def loop(U, V):
        U, V = U.clone(), V.clone()
        for t in range(U.shape[0] - 2, -1, -1):
            if torch.dot(U[t].double(), U[t + 1].double()) < 0:
                U[t], V[t] = -U[t], -V[t]
        return U, V

    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 5, 50):
        for _ in range(20):
            U, V = torch.randn(T, 7, generator=g), torch.randn(T, 3, generator=g)
            for got, want in zip(align_to_next(U, V), loop(U, V)):
                assert torch.equal(got, want)


def test_without_matplotlib_tables_are_written_and_the_hint_given(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, as when the extra is missing
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    _store(tmp_path / "store", _line)
    out = tmp_path / "out"
    r = run_main("fit-pls", str(tmp_path / "store"), "--out", str(out), "-q", "--json")
    assert r.returncode == 0, r.stderr
    assert "rank1: note: no plots: plots need matplotlib: pip install 'rank1tools[plot]'" in r.stderr
    assert json.loads(r.stdout)["plots"] == [] and not (out / "plots").exists() and (out / "fits.csv").is_file()


def test_decompose_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import torch

    from rank1tools.synthetic import LlamaShape, make_base, make_run

    shape = LlamaShape(vocab=32, hidden=16, intermediate=40, layers=2, heads=2, kv_heads=1, tie=True)
    make_base(tmp_path / "base", shape, dtype=torch.float32)
    make_run(tmp_path / "run", [1, 2, 3], shape, base_dtype=torch.float32, dtype=torch.float32)
    r = run_main(
        "decompose",
        str(tmp_path / "base"),
        "--run",
        str(tmp_path / "run"),
        "--rank",
        "2",
        "--plots",
        "--out",
        str(tmp_path / "d"),
        "-q",
        "--json",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    plots = json.loads(r.stdout)["plots"]
    assert sorted(Path(p).name for p in plots) == [
        "energy_by_type.png",
        "energy_by_type.svg",
        "energy_heatmap.png",
        "energy_heatmap.svg",
    ]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots if p.endswith(".png"))


def test_same_inputs_same_bytes(tmp_path):
    pytest.importorskip("matplotlib")
    _store(tmp_path / "store", _line)
    m = _metrics_csv(tmp_path / "m.csv")
    for out in ("a", "b"):
        r = run_main(
            "fit-pls",
            str(tmp_path / "store"),
            "--metrics",
            str(m),
            "--metric",
            "accuracy",
            "--out",
            str(tmp_path / out),
            "-q",
        )
        assert r.returncode == 0, r.stderr
    a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in sorted((tmp_path / "a").rglob("*")) if p.is_file()}
    b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in sorted((tmp_path / "b").rglob("*")) if p.is_file()}
    prov = Path("rank1tools.json")  # its argv names the --out folder
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != prov)
    assert len(a) >= 12
