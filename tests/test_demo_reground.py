"""`rank1 demo --reground M:N`: the re-grounded GRPO arm of the demo trainer (rank1tools.demo.reground).

N = 0 is plain training bit for bit; right after a jump the weights are the two-point extrapolation of
the segment's start and end (computed here in float64 numpy from the plain run's checkpoints: the
arm and the plain run share their first segment); the arm's table follows from its curve; the
option's errors are one line, exit 2, before anything is trained or imported.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rank1tools.io.checkpoint import open_checkpoint

from _support import run_main

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The --quick warm-up base and plain GRPO run (15 steps, a checkpoint every 3)."""
    from rank1tools.demo import DemoTraining, train_demo_run

    root = tmp_path_factory.mktemp("reground")
    config = DemoTraining.quick(0)
    return root, config, train_demo_run(root, config)


def _tensors(folder) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(str(folder))
    return {name: ck.read(name) for name in ck.entries}


def test_n0_is_plain_training_bit_for_bit(plain):
    from rank1tools.demo.reground import train_reground_arm

    root, config, trained = plain
    arm = train_reground_arm(root / "base", root / "arm-3-0", config, 3, 0)
    assert arm.jumps == []
    assert [p["step"] for p in arm.curve] == [0, *trained.steps]
    assert all(p["virtual_step"] == p["step"] for p in arm.curve)
    assert {p["step"]: p["accuracy"] for p in arm.curve} == trained.accuracy
    last = f"checkpoint-{trained.steps[-1]}"
    plain_w, arm_w = _tensors(trained.run / last), _tensors(arm.run / last)
    assert plain_w.keys() == arm_w.keys()
    for name in plain_w:
        assert torch.equal(plain_w[name], arm_w[name]), name
    assert (arm.run / "trainer_state.json").read_bytes() == (trained.run / "trainer_state.json").read_bytes()


def test_a_jump_is_the_two_point_line_from_the_segment_start_to_its_end(plain):
    from rank1tools.demo.reground import train_reground_arm

    root, config, trained = plain
    M, N = 3, 2
    # three steps: the first segment, the same as the plain run's, then the jump at step 3
    arm = train_reground_arm(root / "base", root / "arm-3-2", dataclasses.replace(config, grpo_steps=M), M, N)
    start, end = _tensors(root / "base"), _tensors(trained.run / f"checkpoint-{M}")
    jumped = _tensors(arm.run / f"checkpoint-{M}")
    assert jumped.keys() == end.keys()
    moved = 0
    for name, value in jumped.items():
        got = value.numpy().astype(np.float64)
        a, b = start[name].numpy().astype(np.float64), end[name].numpy().astype(np.float64)
        # norm weights keep their trained value (the reference's rule); every other tensor moves on its line
        expected = b if name.endswith("norm.weight") else a + (M + N) / M * (b - a)
        tol = 4 * np.finfo(np.float32).eps * max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=tol, err_msg=name)
        moved += not np.array_equal(got, b)
    assert moved > 0
    assert arm.jumps == [
        {
            "step": M,
            "virtual_step": M + N,
            "accuracy_before": trained.accuracy[M],
            "accuracy": arm.curve[-1]["accuracy"],
        }
    ]
    history = json.loads((arm.run / "trainer_state.json").read_text())["log_history"]
    records = [r for r in history if "reground/step" in r]
    assert records == [
        {
            "reground/step": M,
            "reground/virtual_step": M + N,
            "reground/accuracy_before": trained.accuracy[M],
            "reground/accuracy": arm.curve[-1]["accuracy"],
            "step": M,
        }
    ]


def test_the_arms_table_follows_from_its_curve(plain):
    from rank1tools.commands.demo_reground import run_reground_arm
    from rank1tools.demo import evaluate_checkpoint

    root, config, trained = plain
    M, N = 3, 3
    res = run_reground_arm(root, config, M, N, trained.accuracy, lambda _line: None)
    final = trained.steps[-1]
    curve = res["curve"]
    assert [p["step"] for p in curve] == [0, *trained.steps]
    assert [p["virtual_step"] for p in curve] == [s + N * (s // M) for s in [0, *trained.steps]]
    # the curve's accuracies are the evaluator's on the arm's written checkpoints
    for p in curve[1::2]:
        assert evaluate_checkpoint(Path(res["run"]) / f"checkpoint-{p['step']}", config) == p["accuracy"]
    assert [j["step"] for j in res["jumps"]] == list(range(M, final + 1, M))
    assert all(j["accuracy"] == {p["step"]: p["accuracy"] for p in curve}[j["step"]] for j in res["jumps"])
    plain_final = trained.accuracy[final]
    assert res["plain_final_accuracy"] == plain_final

    def first(points, level, key):
        hits = [p[key] for p in points if p["accuracy"] >= level]
        return hits[0] if hits else None

    plain_points = [{"step": s, "virtual_step": s, "accuracy": a} for s, a in sorted(trained.accuracy.items())]
    rows = {r["arm"]: r for r in res["table"]}
    for name, points in (("plain GRPO", plain_points), ("re-grounded GRPO", curve)):
        for share in (90, 100):
            level = share / 100 * plain_final
            assert rows[name][f"steps_to_{share}"] == first(points, level, "step")
            assert rows[name][f"virtual_steps_to_{share}"] == first(points, level, "virtual_step")
    assert rows["plain GRPO"]["steps_to_100"] is not None  # plain reaches its own final accuracy
    assert rows["plain GRPO"]["accuracy_at_final_step"] == plain_final
    assert rows["re-grounded GRPO"]["accuracy_at_final_step"] == curve[-1]["accuracy"]
    for share in (90, 100):
        a, b = rows["plain GRPO"][f"steps_to_{share}"], rows["re-grounded GRPO"][f"steps_to_{share}"]
        assert res[f"speedup_{share}"] == (a / b if a and b else None)
    # the terminal table shows these figures
    from rich.console import Console

    from rank1tools.cli import render_demo

    buf = io.StringIO()
    render_demo.demo_reground(Console(file=buf, width=200), res)
    lines = buf.getvalue().splitlines()
    for name, row in rows.items():
        line = next(line for line in lines if name in line and "│" in line)

        def shown(taken, virtual):
            return "never" if taken is None else str(taken) if taken == virtual else f"{taken} (virtual {virtual})"

        cells = [c.strip() for c in line.split("│")[1:-1]]
        assert cells == [
            name,
            shown(row["steps_to_90"], row["virtual_steps_to_90"]),
            shown(row["steps_to_100"], row["virtual_steps_to_100"]),
            f"{row['accuracy_at_final_step']:.1%}",
        ]


@pytest.mark.parametrize(
    "value, words",
    [
        ("8", "or M:N"),
        ("8:x", "or M:N"),
        ("8:-1", "N (steps jumped) must be at least 0"),
        ("1:2:3", "or M:N"),
        ("0:8", "M (optimizer steps per segment) must be at least 1"),
    ],
)
def test_reground_option_errors_are_one_line_exit_2(tmp_path, value, words):
    out = tmp_path / "out"
    r = run_main("demo", "--quick", "--reground", value, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "--reground" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_reground_schedules_parse():
    from rank1tools.commands.demo_reground import parse_reground

    assert parse_reground("auto") == "auto"  # the default: M:N from the demo's backtest
    assert parse_reground("none") is None  # no re-grounded arm
    assert parse_reground("16:8") == (16, 8) and parse_reground("3:0") == (3, 0)


def test_reground_refused_with_synthetic_and_torch_free(tmp_path):
    r = run_main("demo", "--synthetic", "--reground", "8:8", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--reground" in r.stderr and not (tmp_path / "x").exists()
    code = (
        "import sys\nfrom rank1tools.cli import main\nsys.argv = ['rank1', 'demo', '--reground', '0:1', '--out', "
        f"{str(tmp_path / 'y')!r}]\ntry:\n    main()\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
