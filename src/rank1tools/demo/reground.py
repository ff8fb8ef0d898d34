"""Periodic re-grounding in the demo trainer (`rank1 demo --reground M:N`, docs/commands/demo.md#re-grounded-grpo).

The loop of rank1tools.integrations.trl.ReGroundCallback with its defaults, on the demo's own
trainer: every M GRPO steps the policy's weights jump N steps ahead, two-point per element from
the segment's start to its end (θ̂ = θ_start + (M + N)/M · (θ_end − θ_start)), norm weights keeping
their trained value (the reference's rule), Adam's moments kept; training continues from the
jumped weights. The step itself is math/linear_step.extrapolate_state, the one `rank1 extrapolate
--method linear` and the callback run. N = 0 never jumps: the arm is then plain training, bit for bit.

The arm starts from the warm-up base written by the plain run (base/) with the same seed, hence
the same GRPO sampling stream and a fresh Adam: the jumps are the only difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..math.linear_step import extrapolate_state
from .config import DemoTraining
from .model import TinyLlama, load_weights
from .task import accuracy

LOG_PREFIX = "reground/"  # the jump records' keys in trainer_state.json's log_history, as the callback's


@dataclass
class ReGroundedRun:
    """What `train_reground_arm` wrote and measured.

    run: the arm's run directory (checkpoint-N/, trainer_state.json), laid out as the plain run's.
    curve: per checkpoint (and step 0, the base): optimizer step, virtual step (steps taken +
        steps jumped so far) and held-out accuracy.
    jumps: per jump: optimizer step, virtual step after it, accuracy before and after it.
    """

    run: Path
    train_steps: int
    jump_steps: int
    curve: list[dict] = field(default_factory=list)
    jumps: list[dict] = field(default_factory=list)


class DemoReGround:
    """`after_step` hook of demo.train.grpo_training: every M steps, jump the weights N steps ahead."""

    def __init__(self, model: TinyLlama, train_steps: int, jump_steps: int, evaluate: Callable[[], float]):
        if train_steps < 1 or jump_steps < 0:
            raise ValueError(f"re-grounding needs M >= 1 and N >= 0, got {train_steps}:{jump_steps}")
        self.train_steps, self.jump_steps, self.evaluate = train_steps, jump_steps, evaluate
        self.jumped = 0  # steps added by the jumps so far
        self.jumps: list[dict] = []
        self._start = self._copy(model)  # float32 CPU copy of the segment's start

    @staticmethod
    def _copy(model: TinyLlama) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", torch.float32, copy=True) for name, p in model.named_parameters()}

    def __call__(self, step: int, model: TinyLlama) -> list[dict]:
        if self.jump_steps == 0 or step % self.train_steps:
            return []
        before = self.evaluate()
        M = float(self.train_steps)
        params = dict(model.named_parameters())
        jumped = extrapolate_state(
            self._start,
            [{name: p.detach() for name, p in params.items()}],
            [M],
            M + self.jump_steps,
            mode="two-point",
            from_step=0.0,
            to_step=M,
            norms="copy",
            tensors="all",
        )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(jumped[name])
        self.jumped += self.jump_steps
        record = {
            "step": step,
            "virtual_step": step + self.jumped,
            "accuracy_before": before,
            "accuracy": self.evaluate(),
        }
        self.jumps.append(record)
        self._start = self._copy(model)
        return [{f"{LOG_PREFIX}{k}": v for k, v in record.items()} | {"step": step}]


def train_reground_arm(
    base: Path,
    folder: Path,
    config: DemoTraining,
    train_steps: int,
    jump_steps: int,
    say: Callable[[str], None] | None = None,
) -> ReGroundedRun:
    """GRPO from the warm-up model in `base` with re-grounding every `train_steps` steps by
    `jump_steps`, into folder/run (existing files there are overwritten)."""
    from .train import grpo_training, make_task, torch_threads

    say = say or (lambda _line: None)
    with torch_threads(config.threads):
        task = make_task(config)
        model = TinyLlama(config.model_config())
        load_weights(model, base)
        base_acc = accuracy(model, task)
        hook = DemoReGround(model, train_steps, jump_steps, lambda: accuracy(model, task))
        virtual: dict[int, int] = {0: 0}

        def after_step(step: int, m: TinyLlama) -> list[dict]:
            records = hook(step, m)
            virtual[step] = step + hook.jumped
            for r in records:
                say(
                    f"re-grounded GRPO step {step}: jumped {jump_steps} steps ahead (virtual step "
                    f"{r[LOG_PREFIX + 'virtual_step']}), accuracy {r[LOG_PREFIX + 'accuracy_before']:.3f} -> "
                    f"{r[LOG_PREFIX + 'accuracy']:.3f}"
                )
            return records

        run = Path(folder) / "run"
        _, accs = grpo_training(model, task, config, run, base_acc, say, after_step=after_step)
    curve = [{"step": s, "virtual_step": virtual[s], "accuracy": a} for s, a in sorted(accs.items())]
    return ReGroundedRun(run=run, train_steps=train_steps, jump_steps=jump_steps, curve=curve, jumps=hook.jumps)
