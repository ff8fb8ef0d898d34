"""`rank1 demo` on a real RL run: train a tiny policy with GRPO (rank1tools.demo), then run every
analysis command on the run and evaluate every checkpoint they write on the held-out set.

The cut: the history window of the extrapolations is the first third of the checkpoints (at
least 3); every method predicts the final step from it, so their accuracy can be set against the
final checkpoint's. AlphaRL needs a target metric: the accuracy the window's own trend (a least
squares line of accuracy against step over the window) predicts at the final step; nothing after
the cut is used. One more row fits RELEX over the whole run and evaluates it at the final step
(in-sample): it separates "the trajectory is a rank-1 line" from "the early window predicts it".
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..io.output_lock import locked_output
from ..io.outputs import staged_output
from ..io.writer import provenance, write_provenance
from ..jsonutil import json_safe
from .decompose import DecomposeOptions, decompose
from .demo_backtest import run_backtest_stages
from .demo_output import ROLLOUTS_FILE, SKIP_NOTE, model_extra_present, run_output_stages
from .demo_reground import AUTO, reground_plot, run_reground_arm
from .extrapolate.registry import ExtrapolateOptions, extrapolate
from .fit_pls import FitPlsOptions, fit_pls
from .linearity import LinearityOptions, linearity
from .reconstruct import reconstruct
from .reconstruct.plan import ReconstructOptions

RESULTS_FILE = "results.json"
DECOMPOSE_RANK = 8
WINDOW_SHARE = 1 / 3  # the extrapolations see the first third of the checkpoints
MIN_WINDOW = 3


@dataclass
class DemoRow:
    """One evaluated model: its accuracy and the share of the run's gain it keeps."""

    name: str
    path: str
    step: int | None  # the step it stands for (a prediction: the target step)
    accuracy: float
    kept: float | None  # (accuracy − base) / (final − base); None when final == base
    note: str = ""


@dataclass
class RLDemoResult:
    out: str
    seed: int
    quick: bool
    steps: list[int]
    cut: int
    final: int
    rows: list[DemoRow]
    figures: dict  # mean energy_1, PLS R² (in-sample, LOO, step), trajectory explained variance, linearity
    curve: dict[int, float]  # step -> held-out accuracy of the run's checkpoints (0 = base)
    seconds: dict[str, float]  # wall time per stage (shown, not written: results.json stays reproducible)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reground: dict | None = None  # the re-grounded arm (commands/demo_reground.py); None: --reground none
    backtest: dict | None = None  # the backtest at the cut (commands/demo_backtest.py)

    def to_dict(self) -> dict:
        extra = {} if self.reground is None else {"reground": self.reground}
        extra |= {} if self.backtest is None else {"backtest": self.backtest}
        return json_safe(
            {
                **extra,
                "out": self.out,
                "seed": self.seed,
                "quick": self.quick,
                "steps": self.steps,
                "cut": self.cut,
                "final": self.final,
                "figures": self.figures,
                "rows": [
                    {
                        "name": r.name,
                        "path": r.path,
                        "step": r.step,
                        "accuracy": r.accuracy,
                        "kept": r.kept,
                        "note": r.note,
                    }
                    for r in self.rows
                ],
                "curve": [{"step": s, "accuracy": a} for s, a in sorted(self.curve.items())],
                "plots": self.plots,
                "notes": self.notes,  # no timings: the file is byte-for-byte reproducible
            }
        )


def window_cut(steps: list[int]) -> int:
    """The last step of the extrapolations' history: the first third of the checkpoints, at least 3."""
    n = max(MIN_WINDOW, math.ceil(len(steps) * WINDOW_SHARE))
    if n >= len(steps):
        raise ValueError(f"{len(steps)} checkpoints: too few to keep a window of {n} and a later final step")
    return steps[n - 1]


def trend_target(curve: dict[int, float], window: list[int], final: int) -> float:
    """The accuracy at `final` on the least squares line of accuracy against step over `window`."""
    import torch

    from ..math.linefit import LineFit

    y = torch.tensor([curve[s] for s in window], dtype=torch.float64)
    return float(LineFit(r2=False).fit(window, y).predict(final)[0])


def kept_share(acc: float, base: float, final: float) -> float | None:
    return None if final == base else (acc - base) / (final - base)


def run_rl_demo(
    out: str,
    *,
    seed: int = 0,
    quick: bool = False,
    force: bool = False,
    device: str = "auto",
    reground: tuple[int, int] | str | None = AUTO,
    say: Callable[[str], None] | None = None,
) -> RLDemoResult:
    """Train the demo run into `out` (staged, renamed when training is done), then analyse it."""
    # `out` stays locked until the analyses inside it are written: no other run may write in or
    # around it meanwhile (io/output_nesting.py)
    with locked_output(out, force=force):
        return _run_rl_demo(out, seed=seed, quick=quick, force=force, device=device, reground=reground, say=say)


def _run_rl_demo(
    out: str,
    *,
    seed: int,
    quick: bool,
    force: bool,
    device: str,
    reground: tuple[int, int] | str | None,
    say: Callable[[str], None] | None,
) -> RLDemoResult:
    from ..demo import DemoTraining, evaluate_checkpoint, train_demo_run

    say = say or (lambda _line: None)
    config = DemoTraining.quick(seed) if quick else DemoTraining(seed=seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    with locked_output(out, force=force) as target, staged_output(target, force=force, label=out) as tmp:
        trained = train_demo_run(tmp, config, progress=say)
        write_provenance(tmp, provenance("demo", [], {"seed": seed, "quick": quick, "steps": trained.steps}))
    seconds["train"] = time.perf_counter() - t0

    root = Path(out)
    base, run = str(root / "base"), str(root / "run")
    steps, curve = trained.steps, dict(trained.accuracy)
    final, cut = steps[-1], window_cut(steps)
    window = [s for s in steps if s <= cut]
    metrics = str(root / "run" / Path(trained.metrics).name)  # trained.* point into the renamed staging folder

    def stage(name: str, fn):
        say(f"{name} ...")
        t = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - t
        return value

    dec = stage(
        "decompose",
        lambda: decompose(
            base, [], str(root / "decompose"), run=run, options=DecomposeOptions(rank=DECOMPOSE_RANK, device=device)
        ),
    )
    pls = stage(
        "fit-pls",
        lambda: fit_pls(
            str(root / "decompose"), str(root / "fit-pls"), options=FitPlsOptions(metrics=metrics, metric="accuracy")
        ),
    )
    lin = stage(
        "linearity",
        lambda: linearity(base, [], str(root / "linearity"), run=run, options=LinearityOptions(device=device)),
    )
    rec = stage(
        "reconstruct",
        lambda: reconstruct(
            base,
            str(root / "run" / f"checkpoint-{final}"),
            str(root / "rank-1"),
            options=ReconstructOptions(rank="1", factors=str(root / "decompose"), device=device),
        ),
    )
    target_metric = trend_target(curve, window, final)
    history = {"run": run, "history_until": cut, "target_steps": [final], "device": device}
    relex = stage(
        "extrapolate relex",
        lambda: extrapolate(
            base, str(root / "extrapolate-relex"), options=ExtrapolateOptions(method="relex", **history)
        ),
    )
    # the same method over the whole run, evaluated at its last step: how much of the gain the
    # trajectory's rank-1 line holds in-sample, apart from how well the early window predicts it
    relex_all = stage(
        "relex whole run",
        lambda: extrapolate(
            base,
            str(root / "relex-whole-run"),
            options=ExtrapolateOptions(method="relex", run=run, target_steps=[final], device=device),
        ),
    )
    lstsq = stage(
        "extrapolate linear",
        lambda: extrapolate(
            base, str(root / "extrapolate-linear"), options=ExtrapolateOptions(method="linear", mode="lstsq", **history)
        ),
    )
    stage(
        "fit-pls window",
        lambda: fit_pls(
            str(root / "decompose"),
            str(root / "fit-pls-window"),
            options=FitPlsOptions(metrics=metrics, metric="accuracy", window=f":{cut}", plots=False),
        ),
    )
    alpharl = stage(
        "extrapolate alpharl",
        lambda: extrapolate(
            base,
            str(root / "extrapolate-alpharl"),
            options=ExtrapolateOptions(
                method="alpharl", fits=str(root / "fit-pls-window"), target_metrics=[target_metric], device=device
            ),
        ),
    )

    output_rows, output_figures, notes = [], {}, list(pls.warnings)
    if model_extra_present():
        stages = run_output_stages(root, steps, cut, final, config, device, stage)
        output_rows, output_figures = stages.rows, stages.figures
    else:
        notes.append(SKIP_NOTE)
    data = str(root / ROLLOUTS_FILE) if model_extra_present() else None
    backtested = run_backtest_stages(root, curve, cut, config, device, stage, data)

    base_acc, final_acc = curve[0], curve[final]
    models = [
        ("base (SFT warm-up)", base, 0, curve[0], ""),
        ("checkpoint at the cut", str(root / "run" / f"checkpoint-{cut}"), cut, curve[cut], "history ends"),
        ("final checkpoint", str(root / "run" / f"checkpoint-{final}"), final, final_acc, ""),
    ]
    written = [
        ("rank-1 of the final", rec.outputs[0].path, final, "σ₁u₁v₁ᵀ per matrix"),
        ("relex (rank 1)", relex.outputs[0].path, final, f"from steps {window[0]}..{cut}"),
        ("relex, whole run", relex_all.outputs[0].path, final, f"in-sample: steps {window[0]}..{final}"),
        ("linear lstsq", lstsq.outputs[0].path, final, f"from steps {window[0]}..{cut}"),
        ("alpharl", alpharl.outputs[0].path, final, f"target accuracy {target_metric:.3f}"),
    ]

    def evaluate_all():
        return [(name, path, step, evaluate_checkpoint(path, config), note) for name, path, step, note in written]

    evaluated = stage("evaluate", evaluate_all) + output_rows
    rows = [
        DemoRow(name, path, step, acc, kept_share(acc, base_acc, final_acc), note)
        for name, path, step, acc, note in models + evaluated
    ]
    figures = {
        "energy_1_mean": dec.summary["overall"]["energy_1"],
        "energy_1_final": dec.summary["by_step"][str(final)]["energy_1"],
        "pls_r2": pls.summary["mean"]["r2"],
        "pls_loo_r2": pls.summary["mean"]["loo_r2"],
        "pls_r2_step": pls.summary["mean"]["r2_step"],
        "trajectory_explained_1": lin.summary["mean"]["mean_explained_1"],
        "linear_elements": lin.summary["headline"]["frac_r2_above_0.7"],
        "alpharl_target_accuracy": target_metric,
        **output_figures,
    }
    arm = None
    if reground is not None:
        schedule = "backtest" if reground == AUTO else "given"
        m, n = (
            (backtested["reground"]["segment"], backtested["reground"]["recommended_jump"])
            if reground == AUTO
            else reground
        )
        arm = stage("re-grounded GRPO", lambda: run_reground_arm(root, config, m, n, curve, say, schedule))
    seconds["total"] = time.perf_counter() - t0
    result = RLDemoResult(
        out=out,
        seed=seed,
        quick=quick,
        steps=steps,
        cut=cut,
        final=final,
        rows=rows,
        figures=figures,
        curve=curve,
        seconds=seconds,
        notes=notes,
        reground=arm,
        backtest=backtested,
    )
    result.plots = _plot(result, root)
    if arm is not None:
        arm["plots"] = reground_plot(curve, arm, root)
    (root / RESULTS_FILE).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
    return result


def _plot(result: RLDemoResult, root: Path) -> list[str]:
    from ..plots import demo_accuracy_plot, plots_available

    if not plots_available():
        return []
    points = [(r.name, r.step, r.accuracy) for r in result.rows[3:]]
    return [str(p) for p in demo_accuracy_plot(result.curve, result.cut, points, root)]
