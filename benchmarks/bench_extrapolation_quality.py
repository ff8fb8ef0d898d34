"""How far a good fit in the window says anything about the extrapolation (docs/extrapolation.md).

Three planted runs of the same small Llama shape, steps 10..100, each tensor's update following
  linear      ΔW_t = (t/100)·D + noise             (the phenomenon the papers report)
  saturating  ΔW_t = sqrt(t/100)·D + noise         (progress slows down after the window)
  rotating    ΔW_t = (t/100)·(cos φ_t D + sin φ_t E), φ_t = (π/2)(t/100)   (the direction turns)
For each: `rank1 linearity` on the window 10..40 (what a user sees before trusting a method),
then `rank1 extrapolate` from that window to step 100 with relex (rank 1) and linear lstsq (norm
weights copied from the last checkpoint as the reference does, and with --extrapolate-norms), and
the error of each written checkpoint against the true step-100 weights,
  err = ‖θ̂ − θ₁₀₀‖ / ‖θ₁₀₀ − θ₀‖  over all tensors (float64),
beside the do-nothing baseline θ̂ = θ₄₀ (stop training at the cut). Results:
results/extrapolation_quality.json.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "extrapolation_quality"
RESULTS = HERE / "results" / "extrapolation_quality.json"
sys.path.insert(0, str(HERE.parent / "src"))

from rank1tools.io import open_checkpoint  # noqa: E402
from rank1tools.synthetic import LlamaShape, base_tensor, write_model  # noqa: E402

SHAPE = LlamaShape(vocab=128, hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = list(range(10, 101, 10))
CUT, TARGET = 40, 100
NOISE = 0.05  # dense noise, relative to the planted direction's norm at the last step


def _directions(name: str, shape) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + len(name))  # stable across runs
    if len(shape) == 2:
        u, v = torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)
        u2, v2 = torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)
        D, E = torch.outer(u / u.norm(), v / v.norm()), torch.outer(u2 / u2.norm(), v2 / v2.norm())
    else:
        D, E = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        D, E = D / D.norm(), E / E.norm()
    return D, E


def _update(kind: str, name: str, base: torch.Tensor, step: int) -> torch.Tensor:
    D, E = _directions(name, tuple(base.shape))
    scale = 0.05 * float(base.norm())
    f = step / TARGET
    if kind == "linear":
        drift = f * D
    elif kind == "saturating":
        drift = math.sqrt(f) * D
    else:
        phi = (math.pi / 2) * f
        drift = f * (math.cos(phi) * D + math.sin(phi) * E)
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 104729 + step)
    noise = torch.randn(base.shape, generator=g) * (NOISE / math.sqrt(base.numel()))
    return scale * (drift + math.sqrt(f) * noise)


def make(kind: str) -> tuple[Path, Path]:
    root = WORK / kind
    if root.exists():
        shutil.rmtree(root)
    base = {n: base_tensor(n, s, 0) for n, s in SHAPE.shapes().items()}
    write_model(root / "base", base, SHAPE.config(torch.float32))
    for step in STEPS:
        write_model(root / "run" / f"checkpoint-{step}", {n: b + _update(kind, n, b, step) for n, b in base.items()},
                    SHAPE.config(torch.float32))
    return root / "base", root / "run"


def rank1(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "rank1tools.cli", *args, "--json", "--quiet"], capture_output=True,
                       text=True, env={"PYTHONPATH": str(HERE.parent / "src"), "PATH": "/usr/bin:/bin"})
    if r.returncode not in (0, 5):
        raise SystemExit(f"rank1 {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return json.loads(r.stdout)


def error(pred: Path, truth: Path, base: Path) -> float:
    p, t, b = open_checkpoint(pred), open_checkpoint(truth), open_checkpoint(base)
    num = den = 0.0
    for name in b.names:
        tt, bb = t.read(name, dtype=torch.float64), b.read(name, dtype=torch.float64)
        num += float(((p.read(name, dtype=torch.float64) - tt) ** 2).sum())
        den += float(((tt - bb) ** 2).sum())
    return math.sqrt(num / den)


def main() -> None:
    rows = []
    for kind in ("linear", "saturating", "rotating"):
        base, run = make(kind)
        out = WORK / kind / "out"
        lin = rank1("linearity", str(base), "--run", str(run), "--steps", f"10:{CUT}", "--out", str(out / "linearity"),
                    "--no-plots")
        s = lin["summary"]
        row = {"run": kind, "window": f"10..{CUT}", "target": TARGET,
               "linearity_frac_r2_above_0.7": s["headline"]["frac_r2_above_0.7"],
               "explained_1_mean": s["mean"]["mean_explained_1"],
               "coef_r2_1_mean": s["mean"]["mean_coef_r2_1"],
               "error_stop_at_cut": error(run / f"checkpoint-{CUT}", run / f"checkpoint-{TARGET}", base)}
        for label, method, extra in (("relex", "relex", ["--rank", "1"]), ("linear", "linear", ["--mode", "lstsq"]),
                                     ("linear_norms", "linear", ["--mode", "lstsq", "--extrapolate-norms"])):
            dest = out / label
            rank1("extrapolate", str(base), "--run", str(run), "--method", method, *extra, "--history-until", str(CUT),
                  "--target-step", str(TARGET), "--dtype", "float32", "--out", str(dest))
            row[f"error_{label}"] = error(dest, run / f"checkpoint-{TARGET}", base)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "extrapolation_quality", "steps": STEPS, "cut": CUT,
                                   "target": TARGET, "noise": NOISE, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
