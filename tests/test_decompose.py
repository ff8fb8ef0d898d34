"""rank1 decompose: SVD figures against numpy float64, randomized vs exact, resume, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rank1tools.commands.decompose import DecomposeOptions, decompose
from rank1tools.errors import InputError, UsageError
from rank1tools.io import open_checkpoint
from rank1tools.math.signs import align_to_next, canonicalize_signs
from rank1tools.math.spectrum import spectrum_figures
from rank1tools.math.svd import SIGMA_REL_TOL, topk_svd
from rank1tools.synthetic import LlamaShape, make_base, make_run, matrix_module_names

from _support import run_main

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = [5, 10, 100]  # lexical order would put 100 before 5


def _cli(*args: str):
    return run_main(*args)


@pytest.fixture(scope="module")
def dec_run(tmp_path_factory):
    """bf16 base + fp32 checkpoints (what TRL saves), TRL layout."""
    root = tmp_path_factory.mktemp("dec")
    make_base(root / "base", SHAPE, dtype=torch.bfloat16)
    make_run(root / "run", STEPS, SHAPE, base_dtype=torch.bfloat16, dtype=torch.float32, noise=3e-4)
    return root


def _planted(m: int, n: int, sigmas: list[float], noise: float, seed: int) -> torch.Tensor:
    """Low-rank drift with given singular values plus dense Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(sigmas), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(sigmas), generator=g, dtype=torch.float64)).Q
    D = (U * torch.tensor(sigmas, dtype=torch.float64)) @ V.T
    return (D + noise * torch.randn(m, n, generator=g, dtype=torch.float64)).float()


# ---------------------------------------------------------------- math against numpy float64


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("m,n", [(120, 80), (80, 200)])
def test_topk_matches_numpy_float64(m, n, exact):
    D = _planted(m, n, [3e-3, 1e-3, 5e-4], 1e-6, seed=m + n)
    res = topk_svd(D, 4, exact=exact, oversample=10, niter=4)
    U, S, Vt = np.linalg.svd(D.double().numpy(), full_matrices=False)
    # planted singular values to 1e-5; sigma_4 lies in the noise bulk, where a randomized
    # sketch is approximate (exact SVD must still match it)
    np.testing.assert_allclose(res.S[:3].double().numpy(), S[:3], rtol=1e-5)
    np.testing.assert_allclose(float(res.S[3]), S[3], rtol=1e-5 if exact else 1e-2)
    for i in range(3):  # the planted, well-separated directions
        assert abs(float(res.U[:, i].double() @ torch.from_numpy(U[:, i]))) > 0.9999
        assert abs(float(res.V[:, i].double() @ torch.from_numpy(Vt[i]))) > 0.9999
    assert res.method == ("exact" if exact else "randomized")


def test_spectrum_figures_match_numpy():
    D = _planted(90, 60, [2e-3, 1.5e-3, 1e-3], 5e-5, seed=3).double().numpy()
    W0 = np.random.default_rng(0).normal(0, 0.02, (90, 60))
    S = np.linalg.svd(D, compute_uv=False)
    fro = np.sqrt((D**2).sum())
    f = spectrum_figures(list(S[:5]), fro, float(np.sqrt((W0**2).sum())), (90, 60))
    assert f["energy_1"] == pytest.approx(S[0] ** 2 / (S**2).sum(), rel=1e-12)
    assert f["energy_k"] == pytest.approx((S[:5] ** 2).sum() / (S**2).sum(), rel=1e-12)
    assert f["norm_frac_1"] == pytest.approx(S[0] / fro, rel=1e-12)
    assert f["stable_rank"] == pytest.approx((S**2).sum() / S[0] ** 2, rel=1e-12)
    assert f["rel_update"] == pytest.approx(fro / np.linalg.norm(W0), rel=1e-12)
    assert f["rank1pct_k"] == 1 and f["energy_rank1pct"] == f["energy_1"]
    assert math.isnan(spectrum_figures([0.0], 0.0, 1.0, (4, 4))["energy_1"])


def test_randomized_meets_spec_bar_on_realistic_deltas():
    # small spectral gap (sigma_2 / sigma_1 = 0.95) under dense noise of comparable total energy
    D = _planted(1024, 384, [1.0e-3, 0.95e-3, 0.9e-3, 0.5e-3], 3e-6, seed=7)
    res = topk_svd(D, 8)
    ex = torch.linalg.svd(D.double(), full_matrices=False)
    assert res.method in ("randomized", "exact-fallback")
    assert abs(float(res.S[0]) - float(ex.S[0])) / float(ex.S[0]) <= SIGMA_REL_TOL
    assert abs(float(res.U[:, 0].double() @ ex.U[:, 0])) >= 0.9999


def test_fallback_to_exact_when_gap_closes():
    # sigma_1 == sigma_2: u_1 is not determined, the a-posteriori check cannot pass
    D = _planted(400, 300, [1e-3, 1e-3, 1e-3], 1e-4, seed=11)
    res = topk_svd(D, 4)
    ex = torch.linalg.svd(D, full_matrices=False)
    assert res.method == "exact-fallback"
    assert torch.equal(res.S, ex.S[:4])


def test_sign_canonicalisation_and_alignment():
    U = torch.tensor([[0.1, -0.9], [-0.8, 0.2]])
    V = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    Uc, Vc = canonicalize_signs(U, V)
    assert Uc[:, 0].tolist() == pytest.approx([-0.1, 0.8]) and Vc[:, 0].tolist() == [-1.0, -3.0]
    assert Uc[:, 1].tolist() == pytest.approx([0.9, -0.2]) and Vc[:, 1].tolist() == [-2.0, -4.0]
    traj = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [1.0, 0.2]])
    Ua, Va = align_to_next(traj, traj.clone())
    assert Ua[:, 0].tolist() == [1.0, 1.0, 1.0] and torch.equal(Ua, Va)


# ---------------------------------------------------------------- command


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_decompose_bf16_base_fp32_checkpoints(dec_run, tmp_path):
    out = tmp_path / "out"
    res = decompose(
        str(dec_run / "base"), [], str(out), run=str(dec_run / "run"), options=DecomposeOptions(rank=4, device="cpu")
    )
    mods = matrix_module_names(SHAPE)
    assert res.steps == STEPS and sorted(res.modules) == sorted(mods)
    rows = _read_csv(out / "spectrum.csv")
    assert len(rows) == len(mods) * len(STEPS)
    base = open_checkpoint(dec_run / "base")
    for r in rows[::4]:  # a spread of (module, step)
        ck = open_checkpoint(dec_run / "run" / f"checkpoint-{r['step']}")
        with safe_open(str(dec_run / "base" / "model.safetensors"), "pt") as f:
            w0 = f.get_tensor(r["module"]).double().numpy()  # bf16 upcast, independent reader
        wt = ck.read_raw(r["module"]).double().numpy()
        D = wt - w0  # float64 difference of the upcast values
        S = np.linalg.svd(D, compute_uv=False)
        assert float(r["fro"]) == pytest.approx(np.sqrt((D**2).sum()), rel=1e-6)
        assert float(r["sigma_1"]) == pytest.approx(S[0], rel=SIGMA_REL_TOL)
        # sigma_2..4 lie in this fixture's noise bulk: randomized values are approximate there
        np.testing.assert_allclose([float(r[f"sigma_{i}"]) for i in range(2, 5)], S[1:4], rtol=1e-2)
        assert float(r["energy_1"]) == pytest.approx(S[0] ** 2 / (S**2).sum(), rel=1e-4)
        assert float(r["rel_update"]) == pytest.approx(np.sqrt((D**2).sum()) / np.linalg.norm(w0), rel=1e-6)
        assert int(r["layer"]) == int(r["module"].split(".")[2])
    # factor store: canonical signs, sigma u v^T close to the top-4 part of the delta
    name = mods[0]
    with safe_open(str(out / "factors" / f"{name}.safetensors"), "pt") as f:
        U, S, V, st = f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("V"), f.get_tensor("steps")
    assert st.tolist() == STEPS and U.shape == (3, *base.entry(name).shape[:1], 4)
    idx = U[0].abs().argmax(dim=0)
    assert (U[0][idx, torch.arange(4)] > 0).all()
    # sigma_1 u_1 v_1^T of the last step equals numpy's float64 rank-1 part of that update
    with safe_open(str(dec_run / "base" / "model.safetensors"), "pt") as f:
        w0 = f.get_tensor(name).double().numpy()
    D = open_checkpoint(dec_run / "run" / f"checkpoint-{STEPS[-1]}").read_raw(name).double().numpy() - w0
    Un, Sn, Vtn = np.linalg.svd(D, full_matrices=False)
    ours = float(S[-1, 0]) * np.outer(U[-1, :, 0].double().numpy(), V[-1, :, 0].double().numpy())
    assert np.linalg.norm(ours - Sn[0] * np.outer(Un[:, 0], Vtn[0])) <= 1e-3 * Sn[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "rank1tools.factors" and manifest["format_version"] == 1
    assert [c["step"] for c in manifest["checkpoints"]] == STEPS
    assert manifest["parameters"]["rank"] == 4
    # summary = means of the table, computed independently
    summ = json.loads((out / "summary.json").read_text())
    q = [float(r["energy_1"]) for r in rows if r["type"] == "q"]
    assert summ["by_type"]["q"]["energy_1"] == pytest.approx(sum(q) / len(q), rel=1e-12)
    s10 = [float(r["norm_frac_1"]) for r in rows if r["step"] == "10"]
    assert summ["by_step"]["10"]["norm_frac_1"] == pytest.approx(sum(s10) / len(s10), rel=1e-12)
    assert not list(tmp_path.glob(".out.partial"))


def test_resume_is_byte_identical(dec_run, tmp_path):
    args = (str(dec_run / "base"), [str(dec_run / "run" / f"checkpoint-{s}") for s in STEPS])
    opts = DecomposeOptions(rank=3, device="cpu")
    ref = tmp_path / "ref" / "out"
    decompose(*args, str(ref), options=opts)

    out = tmp_path / "resumed" / "out"
    seen = []

    def stop_after_three(name):
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose(*args, str(out), options=opts, on_module_done=stop_after_three)
    assert not out.exists()
    assert len(list((out.parent / ".out.partial" / "factors").glob("*.safetensors"))) == 3
    res = decompose(*args, str(out), options=opts)
    assert res.resumed_modules == 3
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:
        assert (ref / f).read_bytes() == (out / f).read_bytes(), f


def test_steps_from_paths_and_exact_matches_randomized(dec_run, tmp_path):
    cks = [str(dec_run / "run" / f"checkpoint-{s}") for s in (100, 5)]  # given out of order
    r1 = decompose(str(dec_run / "base"), cks, str(tmp_path / "a"), options=DecomposeOptions(rank=2, device="cpu"))
    r2 = decompose(
        str(dec_run / "base"),
        cks,
        str(tmp_path / "b"),
        options=DecomposeOptions(rank=2, exact=True, device="cpu", include=["*.mlp.*"]),
    )
    assert r1.steps == [5, 100]
    assert {r["type"] for r in r2.rows} == {"gate", "up", "down"}
    by = {(r["module"], r["step"]): r for r in r1.rows}
    for r in r2.rows:
        assert r["svd_method"] == "exact"
        assert by[(r["module"], r["step"])]["sigma_1"] == pytest.approx(r["sigma_1"], rel=1e-5)


# ---------------------------------------------------------------- bad input (CLI)


def _assert_error(proc, code: int, *needles: str):
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert proc.stdout == ""


def test_cli_decompose_json_and_exit_code(dec_run, tmp_path):
    p = _cli(
        "decompose",
        str(dec_run / "base"),
        "--run",
        str(dec_run / "run"),
        "--steps",
        "5,100",
        "--out",
        str(tmp_path / "o"),
        "--rank",
        "2",
        "--json",
        "--device",
        "cpu",
        "--quiet",
    )
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["steps"] == [5, 100] and data["modules"] == len(matrix_module_names(SHAPE))
    assert set(data["summary"]["by_type"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    again = _cli("decompose", str(dec_run / "base"), "--run", str(dec_run / "run"), "--out", str(tmp_path / "o"))
    _assert_error(again, 4, "already exists")


def test_cli_rank_above_min_dim(dec_run, tmp_path):
    kv = SHAPE.kv_heads * SHAPE.hidden // SHAPE.heads
    p = _cli(
        "decompose",
        str(dec_run / "base"),
        "--run",
        str(dec_run / "run"),
        "--out",
        str(tmp_path / "o"),
        "--rank",
        str(kv + 1),
    )
    _assert_error(p, 2, "--rank", "k_proj", str(kv))
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def _clone_checkpoint(src: Path, dst: Path, edit) -> Path:
    ck = open_checkpoint(src)
    tensors = {n: ck.read_raw(n) for n in ck.names}
    edit(tensors)
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_cli_shape_mismatch_missing_module_nonfinite(dec_run, tmp_path):
    src = dec_run / "run" / "checkpoint-10"
    name = "model.layers.1.mlp.up_proj.weight"
    bad_shape = _clone_checkpoint(
        src, tmp_path / "shape" / "checkpoint-10", lambda t: t.__setitem__(name, t[name][:-1].contiguous())
    )
    missing = _clone_checkpoint(src, tmp_path / "missing" / "checkpoint-10", lambda t: t.pop(name))

    def poison(t):
        t[name] = t[name].clone()
        t[name][3, 4] = float("nan")

    nan = _clone_checkpoint(src, tmp_path / "nan" / "checkpoint-10", poison)
    base = str(dec_run / "base")
    _assert_error(
        _cli("decompose", base, str(bad_shape), "--out", str(tmp_path / "o1")), 3, name, "[111, 48]", "[112, 48]"
    )
    _assert_error(_cli("decompose", base, str(missing), "--out", str(tmp_path / "o2")), 3, name, "step 10")
    _assert_error(_cli("decompose", base, str(nan), "--out", str(tmp_path / "o3")), 3, name, "step 10", "non-finite")
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()


def test_errors_raised_as_types(dec_run, tmp_path):
    with pytest.raises(UsageError):
        decompose(str(dec_run / "base"), [], str(tmp_path / "o"))
    with pytest.raises(UsageError):
        decompose(
            str(dec_run / "base"),
            [str(dec_run / "run" / "checkpoint-5")],
            str(tmp_path / "o"),
            options=DecomposeOptions(rank=0),
        )
    with pytest.raises(InputError):
        decompose(str(dec_run / "base"), [str(tmp_path / "nope")], str(tmp_path / "o"))


def test_cli_interrupt_says_how_to_resume(dec_run, tmp_path, monkeypatch):
    import rank1tools.commands.decompose.modules as dec  # where the per-module work calls the SVD

    real, calls = dec.topk_svd, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 5:  # Ctrl-C in the middle of the second module
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(dec, "topk_svd", interrupted)
    args = (
        "decompose",
        str(dec_run / "base"),
        "--run",
        str(dec_run / "run"),
        "--out",
        str(tmp_path / "o"),
        "--rank",
        "2",
        "--quiet",
        "--device",
        "cpu",
    )
    r = _cli(*args)
    assert r.returncode == 130 and r.stdout == ""
    assert r.stderr == "rank1: interrupted: finished modules are kept; rerun the same command to resume\n"
    assert not (tmp_path / "o").exists()
    assert len(list((tmp_path / ".o.partial" / "factors").glob("*.safetensors"))) == 1  # 3 steps per module
    monkeypatch.setattr(dec, "topk_svd", real)
    r = _cli(*args)
    assert r.returncode == 0 and "resumed: 1 modules" in r.stderr


def test_workers_take_modules_as_they_finish():
    """as_finished: a worker done with a quick module takes the next one while a slow module is
    still running (taken in order, the quick module would wait for the slow one), and every name
    comes back once; one worker keeps the order of the names."""
    import threading

    from rank1tools.commands.decompose.modules import as_finished

    released = threading.Event()

    def work(name: str, stop: threading.Event) -> str:
        if name == "slow":  # held until the modules after it have come back
            assert released.wait(10), "the slow module was never released"
        return name.upper()

    got = []
    for name, result in as_finished(["slow", "quick", "next"], work, 2):
        got.append((name, result))
        if name == "next":
            released.set()
    assert got == [("quick", "QUICK"), ("next", "NEXT"), ("slow", "SLOW")]
    assert [n for n, _ in as_finished(["b", "a", "c"], lambda n, s: n, 1)] == ["b", "a", "c"]


def test_a_failing_module_stops_the_others():
    """A worker's error reaches the consumer, and `stop` is set for the module still running."""
    import threading

    from rank1tools.commands.decompose.modules import as_finished

    seen_stop = threading.Event()

    def work(name: str, stop: threading.Event) -> str:
        if name == "bad":
            raise InputError("bad data")
        assert stop.wait(10)
        seen_stop.set()
        return name

    with pytest.raises(InputError, match="bad data"):
        list(as_finished(["long", "bad", "never"], work, 2))
    assert seen_stop.is_set()
