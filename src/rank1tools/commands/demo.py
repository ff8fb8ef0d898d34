"""`rank1 demo --synthetic`: the planted run, whose answer is known, with nothing to download.

Generates a small synthetic bf16 base and a TRL-style run of fp32 checkpoints whose updates are
a planted rank-1 direction growing linearly with the step plus dense noise, then runs
`inspect`, `decompose` and a rank-1 `reconstruct` of the last checkpoint on them. The default
`rank1 demo` trains a real run instead (commands/demo_rl.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.output_lock import locked_output
from ..io.outputs import staged_output
from ..io.writer import provenance, write_provenance
from ..synthetic import LlamaShape, make_base, make_run
from .decompose import DecomposeOptions, DecomposeResult, decompose
from .inspect import ModelReport, RunReport, inspect_model, inspect_run
from .reconstruct import reconstruct
from .reconstruct.plan import ReconstructOptions, ReconstructResult

DEMO_SHAPE = LlamaShape(vocab=256, hidden=64, intermediate=176, layers=4, heads=4, kv_heads=2, tie=True)
DEMO_STEPS = [10, 20, 30, 40, 50]
DEMO_NOISE = 6e-4  # dense noise per element at the last step: energy_1 ~0.6-0.9, not a perfect rank-1


@dataclass
class DemoResult:
    out: str
    base: ModelReport
    run: RunReport
    decompose: DecomposeResult
    reconstruct: ReconstructResult


def run_synthetic_demo(out: str, *, force: bool = False, device: str = "cpu") -> DemoResult:
    # `out` stays locked until the analyses inside it are written (io/output_nesting.py)
    with locked_output(out, force=force):
        return _run_synthetic_demo(out, force=force, device=device)


def _run_synthetic_demo(out: str, *, force: bool, device: str) -> DemoResult:
    with locked_output(out, force=force) as target, staged_output(target, force=force, label=out) as tmp:
        # bf16 base, fp32 policy checkpoints: what TRL saves for a bf16 model
        make_base(tmp / "base", DEMO_SHAPE, dtype=torch.bfloat16)
        make_run(
            tmp / "run",
            DEMO_STEPS,
            DEMO_SHAPE,
            layout="trl",
            base_dtype=torch.bfloat16,
            dtype=torch.float32,
            noise=DEMO_NOISE,
        )
        write_provenance(tmp, provenance("demo", [], {"steps": DEMO_STEPS, "noise": DEMO_NOISE}))
    root = Path(out)
    base, run = str(root / "base"), str(root / "run")
    dec = decompose(base, [], str(root / "decompose"), run=run, options=DecomposeOptions(rank=8, device=device))
    rec = reconstruct(
        base,
        str(root / "run" / f"checkpoint-{DEMO_STEPS[-1]}"),
        str(root / "rank-1"),
        options=ReconstructOptions(rank="1", dtype="float32", device=device, factors=str(root / "decompose")),
    )
    return DemoResult(out=out, base=inspect_model(base), run=inspect_run(run), decompose=dec, reconstruct=rec)
