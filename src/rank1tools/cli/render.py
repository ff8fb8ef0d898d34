"""How the CLI shows results: rich tables on stdout (JSON output is in cli/app.py).

No value is ever cut (docs/cli.md, "Tables"): on a terminal the tables fit its width and a cell too
narrow for its value folds it onto the next line; anywhere else (a pipe, a file, a CI log) there is
no width limit at all, so every table is as wide as its values and no line wraps: a path or a
figure stays on one line, whole, for grep and for the reader of the log.

rich is imported inside each function, so importing this module costs nothing."""

from __future__ import annotations

import os

UNLIMITED_WIDTH = 1_000_000  # off a terminal: wide enough that rich never wraps or shortens


def _console():
    """stdout for rich: the terminal's width on a terminal, no width limit elsewhere. COLUMNS, which
    rich would apply to a pipe, is ignored there (a log is read whole, not on a screen), and so is
    FORCE_COLOR's claim of a terminal: a CI log with colours is still a log."""
    import sys

    from rich.console import Console

    try:
        on_terminal = sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        on_terminal = False
    return Console() if on_terminal else Console(width=UNLIMITED_WIDTH)


def _table(title: str | None = None, **kw):
    from rich.table import Table

    return Table(title=title, title_justify="left", **kw)


def _column(table, header: str = "", right: bool = False, **kw) -> None:
    """A column whose values fold (never an ellipsis) when the terminal is too narrow."""
    table.add_column(header, justify="right" if right else "left", overflow="fold", **kw)


def steps_text(steps: list[int], show: int = 6) -> str:
    """Steps for a terminal line: all of a short list, else the count with the first and last
    (the full list is in --json and the output's manifest)."""
    if len(steps) <= show:
        return "steps " + ", ".join(map(str, steps))
    return f"{len(steps)} steps, {steps[0]} .. {steps[-1]} (all of them in --json)"


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def model(report) -> None:
    from rich.markup import escape

    t = _table(f"model {escape(report.source)}", show_header=False)
    _column(t, style="bold")
    _column(t)
    t.add_row("tensors", str(report.tensors))
    t.add_row("parameters", f"{report.parameters:,}")
    t.add_row("size", human_bytes(report.bytes))
    t.add_row("dtypes", ", ".join(f"{k}: {v}" for k, v in report.dtypes.items()))
    t.add_row("shards", str(report.shards))
    t.add_row(
        "matrix modules", f"{report.matrix_modules} in {report.layers} layers ({report.matrix_parameters:,} parameters)"
    )
    t.add_row("module types", ", ".join(f"{k}: {v}" for k, v in report.module_types.items()) or "none")
    t.add_row("lm_head", "tied to embedding" if report.lm_head_tied else "stored")
    if report.adapter is not None:  # a PEFT adapter: the rows above count its own tensors
        a = report.adapter
        rs = ", rslora" if a.get("use_rslora") else ""
        on = a.get("base_model_name_or_path") or "its base"
        t.add_row(
            "PEFT adapter",
            escape(f"{a.get('peft_type')} r={a.get('r')}, lora_alpha={a.get('lora_alpha')}{rs}; read on {on}"),
        )
    if report.revision:
        t.add_row("revision", escape(report.revision))
    _console().print(t)


def run(report) -> None:
    from rich.markup import escape

    t = _table(f"run {escape(report.source)}: {len(report.checkpoints)} checkpoints")
    for col in ("step", "layout", "weights", "dtypes", "tensors", "status"):
        _column(t, col, right=col in ("step", "tensors"))
    for c in report.checkpoints:
        status = "ok" if c.status == "ok" else f"[red]{escape(c.problem)}[/red]"  # a path may hold [brackets]
        step = str(c.step) if c.step is not None else os.path.basename(c.path)  # a name without a step
        t.add_row(
            escape(step),
            c.layout,
            escape(c.weights or "-"),
            ", ".join(f"{k}: {v}" for k, v in c.dtypes.items()) or "-",
            str(c.tensors or "-"),
            status,
        )
    _console().print(t)


def decompose(result) -> None:
    from rich.markup import escape

    s = result.summary
    console = _console()
    experts = [("by_expert", "expert")] if "by_expert" in s else []  # a mixture-of-experts model
    for key, title in (("by_type", "module type"), *experts, ("by_step", "step")):
        t = _table(f"mean rank-1 share of the update, by {title}")
        _column(t, title)
        _column(t, "energy_1 (σ₁²/‖ΔW‖²)", right=True)
        _column(t, "norm_frac_1 (σ₁/‖ΔW‖)", right=True)
        _column(t, "rows", right=True)
        for g, v in s[key].items():
            t.add_row(escape(str(g)), f"{v['energy_1']:.4f}", f"{v['norm_frac_1']:.4f}", str(v["n"]))
        console.print(t)
    o = s["overall"]
    console.print(
        f"{len(result.modules)} modules x {len(result.steps)} checkpoints -> {escape(str(result.out))} "
        f"(overall energy_1 {o['energy_1']:.4f}, norm_frac_1 {o['norm_frac_1']:.4f})"
    )


def reconstruct(result) -> None:
    from rich.markup import escape

    t = _table(
        f"rank-k reconstructions of {result.modules} modules"
        + (" (from the factor store)" if result.used_factors else "")
    )
    for col in ("rank", "output", "updated elements", "lost to rounding", "update rel. error"):
        _column(t, col, right=col not in ("rank", "output"))
    for o in result.outputs:
        t.add_row(
            escape(o.rank), escape(o.path), f"{o.updated_elements:,}", f"{o.lost_fraction:.2%}", f"{o.rel_error:.2e}"
        )
    _console().print(t)


def fit_pls(result) -> None:
    """The fit-pls summary: mean R²s, share of linear modules, the 5 most and least linear, warnings.
    Every figure may be missing (None: e.g. no module, or no leave-one-out fit defined): shown as "-"."""
    from rich.markup import escape

    s, console = result.summary, _console()
    m = s["mean"]

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    steps = f" (steps {result.steps[0]}..{result.steps[-1]})" if result.steps else ""
    t = _table(
        f"PLS fits of {m['n']} modules over {len(result.steps)} checkpoints{steps}"
        + (f", metric {escape(result.metric)}" if result.metric else ", step only")
    )
    for col in ("module type", "in-sample R²", "leave-one-out R²", "R²_step", "modules"):
        _column(t, col, right=col != "module type")
    for g, v in s["by_type"].items():
        t.add_row(escape(g), f(v.get("r2")), f(v.get("loo_r2")), f(v.get("r2_step")), str(v["n"]))
    t.add_row("[bold]all[/bold]", f(m.get("r2")), f(m.get("loo_r2")), f(m.get("r2_step")), str(m["n"]))
    console.print(t)
    if result.metric:
        share = s.get("share_loo_above_0.9")
        console.print("share of modules with leave-one-out R² > 0.9: " + ("-" if share is None else f"{share:.0%}"))
    if result.checkpoints_without_metric:
        console.print(f"checkpoints without a metric (not fitted): {steps_text(result.checkpoints_without_metric)}")
    if result.metric_steps_without_checkpoint:
        console.print(
            f"metric rows without a checkpoint (not fitted): {steps_text(result.metric_steps_without_checkpoint)}"
        )
    key = s["ranked_by"]
    for title, rows in (("most linear", s["most_linear"][:5]), ("least linear", s["least_linear"][:5])):
        if rows:
            console.print(f"{title} ({key}): " + ", ".join(f"{escape(r['module'])} {f(r[key])}" for r in rows))
    for w in result.warnings:
        console.print(f"[bold red]warning:[/bold red] {escape(w)}")
    if result.plots:
        console.print("plots: " + ", ".join(escape(p) for p in result.plots if p.endswith(".png")))
    console.print(f"-> {escape(result.out)}")


def extrapolate(result) -> None:
    """One row per written checkpoint: target, folder, norm ratios, flagged tensors, rounding."""
    from rich.markup import escape

    console = _console()
    hist = result.history_steps
    where = f" from steps {hist[0]}..{hist[-1]} ({len(hist)} checkpoints)" if hist else ""
    t = _table(f"{result.method} extrapolation of {len(result.tensors)} tensors{where}")
    for col in ("target", "output", "norm ratio (median)", "(max)", "flagged", "lost to rounding", "update rel. error"):
        _column(t, col, right=col not in ("target", "output"))

    def f(v):
        return "-" if v is None else f"{v:.3g}"

    for o in result.outputs:
        t.add_row(
            f"{o.kind} {o.target:g}",
            escape(o.path),
            f(o.norm_ratio_median),
            f(o.norm_ratio_max),
            str(len(o.flagged)),
            f"{o.lost_fraction:.2%}",
            f"{o.rel_error:.2e}",
        )
    console.print(t)
    for o in result.outputs:
        if o.flagged:
            worst = sorted(o.flagged, key=lambda r: -r["norm_ratio"])[:3]
            console.print(
                f"{o.kind} {o.target:g}: {len(o.flagged)} tensors above their norm-ratio limit, e.g. "
                + ", ".join(f"{escape(r['tensor'])} {r['norm_ratio']:.3g} (limit {r['limit']:.3g})" for r in worst)
            )


def linearity(result) -> None:
    """The linearity summary: a table by module type, the headline line, the least linear tensors."""
    from rich.markup import escape

    s, console = result.summary, _console()
    key, r = "frac_r2_above_0.7", result.rank
    r2 = s.get("element_r2")

    def f(v, pct=False):
        return "-" if v is None else (f"{v:.1%}" if pct else f"{v:.3f}")

    t = _table(
        f"linearity of {s['mean']['n']} tensors over {len(result.steps)} checkpoints "
        f"(steps {result.steps[0]}..{result.steps[-1]})"
    )
    cols = (
        ["type", "tensors", "mean explained_1"]
        + ([f"mean explained_{r}"] if r > 1 else [])
        + ["mean coef R²_1", "elements R² > 0.7", "static elements"]
        + (["kept", "mean R²", "median R²"] if r2 else [])
    )
    for col in cols:
        _column(t, col, right=col != "type")

    def add(label, g):
        t.add_row(
            label,
            str(g["n"]),
            f(g["mean_explained_1"]),
            *([f(g["mean_explained_r"])] if r > 1 else []),
            f(g["mean_coef_r2_1"]),
            f(g[key], True),
            f(g["static_fraction"], True),
            *([f"{g['kept']:,}", f(g["r2_mean"]), f(g["r2_median"])] if r2 else []),
        )

    for name, g in s["by_type"].items():
        add(escape(name), g)
    add("[bold]all[/bold]", s["mean"])
    console.print(t)
    h = s["headline"]
    sample = f", sampled: up to {s['sample']:,} elements per tensor" if s["sample"] else ""
    console.print(
        f"[bold]{f(h[key], True)}[/bold] of the changing elements have per-element linear R² > 0.7 "
        f"(weighted by tensor size; {f(h['static_fraction'], True)} of elements do not change and are "
        f"left out{sample})"
    )
    if r2:
        console.print(
            f"per-element R² (RLVR linearity's figure): mean [bold]{f(h['r2_mean'])}[/bold], median "
            f"[bold]{f(h['r2_median'])}[/bold] over {r2['kept']:,} kept of {r2['evaluated']:,} elements "
            f"({'base as step 0' if r2['with_base'] else 'base left out'}; removed {r2['removed_min_change']:,} "
            f"with range ≤ {r2['min_change']:g}, {r2['removed_min_distinct']:,} with fewer than "
            f"{r2['min_distinct']} distinct values)"
        )
    if s["least_linear"]:
        console.print(
            "least linear: " + ", ".join(f"{escape(x['tensor'])} {f(x[key], True)}" for x in s["least_linear"][:5])
        )
    if result.plots:
        console.print("plots: " + ", ".join(escape(p) for p in result.plots if p.endswith(".png")))
    console.print(f"-> {escape(result.out)}")
