"""The demo's GRPO trainer and evaluator (rank1tools.demo): reward, task split, advantages, the
clipped objective, sampling, the files of a run and their readers, determinism. Tiny configs."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.demo import DemoTraining, evaluate_checkpoint, train_demo_run
from rank1tools.demo.grpo import clipped_objective, completion_logprobs, group_advantages, sample
from rank1tools.demo.model import TinyLlama, TinyLlamaConfig, load_weights, save_model
from rank1tools.demo.task import AdditionTask, accuracy, greedy, greedy_correct, reward, rewards
from rank1tools.demo.tokenizer import BOS_ID, VOCAB, decode, encode
from rank1tools.io.metrics import read_metrics
from rank1tools.io.runs import discover_run
from rank1tools.synthetic import write_model

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    layers=1,
    heads=2,
    kv_heads=1,
    eval_size=200,
    sft_eval_size=100,
    sft_max_steps=12,
    sft_eval_every=4,
    sft_target=1.1,
    grpo_prompts=4,
    grpo_group=4,
    grpo_steps=4,
    save_every=2,
)

# transformers' TrainerState fields (transformers/trainer_callback.py), which trainer_state.json mirrors
TRAINER_STATE_FIELDS = {
    "epoch",
    "global_step",
    "max_steps",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "train_batch_size",
    "num_train_epochs",
    "num_input_tokens_seen",
    "total_flos",
    "log_history",
    "best_metric",
    "best_global_step",
    "best_model_checkpoint",
    "is_local_process_zero",
    "is_world_process_zero",
    "is_hyper_param_search",
    "trial_name",
    "trial_params",
    "stateful_callbacks",
}
HF_NAMES = {"model.embed_tokens.weight", "model.norm.weight"} | {
    f"model.layers.0.{m}.weight"
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    )
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    config = DemoTraining(seed=3, **TINY)
    run = train_demo_run(root / "a", config, lines.append)
    return root, config, run, lines


def _random_model(config: TinyLlamaConfig, seed: int = 0, std: float = 0.3) -> TinyLlama:
    model = TinyLlama(config)
    g = torch.Generator().manual_seed(seed)
    model.init_weights(g, std)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


# ---- task and reward ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        ("47+96=", "341", 1.0),  # 143 reversed
        ("47+96=", "143", 0.0),  # not reversed
        ("00+00=", "000", 1.0),
        ("99+99=", "891", 1.0),  # 198
        ("05+05=", "010", 1.0),  # 010 reversed
        ("05+05=", "01", 0.0),  # too short: the answer is zero-padded to digits + 1
        ("05+05=", "0100", 0.0),
        ("047+596=", "3460", 1.0),  # three digits: 0643 reversed
        ("47+96", "341", 0.0),  # no '='
        ("47+6=", "35", 0.0),  # operands of different widths
        ("4a+96=", "341", 0.0),
    ],
)
def test_reward_hand_cases(prompt, completion, expected):
    assert reward(prompt, completion) == expected


def test_task_tokens_match_text_and_reward():
    task = AdditionTask(2, seed=5, eval_size=300)
    pairs = torch.arange(0, 10_000, 37)
    prompts, answers = task.tokens(pairs)
    for pair, p, a in zip(pairs.tolist(), prompts.tolist(), answers.tolist()):
        x, y = divmod(pair, 100)
        text = f"{x:02d}+{y:02d}="
        assert p == encode(text) and p[0] == BOS_ID
        assert decode(a) == str(x + y).zfill(3)[::-1]
        assert reward(text, decode(a)) == 1.0
    assert rewards(answers, answers).tolist() == [1.0] * len(pairs)
    wrong = answers.clone()
    wrong[::2, 1] = (wrong[::2, 1] - VOCAB["0"] + 1) % 10 + VOCAB["0"]
    assert rewards(wrong, answers).tolist() == [0.0 if i % 2 == 0 else 1.0 for i in range(len(pairs))]


def test_held_out_set_is_seeded_and_disjoint_from_training():
    a, b, c = AdditionTask(2, 1, 300), AdditionTask(2, 1, 300), AdditionTask(2, 2, 300)
    assert torch.equal(a.eval_pairs, b.eval_pairs) and not torch.equal(a.eval_pairs, c.eval_pairs)
    held, train = set(a.eval_pairs.tolist()), set(a.train_pairs.tolist())
    assert len(held) == 300 and not held & train and held | train == set(range(10_000))
    g = torch.Generator().manual_seed(0)
    prompts, _ = a.sample(2000, g)
    drawn = {
        int(p[1:3].sub(VOCAB["0"]) @ torch.tensor([10, 1])) * 100 + int(p[4:6].sub(VOCAB["0"]) @ torch.tensor([10, 1]))
        for p in prompts
    }
    assert not drawn & held


def test_teacher_forced_accuracy_is_greedy_decoding():
    model = _random_model(
        TinyLlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    task = AdditionTask(2, 0, 200)
    decoded = greedy(model, task.eval_prompts, task.answer_len)
    assert greedy_correct(model, task.eval_prompts, decoded).all()
    changed = decoded.clone()
    changed[::3, 2] = (changed[::3, 2] + 1) % len(VOCAB)  # the last token: the prefix stays greedy
    changed[1::3, 0] = (changed[1::3, 0] + 1) % len(VOCAB)  # the first token
    expected = [i % 3 == 2 for i in range(len(decoded))]
    assert greedy_correct(model, task.eval_prompts, changed).tolist() == expected


# ---- GRPO -----------------------------------------------------------------------------------------


def test_group_advantages_against_numpy():
    r = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]], dtype=np.float64)
    mean = r.mean(axis=1, keepdims=True)
    std = np.sqrt(((r - mean) ** 2).sum(axis=1, keepdims=True) / (r.shape[1] - 1))  # sample std
    expected = (r - mean) / (std + 1e-4)
    got = group_advantages(torch.tensor(r, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert (got[1] == 0).all()  # all rewards equal: no signal
    np.testing.assert_allclose(got[0], [1 / (np.sqrt(1 / 3) + 1e-4) * s for s in (0.5, -0.5, -0.5, 0.5)], rtol=1e-6)


def test_clipped_objective_value_against_numpy():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(6, 3, generator=g, dtype=torch.float64)
    old = logp + 0.4 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.5, -1.0, 0.0, 0.7, -0.3, 2.0], dtype=torch.float64)
    ratio = np.exp(logp.numpy() - old.numpy())
    a = adv.numpy()[:, None]
    expected = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a).mean()
    assert float(clipped_objective(logp, old, adv, 0.2)) == pytest.approx(expected, rel=1e-12)
    # rows with A = 0 left out, the full count as divisor: the same value
    keep = adv != 0
    assert float(clipped_objective(logp[keep], old[keep], adv[keep], 0.2, tokens=18)) == pytest.approx(
        expected, rel=1e-12
    )


def _logp_grad(advantage: float, log_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the objective w.r.t. the logits of one token's distribution, sampled token 2."""
    logits = torch.tensor([[0.3, -0.2, 0.5, 0.1]], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(logits, dim=-1)[:, 2:3]
    loss = clipped_objective(logp, logp.detach() - log_ratio, torch.tensor([advantage], dtype=torch.float64), 0.2)
    loss.backward()
    return logits, logits.grad


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_gradient_step_moves_the_sampled_token_with_the_advantage(advantage):
    logits, grad = _logp_grad(advantage, 0.0)
    before = torch.log_softmax(logits.detach(), -1)[0, 2]
    after = torch.log_softmax(logits.detach() - 0.1 * grad, -1)[0, 2]
    assert (after - before) * advantage > 0


@pytest.mark.parametrize(
    "advantage, log_ratio, zero",
    [
        (1.0, np.log(1.3), True),  # ratio above 1 + eps, A > 0: clipped
        (-1.0, np.log(0.7), True),  # ratio below 1 - eps, A < 0: clipped
        (1.0, np.log(0.7), False),  # ratio below the band, A > 0: the unclipped term is the minimum
        (-1.0, np.log(1.3), False),
        (1.0, np.log(1.1), False),  # inside the band
    ],
)
def test_clip_stops_the_gradient_only_past_the_band(advantage, log_ratio, zero):
    _, grad = _logp_grad(advantage, log_ratio)
    assert (grad.abs().max() == 0) == zero


def test_sampling_with_cache_gives_the_training_log_probs():
    model = _random_model(
        TinyLlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    task = AdditionTask(2, 0, 100)
    prompts = task.eval_prompts[:50]
    completions, old = sample(model, prompts, 3, torch.Generator().manual_seed(0))
    assert completions.shape == (50, 3)
    torch.testing.assert_close(completion_logprobs(model, prompts, completions).detach(), old, atol=2e-5, rtol=0)
    again, _ = sample(model, prompts, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again, completions)


# ---- model files ----------------------------------------------------------------------------------


def test_state_dict_has_hf_names_and_a_tied_head(tmp_path):
    cfg = TinyLlamaConfig(num_hidden_layers=1)
    model = TinyLlama(cfg)
    assert set(model.state_dict()) == HF_NAMES | {"lm_head.weight"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_model(tmp_path, model)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == HF_NAMES
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]


def test_load_weights_reads_sharded_and_untied_folders(tmp_path):
    cfg = TinyLlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = _random_model(cfg)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ids = AdditionTask(2, 0, 50).eval_prompts
    with torch.no_grad():
        expected = model(ids)
    write_model(tmp_path / "sharded", tensors, cfg.hf_config(), max_shard_size=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    loaded = TinyLlama(cfg)
    load_weights(loaded, tmp_path / "sharded")
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected)
    # a stored head equal to the embedding keeps the tie; a different one is used as the head
    head = torch.randn(tensors["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(9))
    write_model(
        tmp_path / "untied", {**tensors, "lm_head.weight": head}, {**cfg.hf_config(), "tie_word_embeddings": False}
    )
    untied = TinyLlama(cfg)
    load_weights(untied, tmp_path / "untied")
    assert torch.equal(untied.lm_head.weight, head) and not torch.equal(
        untied.lm_head.weight, untied.model.embed_tokens.weight
    )
    with torch.no_grad():
        body = untied.model.norm(
            untied.model.layers[1](
                untied.model.layers[0](
                    untied.model.embed_tokens(ids), untied.rope_cos[: ids.shape[1]], untied.rope_sin[: ids.shape[1]]
                ),
                untied.rope_cos[: ids.shape[1]],
                untied.rope_sin[: ids.shape[1]],
            )
        )
        torch.testing.assert_close(untied(ids), body @ head.T)


# ---- a trained run --------------------------------------------------------------------------------


@pytest.mark.training
def test_run_layout(trained):
    root, config, run, lines = trained
    assert run.base == root / "a" / "base" and run.run == root / "a" / "run"
    assert run.steps == [2, 4] and sorted(run.accuracy) == [0, 2, 4]
    assert run.metrics == run.run / "metrics.csv" and run.train_seconds > 0
    for folder in (run.base, run.run / "checkpoint-2", run.run / "checkpoint-4"):
        names = {p.name for p in folder.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        } <= names
        assert ("trainer_state.json" in names) == (folder != run.base)
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert set(f.keys()) == HF_NAMES
    assert [c.step for c in discover_run(run.run)] == [2, 4]
    assert all(c.problem is None and c.layout == "trl" for c in discover_run(run.run))
    assert any("base" in line for line in lines) and any("GRPO step 4/4" in line for line in lines)


@pytest.mark.training
def test_trainer_state_shape_and_metrics_readers(trained):
    _, config, run, _ = trained
    final = json.loads((run.run / "trainer_state.json").read_text())
    assert final == json.loads((run.run / "checkpoint-4" / "trainer_state.json").read_text())
    assert set(final) == TRAINER_STATE_FIELDS
    assert (final["global_step"], final["max_steps"], final["save_steps"], final["logging_steps"]) == (4, 4, 2, 1)
    assert final["train_batch_size"] == config.grpo_prompts * config.grpo_group
    assert final["best_metric"] is None and isinstance(final["log_history"], list)
    train_rows = [e for e in final["log_history"] if "loss" in e]
    eval_rows = [e for e in final["log_history"] if "eval_accuracy" in e]
    assert [e["step"] for e in train_rows] == [1, 2, 3, 4]
    for e in train_rows:
        assert {"loss", "reward", "reward_std", "grad_norm", "learning_rate", "epoch", "step"} <= set(e)
        assert 0 <= e["reward"] <= 1 and e["reward_std"] >= 0
    assert {e["step"]: e["eval_accuracy"] for e in eval_rows} == run.accuracy
    early = json.loads((run.run / "checkpoint-2" / "trainer_state.json").read_text())
    assert early["global_step"] == 2 and early["log_history"] == [e for e in final["log_history"] if e["step"] <= 2]

    csv = read_metrics(run.metrics)
    assert csv.metric == "accuracy" and csv.values == run.accuracy
    state = read_metrics(run.run / "checkpoint-2" / "trainer_state.json", metric="eval_accuracy")
    assert state.format == "trainer_state" and state.values == {0: run.accuracy[0], 2: run.accuracy[2]}


@pytest.mark.training
def test_evaluate_checkpoint_equals_the_training_evaluation(trained):
    _, config, run, _ = trained
    assert evaluate_checkpoint(run.base, config) == run.accuracy[0]
    for step in run.steps:
        assert evaluate_checkpoint(run.run / f"checkpoint-{step}", config) == run.accuracy[step]
    # and equals an independent in-memory evaluation of the stored weights
    model = TinyLlama(config.model_config())
    load_weights(model, run.run / "checkpoint-4" / "model.safetensors")
    assert accuracy(model, AdditionTask(config.digits, config.seed, config.eval_size)) == run.accuracy[4]


@pytest.mark.training
def test_same_seed_same_bytes(trained, tmp_path):
    root, config, run, _ = trained
    train_demo_run(tmp_path / "b", config)
    a, b = root / "a", tmp_path / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = DemoTraining(seed=4, **TINY)
    train_demo_run(tmp_path / "c", other)
    assert (tmp_path / "c" / "base" / "model.safetensors").read_bytes() != (
        a / "base" / "model.safetensors"
    ).read_bytes()


def test_quick_and_full_configs():
    full, quick = DemoTraining(), DemoTraining.quick(seed=7)
    assert quick.seed == 7 and 4 <= quick.grpo_steps // quick.save_every <= 6
    assert 10 <= full.grpo_steps // full.save_every <= 20
    assert {f.name for f in fields(DemoTraining)} >= {"seed", "grpo_steps", "save_every", "eval_size"}
    params = sum(p.numel() for p in TinyLlama(full.model_config()).parameters())
    assert 500_000 <= params <= 3_000_000
    with pytest.raises(ValueError):
        DemoTraining(grpo_group=1)
