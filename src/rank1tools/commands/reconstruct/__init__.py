"""`rank1 reconstruct`: rank-k checkpoints, W = theta_0 + alpha * (||dW|| / ||dW_k||) * dW_k
(docs/concepts.md#rank-k-reconstruction-reconstruct).

One pass over the base's tensors in file order; each input tensor is read once, whatever the
number of ranks asked for (`--rank 1,2,4,8` writes DIR/rank-1, DIR/rank-2, ...). Selected matrix
modules get their rank-k update; every other tensor gets the base value (default, as the AlphaRL
reference code) or the checkpoint's (`--rest checkpoint`). With `--factors` (a `decompose`
output covering the rank), the checkpoint's selected modules are not read at all: the factors
and ||dW|| come from the store. After writing, a rounding report says how much of the intended
update the output dtype kept (docs/formats.md#rounding-report). The options, the plan of a pass
and the result: plan.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ...engine.checkpoint_outputs import (  # noqa: F401 (DTYPE_CHOICES, LOST_WARNING: importable from here)
    DTYPE_CHOICES,
    DTYPES,
    LOST_WARNING,
    ROUNDING_FILE,
    CheckpointOutputs,
    nonfinite_error,
    overflow_error,
    rounding_report,
    tensor_specs,
    write_copied,
)
from ...engine.executor_options import ExecutorOptions, task_device
from ...engine.expert_tensors import selected_slices, write_fused
from ...engine.factor_source import factors_for, update_topk
from ...engine.tensor_units import (
    TensorGroup,
    TensorUnits,
    group_tensors,
    plan_bytes,
    progress_counter,
    run_tensor_groups,
    stats_from,
    stats_record,
)
from ...errors import UsageError
from ...io.compat import check_compatible, tensor_shapes, untied_head
from ...io.output_lock import locked_output
from ...io.sources import is_hub_source, open_source
from ...io.writer import provenance
from ...math.finite import all_finite, introduces_nonfinite, max_abs
from ...math.reconstruct import apply_rank_k, rounding_stats
from ...math.spectrum import delta
from ...math.svd import MIN_SKETCH
from ...modules import LM_HEAD_NAME, expert_slices, select_tensors
from ...options import RankSpec, parse_ranks  # noqa: F401 (RankSpec, parse_ranks: importable from here)
from ...resources import check_largest_tensor, reconstruct_peak_bytes, svd_bytes
from .plan import RankOutput, ReconstructOptions, ReconstructPlan, ReconstructResult


def reconstruct(
    base: str,
    checkpoint: str,
    out: str,
    *,
    options: ReconstructOptions = ReconstructOptions(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    executor: ExecutorOptions = ExecutorOptions(),
) -> ReconstructResult:
    """Write the rank-k checkpoint(s). `executor`: where the tensors are computed and written
    (rank1tools.engine.executors); with Ray, one task per group of tensors writes into the planned shards."""
    options.check()  # a caller may have changed a field since construction
    ranks = options.rank
    base_ck = open_source(base)
    ck = open_source(checkpoint, base=base_ck)  # a PEFT adapter: read on the base (io/peft_adapter.py)
    notes: list[str] = list(getattr(ck, "notes", []))
    shapes = tensor_shapes(base_ck, [ck])  # with lm_head.weight when the checkpoint unties it
    shapes = expert_slices(shapes)  # a fused [experts, out, in] tensor is one matrix module per expert
    modules = select_tensors(shapes, include=options.include, exclude=options.exclude, all_2d=options.all_2d)
    if not modules:
        raise UsageError("no tensors selected (check --include/--exclude)")
    kmax = {}
    for name in modules:
        ks = [r.resolve(shapes[name]) for r in ranks]
        if max(ks) > min(shapes[name]):
            bad = ranks[ks.index(max(ks))].text
            raise UsageError(f"--rank {bad} exceeds min(m, n) = {min(shapes[name])} of {name} {list(shapes[name])}")
        kmax[name] = max(ks)

    store, step_index = None, -1
    if options.factors:
        store, step_index = factors_for(options.factors, base_ck, ck, checkpoint, kmax, notes)
    if options.rest == "checkpoint" or store is None:
        check_compatible(base_ck, ck, modules if options.rest == "base" else None)

    if options.rest == "base":
        ck.expect([] if store is not None else modules)  # the rest comes from the base
    # a checkpoint that unties the base's lm_head keeps its own head when that head is written
    untie = untied_head(base_ck, [ck]) and (options.rest == "checkpoint" or LM_HEAD_NAME in modules)
    specs = tensor_specs(base_ck, [*base_ck.entries, *([LM_HEAD_NAME] if untie else [])], options.dtype)
    device = task_device(options.device, executor)
    groups = group_tensors([s.name for s in specs], lambda n: base_ck.entry(n).nbytes) if executor.is_ray else None
    plan = ReconstructPlan(
        base=base_ck,
        checkpoint=ck,
        store=store,
        step_index=step_index,
        ranks=tuple(ranks),
        kmax=kmax,
        modules=tuple(modules),
        options=options,
        device=str(device),
        specs=tuple(specs),
        untie=untie,
        out=out,
        force=force,
        executor=executor,
        groups=groups,
    )
    _check_memory(plan)
    local = [Path(c.label) for c in (base_ck, ck) if not is_hub_source(c.label)]
    if options.factors:
        local.append(Path(options.factors))
    with locked_output(out, force=force, inputs=local) as target:
        units = None
        if executor.is_ray:
            units = TensorUnits(
                target,
                plan_bytes(
                    "reconstruct",
                    [base_ck, ck],
                    {**asdict(options), "device": device.type},
                    groups,
                    {"specs": [[s.name, s.shape, str(s.dtype)] for s in specs]},
                ),
            )
        # outputs are merged full checkpoints, a PEFT adapter's included (io/peft_adapter.py); the
        # adapter output (`--format peft`) is export-lora's (commands/export_lora.from_reconstruct)
        outputs = _write_all(plan, target, units, progress)
    if untie:
        how = "reconstructed (selected)" if LM_HEAD_NAME in modules else "copied (--rest checkpoint)"
        notes.append(
            f"{checkpoint} stores its own {LM_HEAD_NAME} but base {base} ties it to the embedding: "
            f"the output stores the head, {how}, and its config.json says tie_word_embeddings: false"
        )
    return ReconstructResult(
        out=out,
        modules=len(modules),
        used_factors=store is not None,
        outputs=outputs,
        untied_lm_head=untie,
        notes=notes,
    )


def _write_all(
    plan: ReconstructPlan, target: Path, units: TensorUnits | None, progress: Callable[[int, int], None] | None
) -> list[RankOutput]:
    """Write every rank's checkpoint (one pass over the inputs) and move them into place at `target`.
    With Ray, `units` (the resumable work folder) runs the plan's groups."""
    options, ranks = plan.options, plan.ranks
    names = [s.name for s in plan.specs]
    with CheckpointOutputs(
        target,
        [r.folder for r in ranks],
        list(plan.specs),
        max_shard_size=options.max_shard_size,
        force=plan.force,
        work=units.work if units else None,
    ) as outs:
        stats = [dict() for _ in ranks]  # tensor name -> RoundingStats, per rank
        results = run_tensor_groups(
            _tensors_task,
            (plan,),
            names,
            units=units,
            groups=plan.groups,
            executor=plan.executor,
            on_done=progress_counter(progress, len(names)),
            outs=outs,
        )
        for name in names:  # the plan's order, whatever the order the units finished in
            for st, rec in zip(stats, results[name]):
                if rec is not None:
                    st[name] = stats_from(rec)
        params = {
            "rank": [r.text for r in ranks],
            "alpha": options.alpha,
            "norm_match": options.norm_match,
            "rest": options.rest,
            "dtype": options.dtype,
            "include": options.include,
            "exclude": options.exclude,
            "all_2d": options.all_2d,
            "svd": "factor-store" if plan.store else ("exact" if options.exact else "randomized"),
            "factors": options.factors,
            "device": torch.device(plan.device).type,
        }
        reports = [rounding_report(st) for st in stats]
        inputs = [plan.base, plan.checkpoint]
        outs.commit(
            copy_from=plan.base,
            output_dtype=None if options.dtype == "auto" else DTYPES[options.dtype],
            provenances=[provenance("reconstruct", inputs, {**params, "rank": r.text}) for r in ranks],
            reports=[{ROUNDING_FILE: rep} for rep in reports],
            parent_provenance=provenance("reconstruct", inputs, params),
            label=plan.out,
            untie_word_embeddings=plan.untie,
        )
        if units is not None:
            units.finish()
        return [
            RankOutput(
                rank=r.text,
                path=path,
                tensors=rep["tensors"],
                **{k: rep[k] for k in ("lost_fraction", "rel_error", "updated_elements", "warning")},
            )
            for r, path, rep in zip(ranks, outs.paths(plan.out), reports)
        ]


def _tensors_task(group: TensorGroup, plan: ReconstructPlan, writers, on_tensor=None) -> dict:
    """Write a group of tensors into every rank's checkpoint (`writers`: the writers themselves in
    this process, or their shard placements in a Ray task); returns each tensor's rounding
    figures per rank."""
    stats = [dict() for _ in plan.ranks]
    selected = set(plan.modules)
    dev = torch.device(plan.device)
    for name in group.names:
        if name in selected:
            _write_module(name, plan, dev, writers, stats)
        elif slices := selected_slices(name, plan.base.entry(name).shape, selected):
            write_fused(
                name,
                slices,
                writers,
                stats,
                lambda s, ws, sts: (_write_module if s in selected else _write_rest)(s, plan, dev, ws, sts),
            )
        else:
            _write_rest(name, plan, dev, writers, stats)
        if on_tensor:
            on_tensor(1)
    return {name: [stats_record(st.get(name)) for st in stats] for name in group.names}


def _check_memory(plan: ReconstructPlan) -> None:
    """Refuse before any work when the largest tensor's working set exceeds the available memory."""
    base_ck, ck, options = plan.base, plan.checkpoint, plan.options
    selected, specs = set(plan.modules), {s.name: s for s in plan.specs}

    def need(name: str) -> int:
        e = base_ck.entry(name)
        raw = max(e.nbytes, ck.entry(name).nbytes if name in ck else 0)
        item = torch.empty((), dtype=specs[name].dtype).element_size()
        svd = 0
        if name in selected:
            sketch = max(plan.kmax[name] + 10, MIN_SKETCH)
            svd = svd_bytes(e.shape, options.exact or min(e.shape) <= 2 * sketch, sketch)
        return reconstruct_peak_bytes(
            e.numel,
            raw,
            item,
            selected=name in selected,
            from_factors=plan.store is not None,
            svd=svd,
            rest=options.rest,
            on_cpu=torch.device(plan.device).type == "cpu",
        )

    check_largest_tensor(specs, need, lambda name: specs[name].shape)


def _write_module(name: str, plan: ReconstructPlan, device: torch.device, writers, stats) -> None:
    base_ck, ck, store, step_index, options = plan.base, plan.checkpoint, plan.store, plan.step_index, plan.options
    w0 = base_ck.read(name, device=device)
    U, S, V, fro = update_topk(
        name, base_ck, ck, store, step_index, plan.kmax[name], exact=options.exact, device=device, w0=w0
    )
    for r, w, st in zip(plan.ranks, writers, stats):
        stored, stat = apply_rank_k(
            w0,
            U,
            S,
            V,
            r.resolve(w0.shape),
            fro,
            w.specs[name].dtype,
            alpha=options.alpha,
            norm_match=options.norm_match,
        )
        if stat.introduced_nonfinite or not math.isfinite(stat.err_sq):
            if not all_finite(w0):  # NaN/Inf in the base (the factor path reads no checkpoint)
                raise nonfinite_error(base_ck.label, name)
            if stat.introduced_nonfinite:
                dt = w.specs[name].dtype
                raise overflow_error(
                    name,
                    dt,
                    "the reconstructed weights",
                    hint=f"check --alpha {options.alpha:g}"
                    + (", or write --dtype float32" if dt != torch.float32 else ""),
                )
        w.write(name, stored)
        st[name] = stat


def _write_rest(name: str, plan: ReconstructPlan, device: torch.device, writers, stats) -> None:
    """A tensor that is not reconstructed: the base's (bit-exact when the dtype is kept), or with
    --rest checkpoint the checkpoint's, its rounding measured against the base."""
    base_ck, ck = plan.base, plan.checkpoint
    if plan.options.rest == "base":
        write_copied(name, base_ck, writers, described="base values")
        return
    # every rank's writer has the same spec: cast, check and measure once, write to each
    dtype = writers[0].specs[name].dtype
    theirs = ck.read_raw(name)
    b = base_ck.read(name) if theirs.is_floating_point() else None
    stored = theirs.to(dtype)
    if introduces_nonfinite(stored, b):  # no written value may be non-finite where the base is finite
        if not all_finite(theirs):
            raise nonfinite_error(ck.label, name)
        raise overflow_error(
            name,
            stored.dtype,
            f"checkpoint values (|values| up to {max_abs(theirs):.3g})",
            hint="use --dtype float32 or bfloat16",
        )
    stat = rounding_stats(b, delta(theirs, b), stored) if b is not None else None
    for w, st in zip(writers, stats):
        w.write(name, stored)
        if stat is not None:
            st[name] = stat
