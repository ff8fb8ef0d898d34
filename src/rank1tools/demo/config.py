"""Every knob of the demo's training run, with the defaults of the full run (`quick()`: --quick)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .model import TinyLlamaConfig


@dataclass
class DemoTraining:
    seed: int = 0
    # policy: a Llama of ~0.57 M parameters; weights drawn from N(0, init_std), norms 1
    hidden_size: int = 160
    intermediate_size: int = 432
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    init_std: float = 0.05
    # task: `digits`-digit + `digits`-digit addition; held-out set of eval_size pairs
    digits: int = 2
    eval_size: int = 1000
    # supervised warm-up (cross-entropy on the answer tokens, AdamW, linear warm-up of the
    # learning rate): stops at the first check (every sft_eval_every steps, on the first
    # sft_eval_size held-out problems) whose accuracy reaches sft_target, or at sft_max_steps
    sft_lr: float = 2e-3
    sft_batch: int = 64
    sft_warmup: int = 50
    sft_eval_every: int = 10
    sft_eval_size: int = 250
    sft_target: float = 0.25
    sft_max_steps: int = 1500
    # GRPO: grpo_prompts prompts x grpo_group completions per step, optimised in grpo_passes
    # passes of grpo_minibatches Adam updates each; constant learning rate
    grpo_lr: float = 3e-4
    grpo_prompts: int = 64
    grpo_group: int = 8
    grpo_passes: int = 2
    grpo_minibatches: int = 1
    clip_eps: float = 0.2
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    grpo_steps: int = 48
    save_every: int = 4
    # torch CPU threads while training and evaluating: 1 is fastest as soon as other work shares
    # the cores (several threads then wait on each other). Bytes are reproducible for a given
    # seed, machine and thread count.
    threads: int = 1

    def __post_init__(self):
        if self.grpo_group < 2:
            raise ValueError("grpo_group must be at least 2 (advantages need a group standard deviation)")
        if self.grpo_passes < 1 or self.grpo_minibatches < 1 or self.grpo_steps < 1 or self.save_every < 1:
            raise ValueError("grpo_passes, grpo_minibatches, grpo_steps and save_every must be at least 1")
        if not 0 < self.sft_eval_size <= self.eval_size:
            raise ValueError("sft_eval_size must be in 1..eval_size")

    @classmethod
    def quick(cls, seed: int = 0) -> DemoTraining:
        """The --quick run: same task, model and warm-up; a smaller held-out set and GRPO batch,
        15 steps with a checkpoint every 3."""
        return cls(seed=seed, eval_size=500, grpo_prompts=48, grpo_steps=15, save_every=3)

    def model_config(self) -> TinyLlamaConfig:
        from .tokenizer import VOCAB

        return TinyLlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(32, 4 * self.digits + 8),
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainedRun:
    """What `train_demo_run` wrote.

    base: HF Llama folder of the SFT warm-up model (= step 0 of the run).
    run: TRL-style run directory: checkpoint-N/ folders, trainer_state.json, metrics.csv.
    steps: checkpoint steps, ascending (the base, step 0, is not among them).
    metrics: run/metrics.csv, columns step,accuracy: held-out greedy exact-match accuracy of the
        base (step 0) and of every checkpoint.
    accuracy: step -> held-out accuracy, 0 = base.
    train_seconds: wall time of training and evaluations.
    """

    base: Path
    run: Path
    steps: list[int]
    metrics: Path
    accuracy: dict[int, float]
    train_seconds: float
    sft_steps: int = 0
