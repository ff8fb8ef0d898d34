"""The output-space stages of `rank1 demo` (docs/commands/demo.md#the-output-space-rows), run on the
trained run through the same commands a user runs:

- `rank1 generate` writes the base's greedy completions of the first ROLLOUT_PROMPTS held-out
  prompts (`rollouts-base.jsonl`), and `rank1 logprobs` measures how linearly their teacher-forced
  log-probabilities move over the run (`logprobs/`);
- `rank1 generate --extrapolate-from` decodes the whole held-out set from the logits of two
  checkpoints (the cut and a later one before the end) extrapolated to the final step; each row is
  scored with the task's own exact-match reward, like every other row of the demo.

Every stage needs `transformers` (the `model` extra); without it the stages are skipped with a note.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..engine.model_loading import ModelOptions
from ..engine.sampling import SamplingOptions
from ..io.rollouts import read_rollouts
from .generate import Extrapolation, GenerateOptions, generate
from .logprobs import LogprobsOptions, logprobs

PROMPTS_FILE = "heldout-prompts.jsonl"
ROLLOUTS_FILE = "rollouts-base.jsonl"
ROLLOUT_PROMPTS = 128  # base rollouts whose log-probs `logprobs` follows over the run
BATCH = 256  # sequences per forward pass (the demo's model is tiny)
SKIP_NOTE = "output-space rows skipped: they run the checkpoints with transformers: pip install 'rank1tools[model]'"


def model_extra_present() -> bool:
    return importlib.util.find_spec("transformers") is not None


def later_points(steps: list[int], cut: int, final: int) -> list[int]:
    """The later checkpoints B paired with the cut: the one halfway from the cut to the final step
    and the last one before the final step (each once, in step order)."""
    between = [s for s in steps if cut < s < final]
    if not between:
        return []
    halfway = min(between, key=lambda s: (abs(s - (cut + final) / 2), s))
    return sorted({halfway, between[-1]})


def write_heldout_prompts(path: Path, config) -> int:
    """The held-out problems as a prompts file (`prompt`, `answer`, `id`), in the evaluation's order."""
    from ..demo.train import make_task

    task = make_task(config)
    lines = [
        json.dumps({"id": i, "prompt": prompt, "answer": answer}) + "\n"
        for i, (prompt, answer) in enumerate(task.texts(task.eval_pairs))
    ]
    path.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def rollout_accuracy(path: str) -> float:
    """Share of the rollouts whose completion earns the task's reward (exact match)."""
    from ..demo.task import reward

    rollouts = read_rollouts(path)
    return sum(reward(r.prompt, r.completion) for r in rollouts) / len(rollouts)


@dataclass
class OutputStages:
    rows: list[tuple]  # (name, path, step, accuracy, note), as demo_rl's evaluated rows
    figures: dict


def run_output_stages(root: Path, steps: list[int], cut: int, final: int, config, device: str, stage) -> OutputStages:
    """The rows and figures of the output-space stages; `stage(name, fn)` times each one."""
    base, run = str(root / "base"), root / "run"
    prompts = root / PROMPTS_FILE
    write_heldout_prompts(prompts, config)
    answer_tokens = config.digits + 1
    model = ModelOptions(device=device, batch_size=BATCH)
    greedy = SamplingOptions(max_new_tokens=answer_tokens)

    few = root / "rollout-prompts.jsonl"
    few.write_text("".join(prompts.read_text(encoding="utf-8").splitlines(keepends=True)[:ROLLOUT_PROMPTS]))
    stage(
        "generate base rollouts",
        lambda: generate(
            base, str(few), str(root / ROLLOUTS_FILE), options=GenerateOptions(sampling=greedy, model=model)
        ),
    )
    few.unlink()
    lp = stage(
        "logprobs",
        lambda: logprobs(
            base,
            [],
            str(root / "logprobs"),
            data=str(root / ROLLOUTS_FILE),
            run=str(run),
            options=LogprobsOptions(model=model),
        ),
    )
    rows = []
    for later in later_points(steps, cut, final):
        out = root / f"logits-{cut}-{later}.jsonl"
        result = stage(
            f"logit extrapolation {cut}→{later}",
            lambda later=later, out=out: generate(
                str(run / f"checkpoint-{later}"),
                str(prompts),
                str(out),
                extrapolation=Extrapolation(earlier=str(run / f"checkpoint-{cut}"), target_step=final),
                options=GenerateOptions(sampling=greedy, model=model),
            ),
        )
        alpha = result.generation["alpha"]
        rows.append(
            (f"logits {cut}→{later}", str(out), final, rollout_accuracy(str(out)), f"decoded at α = {alpha:.3g}")
        )
    headline = lp.summary["headline"]
    figures = {
        "logprob_tokens_linear": headline["frac_r2_above_0.7"],
        "logprob_r2_mean": headline["r2_mean"],
        "logprob_r2_median": headline["r2_median"],
        "logprob_sequences_linear": lp.summary["sequence_sums"]["frac_r2_above_0.7"],
    }
    return OutputStages(rows=rows, figures=figures)
