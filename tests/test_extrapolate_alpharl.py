"""rank1 extrapolate --method alpharl (docs/concepts.md#extrapolation-three-methods) against
independent float64 computations.

A realistic run (bf16 base, fp32 checkpoints) is decomposed and fitted with fit-pls; the written
tensors are compared with numpy float64 implementations of AlphaRL's formulas (from the fit store's
tensors, and from sklearn's PLSRegression refit on the factor store's x_t). A planted exactly-linear rank-1
run (ΔW_t = t·σ·u vᵀ, metric linear in t) must give θ₀ + ΔW_s exactly (container base) and
θ_last + ΔW_s (container last). Several targets in one pass equal separate runs byte for byte;
errors are one line, exit 3 (2 for option misuse), nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.cross_decomposition import PLSRegression

from rank1tools.commands.decompose import DecomposeOptions, decompose
from rank1tools.commands.fit_pls import FitPlsOptions, fit_pls
from rank1tools.synthetic import LlamaShape, make_base, make_run, write_model

from _support import assert_bit_identical, reference_tensors, run_main

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = [10, 20, 30, 40]
ACC = [0.20, 0.30, 0.33, 0.41]
REL = 1e-6


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def _read(folder: Path) -> dict[str, torch.Tensor]:
    return {n: r.tensor for n, r in reference_tensors(folder).items()}


def _fit_files(fits: Path) -> dict[str, dict[str, np.ndarray]]:
    manifest = json.loads((fits / "manifest.json").read_text())
    out = {}
    for m in manifest["modules"]:
        with safe_open(str(fits / m["file"]), "pt") as f:
            out[m["name"]] = {k: f.get_tensor(k).double().numpy() for k in f.keys()}
    return out


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """bf16 base, fp32 checkpoints with a rank-1 drift plus noise; factor store; fit store."""
    root = tmp_path_factory.mktemp("alpharl_real")
    make_base(root / "base", SHAPE, torch.bfloat16)
    make_run(root / "run", STEPS, SHAPE, base_dtype=torch.bfloat16, dtype=torch.float32, noise=1e-4)
    decompose(
        str(root / "base"),
        [],
        str(root / "factors"),
        run=str(root / "run"),
        options=DecomposeOptions(rank=1, exact=True),
    )
    (root / "m.csv").write_text("step,accuracy\n" + "".join(f"{s},{a}\n" for s, a in zip(STEPS, ACC)))
    fit_pls(
        str(root / "factors"),
        str(root / "fits"),
        options=FitPlsOptions(metrics=str(root / "m.csv"), metric="accuracy", plots=False),
    )
    return root


def _alpharl(root: Path, out: Path, *args: str, fits: str = "fits", base: str = "base"):
    return run_main(
        "extrapolate",
        str(root / base),
        "--method",
        "alpharl",
        "--fits",
        str(root / fits),
        "--out",
        str(out),
        "-q",
        *args,
    )


def _aligned(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """docs/concepts.md#signs: walking back from the last checkpoint, flip (u_t, v_t) when
    cos(u_t, u_{t+1}) < 0."""
    u, v = u.copy(), v.copy()
    for t in range(len(u) - 2, -1, -1):
        if u[t] @ u[t + 1] < 0:
            u[t], v[t] = -u[t], -v[t]
    return u, v


def _sklearn_update(factors: Path, module: str, y: np.ndarray, target: float) -> np.ndarray:
    """ΔŴ from sklearn's PLSRegression refit on the factor store's x_t = σ₁ u₁ (float64)."""
    manifest = json.loads((factors / "manifest.json").read_text())
    entry = next(m for m in manifest["modules"] if m["name"] == module)
    with safe_open(str(factors / entry["file"]), "pt") as f:
        S, U, V = (f.get_tensor(k).double().numpy() for k in ("S", "U", "V"))
    u, v = _aligned(U[:, :, 0], V[:, :, 0])
    X = S[:, :1] * u
    pls = PLSRegression(n_components=1, scale=True).fit(X, y)
    s = pls.transform(X)[:, 0]
    b, a = np.polyfit(s, y, 1)  # y ≈ a + b·s by least squares
    x_hat = pls.inverse_transform(np.array([[(target - a) / b]]))[0]
    return np.outer(x_hat, v[-1])


@pytest.mark.parametrize("container", ["base", "last"])
def test_written_tensors_match_float64_reference_and_sklearn(realistic, tmp_path, container):
    root, out, target = realistic, tmp_path / "out", 0.55
    r = _alpharl(root, out, "--target-metric", str(target), "--container", container, "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    written = _read(out)
    theta0 = _read(root / "base")
    cont = theta0 if container == "base" else _read(root / "run" / "checkpoint-40")
    fits = _fit_files(root / "fits")
    assert len(fits) == 14
    y = np.array(ACC)
    for name, f in fits.items():
        a, b = f["score_line"]
        x_hat = f["x_mean"] + f["x_scale"] * (((target - a) / b) * f["x_loadings"])
        upd = np.outer(x_hat, f["v_last"])
        ref = _f64(cont[name]) + upd
        assert written[name].dtype == torch.float32
        assert _rel(_f64(written[name]), ref) <= REL, name
        assert np.abs(_f64(written[name]) - ref).max() <= REL * np.abs(ref).max(), name
        sk = _f64(cont[name]) + _sklearn_update(root / "factors", name, y, target)
        assert _rel(_f64(written[name]), sk) <= REL, name
        assert _rel(upd, sk - _f64(cont[name])) <= 1e-6, name  # the update itself, not only W
    # everything else keeps the container's value (exact: bf16 -> fp32 is exact, fp32 copied)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(written[name], cont[name].float()), name
    data = json.loads(r.stdout)
    assert data["history_steps"] == STEPS and data["outputs"][0]["path"] == str(out)
    report = json.loads((out / "rank1tools-extrapolation.json").read_text())
    rows = {m["module"]: m for m in report["modules"]}
    for name, f in fits.items():  # ‖ΔŴ‖ / ‖ΔW_last‖ with ‖ΔW_last‖ from the factor store
        a, b = f["score_line"]
        x_hat = f["x_mean"] + f["x_scale"] * (((target - a) / b) * f["x_loadings"])
        with safe_open(str(root / "factors" / "factors" / (name + ".safetensors")), "pt") as ff:
            fro_last = float(ff.get_tensor("fro")[-1])
        assert rows[name]["norm_ratio"] == pytest.approx(
            np.linalg.norm(np.outer(x_hat, f["v_last"])) / fro_last, rel=1e-9
        )
        assert rows[name]["status"] == "extrapolated" and rows[name]["r2"] == pytest.approx(f["r2"][0])
    prov = json.loads((out / "rank1tools.json").read_text())
    assert prov["command"] == "extrapolate" and prov["parameters"]["container"] == container
    assert [i["source"] for i in prov["inputs"]][:2] == [str(root / "base"), str(root / "fits")]
    assert (container == "last") == (str(root / "run" / "checkpoint-40") in [i["source"] for i in prov["inputs"]])
    assert ("counted twice" in r.stderr) == (container == "last")


def test_several_targets_in_one_pass_equal_separate_runs(realistic, tmp_path):
    root = realistic
    r = _alpharl(root, tmp_path / "both", "--target-metric", "0.45,0.6")
    assert r.returncode == 0, r.stderr
    for t in ("0.45", "0.6"):
        r1 = _alpharl(root, tmp_path / t, "--target-metric", t)
        assert r1.returncode == 0, r1.stderr
        one, both = tmp_path / t, tmp_path / "both" / f"metric-{t}"
        files = sorted(p.name for p in one.iterdir() if p.suffix == ".safetensors")
        assert files and files == sorted(p.name for p in both.iterdir() if p.suffix == ".safetensors")
        for name in [*files, "rank1tools-rounding.json", "config.json"]:
            assert (one / name).read_bytes() == (both / name).read_bytes(), name
        rep1 = json.loads((one / "rank1tools-extrapolation.json").read_text())
        rep2 = json.loads((both / "rank1tools-extrapolation.json").read_text())
        assert rep1 == rep2 and rep1["target"] == float(t)
    # bf16 output (dtype auto): selected modules are rounded, everything else is the base, bit for bit
    written, theta0 = _read(tmp_path / "0.6"), _read(root / "base")
    assert_bit_identical(written["model.embed_tokens.weight"], theta0["model.embed_tokens.weight"], "embed")
    assert written["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


# ---- planted exactly-linear rank-1 trajectories ----

LINEAR_STEPS = [10, 20, 30, 40]
WIGGLE = {10: 1.0, 20: 4.0, 30: 2.0, 40: 3.0}  # a trajectory whose size does not follow the step
NONLINEAR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """ΔW_t = t·σ·u vᵀ for every matrix module (fixed u, v), except NONLINEAR (size WIGGLE[t]·10);
    norms drift too (container last must copy them); metric y_t = 0.2 + 0.001·t."""
    root = tmp_path_factory.mktemp("alpharl_planted")
    g = torch.Generator().manual_seed(3)
    theta0 = {
        n: (0.02 * torch.randn(s, generator=g) if len(s) == 2 else 1 + 0.05 * torch.randn(s, generator=g))
        for n, s in SHAPE.shapes().items()
    }
    write_model(root / "base", theta0, SHAPE.config(torch.float32))
    directions = {}
    for n, s in SHAPE.shapes().items():
        if len(s) == 2 and ".layers." in n:
            u, v = (
                torch.randn(s[0], generator=g, dtype=torch.float64),
                torch.randn(s[1], generator=g, dtype=torch.float64),
            )
            directions[n] = 1e-4 * torch.outer(u / u.norm(), v / v.norm()) * (s[0] * s[1]) ** 0.5  # σ per step
    for t in LINEAR_STEPS:
        ck = {}
        for n, w in theta0.items():
            if n in directions:
                ck[n] = (w.double() + (WIGGLE[t] * 10 if n == NONLINEAR else t) * directions[n]).float()
            elif w.dim() == 1:
                ck[n] = w + 1e-3 * t
            else:
                ck[n] = w.clone()
        write_model(root / "run" / f"checkpoint-{t}", ck, SHAPE.config(torch.float32))
    decompose(
        str(root / "base"),
        [],
        str(root / "factors"),
        run=str(root / "run"),
        options=DecomposeOptions(rank=1, exact=True),
    )
    (root / "m.csv").write_text("step,accuracy\n" + "".join(f"{t},{0.2 + 0.001 * t}\n" for t in LINEAR_STEPS))
    fit_pls(
        str(root / "factors"),
        str(root / "fits"),
        options=FitPlsOptions(metrics=str(root / "m.csv"), metric="accuracy", plots=False),
    )
    fit_pls(str(root / "factors"), str(root / "fits_step"), options=FitPlsOptions(plots=False))
    return root, theta0, directions


@pytest.mark.parametrize("container", ["base", "last"])
def test_planted_linear_run_gives_the_future_update(planted, tmp_path, container):
    root, theta0, directions = planted
    s = 80  # y* = 0.2 + 0.001·80: the metric of step 80 on the planted line
    out = tmp_path / "out"
    r = _alpharl(
        root,
        out,
        "--target-metric",
        repr(0.2 + 0.001 * s),
        "--container",
        container,
        "--dtype",
        "float32",
        "--min-r2",
        "0.999",
        "--flag-ratio",
        "1.5",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    written = _read(out)
    last = _read(root / "run" / "checkpoint-40")
    report = json.loads((out / "rank1tools-extrapolation.json").read_text())
    rows = {m["module"]: m for m in report["modules"]}
    for n, d in directions.items():
        if n == NONLINEAR:
            continue
        assert rows[n]["r2"] == pytest.approx(1.0, abs=1e-9) and rows[n]["status"] == "extrapolated"
        start = _f64(theta0[n]) if container == "base" else _f64(theta0[n]) + 40 * d.numpy()
        ref = start + s * d.numpy()  # container last: θ_last + ΔW_s = θ₀ + ΔW_40 + ΔW_s (counted twice)
        assert _rel(_f64(written[n]), ref) <= REL, n
        got_update = _f64(written[n]) - _f64(theta0[n])
        want_update = (s if container == "base" else 40 + s) * d.numpy()
        assert _rel(got_update, want_update) <= 1e-4, n
        assert rows[n]["norm_ratio"] == pytest.approx(s / 40, rel=1e-5)  # ‖ΔW_80‖ / ‖ΔW_40‖
    # the wiggling module is below --min-r2: the container's value, bit for bit
    assert rows[NONLINEAR]["status"] == "kept" and rows[NONLINEAR]["r2"] < 0.999
    assert "below --min-r2" in rows[NONLINEAR]["reason"]
    cont = theta0 if container == "base" else last
    assert_bit_identical(written[NONLINEAR], cont[NONLINEAR], NONLINEAR)
    for n in ("model.norm.weight", "model.layers.0.post_attention_layernorm.weight", "model.embed_tokens.weight"):
        assert_bit_identical(written[n], cont[n], n)
    # a metric target is flagged above --flag-ratio itself: every extrapolated module (ratio 2 > 1.5)
    out0 = json.loads(r.stdout)["outputs"][0]
    assert sorted(f["tensor"] for f in out0["flagged"]) == sorted(n for n in directions if n != NONLINEAR)
    assert out0["norm_ratio_median"] == pytest.approx(2.0, rel=1e-5)
    assert report["kept"] == 1 and report["extrapolated"] == len(directions) - 1


def test_step_fitted_store_takes_target_step(planted, tmp_path):
    root, theta0, directions = planted
    out = tmp_path / "out"
    r = _alpharl(
        root,
        out,
        "--target-step",
        "80,120",
        "--dtype",
        "float32",
        "--min-r2",
        "0.999",
        "--flag-ratio",
        "1.5",
        "--json",
        fits="fits_step",
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [(o["kind"], o["target"]) for o in data["outputs"]] == [("step", 80.0), ("step", 120.0)]
    # a step target's limit grows with the step: 1.5·(80/40) = 3 > ratio 2, so nothing is flagged
    assert data["outputs"][0]["flagged"] == [] and data["outputs"][1]["flagged"] == []
    for s in (80, 120):
        written = _read(out / f"step-{s}")
        for n, d in directions.items():
            if n != NONLINEAR:
                assert _rel(_f64(written[n]), _f64(theta0[n]) + s * d.numpy()) <= REL, n
        assert_bit_identical(written[NONLINEAR], theta0[NONLINEAR], NONLINEAR)  # its R²_step is below 0.999
    assert "reads its in-sample R²_step" in r.stderr


# ---- errors: one line, exit 3 (2 for option misuse), nothing written ----


def _one_error(r, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("rank1: error:")]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _edit_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_fit_store_from_another_base(realistic, tmp_path):
    make_base(tmp_path / "other", SHAPE, torch.bfloat16, seed=1)
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(tmp_path / "other"),
        "--method",
        "alpharl",
        "--fits",
        str(realistic / "fits"),
        "--target-metric",
        "0.5",
        "--out",
        str(out),
        "-q",
    )
    _one_error(r, 3, "fit store was made from base", str(realistic / "base"), str(tmp_path / "other"))
    assert not out.exists()


def test_include_of_a_module_the_store_lacks(realistic, tmp_path):
    out = tmp_path / "out"
    r = _alpharl(realistic, out, "--target-metric", "0.5", "--include", "model.embed_tokens.weight")
    _one_error(r, 3, "has no module", "model.embed_tokens.weight")
    assert not out.exists()


def test_container_last_without_a_last_checkpoint(realistic, tmp_path):
    def drop(m):
        m["factor_store"]["checkpoints"][-1]["source"] = str(tmp_path / "gone" / "checkpoint-40")

    _edit_manifest(realistic / "fits", tmp_path / "fits", drop)
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(realistic / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(tmp_path / "fits"),
        "--target-metric",
        "0.5",
        "--container",
        "last",
        "--out",
        str(out),
        "-q",
    )
    _one_error(r, 3, "last checkpoint (step 40)", "gone", "--last-checkpoint")
    assert not out.exists()
    # naming it works, and gives what the recorded one gives
    r = run_main(
        "extrapolate",
        str(realistic / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(tmp_path / "fits"),
        "--target-metric",
        "0.5",
        "--container",
        "last",
        "--out",
        str(out),
        "-q",
        "--last-checkpoint",
        str(realistic / "run" / "checkpoint-40"),
    )
    assert r.returncode == 0, r.stderr
    ref = _alpharl(realistic, tmp_path / "ref", "--target-metric", "0.5", "--container", "last")
    assert ref.returncode == 0, ref.stderr
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_fit_store_without_fro_asks_to_rerun_fit_pls(realistic, tmp_path):
    fits = tmp_path / "fits"
    shutil.copytree(realistic / "fits", fits)
    path = fits / "fits" / "model.layers.1.mlp.up_proj.weight.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "fro"}
        meta = f.metadata()
    save_file(tensors, str(path), metadata=meta)
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(realistic / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(fits),
        "--target-metric",
        "0.5",
        "--out",
        str(out),
        "-q",
    )
    _one_error(r, 3, "'fro'", "rerun rank1 fit-pls", path.name)
    assert not out.exists()


def test_target_metric_on_a_step_fitted_store(planted, tmp_path):
    root = planted[0]
    out = tmp_path / "out"
    r = _alpharl(root, out, "--target-metric", "0.5", fits="fits_step")
    _one_error(r, 2, "fitted against the step", "--target-step")
    assert not out.exists()
    r = _alpharl(root, out, "--target-step", "80", fits="fits")
    _one_error(r, 2, "fitted against the metric", "--target-metric")
    r = _alpharl(root, out, "--target-step", "80", "--min-r2", "0.5", "--r2", "loo_r2", fits="fits_step")
    _one_error(r, 2, "--r2 loo_r2", "--r2 r2_step")
    assert not out.exists()


def test_module_file_outside_fits_folder_is_refused(realistic, tmp_path):
    def escape(m):
        m["modules"][0]["file"] = "../manifest.json"

    _edit_manifest(realistic / "fits", tmp_path / "fits", escape)
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(realistic / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(tmp_path / "fits"),
        "--target-metric",
        "0.5",
        "--out",
        str(out),
        "-q",
    )
    _one_error(r, 3, "not a file in the store's fits/ folder")
    assert not out.exists()
