"""Logit extrapolation (engine/logit_extrapolation.py, engine/sampling.py, engine/extrapolated_model.py)
against transformers' own greedy `generate` and full forward passes without a cache
(docs/concepts.md#logit-extrapolation)."""

from __future__ import annotations

import pytest
import torch

from rank1tools.demo.tokenizer import VOCAB, write_tokenizer
from rank1tools.engine.logit_extrapolation import LogitExtrapolation, extrapolation_alpha, prompt_token_ids
from rank1tools.engine.sampling import SamplingOptions, choose_token, sequence_generator
from rank1tools.errors import InputError, UsageError

pytestmark = pytest.mark.integration

PROMPTS = ["1+2=", "12+30=", "7", "999+1=", "5+5=", "3", "44+4=8"]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _llama(transformers, seed: int, vocab: int = len(VOCAB)):
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(transformers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return _llama(transformers, 0), _llama(transformers, 1), tokenizer


def _hf_greedy(model, tokenizer, prompt: str, max_new: int) -> list[int]:
    ids = torch.tensor([prompt_token_ids(tokenizer, prompt)])
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=2, pad_token_id=0)
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(2)] if 2 in new else new


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_0_and_1_are_model_a_and_model_b_greedy(models, alpha):
    a, b, tok = models
    decoder = LogitExtrapolation(a, b, tok, alpha=alpha)
    got = decoder.generate(PROMPTS, SamplingOptions(max_new_tokens=12), batch_size=4)
    reference = a if alpha == 0.0 else b
    assert [c.token_ids for c in got] == [_hf_greedy(reference, tok, p, 12) for p in PROMPTS]
    assert [c.prompt_index for c in got] == list(range(len(PROMPTS)))


def test_single_model_is_plain_greedy_generate(models):
    _, b, tok = models
    got = LogitExtrapolation.single(b, tok).generate(PROMPTS, SamplingOptions(max_new_tokens=10), batch_size=3)
    assert [c.token_ids for c in got] == [_hf_greedy(b, tok, p, 10) for p in PROMPTS]
    assert all(c.text == tok.decode(c.token_ids) for c in got)
    assert any(1 in c.token_ids and c.text.count("<s>") for c in got)  # special tokens kept in the text


def test_each_step_is_the_formula_over_two_uncached_forwards(models):
    a, b, tok = models
    alpha = 2.5
    decoder = LogitExtrapolation(a, b, tok, alpha=alpha)
    got = decoder.generate(PROMPTS[:4], SamplingOptions(max_new_tokens=8), batch_size=4, keep_logits=True)
    checked = 0
    for c in got:
        prompt = prompt_token_ids(tok, PROMPTS[c.prompt_index])
        assert c.logits.shape == (len(c.token_ids) + (c.finish_reason == "eos"), len(VOCAB))
        for t in range(c.logits.shape[0]):
            ids = prompt + c.token_ids[:t]
            la, lb = _last_logits(a, ids), _last_logits(b, ids)
            torch.testing.assert_close(c.logits[t], la + alpha * (lb - la), rtol=0, atol=1e-5)
            checked += 1
    assert checked >= 10


def test_batch_with_early_finishing_sequences_equals_one_by_one(models):
    a, b, tok = models
    decoder = LogitExtrapolation(a, b, tok, alpha=0.0)  # model A stops early on some prompts
    opts = SamplingOptions(max_new_tokens=12)
    batched = decoder.generate(PROMPTS, opts, batch_size=len(PROMPTS), keep_logits=True)
    reasons = {c.finish_reason for c in batched}
    assert reasons == {"eos", "length"}  # both kinds of finishing in one batch
    for i, prompt in enumerate(PROMPTS):
        alone = decoder.generate([prompt], opts, keep_logits=True)[0]
        assert alone.token_ids == batched[i].token_ids and alone.finish_reason == batched[i].finish_reason
        torch.testing.assert_close(alone.logits, batched[i].logits, rtol=0, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(models):
    a, b, tok = models
    decoder = LogitExtrapolation(a, b, tok, alpha=1.5)
    opts = SamplingOptions(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    runs = [
        [(c.prompt_index, c.sample, c.token_ids) for c in decoder.generate(PROMPTS[:3], opts, n=3, batch_size=bs)]
        for bs in (1, 4, 9)
    ]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(t) for _, _, t in runs[0]}) > 3  # samples differ from one another
    other = decoder.generate(PROMPTS[:3], SamplingOptions(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=8), n=3)
    assert [c.token_ids for c in other] != [t for _, _, t in runs[0]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    gen = sequence_generator(0, 0, 0)
    drawn = {choose_token(logits, SamplingOptions(temperature=1.0, top_p=0.6), gen) for _ in range(200)}
    assert drawn == {1, 2}  # 0.5 < 0.6, so the 0.3 token is kept too; the 0.2 one never
    assert {choose_token(logits, SamplingOptions(temperature=1.0, top_p=0.5), gen) for _ in range(50)} == {1}
    assert choose_token(logits, SamplingOptions()) == 1


def test_alpha_from_steps_and_the_refusals():
    assert extrapolation_alpha(10, 20, 40) == (3.0, None)
    alpha, note = extrapolation_alpha(10, 20, 15)
    assert alpha == 0.5 and "interpolates" in note and "step 20" in note
    assert "goes back past" in extrapolation_alpha(10, 20, 5)[1]
    for a, b in ((20, 20), (30, 20)):
        with pytest.raises(
            UsageError, match=rf"earlier checkpoint's step \({a}\) must be before the later one's \({b}\)"
        ):
            extrapolation_alpha(a, b, 40)


def test_different_vocabularies_are_refused_naming_the_difference(models, transformers, tmp_path):
    a, b, tok = models
    bigger = _llama(transformers, 2, vocab=len(VOCAB) + 1)
    with pytest.raises(
        InputError,
        match=rf"different vocabularies: output embeddings have {len(VOCAB)} rows \(A\) and {len(VOCAB) + 1} rows \(B\)",
    ):
        LogitExtrapolation(a, bigger, tok, alpha=2.0)
    other = tmp_path / "tok2"
    write_tokenizer(other)
    tok2 = transformers.AutoTokenizer.from_pretrained(str(other))
    vocab = tok2.get_vocab()
    tok2 = _Renumbered(
        tok2, {k: (v if k not in ("1", "2") else vocab["2" if k == "1" else "1"]) for k, v in vocab.items()}
    )
    with pytest.raises(InputError, match=r"token '1' has id \d+ in A's tokenizer and id \d+ in B's"):
        LogitExtrapolation(a, b, tok, alpha=2.0, tokenizer_a=tok2)


class _Renumbered:
    """A tokenizer stand-in whose vocabulary maps two tokens the other way round."""

    def __init__(self, tokenizer, vocab):
        self._tokenizer, self._vocab = tokenizer, vocab

    def get_vocab(self):
        return dict(self._vocab)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_prompt_past_the_context_is_refused_naming_it(models):
    a, b, tok = models
    with pytest.raises(InputError, match=r"prompts.jsonl: line 2: the prompt is 70 tokens, leaving no room .* of 64"):
        LogitExtrapolation(a, b, tok, alpha=1.0).generate(
            ["1", "1" * 69],
            SamplingOptions(max_new_tokens=4),
            labels=["prompts.jsonl: line 1", "prompts.jsonl: line 2"],
        )


def test_transformers_generate_runs_the_pair(models):
    from rank1tools.engine.extrapolated_model import extrapolated_model

    a, b, tok = models
    batch = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    width = batch["input_ids"].shape[1]
    for alpha in (0.0, 2.5):
        wrapped = extrapolated_model(a, b, alpha)
        for use_cache in (False, True):
            out = wrapped.generate(
                **batch, max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0, use_cache=use_cache
            )
            got = [row[width:].tolist() for row in out]
            got = [r[: r.index(2)] if 2 in r else r for r in got]
            want = LogitExtrapolation(a, b, tok, alpha=alpha).generate(PROMPTS, SamplingOptions(max_new_tokens=10))
            assert got == [c.token_ids for c in want]
    assert got != [_hf_greedy(a, tok, p, 10) for p in PROMPTS]  # α = 2.5 is not model A


def test_a_completion_is_the_text_its_tokens_add_after_the_prompt(transformers):
    """A SentencePiece-style (Metaspace) tokenizer drops the leading space of a text's first token
    when that token is decoded alone: the completion must be what the tokens add to the prompt's
    text, so that `rank1 logprobs` re-tokenizes prompt + completion into the generated tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from rank1tools.engine.model_scoring import tokenize_pair

    vocab = {"▁a": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "a": 4, "b": 5, "▁": 6, "▁b": 7}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b")], unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    model = _llama(transformers, 0, vocab=len(vocab))
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy takes token 0, "▁a"
    (got,) = LogitExtrapolation.single(model, tok).generate(["b"], SamplingOptions(max_new_tokens=2))
    assert got.token_ids == [0, 0]
    assert tok.decode(got.token_ids) == "a a"  # decoded alone, the first space is lost
    assert got.text == " a a"
    pair = tokenize_pair(tok, "b", got.text)
    assert list(pair.ids[pair.start :]) == got.token_ids
