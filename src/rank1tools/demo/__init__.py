"""A real, tiny RL run for `rank1 demo`: a Llama trained with GRPO on integer addition, on the CPU.

Nothing here is used by the analysis commands; it produces the run they analyse.

Policy. A Llama-architecture causal LM in plain torch (2 layers, hidden 160, MLP 432, 4 attention
heads sharing 2 key/value heads, RoPE, RMSNorm, SiLU, embedding tied to the output head; about
0.57 M parameters), saved in Hugging Face format: config.json, model.safetensors with HF's
tensor names (the tied lm_head not stored), and a character-level tokenizer (tokenizer.json,
tokenizer_config.json, special_tokens_map.json) that transformers loads. transformers'
LlamaForCausalLM gives the same logits on the same weights. Weights are saved in float32: the
RL updates are small against the weights, and bfloat16 would round many of them away.

Task (verifiable reward). Two-digit addition written as text, zero-padded operands, the answer's
three digits written least significant first (the order the carries are computed in):
"47+96=" -> "341" (47 + 96 = 143). Prompts and answers have fixed lengths, so no padding. Reward
1.0 for an exact match of the answer, else 0.0. A held-out set of 1000 pairs (500 with --quick),
drawn by the seed and disjoint from the pairs training draws from; accuracy is greedy exact-match
on it.

Warm-up. Supervised cross-entropy on the answer tokens (AdamW, lr 2e-3 after a 50-step linear
warm-up, 64 problems a step), stopped at the first check (every 10 steps, on 250 held-out
problems) reaching 25 % accuracy: the base has partial accuracy (about 25-35 % on the full set).

GRPO. Each step samples 64 prompts x 8 completions (48 x 8 with --quick) at temperature 1,
scores them, and computes group-normalised advantages A = (r - mean_group) / (std_group + 1e-4),
with the sample standard deviation (n - 1) of the 8 rewards of the prompt's group, as TRL does.
The loss is the clipped-ratio objective -min(rho A, clip(rho, 0.8, 1.2) A), rho = pi / pi_old,
averaged over all completion tokens, with no KL term; each sampled batch is optimised in mu = 2
full-batch Adam passes (lr 3e-4 constant, gradient norm clipped at 1), so the clip is active in
the second. 48 steps with a checkpoint every 4 (15 with a checkpoint every 3 for --quick).

Files (`train_demo_run`): base/ (the warm-up model, step 0) and run/ laid out like a TRL GRPOTrainer
output: run/checkpoint-N/ (weights, config, tokenizer, trainer_state.json), run/trainer_state.json
(transformers' TrainerState fields; log_history with loss, reward, reward_std, ... per step and
eval_accuracy per checkpoint and at step 0), run/metrics.csv (step,accuracy; step 0 = base).
Deterministic: the same seed gives the same bytes on the same machine and thread count.

Re-grounding (`rank1 demo --reground M:N`, demo/reground.py): a second GRPO arm from base/ with the
same seed, whose weights jump N steps ahead every M steps.
"""

from .config import DemoTraining, TrainedRun
from .train import evaluate_checkpoint, train_demo_run

__all__ = ["DemoTraining", "TrainedRun", "evaluate_checkpoint", "train_demo_run"]
