"""`rank1 backtest`'s tables (docs/commands/backtest.md#outputs): the overall rows (one per cut ×
later checkpoint), the per-tensor rows (tensor × cut × later checkpoint) and summary.json (per
cut: the recommended jump; the gate)."""

from __future__ import annotations

import json
from pathlib import Path

from ...engine.spectrum_tables import write_row_tables
from ...errors import InputError
from ...jsonutil import json_safe, read_json_file
from .figures import Sums, recommended_jump

FIGURES = ["rel_error", "cosine", "norm_ratio", "update_norm", "predicted_norm"]
OUTPUT_FIGURES = ["logprob_mad", "kl", "tokens"]  # with --data (output_space.py)
OVERALL_COLUMNS = ["cut", "target_step", "jump", "jump_windows", *FIGURES, "tensors", *OUTPUT_FIGURES]
TENSOR_COLUMNS = ["tensor", "source", "cut", "target_step", "jump", "jump_windows", *FIGURES]
OVERALL_NOTE = (
    "overall: the whole model's update as one vector (the tensors' sums of squares pooled), so each "
    "tensor weighs its update's squared norm; rel_error = ‖Δ̂ − Δ‖/‖Δ‖, cosine(Δ̂, Δ), norm_ratio = "
    "‖Δ̂‖/‖Δ‖ with Δ = θ_target − θ_base and Δ̂ the predicted update"
)


def _where(cp, target: int) -> dict:
    jump = target - cp.cut
    return {
        "cut": cp.cut,
        "target_step": target,
        "jump": jump,
        "jump_windows": jump / cp.window_length if cp.window_length > 0 else None,
    }


def build_rows(cuts: list, sinks: list, names: list[str]) -> tuple[list[dict], list[dict]]:
    """(overall rows, per-tensor rows) in cut, target, tensor order."""
    overall, tensors = [], []
    for cp, sink in zip(cuts, sinks):
        source = cp.history_pass.plan.source
        for j, target in enumerate(cp.targets):
            where = _where(cp, target)
            pooled, count = Sums(), 0
            for n in names:
                if n not in sink.sums:
                    continue
                s = sink.sums[n][j]
                pooled.add(s)
                count += 1
                tensors.append({"tensor": n, "source": source[n], **where, **s.figures()})
            overall.append({**where, **pooled.figures(), "tensors": count, **dict.fromkeys(OUTPUT_FIGURES)})
    return overall, tensors


def summarize(cuts: list, overall: list[dict], max_error: float, gate: dict | None, parameters: dict) -> dict:
    """Per cut: its window, the figures at its shortest and longest jump, the recommended jump."""
    per_cut = []
    for cp in cuts:
        rows = [r for r in overall if r["cut"] == cp.cut]
        per_cut.append(
            {
                "cut": cp.cut,
                "fit_steps": cp.history_pass.history.steps,
                "window_start": cp.window_start,
                "window_length": cp.window_length,
                "targets": cp.targets,
                "shortest": {k: rows[0].get(k) for k in ("jump", *FIGURES[:3], *OUTPUT_FIGURES[:2])},
                "longest": {k: rows[-1].get(k) for k in ("jump", *FIGURES[:3], *OUTPUT_FIGURES[:2])},
                **recommended_jump(rows, max_error),
            }
        )
    return {
        **parameters,
        "max_error": max_error,
        "note": OVERALL_NOTE,
        "cuts": per_cut,
        "recommended_jump": min(c["recommended_jump"] for c in per_cut),
        "recommended_jump_windows": min(c["recommended_jump_windows"] for c in per_cut),
        "gate": gate,
    }


def write_tables(folder: Path, overall: list[dict], tensors: list[dict], summary: dict) -> None:
    """backtest.csv / .jsonl (overall), tensors.csv / .jsonl and summary.json."""
    write_row_tables(folder, "backtest", overall, OVERALL_COLUMNS)
    write_row_tables(folder, "tensors", tensors, TENSOR_COLUMNS)
    (folder / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")


def read_recommended_jump(folder: str | Path, cut: int | None = None) -> int:
    """The recommended jump a backtest output holds (its summary.json): of `cut`, or the smallest
    over its cuts; what the re-grounding callback can take its N from. A missing or foreign file,
    or a cut it lacks, is an InputError naming the file."""
    path = Path(folder) / "summary.json"
    summary = read_json_file(path, "a backtest summary")
    try:
        cuts = {int(c["cut"]): int(c["recommended_jump"]) for c in summary["cuts"]}
        overall = int(summary["recommended_jump"])
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path}: not a rank1 backtest summary (no cuts with a recommended_jump)") from None
    if cut is None:
        return overall
    if cut not in cuts:
        raise InputError(f"{path}: no cut at step {cut} (cuts: {', '.join(map(str, sorted(cuts)))})")
    return cuts[cut]
