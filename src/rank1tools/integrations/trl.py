"""Periodic re-grounding inside a `transformers`/TRL trainer (docs/reground.md).

`ReGroundCallback(train_steps=M, jump_steps=N)`: every M optimizer steps, the live model's weights
jump N steps ahead on per-element straight lines (math/linear_step, the step `rank1 extrapolate
--method linear` runs on files), in place, and training continues from them. Two-point (the
RLVR-linearity reference's rule): θ̂ = θ_start + α·(θ_now − θ_start), α = (M + N)/M. lstsq: a
least-squares line per element through K snapshots taken evenly in the segment, the segment's
start being the origin. State: one float32 CPU copy of the extrapolated parameters at the
segment's start (+ K − 1 snapshots for lstsq); nothing per step.
"""

from __future__ import annotations

import logging
import math

import torch

from ..commands.extrapolate.base import NORM_RATIO_FLAG, flag_limit
from ..engine.model_scoring import import_transformers
from ..errors import UsageError
from ..math.linear_step import NORMS_CHOICES, TENSORS_CHOICES, is_extrapolated, tensor_updates

transformers = import_transformers()
log = logging.getLogger("rank1tools.reground")

METHODS = ("two-point", "lstsq")
LOG_PREFIX = "reground/"  # the jump records' keys in state.log_history


def distributed_setting(args) -> str | None:
    """What in the trainer's arguments makes an in-place jump wrong, or None (one plain process)."""
    if getattr(args, "deepspeed", None):
        return "DeepSpeed"
    if getattr(args, "fsdp", None):
        return "FSDP"
    world = getattr(args, "world_size", 1)
    if isinstance(world, int) and world > 1:
        return f"{world} processes"
    return None


class ReGroundCallback(transformers.TrainerCallback):
    """Train M steps, jump N steps ahead, repeat (docs/reground.md).

    train_steps (M >= 1) and jump_steps (N >= 0; 0 turns the callback off: training is exactly
    plain training); method "two-point" or "lstsq" over `snapshots` (K, 2 <= K <= M) points taken
    at offsets ⌊M·k/K⌋, k = 1..K, of the segment; norms "copy" (norm weights keep their trained
    value, the reference's choice) or "extrapolate"; tensors "all" floating parameters that train
    or "matrices" (2-D) only; reset_optimizer clears the optimizer's per-parameter state (Adam's
    moments) after a jump (default keep: docs/reground.md#optimizer-moments); a jump whose predicted
    update-norm ratio for some tensor exceeds `extrapolate`'s flag limit (flag_ratio ×
    max(1, (M + N)/M)) is skipped and logged as such. Every jump is recorded in
    `state.log_history` (keys prefixed "reground/") and in `self.jumps`.
    """

    def __init__(
        self,
        train_steps: int,
        jump_steps: int,
        *,
        method: str = "two-point",
        snapshots: int = 4,
        norms: str = "copy",
        tensors: str = "all",
        reset_optimizer: bool = False,
        flag_ratio: float = NORM_RATIO_FLAG,
    ):
        for name, value, low in (("train_steps", train_steps, 1), ("jump_steps", jump_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"ReGroundCallback: {name} must be an integer >= {low}, got {value!r}")
        for name, value, choices in (
            ("method", method, METHODS),
            ("norms", norms, NORMS_CHOICES),
            ("tensors", tensors, TENSORS_CHOICES),
        ):
            if value not in choices:
                raise UsageError(f"ReGroundCallback: {name} must be one of {', '.join(choices)}, got {value!r}")
        if method == "lstsq" and not (isinstance(snapshots, int) and 2 <= snapshots <= train_steps):
            raise UsageError(
                f"ReGroundCallback: snapshots must be between 2 and train_steps ({train_steps}) "
                f"for method lstsq, got {snapshots!r}"
            )
        if not (isinstance(flag_ratio, (int, float)) and math.isfinite(flag_ratio) and flag_ratio > 0):
            raise UsageError(f"ReGroundCallback: flag_ratio must be a number greater than 0, got {flag_ratio!r}")
        self.train_steps, self.jump_steps = train_steps, jump_steps
        self.method, self.snapshots, self.norms, self.tensors = method, snapshots, norms, tensors
        self.reset_optimizer, self.flag_ratio = reset_optimizer, float(flag_ratio)
        self.jumps: list[dict] = []
        self.jumped_steps = 0  # steps added by the jumps so far (virtual step = global step + this)
        self._segment_start: int | None = None
        self._start: dict[str, torch.Tensor] = {}
        self._snaps: list[dict[str, torch.Tensor]] = []

    @classmethod
    def from_backtest(cls, backtest_out: str, train_steps: int, *, cut: int | None = None, **options):
        """The callback whose N is the jump a `rank1 backtest` output recommends (docs/reground.md):
        of `cut`, or the smallest over its cuts. A backtest recommending 0 gives a callback that
        never jumps."""
        from ..commands.backtest.tables import read_recommended_jump  # noqa: PLC0415

        return cls(train_steps, read_recommended_jump(backtest_out, cut), **options)

    @property
    def alpha(self) -> float:
        return (self.train_steps + self.jump_steps) / self.train_steps

    def snapshot_offsets(self) -> list[int]:
        """The segment offsets whose weights lstsq fits (the last one is the jump's own step)."""
        if self.method == "two-point":
            return [self.train_steps]
        return [self.train_steps * k // self.snapshots for k in range(1, self.snapshots + 1)]

    # --- trainer events -------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs):
        self._refuse(args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._refuse(args)
        if self.jump_steps == 0:
            return
        # a resumed run: the jumps before the checkpoint are in its log history
        self.jumped_steps = sum(
            r.get(f"{LOG_PREFIX}jump_steps", 0) for r in state.log_history if r.get(f"{LOG_PREFIX}jumped")
        )
        self._start_segment(state.global_step, model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.jump_steps == 0:
            return
        if self._segment_start is None:  # a loop that did not send on_train_begin: start here
            self._start_segment(state.global_step, model)
            return
        offset = state.global_step - self._segment_start
        if offset < self.train_steps:
            if offset in self.snapshot_offsets():
                self._snaps.append({n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self._params(model)})
            return
        record = self._jump(state.global_step, model)
        if record["jumped"] and self.reset_optimizer and optimizer is not None:
            _clear_state(optimizer)
            record["optimizer_reset"] = True
        self.jumps.append(record)
        state.log_history.append({f"{LOG_PREFIX}{k}": v for k, v in record.items()} | {"step": state.global_step})
        self._start_segment(state.global_step, model)

    # --- the jump -------------------------------------------------------------------------------

    def _refuse(self, args) -> None:
        setting = distributed_setting(args)
        if setting:
            raise UsageError(
                f"ReGroundCallback runs in one process on an unsharded model; this run uses {setting}, "
                "where an in-place jump would be lost or partial: re-ground between training segments "
                "with `rank1 extrapolate --method linear --mode two-point` instead (docs/reground.md)"
            )

    def _params(self, model):
        """(name, parameter) of every parameter that trains and moves on a line."""
        for name, p in model.named_parameters():
            if p.requires_grad and is_extrapolated(name, p, norms=self.norms, tensors=self.tensors):
                yield name, p

    def _start_segment(self, step: int, model) -> None:
        self._segment_start = step
        self._snaps = []
        params = list(self._params(model))
        if not params:
            raise UsageError(
                f"ReGroundCallback: no trainable floating-point parameter to extrapolate "
                f"(tensors={self.tensors!r}, norms={self.norms!r})"
            )
        for name, p in params:
            if not p.data.is_contiguous():
                raise UsageError(
                    f"ReGroundCallback: parameter {name} is not contiguous: a jump cannot write it in place"
                )
            held = self._start.get(name)
            if held is None or held.shape != p.shape:
                self._start[name] = p.detach().to("cpu", torch.float32, copy=True)
            else:
                held.copy_(p.detach())

    def _jump(self, step: int, model) -> dict:
        M, target = self.train_steps, self.train_steps + self.jump_steps
        offsets = [float(o) for o in self.snapshot_offsets()]
        params = list(self._params(model))
        limit = flag_limit("step", target, M, self.flag_ratio)
        record = {
            "step": step,
            "segment_start": self._segment_start,
            "method": self.method,
            "alpha": self.alpha,
            "jump_steps": self.jump_steps,
            "norm_ratio_limit": limit,
        }
        if self.method == "two-point":
            # θ̂ − θ_start = α·(θ_now − θ_start): every tensor's predicted ratio is α exactly
            worst, flagged, sq_pred, sq_now = self.alpha, [], None, None
        else:
            sq_pred, sq_now, worst, flagged = self._predicted_norms(params, offsets, target, limit)
        if flagged or worst > limit:
            before = math.sqrt(sq_now) if sq_now is not None else None
            record |= {
                "jumped": False,
                "virtual_step": step + self.jumped_steps,
                "update_norm_before": before,
                "update_norm_after": before,
                "predicted_norm_ratio": _ratio(sq_pred, sq_now) if sq_pred is not None else worst,
                "actual_norm_ratio": 1.0,
                "max_tensor_norm_ratio": worst,
                "skipped": f"{f'{len(flagged)} tensors predict' if flagged else 'every tensor predicts'} an update "
                f"norm above {limit:.3g}x the segment's, e.g. {flagged[0] if flagged else params[0][0]} ({worst:.3g}x)",
            }
            log.warning(f"re-grounding: step {step}: jump skipped: {record['skipped']}")
            return record
        sq_now, sq_pred, sq_after = 0.0, 0.0, 0.0
        with torch.no_grad():
            for name, p in params:
                flat = p.data.view(-1)  # contiguous: checked when the segment started
                for lo, base, latest, update in self._updates(name, p, offsets, target):
                    written = (base.to(torch.float64) + update).to(p.dtype)
                    flat[lo : lo + base.numel()].copy_(written)
                    sq_now += float(latest.to(torch.float64) @ latest.to(torch.float64))
                    sq_pred += float(update @ update)
                    moved = written.to(torch.float64) - base.to(torch.float64)
                    sq_after += float(moved @ moved)
        self.jumped_steps += self.jump_steps
        record |= {
            "jumped": True,
            "virtual_step": step + self.jumped_steps,
            "update_norm_before": math.sqrt(sq_now),
            "update_norm_after": math.sqrt(sq_after),
            "predicted_norm_ratio": _ratio(sq_pred, sq_now),
            "actual_norm_ratio": _ratio(sq_after, sq_now),
            "max_tensor_norm_ratio": worst,
            "skipped": None,
        }
        log.info(
            f"re-grounding: step {step}: jumped {self.jump_steps} steps ahead (alpha {self.alpha:.3g}, "
            f"update norm {record['update_norm_before']:.3g} -> {record['update_norm_after']:.3g})"
        )
        return record

    def _updates(self, name: str, p: torch.Tensor, offsets: list[float], target: int):
        """math/linear_step.tensor_updates on one parameter: origin the segment's start (offset 0),
        points the snapshots and the live parameter."""
        two = self.method == "two-point"
        return tensor_updates(
            self._start[name],
            [*[s[name] for s in self._snaps], p],
            offsets,
            target,
            mode=self.method,
            from_step=0.0 if two else None,
            to_step=float(self.train_steps) if two else None,
        )

    def _predicted_norms(self, params, offsets, target, limit):
        """lstsq's guard pass: (Σ‖Δ̂‖², Σ‖θ_now − θ_start‖², worst tensor ratio, flagged tensors)."""
        sq_pred_all, sq_now_all, worst, flagged = 0.0, 0.0, 0.0, []
        with torch.no_grad():
            for name, p in params:
                sq_pred, sq_now = 0.0, 0.0
                for _, _, latest, update in self._updates(name, p, offsets, target):
                    sq_pred += float(update @ update)
                    sq_now += float(latest.to(torch.float64) @ latest.to(torch.float64))
                ratio = _ratio(sq_pred, sq_now)
                if ratio is not None and ratio > limit:  # extrapolate's flag: a still tensor is never flagged
                    flagged.append(name)
                if ratio is not None:
                    worst = max(worst, ratio)
                sq_pred_all += sq_pred
                sq_now_all += sq_now
        return sq_pred_all, sq_now_all, worst, flagged


def _ratio(sq_num: float, sq_den: float) -> float | None:
    """‖a‖/‖b‖ from squared norms; None for a tensor that did not move (extrapolate's NaN)."""
    return math.sqrt(sq_num / sq_den) if sq_den > 0 else None


def _clear_state(optimizer) -> None:
    """Forget the optimizer's per-parameter state (Adam's moments and step counts), through any
    wrapper (accelerate's AcceleratedOptimizer holds the torch optimizer as .optimizer)."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    inner.state.clear()


__all__ = ["ReGroundCallback", "distributed_setting"]
