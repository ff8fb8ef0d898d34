"""Hardening, processes (issue #8 items 9, 10): signals, kills and concurrent runs.

Real `rank1` processes are stopped with SIGTERM and SIGKILL at seeded random moments while they
work; the output must be either absent or complete, the rerun must clean up what a killed run left
and (decompose) resume to the same bytes as an uninterrupted run. A second run on an output that
another process holds fails at once naming the holder.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from rank1tools.io.output_lock import OutputLock
from rank1tools.synthetic import LlamaShape, make_base, make_run

from _support import finish_cli, finish_paused, run_cli, start_cli, start_paused, tree_snapshot

# large enough that each command works for about 2 s after its imports, so a kill lands mid-work
SHAPE = LlamaShape(vocab=256, hidden=256, intermediate=704, layers=6, heads=4, kv_heads=2, tie=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sig")
    make_base(root / "base", SHAPE, dtype=torch.float32)
    make_run(root / "run", [10, 20, 30], SHAPE, base_dtype=torch.float32, dtype=torch.float32, noise=1e-4)
    return root


def _decompose_args(inputs: Path) -> list[str]:
    return [
        "decompose",
        str(inputs / "base"),
        "--run",
        str(inputs / "run"),
        "--out",
        "d",
        "--rank",
        "4",
        "--device",
        "cpu",
        "-q",
    ]


def _reconstruct_args(inputs: Path) -> list[str]:
    return [
        "reconstruct",
        str(inputs / "base"),
        str(inputs / "run" / "checkpoint-30"),
        "--out",
        "r",
        "--rank",
        "1,2",
        "--device",
        "cpu",
        "-q",
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """Uninterrupted outputs of both command lines (inputs are absolute and --out relative, so the
    provenance in a rerun elsewhere is the same bytes)."""
    out = {}
    for make_args, name in ((_decompose_args, "d"), (_reconstruct_args, "r")):
        cwd = tmp_path_factory.mktemp(f"ref-{name}")
        r = run_cli(make_args(inputs), cwd)
        assert r.returncode == 0, r.stderr
        out[name] = _files(cwd / name)
    return out


def _start_and_kill(args: list[str], cwd: Path, staging_glob: str, sig: int, delay: float):
    """Start rank1, wait until it has begun writing (its staging folder exists), wait `delay`, send `sig`."""
    proc = start_cli(args, cwd)
    deadline = time.monotonic() + 60
    while not list(cwd.glob(staging_glob)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(sig)
    return finish_cli(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_decompose_killed_then_rerun_resumes_byte_identical(inputs, reference, tmp_path, sig):
    rng = random.Random(1234 + sig)
    want = reference["d"]
    for attempt in range(4):  # later attempts strike sooner, in case the machine outran the first
        r = _start_and_kill(_decompose_args(inputs), tmp_path, ".d.partial", sig, rng.uniform(0.0, 0.8) / (attempt + 1))
        if (tmp_path / "d").exists():  # the signal came after the output was in place: complete
            assert _files(tmp_path / "d") == want
            shutil.rmtree(tmp_path / "d")
            continue
        if sig == signal.SIGTERM:
            assert r.returncode == 143, r.stderr
            assert r.stderr.strip().splitlines()[-1].startswith("rank1: terminated: finished modules are kept")
            assert not (tmp_path / ".d.lock").exists()  # released on the way out
        else:
            assert r.returncode == -signal.SIGKILL
        assert not (tmp_path / "d").exists()  # never a half-written output
        rerun = run_cli(_decompose_args(inputs), tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert _files(tmp_path / "d") == want
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no .partial, .lock or .tmp- left
        return
    pytest.skip("the command finished before every signal (machine too fast for this workload)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_reconstruct_killed_leaves_nothing_or_rerun_cleans_up(inputs, reference, tmp_path, sig):
    rng = random.Random(99 + sig)
    want = reference["r"]
    for attempt in range(4):
        r = _start_and_kill(_reconstruct_args(inputs), tmp_path, ".r.tmp-*", sig, rng.uniform(0.0, 0.4) / (attempt + 1))
        if (tmp_path / "r").exists():  # the signal came after the output was in place: complete
            assert _files(tmp_path / "r") == want
            shutil.rmtree(tmp_path / "r")
            continue
        assert not (tmp_path / "r").exists()
        if sig == signal.SIGTERM:
            assert r.returncode == 143, r.stderr
            assert r.stderr.strip().splitlines()[-1] == "rank1: terminated: nothing was written"
            assert list(tmp_path.iterdir()) == []  # staging removed, lock released
        else:
            assert r.returncode == -signal.SIGKILL
            assert list(tmp_path.glob(".r.tmp-*"))  # what a killed process leaves ...
        rerun = run_cli(_reconstruct_args(inputs), tmp_path)
        assert rerun.returncode == 0, rerun.stderr
        assert _files(tmp_path / "r") == want
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # ... the next run removes
        return
    pytest.skip("the command finished before every signal (machine too fast for this workload)")


@pytest.mark.parametrize(
    "make_args,name", [(_decompose_args, "d"), (_reconstruct_args, "r")], ids=["decompose", "reconstruct"]
)
def test_second_run_on_a_held_output_fails_naming_the_holder(inputs, tmp_path, make_args, name):
    target = tmp_path / name
    (tmp_path / f".{name}.tmp-1-abc").mkdir()  # a staging folder of the live holder: must survive
    with OutputLock(target, name):
        before = tree_snapshot(tmp_path)
        r = run_cli(make_args(inputs), tmp_path)
        assert r.returncode == 4, r.stderr
        line = r.stderr.strip()
        assert line.startswith(f"rank1: error: {name}: another rank1 run is writing this output (pid {os.getpid()}")
        assert "\n" not in line and r.stdout == ""
        assert tree_snapshot(tmp_path) == before
    assert list(tmp_path.glob(f".{name}.lock")) == []  # the holder removes its lock file when done


# ---- the line a signal prints tells the truth in each phase (issue #20 §3, "misleading messages") ----


def _fit_pls_args(store: Path) -> list[str]:
    return ["fit-pls", str(store), "--out", "o", "--force", "--no-plots", "-q"]


@pytest.fixture(scope="module")
def store(inputs, tmp_path_factory):
    """A factor store of the module's run, and fit-pls's uninterrupted output of _fit_pls_args."""
    root = tmp_path_factory.mktemp("store")
    r = run_cli(
        [
            "decompose",
            str(inputs / "base"),
            "--run",
            str(inputs / "run"),
            "--out",
            str(root / "store"),
            "--rank",
            "1",
            "--include",
            "*layers.0.*",
            "--device",
            "cpu",
            "-q",
        ],
        root,
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(_fit_pls_args(root / "store"), root)
    assert r.returncode == 0, r.stderr
    return root / "store", _files(root / "o")


@pytest.mark.parametrize(
    "phase,state",
    [
        ("staged", "nothing was written"),
        ("publishing", "the output is complete at o"),
        ("published", "the output is complete at o"),
    ],
)
def test_sigterm_line_tells_the_state_of_the_output(store, tmp_path, phase, state):
    """SIGTERM while staging, in the middle of the swap of an existing output (--force) and just
    after it: exit 143, the last line says what is on disk, and no .o.old-* / .o.tmp-* / lock is left."""
    store_path, want = store
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "rank1tools.json").write_text('{"tool": "rank1tools"}')  # an earlier rank1 output
    before = _files(tmp_path / "o")
    proc, lines = start_paused(_fit_pls_args(store_path), tmp_path, phase)
    r = finish_paused(proc, lines, signal.SIGTERM)
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"rank1: terminated: {state}"
    assert _files(tmp_path / "o") == (before if phase == "staged" else want)
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no swap, staging or lock left
