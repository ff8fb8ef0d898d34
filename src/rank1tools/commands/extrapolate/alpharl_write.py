"""The write pass of `rank1 extrapolate alpharl`: the update AlphaRL predicts for a target metric
(docs/extrapolation.md). Its options and flags: alpharl.py; what it will write (targets, module
plans, the last checkpoint): alpharl_plan.py.

Reads a fit-pls output (the fit store) and the base; no checkpoint of the run is read unless
`--container last`. Per selected module and target y* (the metric, or the step for a store fitted
against the step):

    s* = (y* − a) / b                     on the fitted score line y ≈ a + b·s
    x̂  = x_mean + x_scale ⊙ (s* · p)      the one-component PLS inverse transform (p: x loadings)
    ΔŴ = x̂ v̂ᵀ                             v̂: the window's last, sign-aligned right singular vector
    W  = θ₀ + ΔŴ                          container base (default): x̂ models the cumulative update
    W  = θ_last + ΔŴ                      container last: what the public reference script does

Container last adds a cumulative update on top of a checkpoint that already holds ΔW_last: the
update up to the window's last step is counted twice (docs, and a note on every such run).
Modules whose R² is below `--min-r2`, or whose score line is flat (b = 0, no inverse), keep the
container's value, as does every tensor not selected; those are copied bit-exactly when the dtype
is kept. ΔŴ is formed in float32 from x̂ (float64) and v̂ and added to the container upcast to
float32, row block by row block; several targets are written in one pass (each input tensor read
once). Each output carries a report (per module: R² used, selected or kept and why, s*, the norm
ratio ‖ΔŴ‖_F / ‖ΔW_last‖_F = ‖x̂‖·‖v̂‖ / fro_last, flagged above `flag_limit`) and a rounding report.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from ...device import resolve_device
from ...engine.checkpoint_outputs import (
    DTYPES,
    ROUNDING_FILE,
    CheckpointOutputs,
    nonfinite_error,
    overflow_error,
    rounding_report,
    tensor_specs,
    write_copied,
)
from ...engine.expert_tensors import selected_slices, write_fused
from ...errors import UsageError
from ...io.checkpoint import Checkpoint
from ...io.compat import check_compatible, tensor_shapes
from ...io.fit_store import FitStore
from ...io.output_lock import locked_output
from ...io.sources import is_hub_source, open_source
from ...io.writer import TensorSpec, provenance
from ...math.finite import all_finite
from ...math.reconstruct import RoundingStats, rounding_stats
from ...modules import LM_HEAD_NAME, expert_slices
from ...resources import check_largest_tensor, reconstruct_peak_bytes
from .alpharl_plan import (
    AlpharlOptions,
    ModulePlan,
    far_step_warnings,
    open_last_checkpoint,
    plan_module,
    r2_position,
    select_modules,
    target_kind_and_values,
)
from .base import REPORT_FILE, ExtrapolateResult, TargetOutput, flag_limit, target_folder

BLOCK_ELEMS = 1 << 18  # update, add, cast and rounding stats are fused over row blocks of this size


def apply_outer(
    container: torch.Tensor, x: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype, block_elems: int = BLOCK_ELEMS
) -> tuple[torch.Tensor, RoundingStats]:
    """Stored W = (container + x vᵀ).to(out_dtype) and the rounding stats of the intended update.

    `container` float32 (m, n); the update is formed in float32 (one rounding of each product)
    and added in float32, block by block: no full-size update tensor is materialised."""
    xf = x.to(device=container.device, dtype=torch.float32)
    vf = v.to(device=container.device, dtype=torch.float32)
    out = torch.empty(container.shape, dtype=out_dtype, device=container.device)
    stats = RoundingStats()
    rows = max(1, block_elems // max(1, container.shape[1]))
    for r in range(0, container.shape[0], rows):
        w0 = container[r : r + rows]
        upd = xf[r : r + rows, None] * vf[None, :]
        stored = (w0 + upd).to(out_dtype)
        out[r : r + rows] = stored
        stats.add(rounding_stats(w0, upd, stored))
    return out, stats


def write_alpharl(
    base: str,
    out: str,
    *,
    options: AlpharlOptions,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExtrapolateResult:
    """Write the checkpoint AlphaRL predicts for each target (one pass over the container)."""
    if options.last_checkpoint and options.container != "last":
        raise UsageError("--last-checkpoint applies to --container last only")
    fits = str(options.fits)
    store = FitStore(fits)
    kind, targets = target_kind_and_values(store, options)
    r2_index, notes, warnings = r2_position(store, options), [], []
    base_ck = open_source(base)
    store.check_base(base_ck, notes)
    last_step = store.window[-1]
    last_ck = open_last_checkpoint(store, options, last_step, notes, base_ck) if options.container == "last" else None
    if last_ck is not None:
        check_compatible(base_ck, last_ck, label=f"last checkpoint {last_ck.label}")
    shapes = tensor_shapes(base_ck, [last_ck] if last_ck is not None else [])
    shapes = expert_slices(shapes)  # a fused [experts, out, in] tensor is one matrix module per expert
    if base_ck.lm_head_tied and LM_HEAD_NAME in store.modules and LM_HEAD_NAME not in shapes:
        shapes[LM_HEAD_NAME] = base_ck.entry(LM_HEAD_NAME).shape  # a head the run untied: selectable
    selected = select_modules(store, shapes, base_ck, options)
    chosen = set(selected)  # a subset of the store's modules (select_modules checked it)
    plans = {
        n: plan_module(store, n, targets, kind, r2_index, options)
        if n in chosen
        else ModulePlan(n, None, "not selected (--include/--exclude)")
        for n in store.modules
    }

    container = last_ck if last_ck is not None else base_ck
    untie = base_ck.lm_head_tied and (
        LM_HEAD_NAME in selected or (last_ck is not None and LM_HEAD_NAME in last_ck.entries)
    )
    names = [*base_ck.entries, *([LM_HEAD_NAME] if untie else [])]
    specs = tensor_specs(base_ck, names, options.dtype)
    base_ck.expect(names if last_ck is None else [])
    if last_ck is not None:
        last_ck.expect(names)
    device = resolve_device(options.device)
    _check_memory(
        container,
        specs,
        {n for n in selected if plans[n].extrapolated},
        device,
        rest="base" if last_ck is None else "checkpoint",
    )

    params = {
        "method": "alpharl",
        "targets": targets,
        "target_kind": kind,
        "container": options.container,
        "min_r2": options.min_r2,
        "r2": options.r2_kind,
        "include": options.include,
        "exclude": options.exclude,
        "dtype": options.dtype,
        "flag_ratio": options.flag_ratio,
        "device": device.type,
        "fit_store": {"path": fits, "target": store.target, "metric": store.metric, "window": store.window},
        "last_checkpoint": None if last_ck is None else last_ck.label,
    }
    inputs = [base_ck, fits, *([last_ck] if last_ck is not None else [])]
    local = [Path(c.label) for c in (base_ck, last_ck) if c is not None and not is_hub_source(c.label)] + [Path(fits)]
    # the reports depend on the plans only (fitted before any write): one per target, for both formats
    limits = [flag_limit(kind, t, last_step if kind == "step" else None, options.flag_ratio) for t in targets]
    reports = [_report(plans, i, t, kind, limits[i], store, options) for i, t in enumerate(targets)]
    if options.output_format == "peft":  # rank-1 updates: one LoRA adapter per target (alpharl_adapter.py)
        from .alpharl_adapter import write_adapters

        outputs = write_adapters(
            out,
            force=force,
            base_ck=base_ck,
            shapes=shapes,
            plans=plans,
            targets=targets,
            kind=kind,
            reports=reports,
            params=params,
            inputs=inputs,
            local=local,
            dtype=options.dtype,
            progress=progress,
        )
    else:
        folders = [target_folder(kind, t) for t in targets]
        with (
            locked_output(out, force=force, inputs=local) as target_path,
            CheckpointOutputs(target_path, folders, specs, max_shard_size=options.max_shard_size, force=force) as outs,
        ):
            stats = [dict() for _ in targets]
            moved = {n for n, p in plans.items() if p.extrapolated}

            def write_one(name: str, writers: list, stats: list[dict]) -> None:  # a module, or an expert of one
                if name in moved:
                    _write_module(name, plans[name], container, targets, kind, device, writers, stats)
                else:
                    write_copied(name, container, writers, described=f"{container.label} values", base=base_ck)

            for i, name in enumerate(names):
                plan = plans.get(name)
                if plan is not None and plan.extrapolated:
                    _write_module(name, plan, container, targets, kind, device, outs.writers, stats)
                elif slices := selected_slices(name, base_ck.entry(name).shape, moved):
                    write_fused(name, slices, outs.writers, stats, write_one)
                else:
                    # the container's value; a value of the last checkpoint may not be NaN/Inf where the base
                    # is finite (the base's own non-finite values are kept, as reconstruct keeps them)
                    write_copied(name, container, outs.writers, described=f"{container.label} values", base=base_ck)
                if progress:
                    progress(i + 1, len(names))
            roundings = [rounding_report(st) for st in stats]
            outs.commit(
                copy_from=base_ck,
                output_dtype=None if options.dtype == "auto" else DTYPES[options.dtype],
                provenances=[provenance("extrapolate", inputs, {**params, "target": t}) for t in targets],
                reports=[{REPORT_FILE: rep, ROUNDING_FILE: rnd} for rep, rnd in zip(reports, roundings)],
                parent_provenance=provenance("extrapolate", inputs, params),
                label=out,
                untie_word_embeddings=untie,
            )
            paths = outs.paths(out)
        outputs = [
            TargetOutput(
                target=t,
                kind=kind,
                path=p,
                flagged=rep["flagged"],
                norm_ratio_median=rep["norm_ratio_median"],
                norm_ratio_max=rep["norm_ratio_max"],
                **{k: rnd[k] for k in ("lost_fraction", "rel_error", "updated_elements", "warning")},
            )
            for t, p, rep, rnd in zip(targets, paths, reports, roundings)
        ]
    _notes(store, plans, options, kind, last_step, untie, notes, warnings)
    if kind == "step":
        warnings.extend(far_step_warnings(targets, last_step, options.flag_ratio))
    tensors = [
        {"tensor": p.name, "r2": p.r2, "score_line": list(p.score_line), "scores": p.scores, "norm_ratio": p.ratios}
        for p in plans.values()
        if p.extrapolated
    ]
    return ExtrapolateResult(
        out=out,
        method="alpharl",
        history_steps=list(store.window),
        outputs=outputs,
        tensors=tensors,
        parameters=params,
        notes=notes,
        warnings=warnings,
    )


def _check_memory(container: Checkpoint, specs: list[TensorSpec], extrapolated: set, device, rest: str) -> None:
    """Refuse before any work when the largest tensor's working set exceeds the available memory
    (`rest` "checkpoint": a kept tensor of the last checkpoint is checked against the base too)."""
    by_name = {spec.name: spec for spec in specs}

    def need(name: str) -> int:
        e = container.entry(name)
        item = torch.empty((), dtype=by_name[name].dtype).element_size()
        return reconstruct_peak_bytes(
            e.numel,
            e.nbytes,
            item,
            selected=name in extrapolated,
            from_factors=True,
            svd=0,
            rest=rest,
            on_cpu=device.type == "cpu",
        )

    check_largest_tensor(by_name, need, lambda name: by_name[name].shape)


def _write_module(name, plan: ModulePlan, container: Checkpoint, targets, kind, device, writers, stats) -> None:
    """container + ΔŴ of every target, each written to its output; rounding stats of ΔŴ."""
    w0 = container.read(name, device=device)  # float32 from the stored dtype (docs/concepts.md#words)
    if not all_finite(w0):
        raise nonfinite_error(container.label, name)
    for t, x, ratio, w, st in zip(targets, plan.x_hat, plan.ratios, writers, stats):
        dtype = w.specs[name].dtype
        stored, stat = apply_outer(w0, x, plan.v, dtype)
        if stat.introduced_nonfinite or not math.isfinite(stat.err_sq):
            raise overflow_error(
                name,
                dtype,
                f"the extrapolated weights at --target-{kind} {t:g}",
                hint=f"norm ratio {ratio:.3g}: check the target"
                + (", or write --dtype float32" if dtype != torch.float32 else ""),
            )
        w.write(name, stored)
        st[name] = stat


def _report(
    plans: dict[str, ModulePlan],
    i: int,
    target: float,
    kind: str,
    limit: float,
    store: FitStore,
    options: AlpharlOptions,
) -> dict:
    """REPORT_FILE of output i: per module R², selected or kept and why, s*, norm ratio; flagged ones."""
    rows, flagged, ratios = [], [], []
    for p in plans.values():
        row = {
            "module": p.name,
            "r2": p.r2,
            "status": "extrapolated" if p.extrapolated else "kept",
            "reason": p.reason,
            "score": None,
            "norm_ratio": None,
            "flagged": False,
        }
        if p.extrapolated:
            ratio = p.ratios[i]
            row.update(score=p.scores[i], norm_ratio=ratio, flagged=ratio > limit)
            ratios.append(ratio)
            if ratio > limit:
                flagged.append({"tensor": p.name, "norm_ratio": ratio, "limit": limit})
        rows.append(row)
    return {
        "method": "alpharl",
        "kind": kind,
        "target": target,
        "relative": store.relative,
        "metric": store.metric_name,
        "container": options.container,
        "fit_store": str(options.fits),
        "window": store.window,
        "r2_kind": options.r2_kind,
        "min_r2": options.min_r2,
        "flag_limit": limit,
        "extrapolated": len(ratios),
        "kept": len(rows) - len(ratios),
        "norm_ratio_median": statistics.median(ratios) if ratios else None,
        "norm_ratio_max": max(ratios) if ratios else None,
        "flagged": flagged,
        "modules": rows,
    }


def _notes(store, plans, options, kind, last_step, untie, notes, warnings) -> None:
    if store.relative:
        notes.append(
            f"the fit is on the metric relative to its value at step {last_step} (fit-pls --relative): "
            f"--target-metric is relative too (1.0 = the metric of step {last_step})"
        )
    if options.container == "last":
        notes.append(
            f"--container last: W = θ_last + ΔŴ, and ΔŴ models the cumulative update from the base, which "
            f"θ_last (step {last_step}) already holds in part: the update up to step {last_step} is "
            "counted twice (the reference script's choice; --container base avoids it)"
        )
    if store.target == "step" and options.r2_kind == "r2" and options.min_r2 is not None:
        notes.append("the fit store was fitted against the step: --min-r2 reads its in-sample R²_step")
    kept = [p for p in plans.values() if not p.extrapolated and not p.reason.startswith("not selected")]
    low = [p for p in kept if not p.reason.startswith("flat")]
    if low:
        notes.append(
            f"{len(low)} modules below --min-r2 {options.min_r2:g} ({options.r2_kind}) keep the "
            f"{options.container} value"
        )
    flat = [p.name for p in kept if p.reason.startswith("flat")]
    if flat:
        warnings.append(
            f"{len(flat)} modules have a flat score line (slope 0: the {kind} does not move with "
            f"their trajectory) and keep the {options.container} value, e.g. {flat[0]}"
        )
    if untie:
        notes.append(
            f"the base ties {LM_HEAD_NAME} to its embedding; the output stores its own head and its "
            "config.json says tie_word_embeddings: false"
        )
