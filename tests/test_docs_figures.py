"""Figures the docs quote that are not example transcripts: the noise baselines of "how near 1 is
near 1" (docs/concepts.md), measured with `rank1 linearity` on a driftless random walk."""

from __future__ import annotations

import csv

import pytest
import torch

from rank1tools.io.checkpoint import open_checkpoint
from rank1tools.synthetic import LlamaShape, make_base, write_model

from _support import run_main

SHAPE = LlamaShape(vocab=128, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, tie=True)


@pytest.mark.parametrize("steps", [5, 8])
def test_a_driftless_random_walk_looks_trajectory_rank1(tmp_path, steps):
    """Each checkpoint adds fresh independent noise to the last: no direction is favoured, yet the
    uncentred trajectory gives explained_1 about 0.82 and coef_r2_1 about 0.96 (concepts.md)."""
    base = make_base(tmp_path / "base", SHAPE)
    gen = torch.Generator().manual_seed(1)
    ck = open_checkpoint(str(base))
    weights = {n: ck.read(n).float() for n in ck.entries}
    for step in range(1, steps + 1):
        weights = {n: w + 1e-3 * torch.randn(w.shape, generator=gen) for n, w in weights.items()}
        write_model(tmp_path / "run" / f"checkpoint-{step}", weights, SHAPE.config(torch.float32))
    r = run_main(
        "linearity",
        str(base),
        "--run",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "lin"),
        "--include",
        "*proj.weight",
        "--no-plots",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    rows = [
        {k: float(v) for k, v in row.items() if k in ("explained_1", "coef_r2_1")}
        for row in csv.DictReader((tmp_path / "lin" / "linearity.csv").open())
    ]
    explained = [row["explained_1"] for row in rows]
    coef = [row["coef_r2_1"] for row in rows]
    assert len(rows) == 14
    assert sum(explained) / len(explained) == pytest.approx(0.82, abs=0.02)
    assert min(explained) > 0.75 and max(explained) < 0.9
    assert sum(coef) / len(coef) == pytest.approx(0.96, abs=0.01)
