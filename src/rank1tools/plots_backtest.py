"""Figure of `rank1 backtest` (docs/commands/backtest.md#outputs), drawn with the helpers every
plot shares (plot_common: optional matplotlib, saving without run-to-run metadata).

- error_by_jump: per cut, the overall relative update error, the cosine and the norm ratio of the
  predicted update against the jump length in steps; the --max-error bar and each cut's
  recommended jump marked.
"""

from __future__ import annotations

from pathlib import Path

from . import plot_common as common


def backtest_plots(overall: list[dict], summary: dict, out_dir: Path) -> list[Path]:
    """Returns the files written, PNG then SVG."""
    matplotlib, plt = common.pyplot()
    out_dir = Path(out_dir)
    with matplotlib.rc_context(common.RC):
        fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.8))
        try:
            for i, c in enumerate(summary["cuts"]):
                rows = [r for r in overall if r["cut"] == c["cut"]]
                jumps = [r["jump"] for r in rows]
                label = f"cut {c['cut']} (window {c['window_length']})"
                for ax, key in zip(axes, ("rel_error", "cosine", "norm_ratio")):
                    ax.plot(jumps, [common.num(r[key]) for r in rows], marker="o", color=f"C{i % 10}", label=label)
                if c["recommended_jump"]:
                    axes[0].axvline(c["recommended_jump"], color=f"C{i % 10}", linestyle=":", linewidth=1)
            axes[0].axhline(summary["max_error"], color="C3", linestyle="--", linewidth=1.2, label="--max-error")
            axes[0].set_ylabel(r"$\Vert\hat{\Delta} - \Delta\Vert \,/\, \Vert\Delta\Vert$")
            axes[0].set_title("relative update error")
            axes[1].set_ylabel(r"cosine$(\hat{\Delta}, \Delta)$")
            axes[1].set_title("direction")
            axes[2].axhline(1.0, color="grey", linewidth=0.8)
            axes[2].set_ylabel(r"$\Vert\hat{\Delta}\Vert \,/\, \Vert\Delta\Vert$")
            axes[2].set_title("norm ratio")
            for ax in axes:
                ax.set_xlabel("jump (steps after the cut)")
            axes[0].legend(fontsize=7, loc="best")
            fig.suptitle(f"backtest of --method {summary['method']}: the overall predicted update against the real one")
            fig.tight_layout()
            return common.save(fig, out_dir, "error_by_jump")
        finally:
            plt.close(fig)
