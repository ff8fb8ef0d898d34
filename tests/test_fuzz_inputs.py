"""Property: whatever is in a safetensors header, an index or a config.json, opening the source and
reading every tensor either works or raises a Rank1Error (one line for the user), never another
exception, and an opened model never claims more bytes than its files hold (so no read can ask
for a huge buffer). Derandomized: the same examples on every run.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from rank1tools.errors import Rank1Error
from rank1tools.io import open_source

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID_HEADER = {
    "model.layers.0.self_attn.q_proj.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "model.norm.weight": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    "step": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]},
    "__metadata__": {"format": "pt"},
}
DATA_BYTES = 40

# JSON values, biased towards the near-valid: small and negative ints, floats, bools, lists of ints
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 64)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["F32", "BF16", "C64", "", "4"])
    | st.text(max_size=6)
)
JSON = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=8
)
NEAR_LISTS = st.lists(st.integers(-8, 48) | SCALARS, max_size=4)


DEEP = "[" * 50_000 + "]" * 50_000  # json.dumps cannot write this (RecursionError): spliced in as text


def _nest(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutated_header(draw) -> dict | object:
    """The valid header with a few random edits (fields, tensors, the whole thing, deep nesting)."""
    header = json.loads(json.dumps(VALID_HEADER))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):
        op = draw(st.sampled_from(["same-size", "field", "field", "drop", "add", "whole", "nest"]))
        names = [k for k in header] if isinstance(header, dict) else []
        if op == "whole" or not names:
            header = draw(JSON)
        elif op == "same-size":  # still valid: another dtype of the same width, the shape transposed
            entry = header.get("model.layers.0.self_attn.q_proj.weight")
            if isinstance(entry, dict):
                entry["dtype"] = draw(st.sampled_from(["F32", "I32", "U32"]))
                entry["shape"] = draw(st.sampled_from([[2, 3], [3, 2], [6], [1, 6, 1]]))
        elif op == "field":
            name = draw(st.sampled_from(names))
            entry = header[name]
            if isinstance(entry, dict):
                key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "format", "x"]))
                entry[key] = draw(NEAR_LISTS if key in ("shape", "data_offsets") else JSON)
            else:
                header[name] = draw(JSON)
        elif op == "drop":
            victim = draw(st.sampled_from(names))
            if isinstance(header[victim], dict) and header[victim] and draw(st.booleans()):
                header[victim].pop(draw(st.sampled_from(sorted(header[victim]))))
            else:
                header.pop(victim)
        elif op == "add":
            header[draw(st.text(max_size=6))] = {
                "dtype": draw(JSON),
                "shape": draw(NEAR_LISTS),
                "data_offsets": draw(NEAR_LISTS),
            }
        else:
            header[draw(st.sampled_from(names))] = _nest(draw(SCALARS), draw(st.integers(1, 40)))
    return header


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A whole file: length field (right, off a little, or anything), header bytes (possibly with
    random bytes written over part of them), data area of some length."""
    raw = json.dumps(draw(mutated_header())).encode()
    if draw(st.integers(0, 9)) == 0:
        raw = raw[:-1] + b', "deep": ' + DEEP.encode() + b"}" if raw.endswith(b"}") else DEEP.encode()
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(raw)))
        junk = draw(st.binary(min_size=1, max_size=8))
        raw = raw[:at] + junk + raw[at + len(junk) :]
    length = draw(st.sampled_from(["right"] * 8 + ["near", "any"]))
    n = {
        "right": len(raw),
        "near": max(0, len(raw) + draw(st.integers(-3, 3))),
        "any": draw(st.integers(0, 2**64 - 1)),
    }[length]
    data = DATA_BYTES if draw(st.integers(0, 3)) else draw(st.integers(0, 2 * DATA_BYTES))
    return struct.pack("<Q", n) + raw + bytes(data)


def _open_and_read_all(source: Path) -> None:
    """open_source + every tensor read, or a Rank1Error; the listed size never exceeds the files'."""
    try:
        ckpt = open_source(str(source))
    except Rank1Error as e:
        assert "\n" not in str(e)
        event(f"refused: {type(e).__name__}")
        return
    event("opened")
    on_disk = sum(p.stat().st_size for p in ([source] if source.is_file() else source.iterdir()))
    assert 0 <= ckpt.nbytes <= on_disk
    assert all(e.numel >= 0 and e.nbytes >= 0 for e in ckpt.entries.values())
    for name in ckpt.names:
        try:
            t = ckpt.read_raw(name)
        except Rank1Error as e:
            assert "\n" not in str(e)
            continue
        assert tuple(t.shape) == ckpt.entry(name).shape


@SETTINGS
@given(content=safetensors_bytes(), as_folder=st.booleans())
def test_any_single_file_opens_or_is_refused(content, as_folder):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "model.safetensors"
        f.write_bytes(content)
        _open_and_read_all(Path(tmp) if as_folder else f)


def _sharded_model(folder: Path) -> dict:
    """Two shards saved by safetensors itself, and their index."""
    save_file(
        {"model.layers.0.mlp.up_proj.weight": torch.ones(3, 2), "model.norm.weight": torch.ones(2)},
        str(folder / "model-00001-of-00002.safetensors"),
        metadata={"format": "pt"},
    )
    save_file(
        {"lm_head.weight": torch.ones(2, 2)},
        str(folder / "model-00002-of-00002.safetensors"),
        metadata={"format": "pt"},
    )
    return {
        "metadata": {"total_size": 48},
        "weight_map": {
            "model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        },
    }


SHARD_NAMES = st.sampled_from(
    [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "absent.safetensors",
        "../x.safetensors",
        "",
        ".",
        "/etc/passwd",
    ]
)


@SETTINGS
@given(data=st.data())
def test_any_index_config_or_shard_opens_or_is_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        index = _sharded_model(folder)
        wm = index["weight_map"]
        for _ in range(data.draw(st.sampled_from([0, 0, 1, 2, 3]))):
            op = data.draw(st.sampled_from(["map", "map", "drop", "add", "weight_map", "index", "nest"]))
            if not isinstance(wm, dict) or not isinstance(index, dict):  # already replaced by a random value
                op = op if op in ("index", "nest") else "none"
            if op == "map" and wm:
                wm[data.draw(st.sampled_from(sorted(wm)))] = data.draw(SHARD_NAMES | JSON)
            elif op == "drop" and wm:
                wm.pop(data.draw(st.sampled_from(sorted(wm))))
            elif op == "add":
                wm[data.draw(st.text(max_size=6))] = data.draw(SHARD_NAMES)
            elif op == "weight_map":
                index["weight_map"] = wm = data.draw(JSON)
            elif op == "index":
                index = data.draw(JSON)
                wm = {}
            elif op == "nest":
                index = DEEP
        text = index if index is DEEP else json.dumps(index)
        (folder / "model.safetensors.index.json").write_text(text)
        if data.draw(st.integers(0, 3)) == 0:  # a shard of random content
            shard = data.draw(st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]))
            (folder / shard).write_bytes(data.draw(safetensors_bytes()))
        config = data.draw(st.sampled_from(["absent", "valid", "valid", "json", "bytes", "deep"]))
        cfg = folder / "config.json"
        if config == "valid":
            cfg.write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": data.draw(JSON)}))
        elif config == "json":
            cfg.write_text(json.dumps(data.draw(JSON)))
        elif config == "bytes":
            cfg.write_bytes(data.draw(st.binary(max_size=40)))
        elif config == "deep":
            cfg.write_text('{"a": ' + DEEP + "}")
        _open_and_read_all(folder)
