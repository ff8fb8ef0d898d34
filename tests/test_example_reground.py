"""examples/reground_between_segments.sh (docs/reground.md#ddp-fsdp-deepspeed): the file route for
trainers the callback cannot run in. A stand-in trainer moves every weight on an exact straight
line (dyadic values: exact in float32); after R rounds of M steps + a jump of N the weights are the
line at R·(M + N), norm weights (copied from each segment's end) at R·M; bad usage exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from rank1tools.synthetic import write_model

from _extrapolate_support import SHAPE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "reground_between_segments.sh"

# The stand-in trainer: RUN/checkpoint-k = MODEL + k·D for k = M/2 and M (D fixed per tensor).
TRAINER = """
import os, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from rank1tools.synthetic import write_model
sys.path.insert(0, {tests!r})
from test_example_reground import direction
model, steps, run = Path(os.environ["MODEL"]), int(os.environ["STEPS"]), Path(os.environ["RUN"])
theta = load_file(str(model / "model.safetensors"))
for k in (steps // 2, steps):
    out = run / f"checkpoint-{{k}}"
    write_model(out, {{n: v + k * direction(n, v) for n, v in theta.items()}})
    shutil.copy(model / "config.json", out / "config.json")
"""


def direction(name: str, value: torch.Tensor) -> torch.Tensor:
    """A per-tensor update direction, multiples of 2^-12 (deterministic from the name)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randint(-4, 5, value.shape, generator=g).float() / 4096


def _base(tmp_path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (SHAPE.vocab, SHAPE.hidden),
        "model.layers.0.self_attn.q_proj.weight": (SHAPE.hidden, SHAPE.hidden),
        "model.layers.0.input_layernorm.weight": (SHAPE.hidden,),
        "model.norm.weight": (SHAPE.hidden,),
    }
    theta = {n: torch.round(torch.randn(s, generator=g) * 8) / 64 for n, s in shapes.items()}
    write_model(tmp_path / "base", theta, SHAPE.config(torch.float32))
    return theta


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    trainer = tmp_path / "train.py"
    trainer.write_text(TRAINER.format(tests=str(ROOT / "tests")))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "RANK1": f"{sys.executable} -m rank1tools.cli",
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args, sys.executable, str(trainer)], env=env, capture_output=True, text=True
    )


def test_rounds_land_on_the_planted_line(tmp_path):
    theta0 = _base(tmp_path)
    M, N, R = 4, 4, 2
    r = _run(tmp_path, str(tmp_path / "base"), str(tmp_path / "out"), str(M), str(N), str(R), "--")
    assert r.returncode == 0, r.stderr
    last = Path(r.stdout.strip())
    assert last == tmp_path / "out" / f"round-{R}" / "jump"
    got = load_file(str(last / "model.safetensors"))
    assert set(got) == set(theta0)
    for n, v in theta0.items():
        k = R * M if n.endswith("norm.weight") else R * (M + N)
        assert torch.equal(got[n], v + k * direction(n, v)), n
    first = load_file(str(tmp_path / "out" / "round-1" / "jump" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    report = json.loads((tmp_path / "out" / "round-1" / "jump.json").read_text())
    assert report["parameters"]["mode"] == "two-point" and report["parameters"]["target_steps"] == [M + N]
    assert torch.equal(first[q], theta0[q] + (M + N) * direction(q, theta0[q]))


def test_bad_usage_exits_2(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "base", "out", "4"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage:") and r.stderr.count("\n") == 1
