"""Teacher-forced log-probs (math/token_logprobs.py, engine/model_scoring.py) against a direct
`transformers` forward + log_softmax + gather on each sequence alone
(docs/concepts.md#teacher-forced-log-probabilities)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from rank1tools.demo.tokenizer import VOCAB, encode, tokenizer_config, tokenizer_json, write_tokenizer
from rank1tools.engine.model_scoring import (
    INSTALL_HINT,
    import_transformers,
    score_completions,
    score_rollouts,
    tokenize_pair,
)
from rank1tools.errors import InputError, UsageError
from rank1tools.io.rollouts import read_rollouts
from rank1tools.math.token_logprobs import gather_token_logprobs

CONTEXT = 48
MERGED = "=5"  # the boundary tokenizer's one merge: "2+3=" + "5" tokenizes "=5" as one token
MERGED_ID = len(VOCAB)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
)
PAIRS = [("2+3=", "5"), ("12+30=", "42"), ("7+7=", "14+0"), ("9999+1=", "10000"), ("", "3")]


def _reference(model, ids: list[int], start: int) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= start: one sequence alone, one full forward, no padding."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return torch.stack([lp[t - 1, ids[t]] for t in range(start, len(ids))])


# -- the pure gather ---------------------------------------------------------------------------


def test_gather_equals_a_loop_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    scored = torch.zeros(3, 6, dtype=torch.bool)
    scored[0, 2:5] = True
    scored[1, 5] = True
    scored[2, 1:] = True
    got = gather_token_logprobs(logits, ids, scored)
    want = [
        torch.log_softmax(logits[b, t - 1].float(), -1)[ids[b, t]] for b in range(3) for t in range(6) if scored[b, t]
    ]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack(want), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="position 0"):
        gather_token_logprobs(logits, ids, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        gather_token_logprobs(logits, ids, scored.long())


def test_missing_transformers_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    with pytest.raises(UsageError, match=re.escape(f"not installed: {INSTALL_HINT}")):
        import_transformers()
    assert INSTALL_HINT == "pip install 'rank1tools[model]'"


# -- a tiny Llama built with transformers itself -----------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _write_boundary_tokenizer(folder):
    """The demo tokenizer plus one BPE merge ("=", "5") and a chat template."""
    tj = tokenizer_json()
    tj["model"]["vocab"][MERGED] = MERGED_ID
    tj["model"]["merges"] = [["=", "5"]]
    config = tokenizer_config()
    config["chat_template"] = CHAT_TEMPLATE
    config["model_max_length"] = CONTEXT
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


# Llama (rotary positions: a shift of every position changes nothing) with both attention
# implementations, and GPT-2 (learned absolute positions: left padding is only right when each
# row's positions start at its first real token)
MODELS = [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "eager")]


@pytest.fixture(scope="module", params=MODELS, ids=["-".join(m) for m in MODELS])
def causal_lm(request, tmp_path_factory, transformers):
    arch, attention = request.param
    folder = tmp_path_factory.mktemp(f"{arch}-{attention}")
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=len(VOCAB) + 1,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=CONTEXT,
            initializer_range=0.3,  # logits far from uniform
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    else:
        config = transformers.GPT2Config(
            vocab_size=len(VOCAB) + 1, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3
        )
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    write_tokenizer(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attention
    ).eval()
    plain = transformers.AutoTokenizer.from_pretrained(folder)
    _write_boundary_tokenizer(folder / "boundary")
    boundary = transformers.AutoTokenizer.from_pretrained(folder / "boundary")
    return model, plain, boundary


@pytest.mark.integration
def test_equals_a_direct_forward_on_each_sequence_alone(causal_lm):
    model, tok, _ = causal_lm
    got = score_completions(model, tok, PAIRS, batch_size=3)
    for (prompt, completion), lp in zip(PAIRS, got):
        ids, start = encode(prompt + completion), len(encode(prompt))  # the demo's own ids
        assert tokenize_pair(tok, prompt, completion).ids == tuple(ids)
        assert lp.dtype == torch.float32 and lp.shape == (len(completion),)
        torch.testing.assert_close(lp, _reference(model, ids, start), rtol=0, atol=1e-5)
    assert all(bool((lp < 0).all()) for lp in got)


@pytest.mark.integration
def test_right_padding_left_padding_and_one_by_one_agree(causal_lm):
    model, tok, _ = causal_lm
    right = score_completions(model, tok, PAIRS, batch_size=len(PAIRS), padding_side="right")
    left = score_completions(model, tok, PAIRS, batch_size=len(PAIRS), padding_side="left")
    alone = score_completions(model, tok, PAIRS, batch_size=1)
    for r, lf, a in zip(right, left, alone):
        torch.testing.assert_close(r, a, rtol=0, atol=1e-5)
        torch.testing.assert_close(lf, a, rtol=0, atol=1e-5)
    again = score_completions(model, tok, PAIRS, batch_size=len(PAIRS), padding_side="left")
    assert all(torch.equal(x, y) for x, y in zip(left, again))  # deterministic


@pytest.mark.integration
def test_chat_prompt_is_rendered_with_the_template(causal_lm):
    model, _, tok = causal_lm  # the boundary tokenizer has the chat template
    chat = [{"role": "user", "content": "12+30"}]
    pair = tokenize_pair(tok, chat, "42")
    assert pair.ids == tuple(encode("12+30=42")) and pair.start == len(encode("12+30="))
    (got,) = score_completions(model, tok, [(chat, "42")])
    torch.testing.assert_close(got, _reference(model, list(pair.ids), pair.start), rtol=0, atol=1e-5)
    (plain,) = score_completions(model, tok, [("12+30=", "42")])
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_chat_prompt_needs_a_chat_template(causal_lm):
    model, tok, _ = causal_lm
    with pytest.raises(
        InputError, match="rollouts.jsonl: line 2: a chat prompt .* needs a tokenizer with a chat template"
    ):
        score_completions(model, tok, [([{"role": "user", "content": "1"}], "2")], labels=["rollouts.jsonl: line 2"])


@pytest.mark.integration
def test_a_token_merged_across_the_boundary_is_scored_from_where_the_ids_differ(causal_lm):
    model, _, tok = causal_lm
    assert tok("2+3=5", add_special_tokens=True)["input_ids"][-1] == MERGED_ID  # the merge happens
    for completion, scored in (("5", [MERGED_ID]), ("56", [MERGED_ID, VOCAB["6"]])):
        pair = tokenize_pair(tok, "2+3=", completion)
        prompt_ids = encode("2+3=")
        assert pair.prompt_length == len(prompt_ids) == 5
        assert pair.ids == (*prompt_ids[:-1], *scored)  # "=" absorbed by the merged token
        assert pair.start == len(prompt_ids) - 1 and pair.scored_count == len(scored)
        (got,) = score_completions(model, tok, [("2+3=", completion)])
        torch.testing.assert_close(got, _reference(model, list(pair.ids), pair.start), rtol=0, atol=1e-5)
    # a batch mixing merged and unmerged boundaries, either padding side, equals one by one
    items = [("2+3=", "5"), ("2+3=", "6"), ("12+3=", "56"), ("1+1=", "2")]
    alone = score_completions(model, tok, items, batch_size=1)
    for side in ("right", "left"):
        batch = score_completions(model, tok, items, batch_size=4, padding_side=side)
        for b, a in zip(batch, alone):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_empty_and_too_long_completions_are_refused_naming_the_item(causal_lm):
    model, tok, _ = causal_lm
    with pytest.raises(InputError, match="^data.jsonl: line 3: empty completion"):
        score_completions(
            model, tok, [("1+1=", "2"), ("1+1=", "")], labels=["data.jsonl: line 1", "data.jsonl: line 3"]
        )
    with pytest.raises(
        InputError,
        match=f"^item 1: prompt \\+ completion are {CONTEXT + 6} tokens, past the model's context of {CONTEXT}",
    ):
        score_completions(model, tok, [("1+1=", "2"), ("1+1=", "1" * (CONTEXT + 1))])


@pytest.mark.integration
def test_special_tokens_after_a_text_are_not_scored(causal_lm, transformers, tmp_path):
    """A tokenizer that appends `</s>` to every text (add_eos_token): the sequence is `<s>` +
    prompt + completion, without the `</s>`, so only the completion's own tokens are scored."""
    model, plain, _ = causal_lm
    tj = tokenizer_json()
    eos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    tj["post_processor"]["single"].append(eos)
    tj["post_processor"]["special_tokens"]["</s>"] = {"id": "</s>", "ids": [VOCAB["</s>"]], "tokens": ["</s>"]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config()))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok("12", add_special_tokens=True)["input_ids"] == [*encode("12"), VOCAB["</s>"]]  # it appends </s>
    pair = tokenize_pair(tok, "12+30=", "42")
    assert pair.ids == tuple(encode("12+30=42")) and pair.start == len(encode("12+30="))
    got = score_completions(model, tok, [("12+30=", "42"), ("", "3")])
    torch.testing.assert_close(got, score_completions(model, plain, [("12+30=", "42"), ("", "3")]), rtol=0, atol=0)


@pytest.mark.integration
def test_rollouts_file_scored_in_order_with_errors_naming_its_lines(causal_lm, tmp_path):
    model, _, tok = causal_lm  # the boundary tokenizer has the chat template
    lines = [
        {"id": "a", "prompt": "12+30=", "completion": "42"},
        {"messages": [{"role": "user", "content": "7+7"}], "completion": "14"},
    ]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = score_rollouts(model, tok, read_rollouts(path), str(path), batch_size=2)
    want = score_completions(model, tok, [("12+30=", "42"), ("7+7=", "14")], batch_size=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    path.write_text(path.read_text() + json.dumps({"prompt": "1=", "completion": "1" * CONTEXT}) + "\n")
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: line 3: prompt \\+ completion are"):
        score_rollouts(model, tok, read_rollouts(path), str(path))


@pytest.mark.integration
def test_without_a_bos_token_an_empty_prompt_is_refused(causal_lm, transformers, tmp_path):
    model, _, _ = causal_lm
    tj = tokenizer_json()
    tj["post_processor"] = None  # no <s> before a text (as Qwen's tokenizers)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config()))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    pair = tokenize_pair(tok, "12+3=", "15")
    assert pair.ids == tuple(encode("12+3=15", bos=False)) and pair.start == 5
    (got,) = score_completions(model, tok, [("12+3=", "15")])
    torch.testing.assert_close(got, _reference(model, list(pair.ids), 5), rtol=0, atol=1e-5)
    with pytest.raises(InputError, match="^item 0: the first completion token has nothing before it"):
        score_completions(model, tok, [("", "15")])
