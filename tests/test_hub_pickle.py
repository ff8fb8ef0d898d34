"""A Hub checkpoint pickles as a recipe (what a Ray task receives): the copy keeps the label, is pinned
to the sha the original resolved (a branch moved after pickling changes nothing), lists nothing
again, downloads what it reads into the unpickling process's HF cache, reads the same bits, and keeps
evict bookkeeping of its own. Against the fake Hub of tests/hub_server.py (fixtures of test_hub.py)."""

from __future__ import annotations

import gc
import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import test_hub  # noqa: E402

from rank1tools.io import hub_checkpoint  # noqa: E402
from rank1tools.io.hub_open import open_hub_checkpoint  # noqa: E402

from _support import assert_bit_identical, reference_tensors  # noqa: E402

try:
    import cloudpickle
except ImportError:  # pragma: no cover (cloudpickle comes with Ray)
    cloudpickle = None

_no_real_network, world, hubenv = test_hub._no_real_network, test_hub.world, test_hub.hubenv  # its fixtures
DUMPS = [pickle.dumps] + ([cloudpickle.dumps] if cloudpickle is not None else [])
LISTING = ("info", "refs", "tree", "commits")


def _worker_cache(monkeypatch, path: Path) -> Path:
    """Point huggingface_hub at another cache, as a worker process with its own HF_HUB_CACHE."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    return path


def _snapshot(cache: Path, repo_id: str, sha: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha


def _shards_in(cache: Path, repo_id: str, sha: str) -> int:
    return len(list(_snapshot(cache, repo_id, sha).glob("*.safetensors")))


@pytest.mark.parametrize("dumps", DUMPS, ids=[f.__module__ for f in DUMPS])
def test_copy_is_pinned_and_reads_the_same_bits(hubenv, monkeypatch, tmp_path, dumps):
    h = hubenv
    repo = h.world.hub.repos["org/run"]
    sha = h.world.shas["step_10"]
    original = open_hub_checkpoint("hf://org/run@step_10")
    assert original.revision == sha and original.spec.revision == "step_10"
    original.read_raw(original.names[0])  # the original's state (downloaded shard, refined offsets) stays behind
    data = dumps(original)
    assert len(data) < max(e.nbytes for e in original.entries.values())  # headers, not tensor bytes

    cache = _worker_cache(monkeypatch, tmp_path / "worker_cache")
    repo.branch("step_10", h.world.shas["step_20"])  # the branch moves after the driver resolved it
    try:
        h.hub.reset()
        copy = pickle.loads(data)
        assert h.hub.log == []  # nothing listed or resolved again
        assert type(copy) is type(original) and copy is not original
        assert (copy.label, copy.revision, copy.spec.revision) == ("hf://org/run@step_10", sha, sha)
        assert (copy.repo_id, copy.subfolder, copy.cache_policy) == ("org/run", None, "keep")
        assert copy.names == original.names and copy.config == original.config
        assert copy.lm_head_tied == original.lm_head_tied
        assert copy.weight_dir == _snapshot(cache, "org/run", sha)
        ref = reference_tensors(h.world.steps[10])
        for name in copy.names:
            assert_bit_identical(copy.read_raw(name), original.read_raw(name), name)
            assert_bit_identical(copy.read_raw(name), ref[name].tensor, name)
        assert copy.root == _snapshot(cache, "org/run", sha)
        assert (copy.root / "config.json").read_bytes() == (original.root / "config.json").read_bytes()
        requests = [r for r in h.hub.log if r.repo_id == "org/run"]
        assert requests and not [r for r in requests if r.kind in LISTING]
        assert {r.rev for r in requests} == {sha}  # every file at the pinned sha, never the branch
    finally:
        repo.branch("step_10", sha)


def test_subfolder_and_sharded_copy(hubenv, monkeypatch, tmp_path):
    h = hubenv
    sub = open_hub_checkpoint("hf://org/run/checkpoint-20")
    copy = pickle.loads(pickle.dumps(sub))
    assert (copy.label, copy.revision, copy.subfolder) == (
        "hf://org/run/checkpoint-20",
        h.world.shas["run_main"],
        "checkpoint-20",
    )
    base = open_hub_checkpoint("hf://org/base@v1.0")
    data = pickle.dumps(base)
    cache = _worker_cache(monkeypatch, tmp_path / "worker_cache")
    copy_base = pickle.loads(data)
    ref = reference_tensors(h.world.base)
    for name in copy_base.names:
        assert_bit_identical(copy_base.read_raw(name), ref[name].tensor, name)
    assert _shards_in(cache, "org/base", h.world.shas["base"]) == len(base.shards) > 3
    for name in copy.names:
        assert_bit_identical(copy.read_raw(name), sub.read_raw(name), name)


def test_copy_keeps_evict_bookkeeping_of_its_own(hubenv, monkeypatch, tmp_path):
    h = hubenv
    sha = h.world.shas["base"]
    original = open_hub_checkpoint("hf://org/base", policy="evict")
    shard = next(s for s in original.shards if sum(e.shard == s for e in original.entries.values()) >= 2)
    first = next(n for n, e in original.entries.items() if e.shard == shard)
    original.expect([first])  # the declared reads travel: this shard goes once `first` is read
    cache = _worker_cache(monkeypatch, tmp_path / "worker_cache")
    copy = pickle.loads(pickle.dumps(original))
    assert copy.cache_policy == "evict" and copy._uid != original._uid
    assert copy in hub_checkpoint._evicting_sources
    copy.read_raw(first)
    assert _shards_in(cache, "org/base", sha) == 0

    ref = reference_tensors(h.world.base)
    full = pickle.loads(pickle.dumps(open_hub_checkpoint("hf://org/base", policy="evict")))
    for name in full.names:  # file order: at most one shard in the cache at a time, none at the end
        assert_bit_identical(full.read_raw(name), ref[name].tensor, name)
        assert _shards_in(cache, "org/base", sha) <= 1, name
    assert _shards_in(cache, "org/base", sha) == 0
    partial = pickle.loads(pickle.dumps(original))
    partial.read_flat(first, 0, 3)
    assert _shards_in(cache, "org/base", sha) == 1
    partial.close()  # what the copy downloaded and did not finish goes when it is closed
    assert _shards_in(cache, "org/base", sha) == 0
    # a Ray worker drops each task's copies without closing them: the file stays, the claim goes,
    # and a later copy in the same process still evicts the shard once it read what it needs
    dropped = pickle.loads(pickle.dumps(original))
    dropped.read_flat(first, 0, 3)
    del dropped
    gc.collect()
    assert _shards_in(cache, "org/base", sha) == 1
    later = pickle.loads(pickle.dumps(original))
    later.read_raw(first)
    assert _shards_in(cache, "org/base", sha) == 0

    keep = open_hub_checkpoint("hf://org/base")  # fills the worker's cache (keep policy)
    for name in keep.names:
        keep.read_raw(name)
    again = pickle.loads(pickle.dumps(original))
    for name in again.names:
        again.read_raw(name)
    again.close()
    assert _shards_in(cache, "org/base", sha) == len(original.shards)  # never deletes what was cached before
