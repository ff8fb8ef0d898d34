"""What `extrapolate relex` and `extrapolate linear` share (docs/extrapolation.md).

Both read a history of checkpoints (CHECKPOINT arguments or --run, cut at --history-until, step 0
left out: it is the base), pick the tensors to extrapolate, and stream every tensor in element
chunks, writing one checkpoint per target step in the same pass. A method supplies one function
per tensor that hands each target's float64 update chunk to a `TargetSink`; this module opens and
checks the inputs, plans the tensors, copies the ones that are not extrapolated, measures what
the output dtype rounds away, flags absurd norm ratios and writes the reports and provenance.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

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
from ...engine.executors import ExecutorOptions, task_device
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
from ...errors import InputError, UsageError
from ...io.checkpoint import Checkpoint
from ...io.compat import check_compatible, tensor_shapes, untied_head
from ...io.output_lock import locked_output
from ...io.run_inputs import RunInputs, chunk_elements, open_run_inputs, trajectory_chunks
from ...io.writer import provenance
from ...math.finite import all_finite, max_abs
from ...math.reconstruct import RoundingStats, rounding_stats
from ...modules import LM_HEAD_NAME, is_norm_parameter
from ...resources import check_largest_tensor, streaming_peak_bytes
from .base import REPORT_FILE, ExtrapolateResult, HistoryOptions, TargetOutput, flag_limit, target_folder

COPY_CHUNK = 1 << 22  # elements per chunk when a tensor is copied from the base or the last checkpoint
# Elements of the T × chunk block of updates a method works on at once (float32: 8 MiB). Its float64
# copies (Gram matrix, fits) stay below the allocator's mmap threshold and are reused chunk after
# chunk instead of being faulted in anew: faster than io.run_inputs' default and 4x less memory.
HISTORY_BUDGET = 1 << 21


@dataclass
class History:
    """The base, the history checkpoints (step order, step 0 left out) and the targets."""

    inputs: RunInputs
    steps: list[int]
    checkpoints: list[Checkpoint]
    targets: list[int]
    device: torch.device
    notes: list[str]

    @property
    def base(self) -> Checkpoint:
        return self.inputs.base

    @property
    def last(self) -> Checkpoint:
        return self.checkpoints[-1]


def open_history(base: str, options: HistoryOptions, executor: ExecutorOptions = ExecutorOptions()) -> History:
    """Open the inputs and check what every history method needs: at least two checkpoints after
    step 0 and no target before the first of them (targets inside the history are allowed)."""
    method = options.method
    inputs = open_run_inputs(base, options.checkpoints, options.run, options.steps, options.hub_run)
    inputs = inputs.until(options.history_until)
    notes = list(inputs.notes)
    zero = [c for s, c in inputs.checkpoints if s == 0]
    if zero:
        notes.append(f"{zero[0].label} is step 0 (the base's step): left out of the history")
    pairs = [(s, c) for s, c in inputs.checkpoints if s != 0]
    if len(pairs) < 2:
        cut = f" up to --history-until {options.history_until}" if options.history_until is not None else ""
        found = f"step {pairs[0][0]}" if pairs else "none"
        raise UsageError(f"--method {method} needs at least 2 history checkpoints{cut} besides the base; found {found}")
    steps = [s for s, _ in pairs]
    early = [s for s in options.target_steps if s < steps[0]]
    if early:
        raise UsageError(f"--target-step {early[0]} is before the first history checkpoint (step {steps[0]})")
    if inputs.step_source == "position":
        notes.append(
            "the checkpoints' steps could not be read from their names: using their positions 1, 2, ... "
            "as steps (name them checkpoint-STEP or use --run)"
        )
    inputs = RunInputs(inputs.base, pairs, inputs.step_source, inputs.run, inputs.notes)
    return History(
        inputs, steps, [c for _, c in pairs], list(options.target_steps), task_device(options.device, executor), notes
    )


def history_chunks(h: History, cks: list[Checkpoint], name: str):
    """Chunks of `name` across the base and `cks` (io.run_inputs.trajectory_chunks), sized for T = len(cks)."""
    return trajectory_chunks(h.base, cks, name, chunk=chunk_elements(len(cks), HISTORY_BUDGET), device=h.device)


def window_size(options: HistoryOptions, T: int) -> int:
    """--fit-window W (default all T history points); 2 <= W <= T."""
    W = T if options.fit_window is None else options.fit_window
    if W < 2 or W > T:
        raise UsageError(f"--fit-window {W}: must be between 2 and the {T} history checkpoints")
    return W


@dataclass
class TensorPlan:
    """Every tensor written, in order, and where its values come from: `extrapolate`, `last` (the
    last history checkpoint) or `base`."""

    source: dict[str, str]
    untie: bool  # the output stores lm_head.weight that the base ties to its embedding
    norms: list[str]  # selected norm weights copied from the last checkpoint (linear without --extrapolate-norms)

    @property
    def names(self) -> list[str]:
        return list(self.source)

    def of(self, kind: str) -> list[str]:
        return [n for n, s in self.source.items() if s == kind]


def plan_tensors(h: History, options: HistoryOptions, *, copy_norms: bool) -> TensorPlan:
    """All tensors by default (norms and biases included); --include/--exclude globs restrict.
    Tensors not selected, and integer/bool tensors, come from --rest; with `copy_norms` selected
    norm weights come from the last checkpoint. A tied lm_head needs nothing (it follows its
    embedding); one the checkpoints untie is a tensor of its own."""
    shapes = tensor_shapes(h.base, h.checkpoints)
    source = {}
    norms = []
    for name, shape in shapes.items():
        chosen = (not options.include or any(fnmatchcase(name, g) for g in options.include)) and not any(
            fnmatchcase(name, g) for g in options.exclude
        )
        if not chosen or not h.base.entry(name).torch_dtype.is_floating_point:
            source[name] = options.rest
        elif copy_norms and is_norm_parameter(name, shape):
            source[name] = "last"
            norms.append(name)
        else:
            source[name] = "extrapolate"
    if "extrapolate" not in source.values():
        why = (
            f" ({len(norms)} norm weights are copied from the last checkpoint unless --extrapolate-norms)"
            if norms
            else ""
        )
        raise UsageError(f"no floating-point tensors to extrapolate (check --include/--exclude){why}")
    untie = untied_head(h.base, h.checkpoints) and source[LM_HEAD_NAME] != "base"
    if h.base.lm_head_tied and not untie:
        source.pop(LM_HEAD_NAME, None)  # written tied, as the base: it is the embedding
    # A base that stores its own head keeps it whatever the checkpoints do (a checkpoint that ties
    # it reads its embedding as lm_head.weight): the output has exactly the base's tensors.
    return TensorPlan(source, untie, norms)


def check_history_tensors(h: History, plan: TensorPlan, used: list[int]) -> None:
    """Headers only: the checkpoints the method reads (indices `used`) hold every extrapolated
    tensor with the base's shape; the last one also the tensors copied from it."""
    ext, last = plan.of("extrapolate"), plan.of("last")
    T = len(h.steps)
    wanted = {i: list(ext) for i in used}
    if last:
        wanted.setdefault(T - 1, []).extend(last)
    for i, names in sorted(wanted.items()):
        ck = h.checkpoints[i]
        check_compatible(h.base, ck, names, label=f"{ck.label} (step {h.steps[i]})")
        ck.expect(names)
    h.base.expect(plan.names)


def nonfinite_history(h: History, name: str, cks: list[Checkpoint] | None = None) -> InputError:
    """Why the updates of `name` are not finite (error path: the inputs are read again)."""
    base = h.base.read_raw(name)
    if not all_finite(base):
        return nonfinite_error(h.base.label, name)
    for ck in cks or h.checkpoints:
        theirs = ck.read_raw(name)
        if not all_finite(theirs):
            return nonfinite_error(ck.label, name)
    return InputError(
        f"tensor {name!r}: its updates or their extrapolation overflow float32 "
        f"(|base values| up to {max_abs(base):.3g})"
    )


class TargetSink:
    """Where a method puts each target's update chunk: stored = (base + update).to(dtype), written
    at its place, its rounding measured (per target: tensor name -> RoundingStats)."""

    def __init__(self, h: History, writers: list, cks: list[Checkpoint]):
        self.h = h
        self.writers = writers
        self.cks = cks
        self.stats: list[dict[str, RoundingStats]] = [dict() for _ in writers]

    def write(self, j: int, name: str, start: int, base: torch.Tensor, update: torch.Tensor) -> None:
        """`base`: float32 chunk of θ₀; `update`: the float64 predicted update Δ̂ for target j."""
        dtype = self.writers[j].specs[name].dtype
        stored = (base.to(torch.float64) + update).to(dtype)
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
                b0 = raw.to(torch.float32) if from_base else self.h.base.read_flat(name, a, b)
                stat = rounding_stats(b0, raw.to(torch.float32) - b0, stored)
                if stat.introduced_nonfinite:  # non-finite where the base is finite
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
                if stat is not None and not from_base:
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
