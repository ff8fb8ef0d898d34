"""The figure of `rank1 demo --reground M:N` (docs/commands/demo.md#re-grounded-grpo), drawn with the
helpers every plot shares (plot_common: optional matplotlib, saving without run-to-run metadata):
plain and re-grounded GRPO's held-out accuracy against the optimizer steps taken (left) and against
the virtual step, steps taken + steps jumped (right), with 90 % and 100 % of plain's final accuracy.
"""

from __future__ import annotations

from pathlib import Path

from . import plot_common as common


def reground_accuracy_plot(plain: dict[int, float], arm: list[dict], label: str, out_dir: Path) -> list[Path]:
    """`plain`: step -> accuracy; `arm`: points with step, virtual_step, accuracy; `label`: "M:N".
    Returns the PNG and SVG written (stem "reground")."""
    matplotlib, plt = common.pyplot()
    final = plain[max(plain)]
    steps = sorted(plain)
    with matplotlib.rc_context(common.RC):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
        try:
            for ax, key, xlabel in (
                (axes[0], "step", "optimizer steps taken (GRPO steps)"),
                (axes[1], "virtual_step", "virtual step (taken + jumped)"),
            ):
                ax.plot(steps, [plain[s] for s in steps], marker="o", color="black", label="plain GRPO")
                ax.plot(
                    [p[key] for p in arm],
                    [p["accuracy"] for p in arm],
                    marker="s",
                    color="C0",
                    label=f"re-grounded GRPO ({label})",
                )
                for share, style in ((0.9, ":"), (1.0, "--")):
                    ax.axhline(
                        share * final, color="grey", linestyle=style, linewidth=1, label=f"{share:.0%} of plain's final"
                    )
                ax.set_xlabel(xlabel)
                ax.grid(True, alpha=0.3)
            axes[0].set_ylabel("held-out exact-match accuracy")
            axes[0].legend(fontsize=8, loc="lower right")
            fig.suptitle("rank1 demo: plain and re-grounded GRPO from the same base and seed")
            fig.tight_layout()
            return common.save(fig, Path(out_dir), "reground")
        finally:
            plt.close(fig)
