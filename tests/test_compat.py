"""Base/checkpoint compatibility: same tensor names and shapes; dtype and a tied lm_head may differ."""

from __future__ import annotations

import re

import pytest
import torch

from rank1tools.errors import InputError
from rank1tools.io import check_compatible, open_checkpoint
from rank1tools.synthetic import LlamaShape

from _support import build_checkpoint

UP0 = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt_dtype", [torch.float32, torch.bfloat16], ids=["ckpt-fp32", "ckpt-bf16"])
def test_same_shapes_any_dtype_are_compatible(tmp_path, models, base_dtype, ckpt_dtype):
    base = open_checkpoint(models(base_dtype, False, False).path)
    ckpt = open_checkpoint(build_checkpoint(tmp_path / "c", dtype=ckpt_dtype, sharded=True))
    check_compatible(base, ckpt)
    check_compatible(ckpt, base)


def test_tied_lm_head_omitted_on_either_side_is_compatible(tmp_path, models):
    untied = open_checkpoint(models("fp32", False, False).path)
    tied = open_checkpoint(build_checkpoint(tmp_path / "c", shape=LlamaShape(tie=True)))
    assert "lm_head.weight" not in tied.names and tied.lm_head_tied
    check_compatible(untied, tied)
    check_compatible(tied, untied)
    check_compatible(tied, open_checkpoint(models("bf16", True, True).path))


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, models):
    base = open_checkpoint(models("fp32", False, False).path)

    def grow(t):
        t[UP0] = torch.zeros(161, 64)
        return t

    ckpt = open_checkpoint(build_checkpoint(tmp_path / "c", tensors_edit=grow))
    with pytest.raises(InputError) as info:
        check_compatible(base, ckpt)
    msg = str(info.value)
    assert UP0 in msg
    assert "[161, 64]" in msg and "[160, 64]" in msg
    with pytest.raises(InputError, match=re.escape(UP0)):
        check_compatible(ckpt, base)


def test_different_model_shape_is_refused(tmp_path, models):
    base = open_checkpoint(models("fp32", False, False).path)
    ckpt = open_checkpoint(build_checkpoint(tmp_path / "c", shape=LlamaShape(intermediate=96)))
    with pytest.raises(InputError, match=r"\[96, 64\].*\[160, 64\]|\[64, 96\].*\[64, 160\]"):
        check_compatible(base, ckpt)


def test_tied_head_against_wrong_sized_lm_head(tmp_path):
    """A tied lm_head stands for the embedding: an lm_head of another shape is a mismatch."""
    tied = open_checkpoint(build_checkpoint(tmp_path / "t", shape=LlamaShape(tie=True)))

    def odd_head(t):
        t["lm_head.weight"] = torch.zeros(100, 64)
        return t

    other = open_checkpoint(build_checkpoint(tmp_path / "o", tensors_edit=odd_head))
    for a, b in ((tied, other), (other, tied)):
        with pytest.raises(InputError) as info:
            check_compatible(a, b)
        assert "lm_head.weight" in str(info.value) and "[100, 64]" in str(info.value) and "[128, 64]" in str(info.value)


def test_missing_tensor_is_named(tmp_path, models):
    base = open_checkpoint(models("fp32", False, False).path)
    ckpt = open_checkpoint(
        build_checkpoint(tmp_path / "c", tensors_edit=lambda t: {k: v for k, v in t.items() if k != UP0})
    )
    with pytest.raises(InputError) as info:
        check_compatible(base, ckpt)
    assert UP0 in str(info.value) and "lacks" in str(info.value)
    # the same pair the other way round: the checkpoint is the base, so the other has an extra tensor
    with pytest.raises(InputError) as info:
        check_compatible(ckpt, base)
    assert UP0 in str(info.value)


def test_extra_tensor_is_named(tmp_path, models):
    base = open_checkpoint(models("bf16", True, False).path)

    def extra(t):
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
        return t

    ckpt = open_checkpoint(build_checkpoint(tmp_path / "c", shape=LlamaShape(tie=True), tensors_edit=extra))
    with pytest.raises(InputError) as info:
        check_compatible(base, ckpt)
    assert "model.layers.0.self_attn.q_proj.bias" in str(info.value)
    assert info.value.exit_code == 3
