"""rank1 extrapolate --method linear against dense float64 numpy lines
(docs/concepts.md#extrapolation-three-methods): per-element least
squares (values and norm ratios), two-point, planted recovery, norm weights copied vs
--extrapolate-norms, several targets in one pass, errors through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rank1tools.commands.extrapolate.base import REPORT_FILE
from rank1tools.commands.extrapolate.linear import extrapolate_linear
from rank1tools.commands.extrapolate.registry import ExtrapolateOptions

from _extrapolate_support import (
    assert_update_close,
    file_bytes,
    lstsq_reference,
    noisy_run,
    read_folder,
    report,
    trajectory,
    write_planted,
)
from _support import run_main

STEPS = [10, 20, 30, 40, 50]
NORMS = ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight")


def _opts(**kw) -> ExtrapolateOptions:
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    return ExtrapolateOptions(method="linear", **kw)


@pytest.fixture(scope="module", params=["fp32", "bf16-base"])
def noisy(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("linear")
    bdt = noisy_run(root, STEPS, request.param)
    base = read_folder(root / "base")
    cks = [read_folder(root / "run" / f"checkpoint-{s}") for s in STEPS]
    return root, bdt, base, cks


def test_lstsq_matches_dense_reference(noisy, tmp_path):
    root, _, base, cks = noisy
    out = tmp_path / "out"
    res = extrapolate_linear(
        str(root / "base"),
        str(out),
        options=_opts(run=str(root / "run"), target_steps=[35, 120], fit_window=4, extrapolate_norms=True),
    )
    assert len(res.tensors) == len(base)
    for s in (35, 120):
        got = read_folder(out / f"step-{s}")
        rows = {r["tensor"]: r for r in report(out / f"step-{s}", REPORT_FILE)["tensors"]}
        for name in base:
            M = trajectory(base, cks, name)[-4:]
            pred, _ = lstsq_reference(M, STEPS[-4:], s)
            assert_update_close(got[name], base[name], pred, f"{name} step {s}")
            row = rows[name]
            assert row["norm_ratio"] == pytest.approx(np.linalg.norm(pred) / np.linalg.norm(M[-1]), rel=1e-6)
    p = json.loads((out / "step-120" / "rank1tools.json").read_text())["parameters"]
    assert (p["method"], p["mode"], p["fit_window"], p["fit_steps"], p["target_step"]) == (
        "linear",
        "lstsq",
        4,
        STEPS[-4:],
        120,
    )


@pytest.mark.parametrize("frm,to", [(None, None), (20, 40), (0, 50)])
def test_two_point_matches_dense_reference(noisy, tmp_path, frm, to):
    root, _, base, cks = noisy
    out = tmp_path / "out"
    extrapolate_linear(
        str(root / "base"),
        str(out),
        options=_opts(
            run=str(root / "run"),
            target_steps=[100],
            mode="two-point",
            from_step=frm,
            to_step=to,
            extrapolate_norms=True,
        ),
    )
    a, b = STEPS[0] if frm is None else frm, to or STEPS[-1]
    got = read_folder(out)
    rows = {r["tensor"]: r for r in report(out, REPORT_FILE)["tensors"]}
    for name in base:
        M = trajectory(base, cks, name)
        da = np.zeros_like(M[0]) if a == 0 else M[STEPS.index(a)]  # --from 0: the base, a zero update
        db = M[STEPS.index(b)]
        pred = da + (100 - a) / (b - a) * (db - da)  # θ_a + (s − a)/(b − a)(θ_b − θ_a), as an update
        assert_update_close(got[name], base[name], pred, name)
        assert rows[name]["norm_ratio"] == pytest.approx(np.linalg.norm(pred) / np.linalg.norm(M[-1]), rel=1e-6)
    p = json.loads((out / "rank1tools.json").read_text())["parameters"]
    assert (p["mode"], p["from"], p["to"]) == ("two-point", a, b)
    assert len(json.loads((out / "rank1tools.json").read_text())["inputs"]) == 1 + len({a, b, STEPS[-1]} - {0})


def test_planted_line_recovered_by_lstsq_and_two_point(tmp_path):
    base_dir, run, truth = write_planted(tmp_path, [10, 20, 30, 40])
    base, want = read_folder(base_dir), truth(100)
    for mode in ("lstsq", "two-point"):
        out = tmp_path / mode
        res = extrapolate_linear(
            str(base_dir), str(out), options=_opts(run=str(run), target_steps=[100], mode=mode, extrapolate_norms=True)
        )
        got = read_folder(out)
        for name in base:
            assert_update_close(got[name], base[name], want[name] - base[name], f"{mode} {name}", rel=1e-5)
        assert np.allclose([t["norm_ratio"]["100"] for t in res.tensors], 2.5, rtol=1e-5)


def test_norm_weights_copied_unless_extrapolate_norms(noisy, tmp_path):
    root, bdt, base, cks = noisy
    from safetensors.torch import load_file

    last = load_file(str(root / "run" / "checkpoint-50" / "model.safetensors"))
    copied = tmp_path / "copied"
    res = extrapolate_linear(
        str(root / "base"),
        str(copied),
        options=_opts(run=str(root / "run"), target_steps=[100], dtype="auto", rest="base"),
    )
    got = load_file(str(copied / "model.safetensors"))
    names = {t["tensor"] for t in res.tensors}
    for n in NORMS:  # from the last checkpoint (whatever --rest says), cast to the base's dtype
        assert n not in names and got[n].dtype == bdt and torch.equal(got[n], last[n].to(bdt)), n
    assert any("norm weights copied from the last history checkpoint" in n for n in res.notes)
    ext = tmp_path / "ext"
    extrapolate_linear(
        str(root / "base"), str(ext), options=_opts(run=str(root / "run"), target_steps=[100], extrapolate_norms=True)
    )
    got = read_folder(ext)
    for n in NORMS:
        pred, _ = lstsq_reference(trajectory(base, cks, n), STEPS, 100)
        assert_update_close(got[n], base[n], pred, n)
        assert not np.allclose(got[n], last[n].double().numpy())


def test_several_targets_equal_separate_runs_byte_for_byte(noisy, tmp_path):
    root = noisy[0]
    for mode in ("lstsq", "two-point"):
        kw = dict(run=str(root / "run"), dtype="auto", mode=mode)
        extrapolate_linear(str(root / "base"), str(tmp_path / mode), options=_opts(target_steps=[70, 45], **kw))
        for s in (70, 45):
            one = tmp_path / f"{mode}-{s}"
            extrapolate_linear(str(root / "base"), str(one), options=_opts(target_steps=[s], **kw))
            both = tmp_path / mode / f"step-{s}"
            assert file_bytes(both) == file_bytes(one) and file_bytes(one)
            assert (both / REPORT_FILE).read_bytes() == (one / REPORT_FILE).read_bytes()


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["--mode", "two-point", "--from", "15"],
            "--from 15 is not a history step (10, 20, 30, 40, 50, or --from 0 for the base)",
        ),
        (["--mode", "two-point", "--from", "30", "--to", "30"], "--from and --to are both step 30"),
        (["--fit-window", "1"], "--fit-window 1: at least 2"),
        (["--from", "10"], "--from/--to apply to --mode two-point"),
        (["--rank", "2"], "--rank applies to --method relex"),
        (["--include", "*.nothing"], "no floating-point tensors to extrapolate"),
        (["--include", "*norm*"], "norm weights are copied from the last checkpoint unless --extrapolate-norms"),
    ],
)
def test_cli_errors_write_nothing(noisy, tmp_path, args, needle):
    root = noisy[0]
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(root / "base"),
        "--run",
        str(root / "run"),
        "--method",
        "linear",
        "--target-step",
        "80",
        "--out",
        str(out),
        *args,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("rank1: error:") and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == "" and not out.exists()
