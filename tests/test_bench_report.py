"""benchmarks/report.py writes docs/benchmarks.md from results files: the figures on the page are the
files' values, verdicts follow the thresholds, order and bytes are deterministic; every benchmark
script's summarise() turns its stored raw results into a valid report block."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _report as R  # noqa: E402
from run_all import BENCHES  # noqa: E402


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


P = _load_module(BENCH / "report.py", "_bench_report_page")


# ---- helpers ----------------------------------------------------------------------------------------


def _raw(
    name: str,
    *,
    fast: float = 2.0,
    slow: float = 8.0,
    peak: int = 123_456_789,
    measured: float = 1.4,
    comparison: str = "<=",
    threshold: float = 1.5,
) -> dict:
    raw = {
        "machine_info": {
            "cpu": "Test CPU",
            "cores": 2,
            "ram_bytes": 8 * 2**30,
            "gpu": "none",
            "torch": "9.9",
            "python": "3.0",
            "date_utc": "2026-01-02T03:04:05+00:00",
            "load_average_start": 0.5,
            "load_average_end": 1.25,
        },
        "fast": fast,
        "slow": slow,
    }
    rows = [R.row(f"{name} ours", fast, 3, f"{name} naive", peak), R.row(f"{name} naive", slow, 1, None, 2 * peak)]
    raw["report"] = R.report(
        raw,
        name=name,
        title=f"Title {name}",
        issue="#7",
        measured=f"What {name} measures.",
        table=R.table(rows, memory="peak RSS"),
        tables=[R.extra(f"Extra {name}", ["label", "value"], [["x", 0.012345], ["y", 4321.0]])],
        targets=[
            R.target(
                f"t_{name}",
                f"target of {name}",
                comparison,
                threshold,
                measured,
                met_limit=f"MET-LIMIT-{name}",
                missed_limit=f"MISSED-LIMIT-{name}",
                unit="×",
            )
        ],
        notes=[f"note of {name}"],
    )
    return raw


def _write(folder: Path, raw: dict, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name or raw['report']['name']}.json"
    p.write_text(json.dumps(raw, indent=2) + "\n")
    return p


def _page(folder: Path, order=("b", "a")) -> str:
    return P.page(P.load(folder, list(order)))


def _rows(md: str) -> list[list[str]]:
    """Every markdown table row of the page (separator lines excluded), as cells."""
    out = []
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            out.append([c.strip() for c in line.strip()[2:-2].split(" | ")])
    return out


def _row(md: str, first: str) -> list[str]:
    hits = [r for r in _rows(md) if r[0] == first]
    assert len(hits) == 1, (first, hits)
    return hits[0]


def _close(cell: str, value: float) -> bool:
    """The page shows 3 significant digits (to the unit above 100)."""
    parsed = float(cell.rstrip("×"))
    return math.isclose(parsed, value, rel_tol=5e-3, abs_tol=0.5 if abs(value) >= 99.95 else 0.0)


# ---- the page ---------------------------------------------------------------------------------------


def test_figures_on_the_page_are_the_files_values(tmp_path):
    _write(tmp_path, _raw("a", fast=2.0, slow=8.0, peak=123_456_789))
    _write(tmp_path, _raw("b", fast=0.0123, slow=456.7, peak=5_000_000))
    md = _page(tmp_path)
    for name, fast, slow, peak in (("a", 2.0, 8.0, 123_456_789), ("b", 0.0123, 456.7, 5_000_000)):
        case, seconds, runs, baseline, ratio, mem = _row(md, f"{name} ours")
        assert _close(seconds, fast) and runs == "3" and baseline == f"{name} naive"
        assert _close(ratio, fast / slow)
        assert _close(mem, peak / 1e6)  # MB
        _, seconds, runs, baseline, ratio, mem = _row(md, f"{name} naive")
        assert _close(seconds, slow) and runs == "1" and baseline == "—" and ratio == "—"
        assert _close(mem, 2 * peak / 1e6)
    x = [r for r in _rows(md) if r[0] == "x"]
    assert len(x) == 2 and all(_close(r[1], 0.012345) for r in x)
    assert all(r[1] == "4321" for r in _rows(md) if r[0] == "y")
    # machine, date, load average, prose
    assert "Machine: Test CPU, 2 cores, 8.0 GiB RAM, GPU: none, torch 9.9, Python 3.0." in md
    assert "Date 2026-01-02T03:04:05+00:00 (UTC); 1-minute load average 0.500 at the start, 1.25 at the end." in md
    assert "What a measures." in md and "- note of b" in md
    # the summary: one row per target, measured value and threshold
    summary = [r for r in _rows(md) if r[0].startswith("[Title ")]
    assert [r[0] for r in summary] == ["[Title b (#7)](#b)", "[Title a (#7)](#a)"]
    assert all(r[2] == "≤ 1.5×" and _close(r[3], 1.4) and r[4] == "met" for r in summary)
    assert "2 targets: 2 met, 0 missed." in md


@pytest.mark.parametrize(
    "comparison, threshold, met_values, missed_values",
    [
        ("<=", 1.5, [1.4, 1.5, 0.0], [1.6, 15.0, float("nan")]),
        (">=", 5.0, [5.0, 5.01, 50.0], [4.99, 0.0, float("nan")]),
    ],
)
def test_verdict_follows_the_threshold(tmp_path, comparison, threshold, met_values, missed_values):
    for i, value in enumerate(met_values + missed_values):
        folder = tmp_path / str(i)
        _write(folder, _raw("a", measured=value, comparison=comparison, threshold=threshold))
        md = _page(folder)
        met = value in met_values
        target_row = _row(md, "target of a")
        assert target_row[3] == ("met" if met else "**missed**"), (value, target_row)
        assert target_row[4] == ("MET-LIMIT-a" if met else "MISSED-LIMIT-a")
        assert (f"1 targets: {int(met)} met, {int(not met)} missed.") in md
        stored = json.loads((folder / "a.json").read_text())["report"]["targets"][0]
        assert stored["met"] is met


def test_a_verdict_that_does_not_follow_its_value_is_refused(tmp_path):
    raw = _raw("a", measured=1.4)
    raw["report"]["targets"][0]["measured"] = 1.6  # edited by hand: met stays true
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError, match=r"a\.json.*t_a.*met=True"):
        P.load(tmp_path, ["a"])
    assert P.main(["--results", str(tmp_path), "--out", str(tmp_path / "page.md")]) == 2
    assert not (tmp_path / "page.md").exists()
    raw["report"]["targets"][0]["measured"] = 1.4
    raw["report"]["table"]["rows"][0]["ratio"] = 0.5  # not fast / slow
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="ratio"):
        P.load(tmp_path, ["a"])


def test_sections_follow_run_all_order_then_other_files_by_name(tmp_path):
    for name in ("zeta", "alpha", "b", "a", "extra"):
        _write(tmp_path, _raw(name))
    md = _page(tmp_path, order=("b", "a", "missing"))
    sections = [line for line in md.splitlines() if line.startswith("## Title")]
    assert sections == [
        "## Title b (issue #7)",
        "## Title a (issue #7)",
        "## Title alpha (issue #7)",
        "## Title extra (issue #7)",
        "## Title zeta (issue #7)",
    ]
    summary = [r[0] for r in _rows(md) if r[0].startswith("[Title ")]
    assert summary == [f"[Title {n} (#7)](#{n})" for n in ("b", "a", "alpha", "extra", "zeta")]


def test_same_inputs_give_the_same_bytes(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    for name in ("a", "b", "c"):
        _write(first, _raw(name))
    second.mkdir()
    for name in ("c", "a", "b"):  # written in another order, in another folder
        shutil.copy(first / f"{name}.json", second / f"{name}.json")
    out1, out2 = tmp_path / "p1.md", tmp_path / "p2.md"
    assert P.main(["--results", str(first), "--out", str(out1)]) == 0
    assert P.main(["--results", str(first), "--out", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    assert _page(first).encode() == _page(second).encode()
    assert P.main(["--results", str(first), "--out", str(out1), "--check"]) == 0
    out1.write_text(out1.read_text().replace("1.25 at the end", "1.26 at the end"))  # a figure edited by hand
    assert P.main(["--results", str(first), "--out", str(out1), "--check"]) == 1


def test_files_without_a_report_block(tmp_path):
    # no script of that name: its top-level figures, no verdict
    _write(tmp_path, {"seconds": 1.234, "nested": {"peak": 2048}, "list": [1, 2]}, name="unknown")
    md = _page(tmp_path)
    assert "## unknown (no report block)" in md
    assert _close(_row(md, "seconds")[1], 1.234) and _row(md, "nested.peak")[1] == "2048"
    assert "0 targets: 0 met, 0 missed." in md
    # a known benchmark's legacy file: summarised by its script
    raw = json.loads((BENCH / "results" / "pls.json").read_text())
    raw.pop("report")
    _write(tmp_path, raw, name="pls")
    entries = P.load(tmp_path, BENCHES)
    assert [n for n, _, _ in entries] == ["pls", "unknown"]
    rep = entries[0][1]
    assert rep == _load_module(BENCH / "bench_pls.py", "_bench_pls_test").summarise(raw)
    assert _close(_row(P.page(entries), rep["table"]["rows"][0]["case"])[1], raw["ours_s"])


def test_quick_results_are_marked(tmp_path):
    raw = _raw("a")
    raw["quick"] = True
    raw["report"]["quick"] = True
    _write(tmp_path, raw)
    md = _page(tmp_path)
    assert "**Quick run**" in md and "not measurements): a." in md


def test_number_format():
    assert [P.fmt(x) for x in (0.99987, 1031.4, 5.7651, 0.04, 1.11e-16, 0.0, 7, None)] == [
        "0.9999",
        "1031",
        "5.77",
        "0.0400",
        "1.11e-16",
        "0",
        "7",
        "—",
    ]


# ---- the scripts' summarise on the stored results -----------------------------------------------------


def _stored(name: str) -> dict:
    raw = json.loads((BENCH / "results" / f"{name}.json").read_text())
    raw.pop("report", None)
    return raw


def _targets(rep: dict) -> dict:
    return {t["name"]: t for t in rep["targets"]}


@pytest.mark.parametrize("name", BENCHES)
def test_every_script_summarises_its_stored_results(name):
    rep = _load_module(BENCH / f"bench_{name}.py", f"_bench_{name}_test").summarise(_stored(name))
    assert R.problems(rep) == [] and rep["name"] == name and rep["script"] == f"benchmarks/bench_{name}.py"
    for t in rep["targets"]:
        assert t["met"] is R.COMPARISONS[t["comparison"]](t["measured"], t["threshold"])
    by_case = {r["case"]: r for r in rep["table"]["rows"]}
    for r in rep["table"]["rows"]:
        if r["baseline"]:
            assert r["ratio"] == pytest.approx(r["seconds"] / by_case[r["baseline"]]["seconds"], rel=1e-12)


def test_summarised_targets_against_the_raw_figures():
    """Spot checks, computed here from the raw data."""
    mods = {
        n: _load_module(BENCH / f"bench_{n}.py", f"_bench_{n}_spot") for n in ("io", "decompose", "fit_pls", "relex")
    }
    raw = _stored("relex")
    t = _targets(mods["relex"].summarise(raw))
    assert t["relex_peak_flat"]["measured"] == pytest.approx(
        raw["T"]["32"]["relex"]["peak_above_imports"] / raw["T"]["4"]["relex"]["peak_above_imports"]
    )
    assert t["lstsq_over_read"]["measured"] == pytest.approx(
        raw["T"]["32"]["lstsq"]["seconds"] / raw["T"]["32"]["read"]["seconds"]
    )
    assert t["lstsq_over_read"]["met"] is (t["lstsq_over_read"]["measured"] <= 1.5)
    raw = _stored("decompose")
    m = raw["models"]["135M"]
    t = _targets(mods["decompose"].summarise(raw))
    assert t["speedup_135M"]["measured"] == pytest.approx(m["naive"]["seconds"] / m["cli"]["seconds"])
    assert t["anon_4x"]["measured"] == pytest.approx(
        (raw["models"]["4x"]["cli"]["peak_anon_sampled"] - raw["models"]["4x"]["import"]["peak_anon_sampled"])
        / raw["models"]["4x"]["tight"]["largest_read_fp32"]
    )
    raw = _stored("fit_pls")
    t = _targets(mods["fit_pls"].summarise(raw))
    assert t["speedup"]["measured"] == pytest.approx(raw["naive"]["seconds"] / raw["cli"]["seconds"])
    raw = _stored("io")
    t = _targets(mods["io"].summarise(raw))
    s = raw["runs"]["stream"]
    assert t["stream_vs_checkpoint"]["measured"] == pytest.approx(
        (s["peak_rss"] - s["import_rss"]) / raw["checkpoint_bytes"]
    )


def test_the_committed_page_is_generated_from_the_committed_results():
    """docs/benchmarks.md is what `make bench-report` writes: no figure on it is edited by hand."""
    entries = P.load(BENCH / "results", BENCHES)
    assert {n for n, _, _ in entries} >= {n for n in BENCHES if (BENCH / "results" / f"{n}.json").exists()}
    assert (ROOT / "docs" / "benchmarks.md").read_text() == P.page(entries), (
        "docs/benchmarks.md differs from the results files: run `make bench-report`"
    )
