"""The write pass `extrapolate relex` and `extrapolate linear` share (docs/extrapolation.md).

Streams every tensor of a planned history (history.py) in element chunks and writes one checkpoint
per target step in the same pass: a method supplies one function per tensor that hands each
target's float64 update chunk to a `TargetSink`; this module copies the tensors that are not
extrapolated, measures what the output dtype rounds away, flags absurd norm ratios and writes the
reports and provenance, in this process or one Ray task per group of tensors.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict

import torch

from ...engine.checkpoint_outputs import (
    DTYPES,
    ROUNDING_FILE,
    CheckpointOutputs,
    nonfinite_error,
    overflow_error,
    rounding_report,
    tensor_specs,
)
from ...engine.executor_options import ExecutorOptions
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
from ...io.checkpoint import Checkpoint
from ...io.output_lock import locked_output
from ...io.run_inputs import chunk_elements
from ...io.writer import provenance
from ...math.finite import all_finite, introduces_nonfinite, max_abs
from ...math.reconstruct import RoundingStats, rounding_stats
from ...modules import LM_HEAD_NAME
from ...resources import check_largest_tensor, streaming_peak_bytes
from .base import REPORT_FILE, ExtrapolateResult, HistoryOptions, TargetOutput, flag_limit, target_folder
from .history import HISTORY_BUDGET, History, HistoryPass, TensorPlan, nonfinite_history

COPY_CHUNK = 1 << 22  # elements per chunk when a tensor is copied from the base or the last checkpoint


class TargetSink:
    """Where a method puts each target's update chunk: stored = (base + update).to(dtype), written
    at its place, its rounding measured (per target: tensor name -> RoundingStats)."""

    def __init__(self, h: History, writers: list, cks: list[Checkpoint]):
        self.h = h
        self.writers = writers
        self.cks = cks
        self.stats: list[dict[str, RoundingStats]] = [dict() for _ in writers]
        self._base64: tuple[str, int, torch.Tensor] | None = None  # the last base chunk in float64

    def _float64(self, name: str, start: int, base: torch.Tensor) -> torch.Tensor:
        """The base chunk in float64, converted once for all targets (every target writes it in turn)."""
        if self._base64 is None or self._base64[:2] != (name, start) or self._base64[2].shape != base.shape:
            self._base64 = (name, start, base.to(torch.float64))
        return self._base64[2]

    def write(self, j: int, name: str, start: int, base: torch.Tensor, update: torch.Tensor) -> None:
        """`base`: float32 chunk of θ₀; `update`: the float64 predicted update Δ̂ for target j."""
        dtype = self.writers[j].specs[name].dtype
        stored = (self._float64(name, start, base) + update).to(dtype)
        stat = rounding_stats(base, update.to(torch.float32), stored)
        if stat.introduced_nonfinite:
            if not all_finite(update):
                raise nonfinite_history(self.h, name, self.cks)
            raise overflow_error(
                name, dtype, f"the extrapolated weights at step {self.h.targets[j]}", then="write --dtype float32"
            )
        self.writers[j].write_range(name, start, stored)
        self.stats[j].setdefault(name, RoundingStats()).add(stat)

    def copy(self, name: str, src: Checkpoint, from_base: bool) -> None:
        """Write `name` from `src` to every target, chunk by chunk (bit-exact when the dtype is kept)."""
        e = src.entry(name)
        dtype = self.writers[0].specs[name].dtype
        floating = e.torch_dtype.is_floating_point and dtype.is_floating_point
        for a in range(0, e.numel, COPY_CHUNK) if e.numel else [0]:
            b = min(a + COPY_CHUNK, e.numel)
            raw = src.read_flat(name, a, b, dtype=e.torch_dtype)
            stored = raw.to(dtype)
            stat = None
            if floating:
                raw32 = raw.to(torch.float32)
                if from_base:  # nothing to measure (no update): only the cast can go wrong
                    introduced = introduces_nonfinite(stored, raw32)
                else:
                    b0 = self.h.base.read_flat(name, a, b)
                    stat = rounding_stats(b0, raw32 - b0, stored)
                    introduced = stat.introduced_nonfinite > 0
                if introduced:  # non-finite where the base is finite
                    if not all_finite(raw):
                        raise nonfinite_error(src.label, name)
                    raise overflow_error(
                        name,
                        dtype,
                        f"values of {src.label} (|values| up to {max_abs(raw):.3g})",
                        then="write --dtype float32",
                    )
            for j, w in enumerate(self.writers):
                w.write_range(name, a, stored)
                if stat is not None:
                    self.stats[j].setdefault(name, RoundingStats()).add(stat)


# A method's work on one tensor: (name, sink) -> figures {"common": {...}, "per_target": [{...}, ...]},
# each per-target dict holding at least "norm_ratio" (float or NaN).
TensorFn = Callable[[str, TargetSink], dict]


def write_extrapolation(
    h: History,
    plan: TensorPlan,
    out: str,
    options: HistoryOptions,
    force: bool,
    progress: Callable[[int, int], None] | None,
    *,
    params: dict,
    tensor_fn: TensorFn,
    read: list[int],
    notes: list[str],
    executor: ExecutorOptions = ExecutorOptions(),
) -> ExtrapolateResult:
    """One pass over the tensors writing every target's checkpoint; `read`: indices of the history
    checkpoints the method reads (they are the provenance's inputs with the base). With Ray, one
    task per group of tensors (engine.tensor_units) runs the same per-tensor code."""
    targets = h.targets
    specs = tensor_specs(h.base, plan.names, options.dtype)
    folders = [target_folder("step", s) for s in targets]
    used = [h.checkpoints[i] for i in read]
    if plan.of("last") and h.last not in used:
        used.append(h.last)
    figures: dict[str, dict] = {}
    names = plan.names
    _check_memory(h, plan, used, len(targets))
    with locked_output(out, force=force, inputs=h.inputs.local_paths()) as target:
        units = groups = None
        if executor.is_ray:
            groups = group_tensors(names, lambda n: h.base.entry(n).nbytes * (1 + len(used)))
            steps = None if options.steps is None else options.steps.text  # recorded as typed
            units = TensorUnits(
                target,
                plan_bytes(
                    "extrapolate",
                    [h.base, *used],
                    {"method": options.method, **asdict(options), "steps": steps, "device": h.device.type, **params},
                    groups,
                    {"sources": plan.source, "untie": plan.untie},
                ),
            )
        with CheckpointOutputs(
            target,
            folders,
            specs,
            max_shard_size=options.max_shard_size,
            force=force,
            work=units.work if units else None,
        ) as outs:
            results = run_tensor_groups(
                _tensors_task,
                (h, plan.source, tensor_fn, used),
                names,
                units=units,
                groups=groups,
                executor=executor,
                on_done=progress_counter(progress, len(names)),
                outs=outs,
            )
            stats: list[dict[str, RoundingStats]] = [dict() for _ in targets]  # per target: tensor -> figures
            for name in names:  # the plan's order, whatever the order the units finished in
                if results[name]["figures"] is not None:
                    figures[name] = results[name]["figures"]
                for st, rec in zip(stats, results[name]["stats"]):
                    if rec is not None:
                        st[name] = stats_from(rec)
            base_params = {
                "method": options.method,
                "history_steps": h.steps,
                "step_source": h.inputs.step_source,
                "history_until": options.history_until,
                "include": options.include,
                "exclude": options.exclude,
                "rest": options.rest,
                "dtype": options.dtype,
                "device": h.device.type,
                "flag_ratio": options.flag_ratio,
                "delta_dtype": "float32",
                **params,
            }
            reports, tables, outputs = [], [], []
            for j, s in enumerate(targets):
                limit = flag_limit("step", s, h.steps[-1], options.flag_ratio)
                rows = [{"tensor": n, **f["common"], **f["per_target"][j]} for n, f in figures.items()]
                flagged = [
                    {"tensor": r["tensor"], "norm_ratio": r["norm_ratio"], "limit": limit}
                    for r in rows
                    if r["norm_ratio"] > limit
                ]  # NaN never compares greater
                rep = rounding_report(stats[j])
                reports.append(rep)
                tables.append(
                    {
                        "method": options.method,
                        "target_step": s,
                        "history_steps": h.steps,
                        "norm_ratio_limit": limit,
                        "flagged": flagged,
                        "tensors": rows,
                        "copied": {"last": plan.of("last"), "base": plan.of("base")},
                    }
                )
                ratios = [r["norm_ratio"] for r in rows if math.isfinite(r["norm_ratio"])]
                outputs.append(
                    TargetOutput(
                        target=s,
                        kind="step",
                        path="",
                        flagged=flagged,
                        norm_ratio_median=statistics.median(ratios) if ratios else None,
                        norm_ratio_max=max(ratios) if ratios else None,
                        **{k: rep[k] for k in ("lost_fraction", "rel_error", "updated_elements", "warning")},
                    )
                )
            inputs = [h.base, *used]
            outs.commit(
                copy_from=h.base,
                output_dtype=None if options.dtype == "auto" else DTYPES[options.dtype],
                provenances=[provenance("extrapolate", inputs, {**base_params, "target_step": s}) for s in targets],
                reports=[{ROUNDING_FILE: rep, REPORT_FILE: tab} for rep, tab in zip(reports, tables)],
                parent_provenance=provenance("extrapolate", inputs, {**base_params, "target_steps": targets}),
                label=out,
                untie_word_embeddings=plan.untie,
            )
            for o, path in zip(outputs, outs.paths(out)):
                o.path = path
        if units is not None:
            units.finish()
    notes = [*h.notes, *notes]
    if plan.untie:
        notes.append(
            f"the checkpoints store their own {LM_HEAD_NAME} but the base ties it to the embedding: the "
            "output stores the head and its config.json says tie_word_embeddings: false"
        )
    warnings = [
        f"step {o.target}: {len(o.flagged)} tensors have a predicted update norm above {o.flagged[0]['limit']:.3g}x "
        f"that of the last history checkpoint, e.g. {o.flagged[0]['tensor']}"
        for o in outputs
        if o.flagged
    ]
    tensors = [
        {
            "tensor": n,
            **f["common"],
            "norm_ratio": {str(s): f["per_target"][j]["norm_ratio"] for j, s in enumerate(targets)},
        }
        for n, f in figures.items()
    ]
    return ExtrapolateResult(
        out=out,
        method=options.method,
        history_steps=h.steps,
        outputs=outputs,
        tensors=tensors,
        parameters={**base_params, "target_steps": targets},
        notes=notes,
        warnings=warnings,
    )


def write_pass(
    p: HistoryPass,
    out: str,
    options: HistoryOptions,
    force: bool,
    progress: Callable[[int, int], None] | None,
    executor: ExecutorOptions = ExecutorOptions(),
) -> ExtrapolateResult:
    """Write a method's prepared pass (relex.relex_pass, linear.linear_pass) as `extrapolate` does."""
    return write_extrapolation(
        p.history,
        p.plan,
        out,
        options,
        force,
        progress,
        params=p.params,
        tensor_fn=p.tensor_fn,
        executor=executor,
        read=p.read,
        notes=p.notes,
    )


def _check_memory(h: History, plan: TensorPlan, used: list[Checkpoint], targets: int) -> None:
    """Refuse before any work when one tensor's streaming working set exceeds the available
    memory (resources.streaming_peak_bytes: T × chunk elements, whatever the tensor's size; the
    disk the outputs need is checked by CheckpointOutputs)."""
    chunk = chunk_elements(len(used), HISTORY_BUDGET)

    def need(name: str) -> int:
        e = h.base.entry(name)
        srcs = [h.base, *used] if plan.source[name] == "extrapolate" else [h.base, h.last]
        item = max(c.entry(name).nbytes // max(1, e.numel) for c in srcs if name in c)
        return streaming_peak_bytes(len(used), min(chunk, e.numel), item, targets=targets)

    check_largest_tensor(plan.names, need, lambda name: h.base.entry(name).shape)


def _tensors_task(
    group: TensorGroup,
    h: History,
    source: dict[str, str],
    tensor_fn: TensorFn,
    used: list[Checkpoint],
    writers: list,
    on_tensor: Callable[[int], None] | None = None,
) -> dict:
    """Write a group of tensors into every target's checkpoint (`writers`: the writers themselves
    in this process, or their shard placements in a Ray task); returns each tensor's figures and
    per-target rounding figures."""
    sink = TargetSink(h, writers, used)
    results = {}
    for name in group.names:
        figures = None
        if source[name] == "extrapolate":
            figures = tensor_fn(name, sink)
        else:
            sink.copy(name, h.base if source[name] == "base" else h.last, from_base=source[name] == "base")
        results[name] = {"figures": figures, "stats": [stats_record(st.get(name)) for st in sink.stats]}
        if on_tensor:
            on_tensor(1)
    return results
