"""Train the demo run: supervised warm-up to partial accuracy (the base), then GRPO with checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoints import (
    METRICS_FILE,
    REWARD_NAME,
    STATE_FILE,
    trainer_state,
    write_metrics,
    write_model_folder,
    write_state,
)
from .config import DemoTraining, TrainedRun
from .grpo import clip_fraction, clipped_objective, completion_logprobs, group_advantages, sample
from .model import TinyLlama, load_weights, parameter_count
from .task import AdditionTask, accuracy, rewards

# Distinct random streams per purpose, all derived from config.seed.
_INIT, _SFT, _GRPO = 1, 2, 3


def _generator(seed: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + purpose)


def new_model(config: DemoTraining) -> TinyLlama:
    model = TinyLlama(config.model_config())
    model.init_weights(_generator(config.seed, _INIT), config.init_std)
    return model


def make_task(config: DemoTraining) -> AdditionTask:
    return AdditionTask(config.digits, config.seed, config.eval_size)


def supervised_warmup(
    model: TinyLlama, task: AdditionTask, config: DemoTraining, progress: Callable[[str], None]
) -> int:
    """Cross-entropy on the answer tokens until the accuracy on the first sft_eval_size held-out
    problems reaches config.sft_target (checked every sft_eval_every steps) or sft_max_steps;
    returns the number of steps taken."""
    gen = _generator(config.seed, _SFT)
    opt = torch.optim.AdamW(model.parameters(), lr=config.sft_lr, betas=(0.9, 0.98), weight_decay=0.0)
    acc, step = 0.0, 0
    model.train()
    while step < config.sft_max_steps:
        step += 1
        for group in opt.param_groups:
            group["lr"] = config.sft_lr * min(1.0, step / max(1, config.sft_warmup))
        prompts, answers = task.sample(config.sft_batch, gen)
        seq = torch.cat([prompts, answers], dim=1)
        logits = model(seq[:, :-1])[:, prompts.shape[1] - 1 :]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % config.sft_eval_every == 0 or step == config.sft_max_steps:
            acc = accuracy(model, task, limit=config.sft_eval_size)
            if step % (10 * config.sft_eval_every) == 0:
                progress(f"warm-up step {step}: loss {loss.item():.3f}, held-out accuracy {acc:.3f}")
            if acc >= config.sft_target:
                break
    return step


def grpo_step(
    model: TinyLlama, opt: torch.optim.Optimizer, task: AdditionTask, config: DemoTraining, gen: torch.Generator
) -> dict:
    """One GRPO iteration: sample grpo_prompts x grpo_group completions, score them, optimise the
    clipped objective over the batch in grpo_passes passes. Returns TRL-named statistics."""
    prompts, answers = task.sample(config.grpo_prompts, gen)
    prompts = prompts.repeat_interleave(config.grpo_group, dim=0)
    answers = answers.repeat_interleave(config.grpo_group, dim=0)
    model.eval()
    completions, old_logp = sample(model, prompts, task.answer_len, gen, config.temperature)
    model.train()
    r = rewards(completions, answers)
    grouped = r.view(config.grpo_prompts, config.grpo_group)
    adv = group_advantages(grouped).reshape(-1)
    n = len(prompts)
    size = -(-n // config.grpo_minibatches)
    losses, norms, clipped = [], [], []
    for _ in range(config.grpo_passes):
        for start in range(0, n, size):
            rows = torch.arange(start, min(n, start + size))
            # completions with A = 0 (groups whose rewards are all equal) add exactly zero to the
            # objective and its gradient: leave them out of the forward pass, keep them in the mean
            active = rows[adv[rows] != 0]
            opt.zero_grad(set_to_none=False)
            if len(active):
                logp = completion_logprobs(model, prompts[active], completions[active], config.temperature)
                loss = clipped_objective(
                    logp, old_logp[active], adv[active], config.clip_eps, tokens=len(rows) * task.answer_len
                )
                loss.backward()
                clipped.append(
                    clip_fraction(logp.detach(), old_logp[active], adv[active], config.clip_eps)
                    * len(active)
                    / len(rows)
                )
                losses.append(loss.item())
            else:
                losses.append(0.0)
                clipped.append(0.0)
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)))
            opt.step()
    r64 = grouped.double()
    group_std = r64.std(dim=1)
    return {
        "loss": sum(losses) / len(losses),
        "grad_norm": sum(norms) / len(norms),
        "learning_rate": config.grpo_lr,
        "reward": float(r64.mean()),
        "reward_std": float(group_std.mean()),  # TRL: the mean over groups of the group std
        f"rewards/{REWARD_NAME}/mean": float(r64.mean()),
        f"rewards/{REWARD_NAME}/std": float(r64.std()),
        "frac_reward_zero_std": float((group_std == 0).float().mean()),
        "clip_ratio/region_mean": sum(clipped) / len(clipped),
        "completions/mean_length": float(task.answer_len),
        "num_tokens": n * (prompts.shape[1] + task.answer_len),
    }


@contextmanager
def torch_threads(n: int):
    """Run with n torch CPU threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_demo_run(folder: Path, config: DemoTraining, progress: Callable[[str], None] | None = None) -> TrainedRun:
    """Train the warm-up base and the GRPO run into folder/base and folder/run (see checkpoints.py);
    existing files there are overwritten. `progress` receives short lines about the training."""
    with torch_threads(config.threads):
        return _train(Path(folder), config, progress or (lambda line: None))


def _train(folder: Path, config: DemoTraining, say: Callable[[str], None]) -> TrainedRun:
    start = time.perf_counter()
    task = make_task(config)
    model = new_model(config)
    say(
        f"policy: Llama with {parameter_count(model):,} parameters; task: "
        f"{config.digits}-digit addition, {config.eval_size} held-out problems"
    )

    sft_steps = supervised_warmup(model, task, config, say)
    base_acc = accuracy(model, task)
    base = folder / "base"
    write_model_folder(base, model)
    say(f"base: warm-up stopped at step {sft_steps}, held-out accuracy {base_acc:.3f}")

    run = folder / "run"
    steps, accs = grpo_training(model, task, config, run, base_acc, say)
    write_metrics(run / METRICS_FILE, accs)
    return TrainedRun(
        base=base,
        run=run,
        steps=steps,
        metrics=run / METRICS_FILE,
        accuracy=accs,
        train_seconds=time.perf_counter() - start,
        sft_steps=sft_steps,
    )


def grpo_training(
    model: TinyLlama,
    task: AdditionTask,
    config: DemoTraining,
    run: Path,
    base_acc: float,
    say: Callable[[str], None],
    after_step: Callable[[int, TinyLlama], list[dict]] | None = None,
) -> tuple[list[int], dict[int, float]]:
    """config.grpo_steps GRPO steps from `model` (the warm-up base, held-out accuracy base_acc) with
    a fresh Adam and the seed's GRPO stream, a checkpoint every save_every steps into `run`
    (checkpoint-N/, trainer_state.json). `after_step(step, model)`, when given, runs after each
    step's optimizer updates and before its checkpoint (re-grounding: demo/reground.py); the
    records it returns join the log history. Returns the checkpoint steps and step -> accuracy."""
    run.mkdir(parents=True, exist_ok=True)
    gen = _generator(config.seed, _GRPO)
    opt = torch.optim.Adam(model.parameters(), lr=config.grpo_lr, betas=(0.9, 0.99))
    batch = config.grpo_prompts * config.grpo_group
    accs = {0: base_acc}
    history: list[dict] = [{"epoch": 0.0, "eval_accuracy": base_acc, "step": 0}]
    tokens = 0
    steps: list[int] = []
    state: dict = {}
    for step in range(1, config.grpo_steps + 1):
        stats = grpo_step(model, opt, task, config, gen)
        tokens += stats["num_tokens"]
        epoch = round(step * config.grpo_prompts / len(task.train_pairs), 6)
        history.append({**stats, "epoch": epoch, "step": step})
        if after_step is not None:
            history.extend(after_step(step, model))
        if step % config.save_every == 0 or step == config.grpo_steps:
            acc = accuracy(model, task)
            accs[step] = acc
            history.append({"epoch": epoch, "eval_accuracy": acc, "step": step})
            ck = run / f"checkpoint-{step}"
            write_model_folder(ck, model)
            state = trainer_state(history, step, config.grpo_steps, config.save_every, batch, epoch, tokens)
            write_state(ck / STATE_FILE, state)
            steps.append(step)
            say(f"GRPO step {step}/{config.grpo_steps}: reward {stats['reward']:.3f}, held-out accuracy {acc:.3f}")
    write_state(run / STATE_FILE, state)
    return steps, accs


def evaluate_checkpoint(folder: str | Path, config: DemoTraining) -> float:
    """Held-out greedy exact-match accuracy (the set fixed by config.seed) of any HF Llama folder
    or .safetensors file holding the demo model's tensors (single or sharded, any float dtype,
    lm_head tied or stored)."""
    with torch_threads(config.threads):
        model = TinyLlama(config.model_config())
        load_weights(model, folder)
        return accuracy(model, make_task(config))
