"""What `extrapolate relex` and `extrapolate linear` share (docs/extrapolation.md).

Both read a history of checkpoints (CHECKPOINT arguments or --run, cut at --history-until, step 0
left out: it is the base), pick the tensors to extrapolate, and stream every tensor in element
chunks, writing one checkpoint per target step in the same pass. This module opens and checks the
history and plans the tensors (where each one's values come from); the write pass, with the
`TargetSink` a method hands each target's update chunk to, is history_write.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from ...engine.checkpoint_outputs import (
    nonfinite_error,
)
from ...engine.executor_options import ExecutorOptions, task_device
from ...errors import InputError, UsageError
from ...io.checkpoint import Checkpoint
from ...io.compat import check_compatible, tensor_shapes, untied_head
from ...io.run_inputs import RunInputs, chunk_elements, open_run_inputs, trajectory_chunks
from ...math.finite import all_finite, max_abs
from ...modules import LM_HEAD_NAME, is_norm_parameter
from .base import HistoryOptions

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


def open_history(
    base: str, options: HistoryOptions, executor: ExecutorOptions = ExecutorOptions(), inputs: RunInputs | None = None
) -> History:
    """Open the inputs and check what every history method needs: at least two checkpoints after
    step 0 and no target before the first of them (targets inside the history are allowed).
    `inputs`: the run already opened from the same source options (a backtest opens it once for
    all its cuts, so that every cut reads the same checkpoints and revisions)."""
    method = options.method
    if inputs is None:
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


@dataclass
class HistoryPass:
    """A history method ready to run on its inputs: the opened history, the tensor plan, the
    per-tensor function that hands each target's predicted update to a sink (history_write's
    TargetSink when `extrapolate` writes it; `backtest` measures it against later checkpoints),
    the history checkpoints it reads (indices), its parameters and notes."""

    history: History
    plan: TensorPlan
    tensor_fn: Callable  # (name, sink) -> figures, see history_write.TensorFn
    read: list[int]
    params: dict
    notes: list[str]


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
