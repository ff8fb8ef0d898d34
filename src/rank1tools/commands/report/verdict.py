"""The verdict: what the figures say, in short sentences, each with the numbers it comes from and
the file and key that hold them (docs/commands/report.md#the-verdict). Every number is a value of an
input table, shown rounded; the page keeps the exact value in the element's `data-value`.

Words follow fixed bars, the ones the docs use: a mean energy_1 of 0.8 or more is "nearly rank-1",
below 0.5 "far from rank-1"; a trajectory EV of 0.9 or more "keeps one direction", below 0.7 "does
not" (EV says the updates share a direction, not that they move along it at a steady pace: that is
the coefficient R², quoted beside it, docs/concepts.md#the-two-meanings-of-rank-1); PLS's
overfit warning is fit-pls's own (in-sample minus leave-one-out mean R² above math.pls.OVERFIT_GAP).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ...math.pls import OVERFIT_GAP
from .html import esc
from .inputs import EXTRAPOLATION, ROUNDING, Input, number


@dataclass(frozen=True)
class Number:
    value: float
    shown: str


def num(value, style: str = "2") -> Number:
    """A verdict number: style "2" (two decimals), "pct" (a share as a percentage), "x" (a ratio, ×),
    "int" (a count or a step)."""
    v = float(value)
    if style == "pct":
        return Number(v, f"{100 * v:.0f}%")
    if style == "x":
        return Number(v, f"{v:.2f}×")
    if style == "3":
        return Number(v, f"{v:.3f}")
    if style == "int":
        return Number(v, f"{int(v)}")
    return Number(v, f"{v:.2f}")


@dataclass(frozen=True)
class Label:
    """Which of several inputs of one kind a statement is about (its folder's name)."""

    text: str


@dataclass
class Statement:
    """A sentence: text pieces and Numbers; where its numbers come from; flagged (a warning)."""

    pieces: list
    source: str
    flag: bool = False

    def numbers(self) -> list[Number]:
        return [p for p in self.pieces if isinstance(p, Number)]

    def text(self) -> str:
        """The sentence as plain text (--json)."""
        return "".join(
            p.shown if isinstance(p, Number) else (f"{p.text} " if isinstance(p, Label) else p) for p in self.pieces
        )

    def html(self) -> str:
        body = "".join(
            f'<b class="v" data-value="{p.value!r}">{esc(p.shown)}</b>'
            if isinstance(p, Number)
            else (f'<b class="who">{esc(p.text)}</b> ' if isinstance(p, Label) else esc(p))
            for p in self.pieces
        )
        cls = ' class="flag"' if self.flag else ""
        return f'<li{cls}>{body}<span class="src">from {esc(self.source)}</span></li>'


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def decompose(inp: Input) -> list[Statement]:
    overall = inp.json("summary.json").get("overall") or {}
    e, nf = number(overall.get("energy_1")), number(overall.get("norm_frac_1"))
    if not _finite(e, nf):
        return []
    words = "nearly rank-1" if e >= 0.8 else ("far from rank-1" if e < 0.5 else "partly rank-1")
    return [
        Statement(
            [
                f"Updates are {words} (mean energy_1 ",
                num(e),
                "); the top direction carries ",
                num(nf),
                " of each update's norm (mean norm_frac_1).",
            ],
            f"{inp.where('summary.json')}: overall.energy_1, overall.norm_frac_1",
        )
    ]


def linearity(inp: Input) -> list[Statement]:
    summary = inp.json("summary.json")
    ev = number((summary.get("mean") or {}).get("mean_explained_1"))
    coef = number((summary.get("mean") or {}).get("mean_coef_r2_1"))
    share = number((summary.get("headline") or {}).get("frac_r2_above_0.7"))
    out = []
    if _finite(ev):
        words = (
            "keeps one direction"
            if ev >= 0.9
            else ("does not keep one direction" if ev < 0.7 else "mostly keeps one direction")
        )
        parts = [f"The trajectory {words} (trajectory EV ", num(ev), ", mean over tensors)"]
        keys = "mean.mean_explained_1"
        if _finite(coef):
            parts += ["; its coefficient's R² against the step is ", num(coef), " (mean coef_r2_1)"]
            keys += ", mean.mean_coef_r2_1"
        out.append(Statement([*parts, "."], f"{inp.where('summary.json')}: {keys}"))
    if _finite(share):
        out.append(
            Statement(
                [num(share, "pct"), " of the changing elements move linearly with the step (per-element R² > 0.7)."],
                f"{inp.where('summary.json')}: headline.frac_r2_above_0.7",
            )
        )
    return out


def fit_pls(inp: Input) -> list[Statement]:
    mean = inp.json("summary.json").get("mean") or {}
    r2, loo, step = number(mean.get("r2")), number(mean.get("loo_r2")), number(mean.get("r2_step"))
    src = f"{inp.where('summary.json')}: mean"
    if _finite(r2, loo):
        gap = r2 - loo
        if gap > OVERFIT_GAP:
            return [
                Statement(
                    [
                        "PLS overfits: R² is ",
                        num(r2),
                        " in-sample but ",
                        num(loo),
                        " leave-one-out; do not extrapolate to new metric values from this fit.",
                    ],
                    f"{src}.r2, mean.loo_r2",
                    flag=True,
                )
            ]
        joint = "but" if gap > 0.02 else "and"
        return [
            Statement(
                ["PLS R² is ", num(r2), f" in-sample {joint} ", num(loo), " leave-one-out."], f"{src}.r2, mean.loo_r2"
            )
        ]
    if _finite(step):
        return [
            Statement(
                ["The rank-1 direction follows the step (PLS R² against the step ", num(step, "3"), ")."],
                f"{src}.r2_step",
            )
        ]
    return []


def _target_ratio(inp: Input, target) -> tuple[str, float, float, int]:
    """(what was extrapolated to, largest norm ratio, flag limit, flagged count) of one target."""
    report = inp.json(EXTRAPOLATION, target)
    method = str(report.get("method", "?"))
    if method == "alpharl":
        what = f"{report.get('kind', 'target')} {report.get('target')}"
        ratio, limit = number(report.get("norm_ratio_max")), number(report.get("flag_limit"))
    else:
        what = f"step {report.get('target_step')}"
        ratios = [number(t.get("norm_ratio")) for t in report.get("tensors") or []]
        ratios = [r for r in ratios if math.isfinite(r)]
        ratio, limit = (max(ratios) if ratios else math.nan), number(report.get("norm_ratio_limit"))
    return what, ratio, limit, len(report.get("flagged") or [])


def extrapolate(inp: Input) -> list[Statement]:
    """One statement per output (its targets together): the largest predicted update against the
    last real one, the flag limit of that target, and how many tensors were flagged."""
    if not inp.targets:
        return []
    method = str(inp.json(EXTRAPOLATION, inp.targets[0]).get("method", "?"))
    found = [(_target_ratio(inp, t), t) for t in inp.targets]
    found = [(f, t) for f, t in found if math.isfinite(f[1])]
    if not found:
        return []
    (what, ratio, limit, _), worst = max(found, key=lambda ft: ft[0][1])
    flagged = sum(f[3] for f, _ in found)
    key = "norm_ratio_max" if method == "alpharl" else "max of tensors[].norm_ratio"
    if len(found) == 1:
        pieces = [f"{method} to {what}: the predicted update is at most ", num(ratio, "x"), " the last real one"]
        src = f"{inp.where(EXTRAPOLATION, worst)}: {key}, flagged"
    else:
        pieces = [
            f"{method}, {len(found)} targets: the predicted update is at most ",
            num(ratio, "x"),
            f" the last real one (at {what})",
        ]
        src = f"{inp.label.rstrip('/')}/*/{EXTRAPOLATION}: {key}, flagged"
    if math.isfinite(limit):
        pieces += [" against a flag limit of ", num(limit, "x")]
    pieces += ["; ", num(flagged, "int"), " tensors flagged."] if flagged else ["; none flagged."]
    out = [Statement(pieces, src, flag=bool(flagged))]
    for target in inp.targets:
        out += _rounding(inp, target)
    return out


def _rounding(inp: Input, target) -> list[Statement]:
    if not (target / ROUNDING).is_file():
        return []
    rounding = inp.json(ROUNDING, target)
    lost = number(rounding.get("lost_fraction"))
    if not _finite(lost) or not rounding.get("warning"):
        return []
    return [
        Statement(
            [f"{target.name}: rounding to the output dtype lost ", num(lost, "pct"), " of the updated elements."],
            f"{inp.where(ROUNDING, target)}: lost_fraction",
            flag=True,
        )
    ]


def reconstruct(inp: Input) -> list[Statement]:
    return [s for target in inp.targets for s in _rounding(inp, target)]


def backtest(inp: Input) -> list[Statement]:
    summary = inp.json("summary.json")
    jump, bar = number(summary.get("recommended_jump")), number(summary.get("max_error"))
    if not _finite(jump, bar):
        return []
    method = summary.get("method", "?")
    if jump > 0:
        pieces = [
            f"Backtest ({method}): predictions stay within the relative-error bar ",
            num(bar),
            " up to ",
            num(jump, "int"),
            " steps after the cut (recommended jump).",
        ]
    else:
        pieces = [f"Backtest ({method}): no jump stays within the relative-error bar ", num(bar), "."]
    return [Statement(pieces, f"{inp.where('summary.json')}: recommended_jump, max_error", flag=jump <= 0)]


def logprobs(inp: Input) -> list[Statement]:
    headline = inp.json("summary.json").get("headline") or {}
    share = number(headline.get("frac_r2_above_0.7"))
    if not _finite(share):
        return []
    return [
        Statement(
            [num(share, "pct"), " of the scored tokens' log-probabilities move linearly with the step (R² > 0.7)."],
            f"{inp.where('summary.json')}: headline.frac_r2_above_0.7",
        )
    ]


def demo(inp: Input) -> list[Statement]:
    path = inp.path / "results.json"
    if not path.is_file():
        return []
    results = inp.json("results.json")
    rows = [r for r in results.get("rows") or [] if isinstance(r, dict)]
    out = []
    # the synthesized models: not the base, the cut or the final checkpoint, nor an in-sample fit
    made = [
        r
        for r in rows
        if _finite(r.get("kept"))
        and r.get("step") != 0
        and r.get("name") not in ("checkpoint at the cut", "final checkpoint")
        and not str(r.get("note", "")).startswith("in-sample")
    ]
    final = next((r for r in rows if r.get("name") == "final checkpoint"), None)
    if made and final is not None and _finite(final.get("accuracy")):
        best = max(made, key=lambda r: (r["kept"], str(r["name"])))
        out.append(
            Statement(
                [
                    f"Best synthesized model: {best['name']}, held-out accuracy ",
                    num(best["accuracy"]),
                    " against the final checkpoint's ",
                    num(final["accuracy"]),
                    " (it keeps ",
                    num(best["kept"], "pct"),
                    " of the run's gain).",
                ],
                f"{inp.where('results.json')}: rows[].accuracy, rows[].kept",
            )
        )
    table = (results.get("reground") or {}).get("table") or []
    accs = {str(r.get("arm")): r.get("accuracy_at_final_step") for r in table if isinstance(r, dict)}
    if _finite(accs.get("plain GRPO"), accs.get("re-grounded GRPO")):
        plain, arm = accs["plain GRPO"], accs["re-grounded GRPO"]
        out.append(
            Statement(
                [
                    "Re-grounded GRPO reaches ",
                    num(arm),
                    " held-out accuracy at the final step, plain GRPO ",
                    num(plain),
                    ".",
                ],
                f"{inp.where('results.json')}: reground.table[].accuracy_at_final_step",
                flag=arm < plain,
            )
        )
    return out


BY_KIND = {
    "decompose": decompose,
    "linearity": linearity,
    "fit-pls": fit_pls,
    "extrapolate": extrapolate,
    "reconstruct": reconstruct,
    "backtest": backtest,
    "logprobs": logprobs,
    "demo": demo,
}
ORDER = ("decompose", "linearity", "fit-pls", "extrapolate", "reconstruct", "backtest", "logprobs", "demo")


def verdict(inputs: list[Input]) -> list[Statement]:
    """The statements of every input, by kind in ORDER (what a reader asks first: is it rank-1, is
    it a line, does it predict, what happened to the extrapolations)."""
    out = []
    for kind in ORDER:
        of_kind = [inp for inp in inputs if inp.kind == kind]
        for inp in of_kind:
            for statement in BY_KIND[kind](inp):
                if len(of_kind) > 1:  # which of them: its folder's name
                    statement.pieces.insert(0, Label(f"{os.path.basename(inp.label.rstrip('/')) or inp.label}:"))
                out.append(statement)
    return out
