"""The page's sections about what was made from the run (docs/commands/report.md#sections):
extrapolations (per target: norm ratios, flagged tensors, rounding losses), reconstructions,
backtests, log-probabilities, and a demo's accuracy table, curve, backtest and re-grounding."""

from __future__ import annotations

from ...plots import demo_accuracy_plot
from ...plots_backtest import backtest_plots
from ...plots_reground import reground_accuracy_plot
from .figures import UNWRITTEN, FigureMaker
from .html import Section, Table, heading, paragraph
from .inputs import EXTRAPOLATION, ROUNDING, Input, number


def _rounding_row(inp: Input, target) -> list:
    if not (target / ROUNDING).is_file():
        return ["–", "–", "–"]
    r = inp.json(ROUNDING, target)
    return [r.get("updated_elements"), number(r.get("lost_fraction")), number(r.get("rel_error"))]


def extrapolations_section(inputs: list[Input]) -> Section:
    """One table, a row per target of every input, and the flagged tensors of all of them."""
    sec = Section("extrapolations", "Extrapolations", "from rank1 extrapolate: one row per target")
    summary, flagged_rows = [], []
    for inp in inputs:
        for target in inp.targets:
            rep = inp.json(EXTRAPOLATION, target)
            method = str(rep.get("method"))
            if method == "alpharl":
                ratios = [number(m.get("norm_ratio")) for m in rep.get("modules") or []]
                goal, limit = f"{rep.get('kind')} {rep.get('target')}", number(rep.get("flag_limit"))
            else:
                ratios = [number(t.get("norm_ratio")) for t in rep.get("tensors") or []]
                goal, limit = f"step {rep.get('target_step')}", number(rep.get("norm_ratio_limit"))
            finite = sorted(r for r in ratios if r == r)
            median = finite[len(finite) // 2] if finite else float("nan")
            flagged = rep.get("flagged") or []
            name = inp.label if target == inp.path else f"{inp.label.rstrip('/')}/{target.name}"
            summary.append(
                [name, method, goal, len(ratios), median, finite[-1] if finite else float("nan"), limit, len(flagged)]
                + _rounding_row(inp, target)[1:]
            )
            flagged_rows += [
                [
                    name,
                    str(f.get("tensor", f.get("module"))),
                    number(f.get("norm_ratio")),
                    number(f.get("limit", limit)),
                ]
                for f in flagged
                if isinstance(f, dict)
            ]
    columns = ["output", "method", "target", "tensors", "median ratio", "max ratio", "flag limit", "flagged"]
    columns += ["lost to rounding", "rounding error"]
    caption = (
        "ratio: ‖predicted update‖ / ‖last real update‖ per tensor; lost to rounding: the share of updated "
        "elements the output dtype left unchanged; rounding error: ‖stored − intended update‖ / ‖intended update‖"
    )
    sec.add(Table(columns, summary, caption=caption))
    if flagged_rows:
        sec.add(Table(["output", "flagged tensor", "norm ratio", "limit"], flagged_rows, caption="flagged tensors"))
    else:
        sec.add(paragraph("No tensor flagged."))
    return sec


def reconstructions_section(inputs: list[Input]) -> Section:
    sec = Section("reconstructions", "Reconstructions", "from rank1 reconstruct: what rounding kept")
    rows = []
    for inp in inputs:
        params = inp.provenance.get("parameters") or {}
        for target in inp.targets:
            rank = params.get("rank")
            rows.append(
                [
                    inp.label if target == inp.path else f"{inp.label}/{target.name}",
                    str(rank if target == inp.path else target.name),
                    str(params.get("dtype", "–")),
                    *_rounding_row(inp, target),
                ]
            )
    sec.add(Table(["output", "rank", "dtype", "updated elements", "lost to rounding", "update rel. error"], rows))
    return sec


def backtests_section(inputs: list[Input], figs: FigureMaker) -> Section:
    sec = Section("backtest", "Backtests: how far ahead do extrapolations hold", "from rank1 backtest")
    notes: set[str] = set()
    for inp in inputs:
        summary = inp.json("summary.json")
        overall = inp.jsonl("backtest.jsonl")
        sec.add(heading(f"{inp.label} ({summary.get('method')})"))
        note = str(summary.get("note", ""))
        if note and note not in notes:  # the same definitions under every backtest: said once
            notes.add(note)
            sec.add(paragraph(note))
        for f in figs.draw(
            lambda overall=overall, summary=summary: backtest_plots(overall, summary, UNWRITTEN),
            {"error_by_jump": "relative error, cosine and norm ratio of the predicted update against the jump"},
        ):
            sec.add(f)
        cuts = [c for c in summary.get("cuts") or [] if isinstance(c, dict)]
        sec.add(
            Table(
                ["cut", "window", "recommended jump", "error, shortest jump", "error, longest jump", "limited by run"],
                [
                    [
                        c.get("cut"),
                        c.get("window_length"),
                        c.get("recommended_jump"),
                        number((c.get("shortest") or {}).get("rel_error")),
                        number((c.get("longest") or {}).get("rel_error")),
                        bool(c.get("limited_by_run")),
                    ]
                    for c in cuts
                ],
                caption=f"per cut (error bar {summary.get('max_error')}; recommended jump overall: "
                f"{summary.get('recommended_jump')})",
            )
        )
        keys = ["cut", "target_step", "jump", "rel_error", "cosine", "norm_ratio", "logprob_mad", "kl"]
        sec.add(Table(keys, [[r.get(k) for k in keys] for r in overall], caption="every prediction (whole model)"))
    return sec


def logprobs_section(inputs: list[Input]) -> Section:
    sec = Section("logprobs", "Log-probabilities: do the outputs move linearly", "from rank1 logprobs")
    for inp in inputs:
        summary = inp.json("summary.json")
        head = summary.get("headline") or {}
        sec.add(heading(inp.label))
        sec.add(
            paragraph(f"{summary.get('sequences')} sequences, {summary.get('tokens')} tokens. {head.get('note', '')}")
        )
        sec.add(
            Table(
                ["kept tokens", "linear (R² > 0.7)", "share", "mean R²", "median R²"],
                [
                    [
                        head.get("kept"),
                        head.get("linear"),
                        number(head.get("frac_r2_above_0.7")),
                        number(head.get("r2_mean")),
                        number(head.get("r2_median")),
                    ]
                ],
            )
        )
        buckets = inp.jsonl("buckets.jsonl")
        sec.add(
            Table(
                ["bucket", "tokens", "share R² > 0.7", "mean R²"],
                [
                    [b.get("bucket"), b.get("tokens"), number(b.get("frac_r2_above_0.7")), number(b.get("r2_mean"))]
                    for b in buckets
                ],
                caption="by position in the completion",
            )
        )
        steps = inp.jsonl("steps.jsonl")
        sec.add(
            Table(
                ["step", "mean log-prob per token", "mean log-prob per sequence"],
                [
                    [s.get("step"), number(s.get("mean_logprob_per_token")), number(s.get("mean_logprob_per_sequence"))]
                    for s in steps
                ],
            )
        )
    return sec


def demo_section(inp: Input, figs: FigureMaker) -> Section:
    sec = Section("demo", "The demo: held-out accuracy", f"from rank1 demo ({inp.label}/results.json)")
    results = inp.json("results.json")
    rows = [r for r in results.get("rows") or [] if isinstance(r, dict)]
    curve = {int(p["step"]): float(p["accuracy"]) for p in results.get("curve") or [] if isinstance(p, dict)}
    cut = results.get("cut")
    sec.add(
        Table(
            ["model", "step", "held-out accuracy", "kept of the gain", "note"],
            [
                [
                    str(r.get("name")),
                    r.get("step"),
                    number(r.get("accuracy")),
                    number(r.get("kept")),
                    str(r.get("note", "")),
                ]
                for r in rows
            ],
            caption=f"history ends at step {cut}; kept = (accuracy − base) / (final − base)",
        )
    )
    if curve and isinstance(cut, int):
        points = [(str(r["name"]), int(r["step"]), float(r["accuracy"])) for r in rows[3:]]
        for f in figs.draw(
            lambda: demo_accuracy_plot(curve, cut, points, UNWRITTEN),
            {"accuracy": "the run's held-out accuracy by step and each synthesized model at the step it stands for"},
        ):
            sec.add(f)
    bt = results.get("backtest")
    if isinstance(bt, dict) and bt.get("methods"):
        sec.add(heading("Backtest at the cut"))
        table = []
        for name, m in sorted((bt.get("methods") or {}).items()):
            for r in m.get("rows") or []:
                table.append(
                    [
                        name,
                        r.get("jump"),
                        r.get("target_step"),
                        number(r.get("rel_error")),
                        number(r.get("cosine")),
                        number(r.get("accuracy_predicted")),
                        number(r.get("accuracy_real")),
                    ]
                )
        sec.add(
            Table(
                ["method", "jump", "target step", "rel. error", "cosine", "accuracy predicted", "accuracy real"],
                table,
                caption=f"cut {bt.get('cut')}, error bar {bt.get('max_error')}; recommended jumps: "
                + ", ".join(f"{n} {m.get('recommended_jump')}" for n, m in sorted(bt["methods"].items())),
            )
        )
        tracking = bt.get("tracking") or {}
        if tracking:
            sec.add(
                Table(
                    ["figure", "Spearman ρ with the accuracy error"],
                    [[k, number(v)] for k, v in sorted(tracking.items())],
                    caption="which figures tracked the accuracy",
                )
            )
    rg = results.get("reground")
    if isinstance(rg, dict) and rg.get("table"):
        sec.add(heading("Re-grounded GRPO"))
        sec.add(
            Table(
                [
                    "arm",
                    "accuracy at the final step",
                    "steps to 90 %",
                    "steps to 100 %",
                    "virtual steps to 90 %",
                    "virtual steps to 100 %",
                ],
                [
                    [
                        str(r.get("arm")),
                        number(r.get("accuracy_at_final_step")),
                        r.get("steps_to_90"),
                        r.get("steps_to_100"),
                        r.get("virtual_steps_to_90"),
                        r.get("virtual_steps_to_100"),
                    ]
                    for r in rg["table"]
                ],
                caption=f"schedule {rg.get('train_steps')}:{rg.get('jump_steps')} ({rg.get('schedule')}); "
                "steps to X %: optimizer steps until the accuracy reaches X % of plain GRPO's final",
            )
        )
        arm = [p for p in rg.get("curve") or [] if isinstance(p, dict)]
        if curve and arm:
            label = f"{rg.get('train_steps')}:{rg.get('jump_steps')}"
            for f in figs.draw(
                lambda: reground_accuracy_plot(curve, arm, label, UNWRITTEN),
                {"reground": "plain and re-grounded GRPO: accuracy against the steps taken and the virtual step"},
            ):
                sec.add(f)
    return sec
