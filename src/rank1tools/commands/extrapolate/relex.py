"""`rank1 extrapolate relex`: trajectory rank-r extrapolation (docs/extrapolation.md).

Per tensor, M is the T × d matrix of the history's updates ΔW_t (float32, uncentred), never held
whole. Pass 1 streams column chunks of M into the Gram matrix G = M Mᵀ (float64); its
eigendecomposition gives the coefficients C = U_r σ_r of the top-r trajectory directions. Each
coefficient series is fitted with a line over the last W history points, on the step numbers
(or, with --position-index, on the reference code's positions 0..W−1, wrong for uneven spacing).
Pass 2 streams M again and writes, for every target s, θ̂(s) = θ₀ + Mᵀ w(s) with w(s) the weights
that turn the predicted coefficients a + b·s into a combination of the checkpoints' updates.
Memory is O(T × chunk) per pass, nothing is written to disk but the outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...engine.executor_options import ExecutorOptions
from ...errors import UsageError
from .base import ExtrapolateResult, HistoryOptions

if TYPE_CHECKING:
    from ...io.run_inputs import RunInputs
    from .history import History, HistoryPass
    from .history_write import TargetSink


@dataclass
class RelexOptions(HistoryOptions):
    """`rank1 extrapolate relex`: the history options, the trajectory rank r and the fit's axis."""

    method: ClassVar[str] = "relex"
    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {"rank": ("--rank", "-k"), "position_index": ("--position-index",)}

    rank: int = 1
    position_index: bool = False

    def check(self) -> None:
        super().check()
        if self.rank < 1:
            raise UsageError(f"--rank {self.rank}: must be at least 1")


def extrapolate_relex(
    base: str,
    out: str,
    *,
    options: RelexOptions,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    executor: ExecutorOptions = ExecutorOptions(),
) -> ExtrapolateResult:
    """Write θ̂(s) for every --target-step s from the trajectory rank-r fit of the history."""
    from .history_write import write_pass

    return write_pass(relex_pass(base, options, executor), out, options, force, progress, executor)


def relex_pass(
    base: str, options: RelexOptions, executor: ExecutorOptions = ExecutorOptions(), inputs: RunInputs | None = None
) -> HistoryPass:
    """The checked history, plan and per-tensor fit of θ̂(s) for every --target-step s."""
    from ...math.linefit import positions_for
    from .history import HistoryPass, check_history_tensors, open_history, plan_tensors, window_size

    options.check()  # a caller may have changed a field since construction
    h = open_history(base, options, executor, inputs)  # `inputs`: history.open_history
    T = len(h.steps)
    if options.rank > T:
        raise UsageError(
            f"--rank {options.rank} exceeds the {T} history checkpoints (steps {h.steps[0]}..{h.steps[-1]})"
        )
    W = window_size(options, T)
    plan = plan_tensors(h, options, copy_norms=False)
    check_history_tensors(h, plan, list(range(T)))
    window = h.steps[-W:]
    if options.position_index:
        t_fit, x_targets = positions_for(window, [float(s) for s in h.targets])
    else:
        t_fit, x_targets = [float(s) for s in window], [float(s) for s in h.targets]
    notes = []
    gaps = {b - a for a, b in zip(window, window[1:])}
    if options.position_index and len(gaps) > 1:
        notes.append(
            f"--position-index fits on positions 0..{W - 1} although the window's steps are unevenly "
            f"spaced ({', '.join(map(str, window))}): the reference code's axis, not the steps"
        )
    params = {
        "rank": options.rank,
        "fit_window": W,
        "fit_steps": window,
        "position_index": options.position_index,
        "fit_axis": "position" if options.position_index else "step",
    }

    def one(name: str, sink: TargetSink) -> dict:
        return _relex_tensor(h, name, sink, options.rank, W, t_fit, x_targets)

    return HistoryPass(h, plan, one, list(range(T)), params, notes)


def _relex_tensor(
    h: History, name: str, sink: TargetSink, r: int, W: int, t_fit: list[float], x_targets: list[float]
) -> dict:
    import torch

    from ...math.linefit import LineFit
    from ...math.trajectory import combine, gram_update, trajectory_basis
    from .history import history_chunks, nonfinite_history

    T = len(h.steps)
    G = None
    for ch in history_chunks(h, h.checkpoints, name):  # pass 1: G = Σ M Mᵀ
        G = gram_update(G, ch.values.sub_(ch.base))  # M = θ_t − θ₀ in float32, in place (the chunk is ours)
    if not bool(torch.isfinite(G).all()):
        raise nonfinite_history(h, name)
    basis = trajectory_basis(G, r)
    C = basis.coefficients()  # T × r
    fit = LineFit().fit(t_fit, C[T - W :])
    predicted = [fit.predict(x) for x in x_targets]  # r coefficients per target
    weights = [basis.weights(c) for c in predicted]
    live = basis.sigma > 0
    last_norm = math.sqrt(max(float(G[T - 1, T - 1]), 0.0))
    ratios = [float(torch.linalg.vector_norm(c[live])) / last_norm if last_norm > 0 else math.nan for c in predicted]
    for ch in history_chunks(h, h.checkpoints, name):  # pass 2: write every target
        M64 = ch.values.sub_(ch.base).to(torch.float64)
        for j, w in enumerate(weights):
            sink.write(j, name, ch.start, ch.base, combine(M64, w))
    common = {
        "numel": h.base.entry(name).numel,
        "explained_variance": basis.explained_variance(),
        "sigma": basis.sigma.tolist(),
        "r2": fit.r2_.tolist(),
        "slope": fit.slope_.tolist(),
        "intercept": fit.intercept_.tolist(),
        "last_update_norm": last_norm,
    }
    return {
        "common": common,
        "per_target": [{"norm_ratio": q, "coefficients": c.tolist()} for q, c in zip(ratios, predicted)],
    }


run = extrapolate_relex
