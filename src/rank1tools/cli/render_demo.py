"""How the CLI shows `rank1 demo`'s results: the accuracy table and figures, the backtest beside it,
and the re-grounded arm (rich tables on stdout, as cli/render.py)."""

from __future__ import annotations

from .render import _column, _console, _table


def demo(result) -> None:
    """The trained demo's results table (accuracy and kept gain per model) and its figures."""
    from rich.markup import escape

    console = _console()
    t = _table(
        f"rank1 demo (seed {result.seed}{', quick' if result.quick else ''}): held-out accuracy, "
        f"GRPO steps {result.steps[0]}..{result.final}, history for extrapolation up to step {result.cut}"
    )
    for col in ("model", "step", "accuracy", "gain kept", "how"):
        _column(t, col, right=col in ("step", "accuracy", "gain kept"))
    for r in result.rows:
        t.add_row(
            escape(r.name), str(r.step), f"{r.accuracy:.1%}", "-" if r.kept is None else f"{r.kept:.0%}", escape(r.note)
        )
    console.print(t)
    f = result.figures

    def v(x):
        return "-" if x is None else f"{x:.3f}"

    s = _table("what the tool tells about the run", show_header=False)
    _column(s, style="bold")
    _column(s, right=True)
    for label, key in (
        ("mean energy_1 (all matrices, all checkpoints)", "energy_1_mean"),
        ("mean energy_1 at the final step", "energy_1_final"),
        ("mean PLS R² vs accuracy, in-sample", "pls_r2"),
        ("mean PLS R² vs accuracy, leave-one-out", "pls_loo_r2"),
        ("mean PLS R² vs step", "pls_r2_step"),
        ("mean trajectory explained variance (rank 1, all tensors)", "trajectory_explained_1"),
        ("share of changing weights with per-element R² > 0.7", "linear_elements"),
        ("share of base-rollout tokens with log-prob R² > 0.7", "logprob_tokens_linear"),
        ("mean per-token log-prob R² (base rollouts)", "logprob_r2_mean"),
    ):
        if key in f or not key.startswith("logprob"):  # the log-prob rows need the model extra
            s.add_row(label, v(f.get(key)))
    console.print(s)
    if result.backtest is not None:
        demo_backtest(console, result.backtest)
    if result.reground is not None:
        demo_reground(console, result.reground)
    console.print(
        f"results: {escape(str(result.out))}/results.json"
        + (f"; plot: {escape(result.plots[0])}" if result.plots else "")
        + (
            f"; re-grounding plot: {escape(result.reground['plots'][0])}"
            if result.reground and result.reground["plots"]
            else ""
        )
        + f"; {result.seconds['total']:.0f} s (training {result.seconds['train']:.0f} s"
        + (
            f", re-grounded arm {result.seconds['re-grounded GRPO']:.0f} s"
            if "re-grounded GRPO" in result.seconds
            else ""
        )
        + ")"
    )


def demo_reground(console, arm: dict) -> None:
    """`rank1 demo --reground M:N`: optimizer steps each arm needs to reach 90 % and 100 % of plain
    GRPO's final accuracy (virtual steps beside them), and the accuracy at plain's final step."""

    def steps(row, share):
        taken, virtual = row[f"steps_to_{share}"], row[f"virtual_steps_to_{share}"]
        if taken is None:
            return "never"
        return str(taken) if taken == virtual else f"{taken} (virtual {virtual})"

    chosen = "the backtest's schedule: " if arm.get("schedule") == "backtest" else ""
    t = _table(
        f"re-grounded GRPO ({chosen}{arm['train_steps']}:{arm['jump_steps']}: every {arm['train_steps']} optimizer "
        f"steps, jump {arm['jump_steps']} ahead) against plain GRPO, same base and seed; plain's final accuracy "
        f"{arm['plain_final_accuracy']:.1%}"
    )
    for col in ("arm", "steps to 90 %", "steps to 100 %", "accuracy at plain's final step"):
        _column(t, col, right=col != "arm")
    for row in arm["table"]:
        acc = row["accuracy_at_final_step"]
        t.add_row(row["arm"], steps(row, 90), steps(row, 100), "-" if acc is None else f"{acc:.1%}")
    console.print(t)
    speed = [f"{share} %: {arm[f'speedup_{share}']:.2f}x" for share in (90, 100) if arm[f"speedup_{share}"] is not None]
    jumps = ", ".join(f"step {j['step']}: {j['accuracy_before']:.1%} -> {j['accuracy']:.1%}" for j in arm["jumps"])
    console.print(
        "speed-up in optimizer steps (plain's steps / re-grounded's): "
        + ("; ".join(speed) if speed else "none measurable (an arm never reaches a threshold)")
    )
    if jumps:
        console.print(f"accuracy across each jump: {jumps}")
    console.print(
        "the papers, for scale: RLVR-linearity 6.1x with re-grounding (M = N = 100), AlphaRL 2.0x on average, on "
        "1.5B-32B models trained for days; this is a 0.6 M-parameter model trained for a minute"
    )


BACKTEST_FIGURES = (
    ("rel. error", "rel_error", "{:.2f}"),
    ("cosine", "cosine", "{:.2f}"),
    ("norm ratio", "norm_ratio", "{:.2f}"),
    ("|Δ log-prob|", "logprob_mad", "{:.2f}"),
    ("KL", "kl", "{:.2f}"),
)


def demo_backtest(console, bt: dict) -> None:
    """The backtest at the cut: per method, its recommended jump and longest jump, each with the
    weight- and output-space figures and the accuracy its prediction reached against the real
    checkpoint's; then which figures tracked the accuracy (Spearman ρ with the shortfall)."""
    shown = [
        (h, k, f) for h, k, f in BACKTEST_FIGURES if any(k in r for m in bt["methods"].values() for r in m["rows"])
    ]
    t = _table(
        f"backtest at the cut (step {bt['cut']}): each method's fit predicting later checkpoints; recommended "
        f"jump: the longest with rel. error < {bt['max_error']}"
    )
    for col in ("method", "jump", *(h for h, _, _ in shown), "predicted accuracy", "real accuracy"):
        _column(t, col, right=col not in ("method",))
    for name, m in bt["methods"].items():
        by_jump = {r["jump"]: r for r in m["rows"]}
        picks = sorted({m["recommended_jump"], max(by_jump)} & set(by_jump))
        for jump in picks:
            r = by_jump[jump]
            label = f"{jump} (recommended)" if jump == m["recommended_jump"] else str(jump)
            t.add_row(
                name,
                label,
                *(f.format(r[k]) for _, k, f in shown),
                f"{r['accuracy_predicted']:.1%}",
                f"{r['accuracy_real']:.1%}",
            )
    console.print(t)
    rho = bt["tracking"]

    def said(names):
        return ", ".join(f"{n} (ρ {'-' if rho[n] is None else f'{rho[n]:.2f}'})" for n in names) or "none"

    console.print(
        f"tracked the accuracy shortfall over every prediction (Spearman ρ ≥ 0.7): {said(bt['tracked'])}; "
        f"did not: {said(bt['not_tracked'])}"
    )
    rg = bt["reground"]
    console.print(
        f"two-point over the last {rg['segment']} steps before the cut (the re-grounding step): recommended jump "
        f"{rg['recommended_jump']}"
    )
