"""Dense float64 references for `extrapolate --method relex / linear` tests (numpy only, nothing
from rank1tools' math), readers through safetensors' own safe_open, and planted runs."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from rank1tools.synthetic import LlamaShape, make_base, make_run, write_model

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
REL = 1e-6  # written update vs reference: relative to the reference update's largest |element|


def noisy_run(root: Path, steps: list[int], variant: str) -> torch.dtype:
    """A generated base + run with dense noise (trajectory rank > 1) in root/base, root/run;
    variant "bf16-base": a bf16 base and fp32 checkpoints (else all fp32). Returns the base dtype."""
    bdt = torch.bfloat16 if variant == "bf16-base" else torch.float32
    make_base(root / "base", SHAPE, dtype=bdt)
    make_run(root / "run", steps, SHAPE, base_dtype=bdt, dtype=torch.float32, noise=3e-4)
    return bdt


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model folder as float64 numpy (read with safetensors.safe_open)."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).to(torch.float64).numpy()
    return out


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.safetensors"))}


def report(folder: Path, file: str) -> dict:
    return json.loads((Path(folder) / file).read_text())


def trajectory(base: dict, cks: list[dict], name: str) -> np.ndarray:
    """M: T × d, row t the flattened update of `name` at the t-th checkpoint (float64)."""
    return np.stack([c[name].reshape(-1) - base[name].reshape(-1) for c in cks])


def relex_reference(
    M: np.ndarray, steps: list[int], target: float, r: int, W: int | None = None, positions: bool = False
) -> tuple[np.ndarray, dict]:
    """Dense SVD of M, OLS line per coefficient over the last W points (on steps, or on positions
    0..W-1 with the target at (s − t_first)/mean spacing), prediction (a + b·s) V_rᵀ."""
    T = M.shape[0]
    W = W or T
    _, S, Vt = np.linalg.svd(M, full_matrices=False)
    C = M @ Vt[:r].T
    x = np.asarray(steps[-W:], dtype=np.float64)
    xs = float(target)
    if positions:
        spacing = (x[-1] - x[0]) / (W - 1)
        x, xs = np.arange(W, dtype=np.float64), (xs - x[0]) / spacing
    A = np.stack([np.ones(W), x], axis=1)
    coef, *_ = np.linalg.lstsq(A, C[T - W :], rcond=None)  # 2 × r: intercept, slope
    c = coef[0] + coef[1] * xs
    pred = c @ Vt[:r]
    figures = {
        "explained_variance": float((S[:r] ** 2).sum() / (S**2).sum()),
        "norm_ratio": float(np.linalg.norm(pred) / np.linalg.norm(M[-1])),
    }
    return pred, figures


def lstsq_reference(M: np.ndarray, steps: list[int], target: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-element OLS line through the rows of M at `steps`: its value at `target` and each
    element's R² (NaN for an element that does not change)."""
    t = np.asarray(steps, dtype=np.float64)
    A = np.stack([np.ones_like(t), t], axis=1)
    coef, *_ = np.linalg.lstsq(A, M, rcond=None)
    fitted = A @ coef
    ss_res = ((M - fitted) ** 2).sum(axis=0)
    ss_tot = ((M - M.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1 - ss_res / ss_tot, np.nan)
    return coef[0] + coef[1] * float(target), r2


def assert_update_close(
    got: np.ndarray, base: np.ndarray, ref_update: np.ndarray, what: str, rel: float = REL
) -> float:
    """The written float32 weights equal base + reference update within `rel` × max|reference
    update| plus one float32 spacing of the weight (storing W in float32 can do no better).
    Returns the worst error relative to max|reference update|."""
    want = base.reshape(-1) + ref_update.reshape(-1)
    err = np.abs(got.reshape(-1) - want)
    scale = float(np.abs(ref_update).max()) if ref_update.size else 0.0
    tol = rel * scale + np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert (err <= tol).all(), f"{what}: max error {err.max():.3g} (max |update| {scale:.3g})"
    return float(err.max() / scale) if scale else 0.0


def planted_direction(name: str, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """A fixed update direction per tensor (deterministic from its name)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return scale * rng.standard_normal(shape)


def write_planted(
    root: Path,
    steps: list[int],
    shape: LlamaShape = SHAPE,
    *,
    scale: float = 1e-3,
    still: tuple[str, ...] = (),
    base_dtype: torch.dtype = torch.float32,
) -> tuple[Path, Path, callable]:
    """Base + run whose updates are exactly linear and trajectory rank 1: θ_t = θ₀ + t·D (D fixed
    per tensor, zero for the `still` tensors), stored float32. Returns base, run and truth(step)
    -> {name: float64 weights}."""
    base_dir = make_base(root / "base", shape, dtype=base_dtype)
    base = read_folder(base_dir)
    D = {n: (np.zeros_like(v) if n in still else planted_direction(n, v.shape, scale)) for n, v in base.items()}

    def truth(step: float) -> dict[str, np.ndarray]:
        return {n: base[n] + step * D[n] for n in base}

    for s in steps:
        write_model(
            root / "run" / f"checkpoint-{s}",
            {n: torch.from_numpy(v).to(torch.float32) for n, v in truth(s).items()},
            shape.config(torch.float32),
        )
    return base_dir, root / "run", truth
