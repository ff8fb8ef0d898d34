"""--executor ray for reconstruct, linearity and extrapolate relex|linear (issue #13): the output
equals --executor local byte for byte; an interrupted run (the driver stopped, or killed with
SIGKILL) resumes from the finished units and still gives the same bytes; a task that raises fails
the command with the tensor's name and leaves nothing behind. Plus the pieces without Ray: tensor
groups, the writer's resumable staging, the workers' code check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rank1tools.commands.extrapolate.registry import ExtrapolateOptions, extrapolate
from rank1tools.commands.linearity import LinearityOptions, linearity
from rank1tools.commands.reconstruct import reconstruct
from rank1tools.commands.reconstruct.plan import ReconstructOptions
from rank1tools.engine.executor_options import ExecutorOptions
from rank1tools.engine.executors import TaskFailed, check_worker_code, code_fingerprint
from rank1tools.engine.tensor_units import group_tensors
from rank1tools.errors import Rank1Error
from rank1tools.io import open_checkpoint
from rank1tools.io.writer import ShardedWriter, TensorSpec
from rank1tools.synthetic import LlamaShape, make_base, make_run

from _ray_support import SRC, assert_same_tree
from _support import run_main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray  # make test-fast leaves these out

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = [5, 10, 20, 40]
RAY = ExecutorOptions("ray", num_cpus=1, max_in_flight=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayrun")
    make_base(root / "base", SHAPE, dtype=torch.bfloat16)
    make_run(root / "run", STEPS, SHAPE, base_dtype=torch.bfloat16, dtype=torch.bfloat16, noise=3e-3)
    return root


def _commands(r: Path) -> dict[str, tuple[str, ...]]:
    base, run = str(r / "base"), str(r / "run")
    return {
        "reconstruct": (
            "reconstruct",
            base,
            f"{run}/checkpoint-40",
            "--rank",
            "1,3",
            "--max-shard-size",
            "40KB",
            "--rest",
            "checkpoint",
        ),
        "linearity": ("linearity", base, "--run", run, "--rank", "2", "--sample", "500", "--no-plots"),
        "relex": (
            "extrapolate",
            base,
            "--run",
            run,
            "--method",
            "relex",
            "--history-until",
            "20",
            "--target-step",
            "40,80",
            "--dtype",
            "float32",
        ),
        "linear": (
            "extrapolate",
            base,
            "--run",
            run,
            "--method",
            "linear",
            "--target-step",
            "60",
            "--max-shard-size",
            "40KB",
        ),
    }


@pytest.mark.parametrize("command", ["reconstruct", "linearity", "relex", "linear"])
def test_cli_ray_equals_local_byte_for_byte(ray_local, run_dir, tmp_path, command):
    out = tmp_path / "out"
    args = (*_commands(run_dir)[command], "--out", str(out), "--quiet")
    p = run_main(*args)
    assert p.returncode == 0, p.stderr
    out.rename(tmp_path / "local")
    # the same --out: the recorded command line then differs only by the executor options, which it omits
    p = run_main(*args, "--executor", "ray", "--ray-num-cpus", "1", "--max-in-flight", "2")
    assert p.returncode == 0, p.stderr
    assert_same_tree(out, tmp_path / "local", min_files=3)
    assert sorted(os.listdir(tmp_path)) == ["local", "out"]  # no work folder, staging or lock left


def _interrupt_after(n: int, seen: list[int]):
    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done >= n:
            raise KeyboardInterrupt

    return progress


CALLS = {
    "reconstruct": lambda r, out, **kw: reconstruct(
        str(r / "base"), str(r / "run" / "checkpoint-20"), out, options=ReconstructOptions(rank="2", device="cpu"), **kw
    ),
    "linearity": lambda r, out, **kw: linearity(
        str(r / "base"), [], out, run=str(r / "run"), options=LinearityOptions(plots=False, device="cpu"), **kw
    ),
    "relex": lambda r, out, **kw: extrapolate(
        str(r / "base"),
        out,
        options=ExtrapolateOptions(method="relex", run=str(r / "run"), target_steps=[60, 100], device="cpu"),
        **kw,
    ),
}


@pytest.mark.parametrize("command", ["linearity", "relex"])  # reconstruct: test_driver_killed_then_rerun_resumes
def test_interrupted_ray_run_resumes_with_the_same_bytes(ray_local, run_dir, tmp_path, command):
    call = CALLS[command]
    call(run_dir, str(tmp_path / "local"))
    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        call(run_dir, str(tmp_path / "o"), executor=RAY, progress=_interrupt_after(3, seen))
    assert not (tmp_path / "o").exists()
    kept = [json.loads(f.read_text()) for f in (tmp_path / ".o.partial" / "units").glob("*.json")]
    assert sum(len(k["names"]) for k in kept) >= 3 and len(kept) < len(seen) + 2  # not all: some units were left
    again: list[int] = []
    call(run_dir, str(tmp_path / "o"), executor=RAY, progress=lambda done, total: again.append(done))
    assert again[0] == sum(len(k["names"]) for k in kept)  # the recorded tensors are done before any task runs
    assert_same_tree(tmp_path / "o", tmp_path / "local", min_files=3)
    assert sorted(os.listdir(tmp_path)) == ["local", "o"]


def test_driver_killed_then_rerun_resumes(ray_local, run_dir, tmp_path):
    """A driver process connected to the cluster (--ray-address) is SIGKILLed once some units are
    recorded; the same command rerun finishes from there, byte-identical to a local run."""
    out = tmp_path / "out"
    args = (*_commands(run_dir)["reconstruct"], "--out", str(out), "--quiet")
    assert run_main(*args).returncode == 0
    out.rename(tmp_path / "local")
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [
        sys.executable,
        "-c",
        "from rank1tools.cli import main; main()",
        *args,
        "--executor",
        "ray",
        "--ray-address",
        address,
        "--ray-num-cpus",
        "1",
        "--max-in-flight",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = tmp_path / ".out.partial" / "units"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not list(units.glob("*.json")):
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.skip(f"the driver finished (rc {proc.returncode}) before it could be killed: {proc.stderr.read()!r}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(units.glob("*.json"))
    p = run_main(*args, "--executor", "ray", "--ray-address", address, "--ray-num-cpus", "1")
    assert p.returncode == 0, p.stderr
    assert_same_tree(out, tmp_path / "local", min_files=3)


def _poisoned_run(run_dir: Path, root: Path, name: str) -> Path:
    """The run with one NaN in `name` of checkpoint-20."""
    run = root / "run"
    for s in STEPS:
        src = open_checkpoint(run_dir / "run" / f"checkpoint-{s}")
        tensors = {n: src.read_raw(n).clone() for n in src.names}
        if s == 20:
            tensors[name].view(-1)[7] = float("nan")
        (run / f"checkpoint-{s}").mkdir(parents=True)
        save_file(tensors, str(run / f"checkpoint-{s}" / "model.safetensors"), metadata={"format": "pt"})
    return run


@pytest.mark.parametrize("command", ["reconstruct", "relex"])
def test_failing_task_names_the_tensor_and_leaves_nothing(ray_local, run_dir, tmp_path, command):
    name = "model.layers.1.self_attn.o_proj.weight"
    run = _poisoned_run(run_dir, tmp_path / "in", name)
    out = tmp_path / "out"
    if command == "reconstruct":
        args = ("reconstruct", str(run_dir / "base"), str(run / "checkpoint-20"), "--rank", "1")
    else:
        args = ("extrapolate", str(run_dir / "base"), "--run", str(run), "--method", "relex", "--target-step", "80")
    p = run_main(*args, "--out", str(out), "--executor", "ray", "--ray-num-cpus", "1", "--quiet")
    assert p.returncode == 3, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error:"), p.stderr
    assert f"tensor {name!r}" in lines[0] and "non-finite" in lines[0] and "checkpoint-20" in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no --out, no work folder


def test_executor_option_errors_of_the_commands(run_dir, tmp_path):
    base, run = str(run_dir / "base"), str(run_dir / "run")
    p = run_main(
        "extrapolate",
        base,
        "--out",
        str(tmp_path / "o"),
        "--method",
        "alpharl",
        "--fits",
        str(run_dir / "fits"),
        "--target-metric",
        "0.5",
        "--executor",
        "ray",
    )
    assert p.returncode == 2
    assert "--executor ray applies to --method relex and linear" in p.stderr
    p = run_main("linearity", base, "--run", run, "--out", str(tmp_path / "o"), "--executor", "ray", "--device", "cuda")
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "rank1: error: --device cuda with --executor ray needs --ray-num-gpus (e.g. 1, or 0.25 to share a GPU)"
    )
    p = run_main(
        "reconstruct", base, f"{run}/checkpoint-5", "--rank", "1", "--out", str(tmp_path / "o"), "--max-in-flight", "2"
    )
    assert p.returncode == 2 and "--max-in-flight applies to --executor ray only" in p.stderr
    assert os.listdir(tmp_path) == []


def test_group_tensors_by_bytes():
    sizes = {"a": 10, "b": 30, "c": 5, "d": 5, "e": 50, "f": 1}
    groups = group_tensors(list(sizes), sizes.__getitem__, budget=40)
    assert [g.names for g in groups] == [("a", "b"), ("c", "d", "e"), ("f",)]
    assert [g.key for g in groups] == ["000000", "000001", "000002"]
    assert groups[0].label == "tensors 'a' .. 'b' (2)" and groups[2].label == "tensor 'f'"
    # default budget: 1/64 of the model when that is below 64 MiB, so every tensor is its own unit here
    assert [g.names for g in group_tensors(list(sizes), sizes.__getitem__)] == [(n,) for n in sizes]


def test_writer_keeps_intact_shards_of_a_resumable_staging(tmp_path):
    specs = [TensorSpec("a", (4, 8), torch.float32), TensorSpec("b", (16,), torch.bfloat16)]
    staging = tmp_path / "work" / "out"
    a = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    w = ShardedWriter(tmp_path / "ckpt", specs, max_shard_size=100, staging=staging)
    assert not w.resumed and len(list(staging.glob("*.safetensors"))) == 2
    w.placement.write("a", a)  # as a Ray task would: straight into the planned shard
    w.abort()  # a kept staging folder survives an abort (the interruption of a resumable run)
    w = ShardedWriter(tmp_path / "ckpt", specs, max_shard_size=100, staging=staging)
    assert w.resumed
    w.mark_written(["a"])
    w.write("b", torch.ones(16))
    w.commit()
    ck = open_checkpoint(tmp_path / "ckpt")
    assert torch.equal(ck.read_raw("a"), a) and torch.equal(ck.read_raw("b"), torch.ones(16, dtype=torch.bfloat16))
    # a different plan (here: the dtype of b) finds no intact shard to keep
    w = ShardedWriter(
        tmp_path / "ckpt2",
        [specs[0], TensorSpec("b", (16,), torch.float32)],
        max_shard_size=100,
        staging=tmp_path / "work2",
    )
    assert not w.resumed
    w.abort()


def test_worker_with_other_code_is_refused():
    with pytest.raises(TaskFailed) as err:
        check_worker_code("0.0.0+000000000000")
    msg = str(err.value)
    assert f"runs rank1tools {code_fingerprint()}" in msg and "the driver 0.0.0+000000000000" in msg
    assert isinstance(err.value, Rank1Error)
    check_worker_code(code_fingerprint())  # the same code: no error


def test_task_raising_other_errors_is_retried_then_named(ray_local, tmp_path):
    """Anything but rank1's own errors (e.g. an I/O hiccup) is retried by Ray; a task that keeps
    failing fails with its unit's name after RETRIES retries. (Data errors: not retried, above.)"""
    from rank1tools.engine.executors import RETRIES, run_units

    def flaky(unit: str, folder: str) -> int:
        count = Path(folder) / unit
        n = int(count.read_text()) if count.exists() else 0
        count.write_text(str(n + 1))
        if unit == "always" or n < 2:
            raise OSError(f"attempt {n + 1} of {unit}")
        return n + 1

    assert dict(run_units(["flaky"], flaky, (str(tmp_path),), RAY, 1)) == {"flaky": 3}
    with pytest.raises(TaskFailed) as err:
        list(run_units(["always"], flaky, (str(tmp_path),), RAY, 1))
    assert str(err.value) == f"always: task failed {RETRIES + 1} times: OSError: attempt {RETRIES + 1} of always"
    assert (tmp_path / "always").read_text() == str(RETRIES + 1)
