"""Hub sources (`hf://ORG/NAME[@REVISION][/SUBFOLDER]`) against a fake Hub on 127.0.0.1.

Nothing here touches the real Hugging Face Hub: `tests/hub_server.py` serves real files from repos
built with `rank1tools.synthetic`, huggingface_hub is pointed at it (HF_ENDPOINT and the constants it
read at import), the cache lives in a per-test temporary HF_HOME, and any name lookup other than
localhost fails (in-process: a socket guard; subprocesses: a dead proxy with NO_PROXY=127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from rank1tools.errors import InputError, UsageError  # noqa: E402
from rank1tools.io import hub_spec  # noqa: E402
from rank1tools.io.checkpoint import open_checkpoint  # noqa: E402
from rank1tools.io.hub_open import open_hub_checkpoint  # noqa: E402
from rank1tools.io.hub_runs import discover_hub_run, step_from_commit, step_from_name  # noqa: E402
from rank1tools.io.hub_spec import HubSpec, parse_hub_spec  # noqa: E402
from rank1tools.io.sources import open_source  # noqa: E402
from rank1tools.io.writer import ShardedWriter, TensorSpec, provenance  # noqa: E402
from rank1tools.synthetic import LlamaShape, checkpoint_tensors, make_base, write_model  # noqa: E402

from _support import assert_bit_identical, reference_tensors  # noqa: E402
from hub_server import FakeHub, folder_files  # noqa: E402

SHAPE = LlamaShape()
STEPS = (10, 20, 30)
TOKEN = "hf_fake_good_token_1234"
LEAKY = "hf_wrong_secret_token_5678"
N_TENSORS = len(SHAPE.shapes())


# ------------------------------------------------------------------ the fake Hub, built once


@dataclass
class World:
    hub: FakeHub
    url: str
    base: Path  # local copy of org/base (sharded fp32)
    steps: dict[int, Path]  # local copies of the run's checkpoints (bf16, single file)
    shas: dict[str, str] = field(default_factory=dict)
    missing_shard: str = ""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubworld")
    base = make_base(root / "base", SHAPE, torch.float32, max_shard_size="40KB")
    steps = {
        s: write_model(
            root / f"step{s}",
            checkpoint_tensors(SHAPE, s, max(STEPS), torch.float32, torch.bfloat16),
            SHAPE.config(torch.bfloat16),
        )
        for s in STEPS
    }
    hub = FakeHub(TOKEN)
    w = World(hub, "", base, steps)

    repo = hub.create_repo("org/base")
    repo.commit("Initial commit", {"README.md": b"# base\n"})
    w.shas["base"] = repo.commit("Upload model", folder_files(base))
    repo.tag("v1.0", "main")

    run = hub.create_repo("org/run")
    c0 = run.commit("Initial commit", {"README.md": b"# run\n"})
    for s in STEPS:  # HF Trainer every_save + all_checkpoints: root model and checkpoint-N/ on main
        files = {
            **folder_files(steps[s]),
            **folder_files(steps[s], f"checkpoint-{s}/"),
            f"checkpoint-{s}/trainer_state.json": json.dumps({"global_step": s}).encode(),
        }
        w.shas[f"commit{s}"] = run.commit(f"Training in progress, step {s}", files)
        # RELEX: one branch per step
        w.shas[f"step_{s}"] = run.commit(f"Upload step {s}", folder_files(steps[s]), branch=f"step_{s}", parent=c0)
    w.shas["run_main"] = run.commit("Update README.md", {"README.md": b"# run\nfinished\n"})
    run.branch("dev", c0)  # no step number
    w.shas["openr1"] = run.commit(
        "open-r1 checkpoint", folder_files(steps[20]), branch="v00.00-step-000000020", parent=c0
    )

    gated = hub.create_repo("org/gated", gated=True)
    w.shas["gated"] = gated.commit("Upload model", folder_files(steps[10]))

    broken = hub.create_repo("org/broken")
    files = folder_files(base)
    w.missing_shard = sorted(f for f in files if f.endswith(".safetensors"))[2]
    del files[w.missing_shard]
    broken.commit("Upload model without one shard", files)

    pickled = hub.create_repo("org/pickled")
    pickled.commit(
        "two checkpoints",
        {
            "checkpoint-5/pytorch_model.bin": b"\x80\x02not really a pickle",
            "checkpoint-5/config.json": b"{}",
            **folder_files(steps[10], "checkpoint-10/"),
        },
    )

    w.url = hub.start()
    yield w
    hub.stop()


@pytest.fixture(autouse=True)
def _no_real_network(monkeypatch):
    """Any connection attempt to a host other than localhost fails loudly."""
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test tried to reach {host!r}: only the fake Hub on 127.0.0.1 is allowed")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


@dataclass
class HubEnv:
    world: World
    hub: FakeHub
    home: Path
    cache: Path
    env: dict[str, str]

    def snapshot(self, repo_id: str, sha: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha

    def blobs(self, repo_id: str) -> list[Path]:
        d = self.cache / f"models--{repo_id.replace('/', '--')}" / "blobs"
        return sorted(d.iterdir()) if d.is_dir() else []


def _point_huggingface_hub(monkeypatch, url: str, home: Path, offline: bool = False) -> dict[str, str]:
    """Environment for subprocesses, and the same settings on huggingface_hub's import-time constants."""
    from huggingface_hub import constants

    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_ETAG_TIMEOUT": "10",
        "HF_HUB_DOWNLOAD_TIMEOUT": "10",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "TRANSFORMERS_OFFLINE",
        "RANK1_HUB_CACHE_POLICY",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "RANK1_DEBUG",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hub_spec, "_cache_policy", None)
    return env


@pytest.fixture
def hubenv(world, tmp_path, monkeypatch) -> HubEnv:
    world.hub.reset()
    home = tmp_path / "hf_home"
    env = _point_huggingface_hub(monkeypatch, world.url, home)
    return HubEnv(world, world.hub, home, home / "hub", env)


def go_offline(monkeypatch, h: HubEnv) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    h.env["HF_HUB_OFFLINE"] = "1"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


def rank1(capsys, *args: str) -> CliResult:
    """`rank1 ARGS` in this process, through the console script's entry point (rank1tools.cli.main)."""
    from rank1tools import cli

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["rank1", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return CliResult(code, out, err)


def start_rank1(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """`python -m rank1tools.cli ARGS` in a subprocess that can reach only 127.0.0.1."""
    full = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RANK1_DEBUG")}
    full.update(
        {
            "HTTP_PROXY": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "ALL_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    full.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", "rank1tools.cli", *args],
        env=full,
        cwd=str(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> CliResult:
    out, err = proc.communicate(timeout=120)
    return CliResult(proc.returncode, out, err)


def one_line_error(r: CliResult) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error: "), r.stderr
    return lines[0]


# ------------------------------------------------------------------ syntax


def test_source_syntax_and_step_parsing():
    assert parse_hub_spec("hf://org/name") == HubSpec("org/name", None, None)
    assert parse_hub_spec("hf://org/name@step_10") == HubSpec("org/name", "step_10", None)
    assert parse_hub_spec("hf://org/name@main/checkpoint-50/") == HubSpec("org/name", "main", "checkpoint-50")
    assert (
        parse_hub_spec("hf://org/name@main/global_step_5/actor/huggingface").subfolder
        == "global_step_5/actor/huggingface"
    )
    assert parse_hub_spec("hf://org/name@refs%2Fpr%2F3").revision == "refs/pr/3"
    assert parse_hub_spec("hf://org/name/checkpoint-5") == HubSpec("org/name", None, "checkpoint-5")
    assert HubSpec("org/name", "refs/pr/3", "sub").address() == "hf://org/name@refs%2Fpr%2F3/sub"
    for bad in ("hf://name", "hf://org/name@", "hf://org/name@main/../x", "hf://datasets/squad", "hf://"):
        with pytest.raises(UsageError):
            parse_hub_spec(bad)
    assert [
        step_from_name(n) for n in ("step_50", "main-step-000000050", "checkpoint-50", "v00.00-step-000000200", "dev")
    ] == [50, 50, 50, 200, None]
    assert step_from_commit("Training in progress, step 500") == 500
    assert step_from_commit("Upload STEP_20 weights") == 20
    assert step_from_commit("Upload checkpoint", "Trainer state: global_step 7") == 7
    assert step_from_commit("Explain the two steps 2 and 3 in README") is None
    assert step_from_commit("Update README.md") is None


# ------------------------------------------------------------------ listing and reading


def test_listing_reads_headers_only(hubenv, capsys):
    h = hubenv
    sha = h.world.shas["base"]
    ckpt = open_source("hf://org/base")
    local = open_checkpoint(h.world.base)
    assert ckpt.revision == sha and ckpt.label == "hf://org/base"
    assert ckpt.names == local.names and len(ckpt.shards) == len(local.shards) > 3
    for n in local.names:
        a, b = ckpt.entry(n), local.entry(n)
        assert (a.dtype, a.shape, a.shard, a.nbytes) == (b.dtype, b.shape, b.shard, b.nbytes)
    assert ckpt.parameter_count == SHAPE.parameter_count and ckpt.config == local.config
    assert ckpt.lm_head_tied is False
    # no tensor data fetched: safetensors files were only range-read (header), nothing of them in the cache
    st = [r for r in h.hub.log if r.path and r.path.endswith(".safetensors")]
    assert st and all(r.method == "GET" and r.range == "bytes=0-100000" for r in st)
    assert h.hub.downloads("org/base") and all(not r.path.endswith(".safetensors") for r in h.hub.downloads())
    assert not list(h.cache.rglob("*.safetensors"))
    # every request after the revision lookup names the sha, never the branch
    assert {r.rev for r in h.hub.log if r.kind in ("tree", "resolve")} == {sha}
    assert [r.kind for r in h.hub.log if r.rev != sha] == ["info"]

    r = rank1(capsys, "inspect", "hf://org/base", "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["revision"] == sha and rep["tensors"] == N_TENSORS and rep["shards"] == len(local.shards)
    assert rep["parameters"] == SHAPE.parameter_count and rep["dtypes"] == {"F32": N_TENSORS}


def test_sharded_model_streams_bit_exact(hubenv):
    h = hubenv
    ckpt = open_source("hf://org/base")
    ref = reference_tensors(h.world.base)  # safetensors' own reader on the local copy
    local = open_checkpoint(h.world.base)
    for name in ckpt.names:
        assert_bit_identical(ckpt.read_raw(name), ref[name].tensor, name)
        assert ckpt.entry(name) == local.entry(name)  # offsets refined from the downloaded header
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ckpt.read(name, rows=(3, 9)), ref[name].tensor[3:9].float())
    assert torch.equal(ckpt.read_flat(name, 100, 300), ref[name].tensor.reshape(-1)[100:300].float())
    # one download per shard, each with the sha in the URL
    got = Counter(r.path for r in h.hub.downloads("org/base") if r.path.endswith(".safetensors"))
    assert got == Counter({s: 1 for s in local.shards})
    assert len(list(h.snapshot("org/base", h.world.shas["base"]).glob("*.safetensors"))) == len(local.shards)


# ------------------------------------------------------------------ revisions


def test_revisions_resolve_once_to_shas(hubenv, tmp_path, monkeypatch):
    h = hubenv
    sha = h.world.shas["step_10"]
    ckpt = open_source("hf://org/run@step_10")
    assert ckpt.revision == sha
    assert [r.rev for r in h.hub.log if r.kind == "info"] == ["step_10"]  # resolved once...
    assert all(r.rev == sha for r in h.hub.log if r.kind != "info")  # ...and the sha used for everything else
    ref = reference_tensors(h.world.steps[10])
    for name in ckpt.names:
        assert_bit_identical(ckpt.read_raw(name), ref[name].tensor, name)
    assert all(r.rev == sha for r in h.hub.log if r.kind != "info")
    assert open_source("hf://org/base@v1.0").revision == h.world.shas["base"]  # a tag
    h.hub.reset()
    assert open_source(f"hf://org/run@{sha}").revision == sha  # a sha: no lookup at all
    assert not [r for r in h.hub.log if r.kind == "info"]

    # outputs record the spec and the sha, never the token; auxiliary files come along
    monkeypatch.setenv("HF_TOKEN", LEAKY)
    src = open_source("hf://org/run@step_20")
    specs = [TensorSpec(n, src.entry(n).shape, src.entry(n).torch_dtype) for n in src.names]
    out = tmp_path / "copy"
    with ShardedWriter(out, specs, max_shard_size="60KB") as w:
        for n in src.names:
            w.write(n, src.read_raw(n))
        w.commit(copy_from=src, provenance=provenance("copy", [src], {}))
    record = json.loads((out / "rank1tools.json").read_text())
    assert record["inputs"] == [{"source": "hf://org/run@step_20", "revision": h.world.shas["step_20"]}]
    for f in (
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ):
        assert (out / f).read_bytes() == (h.world.steps[20] / f).read_bytes(), f
    assert all(LEAKY not in p.read_text(errors="replace") for p in out.iterdir() if p.suffix in (".json", ".jinja"))
    assert all(r.authorization for r in h.hub.log if r.repo_id == "org/run" and r.rev == h.world.shas["step_20"])


# ------------------------------------------------------------------ run discovery


def test_branch_glob_discovery(hubenv, capsys):
    h = hubenv
    found = discover_hub_run("hf://org/run", revisions="step_*")
    assert [(c.step, c.layout, c.weights, c.path) for c in found] == [
        (s, "hub-branch", f"hf://org/run@{h.world.shas[f'step_{s}']}", f"hf://org/run@step_{s}") for s in STEPS
    ]
    openr1 = discover_hub_run("hf://org/run", revisions="*-step-*")
    assert [(c.step, c.weights) for c in openr1] == [(20, f"hf://org/run@{h.world.shas['openr1']}")]
    with pytest.raises(InputError, match="no branch matching 'dev\\*' ends in a step number"):
        discover_hub_run("hf://org/run", revisions="dev*")
    with pytest.raises(UsageError):
        discover_hub_run("hf://org/run@main", revisions="step_*")

    r = rank1(capsys, "inspect", "hf://org/run", "--revisions", "step_*", "--steps", "20:30", "--json")
    assert r.code == 0, r.stderr
    rep = r.json()
    assert rep["kind"] == "run" and [c["step"] for c in rep["checkpoints"]] == [20, 30]
    for c in rep["checkpoints"]:
        assert c["status"] == "ok" and c["tensors"] == N_TENSORS and c["dtypes"] == {"BF16": N_TENSORS}
        assert c["weights"] == f"hf://org/run@{h.world.shas['step_' + str(c['step'])]}"
    # discovery never downloads weights
    assert not [r for r in h.hub.downloads() if r.path.endswith(".safetensors")]


def test_branches_matched_without_a_step_are_listed_unusable(hubenv, capsys):
    """A glob that also matches `dev` and `main` lists them as unusable, never skips them silently."""
    found = discover_hub_run("hf://org/run", revisions="[sdm]*")  # step_*, dev, main
    numbered = [c for c in found if c.step is not None]
    assert [c.step for c in numbered] == list(STEPS) and all(c.problem is None for c in numbered)
    unnamed = [c for c in found if c.step is None]
    assert sorted(c.path for c in unnamed) == ["hf://org/run@dev", "hf://org/run@main"]
    assert all(c.weights is None and "no step number" in c.problem for c in unnamed)
    r = rank1(capsys, "inspect", "hf://org/run", "--revisions", "[sdm]*")
    assert r.code == 3 and "hf://org/run@dev" in one_line_error(r) and "no step number" in one_line_error(r)
    r = rank1(capsys, "inspect", "hf://org/run", "--revisions", "[sdm]*", "--steps", "10:30", "--json")
    assert r.code == 0 and [c["step"] for c in r.json()["checkpoints"]] == [s for s in STEPS if s <= 30]


def test_subfolder_discovery(hubenv, capsys):
    h = hubenv
    main = h.world.shas["run_main"]
    found = discover_hub_run("hf://org/run", subfolders=True)
    assert [(c.step, c.layout, c.weights, c.problem) for c in found] == [
        (s, "hub-subfolder/trl", f"hf://org/run@{main}/checkpoint-{s}", None) for s in STEPS
    ]
    ckpt = open_source(found[1].weights)
    assert ckpt.revision == main and ckpt.config["torch_dtype"] == "bfloat16"
    ref = reference_tensors(h.world.steps[20])
    for name in ckpt.names:
        assert_bit_identical(ckpt.read_raw(name), ref[name].tensor, name)
    assert ckpt.root == h.snapshot("org/run", main) / "checkpoint-20"
    assert (ckpt.root / "tokenizer_config.json").is_file()

    pick = discover_hub_run("hf://org/pickled", subfolders=True)
    assert [c.step for c in pick] == [5, 10]
    assert pick[0].weights is None and "pickle" in pick[0].problem and pick[1].problem is None

    r = rank1(capsys, "inspect", "hf://org/run", "--subfolders", "--json")
    assert r.code == 0, r.stderr
    assert [(c["step"], c["status"]) for c in r.json()["checkpoints"]] == [(s, "ok") for s in STEPS]


def test_commit_discovery(hubenv, capsys):
    h = hubenv
    found = discover_hub_run("hf://org/run", commits=True)
    assert [(c.step, c.layout, c.weights) for c in found] == [
        (s, "hub-commit", f"hf://org/run@{h.world.shas[f'commit{s}']}") for s in STEPS
    ]
    assert "Training in progress, step 20" in found[1].path
    ckpt = open_source(found[0].weights)
    ref = reference_tensors(h.world.steps[10])
    for name in ckpt.names:
        assert_bit_identical(ckpt.read_raw(name), ref[name].tensor, name)
    r = rank1(capsys, "inspect", "hf://org/run", "--commits", "--steps", "10,30", "--json")
    assert r.code == 0, r.stderr
    assert [c["step"] for c in r.json()["checkpoints"]] == [10, 30]
    r = rank1(capsys, "inspect", "hf://org/run", "--commits", "--subfolders")
    assert r.code == 2 and "choose one Hub discovery mode" in one_line_error(r)
    r = rank1(capsys, "inspect", str(h.world.base), "--commits")
    assert r.code == 2 and "hf:// sources only" in one_line_error(r)


# ------------------------------------------------------------------ cache policy


def _shard_files(h: HubEnv) -> tuple[int, int]:
    """(.safetensors snapshot links, shard blobs) of org/base in the cache (blobs are named by the ETag,
    which the fake Hub sets to the file's sha256)."""
    shard_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in h.world.base.glob("*.safetensors")}
    links = len(list(h.snapshot("org/base", h.world.shas["base"]).glob("*.safetensors")))
    blobs = sum(1 for b in h.blobs("org/base") if b.name in shard_hashes)
    return links, blobs


def test_evict_policy_keeps_one_shard(hubenv, capsys):
    h = hubenv
    ref = reference_tensors(h.world.base)
    ckpt = open_hub_checkpoint("hf://org/base", policy="evict")
    n_shards = len(ckpt.shards)
    peak = (0, 0)
    for name in ckpt.names:  # file order, as the commands stream
        assert_bit_identical(ckpt.read_raw(name), ref[name].tensor, name)
        now = _shard_files(h)
        peak = max(peak, now)
        assert now[0] <= 1 and now[1] <= 1, (name, now)
    assert peak == (1, 1) and _shard_files(h) == (0, 0)
    assert not list(h.cache.rglob("*.incomplete"))
    # rows read piecewise count too: the shard goes only once the whole tensor was read
    ckpt = open_hub_checkpoint("hf://org/base", policy="evict")
    name = "model.layers.0.mlp.up_proj.weight"  # 160x64 fp32: a shard of its own
    assert [n for n, e in ckpt.entries.items() if e.shard == ckpt.entry(name).shard] == [name]
    ckpt.read(name, rows=(0, 80))
    assert _shard_files(h) == (1, 1)
    ckpt.read(name, rows=(80, 160))
    assert _shard_files(h) == (0, 0)
    # close() evicts what was downloaded but not fully read
    ckpt.read_flat("model.embed_tokens.weight", 0, 10)
    assert _shard_files(h) == (1, 1)
    ckpt.close()
    assert _shard_files(h) == (0, 0)

    # keep (the default) leaves every shard; evict never deletes what was cached before it ran
    keep = open_source("hf://org/base")
    for name in keep.names:
        keep.read_raw(name)
    assert _shard_files(h) == (n_shards, n_shards)
    again = open_hub_checkpoint("hf://org/base", policy="evict")
    for name in again.names:
        again.read_raw(name)
    assert _shard_files(h) == (n_shards, n_shards)

    r = rank1(capsys, "inspect", "hf://org/base", "--hub-cache-policy", "evict", "--json")
    assert r.code == 0 and r.json()["revision"] == h.world.shas["base"]
    r = rank1(capsys, "inspect", "hf://org/base", "--hub-cache-policy", "sometimes")
    assert r.code == 2 and "keep, evict" in one_line_error(r)


# ------------------------------------------------------------------ offline


def test_offline_mode_from_cache(hubenv, monkeypatch, capsys):
    h = hubenv
    sha = h.world.shas["base"]
    online = open_source("hf://org/base")
    for name in online.names:  # fill the cache (keep policy)
        online.read_raw(name)
    assert (online.root / "tokenizer_config.json").is_file()  # auxiliary files: fetched on first use
    open_source("hf://org/run@step_10")  # headers only: ref cached, weights not
    go_offline(monkeypatch, h)
    h.hub.reset()

    ckpt = open_source("hf://org/base")  # 'main' resolved from the cached ref
    assert ckpt.revision == sha
    ref = reference_tensors(h.world.base)
    for name in ckpt.names:
        assert_bit_identical(ckpt.read_raw(name), ref[name].tensor, name)
    assert ckpt.config == online.config and (ckpt.root / "tokenizer_config.json").is_file()
    assert open_source(f"hf://org/base@{sha}").names == online.names
    with pytest.raises(InputError, match=r"weights of org/run at \w+ are not in the local cache and HF_HUB_OFFLINE=1"):
        open_source("hf://org/run@step_10")
    with pytest.raises(InputError, match=r"revision step_20 of org/run is not in the local cache and HF_HUB_OFFLINE=1"):
        open_source("hf://org/run@step_20")
    assert [c.step for c in discover_hub_run("hf://org/run", revisions="step_*")] == [10]  # cached refs
    with pytest.raises(InputError, match="HF_HUB_OFFLINE=1"):
        discover_hub_run("hf://org/run", commits=True)

    r = rank1(capsys, "inspect", "hf://org/base", "--json")
    assert r.code == 0 and r.json()["revision"] == sha
    r = rank1(capsys, "inspect", "hf://org/nobody-cached-this")
    assert r.code == 3 and "not in the local cache and HF_HUB_OFFLINE=1" in one_line_error(r)
    victim = online.shards[2]
    (h.snapshot("org/base", sha) / victim).unlink()
    with pytest.raises(InputError, match=rf"shard {victim} is not in the local cache and HF_HUB_OFFLINE=1"):
        open_source("hf://org/base")
    assert h.hub.log == []  # offline: not one request


# ------------------------------------------------------------------ errors


def test_unknown_repo_revision_folder(hubenv, capsys, monkeypatch):
    h = hubenv
    r = rank1(capsys, "inspect", "hf://org/nope")
    assert r.code == 3 and "repository org/nope not found on http://127.0.0.1" in one_line_error(r)
    r = rank1(capsys, "inspect", "hf://org/run@no_such_branch")
    assert r.code == 3 and "revision 'no_such_branch' not found in repository org/run" in one_line_error(r)
    r = rank1(capsys, "inspect", "hf://org/run@" + "0" * 40)
    assert r.code == 3 and "not found in repository org/run" in one_line_error(r)
    r = rank1(capsys, "inspect", "hf://org/run@main/checkpoint-99")
    assert r.code == 3 and "checkpoint-99" in one_line_error(r) and "not found" in r.stderr
    r = rank1(capsys, "inspect", "hf://org/run", "--revisions", "step_*", "--commits")
    assert r.code == 2
    r = rank1(capsys, "inspect", "hf://justonename")
    assert r.code == 2 and "expected hf://ORG/NAME" in one_line_error(r)
    r = rank1(capsys, "inspect", "hf://org/broken")
    assert r.code == 3 and f"names shard '{h.world.missing_shard}', which is missing from the repo" in one_line_error(r)
    # the Hub unreachable: a port nobody listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    _point_huggingface_hub(monkeypatch, dead, h.home)
    r = rank1(capsys, "inspect", "hf://org/base")
    assert r.code == 3 and "cannot reach the Hub" in one_line_error(r)


def test_gated_repo_and_token(hubenv, capsys, monkeypatch):
    h = hubenv
    r = rank1(capsys, "inspect", "hf://org/gated")
    assert r.code == 3 and "repository org/gated is gated and no token was sent (HTTP 401)" in one_line_error(r)
    monkeypatch.setenv("HF_TOKEN", LEAKY)
    r = rank1(capsys, "inspect", "hf://org/gated", "--json")
    assert r.code == 3 and "the token sent has no access (HTTP 403)" in one_line_error(r)
    assert LEAKY not in r.stdout + r.stderr
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = rank1(capsys, "inspect", "hf://org/gated", "--json")
    assert r.code == 0 and r.json()["revision"] == h.world.shas["gated"]
    assert TOKEN not in r.stdout + r.stderr
    monkeypatch.delenv("HF_TOKEN")
    h.home.mkdir(parents=True, exist_ok=True)
    (h.home / "token").write_text(TOKEN)  # where `hf auth login` saves it
    r = rank1(capsys, "inspect", "hf://org/gated", "--json")
    assert r.code == 0 and r.json()["revision"] == h.world.shas["gated"]
    assert TOKEN not in r.stdout + r.stderr
    ckpt = open_source("hf://org/gated")
    ref = reference_tensors(h.world.steps[10])
    name = ckpt.names[0]
    assert_bit_identical(ckpt.read_raw(name), ref[name].tensor, name)


def test_connection_dropped_mid_download(hubenv, tmp_path, monkeypatch):
    """The server hangs up halfway through a shard every time: the library retries, then gives up;
    no partial output and no partial cache file remain; a rerun resumes from the cached shards."""
    import huggingface_hub.file_download as fd

    h = hubenv
    fast = types.SimpleNamespace(**{k: getattr(fd.time, k) for k in dir(fd.time) if not k.startswith("__")})
    fast.sleep = lambda s: None  # the library waits 1 s between retries
    monkeypatch.setattr(fd, "time", fast)

    def copy(out: Path) -> None:
        src = open_source("hf://org/base")
        specs = [TensorSpec(n, src.entry(n).shape, src.entry(n).torch_dtype) for n in src.names]
        with ShardedWriter(out, specs, max_shard_size="60KB") as w:
            for n in src.names:
                w.write(n, src.read_raw(n))
            w.commit(copy_from=src, provenance=provenance("copy", [src], {}))

    shards = open_source("hf://org/base").shards
    victim = shards[1]
    size = (h.world.base / victim).stat().st_size
    h.hub.drop[victim] = size // 2
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"network failure while fetching file {victim}.*rerun to resume"):
        copy(out)
    tries = [r for r in h.hub.downloads("org/base") if r.path == victim]
    assert len(tries) >= 2  # the library retried before giving up
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    assert not list(h.cache.rglob("*.incomplete"))
    snap = h.snapshot("org/base", h.world.shas["base"])
    assert (snap / shards[0]).is_file() and not (snap / victim).exists()

    h.hub.reset()  # the network is back
    copy(out)
    fetched = {r.path for r in h.hub.downloads("org/base") if r.path.endswith(".safetensors")}
    assert fetched == set(shards[1:])  # shard 0 came from the cache: the rerun resumed
    ref = reference_tensors(h.world.base)
    got = open_checkpoint(out)
    for name in got.names:
        assert_bit_identical(got.read_raw(name), ref[name].tensor, name)


# ------------------------------------------------------------------ real subprocesses


def test_cli_subprocesses(world, tmp_path, monkeypatch):
    """The console-script path end to end, several `python -m rank1tools.cli` at once (each its own cache)."""
    world.hub.reset()
    envs = {}
    for key in ("run", "gated"):
        envs[key] = _point_huggingface_hub(monkeypatch, world.url, tmp_path / key)
    procs = {
        "run": start_rank1(["inspect", "hf://org/run", "--revisions", "step_*", "--json"], envs["run"], tmp_path),
        "gated_bad": start_rank1(["inspect", "hf://org/gated"], {**envs["gated"], "HF_TOKEN": LEAKY}, tmp_path),
        "help": subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; sys.argv = ['rank1', '--help']\n"
                "from rank1tools import cli\ntry: cli.main()\nexcept SystemExit: pass\n"
                "assert 'huggingface_hub' not in sys.modules and 'torch' not in sys.modules",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    }
    res = {k: finish(p) for k, p in procs.items()}
    assert res["run"].code == 0, res["run"].stderr
    assert [(c["step"], c["status"], c["weights"]) for c in res["run"].json()["checkpoints"]] == [
        (s, "ok", f"hf://org/run@{world.shas[f'step_{s}']}") for s in STEPS
    ]
    assert res["gated_bad"].code == 3 and "HTTP 403" in one_line_error(res["gated_bad"])
    assert LEAKY not in res["gated_bad"].stdout + res["gated_bad"].stderr
    assert res["help"].code == 0, res["help"].stderr
    assert not [
        r
        for r in world.hub.log
        if r.kind == "resolve" and r.method == "GET" and r.range is None and r.path.endswith(".safetensors")
    ]


def test_decompose_a_hub_run_matches_local(hubenv, capsys, tmp_path):
    """decompose streams base and branch checkpoints from the Hub (evict policy): same spectra as
    the same files on disk, and no weight file left in the cache afterwards."""
    from rank1tools.commands.decompose import DecomposeOptions, decompose

    h = hubenv
    r = rank1(
        capsys,
        "decompose",
        "hf://org/base",
        "--run",
        "hf://org/run",
        "--revisions",
        "step_*",
        "--out",
        str(tmp_path / "hub"),
        "--rank",
        "2",
        "--hub-cache-policy",
        "evict",
        "--json",
        "--quiet",
    )
    assert r.code == 0, r.stderr
    assert r.json()["steps"] == list(STEPS)
    local = decompose(
        str(h.world.base),
        [str(h.world.steps[s]) for s in STEPS],
        str(tmp_path / "local"),
        options=DecomposeOptions(rank=2, device="cpu"),
    )
    with open(tmp_path / "hub" / "spectrum.jsonl") as f:
        hub_rows = [json.loads(line) for line in f]
    assert len(hub_rows) == len(local.rows)
    # the local folders (stepN) name no trainer step: positions 1..T stand for STEPS
    by = {(row["module"], STEPS[row["step"] - 1]): row for row in local.rows}
    for row in hub_rows:
        ref = by[(row["module"], row["step"])]
        assert row["fro"] == ref["fro"] and row["sigma_1"] == ref["sigma_1"]
    manifest = json.loads((tmp_path / "hub" / "manifest.json").read_text())
    assert [c["revision"] for c in manifest["checkpoints"]] == [h.world.shas[f"step_{s}"] for s in STEPS]
    left = [p for p in h.cache.rglob("*.safetensors")]
    assert left == [], left


def test_inspect_of_a_hub_model_does_not_import_torch(hubenv, tmp_path, capsys):
    """`rank1 inspect hf://...` reads the Hub headers without torch (issue #20), and says what the
    same command says in this process, where torch is loaded."""
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['rank1', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('rank1tools.cli', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
        "sys.stderr.write(f'torch imported: {\"torch\" in sys.modules}\\n')\n"
        "sys.exit(code)\n"
    )
    full = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RANK1_DEBUG")}
    full.update(
        {
            "HTTP_PROXY": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "ALL_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost",
        },
        **hubenv.env,
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, "inspect", "hf://org/base", "--json"],
        env=full,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1] == "torch imported: False", r.stderr
    assert json.loads(r.stdout) == rank1(capsys, "inspect", "hf://org/base", "--json").json()
