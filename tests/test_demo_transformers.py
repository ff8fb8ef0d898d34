"""The demo policy's files load with transformers: AutoTokenizer gives our token ids, and
LlamaForCausalLM gives our module's logits and greedy completions on the same weights."""

from __future__ import annotations

import pytest
import torch

from rank1tools.demo import DemoTraining, evaluate_checkpoint, train_demo_run
from rank1tools.demo.model import TinyLlama, TinyLlamaConfig, load_weights, save_model
from rank1tools.demo.task import AdditionTask, greedy, prompt_text
from rank1tools.demo.tokenizer import VOCAB, encode, write_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _folder(tmp_path, config: TinyLlamaConfig, seed: int = 0):
    model = TinyLlama(config)
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g, 0.2)  # larger than a fresh model's weights: logits far from uniform
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    save_model(tmp_path, model)
    write_tokenizer(tmp_path)
    return model.eval()


def test_auto_tokenizer_gives_our_ids(tmp_path, transformers):
    write_tokenizer(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for a, b, digits in [(47, 96, 2), (0, 5, 2), (123, 908, 3)]:
        text = prompt_text(a, b, digits)
        assert tok(text)["input_ids"] == encode(text)
        assert tok.decode(encode(text), skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids(list("0123456789+=")) == [VOCAB[c] for c in "0123456789+="]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (VOCAB["<s>"], VOCAB["</s>"], VOCAB["<pad>"])


@pytest.mark.parametrize("layers, heads, kv_heads", [(2, 4, 2), (1, 2, 2)])
def test_llama_for_causal_lm_gives_our_logits(tmp_path, transformers, layers, heads, kv_heads):
    config = TinyLlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    ours = _folder(tmp_path, config)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings and torch.equal(hf.lm_head.weight, ours.lm_head.weight)
    ids = torch.randint(0, len(VOCAB), (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 1  # not a near-uniform output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hf_greedy_generation_matches_ours(tmp_path, transformers):
    config = TinyLlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    ours = _folder(tmp_path, config, seed=3)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    prompts = AdditionTask(2, 0, 40).eval_prompts
    with torch.no_grad():
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=VOCAB["<pad>"],
            eos_token_id=None,
        )
    assert torch.equal(out[:, prompts.shape[1] :], greedy(ours, prompts, 3))


@pytest.mark.training
def test_trained_checkpoint_generates_and_scores_the_same(tmp_path, transformers):
    config = DemoTraining(
        hidden_size=32,
        intermediate_size=64,
        layers=1,
        heads=2,
        kv_heads=1,
        eval_size=100,
        sft_eval_size=100,
        sft_max_steps=30,
        sft_target=1.1,
        grpo_prompts=4,
        grpo_group=4,
        grpo_steps=2,
        save_every=2,
    )
    run = train_demo_run(tmp_path, config)
    folder = run.run / "checkpoint-2"
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ours = TinyLlama(config.model_config())
    load_weights(ours, folder)
    task = AdditionTask(config.digits, config.seed, config.eval_size)
    with torch.no_grad():
        out = hf.generate(
            task.eval_prompts,
            attention_mask=torch.ones_like(task.eval_prompts),
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=VOCAB["<pad>"],
            eos_token_id=None,
        )
    hf_completions = out[:, task.prompt_len :]
    assert torch.equal(hf_completions, greedy(ours, task.eval_prompts, task.answer_len))
    hf_accuracy = (hf_completions == task.eval_answers).all(dim=1).double().mean().item()
    assert hf_accuracy == pytest.approx(run.accuracy[2], abs=1e-12)
    assert evaluate_checkpoint(folder, config) == run.accuracy[2]
