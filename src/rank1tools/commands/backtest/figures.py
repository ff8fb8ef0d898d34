"""`rank1 backtest`'s figures (docs/commands/backtest.md#figures): per tensor, cut and later
checkpoint, the sums that give the relative error of the predicted update, its cosine with the
real one and their norm ratio; the overall figures pool the sums over tensors (the whole model's
update as one vector: norm-weighted); the recommended jump of a cut.

The predicted update of an extrapolated tensor comes from the method's own per-tensor fit
(the cut's HistoryPass.tensor_fn) through `MeasureSink`, which takes the place of extrapolate's
TargetSink: each predicted chunk is compared with the same elements of the real later
checkpoint, read then, and nothing is written. Tensors the method does not extrapolate are
predicted as `extrapolate` writes them: the cut's values (`last`) or the base's (`base`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...engine.checkpoint_outputs import nonfinite_error
from ...io.run_inputs import trajectory_chunks
from ...math.finite import all_finite


@dataclass
class Sums:
    """Σ(Δ̂ − Δ)², ΣΔ², ΣΔ̂², ΣΔ̂·Δ over some elements (float64)."""

    err2: float = 0.0
    real2: float = 0.0
    pred2: float = 0.0
    dot: float = 0.0

    def add(self, other: Sums) -> None:
        self.err2 += other.err2
        self.real2 += other.real2
        self.pred2 += other.pred2
        self.dot += other.dot

    def figures(self) -> dict:
        """rel_error ‖Δ̂ − Δ‖/‖Δ‖, cosine(Δ̂, Δ), norm_ratio ‖Δ̂‖/‖Δ‖ (NaN where a norm is 0)."""
        real, pred = math.sqrt(self.real2), math.sqrt(self.pred2)
        return {
            "rel_error": math.sqrt(self.err2) / real if real > 0 else math.nan,
            "cosine": self.dot / (real * pred) if real > 0 and pred > 0 else math.nan,
            "norm_ratio": pred / real if real > 0 else math.nan,
            "update_norm": real,
            "predicted_norm": pred,
        }


class MeasureSink:
    """In place of extrapolate's TargetSink: `write(j, name, start, base, update)` compares the
    predicted float64 update chunk with θ_j − θ₀ of the j-th later checkpoint over the same elements."""

    def __init__(self, targets: list):
        self.targets = targets  # the later checkpoints, in the pass's target order
        self.sums: dict[str, list[Sums]] = {}

    def write(self, j: int, name: str, start: int, base: torch.Tensor, update: torch.Tensor) -> None:
        ck = self.targets[j]
        real = ck.read_flat(name, start, start + update.shape[0])
        if not all_finite(real):
            raise nonfinite_error(ck.label, name)
        delta = real.to(update.device, torch.float64) - base.to(torch.float64)
        diff = update - delta
        s = self.sums.setdefault(name, [Sums() for _ in self.targets])[j]
        s.add(Sums(float(diff @ diff), float(delta @ delta), float(update @ update), float(update @ delta)))


def measure_tensor(name: str, cuts: list, sinks: list[MeasureSink]) -> None:
    """Every cut's prediction of `name` against every later checkpoint (one tensor at a time)."""
    for cp, sink in zip(cuts, sinks):
        p = cp.history_pass
        source = p.plan.source.get(name)
        if source == "extrapolate":
            p.tensor_fn(name, sink)  # the method's fit, as extrapolate runs it
        elif source in ("last", "base"):
            held_prediction(p.history, name, source, sink)


def held_prediction(h, name: str, source: str, sink: MeasureSink) -> None:
    """A tensor extrapolate copies: Δ̂ = θ_cut − θ₀ (`last`) or 0 (`base`) for every target."""
    for ch in trajectory_chunks(h.base, [h.last], name, device=h.device):
        b64 = ch.base.to(torch.float64)
        pred = torch.zeros_like(b64) if source == "base" else ch.values[0].to(torch.float64) - b64
        for j in range(len(sink.targets)):
            sink.write(j, name, ch.start, ch.base, pred)


def compared_names(cuts: list) -> list[str]:
    """The floating-point tensors some cut's plan writes, in the first plan's order."""
    names: dict[str, None] = {}
    for cp in cuts:
        h = cp.history_pass.history
        for n in cp.history_pass.plan.names:
            if h.base.entry(n).torch_dtype.is_floating_point:
                names.setdefault(n)
    return list(names)


def check_memory(cuts: list, names: list[str]) -> None:
    """Refuse before any work when one tensor's working set under some cut's fit exceeds the
    available memory: extrapolate's estimate (resources.streaming_peak_bytes over the checkpoints
    the fit reads, one target at a time: the sink holds no prediction) plus the later chunk read."""
    from ...io.run_inputs import chunk_elements
    from ...resources import check_largest_tensor, streaming_peak_bytes
    from ..extrapolate.history import HISTORY_BUDGET

    def need(name: str) -> int:
        peak = 0
        for cp in cuts:
            p = cp.history_pass
            e = p.history.base.entry(name)
            T = len(p.read) if p.plan.source.get(name) == "extrapolate" else 1
            chunk = min(chunk_elements(T, HISTORY_BUDGET), e.numel)
            peak = max(peak, streaming_peak_bytes(T, chunk, max(4, e.nbytes // max(1, e.numel)), targets=2))
        return peak

    check_largest_tensor(names, need, lambda name: cuts[0].history_pass.history.base.entry(name).shape)


def recommended_jump(rows: list[dict], max_error: float) -> dict:
    """The largest jump of one cut (rows in jump order) up to which every overall error is below
    `max_error`: 0 when the first jump already fails; `limited_by_run` when every jump the run
    holds passes (the true N may be larger)."""
    best = None
    for r in rows:
        e = r["rel_error"]
        if not (isinstance(e, float) and math.isfinite(e) and e < max_error):
            break
        best = r
    return {
        "recommended_jump": best["jump"] if best else 0,
        "recommended_jump_windows": best["jump_windows"] if best else 0.0,
        "limited_by_run": best is rows[-1] if rows else False,
    }
