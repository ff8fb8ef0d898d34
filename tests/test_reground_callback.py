"""ReGroundCallback (docs/reground.md) in a real transformers Trainer whose "optimizer" moves every
weight on an exact straight line θ_k = θ₀ + k·D (dyadic values: exact in float32): after a jump of
N the weights are the line at the virtual step, norm weights keep their trained value, checkpoints
saved after a jump reload with transformers and hold the jumped weights, trainer_state.json records
the jumps; N = 0 is plain training bit for bit; the guard skips an absurd lstsq jump and says so;
the optimizer's moments are kept or reset; bad options and distributed settings are refused."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rank1tools.errors import UsageError  # noqa: E402
from rank1tools.integrations.trl import ReGroundCallback  # noqa: E402

NORMS = ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight")


def _model(seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # dyadic: every point of the planted lines is exact in float32
            p.copy_(torch.round(p * 64) / 64)
    return model


def _direction(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: torch.randint(-8, 9, p.shape, generator=g).float() / 1024 for n, p in model.named_parameters()}


class LineOptimizer(torch.optim.Optimizer):
    """Each step adds `scale[k]`·D to every parameter (default 1: θ_k = θ₀ + k·D)."""

    def __init__(self, model, direction, scale=None):
        self.names = {p: n for n, p in model.named_parameters()}
        super().__init__(model.parameters(), {"lr": 1.0})
        self.direction, self.scale, self.k = direction, scale, 0

    @torch.no_grad()
    def step(self, closure=None):
        f = 1.0 if self.scale is None else self.scale[self.k]
        self.k += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(f * self.direction[self.names[p]])


def _data(n=16):
    ids = torch.arange(n * 6).reshape(n, 6) % 16
    return [{"input_ids": r, "labels": r} for r in ids]


def _train(tmp_path, model, callbacks, max_steps, optimizer=None, save_steps=None):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_data(),
        callbacks=callbacks,
        optimizers=(optimizer, None) if optimizer is not None else (None, None),
    )
    trainer.train()
    return trainer


def _jumps(log_history) -> list[dict]:
    return [r for r in log_history if "reground/jumped" in r]


@pytest.mark.parametrize("method", ["two-point", "lstsq"])
def test_jumps_land_on_the_planted_line(tmp_path, method):
    model = _model()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    D = _direction(model)
    cb = ReGroundCallback(4, 12, method=method, snapshots=2)  # α = 4: jumps at steps 4 and 8
    trainer = _train(tmp_path, model, [cb], 9, LineOptimizer(model, D), save_steps=4)
    # step 4: 4D -> 16D; steps 5..8: 20D -> 32D; step 9: 33D (the virtual step)
    for n, p in model.named_parameters():
        k = 9 if n in NORMS else 33  # norm weights keep their trained value at each jump
        assert torch.equal(p.detach(), theta0[n] + k * D[n]), n
    recs = _jumps(trainer.state.log_history)
    assert [r["step"] for r in recs] == [4, 8] and all(r["reground/jumped"] for r in recs)
    assert [r["reground/virtual_step"] for r in recs] == [16, 32]
    assert cb.jumped_steps == 24 and [j["step"] for j in cb.jumps] == [4, 8]
    moved = sum(float((4 * D[n].double()).square().sum()) for n in D if n not in NORMS) ** 0.5
    r = recs[0]
    assert r["reground/alpha"] == 4.0 and r["reground/method"] == method and r["reground/skipped"] is None
    assert r["reground/update_norm_before"] == pytest.approx(moved, rel=1e-12)
    assert r["reground/update_norm_after"] == pytest.approx(4 * moved, rel=1e-12)
    assert r["reground/predicted_norm_ratio"] == pytest.approx(4.0, rel=1e-12)
    assert r["reground/actual_norm_ratio"] == pytest.approx(4.0, rel=1e-12)
    # the checkpoint saved at step 4 (after the jump) reloads with transformers and holds 16D
    ck = tmp_path / "run" / "checkpoint-4"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(ck))
    for n, p in loaded.named_parameters():
        assert torch.equal(p.detach(), theta0[n] + (4 if n in NORMS else 16) * D[n]), n
    state = json.loads((ck / "trainer_state.json").read_text())
    assert [r["reground/virtual_step"] for r in _jumps(state["log_history"])] == [16]
    final = json.loads((tmp_path / "run" / "checkpoint-8" / "trainer_state.json").read_text())
    assert [r["step"] for r in _jumps(final["log_history"])] == [4, 8]


def test_resumed_run_starts_a_segment_and_counts_earlier_jumps(tmp_path):
    """Resumed from the checkpoint saved at the first jump (16D): the same weights and virtual
    steps as the uninterrupted run."""
    model = _model()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    D = _direction(model)
    _train(tmp_path, model, [ReGroundCallback(4, 12)], 5, LineOptimizer(model, D), save_steps=4)
    resumed = _model()
    cb = ReGroundCallback(4, 12)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=9, per_device_train_batch_size=2, report_to=[], use_cpu=True
    )
    trainer = transformers.Trainer(
        model=resumed, args=args, train_dataset=_data(), callbacks=[cb], optimizers=(LineOptimizer(resumed, D), None)
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    for n, p in resumed.named_parameters():
        assert torch.equal(p.detach(), theta0[n] + (9 if n in NORMS else 33) * D[n]), n
    assert [(j["step"], j["virtual_step"]) for j in cb.jumps] == [(8, 32)] and cb.jumped_steps == 24


def test_extrapolated_norms_and_matrices_only(tmp_path):
    model = _model()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    D = _direction(model)
    _train(tmp_path, model, [ReGroundCallback(2, 2, norms="extrapolate")], 3, LineOptimizer(model, D))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[n] + 5 * D[n]), n  # 2D -> 4D, then 5D: norms too
    model = _model()
    _train(tmp_path / "m", model, [ReGroundCallback(2, 2, tensors="matrices")], 3, LineOptimizer(model, D))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[n] + (5 if p.ndim == 2 else 3) * D[n]), n


def test_zero_jump_is_plain_training_bit_for_bit(tmp_path):
    plain, cb = _model(), _model()
    _train(tmp_path / "plain", plain, [], 5)  # AdamW: a real optimizer
    _train(tmp_path / "cb", cb, [ReGroundCallback(2, 0)], 5)
    a, b = plain.state_dict(), cb.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], _model().state_dict()["model.norm.weight"])  # it trained


def test_guard_skips_an_absurd_jump(tmp_path, caplog):
    """lstsq through offsets 2 and 4 of a path that goes out (8D) and comes back (to 1D): the line
    predicts -41D at offset 16, 41x the segment's update, above the limit 4 x 4: skipped."""
    model = _model()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    D = _direction(model)
    cb = ReGroundCallback(4, 12, method="lstsq", snapshots=2)
    with caplog.at_level(logging.WARNING, logger="rank1tools.reground"):
        trainer = _train(tmp_path, model, [cb], 4, LineOptimizer(model, D, scale=[4, 4, -3, -4]))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[n] + D[n]), n  # untouched
    (r,) = _jumps(trainer.state.log_history)
    assert r["reground/jumped"] is False and r["reground/virtual_step"] == 4 and cb.jumped_steps == 0
    assert r["reground/norm_ratio_limit"] == 16.0
    assert r["reground/max_tensor_norm_ratio"] == pytest.approx(41.0, rel=1e-9)
    assert "predict an update norm above 16x" in r["reground/skipped"]
    assert "jump skipped" in caplog.text and "step 4" in caplog.text


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_moments_kept_or_reset(reset):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cb = ReGroundCallback(2, 2, reset_optimizer=reset)
    args = SimpleNamespace(world_size=1, deepspeed=None, fsdp=None)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    x = torch.arange(12).reshape(2, 6) % 16
    for step in (1, 2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        state.global_step = step
        cb.on_step_end(args, state, control, model=model, optimizer=opt)
    assert (len(opt.state) == 0) == reset
    assert cb.jumps[0]["jumped"] and cb.jumps[0].get("optimizer_reset", False) == reset


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"train_steps": 0, "jump_steps": 1}, "train_steps must be an integer >= 1, got 0"),
        ({"train_steps": 2, "jump_steps": -1}, "jump_steps must be an integer >= 0, got -1"),
        ({"train_steps": 2.5, "jump_steps": 1}, "train_steps must be an integer >= 1, got 2.5"),
        ({"train_steps": 2, "jump_steps": 1, "method": "cubic"}, "method must be one of two-point, lstsq"),
        ({"train_steps": 2, "jump_steps": 1, "norms": "keep"}, "norms must be one of copy, extrapolate"),
        ({"train_steps": 2, "jump_steps": 1, "tensors": "some"}, "tensors must be one of all, matrices"),
        ({"train_steps": 3, "jump_steps": 1, "method": "lstsq", "snapshots": 4}, "snapshots must be between 2"),
        ({"train_steps": 3, "jump_steps": 1, "flag_ratio": 0}, "flag_ratio must be a number greater than 0"),
    ],
)
def test_bad_options_one_line(kw, needle):
    with pytest.raises(UsageError) as e:
        ReGroundCallback(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_nothing_to_extrapolate_is_refused():
    model = _model()
    for n, p in model.named_parameters():
        p.requires_grad_(n in NORMS)  # only norm weights train, and norms="copy" keeps them
    args = SimpleNamespace(world_size=1, deepspeed=None, fsdp=None)
    with pytest.raises(
        UsageError, match=r"no trainable floating-point parameter to extrapolate \(tensors='all', norms='copy'\)"
    ):
        ReGroundCallback(2, 2).on_train_begin(
            args, transformers.TrainerState(), transformers.TrainerControl(), model=model
        )


@pytest.mark.parametrize(
    "args,setting",
    [
        ({"deepspeed": "ds.json"}, "DeepSpeed"),
        ({"fsdp": True}, "FSDP"),
        ({"world_size": 4}, "4 processes"),
    ],
)
def test_distributed_settings_refused(args, setting):
    cb = ReGroundCallback(2, 2)
    ns = SimpleNamespace(**{"world_size": 1, "deepspeed": None, "fsdp": None, **args})
    for event in (cb.on_init_end, cb.on_train_begin):
        with pytest.raises(UsageError) as e:
            event(ns, transformers.TrainerState(), transformers.TrainerControl(), model=_model())
        msg = str(e.value)
        assert f"this run uses {setting}" in msg and "rank1 extrapolate --method linear" in msg and "\n" not in msg


def test_without_transformers_the_import_says_what_to_install():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import rank1tools.integrations.trl\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("UsageError ") and "pip install 'rank1tools[model]'" in r.stdout
    assert r.stdout.count("\n") == 1
