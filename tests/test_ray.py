"""--executor ray (issue #13): decompose's output equals --executor local byte for byte, also after an
interrupted run is resumed; a failing task names its module and leaves nothing at --out; the
missing-Ray and option errors. One local Ray instance (2 CPUs, no dashboard) for the whole file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rank1tools.commands.decompose import DecomposeOptions, decompose
from rank1tools.engine.executor_options import ExecutorOptions
from rank1tools.io import open_checkpoint
from rank1tools.synthetic import LlamaShape, make_base, make_run, matrix_module_names

from _ray_support import assert_same_tree
from _support import run_main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray  # make test-fast leaves these out

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
STEPS = [5, 10, 100]
RAY = ExecutorOptions("ray", max_in_flight=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayrun")
    make_base(root / "base", SHAPE, dtype=torch.bfloat16)
    make_run(root / "run", STEPS, SHAPE, base_dtype=torch.bfloat16, dtype=torch.float32, noise=3e-4)
    return root


def _assert_same_tree(actual: Path, expected: Path) -> None:
    # tables, summary, manifest, provenance, factors
    assert_same_tree(actual, expected, min_files=5 + len(matrix_module_names(SHAPE)))


def test_cli_ray_equals_local_byte_for_byte(ray_local, run_dir, tmp_path):
    out = tmp_path / "out"
    common = (
        "decompose",
        str(run_dir / "base"),
        "--run",
        str(run_dir / "run"),
        "--out",
        str(out),
        "--rank",
        "3",
        "--quiet",
    )
    p = run_main(*common)
    assert p.returncode == 0, p.stderr
    out.rename(tmp_path / "local")
    # same --out: the recorded command line then differs only by the executor options, which it omits
    p = run_main(*common, "--executor", "ray", "--max-in-flight", "3", "--ray-num-cpus=1")
    assert p.returncode == 0, p.stderr
    _assert_same_tree(out, tmp_path / "local")
    assert not any(n.startswith(".out.") for n in os.listdir(tmp_path))  # no staging or lock left


def test_ray_resume_after_interruption_same_bytes(ray_local, run_dir, tmp_path):
    opts = DecomposeOptions(rank=2, device="cpu")
    args = (str(run_dir / "base"), [])
    kw = dict(run=str(run_dir / "run"), options=opts)
    decompose(*args, str(tmp_path / "local"), **kw)
    seen: list[str] = []

    def stop_after_two(name: str) -> None:
        seen.append(name)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose(*args, str(tmp_path / "o"), on_module_done=stop_after_two, executor=RAY, **kw)
    assert not (tmp_path / "o").exists()
    kept = list((tmp_path / ".o.partial" / "factors").glob("*.safetensors"))
    assert len(kept) >= 2  # finished modules (tasks still running when interrupted may also have finished)
    result = decompose(*args, str(tmp_path / "o"), executor=RAY, **kw)
    assert result.resumed_modules == len(kept)
    _assert_same_tree(tmp_path / "o", tmp_path / "local")


def test_failing_task_names_module_and_leaves_nothing(ray_local, run_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    ck = open_checkpoint(run_dir / "run" / "checkpoint-10")
    tensors = {n: ck.read_raw(n).clone() for n in ck.names}
    tensors[name][3, 4] = float("nan")
    bad = tmp_path / "bad" / "checkpoint-10"
    bad.mkdir(parents=True)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    p = run_main("decompose", str(run_dir / "base"), str(bad), "--out", str(out), "--executor", "ray", "--quiet")
    assert p.returncode == 3, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error:"), p.stderr
    assert name in lines[0] and "non-finite" in lines[0] and "step 10" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # no --out, no staging folder


def test_missing_ray_is_a_usage_error(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    p = run_main(
        "decompose",
        str(run_dir / "base"),
        "--run",
        str(run_dir / "run"),
        "--out",
        str(tmp_path / "o"),
        "--executor",
        "ray",
    )
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "rank1: error: --executor ray needs Ray, which is not installed: pip install 'rank1tools[ray]'"
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--executor", "dask"), "--executor 'dask': choose one of local, ray"),
        (("--ray-num-gpus", "0.5"), "--ray-num-gpus applies to --executor ray only"),
        (("--executor", "ray", "--max-in-flight", "0"), "--max-in-flight 0: must be at least 1"),
    ],
)
def test_executor_option_errors(run_dir, tmp_path, args, needle):
    p = run_main("decompose", str(run_dir / "base"), "--run", str(run_dir / "run"), "--out", str(tmp_path / "o"), *args)
    assert p.returncode == 2
    assert p.stderr.strip() == f"rank1: error: {needle}"
    assert not (tmp_path / "o").exists()


def test_executor_args_left_out_of_command_line():
    from rank1tools.engine.executor_options import without_executor_args

    argv = [
        "decompose",
        "b",
        "--executor",
        "ray",
        "--ray-address=auto",
        "--max-in-flight",
        "4",
        "--rank",
        "2",
        "--ray-num-gpus",
        "0.25",
        "--ray-num-cpus=2",
    ]
    assert without_executor_args(argv) == ["decompose", "b", "--rank", "2"]
