"""ReGroundCallback inside a real TRL GRPOTrainer (docs/reground.md): a tiny Llama built by
transformers, the demo tokenizer, a toy reward, CPU. Jumps happen at the right global steps,
training continues, a checkpoint saved at a jump reloads with transformers and holds the jumped
weights (against an independent float64 two-point line through the weights a probe callback read
before the jump), trainer_state.json records the jumps; an absurd limit skips the jump and says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from rank1tools.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB, write_tokenizer  # noqa: E402
from rank1tools.integrations.trl import ReGroundCallback  # noqa: E402

NORM = "norm.weight"  # every norm weight of the tiny Llama ends so (input_layernorm, model.norm, ...)


class Probe(transformers.TrainerCallback):
    """The weights (float64 numpy) at each on_step_end, read where the probe sits in the list."""

    def __init__(self):
        self.seen: dict[int, dict[str, np.ndarray]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen[state.global_step] = _weights(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen[state.global_step] = _weights(model)


def _weights(model) -> dict[str, np.ndarray]:
    return {n: p.detach().to(torch.float64).numpy().copy() for n, p in model.named_parameters()}


def _grpo(tmp_path, callbacks, max_steps=5):
    write_tokenizer(tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    data = datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4=", "5+5=", "2+2="] * 4})

    def ones(completions, **kwargs):  # a toy reward: how many "1" the completion holds
        return [float(c.count("1")) for c in completions]

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=ones, args=args, train_dataset=data, processing_class=tok, callbacks=callbacks
    )
    trainer.train()
    return trainer


def _jumps(log_history) -> list[dict]:
    return [r for r in log_history if "reground/jumped" in r]


def test_grpo_jumps_checkpoints_and_log(tmp_path):
    before, after = Probe(), Probe()
    cb = ReGroundCallback(2, 2)  # α = 2: jumps at global steps 2 and 4
    trainer = _grpo(tmp_path, [before, cb, after])
    assert trainer.state.global_step == 5  # training continued after the jumps
    assert [j["step"] for j in cb.jumps] == [2, 4] and all(j["jumped"] for j in cb.jumps)
    assert [j["virtual_step"] for j in cb.jumps] == [4, 8]
    for step, start in ((2, 0), (4, 2)):
        origin = after.seen[start] if start else before.seen[0]  # the segment starts at the last jump
        want = {n: v if n.endswith(NORM) else origin[n] + 2.0 * (v - origin[n]) for n, v in before.seen[step].items()}
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / f"checkpoint-{step}"))
        for n, p in loaded.named_parameters():
            got = p.detach().to(torch.float64).numpy()
            scale = np.abs(want[n] - origin[n]).max()
            tol = 1e-6 * scale + np.spacing(np.abs(want[n]).astype(np.float32)).astype(np.float64)
            assert (np.abs(got - want[n]) <= tol).all(), f"checkpoint-{step} {n}"
            np.testing.assert_array_equal(got, after.seen[step][n])  # the live weights after the jump
        moved = [n for n in want if not n.endswith(NORM)]
        assert any(np.abs(want[n] - before.seen[step][n]).max() > 0 for n in moved)  # the jump moved them
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    recs = _jumps(state["log_history"])
    assert [(r["step"], r["reground/jumped"], r["reground/alpha"]) for r in recs] == [(2, True, 2.0), (4, True, 2.0)]
    assert all(r["reground/predicted_norm_ratio"] == pytest.approx(2.0, rel=1e-9) for r in recs)
    assert all(r["reground/actual_norm_ratio"] == pytest.approx(2.0, rel=1e-5) for r in recs)


def test_grpo_guard_skips_and_says_so(tmp_path, caplog):
    before, after = Probe(), Probe()
    cb = ReGroundCallback(2, 2, flag_ratio=0.1)  # limit 0.2x the segment's update: α = 2 is "absurd"
    with caplog.at_level("WARNING", logger="rank1tools.reground"):
        trainer = _grpo(tmp_path, [before, cb, after], max_steps=2)
    (r,) = _jumps(trainer.state.log_history)
    assert r["reground/jumped"] is False and "above 0.2x" in r["reground/skipped"]
    assert all(np.array_equal(before.seen[2][n], after.seen[2][n]) for n in before.seen[2])  # untouched
    assert "step 2: jump skipped" in caplog.text
