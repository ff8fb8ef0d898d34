"""rank1 backtest (docs/commands/backtest.md) against a dense float64 numpy computation: the same
fits (per-element least squares, two-point, RELEX) done densely in the test on the checkpoints up
to each cut, compared with the real later checkpoints; planted straight-line and saturating runs;
the files, the recommended jump, the gate and the CLI's exit codes and one-line errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from rank1tools.commands.backtest import BacktestOptions, backtest
from rank1tools.synthetic import write_model

from _extrapolate_support import (
    SHAPE,
    lstsq_reference,
    noisy_run,
    read_folder,
    relex_reference,
    trajectory,
    write_planted,
)
from _support import build_tiny_llama_line_run, run_main

STEPS = [4, 8, 12, 16, 20, 24]
TOL = 1e-6


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("backtest")
    noisy_run(root, STEPS, "fp32")
    base = read_folder(root / "base")
    cks = {s: read_folder(root / "run" / f"checkpoint-{s}") for s in STEPS}
    return root, base, cks


def _figures(pred: np.ndarray, real: np.ndarray) -> dict:
    """rel_error, cosine, norm_ratio from sums (so that tensors can be pooled): float64."""
    return {"err2": ((pred - real) ** 2).sum(), "real2": (real**2).sum(), "pred2": (pred**2).sum(), "dot": pred @ real}


def _ratios(s: dict) -> dict:
    return {
        "rel_error": math.sqrt(s["err2"] / s["real2"]),
        "cosine": s["dot"] / math.sqrt(s["pred2"] * s["real2"]),
        "norm_ratio": math.sqrt(s["pred2"] / s["real2"]),
    }


def _reference(base, cks, cut: int, predict) -> tuple[dict, dict]:
    """Per (tensor, target) and per target (pooled) figures of `predict(name, M, steps, target)`,
    M the float64 updates of the checkpoints up to `cut`."""
    hist = [s for s in STEPS if s <= cut]
    per_tensor, overall = {}, {}
    for target in (s for s in STEPS if s > cut):
        pooled = dict.fromkeys(("err2", "real2", "pred2", "dot"), 0.0)
        for name in base:
            M = trajectory(base, [cks[s] for s in hist], name)
            pred = predict(name, M, hist, target)
            real = cks[target][name].reshape(-1) - base[name].reshape(-1)
            s = _figures(pred, real)
            per_tensor[(name, target)] = _ratios(s)
            for k in pooled:
                pooled[k] += s[k]
        overall[target] = _ratios(pooled)
    return per_tensor, overall


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _lstsq(name, M, hist, target):
    return M[-1] if _is_norm(name) else lstsq_reference(M, hist, target)[0]  # norms held at the cut


def _two_point_from_base(name, M, hist, target):
    return M[-1] * (target / hist[-1])  # --from 0 --to cut, norms extrapolated


def _relex2(name, M, hist, target):
    return relex_reference(M, hist, target, 2)[0]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check(res, out, base, cks, cuts, predict):
    tensors = _rows(out / "tensors.jsonl")
    overall = _rows(out / "backtest.jsonl")
    assert overall == json.loads(json.dumps(res.overall))  # the file holds what the command returned
    for cut in cuts:
        ref_t, ref_o = _reference(base, cks, cut, predict)
        got_t = {(r["tensor"], r["target_step"]): r for r in tensors if r["cut"] == cut}
        assert set(got_t) == set(ref_t)
        for key, want in ref_t.items():
            for k, v in want.items():
                assert got_t[key][k] == pytest.approx(v, rel=TOL, abs=TOL), (cut, key, k)
        got_o = {r["target_step"]: r for r in overall if r["cut"] == cut}
        assert sorted(got_o) == sorted(ref_o)
        for target, want in ref_o.items():
            assert got_o[target]["jump"] == target - cut
            assert got_o[target]["tensors"] == len(base)
            for k, v in want.items():
                assert got_o[target][k] == pytest.approx(v, rel=TOL, abs=TOL), (cut, target, k)
    return tensors, overall


def test_linear_lstsq_matches_dense_reference(noisy, tmp_path):
    root, base, cks = noisy
    out = tmp_path / "bt"
    res = backtest(
        str(root / "base"),
        [],
        str(out),
        run=str(root / "run"),
        options=BacktestOptions(method="linear", cuts=[16, 8], fit={"device": "cpu"}, plots=False),
    )
    tensors, overall = _check(res, out, base, cks, [8, 16], _lstsq)
    sources = {r["tensor"]: r["source"] for r in tensors}
    assert {n for n, s in sources.items() if s == "last"} == {n for n in base if _is_norm(n)}
    # the window of cut 8 spans steps 4..8: a jump of 8 steps is 2 windows
    row = next(r for r in overall if r["cut"] == 8 and r["target_step"] == 16)
    assert row["jump_windows"] == 2.0
    summary = json.loads((out / "summary.json").read_text())
    assert [c["window_length"] for c in summary["cuts"]] == [4, 12]
    with open(out / "backtest.csv") as f:
        assert [float(r["rel_error"]) for r in csv.DictReader(f)] == [r["rel_error"] for r in overall]


def test_two_point_from_base_matches_dense_reference(noisy, tmp_path):
    root, base, cks = noisy
    out = tmp_path / "bt"
    fit = {"mode": "two-point", "from_step": 0, "extrapolate_norms": True, "device": "cpu"}
    res = backtest(
        str(root / "base"),
        [],
        str(out),
        run=str(root / "run"),
        options=BacktestOptions(method="linear", cuts=[12], fit=fit, plots=False),
    )
    _check(res, out, base, cks, [12], _two_point_from_base)
    assert res.summary["cuts"][0]["window_length"] == 12  # --from 0: the window starts at the base


def test_relex_matches_dense_reference(noisy, tmp_path):
    root, base, cks = noisy
    out = tmp_path / "bt"
    res = backtest(
        str(root / "base"),
        [],
        str(out),
        run=str(root / "run"),
        options=BacktestOptions(method="relex", cuts=[12, 20], fit={"rank": 2, "device": "cpu"}, plots=False),
    )
    _check(res, out, base, cks, [12, 20], _relex2)


@pytest.mark.parametrize(
    "method,fit",
    [
        ("linear", {"extrapolate_norms": True}),
        ("linear", {"mode": "two-point", "extrapolate_norms": True}),
        ("relex", {}),
    ],
    ids=["lstsq", "two-point", "relex"],
)
def test_planted_straight_line_has_zero_error_at_every_horizon(tmp_path, method, fit):
    steps = [5, 10, 15, 20, 25, 30]
    base, run, _ = write_planted(tmp_path, steps, SHAPE)
    res = backtest(
        str(base), [], str(tmp_path / "bt"), run=str(run), options=BacktestOptions(method, [10, 20], fit, plots=False)
    )
    assert len(res.overall) == 4 + 2
    for r in res.overall:
        assert r["rel_error"] < 1e-6, r
        assert r["cosine"] == pytest.approx(1.0, abs=1e-9)
        assert r["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    for c in res.summary["cuts"]:  # every jump holds: the recommendation is the run's longest
        assert c["recommended_jump"] == 30 - c["cut"] and c["limited_by_run"]


def _saturating_run(root, steps, tau: float):
    """θ_t = θ₀ + (1 − exp(−t/τ))·D per tensor: a trajectory that bends over and stops."""
    base = {
        n: torch.randn(s, generator=torch.Generator().manual_seed(i)) * 0.02
        for i, (n, s) in enumerate(SHAPE.shapes().items())
    }
    D = {
        n: torch.randn(b.shape, generator=torch.Generator().manual_seed(100 + i)) * 0.01
        for i, (n, b) in enumerate(base.items())
    }
    write_model(root / "base", base, SHAPE.config())
    for s in steps:
        f = 1 - math.exp(-s / tau)
        write_model(root / "run" / f"checkpoint-{s}", {n: base[n] + f * D[n] for n in base}, SHAPE.config())


def test_planted_saturating_run_error_grows_with_the_horizon(tmp_path):
    steps = list(range(4, 41, 4))
    _saturating_run(tmp_path, steps, tau=16.0)
    out = tmp_path / "bt"
    res = backtest(
        str(tmp_path / "base"),
        [],
        str(out),
        run=str(tmp_path / "run"),
        options=BacktestOptions("linear", [12, 20], {"extrapolate_norms": True}, max_error=0.2),
    )
    for cut in (12, 20):
        errors = [r["rel_error"] for r in res.overall if r["cut"] == cut]
        assert all(b > a for a, b in zip(errors, errors[1:])), errors
        ratios = [r["norm_ratio"] for r in res.overall if r["cut"] == cut]
        assert ratios[-1] > 1.2  # the line overshoots a trajectory that stops
        c = next(c for c in res.summary["cuts"] if c["cut"] == cut)
        rows = [r for r in res.overall if r["cut"] == cut]
        passing = [r["jump"] for r in rows if r["rel_error"] < 0.2]
        assert c["recommended_jump"] == (max(passing) if passing else 0)  # errors grow: the last passing jump
        assert not c["limited_by_run"]
    assert res.summary["recommended_jump"] == min(c["recommended_jump"] for c in res.summary["cuts"])
    if res.plots:
        assert (out / "plots" / "error_by_jump.png").stat().st_size > 0


def test_cli_json_gate_and_determinism(noisy, tmp_path):
    root, _, _ = noisy
    args = ["backtest", str(root / "base"), "--run", str(root / "run"), "--method", "linear", "--cuts", "8,16"]
    r1 = run_main(*args, "--out", str(tmp_path / "a"), "--json", "--no-plots", "--device", "cpu")
    assert r1.returncode == 0, r1.stderr
    data = json.loads(r1.stdout)
    worst = max(c["longest"]["rel_error"] for c in data["summary"]["cuts"])
    assert data["gate"] is None
    r2 = run_main(*args, "--out", str(tmp_path / "b"), "--no-plots", "--device", "cpu", "--fail-above", str(worst / 2))
    assert r2.returncode == 5
    assert (
        r2.stderr.splitlines()[-1].startswith("rank1: gate: overall relative update error at the longest jump")
        and "is above --fail-above" in r2.stderr
    )
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["gate"]["passed"] is False
    for f in ("backtest.csv", "backtest.jsonl", "tensors.csv", "tensors.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    r3 = run_main(*args, "--out", str(tmp_path / "c"), "--no-plots", "--device", "cpu", "--fail-above", str(worst))
    assert r3.returncode == 0, r3.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cuts", "40"], "--cuts 40 is past the last checkpoint (step 24)"),
        (["--cuts", "24"], "--cuts 24 is the last checkpoint: no later checkpoint to predict"),
        (["--cuts", "10"], "--cuts 10 is not a checkpoint step of the run (4, 8, 12, 16, 20, 24)"),
        (
            ["--cuts", "4"],
            "--cuts 4: 1 checkpoint up to the cut besides the base (step 4); --method linear fits at least 2",
        ),
        (
            ["--cuts", "8", "--fit-window", "3"],
            "--cuts 8: --fit-window 3: must be between 2 and the 2 history checkpoints",
        ),
        (["--cuts", "0"], "--cuts 0: a cut is a checkpoint step, at least 1"),
        (
            ["--cuts", "8", "--mode", "two-point", "--from", "2"],
            "--cuts 8: --from 2 is not a history step (4, 8, or --from 0 for the base)",
        ),
        (["--cuts", "8", "--rank", "2"], "--rank applies to --method relex, not linear"),
        (["--cuts", "8", "--max-error", "0"], None),
    ],
)
def test_cli_bad_cuts_and_options_exit_2(noisy, tmp_path, extra, message):
    root, _, _ = noisy
    out = tmp_path / "o"
    r = run_main(
        "backtest", str(root / "base"), "--run", str(root / "run"), "--method", "linear", "--out", str(out), *extra
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error:")
    if message:
        assert lines[0] == f"rank1: error: {message}"
    assert not out.exists()


def test_cli_relex_rank_past_the_window_and_other_methods(noisy, tmp_path):
    root, _, _ = noisy
    common = ["backtest", str(root / "base"), "--run", str(root / "run"), "--out", str(tmp_path / "o")]
    r = run_main(*common, "--method", "relex", "--cuts", "8", "--rank", "3")
    assert (r.returncode, r.stderr.strip()) == (
        2,
        "rank1: error: --cuts 8: --rank 3 exceeds the 2 history checkpoints (steps 4..8)",
    )
    r = run_main(*common, "--method", "relex", "--cuts", "8", "--mode", "two-point")
    assert (r.returncode, r.stderr.strip()) == (2, "rank1: error: --mode applies to --method linear, not relex")
    r = run_main(*common, "--method", "alpharl", "--cuts", "8")
    assert r.returncode == 2 and r.stderr.startswith("rank1: error:") and "relex" in r.stderr


def test_cli_input_and_output_errors(noisy, tmp_path):
    root, _, _ = noisy
    r = run_main(
        "backtest",
        str(root / "base"),
        "--run",
        str(tmp_path / "none"),
        "--method",
        "linear",
        "--cuts",
        "8",
        "--out",
        str(tmp_path / "o"),
    )
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("not rank1's\n")
    r = run_main(
        "backtest",
        str(root / "base"),
        "--run",
        str(root / "run"),
        "--method",
        "linear",
        "--cuts",
        "8",
        "--out",
        str(taken),
        "--force",
    )
    assert r.returncode == 4 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (taken / "mine.txt").read_text() == "not rank1's\n"


def test_read_recommended_jump_from_an_output(noisy, tmp_path):
    from rank1tools.commands.backtest.tables import read_recommended_jump
    from rank1tools.errors import InputError

    root, _, _ = noisy
    out = tmp_path / "bt"
    res = backtest(
        str(root / "base"),
        [],
        str(out),
        run=str(root / "run"),
        options=BacktestOptions("relex", [8, 16], {"device": "cpu"}, max_error=0.3, plots=False),
    )
    per_cut = {c["cut"]: c["recommended_jump"] for c in res.summary["cuts"]}
    assert read_recommended_jump(out) == min(per_cut.values()) == res.summary["recommended_jump"]
    assert read_recommended_jump(str(out), cut=16) == per_cut[16]
    with pytest.raises(InputError, match=r"summary.json: no cut at step 12 \(cuts: 8, 16\)"):
        read_recommended_jump(out, cut=12)
    with pytest.raises(InputError, match="cannot read a backtest summary"):
        read_recommended_jump(tmp_path / "none")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text('{"steps": [1]}\n')
    with pytest.raises(InputError, match="not a rank1 backtest summary"):
        read_recommended_jump(tmp_path / "other")
    pytest.importorskip("transformers")
    from rank1tools.integrations.trl import ReGroundCallback

    cb = ReGroundCallback.from_backtest(str(out), 4, cut=16, method="two-point")
    assert (cb.train_steps, cb.jump_steps) == (4, per_cut[16])
    assert ReGroundCallback.from_backtest(str(out), 4).jump_steps == res.summary["recommended_jump"]


@pytest.fixture(scope="module")
def tiny_llama_run(tmp_path_factory):
    """base/ (with the demo tokenizer) and run/checkpoint-{10..40}/ of a Llama built by
    transformers, its weights on a line plus noise; rollouts.jsonl."""
    transformers = pytest.importorskip("transformers")
    root = build_tiny_llama_line_run(tmp_path_factory.mktemp("bt-llama"), transformers)
    rollouts = [("2+3=", "5"), ("12+30=", "42"), ("7+7=", "14+0"), ("1+1+1+1=", "4444")]
    (root / "rollouts.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rollouts)
    )
    return root, rollouts


def test_output_space_figures_equal_a_direct_forward(tiny_llama_run, tmp_path):
    """--data: mean |Δ log-prob| and mean KL(P_real ‖ P_predicted) of the predicted model (dense
    numpy lstsq lines, loaded into a transformers model) against each real checkpoint, one
    sequence at a time, in float64 from the float32 logits."""
    import transformers

    from rank1tools.engine.model_loading import ModelOptions
    from rank1tools.engine.model_scoring import tokenize_pair

    root, rollouts = tiny_llama_run
    res = backtest(
        str(root / "base"),
        [],
        str(tmp_path / "bt"),
        run=str(root / "run"),
        options=BacktestOptions(
            "linear",
            [20, 30],
            {"extrapolate_norms": True, "device": "cpu"},
            plots=False,
            data=str(root / "rollouts.jsonl"),
            model=ModelOptions(device="cpu", dtype="float32", batch_size=3),
        ),
    )
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "base"))
    pairs = [tokenize_pair(tok, p, c) for p, c in rollouts]
    base = read_folder(root / "base")
    cks = {s: read_folder(root / "run" / f"checkpoint-{s}") for s in (10, 20, 30, 40)}

    def logsoftmax(folder=None, state=None):
        model = transformers.LlamaForCausalLM.from_pretrained(str(folder or root / "base")).eval()
        if state is not None:
            model.load_state_dict({k: torch.from_numpy(v).to(torch.float32) for k, v in state.items()})
        out = []
        with torch.no_grad():
            for p in pairs:
                logits = model(torch.tensor([p.ids])).logits[0, p.start - 1 : len(p.ids) - 1].double()
                out.append((torch.log_softmax(logits, -1), torch.tensor(p.ids[p.start :])))
        return out

    rows = {(r["cut"], r["target_step"]): r for r in res.overall}
    assert sorted(rows) == [(20, 30), (20, 40), (30, 40)]
    for (cut, target), row in rows.items():
        hist = [s for s in (10, 20, 30) if s <= cut]
        pred = {
            n: base[n] + lstsq_reference(trajectory(base, [cks[s] for s in hist], n), hist, target)[0].reshape(v.shape)
            for n, v in base.items()
        }
        real, predicted = logsoftmax(folder=root / "run" / f"checkpoint-{target}"), logsoftmax(state=pred)
        mad = kl = 0.0
        n = 0
        for (lr, ids), (lp, _) in zip(real, predicted):
            tr, tp = lr.gather(-1, ids[:, None]), lp.gather(-1, ids[:, None])
            mad += float((tr - tp).abs().sum())
            kl += float((lr.exp() * (lr - lp)).sum())
            n += len(ids)
        assert row["tokens"] == n
        assert row["logprob_mad"] == pytest.approx(mad / n, rel=1e-4, abs=1e-6), (cut, target)
        assert row["kl"] == pytest.approx(kl / n, rel=1e-4, abs=1e-6), (cut, target)
        assert row["kl"] > 0
    summary = json.loads((tmp_path / "bt" / "summary.json").read_text())
    assert summary["cuts"][0]["longest"]["kl"] == rows[(20, 40)]["kl"]


def test_cli_data_options(tiny_llama_run, tmp_path):
    root, _ = tiny_llama_run
    common = ["backtest", str(root / "base"), "--run", str(root / "run"), "--method", "linear", "--cuts", "20"]
    r = run_main(*common, "--out", str(tmp_path / "a"), "--batch-size", "2")
    assert (r.returncode, r.stderr.strip()) == (2, "rank1: error: --batch-size applies with --data")
    r = run_main(*common, "--out", str(tmp_path / "b"), "--data", str(tmp_path / "none.jsonl"))
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "b").exists()
    r = run_main(
        *common, "--out", str(tmp_path / "c"), "--data", str(root / "rollouts.jsonl"), "--device", "cpu", "--no-plots"
    )
    assert r.returncode == 0, r.stderr
    assert "KL" in r.stdout
    with open(tmp_path / "c" / "backtest.csv") as f:
        assert all(float(row["kl"]) > 0 and int(row["tokens"]) > 0 for row in csv.DictReader(f))
