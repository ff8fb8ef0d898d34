"""The mixture-of-experts figure of `rank1 decompose --plots` (docs/formats.md#mixture-of-experts-tensors):
per layer and expert at the last step, how far each expert moved and how rank-1 its update is."""

from __future__ import annotations

from pathlib import Path

from . import plot_common as common


def expert_key(e) -> tuple:
    """Routed experts by index, then "shared"."""
    return (1, 0) if isinstance(e, str) else (0, int(e))


def expert_grid(rows: list[dict], key: str, step) -> tuple[list[int], list, list[list[float]]]:
    """(layers, experts, matrix): the mean of `key` per (layer, expert) over the module types at `step`;
    rows of dense modules (no expert) are left out. Missing cells are NaN."""
    return common.grid(rows, key, step, column="expert", order=expert_key)


def expert_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """energy_by_expert: two layer × expert heatmaps at the last step, `rel_update` (‖ΔW‖/‖θ₀‖: which
    experts moved) and `energy_1` (how rank-1 each expert's update is), each the mean over the
    expert's matrices in the layer. Nothing for a model without experts."""
    if not any(r.get("expert") is not None for r in rows):
        return []
    matplotlib, plt = common.pyplot()
    last = max(r["step"] for r in rows)
    layers, experts, moved = expert_grid(rows, "rel_update", last)
    energy = expert_grid(rows, "energy_1", last)[2]
    labels = [str(e) for e in experts]
    with matplotlib.rc_context(common.RC):
        fig, axes = plt.subplots(
            1, 2, figsize=(2 * max(4.0, 0.5 * len(experts) + 2.5), min(10, max(3.5, 0.25 * len(layers) + 2)))
        )
        try:
            hi = max([v for row in moved for v in row if v == v] or [1.0])
            for ax, mat, cmap, vmax, title in (
                (axes[0], moved, "magma", hi, f"rel_update = ‖ΔW‖/‖θ₀‖ at step {last}"),
                (axes[1], energy, "viridis", 1.0, f"energy₁ at step {last}"),
            ):
                im = common.heatmap(ax, plt, layers, labels, mat, cmap, 0.0, vmax)
                ax.set_xlabel("expert")
                ax.set_title(title)
                fig.colorbar(im, ax=ax)
            fig.tight_layout()
            return common.save(fig, Path(out_dir), "energy_by_expert")
        finally:
            plt.close(fig)
