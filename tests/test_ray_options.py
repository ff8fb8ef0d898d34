"""--executor ray's connection and signals (issue #20 §3, "Ray options"): a malformed --ray-address
is a usage error before anything is made (it was an internal error leaving `.NAME.partial`); an
address where nothing answers fails within --ray-timeout (Ray retried for more than ten minutes);
SIGTERM during a Ray run cleans up and exits 143 with the state line (Ray's handler exited 1 or 15).
The runs are real `rank1` processes, so nothing of Ray's state in this process matters to them."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from rank1tools.engine.executor_options import check_address
from rank1tools.synthetic import LlamaShape, make_base, make_run

from _support import finish_cli, run_main, start_cli, tree_snapshot

ray = pytest.importorskip("ray")

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayopts")
    make_base(root / "base", SHAPE, dtype=torch.float32)
    make_run(root / "run", [5, 10, 20, 40], SHAPE, base_dtype=torch.float32, dtype=torch.float32, noise=3e-3)
    return root


def _linearity(r: Path, *extra: str) -> list[str]:
    return [
        "linearity",
        str(r / "base"),
        "--run",
        str(r / "run"),
        "--out",
        "L",
        "--no-plots",
        "-q",
        "--executor",
        "ray",
        *extra,
    ]


def _run(args: list[str], cwd: Path, timeout: float = 240):
    """A rank1 process, killed when it outlives `timeout` (the old code retried for ten minutes)."""
    proc = start_cli(args, cwd)
    try:
        return finish_cli(proc, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"rank1 {' '.join(args)} still running after {timeout} s")


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("rank1:")]
    assert len(lines) == 1 and lines[0].startswith("rank1: error: "), stderr
    return lines[0]


@pytest.mark.parametrize(
    "address", ["auto", "local", "10.0.0.5:6379", "ray://head:10001", "[::1]:6379", "head-node.example.com:6379"]
)
def test_addresses_ray_takes_pass(address):
    check_address(address, "--ray-address")


@pytest.mark.parametrize(
    "address", ["x", "head", "head:0", "head:70000", "ray://", "http://head:6379", "a b:1", "head:6379/x", ":6379"]
)
def test_malformed_ray_address_is_a_usage_error_before_anything_is_made(run_dir, tmp_path, address):
    before = tree_snapshot(tmp_path)
    r = run_main(*_linearity(run_dir, "--ray-address", address))
    assert r.returncode == 2, r.stderr
    assert _one_error_line(r.stderr) == (
        f"rank1: error: --ray-address {address!r}: expected HOST:PORT (the head "
        "node's GCS, e.g. 10.0.0.5:6379), ray://HOST:PORT (Ray Client), auto or local"
    )
    assert tree_snapshot(tmp_path) == before  # no .L.partial, no lock


def test_malformed_ray_address_variable_is_a_usage_error(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "nonsense")
    r = run_main(*_linearity(run_dir))
    assert r.returncode == 2, r.stderr
    assert _one_error_line(r.stderr).startswith("rank1: error: RAY_ADDRESS 'nonsense': expected HOST:PORT")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "1e9"])
def test_ray_timeout_is_checked(run_dir, tmp_path, value):
    r = run_main(*_linearity(run_dir, "--ray-timeout", value))
    assert r.returncode == 2, r.stderr
    assert "--ray-timeout" in _one_error_line(r.stderr)


def test_ray_timeout_applies_to_ray_only(run_dir, tmp_path):
    r = run_main(
        "linearity",
        str(run_dir / "base"),
        "--run",
        str(run_dir / "run"),
        "--out",
        str(tmp_path / "L"),
        "--ray-timeout",
        "5",
    )
    assert r.returncode == 2
    assert _one_error_line(r.stderr) == "rank1: error: --ray-timeout applies to --executor ray only"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_where_nothing_listens_fails_at_once_and_leaves_nothing(run_dir, tmp_path):
    port = _closed_port()
    r = _run(_linearity(run_dir, "--ray-address", f"127.0.0.1:{port}"), tmp_path)
    assert r.returncode == 2, r.stderr
    assert _one_error_line(r.stderr) == (
        f"rank1: error: --ray-address 127.0.0.1:{port}: cannot connect to Ray within "
        "30 s (Connection refused); check the address, or raise --ray-timeout"
    )
    assert list(tmp_path.iterdir()) == []  # no .L.partial, no lock


def test_address_that_never_answers_fails_within_ray_timeout(run_dir, tmp_path):
    """Something listens but is not Ray (it accepts and says nothing): bounded by --ray-timeout
    plus, at worst, one of Ray's own connection attempts."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        port = server.getsockname()[1]
        r = _run(_linearity(run_dir, "--ray-address", f"127.0.0.1:{port}", "--ray-timeout", "1"), tmp_path)
    assert r.returncode == 2, r.stderr
    assert _one_error_line(r.stderr) == (
        f"rank1: error: --ray-address 127.0.0.1:{port}: Ray did not answer within 1 s "
        "(is it a Ray head node?); check the address, or raise --ray-timeout"
    )
    assert list(tmp_path.iterdir()) == []


RAY_TASK_MANAGER_CRASH = ("Tried to complete task that was not pending", "TaskManager::CompletePendingTask")


def test_sigterm_during_a_ray_run_cleans_up_and_exits_143(ray_local, run_dir, tmp_path):
    """The driver connects to this module's Ray instance; SIGTERM once a unit is recorded."""
    address = ray_local.get_runtime_context().gcs_address
    args = _linearity(run_dir, "--ray-address", address, "--ray-num-cpus", "1", "--max-in-flight", "1")
    ray_crashes = 0
    for _attempt in range(3):
        proc = start_cli(args, tmp_path)
        deadline = time.monotonic() + 120
        while (
            proc.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob(".L.partial/units/*.json"))
        ):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        r = finish_cli(proc)
        if (tmp_path / "L").exists():  # finished before the signal: try again
            shutil.rmtree(tmp_path / "L")
            continue
        if r.returncode != 143 and any(m in r.stderr for m in RAY_TASK_MANAGER_CRASH):
            # Ray's own race (its core worker aborts when a reply arrives for a task the shutdown
            # already dropped; seen only on a loaded machine): not rank1's handling, try again
            ray_crashes += 1
            for p in tmp_path.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            continue
        assert r.returncode == 143, r.stderr
        assert [ln for ln in r.stderr.splitlines() if ln.startswith("rank1:")] == [
            "rank1: terminated: the finished work is kept beside --out: rerun the same command to resume"
        ]
        assert sorted(p.name for p in tmp_path.iterdir()) == [".L.partial"]  # lock released, units kept
        rerun = run_main(*[a if a != "L" else str(tmp_path / "L") for a in args])
        assert rerun.returncode == 0, rerun.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["L"]
        return
    pytest.skip(
        f"no attempt was checked: {ray_crashes} ended in Ray's own task-manager crash, the others "
        "finished before the signal (machine too fast for this workload)"
    )
