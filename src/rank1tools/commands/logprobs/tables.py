"""The tables and the summary of `rank1 logprobs` (docs/formats.md#logprobs-tables).

sequences.csv/.jsonl (one row per sequence), trajectories.csv/.jsonl (summed log-prob per sequence
and step), buckets.csv/.jsonl (early / middle / late thirds), steps.csv/.jsonl (per step means) and
summary.json. None and NaN are an empty cell / null; same figures, same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ...engine.spectrum_tables import write_row_tables
from ...io.logprob_store import SequenceEntry
from ...jsonutil import json_safe
from ...math.linefit import R2_LINEAR
from .figures import FRAC_KEY, Figures

R2_COLUMNS = ["kept", "linear", FRAC_KEY, "r2_mean", "r2_median"]
SEQUENCE_COLUMNS = ["sequence", "id", "line", "tokens", *R2_COLUMNS, "sum_r2", "sum_logprob_first", "sum_logprob_last"]
BUCKET_COLUMNS = ["bucket", "tokens", *R2_COLUMNS]
STEP_COLUMNS = ["step", "mean_logprob_per_token", "mean_logprob_per_sequence"]


def sequence_rows(seqs: list[SequenceEntry], figs: Figures) -> list[dict]:
    return [{"sequence": i, "id": s.id, "line": s.line, **f} for i, (s, f) in enumerate(zip(seqs, figs.sequences))]


def _trajectories(folder: Path, seqs: list[SequenceEntry], steps: list[int], figs: Figures) -> None:
    """trajectories.csv: sequence × step (columns step_<S>); .jsonl: per sequence its series."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sequence", "id", "line", *(f"step_{s}" for s in steps)])
    for i, s in enumerate(seqs):
        w.writerow([i, "" if s.id is None else s.id, s.line, *(float(v) for v in figs.sums[:, i])])
    (folder / "trajectories.csv").write_text(buf.getvalue())
    with open(folder / "trajectories.jsonl", "w") as f:
        for i, s in enumerate(seqs):
            row = {"sequence": i, "id": s.id, "line": s.line, "steps": steps, "sum_logprob": figs.sums[:, i].tolist()}
            f.write(json.dumps(json_safe(row)) + "\n")


def summarize(
    figs: Figures, *, steps: list[int], seqs: list[SequenceEntry], min_change: float, min_distinct: int, extra: dict
) -> dict:
    """summary.json: the headline (share of kept tokens with R² > 0.7, mean and median R²), the
    filter's counts, the sequences' summed log-prob figures, the buckets and the per-step means."""
    tokens = int(figs.token_r2.size)
    sum_r2 = [v for v in figs.sum_r2.tolist() if not math.isnan(v)]
    sums_above = sum(v > R2_LINEAR for v in sum_r2)
    return json_safe(
        {
            "steps": steps,
            "T": len(steps),
            **extra,
            "sequences": len(seqs),
            "tokens": tokens,
            "threshold": R2_LINEAR,
            "filter": {
                "min_change": min_change,
                "min_distinct": min_distinct,
                "removed_min_change": figs.removed_min_change,
                "removed_min_distinct": figs.removed_min_distinct,
                "kept": figs.overall["kept"],
            },
            "headline": {
                **figs.overall,
                "note": (
                    f"share of the kept tokens whose log-prob's linear R² against the step exceeds {R2_LINEAR}; "
                    "a token is kept when its log-prob's range exceeds min_change and it takes at least "
                    "min_distinct distinct values"
                ),
            },
            "sequence_sums": {
                "sequences": len(sum_r2),
                "linear": sums_above,
                FRAC_KEY: sums_above / len(sum_r2) if sum_r2 else None,
                "r2_mean": sum(sum_r2) / len(sum_r2) if sum_r2 else None,
            },
            "buckets": {b["bucket"]: {k: v for k, v in b.items() if k != "bucket"} for b in figs.buckets},
            "per_step": figs.per_step,
        }
    )


def write_tables(folder: Path, seqs: list[SequenceEntry], steps: list[int], figs: Figures, summary: dict) -> None:
    write_row_tables(folder, "sequences", sequence_rows(seqs, figs), SEQUENCE_COLUMNS)
    write_row_tables(folder, "buckets", figs.buckets, BUCKET_COLUMNS)
    write_row_tables(folder, "steps", figs.per_step, STEP_COLUMNS)
    _trajectories(folder, seqs, steps, figs)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
