"""The files of the demo run, laid out as a TRL GRPOTrainer run directory.

    base/                      the SFT warm-up model (step 0)
    run/checkpoint-N/          config.json, generation_config.json, model.safetensors (float32,
                               lm_head tied and not stored), tokenizer files, trainer_state.json
    run/trainer_state.json     the final state (as the trainer writes at the end of training)
    run/metrics.csv            step,accuracy: held-out greedy exact-match, step 0 = base

`trainer_state.json` has the fields of transformers' TrainerState (saved as it does: sorted keys,
indent 2). `log_history` holds one training entry per GRPO step (loss, grad_norm, learning_rate,
reward, reward_std, frac_reward_zero_std, clip_ratio/region_mean, completions/mean_length,
num_tokens, epoch, step, as TRL logs them) and one evaluation entry per checkpoint and at step 0
(eval_accuracy, epoch, step), as the Trainer logs evaluations in entries of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

from .model import TinyLlama, save_model
from .tokenizer import write_tokenizer

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.csv"
REWARD_NAME = "exact_match"


def write_model_folder(folder: Path, model: TinyLlama) -> None:
    """A Hugging Face model folder: weights, config.json, generation_config.json, tokenizer."""
    save_model(folder, model)
    write_tokenizer(folder)


def trainer_state(
    log_history: list[dict],
    global_step: int,
    max_steps: int,
    save_steps: int,
    batch_size: int,
    epoch: float,
    tokens_seen: int,
) -> dict:
    """transformers' TrainerState as a dict (its fields, in the values a GRPO run leaves)."""
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": epoch,
        "eval_steps": save_steps,
        "global_step": global_step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": [dict(entry) for entry in log_history],
        "logging_steps": 1,
        "max_steps": max_steps,
        "num_input_tokens_seen": tokens_seen,
        "num_train_epochs": 1,
        "save_steps": save_steps,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": False,
                    "should_evaluate": False,
                    "should_log": False,
                    "should_save": True,
                    "should_training_stop": global_step >= max_steps,
                },
                "attributes": {},
            }
        },
        "total_flos": 0.0,
        "train_batch_size": batch_size,
        "trial_name": None,
        "trial_params": None,
    }


def write_state(path: Path, state: dict) -> None:
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def write_metrics(path: Path, accuracy: dict[int, float]) -> None:
    lines = ["step,accuracy"] + [f"{step},{value!r}" for step, value in sorted(accuracy.items())]
    path.write_text("\n".join(lines) + "\n")
