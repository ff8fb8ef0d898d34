"""--executor ray with hf:// sources: the tasks receive pickled Hub checkpoints (a recipe pinned to the
sha the driver resolved), download the shards themselves from the fake Hub of tests/hub_server.py
into the workers' HF cache, and the output equals --executor local byte for byte.

The workers are processes of a local Ray instance (2 CPUs, no dashboard). They get the fake Hub's
address and their cache through the job's runtime environment (`runtime_env={"env_vars": ...}`),
as on a real cluster, rather than through this process's os.environ: the driver's huggingface_hub
settings are monkeypatched per test (test_hub._point_huggingface_hub), which worker processes would
not see, and the workers' cache is a folder of its own, so the test shows that the driver downloads
no weights and the tasks need nothing of its cache."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import test_hub  # noqa: E402
from test_hub import SHAPE, STEPS  # noqa: E402

from rank1tools.io import open_checkpoint  # noqa: E402
from rank1tools.synthetic import matrix_module_names  # noqa: E402

from _support import run_main  # noqa: E402

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray  # make test-fast leaves these out
_no_real_network, world, hubenv = test_hub._no_real_network, test_hub.world, test_hub.hubenv  # its fixtures


@pytest.fixture(scope="module")
def worker_cache(world, tmp_path_factory):
    """A local Ray instance whose workers import this tree's rank1tools and reach the fake Hub;
    returns the workers' HF cache folder."""
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process (without the fake Hub's environment)")
    home = tmp_path_factory.mktemp("worker_hf_home")
    env = {
        "HF_ENDPOINT": world.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ETAG_TIMEOUT": "10",
        "HF_HUB_DOWNLOAD_TIMEOUT": "10",
        "NO_PROXY": "127.0.0.1,localhost",
        "RANK1_HUB_CACHE_POLICY": "keep",
    }
    src = str(Path(__file__).resolve().parents[1] / "src")  # the workers import rank1tools from this tree
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = src if not old_path else f"{src}{os.pathsep}{old_path}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield home / "hub"
    ray.shutdown()
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _weights(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.safetensors")) if cache.is_dir() else []


@pytest.mark.parametrize("policy", ["keep", "evict"])
def test_decompose_hub_run_on_ray_equals_local(worker_cache, hubenv, tmp_path, policy):
    h = hubenv
    out = tmp_path / "out"
    common = (
        "decompose",
        "hf://org/base",
        "--run",
        "hf://org/run",
        "--revisions",
        "step_*",
        "--out",
        str(out),
        "--rank",
        "2",
        "--hub-cache-policy",
        policy,
        "--quiet",
    )
    shutil.rmtree(worker_cache, ignore_errors=True)  # the workers start with an empty cache
    h.hub.reset()
    p = run_main(*common, "--executor", "ray", "--max-in-flight", "2")
    assert p.returncode == 0, p.stderr
    assert _weights(h.cache) == []  # the driver read headers only; the tasks downloaded the weights
    pinned = {("org/base", h.world.shas["base"])} | {("org/run", h.world.shas[f"step_{s}"]) for s in STEPS}
    got = {(r.repo_id, r.rev) for r in h.hub.downloads() if r.path.endswith(".safetensors")}
    assert got == pinned  # every weight file fetched at the sha the driver resolved, never by branch name
    for s in STEPS:  # each step's single weight file is in the workers' cache, under its sha (evict: a
        # file holding several modules is read by several tasks, none of which reads all it holds)
        assert (
            worker_cache / "models--org--run" / "snapshots" / h.world.shas[f"step_{s}"] / "model.safetensors"
        ).is_file()
    modules = [m["name"] for m in json.loads((out / "manifest.json").read_text())["modules"]]
    base = open_checkpoint(h.world.base)
    holders = {shard: {n for n in modules if base.entry(n).shard == shard} for shard in base.shards}
    left = {
        p.name
        for p in (worker_cache / "models--org--base" / "snapshots" / h.world.shas["base"]).iterdir()
        if p.suffix == ".safetensors"
    }
    if policy == "keep":  # every base shard holding a selected module was downloaded and stays
        assert left == {shard for shard, names in holders.items() if names}
    else:  # evict: a shard goes once the one task that reads all its selected modules read them.
        # A shard whose modules several tasks read may stay or go: each task's source tracks its own
        # reads, and whether another source in the same worker process still holds the file when one
        # finishes depends on Ray's scheduling (seen both ways under load)
        single = {shard for shard, names in holders.items() if len(names) == 1}
        assert single and not (left & single)
        assert left <= {shard for shard, names in holders.items() if len(names) >= 2}
    out.rename(tmp_path / "ray")

    p = run_main(*common)  # same --out: the recorded command lines then differ only by the executor options
    assert p.returncode == 0, p.stderr
    ray_files, local_files = _files(tmp_path / "ray"), _files(out)
    assert sorted(ray_files) == sorted(local_files)
    assert len(local_files) >= 5 + len(matrix_module_names(SHAPE))  # tables, summary, manifest, provenance, factors
    for name in local_files:
        assert ray_files[name] == local_files[name], name
    assert b"hf://org/run@" in local_files["manifest.json"]  # the driver's labels, in both outputs
