"""Hub sources share the local checks: headers, index and config.json read from a fake Hub on
127.0.0.1 (tests/hub_server.py) are refused with one line and exit 3, like a local folder."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).parent))

from test_hub import _no_real_network, _point_huggingface_hub, one_line_error, rank1  # noqa: E402,F401

from rank1tools.errors import InputError  # noqa: E402
from rank1tools.io.hub_open import open_hub_checkpoint  # noqa: E402
from rank1tools.io.hub_runs import discover_hub_run  # noqa: E402

from hub_server import FakeHub  # noqa: E402

Q, K = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
A, B = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
DEEP = b"[" * 200_000 + b"]" * 200_000


def _shard(*names: str) -> bytes:
    return save({n: torch.ones(4, 4) for n in names}, metadata={"format": "pt"})


def _raw(header: bytes, data_len: int = 0) -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + bytes(data_len)


def _index(weight_map: dict) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


REPOS = {  # repo -> (files, pattern of the one-line error)
    "deep-header": (
        {"model.safetensors": _raw(b'{"a": ' + DEEP + b"}")},
        r"corrupt safetensors header.*nested too deeply",
    ),
    "deep-index": (
        {A: _shard(Q), INDEX: b'{"weight_map": ' + DEEP + b"}"},
        rf"{INDEX}: unreadable index \(JSON nested too deeply\)",
    ),
    "deep-config": (
        {"model.safetensors": _shard(Q), "config.json": b'{"a": ' + DEEP + b"}"},
        r"config\.json: unreadable config\.json \(JSON nested too deeply\)",
    ),
    "negative-dims": (
        {
            "model.safetensors": _raw(
                json.dumps({Q: {"dtype": "F32", "shape": [-4, -4], "data_offsets": [0, 64]}}).encode(), 64
            )
        },
        rf"tensor '{Q}' has invalid shape \[-4, -4\]",
    ),
    "string-dim": (
        {
            "model.safetensors": _raw(
                json.dumps({Q: {"dtype": "F32", "shape": ["4", 4], "data_offsets": [0, 64]}}).encode(), 64
            )
        },
        rf"tensor '{Q}' has invalid shape \['4', 4\]",
    ),
    # huggingface_hub's own header parser would build a 10**12-character string from this shape
    "string-times-huge": (
        {
            "model.safetensors": _raw(
                json.dumps({Q: {"dtype": "F32", "shape": ["x", 10**12], "data_offsets": [0, 64]}}).encode(), 64
            )
        },
        rf"tensor '{Q}' has invalid shape \['x', 1000000000000\]",
    ),
    "two-shards": (
        {A: _shard(Q, K), B: _shard(K), INDEX: _index({Q: A, K: B})},
        rf"tensor '{K}' is stored in both '{A}' and '{B}'",
    ),
    "unlisted": (
        {A: _shard(Q, K), INDEX: _index({Q: A})},
        rf"{INDEX}: shard '{A}' holds tensor '{K}' that the index does not list",
    ),
    "empty-map": ({A: _shard(Q), INDEX: _index({})}, rf"{INDEX}: weight_map lists no tensors"),
    "no-tensors": ({"model.safetensors": _raw(b"{}")}, r"model\.safetensors holds no tensors"),
}


@pytest.fixture(scope="module")
def bad_hub():
    hub = FakeHub("hf_fake_token_bad_inputs")
    for name, (files, _) in REPOS.items():
        hub.create_repo(f"org/{name}").commit("Upload", files)
    run = hub.create_repo("org/run")
    run.commit(
        "Upload",
        {
            "checkpoint-5/model.safetensors": _shard(Q),
            "checkpoint-abc/model.safetensors": _shard(Q),
            "checkpoint-٢٠/model.safetensors": _shard(Q),
        },
    )
    url = hub.start()
    yield url
    hub.stop()


@pytest.fixture
def hub_url(bad_hub, tmp_path, monkeypatch) -> str:
    _point_huggingface_hub(monkeypatch, bad_hub, tmp_path / "hf_home")
    return bad_hub


@pytest.mark.parametrize("repo", list(REPOS))
def test_hub_source_refused_like_a_local_one(hub_url, capsys, repo):
    pattern = REPOS[repo][1]
    with pytest.raises(InputError, match=pattern):
        open_hub_checkpoint(f"hf://org/{repo}")
    r = rank1(capsys, "inspect", f"hf://org/{repo}")
    assert r.code == 3 and r.stdout == ""
    assert re.search(rf"^rank1: error: hf://org/{repo}\b.*{pattern}", one_line_error(r))


def test_hub_subfolders_lists_unnamed_step_folders(hub_url):
    found = discover_hub_run("hf://org/run", subfolders=True)
    assert [(c.step, c.path.rsplit("/", 1)[-1], c.weights is None) for c in found] == [
        (5, "checkpoint-5", False),
        (None, "checkpoint-abc", True),
        (None, "checkpoint-٢٠", True),
    ]
    assert all(c.problem.startswith("not a step folder name") for c in found[1:])
