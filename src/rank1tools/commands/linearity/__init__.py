"""`rank1 linearity`: how linear a run is, per tensor, before trusting `extrapolate --method relex`
or `--method linear` (docs/extrapolation.md). Read-only diagnostic: nothing but its report is written.

Per tensor, over the window's checkpoints t₁ < … < t_T (step 0 excluded; the trainer's steps):

- trajectory rank-1 and rank-r explained variance of M = [vec ΔW_t] (T × d, uncentred), from the
  float64 Gram matrix G = M Mᵀ (math.trajectory);
- R² of each top coefficient series c_t = (M V)_t, i ≤ r, against the step (math.linefit.LineFit);
- the share of elements whose per-element linear R² against the step exceeds 0.7 (RLVR
  linearity's headline). An element that does not change over the window has no R²: it is left
  out of that share and counted in `static_fraction`. The R² of an element is that of θ_t (float32
  values read exactly into float64): the same as ΔW_t's, without the float32 rounding of the
  subtraction. `sample`: only a seeded uniform subsample of the elements (sorted indices).
- with `r2_stats` (or any of `with_base`, `min_change`, `min_distinct`): the RLVR-linearity
  reference's figure, the mean and median per-element R² of the elements its filter keeps, the
  base optionally a point at step 0 (commands.linearity.element_r2). The share above 0.7 stays
  as it is (base left out, no filter).

Everything per tensor comes from ONE streaming pass (io.run_inputs.trajectory_chunks): each chunk
adds to G and to the per-element counts, so memory is O(T × chunk), whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...engine.executor_options import ExecutorOptions, task_device
from ...engine.tensor_units import (
    TensorGroup,
    TensorUnits,
    group_tensors,
    plan_bytes,
    progress_counter,
    run_tensor_groups,
)
from ...errors import InputError, UsageError
from ...io.checkpoint import Checkpoint
from ...io.compat import check_compatible, tensor_shapes
from ...io.output_lock import locked_output
from ...io.outputs import output_errors, staged_output
from ...io.run_inputs import chunk_elements, open_run_inputs, trajectory_chunks
from ...io.writer import provenance, write_provenance
from ...jsonutil import json_safe
from ...math.linefit import LineFit, fraction_above
from ...math.trajectory import gram_update, trajectory_basis
from ...plot_common import draw_plots
from ...plots import linearity_plots
from ...resources import check_largest_tensor, streaming_peak_bytes
from ...values import StepSelection
from ..gate import fail_below_gate
from .element_r2 import ElementR2Settings, TensorR2, row_columns
from .sampling import sample_indices
from .tables import FRAC_KEY, select_all, summarize, tensor_labels, write_tables

MIN_CHECKPOINTS = 3  # a line through 2 points always fits


@dataclass
class LinearityOptions:
    rank: int = 1
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    sample: int | None = None  # elements per tensor for the per-element R² (None: all)
    seed: int = 0
    fail_below: float | None = None  # gate on the element-weighted share of elements with R² > 0.7
    plots: bool = True
    device: str = "auto"
    chunk: int | None = None  # elements per chunk (default: io.run_inputs.chunk_elements)
    prefetch: bool = True
    # the RLVR-linearity reference's figure (commands/linearity/element_r2): mean and median
    # per-element R² of the kept elements; on with r2_stats or any setting off its default
    r2_stats: bool = False
    with_base: bool = False  # the base as step 0 in those fits (the share above 0.7 never includes it)
    min_change: float = 0.0
    min_distinct: int = 2

    def element_r2(self) -> ElementR2Settings | None:
        """The settings of the per-element R² figure, or None when it is not asked for."""
        settings = ElementR2Settings(self.with_base, self.min_change, self.min_distinct)
        return settings if self.r2_stats or settings != ElementR2Settings() else None


@dataclass
class LinearityResult:
    out: str
    steps: list[int]
    step_source: str
    rank: int
    rows: list[dict]
    summary: dict
    notes: list[str] = field(default_factory=list)
    gate: dict | None = None
    plots: list[str] = field(default_factory=list)
    plot_hint: str | None = None

    def to_dict(self) -> dict:
        return json_safe(
            {
                "out": self.out,
                "steps": self.steps,
                "step_source": self.step_source,
                "rank": self.rank,
                "tensors": len(self.rows),
                "summary": self.summary,
                "notes": self.notes,
                "gate": self.gate,
                "plots": self.plots,
            }
        )


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def tensor_figures(
    base: Checkpoint,
    checkpoints: list[Checkpoint],
    name: str,
    steps: list[int],
    rank: int,
    *,
    indices: np.ndarray | None = None,
    chunk: int | None = None,
    device="cpu",
    prefetch: bool = True,
    element_r2: ElementR2Settings | None = None,
) -> dict:
    """The figures of one tensor from one pass over its chunks: explained_1, explained_r,
    coef_r2 (r values), elements / changing / linear (counts over the evaluated elements); with
    `element_r2`, its figures under "element_r2" (commands.linearity.element_r2.TensorR2)."""
    t = torch.tensor(steps, dtype=torch.float64, device=device)
    G, linear, changing = None, 0, 0
    elements = base.entry(name).numel if indices is None else len(indices)
    acc = None if element_r2 is None else TensorR2(element_r2, steps, elements, device)
    for ch in trajectory_chunks(base, checkpoints, name, chunk=chunk, device=device, prefetch=prefetch):
        G = gram_update(G, ch.values - ch.base)  # ΔW_t in float32, the Gram sum in float64
        Y, B = ch.values, ch.base
        if indices is not None:
            lo, hi = np.searchsorted(indices, [ch.start, ch.stop])
            cols = torch.from_numpy(indices[lo:hi] - ch.start).to(device)
            Y, B = Y[:, cols], B[cols]
        if Y.shape[1]:
            r2 = LineFit().fit(t, Y).r2_
            above, moving, _ = fraction_above(r2)
            linear, changing = linear + above, changing + moving
            if acc is not None:
                acc.add(Y, B, r2)
    if not bool(torch.isfinite(G).all()):
        raise InputError(
            f"tensor {name!r}: non-finite values (NaN or Inf) in the base or a checkpoint, "
            f"or an update θ_t − θ₀ that overflows float32"
        )
    basis = trajectory_basis(G, rank)
    lam = basis.eigenvalues
    total = float(lam.sum())
    coef_r2 = LineFit().fit(t, basis.coefficients()).r2_.tolist()
    return {
        "explained_1": float(lam[0]) / total if total > 0 else math.nan,
        "explained_r": basis.explained_variance(),
        "coef_r2": coef_r2,
        "elements": elements,
        "changing": changing,
        "linear": linear,
        **({} if acc is None else {"element_r2": acc.figures()}),
    }


def _row(name: str, shape: tuple[int, ...], T: int, figs: dict, sampled: bool) -> dict:
    layer, mtype = tensor_labels(name, shape)
    frac = figs["linear"] / figs["changing"] if figs["changing"] else None
    return {
        "tensor": name,
        "layer": layer,
        "type": mtype,
        "numel": math.prod(shape),
        "T": T,
        "explained_1": _num(figs["explained_1"]),
        "explained_r": _num(figs["explained_r"]),
        **{f"coef_r2_{i + 1}": _num(v) for i, v in enumerate(figs["coef_r2"])},
        FRAC_KEY: frac,
        "static_fraction": 1.0 - figs["changing"] / figs["elements"],
        "elements": figs["elements"],
        "changing": figs["changing"],
        "linear": figs["linear"],
        "sampled": sampled,
        **({} if "element_r2" not in figs else row_columns(figs["element_r2"])),
    }


def check_options(options: LinearityOptions) -> None:
    """Option checks that need no input (the CLI runs them before importing torch)."""
    if options.rank < 1:
        raise UsageError(f"--rank {options.rank}: must be at least 1")
    if options.sample is not None and options.sample < 1:
        raise UsageError(f"--sample {options.sample}: must be at least 1")
    if options.seed < 0:
        raise UsageError(f"--seed {options.seed}: must be at least 0")
    if options.fail_below is not None and not math.isfinite(options.fail_below):
        raise UsageError(f"--fail-below {options.fail_below}: must be a finite number")
    if not (math.isfinite(options.min_change) and options.min_change >= 0):
        raise UsageError(f"--min-change {options.min_change}: must be a finite number, at least 0")
    if options.min_distinct < 1:
        raise UsageError(f"--min-distinct {options.min_distinct}: must be at least 1")


def linearity(
    base: str,
    checkpoints: list[str],
    out: str,
    *,
    run: str | None = None,
    steps: StepSelection | str | None = None,
    hub_run: dict | None = None,
    options: LinearityOptions = LinearityOptions(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    executor: ExecutorOptions = ExecutorOptions(),
) -> LinearityResult:
    """Measure every selected tensor's linearity over the window; write the report to `out`.
    `executor`: where the tensors are measured (rank1tools.engine.executors; with Ray, a task per group)."""
    check_options(options)
    inputs = open_run_inputs(base, checkpoints, run, steps, hub_run)
    notes = list(inputs.notes)
    pairs = [(s, c) for s, c in inputs.checkpoints if s != 0]
    if len(pairs) < len(inputs.checkpoints):
        notes.append(
            "the checkpoint at step 0 is left out (its update is the start of the trajectory, not a point on it)"
        )
    window = [s for s, _ in pairs]
    if len(pairs) < MIN_CHECKPOINTS:
        raise InputError(
            f"{run or 'CHECKPOINT arguments'}: {len(pairs)} checkpoints in the window (steps {window}); linearity needs "
            f"at least {MIN_CHECKPOINTS} (a line through 2 points always fits)"
        )
    if inputs.step_source == "position":
        notes.append(
            "steps are the checkpoints' positions 1..T: no distinct trainer step could be read from their paths"
        )
    cks = [c for _, c in pairs]
    shapes = tensor_shapes(inputs.base, cks)
    names = select_all(shapes, options.include, options.exclude)
    if not names:
        raise UsageError("no tensors selected (check --include/--exclude)")
    for s, ck in pairs:
        check_compatible(inputs.base, ck, names, label=f"{ck.label} (step {s})")
    for ck in (inputs.base, *cks):
        ck.expect(names)
    points = len(pairs) + options.with_base
    if options.element_r2() is not None and options.min_distinct > points:
        notes.append(
            f"--min-distinct {options.min_distinct} exceeds the {points} points of each fit: no element is kept"
        )
    rank = min(options.rank, len(pairs))
    if rank < options.rank:
        notes.append(f"--rank {options.rank} capped at the {len(pairs)} checkpoints of the window")
    device = task_device(options.device, executor)
    _check_memory(inputs.base, cks, names, options)
    with locked_output(out, force=force, inputs=inputs.local_paths()) as target:
        units = groups = None
        if executor.is_ray:  # figures per tensor from Ray tasks, recorded in the resumable work folder
            groups = group_tensors(names, lambda n: inputs.base.entry(n).nbytes * len(pairs))
            units = TensorUnits(
                target,
                plan_bytes(
                    "linearity", [inputs.base, *cks], {**asdict(options), "device": device.type, "rank": rank}, groups
                ),
            )
        figures = run_tensor_groups(
            _tensors_task,
            (inputs.base, cks, window, rank, options, str(device)),
            names,
            units=units,
            groups=groups,
            executor=executor,
            on_done=progress_counter(progress, len(names)),
        )
        with staged_output(target, force=force, label=out) as staging:
            result = _write_report(staging, inputs, cks, names, shapes, figures, window, rank, options, notes, out)
        if units is not None:
            units.finish()
    return result


def _check_memory(base: Checkpoint, cks: list[Checkpoint], names: list[str], options: LinearityOptions) -> None:
    """Refuse before any work when one tensor's streaming working set (resources.streaming_peak_bytes:
    T × chunk elements, whatever the tensor's size, plus a --sample's indices) exceeds the
    available memory: the check decompose and reconstruct make for their whole tensors."""
    T = len(cks)
    chunk = options.chunk or chunk_elements(T)

    def need(name: str) -> int:
        e = base.entry(name)
        item = max(c.entry(name).nbytes // max(1, e.numel) for c in (base, *cks))
        n = min(chunk, e.numel)
        peak = streaming_peak_bytes(T, n, item, sample=min(options.sample or 0, e.numel))
        if options.element_r2() is not None:  # the kept R² as float32; the filter's sort and the fit with the base
            peak += 4 * min(options.sample or e.numel, e.numel) + 36 * (T + options.with_base) * n
        return peak

    check_largest_tensor(names, need, lambda name: base.entry(name).shape)


def _tensor_figures(
    base: Checkpoint, cks: list[Checkpoint], name: str, window: list[int], rank: int, options: LinearityOptions, device
) -> dict:
    idx = sample_indices(base.entry(name).numel, options.sample, options.seed, name)
    return {
        **tensor_figures(
            base,
            cks,
            name,
            window,
            rank,
            indices=idx,
            chunk=options.chunk,
            device=device,
            prefetch=options.prefetch,
            element_r2=options.element_r2(),
        ),
        "sampled": idx is not None,
    }


def _tensors_task(
    group: TensorGroup,
    base: Checkpoint,
    cks: list[Checkpoint],
    window: list[int],
    rank: int,
    options: LinearityOptions,
    device: str,
    on_tensor: Callable[[int], None] | None = None,
) -> dict:
    """The figures of a group of tensors (in this process, or as a Ray task)."""
    figures = {}
    for name in group.names:
        figures[name] = _tensor_figures(base, cks, name, window, rank, options, torch.device(device))
        if on_tensor:
            on_tensor(1)
    return figures


def _write_report(
    staging: Path, inputs, cks, names, shapes, figures, window, rank, options, notes, out
) -> LinearityResult:
    """Tables, summary, provenance and plots from every tensor's figures, in the names' order."""
    rows = [_row(name, shapes[name], len(cks), figures[name], figures[name]["sampled"]) for name in names]
    element_r2 = options.element_r2()
    summary = summarize(rows, steps=window, rank=rank, sample=options.sample, seed=options.seed, element_r2=element_r2)
    gate = _gate(summary, options.fail_below)
    params = {
        "steps": window,
        "step_source": inputs.step_source,
        "rank": rank,
        "include": options.include,
        "exclude": options.exclude,
        "sample": options.sample,
        "seed": options.seed,
        "threshold": summary["threshold"],
        "fail_below": options.fail_below,
        **({} if element_r2 is None else {"element_r2": asdict(element_r2)}),
    }
    with output_errors(staging):
        write_tables(staging, rows, summary, rank, element_r2=element_r2 is not None)
        write_provenance(staging, provenance("linearity", [inputs.base, *cks], params))
        plots, hint = (
            draw_plots(lambda: linearity_plots(rows, staging / "plots", window)) if options.plots else ([], None)
        )
    return LinearityResult(
        out=out,
        steps=window,
        step_source=inputs.step_source,
        rank=rank,
        rows=rows,
        summary=summary,
        notes=notes,
        gate=gate,
        plots=[str(Path(out) / Path(p).relative_to(staging)) for p in plots],
        plot_hint=hint,
    )


def _gate(summary: dict, threshold: float | None) -> dict | None:
    return fail_below_gate(f"element-weighted {FRAC_KEY}", summary["headline"][FRAC_KEY], threshold)
