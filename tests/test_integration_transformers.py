"""A checkpoint copied through ShardedWriter loads with transformers exactly like its source."""

from __future__ import annotations

import random

import pytest
import torch

from rank1tools.io import ShardedWriter, TensorSpec, open_checkpoint
from rank1tools.io.writer import provenance

from _support import assert_bit_identical

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _load(transformers, folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_written_copy_loads_with_identical_logits(tmp_path, models, transformers, dtype, tie):
    src = models(dtype, tie, sharded=(dtype == "bf16"))
    ckpt = open_checkpoint(src.path)
    specs = [TensorSpec(n, e.shape, e.torch_dtype) for n, e in ckpt.entries.items()]
    order = [s.name for s in specs]
    random.Random(1).shuffle(order)
    with ShardedWriter(tmp_path / "out", specs, max_shard_size="40KB") as w:
        for name in order:
            w.write(name, ckpt.read_raw(name))
        out = w.commit(copy_from=ckpt, provenance=provenance("test-copy", [ckpt], {}))
    assert (out / "model.safetensors.index.json").is_file()

    a, b = _load(transformers, src.path), _load(transformers, out)
    assert a.dtype == b.dtype == src.dtype
    assert a.config.tie_word_embeddings is b.config.tie_word_embeddings is tie
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert_bit_identical(sb[k], sa[k], k)

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, src.shape.vocab, (2, 16), generator=g)
    with torch.no_grad():
        la, lb = a(input_ids=input_ids).logits, b(input_ids=input_ids).logits
    assert la.shape == (2, 16, src.shape.vocab)
    assert torch.isfinite(la).all()
    assert torch.equal(la, lb)
