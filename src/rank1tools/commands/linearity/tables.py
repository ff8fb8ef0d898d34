"""The tables of `rank1 linearity` (docs/formats.md): which tensors, their (layer, type) labels,
the per-tensor row, the summary (means overall and by type, the element-weighted headline, the
least linear tensors) and the CSV / JSON Lines / JSON files.

Types: a matrix module keeps its module type (q, k, v, o, gate, up, down, ...; docs/concepts.md#words);
every other tensor gets one of `NON_MATRIX_TYPES`:
  embedding  the token embedding (`embed_tokens.weight`, `wte.weight`, ...)
  lm_head    `lm_head.weight` (a tied head is the embedding and is not a tensor of its own)
  norm       a 1-D `.weight` whose module is a norm (`*norm*`, `ln_*`, `ln_f`)
  bias       any `.bias`
  other      anything else (position embeddings, scales, buffers saved with the weights)
Norms and biases inside a decoder block keep the block's layer index.
"""

from __future__ import annotations

import csv
import io
import json
import math
from fnmatch import fnmatchcase
from pathlib import Path

from ...engine.spectrum_tables import TYPE_ORDER, module_labels, write_row_tables
from ...jsonutil import json_safe
from ...math.linefit import FRAC_KEY, R2_LINEAR
from ...modules import (
    LM_HEAD_NAME,
    expert_slice_name,
    is_embedding,
    is_fused_experts,
    is_norm_parameter,
    layer_index,
    parse_matrix_module,
)
from .element_r2 import COLUMNS as R2_COLUMNS
from .element_r2 import by_layer, pooled, settings_record

NON_MATRIX_TYPES = ("norm", "bias", "embedding", "lm_head", "other")
_ORDER = {**TYPE_ORDER, **{t: len(TYPE_ORDER) + i for i, t in enumerate(NON_MATRIX_TYPES)}}
HEAD = ["tensor", "layer", "type", "numel", "T", "explained_1", "explained_r"]
TAIL = [FRAC_KEY, "static_fraction", "elements", "changing", "linear", "sampled"]
MEAN_KEYS = ["explained_1", "explained_r", "coef_r2_1", FRAC_KEY, "static_fraction"]
LEAST_LINEAR = 10


def tensor_labels(name: str, shape: tuple[int, ...]) -> tuple[int | None, str]:
    """(layer, type) of any tensor (see the module doc)."""
    if parse_matrix_module(name, shape) is not None or name == LM_HEAD_NAME or is_embedding(name):
        return module_labels(name, shape)  # as decompose's tables label them
    if is_fused_experts(name, shape):  # every expert's matrix of one projection: that projection's type
        return module_labels(expert_slice_name(name, 0), tuple(shape[1:]))
    layer = layer_index(name)
    if name.endswith(".bias"):
        return layer, "bias"
    if name.endswith(".weight") and is_norm_parameter(name, shape):
        return layer, "norm"
    return layer, "other"


def type_key(t: str) -> tuple:
    return (_ORDER.get(t, len(_ORDER)), t)


def select_all(shapes: dict[str, tuple[int, ...]], include: list[str], exclude: list[str]) -> list[str]:
    """Every tensor with at least 2 elements (RELEX and RLVR linearity look at all of them), in
    file order; `include` globs restrict, `exclude` globs remove (fnmatchcase)."""
    out = []
    for name, shape in shapes.items():
        if math.prod(shape) < 2:
            continue
        if include and not any(fnmatchcase(name, g) for g in include):
            continue
        if not any(fnmatchcase(name, g) for g in exclude):
            out.append(name)
    return out


def columns(rank: int, element_r2: bool = False) -> list[str]:
    return HEAD + [f"coef_r2_{i + 1}" for i in range(rank)] + TAIL + (R2_COLUMNS if element_r2 else [])


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def weighted(rows: list[dict]) -> tuple[float | None, float | None]:
    """(fraction of changing elements with R² > 0.7, fraction of static elements), element-weighted
    over the tensors' sizes: a sampled tensor's counts are scaled by numel / elements, so that each
    tensor weighs its size, not its sample size."""
    above = changing = total = 0.0
    for r in rows:
        scale = r["numel"] / r["elements"]
        above += r["linear"] * scale
        changing += r["changing"] * scale
        total += r["numel"]
    frac = above / changing if changing else None
    static = (total - changing) / total if total else None
    return frac, static


def _group(rows: list[dict], element_r2: bool = False) -> dict:
    frac, static = weighted(rows)
    return {
        **{f"mean_{k}": _mean([r[k] for r in rows]) for k in MEAN_KEYS},
        FRAC_KEY: frac,
        "static_fraction": static,
        "numel": sum(r["numel"] for r in rows),
        "n": len(rows),
        **(pooled(rows) if element_r2 else {}),
    }


def summarize(rows: list[dict], *, steps: list[int], rank: int, sample: int | None, seed: int, element_r2=None) -> dict:
    """Means overall and by type, the element-weighted headline and the least linear tensors;
    with `element_r2` (its ElementR2Settings), the per-element R² figure beside the share: in the
    headline, the groups, `by_layer` and `element_r2` (docs/formats.md#linearity-tables)."""
    on = element_r2 is not None
    by_type: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: type_key(r["type"])):
        by_type.setdefault(r["type"], []).append(r)
    frac, static = weighted(rows)
    overall = _group(rows, on)
    ranked = sorted(
        (r for r in rows if r[FRAC_KEY] is not None and not math.isnan(r[FRAC_KEY])),
        key=lambda r: (r[FRAC_KEY], r["tensor"]),
    )
    return {
        "steps": steps,
        "T": len(steps),
        "rank": rank,
        "threshold": R2_LINEAR,
        "sample": sample,
        "seed": seed if sample is not None else None,
        "headline": {
            FRAC_KEY: frac,
            "static_fraction": static,
            "numel": sum(r["numel"] for r in rows),
            "note": (
                f"share of the elements that change over the window whose per-element linear R² against "
                f"the step exceeds {R2_LINEAR}, weighted by tensor size; elements that do not change have "
                f"no R², are left out of it and counted in static_fraction"
                + (f"; estimated from a seeded sample of up to {sample} elements per tensor" if sample else "")
            ),
            **({"r2_mean": overall["r2_mean"], "r2_median": overall["r2_median"]} if on else {}),
        },
        "mean": overall,
        "by_type": {t: _group(rs, on) for t, rs in by_type.items()},
        "least_linear": [
            {
                "tensor": r["tensor"],
                "layer": r["layer"],
                "type": r["type"],
                FRAC_KEY: r[FRAC_KEY],
                "explained_1": r["explained_1"],
            }
            for r in ranked[:LEAST_LINEAR]
        ],
        **({"by_layer": by_layer(rows), "element_r2": settings_record(element_r2, rows, sample)} if on else {}),
    }


def write_tables(folder: Path, rows: list[dict], summary: dict, rank: int, element_r2: bool = False) -> None:
    """linearity.csv / .jsonl, by_type.csv and summary.json (`element_r2`: with its columns)."""
    write_row_tables(folder, "linearity", rows, columns(rank, element_r2))
    keys = [f"mean_{k}" for k in MEAN_KEYS] + [FRAC_KEY, "static_fraction"] + (R2_COLUMNS if element_r2 else [])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["type", "tensors", "numel"] + keys)
    for t, g in summary["by_type"].items():
        w.writerow([t, g["n"], g["numel"]] + ["" if g[k] is None else g[k] for k in keys])
    (folder / "by_type.csv").write_text(buf.getvalue())
    (folder / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
