"""engine/model_loading.CausalLM: one model built from the base's config, checkpoints copied into it
in place, equal to `from_pretrained` of each checkpoint (docs/concepts.md#running-checkpoints-as-models)."""

from __future__ import annotations

import pytest
import torch

from rank1tools.demo.tokenizer import VOCAB, write_tokenizer
from rank1tools.engine.model_loading import CausalLM, ModelOptions
from rank1tools.errors import InputError, UsageError
from rank1tools.io.checkpoint import Checkpoint, open_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _llama(transformers, folder, seed: int, tie: bool, *, tokenizer: bool = True):
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        initializer_range=0.3,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder)
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [1, 5, 9, 3, 7, 2, 11]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_each_checkpoint_equals_from_pretrained(tmp_path, transformers, tie):
    base = _llama(transformers, tmp_path / "base", 0, tie)
    later = _llama(transformers, tmp_path / "later", 1, tie, tokenizer=False)
    lm = CausalLM(open_checkpoint(base), ModelOptions(device="cpu"))
    assert lm.dtype == torch.float32 and lm.loaded == str(base)
    for folder in (base, later, base):
        lm.load(open_checkpoint(folder))
        want = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.testing.assert_close(_logits(lm.model, IDS), _logits(want, IDS), rtol=0, atol=0)
    assert lm.tokenizer("1+2=")["input_ids"]


def test_a_checkpoint_that_unties_the_head(tmp_path, transformers):
    base = _llama(transformers, tmp_path / "base", 0, True)
    untied = _llama(transformers, tmp_path / "untied", 1, False, tokenizer=False)
    lm = CausalLM(open_checkpoint(base), ModelOptions(device="cpu"))
    lm.load(open_checkpoint(untied))
    head, emb = lm.model.get_output_embeddings().weight, lm.model.get_input_embeddings().weight
    assert head is not emb
    want = transformers.AutoModelForCausalLM.from_pretrained(untied, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(lm.model, IDS), _logits(want, IDS), rtol=0, atol=0)
    lm.load(open_checkpoint(base))  # tied again: the head takes the embedding's values
    torch.testing.assert_close(lm.model.get_output_embeddings().weight, lm.model.get_input_embeddings().weight)


def test_bfloat16_dtype(tmp_path, transformers):
    base = _llama(transformers, tmp_path / "base", 0, False)
    lm = CausalLM(open_checkpoint(base), ModelOptions(device="cpu", dtype="bfloat16"))
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    want = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    torch.testing.assert_close(_logits(lm.model, IDS), _logits(want, IDS), rtol=0, atol=0)


def test_refusals_name_the_file_and_tensor(tmp_path, transformers):
    base = _llama(transformers, tmp_path / "base", 0, False)
    lm = CausalLM(open_checkpoint(base), ModelOptions(device="cpu"))
    wider = transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(wider).save_pretrained(tmp_path / "wider")
    with pytest.raises(
        InputError,
        match=r"wider: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[48, 16\], the model's is \[32, 16\]",
    ):
        lm.load(open_checkpoint(tmp_path / "wider"))
    from safetensors.torch import load_file, save_file

    (tmp_path / "short").mkdir()
    tensors = load_file(base / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "short" / "model.safetensors")
    with pytest.raises(InputError, match=r"short: has no tensor 'model\.norm\.weight' the model needs$"):
        lm.load(open_checkpoint(tmp_path / "short"))
    with pytest.raises(InputError, match=r"no config\.json beside the weights"):
        CausalLM(open_checkpoint(tmp_path / "short"), ModelOptions(device="cpu"))
    with pytest.raises(UsageError, match=r"--batch-size 0"):
        CausalLM(open_checkpoint(base), ModelOptions(device="cpu", batch_size=0))
    (tmp_path / "notok").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "notok" / f).write_bytes((base / f).read_bytes())
    with pytest.raises(InputError, match=r"notok: cannot load its tokenizer"):
        CausalLM(open_checkpoint(tmp_path / "notok"), ModelOptions(device="cpu"))


def test_without_the_base_weights_until_the_first_load(tmp_path, transformers, monkeypatch):
    base = _llama(transformers, tmp_path / "base", 0, False)
    later = _llama(transformers, tmp_path / "later", 1, False, tokenizer=False)
    base_ck = open_checkpoint(base)
    read = []
    monkeypatch.setattr(
        type(base_ck), "read", lambda self, name, **kw: read.append(self.label) or READ(self, name, **kw)
    )
    lm = CausalLM(base_ck, ModelOptions(device="cpu"), load_base=False)
    assert lm.loaded is None and read == []  # the base's weights are never read
    lm.load(open_checkpoint(later))
    assert set(read) == {str(later)}
    want = transformers.AutoModelForCausalLM.from_pretrained(later, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(lm.model, IDS), _logits(want, IDS), rtol=0, atol=0)


READ = Checkpoint.read  # the real reader, wrapped above to record what is read
