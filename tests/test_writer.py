"""Sharded writer: bit-exact copies re-read by safetensors, index, metadata, aux files, provenance,
and refusing or cleaning up rather than leaving partial output."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

import rank1tools
from rank1tools.errors import OutputError
from rank1tools.io import ShardedWriter, TensorSpec, open_checkpoint
from rank1tools.io.writer import PROVENANCE_FILE, copy_aux_files, prepare_output, provenance

from _support import (
    SAFETENSORS_CODE,
    assert_bit_identical,
    reference_tensors,
    safetensors_files,
    shard_metadata,
    tree_snapshot,
)

AUX = [
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
MAX_SHARD = 40_000  # "40KB"
SHARD_NAME = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def specs_of(ckpt, dtype: torch.dtype | None = None) -> list[TensorSpec]:
    return [TensorSpec(n, e.shape, dtype or e.torch_dtype) for n, e in ckpt.entries.items()]


def write_copy(
    ckpt,
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size="40KB",
    seed: int = 0,
    output_dtype=None,
    prov: dict | None = None,
    force: bool = False,
) -> Path:
    """Write every tensor of `ckpt` in a shuffled order; raw bytes when the dtype is kept."""
    specs = specs_of(ckpt, dtype)
    order = [s.name for s in specs]
    random.Random(seed).shuffle(order)
    with ShardedWriter(out, specs, max_shard_size=max_shard_size, force=force) as w:
        for name in order:
            w.write(name, ckpt.read_raw(name) if dtype is None else ckpt.read(name))
        return w.commit(copy_from=ckpt, output_dtype=output_dtype, provenance=prov)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("src_sharded", [False, True], ids=["from-single", "from-sharded"])
def test_sharded_copy_is_bit_identical(tmp_path, models, dtype, tie, src_sharded):
    src = models(dtype, tie, src_sharded)
    ckpt = open_checkpoint(src.path)
    out = write_copy(ckpt, tmp_path / "out", seed=4 * (dtype == "bf16") + 2 * tie + src_sharded)
    assert out == (tmp_path / "out").absolute()
    assert leftovers(tmp_path) == []

    shards = safetensors_files(out)
    n = len(shards)
    assert n >= 3
    for i, p in enumerate(shards, start=1):
        m = SHARD_NAME.match(p.name)
        assert m and (int(m.group(1)), int(m.group(2))) == (i, n), p.name
        assert shard_metadata(p) == {"format": "pt"}
        header_len = int.from_bytes(p.read_bytes()[:8], "little")
        assert header_len % 8 == 0  # tensor data 8-byte aligned, like safetensors' own files

    want = reference_tensors(src.path)
    got = reference_tensors(out)
    assert sorted(got) == sorted(want)
    for name, r in want.items():
        assert got[name].dtype_code == r.dtype_code
        assert_bit_identical(got[name].tensor, r.tensor, name)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: g.shard for name, g in got.items()}
    assert index["metadata"]["total_size"] == sum(r.tensor.numel() * r.tensor.element_size() for r in want.values())

    # each shard respects max_shard_size unless it holds a single oversized tensor
    by_shard: dict[str, list] = {}
    for g in got.values():
        by_shard.setdefault(g.shard, []).append(g.tensor.numel() * g.tensor.element_size())
    for sizes in by_shard.values():
        assert len(sizes) == 1 or sum(sizes) <= MAX_SHARD

    for f in AUX:
        assert (out / f).read_bytes() == (src.path / f).read_bytes(), f
    back = open_checkpoint(out)
    assert back.lm_head_tied is tie
    assert back.parameter_count == ckpt.parameter_count


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_single_shard_output_is_model_safetensors(tmp_path, models, dtype):
    src = models(dtype, False, True)
    out = write_copy(open_checkpoint(src.path), tmp_path / "out", max_shard_size="5GB")
    assert [p.name for p in safetensors_files(out)] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert shard_metadata(out / "model.safetensors") == {"format": "pt"}
    want, got = reference_tensors(src.path), reference_tensors(out)
    assert sorted(got) == sorted(want)
    for name, r in want.items():
        assert_bit_identical(got[name].tensor, r.tensor, name)


@pytest.mark.parametrize("src_dtype,out_dtype", [("bf16", torch.float32), ("fp32", torch.bfloat16)])
def test_dtype_change_casts_and_updates_config(tmp_path, models, src_dtype, out_dtype):
    src = models(src_dtype, False, True)
    ckpt = open_checkpoint(src.path)
    out = write_copy(ckpt, tmp_path / "out", dtype=out_dtype, output_dtype=out_dtype)
    want, got = reference_tensors(src.path), reference_tensors(out)
    for name, r in want.items():
        assert got[name].dtype_code == SAFETENSORS_CODE[out_dtype]
        assert_bit_identical(got[name].tensor, r.tensor.to(out_dtype), name)
    src_cfg = json.loads((src.path / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    expected_name = str(out_dtype).removeprefix("torch.")
    assert src_cfg["torch_dtype"] != expected_name
    assert out_cfg["torch_dtype"] == expected_name
    assert {k: v for k, v in out_cfg.items() if k != "torch_dtype"} == {
        k: v for k, v in src_cfg.items() if k != "torch_dtype"
    }
    for f in AUX[1:]:
        assert (out / f).read_bytes() == (src.path / f).read_bytes(), f


def _aux_dir(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for name in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "modeling_custom.py",
    ]:
        (folder / name).write_text(f"content of {name}\n")
    for name in ["model.safetensors", "trainer_state.json", "optimizer.pt", "rng_state.pth", "notes.md"]:
        (folder / name).write_text(f"not copied: {name}\n")
    return folder


def test_copy_aux_files_copies_only_model_files(tmp_path):
    src = _aux_dir(tmp_path / "src", {"model_type": "llama", "torch_dtype": "bfloat16"})
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_aux_files(src, dst, None)
    expected = [
        "added_tokens.json",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "merges.txt",
        "modeling_custom.py",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert sorted(copied) == expected
    assert sorted(p.name for p in dst.iterdir()) == expected
    for name in expected:
        assert (dst / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize(
    "cfg,expected",
    [
        ({"model_type": "llama", "dtype": "bfloat16"}, {"model_type": "llama", "dtype": "float32"}),
        (
            {"model_type": "llama", "dtype": "bfloat16", "torch_dtype": "bfloat16"},
            {"model_type": "llama", "dtype": "float32", "torch_dtype": "float32"},
        ),
        ({"model_type": "llama"}, {"model_type": "llama", "torch_dtype": "float32"}),
    ],
)
def test_config_dtype_field_updated(tmp_path, cfg, expected):
    src = _aux_dir(tmp_path / "src", cfg)
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_aux_files(src, dst, torch.float32)
    assert json.loads((dst / "config.json").read_text()) == expected
    assert json.loads((src / "config.json").read_text()) == cfg  # source untouched


def test_config_untouched_when_dtype_unchanged(tmp_path):
    src = _aux_dir(tmp_path / "src", {"model_type": "llama", "torch_dtype": "bfloat16", "z": 1, "a": 2})
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_aux_files(src, dst, torch.bfloat16)
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()


def test_provenance_file(tmp_path, models):
    src = models("bf16", True, False)
    ckpt = open_checkpoint(src.path)
    params = {"method": "copy", "rank": 1, "alpha": 0.5}
    out = write_copy(ckpt, tmp_path / "out", prov=provenance("copy", [ckpt], params))
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["tool"] == "rank1tools"
    assert record["version"] == rank1tools.__version__
    assert record["command"] == "copy"
    assert record["inputs"] == [{"source": str(src.path), "revision": None}]
    assert record["parameters"] == params
    assert record["argv"] is None  # a library call: no rank1 command line to record
    # no provenance asked for: no file
    out2 = write_copy(ckpt, tmp_path / "out2")
    assert not (out2 / PROVENANCE_FILE).exists()


def test_existing_target_is_refused_without_force(tmp_path, models):
    ckpt = open_checkpoint(models("fp32").path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = tree_snapshot(tmp_path)
    with pytest.raises(OutputError, match="already exists") as info:
        ShardedWriter(out, specs_of(ckpt))
    assert info.value.exit_code == 4
    assert tree_snapshot(tmp_path) == before  # nothing written, no temp dir


def test_force_replaces_existing_target(tmp_path, models):
    src = models("bf16", False, False)
    ckpt = open_checkpoint(src.path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / PROVENANCE_FILE).write_text('{"tool": "rank1tools"}')  # an earlier rank1 output: --force may replace it
    write_copy(ckpt, out, force=True)
    assert not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == []
    want, got = reference_tensors(src.path), reference_tensors(out)
    assert sorted(got) == sorted(want)
    for name, r in want.items():
        assert_bit_identical(got[name].tensor, r.tensor, name)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "forced-over-existing"])
def test_exception_inside_block_leaves_nothing(tmp_path, models, existing):
    ckpt = open_checkpoint(models("fp32").path)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("old")
        (out / PROVENANCE_FILE).write_text('{"tool": "rank1tools"}')
    before = tree_snapshot(tmp_path)
    specs = specs_of(ckpt)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(out, specs, max_shard_size="40KB", force=existing) as w:
            for s in specs[:5]:
                w.write(s.name, ckpt.read_raw(s.name))
            assert any(n.startswith(".out.tmp-") for n in leftovers(tmp_path))  # work happens beside the target
            raise RuntimeError("boom")
    assert tree_snapshot(tmp_path) == before


def test_commit_with_unwritten_tensors_fails_and_cleans_up(tmp_path, models):
    ckpt = open_checkpoint(models("fp32").path)
    specs = specs_of(ckpt)
    with pytest.raises(RuntimeError, match="never written") as info:
        with ShardedWriter(tmp_path / "out", specs) as w:
            for s in specs[1:]:
                w.write(s.name, ckpt.read_raw(s.name))
            w.commit()
    assert specs[0].name in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_checks_name_and_shape(tmp_path):
    specs = [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.bfloat16)]
    with ShardedWriter(tmp_path / "out", specs) as w:
        with pytest.raises(KeyError, match="'c'"):
            w.write("c", torch.zeros(2, 3))
        with pytest.raises(ValueError, match=r"\[3, 2\]"):
            w.write("a", torch.zeros(3, 2))
        a = torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7
        b = torch.tensor([1.0, -2.5, 1e-5, 3.0e38])
        w.write("a", a)
        w.write("b", b)
        w.commit()
    got = reference_tensors(tmp_path / "out")
    assert_bit_identical(got["a"].tensor, a.to(torch.float32), "a")  # cast to the planned dtype
    assert_bit_identical(got["b"].tensor, b.to(torch.bfloat16), "b")


def test_empty_tensor_and_nested_output(tmp_path):
    specs = [TensorSpec("empty", (0, 4), torch.float32), TensorSpec("x", (3,), torch.bfloat16)]
    out = tmp_path / "a" / "b" / "out"
    with ShardedWriter(out, specs) as w:
        w.write("empty", torch.zeros(0, 4))
        w.write("x", torch.tensor([1.0, 2.0, 3.0]))
        w.commit()
    got = reference_tensors(out)
    assert tuple(got["empty"].tensor.shape) == (0, 4)
    assert_bit_identical(got["x"].tensor, torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), "x")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_duplicate_spec_names_refused_without_leftovers(tmp_path):
    specs = [TensorSpec("a", (2,), torch.float32), TensorSpec("a", (2,), torch.float32)]
    with pytest.raises(ValueError, match="duplicate"):
        ShardedWriter(tmp_path / "out", specs)
    assert list(tmp_path.iterdir()) == []


def test_prepare_output_refuses_places_over_inputs(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    for out in (model, model / "sub", model / "a" / "b", tmp_path):
        with pytest.raises(OutputError, match="must not be inside or contain an input") as info:
            prepare_output(out, force=True, inputs=[model])
        assert info.value.exit_code == 4
    # a file input is that file: beside it is fine, over or around it is not
    assert prepare_output(model / "new", force=False, inputs=[model / "model.safetensors"]) == model / "new"
    for out in (model / "model.safetensors", model / "model.safetensors" / "sub", model):
        with pytest.raises(OutputError, match="must not be inside or contain an input"):
            prepare_output(out, force=True, inputs=[model / "model.safetensors"])
    monkeypatch.chdir(model)
    with pytest.raises(OutputError, match="must not be inside"):
        prepare_output("sub", force=False, inputs=[Path(".")])
    monkeypatch.chdir(tmp_path)
    assert prepare_output("sibling", force=False, inputs=[model]) == tmp_path / "sibling"
    assert not (tmp_path / "sibling").exists()  # checking writes nothing


def test_prepare_output_existing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        prepare_output(tmp_path / "file", force=True)
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="already exists; pass --force"):
        prepare_output(tmp_path / "dir", force=False)
    assert prepare_output(tmp_path / "dir", force=True) == tmp_path / "dir"
