"""The spectrum tables of `rank1 decompose` (docs/formats.md, "Factor store"): one row per module
and step from the stored factors, the CSV / JSON Lines files, and the summary by type and step."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ..jsonutil import json_safe
from ..math.spectrum import BOUND_FIGURES, figure_bounds, spectrum_figures
from ..modules import LM_HEAD_NAME, is_embedding, parse_matrix_module

TYPE_ORDER = {t: i for i, t in enumerate(["q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down"])}


def module_labels(name: str, shape: tuple[int, ...]) -> tuple[int | None, str]:
    """(layer, type) for a spectrum row; non-matrix 2-D tensors get embedding / lm_head / their name."""
    mod = parse_matrix_module(name, shape)
    if mod is not None:
        return mod.layer, mod.type
    if name == LM_HEAD_NAME:
        return None, "lm_head"
    if is_embedding(name):
        return None, "embedding"
    return None, name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name


def module_expert(name: str, shape: tuple[int, ...]) -> int | str | None:
    """A spectrum row's expert: the routed expert's index, "shared", or None (a dense module)."""
    mod = parse_matrix_module(name, shape)
    return None if mod is None else mod.expert


COLUMNS_HEAD = [
    "module",
    "layer",
    "type",
    "expert",
    "step",
    "rows",
    "cols",
    "k",
    "svd_method",
    "iterations",
    "fro",
    "rel_update",
]
COLUMNS_TAIL = ["energy_1", "energy_k", "rank1pct_k", "energy_rank1pct", "norm_frac_1", "stable_rank"]
# after the figures (their columns keep their places): the certified bounds (docs/formats.md)
COLUMNS_BOUNDS = BOUND_FIGURES


def spectrum_rows(
    name: str, shape: tuple[int, ...], data: dict, methods: list[str], iterations: list[int] | None = None
) -> list[dict]:
    """One row per step from a module's stored S, S_bound, fro, base_fro and steps; `iterations`: the
    power iterations each step's SVD ran (None: not recorded, an empty cell). A store without
    S_bound (written before bounds were recorded) gives empty bound cells."""
    layer, mtype = module_labels(name, shape)
    expert = module_expert(name, shape)
    base_fro = float(data["base_fro"][0])
    out = []
    for j, step in enumerate(data["steps"].tolist()):
        sig = [float(x) for x in data["S"][j]]
        bounds = [float(x) for x in data["S_bound"][j]] if "S_bound" in data else None
        fro = float(data["fro"][j])
        figs = spectrum_figures(sig, fro, base_fro, (shape[0], shape[1]))
        figs.update(figure_bounds(sig, bounds, fro, (shape[0], shape[1])))
        out.append(
            {
                "module": name,
                "layer": layer,
                "type": mtype,
                "expert": expert,
                "step": step,
                "rows": shape[0],
                "cols": shape[1],
                "k": len(sig),
                "svd_method": methods[j],
                "iterations": iterations[j] if iterations is not None else None,
                **figs,
            }
        )
    return out


def write_row_tables(folder: Path, stem: str, rows: list[dict], cols: list[str]) -> None:
    """STEM.csv and STEM.jsonl with the given columns; None and NaN are an empty cell / null."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if (v := r.get(c)) is None or (isinstance(v, float) and math.isnan(v)) else v for c in cols])
    (folder / f"{stem}.csv").write_text(buf.getvalue())
    with open(folder / f"{stem}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(json_safe({c: r.get(c) for c in cols})) + "\n")


def write_spectrum_tables(folder: Path, rows: list[dict], k: int) -> None:
    write_row_tables(folder, "spectrum", rows, spectrum_columns(k))


def spectrum_columns(k: int) -> list[str]:
    """The spectrum table's columns: those before issue #25 in their places, then the bounds."""
    sig = [f"sigma_{i + 1}" for i in range(k)]
    return COLUMNS_HEAD + sig + COLUMNS_TAIL + [f"{c}_bound" for c in sig] + COLUMNS_BOUNDS


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(rows: list[dict]) -> dict:
    """Mean energy_1 and norm_frac_1 overall, by module type and by checkpoint step; with experts
    (a mixture-of-experts model) also by expert, routed experts in index order, then "shared"."""

    def group(key):
        groups: dict = {}
        order = (
            sorted(rows, key=lambda r: (TYPE_ORDER.get(r[key], len(TYPE_ORDER)), str(r[key])))
            if key == "type"
            else rows
        )
        for r in order:
            groups.setdefault(r[key], []).append(r)
        return {
            str(g): {
                "energy_1": _mean([r["energy_1"] for r in rs]),
                "norm_frac_1": _mean([r["norm_frac_1"] for r in rs]),
                "n": len(rs),
            }
            for g, rs in groups.items()
        }

    summary = {
        "overall": {
            "energy_1": _mean([r["energy_1"] for r in rows]),
            "norm_frac_1": _mean([r["norm_frac_1"] for r in rows]),
            "n": len(rows),
        },
        "by_type": group("type"),
        "by_step": group("step"),
    }
    experts = [r for r in rows if r.get("expert") is not None]
    if experts:
        summary["by_expert"] = by_expert(experts)
    return summary


def by_expert(rows: list[dict]) -> dict:
    """Per expert (over its modules, layers and steps): mean energy_1 and norm_frac_1, and the mean
    relative update, which says which experts moved."""
    groups: dict = {}
    for r in sorted(rows, key=lambda r: (isinstance(r["expert"], str), str(r["expert"]).zfill(8))):
        groups.setdefault(str(r["expert"]), []).append(r)
    return {
        g: {
            "energy_1": _mean([r["energy_1"] for r in rs]),
            "norm_frac_1": _mean([r["norm_frac_1"] for r in rs]),
            "rel_update": _mean([r["rel_update"] for r in rs]),
            "n": len(rs),
        }
        for g, rs in groups.items()
    }
