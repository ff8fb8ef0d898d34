"""The figures of the GRPO demo quoted in README.md, docs/commands/demo.md and docs/concepts.md,
generated from one real run instead of typed by hand.

    python docs/commands/demo_figures.py record DEMO_OUT TRANSCRIPT   # after a real run, see below
    python docs/commands/demo_figures.py fill                          # rewrite the pages' figures
    python docs/commands/demo_figures.py check                         # exit 1 naming stale figures

A real run: `rank1 demo --out demo-out > transcript.txt`. `record` keeps what the pages
need in docs/commands/demo-run.json (the run's results.json, its stdout, and the accuracy of RELEX
from the same window to several steps, computed here), copies its accuracy and re-grounding plots to
docs/commands/demo-accuracy.png and demo-reground.png, then fills the pages. `fill` and `check` read only demo-run.json,
so tests/test_docs_examples.py checks the pages without training.

In a page, a generated figure is marked `<!--fig:NAME-->VALUE<!--/fig-->` (GitHub shows only
VALUE), and the transcript is the console block after `<!-- demo output -->`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RECORD = HERE / "demo-run.json"
PLOT = HERE / "demo-accuracy.png"
REGROUND_PLOT = HERE / "demo-reground.png"
PAGES = [ROOT / "README.md", HERE / "demo.md", ROOT / "docs" / "concepts.md"]
FIGURE = re.compile(r"<!--fig:(?P<name>[\w-]+)-->(?P<value>.*?)<!--/fig-->", re.S)
TRANSCRIPT = re.compile(r"(^<!-- demo output -->\n```console\n)(.*?)(^```\n)", re.M | re.S)
COMMAND = "rank1 demo --out demo-out"
# the rows of the demo's table (commands/demo_rl.py), by the names the figures use
ROWS = ["base", "cut", "final", "rank1", "relex", "relex_all", "lstsq", "alpharl"]
# the output-space rows after them (commands/demo_output.py): logits of the cut and of the checkpoint
# halfway to the final step, then of the last checkpoint before it, extrapolated to the final step
LOGIT_ROWS = ["logits-mid", "logits-late"]


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f} %".replace("-", "−")


def _list(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def figures(record: dict) -> dict[str, str]:
    """Every figure the pages quote, formatted as they quote it."""
    res, text = record["results"], " ".join(record["transcript"].split())
    m = re.search(r"; (\d+) s \(training (\d+) s(?:, re-grounded arm (\d+) s)?\)", text)
    if not m:
        raise ValueError("the transcript has no 'N s (training M s[, re-grounded arm K s])' timing")
    rows = dict(zip(ROWS + LOGIT_ROWS, res["rows"], strict=True))
    curve = {p["step"]: p["accuracy"] for p in res["curve"]}
    fig = res["figures"]
    out = {
        "wall": m[1],
        "train": m[2],
        "arm-seconds": m[3] or "0",
        "first": str(res["steps"][0]),
        "cut": str(res["cut"]),
        "final": str(res["final"]),
        "target": f"{fig['alpharl_target_accuracy']:.3f}",
        "energy": f"{fig['energy_1_mean']:.2f}",
        "traj-ev": f"{fig['trajectory_explained_1']:.2f}",
        "traj-ev-pct": _pct(fig["trajectory_explained_1"], 0),
        "pls-r2": f"{fig['pls_r2']:.2f}",
        "pls-loo": f"{fig['pls_loo_r2']:.2f}",
        "linear-pct": _pct(fig["linear_elements"], 0),
        "curve": ", ".join(f"{s}: {_pct(a)}" for s, a in sorted(curve.items())),
        "relex-steps": ",".join(str(p["step"]) for p in record["relex_by_distance"]),
        "relex-by-distance": _list([_pct(p["accuracy"]) for p in record["relex_by_distance"]]),
        "run-by-distance": _list([_pct(curve[p["step"]]) for p in record["relex_by_distance"]]),
    }
    for name, row in rows.items():
        out[f"acc-{name}"] = _pct(row["accuracy"])
        out[f"kept-{name}"] = _pct(row["kept"], 0)
    for name in LOGIT_ROWS:
        out[f"b-{name}"] = rows[name]["name"].split("→")[-1]
        out[f"alpha-{name}"] = rows[name]["note"].split("= ")[-1]
    out["lp-linear-pct"] = _pct(fig["logprob_tokens_linear"], 0)
    out["lp-r2-mean"] = f"{fig['logprob_r2_mean']:.2f}"
    out["lp-r2-median"] = f"{fig['logprob_r2_median']:.2f}"
    out["lp-seq-linear-pct"] = _pct(fig["logprob_sequences_linear"], 0)
    out.update(backtest_figures(res))
    return out


def check_backtest_statements(res: dict) -> None:
    """The prose of demo.md#the-backtest-beside-the-accuracy-table states these of the recorded run:
    no prediction from the window beat the checkpoint at the cut, and at the longest jump the
    cosine alone favoured the method whose model scored lower. A record where they fail stops
    here, so the page is rewritten rather than left wrong."""
    bt = res["backtest"]
    cut_acc = next(p["accuracy"] for p in res["curve"] if p["step"] == res["cut"])
    if any(r["accuracy_predicted"] >= cut_acc for m in bt["methods"].values() for r in m["rows"]):
        raise ValueError("a backtested prediction beat the checkpoint at the cut: rewrite the backtest section")
    relex, linear = (bt["methods"][n]["rows"][-1] for n in ("relex", "linear"))
    better, worse = (relex, linear) if relex["accuracy_predicted"] > linear["accuracy_predicted"] else (linear, relex)
    agree = all(better[k] < worse[k] for k in ("rel_error", "kl", "logprob_mad"))
    agree = agree and abs(math.log(better["norm_ratio"])) < abs(math.log(worse["norm_ratio"]))
    if not (agree and better["cosine"] < worse["cosine"]):
        raise ValueError("the longest jump's figures no longer order as the page says: rewrite the backtest section")


def backtest_figures(res: dict) -> dict[str, str]:
    """The backtest beside the table and the re-grounded arm (commands/demo_backtest.py, demo_reground.py)."""
    bt, arm, out = res["backtest"], res["reground"], {}
    cut_acc = next(p["accuracy"] for p in res["curve"] if p["step"] == res["cut"])
    out["acc-at-cut"] = _pct(cut_acc)
    for name, m in bt["methods"].items():
        rows = {r["jump"]: r for r in m["rows"]}
        rec, longest = rows.get(m["recommended_jump"]), rows[max(rows)]
        out[f"bt-{name}-rec"] = str(m["recommended_jump"])
        if rec is not None:
            out[f"bt-{name}-rec-err"] = f"{rec['rel_error']:.2f}"
            out[f"bt-{name}-rec-acc"] = _pct(rec["accuracy_predicted"])
            out[f"bt-{name}-rec-real"] = _pct(rec["accuracy_real"])
        short = rows[min(rows)]
        out[f"bt-{name}-short-err"] = f"{short['rel_error']:.2f}"
        out[f"bt-{name}-short-kl"] = f"{short['kl']:.2f}"
        out[f"bt-{name}-long-acc"] = _pct(longest["accuracy_predicted"])
        out[f"bt-{name}-long-err"] = f"{longest['rel_error']:.2f}"
        out[f"bt-{name}-long-cos"] = f"{longest['cosine']:.2f}"
        out[f"bt-{name}-long-norm"] = f"{longest['norm_ratio']:.2f}"
        out[f"bt-{name}-long-kl"] = f"{longest['kl']:.2f}"
        best = max(m["rows"], key=lambda r: r["accuracy_predicted"])
        out[f"bt-{name}-best-acc"] = _pct(best["accuracy_predicted"])
    check_backtest_statements(res)
    rho = bt["tracking"]

    def said(names):
        return _list([f"{n} (ρ {'-' if rho[n] is None else f'{rho[n]:.2f}'})" for n in names]) or "none"

    out["bt-points"] = str(sum(len(m["rows"]) for m in bt["methods"].values()))
    out["bt-tracked"] = said(bt["tracked"])
    out["bt-not-tracked"] = said(bt["not_tracked"])
    out["rg-segment"] = str(bt["reground"]["segment"])
    out["rg-from"] = str(res["cut"] - bt["reground"]["segment"])
    out["rg-schedule"] = f"{arm['train_steps']}:{arm['jump_steps']}"
    table = {r["arm"]: r for r in arm["table"]}
    mine, plain = table["re-grounded GRPO"], table["plain GRPO"]
    for share in (90, 100):
        out[f"plain-steps-{share}"] = str(plain[f"steps_to_{share}"])
    for share in (90, 100):
        out[f"rg-steps-{share}"] = "never" if mine[f"steps_to_{share}"] is None else str(mine[f"steps_to_{share}"])
    out["rg-acc-final"] = _pct(mine["accuracy_at_final_step"])
    out["rg-jumps"] = ", ".join(
        f"{j['step']}: {_pct(j['accuracy_before'])} → {_pct(j['accuracy'])}" for j in arm["jumps"]
    )
    return out


def transcript_block(record: dict) -> str:
    lines = [f"$ {COMMAND}", *(ln.rstrip() for ln in record["transcript"].splitlines())]
    return "\n".join(lines) + "\n"


def filled(text: str, values: dict[str, str], block: str) -> str:
    def repl(m: re.Match) -> str:
        if m["name"] not in values:
            raise KeyError(f"unknown figure {m['name']!r}")
        return f"<!--fig:{m['name']}-->{values[m['name']]}<!--/fig-->"

    text = FIGURE.sub(repl, text)
    return TRANSCRIPT.sub(lambda m: m[1] + block + m[3], text)


def load() -> dict:
    return json.loads(RECORD.read_text(encoding="utf-8"))


def stale() -> list[str]:
    """The pages whose figures differ from the record's."""
    record = load()
    values, block = figures(record), transcript_block(record)
    return [
        str(p.relative_to(ROOT))
        for p in PAGES
        if filled(p.read_text(encoding="utf-8"), values, block) != p.read_text(encoding="utf-8")
    ]


def fill() -> None:
    record = load()
    values, block = figures(record), transcript_block(record)
    for page in PAGES:
        page.write_text(filled(page.read_text(encoding="utf-8"), values, block), encoding="utf-8")


def relex_by_distance(demo_out: Path, results: dict) -> list[dict]:
    """RELEX from the demo's window (steps ..cut) to the cut, a quarter and half of the way to the
    final step, and the final step, each output scored on the held-out set."""
    from rank1tools.commands.extrapolate.registry import ExtrapolateOptions, extrapolate
    from rank1tools.demo import DemoTraining, evaluate_checkpoint

    cut, final, steps = results["cut"], results["final"], results["steps"]
    wanted = [cut, cut + (final - cut) // 4, cut + (final - cut) // 2, final]
    targets = [min((s for s in steps if s >= w), default=final) for w in wanted]
    config = DemoTraining.quick(results["seed"]) if results["quick"] else DemoTraining(seed=results["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "relex"
        res = extrapolate(
            str(demo_out / "base"),
            str(out),
            options=ExtrapolateOptions(
                method="relex", run=str(demo_out / "run"), history_until=cut, target_steps=targets, device="cpu"
            ),
        )
        return [
            {"step": step, "accuracy": evaluate_checkpoint(o.path, config)}
            for step, o in zip(targets, res.outputs, strict=True)
        ]


def record(demo_out: Path, transcript: Path) -> None:
    results = json.loads((demo_out / "results.json").read_text(encoding="utf-8"))
    data = {
        "command": COMMAND,
        "results": results,
        "transcript": transcript.read_text(encoding="utf-8"),
        "relex_by_distance": relex_by_distance(demo_out, results),
    }
    RECORD.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(demo_out / "accuracy.png", PLOT)
    shutil.copyfile(demo_out / "reground" / "reground.png", REGROUND_PLOT)
    fill()


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"] and len(sys.argv) == 4:
        record(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:] == ["fill"]:
        fill()
    elif sys.argv[1:] == ["check"]:
        pages = stale()
        if pages:
            sys.exit(f"stale demo figures in {', '.join(pages)}: run python docs/commands/demo_figures.py fill")
    else:
        sys.exit(__doc__)
