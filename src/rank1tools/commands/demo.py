"""`rank1 demo`: a small synthetic base model and RL run, generated and inspected.

The embedded default for `make demo`: it needs no download. Later commands extend it
(decompose, reconstruct, extrapolate on the same run).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.writer import prepare_output
from ..synthetic import LlamaShape, make_base, make_run
from .inspect import ModelReport, RunReport, inspect_model, inspect_run

DEMO_SHAPE = LlamaShape(vocab=256, hidden=64, intermediate=176, layers=4, heads=4, kv_heads=2, tie=True)
DEMO_STEPS = [10, 20, 30, 40, 50]


@dataclass
class DemoResult:
    out: str
    base: ModelReport
    run: RunReport


def run_demo(out: str, *, force: bool = False) -> DemoResult:
    target = prepare_output(out, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # bf16 base, fp32 policy checkpoints: what TRL saves for a bf16 model
        make_base(tmp / "base", DEMO_SHAPE, dtype=torch.bfloat16)
        make_run(tmp / "run", DEMO_STEPS, DEMO_SHAPE, layout="trl", base_dtype=torch.bfloat16, dtype=torch.float32)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoResult(out=out, base=inspect_model(str(Path(out) / "base")), run=inspect_run(str(Path(out) / "run")))
