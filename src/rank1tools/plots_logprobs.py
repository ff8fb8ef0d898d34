"""Figures of `rank1 logprobs` (docs/commands/logprobs.md#outputs), drawn with the helpers every
plot shares (plot_common: optional matplotlib, saving without run-to-run metadata).

- token_r2_histogram: the per-token R² of the kept tokens, the 0.7 threshold and the mean marked;
- logprob_by_step: the mean log-prob per token at each step;
- sequence_trajectories: the summed log-prob of up to MAX_TRAJECTORIES sequences (the first ones
  in file order) against the step, each with its R²;
- r2_by_bucket: share of kept tokens with R² > 0.7 and mean R², per position bucket.
"""

from __future__ import annotations

from pathlib import Path

from . import plot_common as common
from .math.linefit import R2_LINEAR

MAX_TRAJECTORIES = 8


def logprobs_plots(figs, steps: list[int], sequences, out_dir: Path) -> list[Path]:
    """`figs`: commands.logprobs.figures.Figures; `sequences`: the store's SequenceEntry list.
    Returns the files written, PNG then SVG per figure."""
    matplotlib, plt = common.pyplot()
    out_dir = Path(out_dir)
    written: list[Path] = []
    span = common.steps_label(steps)
    with matplotlib.rc_context(common.RC):
        r2 = figs.token_r2[figs.keep]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        try:
            ax.hist(r2, bins=40, range=(0.0, 1.0), color="C0", alpha=0.8)
            ax.axvline(R2_LINEAR, color="C3", linestyle="--", linewidth=1.2, label=f"R² = {R2_LINEAR}")
            if r2.size:
                ax.axvline(float(r2.mean()), color="C1", linewidth=1.2, label=f"mean {float(r2.mean()):.3f}")
            ax.set_xlabel("per-token R² of the log-prob against the step")
            ax.set_ylabel("tokens")
            ax.set_title(f"token log-prob linearity ({r2.size} kept tokens, {span})")
            ax.legend(loc="upper left")
            fig.tight_layout()
            written += common.save(fig, out_dir, "token_r2_histogram")
        finally:
            plt.close(fig)

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        try:
            ax.plot(steps, [r["mean_logprob_per_token"] for r in figs.per_step], marker="o", color="C0")
            ax.set_xlabel("step")
            ax.set_ylabel("mean log-prob per token")
            ax.set_title(f"mean token log-prob ({span})")
            fig.tight_layout()
            written += common.save(fig, out_dir, "logprob_by_step")
        finally:
            plt.close(fig)

        fig, ax = plt.subplots(figsize=(6.0, 4.0))
        try:
            for i, s in enumerate(sequences[:MAX_TRAJECTORIES]):
                name = f"line {s.line}" if s.id is None else str(s.id)
                r2s = figs.sequences[i]["sum_r2"]
                label = f"{name} (R² {r2s:.2f})" if r2s is not None else name
                ax.plot(steps, figs.sums[:, i], marker=".", label=label)
            ax.set_xlabel("step")
            ax.set_ylabel("summed log-prob of the completion")
            ax.set_title(f"sequence log-prob trajectories ({span})")
            ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            written += common.save(fig, out_dir, "sequence_trajectories")
        finally:
            plt.close(fig)

        fig, ax = plt.subplots(figsize=(5.0, 3.6))
        try:
            names = [b["bucket"] for b in figs.buckets]
            xs = list(range(len(names)))
            frac = [common.num(b["frac_r2_above_0.7"]) for b in figs.buckets]
            mean = [common.num(b["mean_r2"]) for b in figs.buckets]
            ax.bar([x - 0.2 for x in xs], frac, width=0.4, color="C0", label=f"share R² > {R2_LINEAR}")
            ax.bar([x + 0.2 for x in xs], mean, width=0.4, color="C1", label="mean R²")
            ax.set_xticks(xs, names)
            ax.set_ylim(0.0, 1.05)
            ax.set_xlabel("position in the completion (thirds)")
            ax.set_title(f"token log-prob linearity by position ({span})")
            ax.legend(loc="lower right")
            fig.tight_layout()
            written += common.save(fig, out_dir, "r2_by_bucket")
        finally:
            plt.close(fig)
    return written
