"""Reader: listings from headers and tensor reads, checked against safetensors' own safe_open."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
import torch

from rank1tools.errors import InputError
from rank1tools.io import open_checkpoint, open_source
from rank1tools.io.reused_reads import ReusedReads
from rank1tools.synthetic import LlamaShape

from _support import DTYPES, assert_bit_identical, build_checkpoint, reference_tensors, safetensors_files

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def test_fixture_layouts(models):
    """The fixture builder makes what the other tests assume: several shards + index, or one file."""
    for dtype in DTYPES:
        for tie in (False, True):
            sharded = models(dtype, tie, True).path
            shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
            assert len(shards) >= 3
            assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
            index = json.loads((sharded / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"].values()) == set(shards)
            single = models(dtype, tie, False).path
            assert [p.name for p in safetensors_files(single)] == ["model.safetensors"]
            assert not (single / "model.safetensors.index.json").exists()
            for folder in (sharded, single):
                ref = reference_tensors(folder)
                assert (LM_HEAD in ref) is (not tie)
                assert {r.dtype_code for r in ref.values()} == {"F32" if dtype == "fp32" else "BF16"}


def test_listing_matches_safe_open(model):
    ckpt = open_checkpoint(model.path)
    ref = reference_tensors(model.path)
    assert sorted(ckpt.names) == sorted(ref)
    for name, r in ref.items():
        e = ckpt.entries[name]
        assert e.name == name
        assert e.shape == r.shape == tuple(r.tensor.shape)
        assert e.dtype == r.dtype_code
        assert e.torch_dtype == r.tensor.dtype
        assert e.shard == r.shard
        assert e.numel == r.tensor.numel()
        assert e.nbytes == r.tensor.numel() * r.tensor.element_size()
    assert sorted(ckpt.shards) == sorted(p.name for p in safetensors_files(model.path))
    assert ckpt.dtypes() == dict(Counter(r.dtype_code for r in ref.values()))
    assert ckpt.nbytes == sum(r.tensor.numel() * r.tensor.element_size() for r in ref.values())
    assert ckpt.config == json.loads((model.path / "config.json").read_text())
    assert ckpt.root == model.path


def test_parameter_count(model):
    ckpt = open_checkpoint(model.path)
    ref = reference_tensors(model.path)
    assert ckpt.parameter_count == sum(r.tensor.numel() for r in ref.values())
    assert ckpt.parameter_count == model.shape.parameter_count


def test_read_upcasts_to_float32_exactly(model):
    ckpt = open_checkpoint(model.path)
    for name, r in reference_tensors(model.path).items():
        got = ckpt.read(name)
        assert got.device.type == "cpu"
        assert_bit_identical(got, r.tensor.float(), name)


def test_read_other_dtype(models):
    m = models("bf16", False, True)
    ckpt = open_checkpoint(m.path)
    for name, r in reference_tensors(m.path).items():
        assert_bit_identical(ckpt.read(name, dtype=torch.float64), r.tensor.double(), name)


def test_read_raw_is_bit_identical_in_stored_dtype(model):
    ckpt = open_checkpoint(model.path)
    for name, r in reference_tensors(model.path).items():
        raw = ckpt.read_raw(name)
        assert raw.dtype == model.dtype
        assert_bit_identical(raw, r.tensor, name)


def test_read_raw_into_a_reused_buffer(model):
    """read_raw(out=): the same bits, as a view of the caller's buffer, one buffer for every tensor."""
    ckpt = open_checkpoint(model.path)
    ref = reference_tensors(model.path)
    buf = torch.empty(max(ckpt.entry(n).nbytes for n in ref), dtype=torch.uint8)
    for name, r in ref.items():
        raw = ckpt.read_raw(name, out=buf)
        assert raw.data_ptr() == buf.data_ptr() and raw.shape == r.tensor.shape
        assert_bit_identical(raw, r.tensor, name)
    name = next(iter(ref))
    with pytest.raises(ValueError, match="at least"):
        ckpt.read_raw(name, out=torch.empty(ckpt.entry(name).nbytes - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ckpt.read_raw(name, out=torch.empty(ckpt.entry(name).nbytes, dtype=torch.float32))


def test_reused_reads_equal_fresh_reads(model):
    """ReusedReads.float32: read(name) bit for bit; each slot's memory is reused whatever the tensor's
    shape (small after large), and the slots are distinct, so a held view survives a read into
    another slot."""
    ckpt = open_checkpoint(model.path)
    ref = reference_tensors(model.path)
    names = sorted(ref, key=lambda n: -ref[n].tensor.numel())  # the largest first: later reads fit
    reads = ReusedReads(slots=2)
    first = reads.float32(ckpt, names[0], 0)
    ptr = first.data_ptr()
    held = reads.float32(ckpt, names[1], 1)
    for name in names[2:]:
        got = reads.float32(ckpt, name, 0)
        assert got.data_ptr() == ptr and got.dtype == torch.float32
        assert_bit_identical(got, ref[name].tensor.float(), name)
    assert_bit_identical(held, ref[names[1]].tensor.float(), names[1])


def _row_ranges(n: int) -> list[tuple[int, int]]:
    return [(0, n), (0, 1), (3, 17), (n // 3, (2 * n) // 3 + 1), (n - 5, n), (n - 1, n), (4, 4)]


def test_read_rows_equals_slice(model):
    ckpt = open_checkpoint(model.path)
    for name, r in reference_tensors(model.path).items():
        n = r.shape[0]
        for a, b in _row_ranges(n):
            got = ckpt.read(name, rows=(a, b))
            assert_bit_identical(got, r.tensor[a:b].float(), f"{name} rows {a}:{b}")


def test_read_flat_equals_slice(model):
    ckpt = open_checkpoint(model.path)
    for name, r in reference_tensors(model.path).items():
        flat = r.tensor.reshape(-1)
        n = flat.numel()
        for a, b in [(0, n), (0, 1), (n // 3, (2 * n) // 3 + 1), (n - 7, n), (5, 5), (31, 33)]:
            got = ckpt.read_flat(name, a, b)
            assert_bit_identical(got, flat[a:b].float(), f"{name} [{a}:{b}]")


def test_read_flat_out_of_range_is_refused(models):
    ckpt = open_checkpoint(models("fp32").path)
    n = ckpt.entries[EMBED].numel
    for a, b in [(0, n + 1), (5, 4), (-1, 3)]:
        with pytest.raises(ValueError, match="outside tensor"):
            ckpt.read_flat(EMBED, a, b)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_tied_lm_head_reads_as_embedding(models, dtype, sharded):
    m = models(dtype, True, sharded)
    ckpt = open_checkpoint(m.path)
    ref = reference_tensors(m.path)
    assert LM_HEAD not in ref and LM_HEAD not in ckpt.names
    assert ckpt.lm_head_tied is True
    assert LM_HEAD in ckpt
    assert ckpt.entry(LM_HEAD) == ckpt.entries[EMBED]
    assert_bit_identical(ckpt.read(LM_HEAD), ref[EMBED].tensor.float(), LM_HEAD)
    assert_bit_identical(ckpt.read_raw(LM_HEAD), ref[EMBED].tensor, LM_HEAD)
    assert_bit_identical(ckpt.read(LM_HEAD, rows=(7, 19)), ref[EMBED].tensor[7:19].float(), LM_HEAD)
    assert ckpt.parameter_count == sum(r.tensor.numel() for r in ref.values())  # counted once


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_untied_lm_head_is_its_own_tensor(models, dtype):
    m = models(dtype, False, False)
    ckpt = open_checkpoint(m.path)
    ref = reference_tensors(m.path)
    assert ckpt.lm_head_tied is False
    head = ckpt.read(LM_HEAD)
    assert_bit_identical(head, ref[LM_HEAD].tensor.float(), LM_HEAD)
    assert not torch.equal(head, ckpt.read(EMBED))


def test_missing_lm_head_with_untied_config_is_not_tied(tmp_path):
    """Config says tie_word_embeddings=false: an absent lm_head is absent, not the embedding."""
    shape = LlamaShape(tie=False)
    folder = build_checkpoint(
        tmp_path / "m", shape=shape, tensors_edit=lambda t: {k: v for k, v in t.items() if k != LM_HEAD}
    )
    ckpt = open_checkpoint(folder)
    assert ckpt.config["tie_word_embeddings"] is False
    assert ckpt.lm_head_tied is False
    assert LM_HEAD not in ckpt
    with pytest.raises(InputError, match="lm_head.weight"):
        ckpt.read(LM_HEAD)


def test_unknown_tensor_name_is_an_input_error(models):
    ckpt = open_checkpoint(models("fp32").path)
    with pytest.raises(InputError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        ckpt.read("model.layers.9.mlp.up_proj.weight")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_open_source_local_equals_open_checkpoint(models, dtype):
    m = models(dtype, False, True)
    a, b = open_source(str(m.path)), open_checkpoint(m.path)
    assert a.label == str(m.path)
    assert a.entries == b.entries
    assert a.revision is None
    for name in a.names:
        assert_bit_identical(a.read_raw(name), b.read_raw(name), name)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_bare_safetensors_file(models, tie):
    m = models("bf16", tie, False)
    f = m.path / "model.safetensors"
    ckpt = open_source(str(f))
    ref = reference_tensors(m.path)
    assert ckpt.config is None and ckpt.root is None
    assert sorted(ckpt.names) == sorted(ref)
    assert ckpt.lm_head_tied is tie  # without a config, a missing lm_head is taken as tied
    for name, r in ref.items():
        assert_bit_identical(ckpt.read_raw(name), r.tensor, name)


def test_single_differently_named_safetensors_file_in_folder(tmp_path, models):
    src = models("fp32", False, False).path
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    ckpt = open_checkpoint(folder)
    ref = reference_tensors(src)
    assert sorted(ckpt.names) == sorted(ref)
    assert ckpt.shards == ["weights.safetensors"]
    for name, r in ref.items():
        assert_bit_identical(ckpt.read_raw(name), r.tensor, name)


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_symlinked_snapshot_opens(tmp_path, models, sharded):
    """Hugging Face cache snapshots hold symlinks to blobs elsewhere; a model opens through them."""
    src = models("bf16", False, sharded).path
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(os.path.relpath(blobs / f.name, snap), snap / f.name)
    ckpt = open_checkpoint(snap)
    for name, r in reference_tensors(src).items():
        assert_bit_identical(ckpt.read_raw(name), r.tensor, name)
