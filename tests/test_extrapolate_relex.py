"""rank1 extrapolate --method relex against a dense float64 numpy SVD
(docs/concepts.md#extrapolation-three-methods): generated and planted
runs, uneven spacing vs --position-index, fit window 2 = trajectory rank-r reconstruction, several
targets in one pass, --rest, an untied lm_head, errors through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rank1tools.commands.extrapolate.base import REPORT_FILE
from rank1tools.commands.extrapolate.registry import ExtrapolateOptions
from rank1tools.commands.extrapolate.relex import extrapolate_relex
from rank1tools.engine.checkpoint_outputs import ROUNDING_FILE
from rank1tools.synthetic import LlamaShape, make_base, write_model

from _extrapolate_support import (
    assert_update_close,
    file_bytes,
    noisy_run,
    read_folder,
    relex_reference,
    report,
    trajectory,
    write_planted,
)
from _support import run_main

STEPS = [10, 20, 30, 40]


def _opts(**kw) -> ExtrapolateOptions:
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    return ExtrapolateOptions(method="relex", **kw)


@pytest.fixture(scope="module", params=["fp32", "bf16-base"])
def noisy(request, tmp_path_factory):
    """A generated run with dense noise (trajectory rank > 1); bf16-base: bf16 base, fp32 checkpoints."""
    root = tmp_path_factory.mktemp("relex")
    bdt = noisy_run(root, STEPS, request.param)
    return root, bdt


def test_matches_dense_svd_reference(noisy, tmp_path):
    root, bdt = noisy
    out = tmp_path / "out"
    res = extrapolate_relex(
        str(root / "base"), str(out), options=_opts(run=str(root / "run"), target_steps=[30, 100], rank=2, fit_window=3)
    )
    base = read_folder(root / "base")
    cks = [read_folder(root / "run" / f"checkpoint-{s}") for s in STEPS]
    assert res.history_steps == STEPS and len(res.tensors) == len(base)  # every tensor, norms included
    worst = 0.0
    for j, s in enumerate([30, 100]):
        folder = out / f"step-{s}"
        got = read_folder(folder)
        assert set(got) == set(base)
        rows = {r["tensor"]: r for r in report(folder, REPORT_FILE)["tensors"]}
        for name in base:
            pred, fig = relex_reference(trajectory(base, cks, name), STEPS, s, r=2, W=3)
            worst = max(worst, assert_update_close(got[name], base[name], pred, f"{name} step {s}"))
            assert rows[name]["explained_variance"] == pytest.approx(fig["explained_variance"], rel=1e-9)
            assert rows[name]["norm_ratio"] == pytest.approx(fig["norm_ratio"], rel=1e-6)
            assert (
                res.tensors[[t["tensor"] for t in res.tensors].index(name)]["norm_ratio"][str(s)]
                == rows[name]["norm_ratio"]
            )
        ratios = sorted(r["norm_ratio"] for r in rows.values())
        assert res.outputs[j].norm_ratio_max == ratios[-1]
        assert res.outputs[j].path == str(out / f"step-{s}")
    assert worst < 1e-6
    # loads like the base: config dtype updated, tokenizer files, provenance with every parameter
    f = out / "step-100"
    assert json.loads((f / "config.json").read_text())["torch_dtype"] == "float32"
    assert (f / "tokenizer_config.json").read_bytes() == (root / "base" / "tokenizer_config.json").read_bytes()
    prov = json.loads((f / "rank1tools.json").read_text())
    p = prov["parameters"]
    assert prov["command"] == "extrapolate" and len(prov["inputs"]) == 1 + len(STEPS)
    assert (p["method"], p["rank"], p["fit_window"], p["position_index"], p["target_step"], p["history_steps"]) == (
        "relex",
        2,
        3,
        False,
        100,
        STEPS,
    )
    assert report(f, ROUNDING_FILE)["updated_elements"] > 0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """θ_t = θ₀ + t·D, exactly linear and trajectory rank 1; model.norm.weight never moves."""
    root = tmp_path_factory.mktemp("planted")
    base, run, truth = write_planted(root, STEPS, still=("model.norm.weight",))
    return base, run, truth


def test_planted_line_recovers_future_checkpoint(planted, tmp_path):
    base_dir, run, truth = planted
    out = tmp_path / "out"
    res = extrapolate_relex(str(base_dir), str(out), options=_opts(run=str(run), target_steps=[100]))
    got, base, want = read_folder(out), read_folder(base_dir), truth(100)
    for name in base:
        # inputs are float32: 1e-5 of the update covers their rounding, amplified by the extrapolation
        assert_update_close(got[name], base[name], want[name] - base[name], name, rel=1e-5)
    still = next(t for t in res.tensors if t["tensor"] == "model.norm.weight")
    assert math.isnan(still["norm_ratio"]["100"]) and math.isnan(still["explained_variance"])
    assert np.array_equal(got["model.norm.weight"], base["model.norm.weight"])  # written as the base
    moving = [t["norm_ratio"]["100"] for t in res.tensors if t["tensor"] != "model.norm.weight"]
    assert np.allclose(moving, 100 / 40, rtol=1e-5)  # ‖100·D‖ / ‖40·D‖
    assert res.outputs[0].flagged == [] and res.outputs[0].norm_ratio_max == pytest.approx(2.5, rel=1e-5)


def test_uneven_spacing_steps_vs_position_index(tmp_path):
    steps = [1, 2, 4, 8, 16]
    small = LlamaShape(vocab=32, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, tie=True)
    base_dir, run, truth = write_planted(tmp_path, steps, small)
    base, want = read_folder(base_dir), truth(32)
    extrapolate_relex(str(base_dir), str(tmp_path / "steps"), options=_opts(run=str(run), target_steps=[32]))
    res = extrapolate_relex(
        str(base_dir), str(tmp_path / "pos"), options=_opts(run=str(run), target_steps=[32], position_index=True)
    )
    assert any("unevenly spaced" in n for n in res.notes)
    on_steps, on_pos = read_folder(tmp_path / "steps"), read_folder(tmp_path / "pos")
    cks = [read_folder(run / f"checkpoint-{s}") for s in steps]
    name = "model.layers.0.mlp.down_proj.weight"
    true_update = want[name] - base[name]
    assert_update_close(on_steps[name], base[name], true_update, "steps", rel=1e-5)
    # positions 0..4 for steps 1,2,4,8,16: the line through (i, 2^i) puts step 32 at position 8.27
    # and predicts 28.76 instead of 32: the update comes out 10% short
    pos_ref, _ = relex_reference(trajectory(base, cks, name), steps, 32, r=1, positions=True)
    assert_update_close(on_pos[name], base[name], pos_ref, "position index")
    shrink = float(np.linalg.norm(on_pos[name] - base[name]) / np.linalg.norm(true_update))
    assert shrink == pytest.approx(28.76 / 32, abs=2e-3)


def test_fit_window_2_at_last_step_is_trajectory_reconstruction(noisy, tmp_path):
    root, _ = noisy
    base = read_folder(root / "base")
    cks = [read_folder(root / "run" / f"checkpoint-{s}") for s in STEPS]
    for r in (2, len(STEPS)):
        out = tmp_path / f"r{r}"
        extrapolate_relex(
            str(root / "base"), str(out), options=_opts(run=str(root / "run"), target_steps=[40], rank=r, fit_window=2)
        )
        got = read_folder(out)
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
            M = trajectory(base, cks, name)
            U, _, _ = np.linalg.svd(M, full_matrices=False)
            row = (U[:, :r] @ U[:, :r].T @ M)[-1]  # row T of U_r U_rᵀ M
            assert_update_close(got[name], base[name], row, f"{name} r={r}")
            if r == len(STEPS):
                assert_update_close(got[name], base[name], M[-1], f"{name} r=T is the checkpoint")


def test_several_targets_equal_separate_runs_byte_for_byte(noisy, tmp_path):
    root, _ = noisy
    kw = dict(run=str(root / "run"), rank=2, dtype="auto")
    extrapolate_relex(str(root / "base"), str(tmp_path / "all"), options=_opts(target_steps=[60, 25, 200], **kw))
    for s in (60, 25, 200):
        one = tmp_path / f"one-{s}"
        extrapolate_relex(str(root / "base"), str(one), options=_opts(target_steps=[s], **kw))
        both = tmp_path / "all" / f"step-{s}"
        assert file_bytes(both) == file_bytes(one) and file_bytes(one)
        for f in (REPORT_FILE, ROUNDING_FILE):
            assert (both / f).read_bytes() == (one / f).read_bytes()


def test_rest_last_and_base_for_excluded_tensors(noisy, tmp_path):
    root, bdt = noisy
    base_t = {n: t for n, t in _raw(root / "base").items()}
    last = _raw(root / "run" / "checkpoint-40")
    for rest in ("last", "base"):
        out = tmp_path / rest
        res = extrapolate_relex(
            str(root / "base"),
            str(out),
            options=_opts(run=str(root / "run"), target_steps=[80], exclude=["*.mlp.*"], rest=rest, dtype="auto"),
        )
        got = _raw(out)
        mlp = [n for n in got if ".mlp." in n]
        assert mlp and all(t["tensor"] not in mlp for t in res.tensors)
        for n in mlp:
            want = (last[n] if rest == "last" else base_t[n]).to(bdt)
            assert got[n].dtype == bdt and torch.equal(got[n], want), n
        assert not torch.equal(
            got["model.layers.0.self_attn.q_proj.weight"], base_t["model.layers.0.self_attn.q_proj.weight"]
        )


def _raw(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def test_untied_head_is_its_own_tensor(tmp_path):
    """The base ties lm_head; the checkpoints store one: it is extrapolated from the embedding's base value."""
    shape = LlamaShape(vocab=32, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, tie=True)
    make_base(tmp_path / "base", shape)
    base = read_folder(tmp_path / "base")
    emb = base["model.embed_tokens.weight"]
    rng = np.random.default_rng(0)
    D = rng.standard_normal(emb.shape) * 1e-3
    for s in STEPS:
        t = {n: torch.from_numpy(v).float() for n, v in base.items()}
        t["lm_head.weight"] = torch.from_numpy(emb + s * D).float()
        write_model(tmp_path / "run" / f"checkpoint-{s}", t, {**shape.config(), "tie_word_embeddings": False})
    res = extrapolate_relex(
        str(tmp_path / "base"), str(tmp_path / "out"), options=_opts(run=str(tmp_path / "run"), target_steps=[80])
    )
    got = read_folder(tmp_path / "out")
    assert_update_close(got["lm_head.weight"], emb, 80 * D, "lm_head", rel=1e-5)
    assert np.array_equal(got["model.embed_tokens.weight"], emb)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("tie_word_embeddings: false" in n for n in res.notes)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--history-until", "50"], "--history-until 50 is past the last checkpoint (step 40)"),
        (["--history-until", "15"], "needs at least 2 history checkpoints up to --history-until 15"),
        (["--target-step", "5"], "--target-step 5 is before the first history checkpoint (step 10)"),
        (["--rank", "5"], "--rank 5 exceeds the 4 history checkpoints"),
        (["--fit-window", "6"], "--fit-window 6: must be between 2 and the 4 history checkpoints"),
        (["--from", "10"], "--from applies to --method linear"),
    ],
)
def test_cli_errors_write_nothing(noisy, tmp_path, args, needle):
    root, _ = noisy
    out = tmp_path / "out"
    argv = ["extrapolate", str(root / "base"), "--run", str(root / "run"), "--method", "relex", "--out", str(out)]
    if "--target-step" not in args:
        argv += ["--target-step", "80"]
    r = run_main(*argv, *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("rank1: error:") and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == "" and not out.exists()


def test_history_until_equals_those_checkpoints_as_arguments(noisy, tmp_path):
    root, _ = noisy
    calls = []
    extrapolate_relex(
        str(root / "base"),
        str(tmp_path / "until"),
        options=_opts(run=str(root / "run"), history_until=30, target_steps=[60], dtype="auto"),
        progress=lambda done, total: calls.append((done, total)),
    )
    res = extrapolate_relex(
        str(root / "base"),
        str(tmp_path / "args"),
        options=_opts(
            checkpoints=[str(root / "run" / f"checkpoint-{s}") for s in (30, 10, 20)], target_steps=[60], dtype="auto"
        ),
    )
    assert res.history_steps == [10, 20, 30]
    assert file_bytes(tmp_path / "until") == file_bytes(tmp_path / "args")
    n = len(read_folder(root / "base"))
    assert calls == [(i, n) for i in range(1, n + 1)]  # once per tensor written


def test_non_finite_checkpoint_is_refused(noisy, tmp_path):
    root, _ = noisy
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    f = run / "checkpoint-20" / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(root / "base"),
        "--run",
        str(run),
        "--method",
        "relex",
        "--target-step",
        "80",
        "--out",
        str(out),
    )
    assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
    assert "checkpoint-20" in r.stderr and "'model.layers.1.mlp.up_proj.weight' has non-finite values" in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_integer_tensors_are_copied_never_extrapolated(tmp_path):
    shape = LlamaShape(vocab=32, hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1, tie=True)
    make_base(tmp_path / "base", shape)
    base = {n: torch.from_numpy(v).float() for n, v in read_folder(tmp_path / "base").items()}
    write_model(tmp_path / "base", {**base, "model.ids": torch.arange(5)}, shape.config())
    for s in STEPS:
        t = {n: v + s * 1e-3 for n, v in base.items()}
        write_model(tmp_path / "run" / f"checkpoint-{s}", {**t, "model.ids": torch.arange(5) * s}, shape.config())
    for rest in ("last", "base"):
        res = extrapolate_relex(
            str(tmp_path / "base"),
            str(tmp_path / f"out-{rest}"),
            options=_opts(run=str(tmp_path / "run"), target_steps=[80], rest=rest),
        )
        got = _raw(tmp_path / f"out-{rest}")["model.ids"]
        assert got.dtype == torch.int64 and torch.equal(got, torch.arange(5) * (40 if rest == "last" else 1))
        assert "model.ids" not in {t["tensor"] for t in res.tensors} and len(res.tensors) == len(base)
