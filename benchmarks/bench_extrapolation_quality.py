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
`--quick` (or BENCH_QUICK=1): the linear run only, to check the script and its report.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import extra, machine, quick_mode, report, table, work_dir, write_results  # noqa: E402

QUICK = quick_mode()
WORK = work_dir(QUICK) / "extrapolation_quality"
KINDS = ("linear",) if QUICK else ("linear", "saturating", "rotating")
SHAPE = dict(vocab=128, hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = list(range(10, 101, 10))
CUT, TARGET = 40, 100
NOISE = 0.05  # dense noise, relative to the planted direction's norm at the last step


def _directions(name: str, shape) -> tuple:
    import torch

    g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + len(name))  # stable across runs
    if len(shape) == 2:
        u, v = torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)
        u2, v2 = torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)
        D, E = torch.outer(u / u.norm(), v / v.norm()), torch.outer(u2 / u2.norm(), v2 / v2.norm())
    else:
        D, E = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        D, E = D / D.norm(), E / E.norm()
    return D, E


def _update(kind: str, name: str, base, step: int):
    import torch

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
    import torch

    from rank1tools.synthetic import LlamaShape, base_tensor, write_model

    shape = LlamaShape(**SHAPE)
    root = WORK / kind
    if root.exists():
        shutil.rmtree(root)
    base = {n: base_tensor(n, s, 0) for n, s in shape.shapes().items()}
    write_model(root / "base", base, shape.config(torch.float32))
    for step in STEPS:
        write_model(
            root / "run" / f"checkpoint-{step}",
            {n: b + _update(kind, n, b, step) for n, b in base.items()},
            shape.config(torch.float32),
        )
    return root / "base", root / "run"


def rank1(*args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "rank1tools.cli", *args, "--json", "--quiet"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(HERE.parent / "src"), "PATH": "/usr/bin:/bin"},
    )
    if r.returncode not in (0, 5):
        raise SystemExit(f"rank1 {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return json.loads(r.stdout)


def error(pred: Path, truth: Path, base: Path) -> float:
    import torch

    from rank1tools.io import open_checkpoint

    p, t, b = open_checkpoint(pred), open_checkpoint(truth), open_checkpoint(base)
    num = den = 0.0
    for name in b.names:
        tt, bb = t.read(name, dtype=torch.float64), b.read(name, dtype=torch.float64)
        num += float(((p.read(name, dtype=torch.float64) - tt) ** 2).sum())
        den += float(((tt - bb) ** 2).sum())
    return math.sqrt(num / den)


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    info = machine()
    rows = []
    for kind in KINDS:
        base, run = make(kind)
        out = WORK / kind / "out"
        lin = rank1(
            "linearity",
            str(base),
            "--run",
            str(run),
            "--steps",
            f"10:{CUT}",
            "--out",
            str(out / "linearity"),
            "--no-plots",
        )
        s = lin["summary"]
        row = {
            "run": kind,
            "window": f"10..{CUT}",
            "target": TARGET,
            "linearity_frac_r2_above_0.7": s["headline"]["frac_r2_above_0.7"],
            "explained_1_mean": s["mean"]["mean_explained_1"],
            "coef_r2_1_mean": s["mean"]["mean_coef_r2_1"],
            "error_stop_at_cut": error(run / f"checkpoint-{CUT}", run / f"checkpoint-{TARGET}", base),
        }
        for label, method, opts in (
            ("relex", "relex", ["--rank", "1"]),
            ("linear", "linear", ["--mode", "lstsq"]),
            ("linear_norms", "linear", ["--mode", "lstsq", "--extrapolate-norms"]),
        ):
            dest = out / label
            rank1(
                "extrapolate",
                str(base),
                "--run",
                str(run),
                "--method",
                method,
                *opts,
                "--history-until",
                str(CUT),
                "--target-step",
                str(TARGET),
                "--dtype",
                "float32",
                "--out",
                str(dest),
            )
            row[f"error_{label}"] = error(dest, run / f"checkpoint-{TARGET}", base)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    write_results(
        "extrapolation_quality",
        {
            "machine_info": info,
            "benchmark": "extrapolation_quality",
            "steps": STEPS,
            "cut": CUT,
            "target": TARGET,
            "noise": NOISE,
            "rows": rows,
        },
        summarise,
        QUICK,
    )


MEASURED = """How far a good fit in the window says anything about the extrapolation. Three planted runs of the
same small Llama shape (2 layers, hidden 64), steps 10..100, each tensor's update following a law: linear,
ΔW_t = s·(t/100)·D; saturating, s·√(t/100)·D (progress slows down after the window); rotating,
s·(t/100)·(cos φ_t D + sin φ_t E) with φ_t = (π/2)(t/100) (the direction turns); each plus dense noise. For
each run, `rank1 linearity` on the window 10..40 (what a user sees before trusting a method), then
`rank1 extrapolate` from that window to step 100 with relex (rank 1) and linear lstsq (norm weights copied
from the last checkpoint as the reference does, and with `--extrapolate-norms`), and the error of each
written checkpoint against the true step-100 weights, ‖θ̂ − θ₁₀₀‖ / ‖θ₁₀₀ − θ₀‖ over all tensors in float64,
beside stopping at the cut (θ̂ = θ₄₀). Accuracy only: nothing here is timed."""


def summarise(raw: dict) -> dict:
    cols = [
        "run (update law)",
        "share of elements R² > 0.7",
        "mean explained_1",
        "mean coef R²_1",
        "error: stop at the cut",
        "error: relex r = 1",
        "error: linear lstsq",
        "error: linear lstsq, `--extrapolate-norms`",
    ]
    keys = [
        "run",
        "linearity_frac_r2_above_0.7",
        "explained_1_mean",
        "coef_r2_1_mean",
        "error_stop_at_cut",
        "error_relex",
        "error_linear",
        "error_linear_norms",
    ]
    quality = extra(
        f"Window {raw['steps'][0]}..{raw['cut']}, target step {raw['target']}, noise {raw['noise']}",
        cols,
        [[r[k] for k in keys] for r in raw["rows"]],
    )
    return report(
        raw,
        name="extrapolation_quality",
        title="Extrapolation quality on planted runs",
        issue="#10",
        measured=MEASURED,
        table=table([]),
        tables=[quality],
        notes=[
            "The first three figures are what `rank1 linearity` shows on the window; the last four are "
            "the error of each checkpoint at the target step. The model is small, so its norm weights "
            "carry a large share of the update norm (hence the gap between lstsq with norms copied and "
            "extrapolated).",
            "How to read the table: [extrapolation.md](extrapolation.md#a-high-r²-is-not-a-licence-to-"
            "extrapolate): compare the window's figures (the first three) of the runs that keep their "
            "direction with those of the rotating run, then their errors.",
        ],
    )


if __name__ == "__main__":
    main()
