"""Extrapolated checkpoints load with transformers and give the logits of the same weights built in
memory from an independent float64 computation of each method
(docs/concepts.md#extrapolation-three-methods)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.synthetic import LlamaShape, make_base, make_run

from _support import reference_tensors, run_main

pytestmark = pytest.mark.integration

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = [10, 20, 30, 40]
TARGET = 80


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("extrap_tf")
    make_base(root / "base", SHAPE, torch.float32)
    make_run(root / "run", STEPS, SHAPE, base_dtype=torch.float32, dtype=torch.float32, noise=2e-4)
    return root


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {n: r.tensor.double().numpy() for n, r in reference_tensors(folder).items()}


def _relex(base, hist) -> dict[str, np.ndarray]:
    """Rank-1 RELEX per tensor: dense SVD of the uncentred T × d update matrix, the coefficient's
    line fitted on the steps, evaluated at TARGET."""
    out = {}
    for name, b in base.items():
        M = np.stack([(h[name] - b).reshape(-1) for h in hist])
        U, S, Vt = np.linalg.svd(M, full_matrices=False)
        slope, intercept = np.polyfit(np.array(STEPS, float), U[:, 0] * S[0], 1)
        out[name] = b + ((intercept + slope * TARGET) * Vt[0]).reshape(b.shape)
    return out


def _lstsq(base, hist) -> dict[str, np.ndarray]:
    """Per-element least-squares line over the history; norm weights copied from the last checkpoint."""
    t = np.array(STEPS, float)
    tc = t - t.mean()
    out = {}
    for name, b in base.items():
        if "norm" in name:
            out[name] = hist[-1][name]
            continue
        D = np.stack([h[name] - b for h in hist])
        slope = np.tensordot(tc, D - D.mean(axis=0), axes=1) / (tc @ tc)
        out[name] = b + D.mean(axis=0) + slope * (TARGET - t.mean())
    return out


def _alpharl(base, fits: Path, y_star: float) -> dict[str, np.ndarray]:
    """AlphaRL from the fit store's tensors (docs/concepts.md#extrapolation-three-methods):
    s* = (y* − a)/b, x̂ = x̄ + x_scale ⊙ (s* p), W = θ₀ + x̂ v̂ᵀ."""
    out = dict(base)
    for m in json.loads((fits / "manifest.json").read_text())["modules"]:
        with safe_open(str(fits / m["file"]), "pt") as f:
            g = {k: f.get_tensor(k).double().numpy() for k in f.keys()}
        a, b = g["score_line"]
        x_hat = g["x_mean"] + g["x_scale"] * ((y_star - a) / b) * g["x_loadings"].reshape(-1)
        out[m["name"]] = base[m["name"]] + np.outer(x_hat, g["v_last"])
    return out


def _logits(transformers, model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _check(transformers, out: Path, weights: dict[str, np.ndarray]) -> None:
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = transformers.AutoConfig.from_pretrained(str(out))
    built = transformers.AutoModelForCausalLM.from_config(config)
    missing, unexpected = built.load_state_dict(
        {n: torch.from_numpy(w).to(torch.float32) for n, w in weights.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    built.tie_weights()
    ids = torch.randint(0, SHAPE.vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    la, lb = _logits(transformers, loaded.eval(), ids), _logits(transformers, built.eval(), ids)
    assert torch.isfinite(la).all()
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["relex", "linear"])
def test_history_methods_load_with_the_reference_logits(run, tmp_path, transformers, method):
    out = tmp_path / method
    extra = ["--rank", "1"] if method == "relex" else ["--mode", "lstsq"]
    r = run_main(
        "extrapolate",
        str(run / "base"),
        "--run",
        str(run / "run"),
        "--method",
        method,
        *extra,
        "--target-step",
        str(TARGET),
        "--dtype",
        "float32",
        "--out",
        str(out),
        "-q",
    )
    assert r.returncode == 0, r.stderr
    base = _arrays(run / "base")
    hist = [_arrays(run / "run" / f"checkpoint-{s}") for s in STEPS]
    _check(transformers, out, (_relex if method == "relex" else _lstsq)(base, hist))


def test_alpharl_loads_with_the_reference_logits(run, tmp_path, transformers):
    (tmp_path / "m.csv").write_text("step,acc\n10,0.2\n20,0.3\n30,0.33\n40,0.41\n")
    for args in (
        [
            "decompose",
            str(run / "base"),
            "--run",
            str(run / "run"),
            "--rank",
            "1",
            "--exact",
            "--out",
            str(tmp_path / "factors"),
        ],
        [
            "fit-pls",
            str(tmp_path / "factors"),
            "--metrics",
            str(tmp_path / "m.csv"),
            "--no-plots",
            "--out",
            str(tmp_path / "fits"),
        ],
        [
            "extrapolate",
            str(run / "base"),
            "--method",
            "alpharl",
            "--fits",
            str(tmp_path / "fits"),
            "--target-metric",
            "0.5",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / "alpharl"),
        ],
    ):
        r = run_main(*args, "-q")
        assert r.returncode == 0, (args[0], r.stderr)
    _check(transformers, tmp_path / "alpharl", _alpharl(_arrays(run / "base"), tmp_path / "fits", 0.5))
