"""`rank1 report` (docs/commands/report.md): each section iff its input is present; every number of
the verdict equals the value recomputed here from the input tables (CSV rows, not the summaries the
page reads); unknown folders exit 3 naming them; the output contract of a single file (staged,
--force only over a page rank1 wrote); the same bytes twice; valid HTML5 (tag balance); the page
without matplotlib says so."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from html import escape, unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rank1tools.commands.report import build_page
from rank1tools.commands.report import figures as report_figures
from rank1tools.commands.report.html import EDGE_ROWS, SCREENFUL
from rank1tools.commands.report.inputs import recognise_all

from _report_support import build_inputs
from _support import run_main

ALL = ["syn", "fits", "lin", "relex", "linear", "bt", "demo", "lp"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return root, build_inputs(root)


@pytest.fixture(scope="module")
def full_page(runs) -> str:
    return _page(runs, *ALL)


def _names(runs, *keys) -> list[str]:
    _, out = runs
    return [str(out[k]) for k in keys if k in out]


def _page(runs, *keys) -> str:
    names = _names(runs, *keys)
    return build_page(recognise_all(names), names)[0]


def _section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', page)


# ---------------------------------------------------------------------------------------------
# sections


@pytest.mark.parametrize(
    "keys, sections",
    [
        (["syn"], ["verdict", "run", "spectra", "reconstructions"]),
        (["fits"], ["verdict", "run", "fits"]),
        (["lin"], ["verdict", "run", "linearity"]),
        (["relex", "linear"], ["verdict", "run", "extrapolations"]),
        (["bt"], ["verdict", "run", "backtest"]),
        (["lp"], ["verdict", "run", "logprobs"]),
        (["demo"], ["verdict", "run", "demo"]),
        (
            ALL,
            [
                "verdict",
                "run",
                "spectra",
                "fits",
                "linearity",
                "extrapolations",
                "reconstructions",
                "backtest",
                "logprobs",
                "demo",
            ],
        ),
    ],
)
def test_each_section_iff_its_input(runs, full_page, keys, sections):
    if "lp" in keys and "lp" not in runs[1]:
        pytest.skip("logprobs needs transformers (the model extra)")
    if "lp" not in runs[1]:
        sections = [s for s in sections if s != "logprobs"]
    page = full_page if keys == ALL else _page(runs, *keys)
    assert _section_ids(page) == sections
    # the navigation names every section, and nothing else
    assert re.findall(r"<nav>(.*?)</nav>", page)[0].count("<a ") == len(sections)


def test_demo_section_shows_the_accuracy_table_curve_backtest_and_regrounding(runs):
    _, out = runs
    results = json.loads((out["demo"] / "results.json").read_text())
    page = _page(runs, "demo")
    demo = page[page.index('<section id="demo">') :]
    for row in results["rows"]:
        assert re.search(f"<td[^>]*>{re.escape(escape(row['name']))}</td>", demo), row["name"]
        assert f"{row['accuracy']:.3f}" in demo
    assert "Backtest at the cut" in demo and "Re-grounded GRPO" in demo
    for arm in results["reground"]["table"]:
        assert arm["arm"] in demo
    for method in results["backtest"]["methods"].values():
        for r in method["rows"]:
            assert f"{r['rel_error']:.3f}" in demo
    if report_figures.plots_available():
        assert demo.count("<svg") == 2  # the accuracy curve and the re-grounding figure


# ---------------------------------------------------------------------------------------------
# the verdict's numbers


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mean(values) -> float:
    values = [float(v) for v in values if v not in ("", None)]
    return sum(values) / len(values)


def _verdict(page: str) -> list[tuple[list[tuple[float, str]], str]]:
    section = page[page.index('<section id="verdict">') : page.index("</section>")]
    items = re.findall(r"<li[^>]*>(.*?)</li>", section)
    out = []
    for item in items:
        numbers = [
            (float(v), unescape(s)) for v, s in re.findall(r'<b class="v" data-value="([^"]+)">([^<]+)</b>', item)
        ]
        source = unescape(re.search(r'<span class="src">from ([^<]+)</span>', item)[1])
        out.append((numbers, source))
    return out


def _shown_matches(value: float, shown: str) -> bool:
    """The rounded text agrees with the value to its last printed digit."""
    scale = 100 if shown.endswith("%") else 1
    text = shown.rstrip("%×")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text) - value * scale) <= 0.5 * 10**-decimals + 1e-9


def _expected(out: dict[str, Path]) -> list[tuple[str, list[float]]]:
    """(file the statement names, its numbers), recomputed from the rows of the input tables, in the
    verdict's order: spectra, linearity, fits, extrapolations, backtest, logprobs, demo."""
    exp = []
    spectrum = _csv(out["syn"] / "decompose" / "spectrum.csv")
    exp.append(
        (
            "syn/decompose/summary.json",
            [_mean(r["energy_1"] for r in spectrum), _mean(r["norm_frac_1"] for r in spectrum)],
        )
    )
    lin = _csv(out["lin"] / "linearity.csv")
    exp.append(("lin/summary.json", [_mean(r["explained_1"] for r in lin), _mean(r["coef_r2_1"] for r in lin)]))
    linear = sum(int(r["linear"]) for r in lin) / sum(int(r["changing"]) for r in lin)
    exp.append(("lin/summary.json", [linear]))
    fits = _csv(out["fits"] / "fits.csv")
    exp.append(("fits/summary.json", [_mean(r["r2_step"] for r in fits)]))
    for key in ("relex", "linear"):
        targets = [p for p in sorted(out[key].iterdir()) if (p / "rank1tools-extrapolation.json").is_file()] or [
            out[key]
        ]
        best = None
        for t in targets:
            rep = json.loads((t / "rank1tools-extrapolation.json").read_text())
            ratio = max(x["norm_ratio"] for x in rep["tensors"])
            assert not rep["flagged"]
            if best is None or ratio > best[0]:
                best = (ratio, rep["norm_ratio_limit"])
        exp.append((f"{key}/", list(best)))
    bt = _csv(out["bt"] / "backtest.csv")
    bar = json.loads((out["bt"] / "rank1tools.json").read_text())["parameters"]["options"]["max_error"]
    recommended = []
    for cut in sorted({int(r["cut"]) for r in bt}):
        rows = sorted((r for r in bt if int(r["cut"]) == cut), key=lambda r: int(r["jump"]))
        ok = 0
        for r in rows:
            if float(r["rel_error"]) > bar:
                break
            ok = int(r["jump"])
        recommended.append(ok)
    exp.append(("bt/summary.json", [bar, min(recommended)]))
    if "lp" in out:
        seqs = _csv(out["lp"] / "sequences.csv")
        exp.append(("lp/summary.json", [sum(int(r["linear"]) for r in seqs) / sum(int(r["kept"]) for r in seqs)]))
    results = json.loads((out["demo"] / "results.json").read_text())
    rows = results["rows"]
    final = next(r for r in rows if r["name"] == "final checkpoint")
    made = [r for r in rows[3:] if not r["note"].startswith("in-sample")]
    best = max(made, key=lambda r: r["kept"])
    exp.append(("demo/results.json", [best["accuracy"], final["accuracy"], best["kept"]]))
    arms = {r["arm"]: r["accuracy_at_final_step"] for r in results["reground"]["table"]}
    exp.append(("demo/results.json", [arms["re-grounded GRPO"], arms["plain GRPO"]]))
    return exp


def test_every_verdict_number_is_the_input_tables_value(runs, full_page):
    _, out = runs
    got = _verdict(full_page)
    expected = _expected(out)
    assert len(got) == len(expected), [s for _, s in got]
    for (numbers, source), (where, values) in zip(got, expected):
        assert where in source, (source, where)
        assert len(numbers) == len(values), source
        for (value, shown), want in zip(numbers, values):
            assert math.isclose(value, want, rel_tol=1e-12, abs_tol=1e-12), (source, value, want)
            assert _shown_matches(value, shown), (source, value, shown)


def test_overfit_gap_is_fit_pls_own():
    from rank1tools.commands.fit_pls import OVERFIT_GAP
    from rank1tools.commands.report.verdict import OVERFIT_GAP as REPORT_GAP

    assert REPORT_GAP == OVERFIT_GAP


def test_overfit_is_flagged_from_the_summary(runs, tmp_path):
    """A fit store whose mean in-sample R² exceeds its LOO R² by more than the gap: a flagged
    statement and the warning in the fits section, with the summary's numbers."""
    import shutil

    fits = tmp_path / "fits"
    shutil.copytree(runs[1]["fits"], fits)
    summary = json.loads((fits / "summary.json").read_text())
    summary["mean"].update(r2=0.97, loo_r2=0.31)
    (fits / "summary.json").write_text(json.dumps(summary))
    page = build_page(recognise_all([str(fits)]), [str(fits)])[0]
    ((numbers, source),) = _verdict(page)
    assert [v for v, _ in numbers] == [0.97, 0.31] and 'class="flag"' in page
    assert "Overfit: mean in-sample R² 0.97 but leave-one-out R² 0.31" in page


# ---------------------------------------------------------------------------------------------
# the CLI: recognition, the output file, determinism, HTML


def test_unknown_folder_exits_3_naming_it(runs, tmp_path):
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "a.csv").write_text("x\n1\n")
    out = tmp_path / "r.html"
    for bad, says in (
        (stranger, "not an output folder rank1 wrote"),
        (tmp_path / "missing", "no such folder"),
        (runs[1]["syn"] / "rank1tools.json", "not a folder"),
    ):
        r = run_main("report", str(runs[1]["lin"]), str(bad), "--out", str(out))
        assert r.returncode == 3, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"rank1: error: {bad}: ") and says in lines[0], lines
        assert not out.exists() and os.listdir(tmp_path) == sorted(os.listdir(tmp_path))
    # a rank1 output of a command the page does not show (a generate-like record)
    other = tmp_path / "other"
    other.mkdir()
    (other / "rank1tools.json").write_text(json.dumps({"tool": "rank1tools", "command": "inspect"}))
    r = run_main("report", str(other), "--out", str(out))
    assert r.returncode == 3 and "a `rank1 inspect` output" in r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.html")] in ([], [".r.html.lock"])


def test_output_safety(runs, tmp_path):
    lin = str(runs[1]["lin"])
    out = tmp_path / "report.html"
    r = run_main("report", lin, "--out", str(out))
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {out} (") and r.stdout.count("\n") == 1, r.stderr
    first = out.read_bytes()
    # exists: refused without --force, replaced with it
    r = run_main("report", lin, "--out", str(out))
    assert r.returncode == 4 and "already exists; pass --force" in r.stderr
    r = run_main("report", lin, str(runs[1]["fits"]), "--out", str(out), "--force")
    assert r.returncode == 0 and out.read_bytes() != first
    # a file rank1 did not write is never replaced, --force or not
    theirs = tmp_path / "theirs.html"
    theirs.write_text("<!DOCTYPE html><html><head><title>mine</title></head><body>mine</body></html>\n")
    r = run_main("report", lin, "--out", str(theirs), "--force")
    assert r.returncode == 4 and "was not written by rank1" in r.stderr
    assert "mine</body>" in theirs.read_text()
    # a folder, a URL
    r = run_main("report", lin, "--out", str(tmp_path))
    assert r.returncode == 4
    r = run_main("report", lin, "--out", "hf://org/x.html")
    assert r.returncode == 2
    # inside a finished rank1 output (demo-out/report.html, as `make demo` writes it): allowed
    inside = runs[1]["demo"] / "report.html"
    r = run_main("report", str(runs[1]["demo"]), "--out", str(inside), "--force")
    assert r.returncode == 0 and inside.is_file(), r.stderr
    # a failed run leaves the old page whole and no staging file
    r = run_main("report", lin, str(tmp_path / "missing"), "--out", str(out), "--force")
    assert r.returncode == 3
    assert out.read_bytes().startswith(b"<!DOCTYPE html>")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_same_inputs_same_bytes(runs, tmp_path):
    names = _names(runs, "syn", "lin", "bt", "demo")  # every kind of figure, and the demo's tables
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    assert run_main("report", *names, "--out", str(a)).returncode == 0
    r = run_main("report", *names, "--out", str(b), "--json")
    assert r.returncode == 0 and a.read_bytes() == b.read_bytes()
    result = json.loads(r.stdout)
    assert result["out"] == str(b) and result["sections"] == _section_ids(b.read_text(encoding="utf-8"))
    assert len(result["verdict"]) == b.read_text(encoding="utf-8").count("<li")


def test_a_missing_or_broken_table_exits_3_naming_the_file(runs, tmp_path):
    import shutil

    lin = tmp_path / "lin"
    shutil.copytree(runs[1]["lin"], lin)
    out = tmp_path / "r.html"
    (lin / "summary.json").write_text("{not json")
    r = run_main("report", str(lin), "--out", str(out))
    assert r.returncode == 3 and str(lin / "summary.json") in r.stderr and r.stderr.count("\n") == 1, r.stderr
    (lin / "summary.json").unlink()
    r = run_main("report", str(lin), "--out", str(out))
    assert r.returncode == 3 and f"{lin / 'summary.json'}: missing" in r.stderr
    assert not out.exists()


class _Balance(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.doctype = None
        self.ids: list[str] = []

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.ids += [v for k, v in attrs if k == "id"]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.ids += [v for k, v in attrs if k == "id"]

    def handle_endtag(self, tag):
        if tag in self.VOID:
            self.errors.append(f"end tag of void element {tag}")
        elif not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}, at {self.getpos()}")
        else:
            self.stack.pop()


def test_valid_html5_and_self_contained(full_page):
    page = full_page
    p = _Balance()
    p.feed(page)
    p.close()
    assert p.doctype == "DOCTYPE html" and not p.errors and not p.stack, (p.errors[:5], p.stack)
    assert len(p.ids) == len(set(p.ids)), "ids repeat: inline SVGs must get their own prefixes"
    # nothing outside the file: no script, no link, no src/href to anywhere but the page itself
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert {h for h in re.findall(r'href="([^"#][^"]*)"', page) if not h.startswith("data:image/png;base64,")} == set()
    assert "http://" not in page.replace("http://www.w3.org/", "") and "https://" not in page


def test_long_tables_collapse_into_details(runs):
    page = _page(runs, "lin")
    rows = len(_csv(runs[1]["lin"] / "linearity.csv"))
    assert rows > SCREENFUL
    every = page[page.index("<caption>every tensor") :]
    shown, rest = every.split("<details>", 1)
    assert shown.count("<tr>") - 1 == 2 * EDGE_ROWS  # header + top and bottom rows
    assert f"{rows - 2 * EDGE_ROWS} more rows" in shown
    rest = rest[: rest.index("</details>")]
    assert rest.count("<tr>") - 1 == rows - 2 * EDGE_ROWS


def test_without_matplotlib_the_page_says_what_is_missing(runs, monkeypatch):
    monkeypatch.setattr(report_figures, "plots_available", lambda: False)
    page = _page(runs, "syn", "lin")
    assert "<svg" not in page
    assert "matplotlib is not installed: pip install &#x27;rank1tools[plot]&#x27;" in page
    assert page.count('class="missing"') == 4  # two spectra figures, two linearity figures


def test_figures_are_the_commands_own_svg(runs):
    pytest.importorskip("matplotlib")
    page = _page(runs, "syn")
    svgs = re.findall(r"<svg\b.*?</svg>", page, re.S)
    assert len(svgs) == 2
    assert all('viewBox="' in s and "<metadata>" not in s for s in svgs)


def test_the_report_imports_no_torch(runs, tmp_path):
    """The page is made from tables: no torch, no transformers (a report in a CI step is quick)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom rank1tools.cli import main\n"
        f"sys.argv = ['rank1', 'report', {str(runs[1]['lin'])!r}, {str(runs[1]['bt'])!r}, '--out', "
        f"{str(tmp_path / 'r.html')!r}, '-q']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.html").read_bytes().startswith(b"<!DOCTYPE html>")
