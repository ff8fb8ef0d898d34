"""The report block every benchmark writes beside its raw data: the schema, defined once.

A results file `benchmarks/results/<name>.json` (written by `benchmarks/bench_<name>.py`) holds the
script's raw data plus
  "machine_info": machine()   recorded when the run starts (end load average added at the end)
  "quick":        true for a `--quick` run (tiny sizes: checks the script, measures nothing)
  "report":       summarise(raw), a dict:
    schema    SCHEMA
    name      the results file's stem; script: "benchmarks/bench_<name>.py"
    title     section title; issue: "#N" (the issue whose benchmark this is)
    quick     bool
    measured  one paragraph of prose: what was measured (constant text in the script)
    machine   the raw file's machine_info (legacy files: what they recorded, the rest null)
    table     {"memory": label of the memory column or null,
               "rows": [{case, seconds (median), runs, baseline (another row's case or null),
                         ratio (seconds / the baseline row's seconds), peak_bytes (or null)}]}
    tables    extra figures: [{title, columns: [label...], rows: [[number | string | null, ...]]}]
    targets   [{name, target (prose), comparison ("<=" or ">="), threshold, measured, unit,
                met (computed here from measured, never typed), limit (constant prose chosen by met)}]
    notes     what limits the figures: [prose]
`benchmarks/report.py` turns these blocks into docs/benchmarks.md. Every script has
`summarise(raw) -> report`, used after a run and by report.py on results files without a block.
"""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = 1
HERE = Path(__file__).resolve().parent
COMPARISONS = {"<=": operator.le, ">=": operator.ge}
MACHINE_KEYS = ("cpu", "cores", "ram_bytes", "gpu", "torch", "python", "date_utc")


# ---- running a benchmark -------------------------------------------------------------------------


def quick_mode(argv: list[str] | None = None) -> bool:
    """`--quick` on the command line or BENCH_QUICK=1: tiny sizes, to check that a script runs."""
    args = sys.argv[1:] if argv is None else argv
    return "--quick" in args or os.environ.get("BENCH_QUICK") == "1"


def work_dir(quick: bool) -> Path:
    """Generated inputs. Quick runs get their own folder, so they never replace the full-size inputs
    the scripts reuse when they exist."""
    return HERE / "work" / "quick" if quick else HERE / "work"


def results_dir(quick: bool) -> Path:
    """Quick runs never overwrite the measured results."""
    return HERE / "work" / "quick" / "results" if quick else HERE / "results"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gpu() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none"
    r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    names = [n.strip() for n in r.stdout.splitlines() if n.strip()] if r.returncode == 0 else []
    return ", ".join(names) or "none"


def machine() -> dict:
    """The machine and software of this run. Imports no torch (orchestrators stay small, so the
    children they measure start small): torch's version comes from its package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "gpu": _gpu(),
        "torch": torch_version,
        "python": platform.python_version(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": round(os.getloadavg()[0], 2),
    }


def write_results(name: str, raw: dict, summarise, quick: bool) -> Path:
    """Add the end load average, the quick flag and the report block to raw; write results/<name>.json."""
    raw.setdefault("machine_info", machine())["load_average_end"] = round(os.getloadavg()[0], 2)
    raw["quick"] = quick
    raw.pop("report", None)
    out = results_dir(quick) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        rep = summarise(raw)
        validate(rep)
    except Exception:
        out.write_text(json.dumps(raw, indent=2) + "\n")  # keep the measurements; fix summarise, then
        print(f"wrote {out} WITHOUT a report block; after fixing summarise: report.py --resummarise", file=sys.stderr)
        raise
    raw["report"] = rep
    out.write_text(json.dumps(raw, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return out


# ---- building a report ---------------------------------------------------------------------------


def runs_of(d: dict, key: str = "seconds") -> int:
    """How many runs a median in raw data is over (a single measurement has no all_* list)."""
    return len(d.get("all_" + key) or []) or 1


def row(
    case: str,
    seconds: float | None = None,
    runs: int | None = None,
    baseline: str | None = None,
    peak_bytes: int | None = None,
) -> dict:
    return {
        "case": case,
        "seconds": seconds,
        "runs": runs,
        "baseline": baseline,
        "ratio": None,
        "peak_bytes": peak_bytes,
    }


def table(rows: list[dict], memory: str | None = None) -> dict:
    """The main table; each row's ratio is its seconds over its baseline row's seconds."""
    by_case = {r["case"]: r for r in rows}
    for r in rows:
        b = by_case.get(r["baseline"]) if r["baseline"] else None
        if r["baseline"] and b is None:
            raise ValueError(f"row {r['case']!r}: baseline {r['baseline']!r} is not a row of the table")
        if b is not None and r["seconds"] is not None and b["seconds"]:
            r["ratio"] = r["seconds"] / b["seconds"]
    return {"memory": memory, "rows": rows}


def verdict(measured: float | None, comparison: str, threshold: float) -> bool:
    """measured <comparison> threshold; a missing or non-finite measurement never meets a target."""
    if measured is None or not math.isfinite(measured):
        return False
    return bool(COMPARISONS[comparison](measured, threshold))


def target(
    name: str,
    text: str,
    comparison: str,
    threshold: float,
    measured: float | None,
    *,
    met_limit: str,
    missed_limit: str,
    unit: str = "",
) -> dict:
    """A target with its verdict computed from the measured value, and the prose (constant in the
    calling script) that says what limits the figure, chosen by the verdict."""
    met = verdict(measured, comparison, threshold)
    return {
        "name": name,
        "target": text,
        "comparison": comparison,
        "threshold": threshold,
        "measured": measured,
        "unit": unit,
        "met": met,
        "limit": met_limit if met else missed_limit,
    }


def machine_of(raw: dict) -> dict:
    """machine_info of the raw data; for files written before it existed, only the legacy string."""
    info = raw.get("machine_info")
    if info:
        return dict(info)
    out = {k: None for k in MACHINE_KEYS}
    out["note"] = f"recorded before the report schema: {raw.get('machine', 'nothing')}"
    return out


def report(
    raw: dict,
    *,
    name: str,
    title: str,
    issue: str,
    measured: str,
    table: dict,
    tables: list[dict] = (),
    targets: list[dict] = (),
    notes: list[str] = (),
) -> dict:
    rep = {
        "schema": SCHEMA,
        "name": name,
        "title": title,
        "issue": issue,
        "script": f"benchmarks/bench_{name}.py",
        "quick": bool(raw.get("quick", False)),
        "measured": " ".join(measured.split()),
        "machine": machine_of(raw),
        "table": table,
        "tables": list(tables),
        "targets": list(targets),
        "notes": [" ".join(n.split()) for n in notes],
    }
    validate(rep)
    return rep


def extra(title: str, columns: list[str], rows: list[list]) -> dict:
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows]}


# ---- validating one --------------------------------------------------------------------------------


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def problems(rep: dict) -> list[str]:
    """What is wrong with a report block (empty when it is valid)."""
    out = []
    for key, kind in (
        ("schema", int),
        ("name", str),
        ("title", str),
        ("issue", str),
        ("script", str),
        ("quick", bool),
        ("measured", str),
        ("machine", dict),
        ("table", dict),
        ("tables", list),
        ("targets", list),
        ("notes", list),
    ):
        if not isinstance(rep.get(key), kind):
            out.append(f"{key}: missing or not {kind.__name__}")
    if out:
        return out
    if rep["schema"] != SCHEMA:
        out.append(f"schema {rep['schema']} (this code reads {SCHEMA})")
    for k in MACHINE_KEYS:
        if k not in rep["machine"]:
            out.append(f"machine: no {k!r}")
    rows = rep["table"].get("rows")
    if not isinstance(rows, list):
        return out + ["table: no rows list"]
    cases = {r.get("case"): r for r in rows}
    if len(cases) != len(rows):
        out.append("table: two rows with the same case")
    for r in rows:
        for k in ("seconds", "ratio", "peak_bytes", "runs"):
            if r.get(k) is not None and not _num(r[k]):
                out.append(f"row {r.get('case')!r}: {k} is not a number")
        if r.get("baseline") is not None:
            b = cases.get(r["baseline"])
            if b is None:
                out.append(f"row {r['case']!r}: baseline {r['baseline']!r} is not a row")
            elif _num(r.get("seconds")) and _num(b.get("seconds")) and b["seconds"]:
                if not _num(r.get("ratio")) or not math.isclose(r["ratio"], r["seconds"] / b["seconds"], rel_tol=1e-9):
                    out.append(f"row {r['case']!r}: ratio is not seconds / the baseline's seconds")
    for t in rep["tables"]:
        n = len(t.get("columns", []))
        if not t.get("title") or not n or any(len(r) != n for r in t.get("rows", [])):
            out.append(f"extra table {t.get('title')!r}: title, columns and rows of as many cells needed")
    for t in rep["targets"]:
        if t.get("comparison") not in COMPARISONS or not _num(t.get("threshold")):
            out.append(
                f"target {t.get('name')!r}: comparison must be one of {sorted(COMPARISONS)} with a numeric threshold"
            )
            continue
        if t.get("measured") is not None and not _num(t["measured"]):
            out.append(f"target {t.get('name')!r}: measured is not a number")
            continue
        if t.get("met") is not verdict(t.get("measured"), t["comparison"], t["threshold"]):
            out.append(
                f"target {t.get('name')!r}: met={t.get('met')} but {t.get('measured')} "
                f"{t['comparison']} {t['threshold']} says otherwise"
            )
        for k in ("name", "target", "limit"):
            if not isinstance(t.get(k), str) or not t[k]:
                out.append(f"target {t.get('name')!r}: no {k}")
    return out


def validate(rep: dict) -> None:
    errs = problems(rep)
    if errs:
        raise ValueError(f"invalid report block {rep.get('name')!r}: " + "; ".join(errs))
