"""`rank1 fit-pls`: how linear is each module's rank-1 trajectory (AlphaRL "rank-1 linear dynamics",
docs/concepts.md#linearity-of-the-rank-1-trajectory-fit-pls).

Reads the factor store that `decompose` wrote (no checkpoint is read again). Per module, on the
window's checkpoints: x_t = σ₁(t)·u₁(t), sign-aligned backwards from the last checkpoint; a
one-component PLS of the metric on x (in-sample and leave-one-out R²) and of the step on x
(R²_step). Writes per-module and aggregated tables, a summary, plots (with the `plot` extra) and a
fit store that `extrapolate alpharl` reads to predict ΔŴ for a target metric without
refitting (docs/formats.md, "Fit store").
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..engine.spectrum_tables import TYPE_ORDER, write_row_tables
from ..errors import InputError, UsageError
from ..io.factor_store import FactorStore, factor_file
from ..io.fit_store import FIT_FORMAT, FIT_FORMAT_VERSION  # noqa: F401 (importable from here)
from ..io.metrics import align, read_metrics
from ..io.output_lock import locked_output
from ..io.outputs import follow_umask, output_errors, staged_output
from ..io.writer import provenance, write_provenance
from ..jsonutil import json_safe
from ..math.pls import OVERFIT_GAP, fit_module
from ..math.signs import align_to_next
from ..options import check_min_checkpoints
from ..plot_common import draw_plots
from ..plots import fit_plots
from ..values import StepSelection
from .gate import fail_below_gate

LOO_GOOD = 0.9  # the share of modules above this LOO R² is reported
COLUMNS = [
    "module",
    "layer",
    "type",
    "n",
    "r2",
    "loo_r2",
    "r2_step",
    "score_a",
    "score_b",
    "x_norm_first",
    "x_norm_last",
]


@dataclass
class FitPlsOptions:
    metrics: str | None = None
    metric: str | None = None
    step_column: str | None = None
    window: StepSelection | str | None = None  # a step selection, as --steps: 50,100 or START:STOP[:EVERY]
    window_option: str = "--steps"  # the option a text window was given as (--steps or its alias --window)
    relative: bool = False
    min_checkpoints: int = 3
    fail_below: float | None = None
    plots: bool = True

    def __post_init__(self) -> None:
        # held parsed (a library caller's text is parsed here); messages name the selection's option
        self.window = StepSelection.of(self.window, self.window_option)
        if self.window is not None:
            self.window_option = self.window.option


@dataclass
class FitPlsResult:
    out: str
    steps: list[int]
    metric: str | None
    rows: list[dict]
    summary: dict
    checkpoints_without_metric: list[int] = field(default_factory=list)
    metric_steps_without_checkpoint: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    gate: dict | None = None
    plots: list[str] = field(default_factory=list)
    plot_hint: str | None = None

    def to_dict(self) -> dict:
        return json_safe(
            {
                "out": self.out,
                "steps": self.steps,
                "metric": self.metric,
                "summary": self.summary,
                "checkpoints_without_metric": self.checkpoints_without_metric,
                "metric_steps_without_checkpoint": self.metric_steps_without_checkpoint,
                "warnings": self.warnings,
                "gate": self.gate,
                "plots": self.plots,
            }
        )


def _window(steps: list[int], selection: StepSelection | None) -> list[int]:
    """The factor store's steps a selection names, as `--steps` selects a run's checkpoints
    (docs/cli.md#step-selections); a listed step the store lacks is a usage error."""
    if selection is None:
        return list(steps)
    missing = selection.missing(steps)
    if missing:
        raise UsageError(
            f"{selection.option}: no checkpoint for step {missing[0]} in the factor store "
            f"(steps {', '.join(map(str, steps[:12]))}{', ...' if len(steps) > 12 else ''})"
        )
    return selection.pick(steps)


def fit_pls(
    factors: str,
    out: str,
    *,
    options: FitPlsOptions = FitPlsOptions(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> FitPlsResult:
    check_min_checkpoints(options.min_checkpoints)
    store = FactorStore(factors)
    if not store.modules:  # decompose never writes one (it refuses an empty selection): nothing to fit
        raise InputError(f"{factors}: the factor store holds no modules: nothing to fit")
    window = _window(store.steps, options.window)
    m, metric_name, values, no_metric, no_ckpt = None, None, None, [], []
    if options.metrics:
        m = read_metrics(options.metrics, options.metric, options.step_column)
        used, no_metric, no_ckpt = align(m, window)
        metric_name, values = m.metric, m.values
    else:
        used = window
    if len(used) < options.min_checkpoints:
        raise InputError(
            f"{factors}: {len(used)} checkpoints in the window"
            + (" with a metric" if options.metrics else "")
            + f" (steps {used}), fewer than --min-checkpoints {options.min_checkpoints}"
        )
    y = None
    if values is not None:
        y = np.array([values[s] for s in used], dtype=np.float64)
        if options.relative:
            if y[-1] == 0:
                raise InputError(f"{options.metrics}: --relative divides by the metric at step {used[-1]}, which is 0")
            with np.errstate(over="ignore"):
                rel = y / y[-1]
            if not np.isfinite(rel).all():  # e.g. a last value of 1e-320 under values of order 1
                big = float(np.max(np.abs(y)))
                raise InputError(
                    f"{options.metrics}: --relative divides by the metric at step {used[-1]}, "
                    f"{y[-1]:.3g}, and the metric up to {big:.3g} divided by it overflows float64; "
                    "fit the metric itself (without --relative)"
                )
            y = rel
        if np.all(y == y[0]):  # R² is 0/0: refused before any output exists (docs/commands/fit-pls.md)
            raise InputError(
                f"{options.metrics}: {metric_name} is {values[used[0]]!r} at all {len(used)} checkpoints "
                f"fitted (steps {used[0]}..{used[-1]}): a constant metric has nothing to fit; choose "
                "another --metric or --steps, or leave out --metrics to fit against the step"
            )
    inputs = [factors] + ([options.metrics] if options.metrics else [])
    with (
        locked_output(out, force=force, inputs=inputs) as target,
        staged_output(target, force=force, label=out) as staging,
    ):
        result = _fit_all(store, used, y, metric_name, options, staging, progress)
        result.out = out
        result.checkpoints_without_metric, result.metric_steps_without_checkpoint = no_metric, no_ckpt
        _write_manifest(staging, store, used, metric_name, options, m, no_metric, no_ckpt)
    result.plots = [str(Path(out) / Path(p).relative_to(staging)) for p in result.plots]
    return result


def _fit_all(store: FactorStore, used: list[int], y, metric_name, options, staging: Path, progress) -> FitPlsResult:
    from safetensors.torch import save_file

    idx = [store.steps.index(s) for s in used]
    steps_y = np.array(used, dtype=np.float64)
    rows, trajectories = [], {}
    with output_errors(staging):
        (staging / "fits").mkdir()
        follow_umask(staging / "fits", directory=True)
    names = list(store.modules)
    for i, name in enumerate(names):
        f = store.load(name)
        U, V = align_to_next(f["U"][idx, :, 0], f["V"][idx, :, 0])
        X = (f["S"][idx, 0:1].double() * U.double()).numpy()  # x_t = sigma_1 u_1, one row per checkpoint
        # R²_step is in-sample (docs/concepts.md#linearity-of-the-rank-1-trajectory-fit-pls)
        by_step = fit_module(X, steps_y, loo=False)
        fit = fit_module(X, y) if y is not None else by_step
        mod = store.modules[name]
        norms = np.linalg.norm(X, axis=1)
        a, b = fit["score_line"]
        rows.append(
            {
                "module": name,
                "layer": mod.get("layer"),
                "type": mod.get("type"),
                "n": len(used),
                "r2": fit["r2"] if y is not None else None,
                "loo_r2": fit["loo_r2"] if y is not None else None,
                "r2_step": by_step["r2"],
                "score_a": a,
                "score_b": b,
                "x_norm_first": float(norms[0]),
                "x_norm_last": float(norms[-1]),
            }
        )
        pls = fit["model"]
        trajectories[name] = {
            "steps": used,
            "scores": [float(v) for v in pls.x_scores_],
            "metric": None if y is None else [float(v) for v in y],
            "score_line": (a, b),
            "step_scores": [float(v) for v in by_step["model"].x_scores_],
            "step_line": by_step["score_line"],
        }
        tensors = {
            "x_mean": torch.from_numpy(np.ascontiguousarray(pls.x_mean_)),
            "x_scale": torch.from_numpy(np.ascontiguousarray(pls.x_scale_)),
            "x_weights": torch.from_numpy(np.ascontiguousarray(pls.x_weights_)),
            "x_loadings": torch.from_numpy(np.ascontiguousarray(pls.x_loadings_)),
            "y": torch.tensor([pls.y_mean_, pls.y_scale_, pls.y_loading_], dtype=torch.float64),
            "score_line": torch.tensor([a, b], dtype=torch.float64),
            "r2": torch.tensor([_nan(rows[-1]["r2"]), _nan(rows[-1]["loo_r2"]), by_step["r2"]], dtype=torch.float64),
            "steps": torch.tensor(used, dtype=torch.int64),
            "targets": torch.from_numpy(y.copy() if y is not None else steps_y.copy()),
            "v_last": V[-1].contiguous(),
            "u_last": U[-1].contiguous(),
            "sigma_last": f["S"][idx[-1], 0:1].contiguous(),
            "fro": f["fro"][idx].double().contiguous(),  # ||dW_t||_F: alpharl's norm ratio needs no factor store
        }
        path = staging / "fits" / factor_file(name)
        with output_errors(path):
            save_file(tensors, str(path), metadata={"rank1tools": json.dumps({"module": name})})
            follow_umask(path, directory=False)
        if progress:
            progress(i + 1, len(names))
    summary, warnings = summarize(rows, metric_name is not None)
    key = "loo_r2" if y is not None else "r2_step"
    gate = fail_below_gate(f"mean {key}", summary["mean"][key], options.fail_below)
    plots, hint = [], None
    with output_errors(staging):
        _write_tables(staging, rows, summary)
        if options.plots:
            plots, hint = draw_plots(lambda: fit_plots(rows, trajectories, staging / "plots", metric_name))
    return FitPlsResult(
        out="",
        steps=used,
        metric=metric_name,
        rows=rows,
        summary=summary,
        warnings=warnings,
        gate=gate,
        plots=plots,
        plot_hint=hint,
    )


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def summarize(rows: list[dict], with_metric: bool) -> tuple[dict, list[str]]:
    """Means of each R² overall, by module type and by layer × type; share with LOO R² > 0.9;
    the 10 most and least linear modules; and the warning when in-sample and LOO disagree."""
    kinds = ["r2", "loo_r2", "r2_step"] if with_metric else ["r2_step"]
    rank_key = "loo_r2" if with_metric else "r2_step"

    def means(rs):
        return {k: _mean([r[k] for r in rs]) for k in kinds} | {"n": len(rs)}

    by_type, by_layer_type = {}, {}
    for r in sorted(rows, key=lambda r: (TYPE_ORDER.get(r["type"], 99), str(r["type"]))):
        by_type.setdefault(str(r["type"]), []).append(r)
        by_layer_type.setdefault(f"{r['layer']}/{r['type']}", []).append(r)
    ranked = sorted(
        (r for r in rows if r[rank_key] is not None and not math.isnan(r[rank_key])),
        key=lambda r: (-r[rank_key], r["module"]),
    )
    summary = {
        "mean": means(rows),
        "ranked_by": rank_key,
        "by_type": {t: means(rs) for t, rs in by_type.items()},
        "by_layer_type": {k: means(rs) for k, rs in by_layer_type.items()},
        "most_linear": [{"module": r["module"], rank_key: r[rank_key]} for r in ranked[:10]],
        "least_linear": [{"module": r["module"], rank_key: r[rank_key]} for r in ranked[::-1][:10]],
    }
    warnings = []
    if with_metric:
        loo = [r["loo_r2"] for r in rows if r["loo_r2"] is not None and not math.isnan(r["loo_r2"])]
        summary["share_loo_above_0.9"] = sum(v > LOO_GOOD for v in loo) / len(loo) if loo else None
        m = summary["mean"]
        if m["r2"] is not None and m["loo_r2"] is not None and m["r2"] - m["loo_r2"] > OVERFIT_GAP:
            warnings.append(
                f"mean in-sample R² {m['r2']:.2f} but leave-one-out R² {m['loo_r2']:.2f}: with d_out ≫ "
                f"checkpoints, PLS fits any metric in-sample; the trajectory does not predict the metric "
                f"at held-out checkpoints, so do not extrapolate to new metric values from this fit"
            )
    return summary, warnings


def _write_tables(folder: Path, rows: list[dict], summary: dict) -> None:
    write_row_tables(folder, "fits", rows, COLUMNS)
    for name, key in (("by_type.csv", "by_type"), ("by_layer_type.csv", "by_layer_type")):
        groups = summary[key]
        kinds = [k for k in ("r2", "loo_r2", "r2_step") if k in summary["mean"]]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            (["layer", "type"] if key == "by_layer_type" else ["type"]) + [f"mean_{k}" for k in kinds] + ["modules"]
        )
        for g, m in groups.items():
            head = g.split("/", 1) if key == "by_layer_type" else [g]
            w.writerow(head + ["" if m[k] is None else m[k] for k in kinds] + [m["n"]])
        (folder / name).write_text(buf.getvalue())
    (folder / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")


def _write_manifest(
    staging: Path,
    store: FactorStore,
    used: list[int],
    metric_name,
    options,
    metrics,
    no_metric: list[int],
    no_checkpoint: list[int],
) -> None:
    manifest = {
        "format": FIT_FORMAT,
        "format_version": FIT_FORMAT_VERSION,
        "tool_version": __version__,
        "factor_store": {
            "path": str(store.folder),
            "base": store.manifest["base"],
            "checkpoints": store.manifest["checkpoints"],
        },
        "target": "metric" if metric_name else "step",
        "metric": None
        if metrics is None
        else {
            "file": str(options.metrics),
            "sha256": metrics.sha256,
            "name": metric_name,
            "relative": options.relative,
        },
        "window": used,
        "checkpoints_without_metric": no_metric,
        "metric_steps_without_checkpoint": no_checkpoint,
        "modules": [
            {
                "name": n,
                "layer": m.get("layer"),
                "type": m.get("type"),
                "shape": m["shape"],
                "file": f"fits/{factor_file(n)}",
            }
            for n, m in store.modules.items()
        ],
    }
    with output_errors(staging):
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        write_provenance(
            staging,
            provenance(
                "fit-pls",
                [str(store.folder)],
                {
                    "metrics": options.metrics,
                    "metric": metric_name,
                    "window": None if options.window is None else options.window.text,
                    "relative": options.relative,
                    "min_checkpoints": options.min_checkpoints,
                },
            ),
        )
