"""`rank1 demo`: the trained GRPO run end to end (--quick) and the planted synthetic run.

The end-to-end test runs every command through `rank1 demo --quick` and checks that what it wrote
loads and is consistent: the results table against the files, a full-rank reconstruction against
the checkpoint, and RELEX at a step inside its history against an independent numpy computation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rank1tools.io.checkpoint import open_checkpoint

from _support import run_main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    r = run_main("demo", "--quick", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def _tensors(folder) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(str(folder))
    return {name: ck.read(name) for name in ck.entries}


@pytest.mark.training
def test_quick_demo_table_is_consistent_with_its_files(quick_demo):
    from rank1tools.demo import DemoTraining, evaluate_checkpoint

    out, res = quick_demo
    assert json.loads((out / "results.json").read_text()) == res
    rows = {r["name"].split(" (")[0]: r for r in res["rows"]}
    logit_rows = [r for r in res["rows"] if r["name"].startswith("logits ")]
    assert len(res["rows"]) == 8 + len(logit_rows) and len(logit_rows) == 1  # --quick: steps 3..15, cut 9: B = 12
    base, final = res["rows"][0], res["rows"][2]
    assert base["step"] == 0 and final["step"] == res["final"] == res["steps"][-1]
    assert res["steps"][0] < res["cut"] < res["final"]
    config = DemoTraining.quick(res["seed"])
    for r in res["rows"]:
        assert Path(r["path"]).is_dir() or r in logit_rows, r["name"]
        assert 0.0 <= r["accuracy"] <= 1.0
        expected = (
            (r["accuracy"] - base["accuracy"]) / (final["accuracy"] - base["accuracy"])
            if final["accuracy"] != base["accuracy"]
            else None
        )
        assert r["kept"] == pytest.approx(expected) if expected is not None else r["kept"] is None
    # the accuracies are the evaluator's on the written folders (re-evaluated here)
    for r in (res["rows"][0], res["rows"][2], res["rows"][4]):
        assert evaluate_checkpoint(r["path"], config) == r["accuracy"], r["name"]
    # the run's curve in the table is the metrics file fit-pls read
    lines = (out / "run" / "metrics.csv").read_text().split()
    assert lines[0] == "step,accuracy"
    curve = {int(a): float(b) for a, b in (line.split(",") for line in lines[1:])}
    assert [p["step"] for p in res["curve"]] == sorted(curve) == [0, *res["steps"]]
    assert {p["step"]: p["accuracy"] for p in res["curve"]} == pytest.approx(curve)
    for key, value in res["figures"].items():
        assert value is not None and math.isfinite(value), key
    assert 0 < res["figures"]["energy_1_mean"] <= 1
    assert "relex" in rows and "alpharl" in rows


@pytest.mark.training
def test_quick_demo_outputs_of_every_command(quick_demo):
    out, res = quick_demo
    for folder in (
        "decompose",
        "fit-pls",
        "fit-pls-window",
        "linearity",
        "rank-1",
        "extrapolate-relex",
        "extrapolate-linear",
        "extrapolate-alpharl",
        "relex-whole-run",
    ):
        assert (out / folder / "rank1tools.json").is_file(), folder
    base = _tensors(out / "base")
    for r in res["rows"][3:8]:
        got = _tensors(r["path"])
        assert set(got) == set(base), r["name"]
        assert all(torch.isfinite(t).all() for t in got.values()), r["name"]


def _ranks(values):
    """Average ranks (ties share the mean of their positions), numpy only."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


@pytest.mark.training
def test_quick_demo_backtest_beside_the_table(quick_demo):
    """The demo's backtest: its rows are the backtest output's, each prediction's accuracy is the
    evaluator's on the written step folder, the tracking figures are Spearman's ρ recomputed here,
    and the auto re-grounding schedule is the segment's backtest recommendation."""
    from rank1tools.demo import DemoTraining, evaluate_checkpoint

    out, res = quick_demo
    bt, curve = res["backtest"], {p["step"]: p["accuracy"] for p in res["curve"]}
    config = DemoTraining.quick(res["seed"])
    later = [s for s in res["steps"] if s > res["cut"]]
    points = []
    for name in ("relex", "linear"):
        m = bt["methods"][name]
        written = json.loads((out / f"backtest-{name}" / "summary.json").read_text())
        assert written["cuts"][0]["recommended_jump"] == m["recommended_jump"]
        assert [r["target_step"] for r in m["rows"]] == later
        assert [r["jump"] for r in m["rows"]] == [s - res["cut"] for s in later]
        for r in m["rows"]:
            assert r["accuracy_real"] == curve[r["target_step"]]
            assert {"logprob_mad", "kl"} <= set(r)  # the base rollouts were given (--data)
        last = m["rows"][-1]
        folder = out / f"predicted-{name}" / f"step-{last['target_step']}"
        assert evaluate_checkpoint(folder, config) == last["accuracy_predicted"]
        points += m["rows"]
    # the prediction at the final step is the table's row of the same method (same fit, same bytes)
    rows = {r["name"]: r for r in res["rows"]}
    assert bt["methods"]["relex"]["rows"][-1]["accuracy_predicted"] == rows["relex (rank 1)"]["accuracy"]
    assert bt["methods"]["linear"]["rows"][-1]["accuracy_predicted"] == rows["linear lstsq"]["accuracy"]
    shortfall = _ranks([p["accuracy_real"] - p["accuracy_predicted"] for p in points])
    for figure, distance in (("rel_error", lambda p: p["rel_error"]), ("kl", lambda p: p["kl"])):
        want = np.corrcoef(_ranks([distance(p) for p in points]), shortfall)[0, 1]
        assert bt["tracking"][figure] == pytest.approx(want, abs=1e-12), figure
    assert sorted(bt["tracked"] + bt["not_tracked"]) == sorted(bt["tracking"])
    # auto schedule: M = two checkpoint intervals before the cut, N = that segment's recommended jump
    seg = bt["reground"]
    assert seg["segment"] == res["cut"] - res["steps"][res["steps"].index(res["cut"]) - 2]
    written = json.loads((out / "backtest-reground" / "summary.json").read_text())
    assert written["cuts"][0]["recommended_jump"] == seg["recommended_jump"]
    assert written["method_parameters"][str(res["cut"])]["mode"] == "two-point"
    arm = res["reground"]
    assert arm["schedule"] == "backtest"
    assert (arm["train_steps"], arm["jump_steps"]) == (seg["segment"], seg["recommended_jump"])
    assert [p["step"] for p in arm["curve"]] == [0, *res["steps"]]


@pytest.mark.training
def test_full_rank_reconstruction_equals_the_checkpoint(quick_demo, tmp_path):
    out, res = quick_demo
    final = out / "run" / f"checkpoint-{res['final']}"
    r = run_main(
        "reconstruct",
        str(out / "base"),
        str(final),
        "--rank",
        "100%",
        "--exact",
        "--rest",
        "checkpoint",
        "--dtype",
        "float32",
        "--out",
        str(tmp_path / "full"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    want, got = _tensors(final), _tensors(tmp_path / "full")
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-6, msg=name)


@pytest.mark.training
def test_relex_inside_the_history_equals_the_trajectory_reconstruction(quick_demo, tmp_path):
    """RELEX rank 1 at a history step: the rank-1 trajectory basis of the stacked updates, its
    coefficients fitted by a line over the steps, evaluated there (numpy float64, dense SVD)."""
    out, res = quick_demo
    steps = [s for s in res["steps"] if s <= res["cut"]]
    inside = steps[1]
    r = run_main(
        "extrapolate",
        str(out / "base"),
        "--method",
        "relex",
        "--run",
        str(out / "run"),
        "--history-until",
        str(res["cut"]),
        "--target-step",
        str(inside),
        "--out",
        str(tmp_path / "relex"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    got = _tensors(tmp_path / "relex")
    base = _tensors(out / "base")
    name = "model.layers.0.mlp.down_proj.weight"
    M = np.stack(
        [(_tensors(out / "run" / f"checkpoint-{s}")[name] - base[name]).double().numpy().ravel() for s in steps]
    )
    _, sv, vt = np.linalg.svd(M, full_matrices=False)
    c = M @ vt[0]
    slope, intercept = np.polyfit(np.array(steps, dtype=np.float64), c, 1)
    want = base[name].double().numpy().ravel() + (intercept + slope * inside) * vt[0]
    np.testing.assert_allclose(got[name].double().numpy().ravel(), want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_synthetic_demo_keeps_the_planted_run(tmp_path):
    r = run_main("demo", "--synthetic", "--out", str(tmp_path / "syn"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["run"]["checkpoints"] and (tmp_path / "syn" / "rank-1" / "rank1tools.json").is_file()
    assert res["decompose"]["summary"]["overall"]["energy_1"] > 0.5


def test_synthetic_refuses_training_options(tmp_path):
    r = run_main("demo", "--synthetic", "--quick", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "--quick" in r.stderr and not (tmp_path / "x").exists()


@pytest.mark.training
def test_logit_extrapolation_rows_equal_the_formula_on_the_demo_model(quick_demo):
    """Each output-space row's accuracy is greedy decoding from logits_A + α(logits_B − logits_A),
    recomputed here with the demo's own model code (not transformers), teacher-forced: greedy
    decoding emits the answer iff every answer position's argmax is the answer's token."""
    from rank1tools.demo import DemoTraining
    from rank1tools.demo.model import TinyLlama, load_weights
    from rank1tools.demo.train import make_task
    from rank1tools.io.rollouts import read_rollouts

    out, res = quick_demo
    config = DemoTraining.quick(res["seed"])
    task = make_task(config)
    (row,) = [r for r in res["rows"] if r["name"].startswith("logits ")]
    a, b = (int(s) for s in row["name"].removeprefix("logits ").split("→"))
    assert a == res["cut"] and a < b < res["final"]
    alpha = (res["final"] - a) / (b - a)
    models = []
    for step in (a, b):
        m = TinyLlama(config.model_config())
        load_weights(m, out / "run" / f"checkpoint-{step}")
        models.append(m.eval())
    p, ans = task.eval_prompts, task.eval_answers
    with torch.no_grad():
        ids = torch.cat([p, ans[:, :-1]], dim=1)
        la, lb = (m(ids)[:, p.shape[1] - 1 :].float() for m in models)
        combined = la + alpha * (lb - la)
    correct = (combined.argmax(dim=-1) == ans).all(dim=1)
    assert row["accuracy"] == int(correct.sum()) / len(correct)
    written = read_rollouts(row["path"])
    assert len(written) == len(task.eval_pairs)
    assert {json.dumps(r.extra["generation"]["alpha"]) for r in written} == {json.dumps(alpha)}


@pytest.mark.training
def test_logprobs_of_the_base_rollouts(quick_demo):
    out, res = quick_demo
    summary = json.loads((out / "logprobs" / "summary.json").read_text())
    assert summary["steps"] == [0, *res["steps"]]
    assert res["figures"]["logprob_tokens_linear"] == summary["headline"]["frac_r2_above_0.7"]
    assert res["figures"]["logprob_r2_mean"] == summary["headline"]["r2_mean"]
    from rank1tools.demo.task import reward
    from rank1tools.io.rollouts import read_rollouts

    rollouts = read_rollouts(out / "rollouts-base.jsonl")
    assert len(rollouts) == summary["sequences"] == 128
    # the base's greedy completions: their accuracy is the base's on those prompts
    base_acc = sum(reward(r.prompt, r.completion) for r in rollouts) / len(rollouts)
    assert 0 < base_acc < 1
