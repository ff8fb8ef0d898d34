"""What `rank1 extrapolate alpharl` will write, decided before the write pass (alpharl_write.py):
the target kind and values, the R² --r2 names, the selected fit-store modules, the window's last
checkpoint (`--container last`) and, per module, whether it is extrapolated and its prediction
(s*, x̂ and the norm ratio per target; docs/concepts.md#extrapolation-three-methods, AlphaRL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch

from ...errors import InputError, Rank1Error, UsageError
from ...io.checkpoint import Checkpoint
from ...io.fingerprint import matches
from ...io.fit_store import FitStore
from ...io.sources import open_source
from ...modules import select_tensors
from ...options import number_label
from .base import CommonOptions

# The options are an alpharl.AlpharlOptions; alpharl.py imports the write pass (and so this module)
# when it runs, so this module names only their base class (no import back, not even for type checking).
AlpharlOptions = CommonOptions

R2_INDEX = {"r2": 0, "loo_r2": 1, "r2_step": 2}  # positions in a fit file's `r2` tensor


@dataclass
class ModulePlan:
    """One fit-store module: whether it is extrapolated, and its prediction for every target."""

    name: str
    r2: float | None  # the R² --r2 names (NaN: not fitted; None: not selected, not read)
    reason: str | None  # why it keeps the container's value; None when extrapolated
    score_line: tuple[float, float] | None = None
    scores: list[float] = field(default_factory=list)  # s* per target
    ratios: list[float] = field(default_factory=list)  # ‖ΔŴ‖_F / ‖ΔW_last‖_F per target
    x_hat: list[torch.Tensor] = field(default_factory=list)  # per target, float64 (d_out,)
    v: torch.Tensor | None = None  # float32 (d_in,)

    @property
    def extrapolated(self) -> bool:
        return self.reason is None


def predict(fit: dict[str, torch.Tensor], target: float) -> tuple[float, torch.Tensor]:
    """(s*, x̂) for one target from a fit file's tensors, in float64 (docs/concepts.md#extrapolation-three-methods, AlphaRL)."""
    a, b = (float(v) for v in fit["score_line"])
    s = (target - a) / b
    x = fit["x_mean"].double() + fit["x_scale"].double() * (s * fit["x_loadings"].double())
    return s, x


def target_kind_and_values(store: FitStore, options: AlpharlOptions) -> tuple[str, list[float]]:
    """The target kind the store was fitted against and the values asked for; the other flag is misuse."""
    if store.target == "metric":
        if options.target_steps:
            raise UsageError(
                f"fit store {options.fits} was fitted against the metric {store.metric_name!r}: "
                "use --target-metric Y, not --target-step"
            )
        if not options.target_metrics:
            raise UsageError(
                f"fit store {options.fits} was fitted against the metric {store.metric_name!r}: give --target-metric Y"
            )
        return "metric", [float(y) for y in options.target_metrics]
    if options.target_metrics:
        raise UsageError(
            f"fit store {options.fits} was fitted against the step (fit-pls without --metrics): "
            "use --target-step S, not --target-metric"
        )
    if not options.target_steps:
        raise UsageError(f"fit store {options.fits} was fitted against the step: give --target-step S")
    first = store.window[0]
    early = [s for s in options.target_steps if s < first]
    if early:  # relex/linear's rule (history_extrapolation.open_history): targets inside the history are allowed
        raise UsageError(
            f"--target-step {early[0]:g} is before the fitted window's first step ({first}) of fit store {options.fits}"
        )
    return "step", [float(s) for s in options.target_steps]


def far_step_warnings(targets: list[float], last_step: int, flag_ratio: float) -> list[str]:
    """A step target more than --flag-ratio times the window's last step: the distance a metric
    target's norm-ratio flag stands for (a step target's flag limit grows with the step, so the
    flag alone never says that the target is far)."""
    return [
        f"--target-step {number_label(t)} is {t / last_step:.3g}x the fitted window's last step {last_step} (above "
        f"--flag-ratio {flag_ratio:g}): a prediction that far beyond the fit is unreliable"
        for t in targets
        if last_step > 0 and t > flag_ratio * last_step
    ]


def r2_position(store: FitStore, options: AlpharlOptions) -> int:
    """Which entry of a fit file's r2 = [in-sample, leave-one-out, step] --r2 names. A store fitted
    against the step has only R²_step, which is then also its in-sample R²."""
    if store.target == "step":
        if options.r2_kind == "loo_r2":
            raise UsageError(
                f"--r2 loo_r2: fit store {options.fits} was fitted against the step, without a "
                "leave-one-out R²; use --r2 r2_step"
            )
        return R2_INDEX["r2_step"]
    return R2_INDEX[options.r2_kind]


def open_last_checkpoint(
    store: FitStore, options: AlpharlOptions, step: int, notes: list[str], base: Checkpoint | None = None
) -> Checkpoint:
    """The window's last checkpoint: --last-checkpoint, else the factor store's record of it (a PEFT
    adapter read on `base`, io/peft_adapter.py)."""
    rec = store.checkpoint_at(step)
    if options.last_checkpoint:
        ck = open_source(options.last_checkpoint, base=base)
        if rec is not None and not matches(rec, ck)[0]:
            notes.append(
                f"--last-checkpoint {ck.label} is not {rec['source']}, the checkpoint the fit store "
                f"records for step {step}"
            )
        return ck
    need = f"--container last needs the window's last checkpoint (step {step})"
    if rec is None:
        raise InputError(f"{need}, which fit store {options.fits} does not record; pass --last-checkpoint PATH")
    try:
        ck = open_source(rec["source"], base=base)
    except Rank1Error as e:
        raise InputError(
            f"{need}: {rec['source']}, as fit store {options.fits} records it, cannot be opened "
            f"({e}); pass --last-checkpoint PATH"
        ) from None
    if rec.get("revision") is not None and ck.revision != rec["revision"]:
        raise InputError(
            f"{need}: {rec['source']} is now at revision {ck.revision}, fit store {options.fits} "
            f"recorded {rec['revision']}; pass --last-checkpoint with that revision"
        )
    if not matches(rec, ck)[0]:
        raise InputError(
            f"{need}: {rec['source']} now holds other weights than when it was decomposed (content "
            f"fingerprint differs); pass --last-checkpoint PATH"
        )
    return ck


def select_modules(store: FitStore, shapes: dict, base_ck: Checkpoint, options: AlpharlOptions) -> list[str]:
    """Every fit-store module minus --exclude; with --include, the base's 2-D tensors it names,
    each of which the fit store must hold. Every module must have the base's shape."""
    if options.include:
        names = select_tensors(shapes, include=options.include, exclude=options.exclude)
        missing = [n for n in names if n not in store.modules]
        if missing:
            raise InputError(f"fit store {options.fits} has no module {missing[0]!r}")
    else:
        names = [n for n in store.modules if not any(fnmatchcase(n, g) for g in options.exclude)]
    if not names:
        raise UsageError("no tensors selected (check --include/--exclude)")
    for n in names:
        if n not in shapes:
            raise InputError(f"base {base_ck.label} has no tensor {n!r}, a module of fit store {options.fits}")
        if list(shapes[n]) != store.modules[n]["shape"]:
            raise InputError(
                f"tensor {n!r}: shape {list(shapes[n])} in base {base_ck.label} but "
                f"{store.modules[n]['shape']} in fit store {options.fits}"
            )
    return names


def plan_module(
    store: FitStore, name: str, targets: list[float], kind: str, r2_index: int, options: AlpharlOptions
) -> ModulePlan:
    """Module `name`'s plan: kept (R² below --min-r2, or a flat score line) or its prediction per target."""
    fit = store.load(name)
    r2 = float(fit["r2"][r2_index])
    a, b = (float(v) for v in fit["score_line"])
    if options.min_r2 is not None and not r2 >= options.min_r2:
        label = "R²_step" if r2_index == 2 else ("R²" if r2_index == 0 else "LOO R²")
        why = f"{label} not fitted (NaN)" if math.isnan(r2) else f"{label} {r2:.4g} below --min-r2 {options.min_r2:g}"
        return ModulePlan(name, r2, why, (a, b))
    if b == 0:
        return ModulePlan(name, r2, f"flat score line (slope 0): no score gives the target {kind}", (a, b))
    v_norm = float(fit["v_last"].double().norm())
    fro_last = float(fit["fro"][-1])
    plan = ModulePlan(name, r2, None, (a, b), v=fit["v_last"].float())
    for t in targets:
        s, x = predict(fit, t)
        if not (math.isfinite(s) and bool(torch.isfinite(x).all())):
            raise InputError(
                f"module {name!r}: --target-{kind} {t:g} gives score {s:.3g} on a score line of slope "
                f"{b:.3g}; the predicted update is not finite"
            )
        norm = float(x.norm()) * v_norm
        plan.scores.append(s)
        plan.x_hat.append(x)
        plan.ratios.append(norm / fro_last if fro_last > 0 else (math.inf if norm > 0 else 0.0))
    return plan
