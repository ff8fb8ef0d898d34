"""`rank1 generate` (commands/generate, cli/generate_commands.py): the file it writes is a rollouts
file (io/rollouts.read_rollouts) whose completions equal the library decoder's and transformers'
own greedy generate; options, prompts and outputs are refused with one line and the right exit
code (docs/commands/generate.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rank1tools.commands.generate.answers import extract_answer, is_correct
from rank1tools.demo.tokenizer import VOCAB, write_tokenizer
from rank1tools.io.rollouts import read_rollouts

from _support import cli_env, run_main

pytestmark = pytest.mark.integration

PROMPTS = [
    {"id": "q1", "prompt": "1+2=", "answer": "3"},
    {"prompt": "12+30=", "answer": 42, "source": "test"},
    {"id": 7, "prompt": "999+1=", "answer": "1000"},
    {"prompt": "5+5=", "answer": "10"},
]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _save(transformers, folder, seed: int, vocab: int = len(VOCAB), tokenizer: bool = True):
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def run(transformers, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    _save(transformers, root / "run" / "checkpoint-20", 0, tokenizer=False)  # weights and config only
    _save(transformers, root / "run" / "checkpoint-40", 1)
    _save(transformers, root / "wide" / "checkpoint-10", 2, vocab=len(VOCAB) + 1)
    _save(transformers, root / "nostep", 1)
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root


def _gen(run, *args) -> tuple[int, str, str]:
    r = run_main("generate", str(run / "run" / "checkpoint-40"), "--prompts", str(run / "prompts.jsonl"), *args)
    return r.returncode, r.stdout, r.stderr


def _greedy(model, tokenizer, prompt: str, alpha_partner=None, alpha: float = 1.0, new: int = 8) -> tuple[str, int]:
    """Greedy decoding by full forward passes without a cache (the independent reference): the
    text (special tokens dropped) and the number of tokens generated before EOS."""
    ids = list(tokenizer(prompt)["input_ids"])
    start = len(ids)
    for _ in range(new):
        with torch.no_grad():
            lb = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            if alpha_partner is not None:
                la = alpha_partner(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
                lb = la + alpha * (lb - la)
        token = int(torch.argmax(lb))
        if token == 2:
            break
        ids.append(token)
    return tokenizer.decode(ids[start:], skip_special_tokens=False), len(ids) - start


def test_extrapolated_generation_writes_rollouts_equal_to_the_formula(run, transformers, tmp_path):
    out = tmp_path / "completions.jsonl"
    extra = ["--extrapolate-from", str(run / "run" / "checkpoint-20"), "--target-step", "60"]
    code, stdout, stderr = _gen(
        run, "--out", str(out), *extra, "--max-new-tokens", "8", "--answer-field", "answer", "--json"
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    rollouts = read_rollouts(out)  # valid input of `rank1 logprobs`
    assert [r.id for r in rollouts] == ["q1", "line-2", 7, "line-4"]
    assert [r.prompt for r in rollouts] == [p["prompt"] for p in PROMPTS]
    a = transformers.AutoModelForCausalLM.from_pretrained(run / "run" / "checkpoint-20").eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(run / "run" / "checkpoint-40").eval()
    tok = transformers.AutoTokenizer.from_pretrained(run / "run" / "checkpoint-40")
    want = [_greedy(b, tok, p["prompt"], a, 2.0) for p in PROMPTS]
    assert [(r.completion, r.extra["completion_tokens"]) for r in rollouts] == want
    for r, p in zip(rollouts, PROMPTS, strict=True):
        g = r.extra["generation"]
        assert (g["alpha"], g["step"], g["step_a"], g["target_step"]) == (2.0, 40, 20, 60.0)
        assert g["tool"].startswith("rank1tools") and g["extrapolate_from"].endswith("checkpoint-20")
        assert r.extra["answer"] == p["answer"] and r.extra["sample"] == 0
        assert r.extra["correct"] == is_correct(r.completion, p["answer"])
    assert result["completions"] == 4 and result["generation"]["alpha"] == 2.0
    assert result["accuracy"] == sum(r.extra["correct"] for r in rollouts) / 4
    assert sum(result["finish_reasons"].values()) == 4
    again = tmp_path / "again.jsonl"
    assert _gen(run, "--out", str(again), *extra, "--max-new-tokens", "8", "--answer-field", "answer")[0] == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic: same inputs, same bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.jsonl", "completions.jsonl"]  # no lock, no staging


def test_plain_generation_is_transformers_greedy(run, transformers, tmp_path):
    out = tmp_path / "plain.jsonl"
    code, stdout, stderr = _gen(run, "--out", str(out), "--max-new-tokens", "6", "--batch-size", "3")
    assert code == 0, stderr
    assert "wrote 4 completions of 4 prompts" in stdout
    b = transformers.AutoModelForCausalLM.from_pretrained(run / "run" / "checkpoint-40").eval()
    tok = transformers.AutoTokenizer.from_pretrained(run / "run" / "checkpoint-40")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    for line, p in zip(lines, PROMPTS, strict=True):
        ids = torch.tensor([tok(p["prompt"])["input_ids"]])
        want = b.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)[0, ids.shape[1] :]
        want = want.tolist()
        assert line["completion"] == tok.decode(want[: want.index(2)] if 2 in want else want)
        assert line["generation"]["alpha"] is None and line["generation"]["extrapolate_from"] is None
    # rank1 logprobs' scoring reads the file on the tokens they were generated from: each greedy
    # token is the argmax, so its teacher-forced log-prob is the largest at its position
    from rank1tools.engine.model_scoring import score_rollouts

    rollouts = read_rollouts(out)
    for r, lp in zip(rollouts, score_rollouts(b, tok, rollouts, str(out)), strict=True):
        ids = tok(r.prompt + r.completion)["input_ids"]
        with torch.no_grad():
            best = torch.log_softmax(b(torch.tensor([ids])).logits[0].float(), -1).max(-1).values
        assert len(lp) == r.extra["completion_tokens"]  # the text re-tokenizes into the generated tokens
        torch.testing.assert_close(lp, best[len(ids) - len(lp) - 1 : -1], rtol=0, atol=1e-5)


def test_samples_are_named_seeded_and_independent_of_the_batch_size(run, tmp_path):
    common = ["--extrapolate-from", str(run / "run" / "checkpoint-20"), "--alpha", "1.5"]
    common += ["--n", "3", "--temperature", "1", "--top-p", "0.95", "--seed", "5", "--max-new-tokens", "6"]
    outs = []
    for bs in ("1", "5"):
        out = tmp_path / f"bs{bs}.jsonl"
        assert _gen(run, "--out", str(out), *common, "--batch-size", bs)[0] == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    rollouts = read_rollouts(tmp_path / "bs1.jsonl")
    assert [r.id for r in rollouts[:3]] == ["q1#0", "q1#1", "q1#2"]
    assert [r.extra["sample"] for r in rollouts[:3]] == [0, 1, 2] and rollouts[3].id == "line-2#0"
    assert {r.extra["generation"]["seed"] for r in rollouts} == {5}
    assert len({r.completion for r in rollouts}) > 4


def test_target_step_before_b_interpolates_with_a_note(run, tmp_path):
    code, _, stderr = _gen(
        run,
        "--out",
        str(tmp_path / "o.jsonl"),
        "--extrapolate-from",
        str(run / "run" / "checkpoint-20"),
        "--target-step",
        "30",
        "--max-new-tokens",
        "2",
    )
    assert code == 0
    assert "note: --target-step 30 is before the later checkpoint (step 40): α = 0.5 interpolates" in stderr
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])["generation"]["alpha"] == 0.5


def test_refusals(run, tmp_path):
    ck20, ck40 = str(run / "run" / "checkpoint-20"), str(run / "run" / "checkpoint-40")
    prompts = str(run / "prompts.jsonl")
    out = str(tmp_path / "o.jsonl")

    def gen(*args):
        r = run_main("generate", *args)
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.returncode, r.stderr

    code, err = gen(ck20, "--prompts", prompts, "--out", out, "--extrapolate-from", ck40, "--target-step", "60")
    assert code == 2 and "earlier checkpoint's step (40) must be before the later one's (20)" in err
    code, err = gen(
        ck40, "--prompts", prompts, "--out", out, "--extrapolate-from", ck20, "--alpha", "2", "--step-a", "40"
    )
    assert code == 2 and "(40) must be before the later one's (40)" in err
    code, err = gen(ck40, "--prompts", prompts, "--out", out, "--extrapolate-from", ck20)
    assert code == 2 and "exactly one of --target-step S and --alpha X" in err
    code, err = gen(ck40, "--prompts", prompts, "--out", out, "--alpha", "2")
    assert code == 2 and "--alpha applies with --extrapolate-from A" in err
    code, err = gen(
        str(run / "nostep"), "--prompts", prompts, "--out", out, "--extrapolate-from", ck20, "--target-step", "9"
    )
    assert code == 2 and "no training step in the path" in err and "--step-b N" in err
    code, err = gen(ck40, "--prompts", prompts, "--out", out, "--top-p", "0")
    assert code == 2 and "--top-p" in err
    wide = str(run / "wide" / "checkpoint-10")
    code, err = gen(ck40, "--prompts", prompts, "--out", out, "--extrapolate-from", wide, "--target-step", "60")
    assert code == 3 and f"different vocabularies: model.embed_tokens.weight has {len(VOCAB) + 1} rows" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+2="}\n{"completion": "3"}\n')
    code, err = gen(ck40, "--prompts", str(bad), "--out", out)
    assert code == 3 and f"{bad}: line 2: expected exactly one of `prompt` and `messages`, found neither" in err
    bad.write_text('{"prompt": "1+2="}\n\n{"prompt": 3\n')
    code, err = gen(ck40, "--prompts", str(bad), "--out", out)
    assert code == 3 and f"{bad}: line 3: unreadable JSON" in err
    code, err = gen(ck40, "--prompts", prompts, "--out", out, "--answer-field", "source")
    assert code == 3 and "line 1: --answer-field 'source': expected a string or a number, found no such field" in err
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "1"}\n{"prompt": "' + "1" * 70 + '"}\n')
    code, err = gen(ck40, "--prompts", str(long), "--out", out)
    assert code == 3 and f"{long}: line 2: the prompt is 71 tokens, leaving no room" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "long.jsonl"]  # nothing written


def test_output_contract(run, tmp_path):
    ck40, prompts = str(run / "run" / "checkpoint-40"), str(run / "prompts.jsonl")
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my notes\n")
    r = run_main("generate", ck40, "--prompts", prompts, "--out", str(mine), "--max-new-tokens", "2")
    assert r.returncode == 4 and "already exists; pass --force" in r.stderr
    r = run_main("generate", ck40, "--prompts", prompts, "--out", str(mine), "--max-new-tokens", "2", "--force")
    assert r.returncode == 4 and "was not written by rank1 (its first line is not JSON)" in r.stderr
    assert mine.read_text() == "my notes\n"
    r = run_main("generate", ck40, "--prompts", prompts, "--out", str(tmp_path), "--max-new-tokens", "2")
    assert r.returncode == 4 and "exists and is not a regular file" in r.stderr
    r = run_main("generate", ck40, "--prompts", prompts, "--out", prompts, "--max-new-tokens", "2", "--force")
    assert r.returncode == 4 and "is an input" in r.stderr
    ours = tmp_path / "ours.jsonl"
    assert run_main("generate", ck40, "--prompts", prompts, "--out", str(ours), "--max-new-tokens", "2").returncode == 0
    first = ours.read_bytes()
    r = run_main("generate", ck40, "--prompts", prompts, "--out", str(ours), "--max-new-tokens", "3", "--force")
    assert r.returncode == 0 and ours.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.jsonl", "ours.jsonl"]


def test_option_errors_import_neither_torch_nor_transformers(tmp_path):
    code = (
        "import json, sys; import rank1tools.cli as c\n"
        "codes = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['rank1', *args]\n"
        "    try:\n        c.main()\n    except SystemExit as e:\n        codes.append(e.code)\n"
        "print(json.dumps([codes, 'torch' in sys.modules or 'transformers' in sys.modules]))"
    )
    cases = [
        [
            "generate",
            "m/checkpoint-20",
            "--prompts",
            "p",
            "--out",
            "o",
            "--extrapolate-from",
            "a/checkpoint-40",
            "--target-step",
            "60",
        ],
        ["generate", "m", "--prompts", "p", "--out", "o", "--temperature", "-1"],
        ["generate", "m", "--prompts", "p", "--out", "o", "--n", "0"],
        ["generate", "m", "--prompts", "p", "--out", "o", "--target-step", "3"],
    ]
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)], cwd=tmp_path, capture_output=True, text=True, env=cli_env()
    )
    codes, imported = json.loads(r.stdout.strip().splitlines()[-1])
    assert codes == [2, 2, 2, 2] and not imported


def test_answer_extraction():
    assert extract_answer("so the sum is \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("first 12, then 1,000.5") == "1,000.5"
    assert extract_answer("\\boxed{3} and later \\boxed{4") == "3"  # the last box that closes
    assert extract_answer("no digits") is None
    assert is_correct("answer: 1,000", 1000) and is_correct("= 42.0", "42") and not is_correct("41", 42)
    assert is_correct("\\boxed{x+1}", " x+1 ") and not is_correct("nothing", "3")


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
)


def _copy(src, dst, names):
    dst.mkdir(parents=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_base_tokenizer_and_chat_prompts(run, transformers, tmp_path):
    ck20, ck40 = run / "run" / "checkpoint-20", run / "run" / "checkpoint-40"
    prompts = str(run / "prompts.jsonl")
    weights_only = _copy(ck20, tmp_path / "w" / "checkpoint-20", ["model.safetensors"])
    r = run_main("generate", str(weights_only), "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 3 and "no config.json beside the weights" in r.stderr
    r = run_main("generate", str(ck20), "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 3 and "cannot load its tokenizer" in r.stderr  # checkpoint-20 has none
    outs = {}
    for name, args in {
        "base": [str(weights_only), "--base", str(ck40)],
        "tokenizer": [str(ck20), "--tokenizer", str(ck40)],
    }.items():
        outs[name] = tmp_path / f"{name}.jsonl"
        r = run_main("generate", *args, "--prompts", prompts, "--out", str(outs[name]), "--max-new-tokens", "5")
        assert r.returncode == 0, r.stderr
    a = transformers.AutoModelForCausalLM.from_pretrained(ck20).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ck40)
    want = [_greedy(a, tok, p["prompt"], new=5)[0] for p in PROMPTS]
    for out in outs.values():  # checkpoint-20's weights, with checkpoint-40's config or tokenizer
        assert [r.completion for r in read_rollouts(out)] == want

    chat = _copy(ck40, tmp_path / "chat" / "checkpoint-40", [p.name for p in ck40.iterdir()])
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    messages = [{"role": "user", "content": "12+3"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"id": "c", "messages": messages}) + "\n")
    out = tmp_path / "chat_out.jsonl"
    r = run_main(
        "generate", str(chat), "--prompts", str(tmp_path / "chat.jsonl"), "--out", str(out), "--max-new-tokens", "5"
    )
    assert r.returncode == 0, r.stderr
    (line,) = read_rollouts(out)
    assert line.chat() == messages
    b = transformers.AutoModelForCausalLM.from_pretrained(ck40).eval()
    chat_tok = transformers.AutoTokenizer.from_pretrained(chat)
    ids = chat_tok(
        chat_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    assert ids["input_ids"][:1] == [1]  # the template writes <s> itself
    gen = b.generate(
        torch.tensor([ids["input_ids"]]), max_new_tokens=5, do_sample=False, eos_token_id=2, pad_token_id=0
    )
    new = gen[0, len(ids["input_ids"]) :].tolist()
    assert line.completion == chat_tok.decode(new[: new.index(2)] if 2 in new else new)


def test_a_tokenizer_of_its_own_must_match(run, tmp_path):
    ck40 = run / "run" / "checkpoint-40"
    other = _copy(ck40, tmp_path / "other" / "checkpoint-20", [p.name for p in ck40.iterdir()])
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    r = run_main(
        "generate", str(ck40), "--prompts", str(run / "prompts.jsonl"), "--out", str(tmp_path / "o.jsonl"),
        "--extrapolate-from", str(other), "--target-step", "60",
    )  # fmt: skip
    assert r.returncode == 3
    assert (
        f"different vocabularies: token '1' has id {vocab['1']} in A's tokenizer and id {vocab['2']} in B's" in r.stderr
    )


@pytest.mark.parametrize(
    "phase,state", [("staged", "nothing was written"), ("publishing", "the output is complete at {out}")]
)
def test_sigterm_leaves_the_old_file_or_the_new_one(run, tmp_path, phase, state):
    from _support import finish_paused, start_paused

    out = tmp_path / "o.jsonl"
    args = ["generate", run / "run" / "checkpoint-40", "--prompts", run / "prompts.jsonl", "--out", out]
    assert run_main(*map(str, args), "--max-new-tokens", "2").returncode == 0
    before = out.read_bytes()
    proc, lines = start_paused([*args, "--max-new-tokens", "3", "--force"], tmp_path, phase)
    r = finish_paused(proc, lines, signal.SIGTERM)
    assert r.returncode == 143, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"rank1: terminated: {state.format(out=out)}"
    assert (out.read_bytes() == before) == (phase == "staged")
    assert len(read_rollouts(out)) == len(PROMPTS)
    assert sorted(os.listdir(tmp_path)) == ["o.jsonl"]  # no staging file, no lock
