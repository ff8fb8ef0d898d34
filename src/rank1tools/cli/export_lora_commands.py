"""`rank1 export-lora`: a checkpoint's rank-k update as a PEFT LoRA adapter (docs/commands/export-lora.md)."""

from __future__ import annotations

import typer

from ..jsonutil import json_safe
from .app import (
    Rank1Command,
    app,
    check_common_early,
    check_output_early,
    interrupt_hint,
    print_json,
    print_result_notes,
    set_hub_cache_policy,
    stderr_progress,
)
from .params import (
    BASE_ARG,
    DEVICE_OPT,
    EXCLUDE_OPT,
    FORCE_OPT,
    HUB_CACHE_OPT,
    JSON_OPT,
    QUIET_OPT,
    choice_option,
    include_option,
    out_option,
)

ADAPTER_DTYPE_OPT = choice_option(
    "float32",
    "--dtype",
    ("auto", "float32", "bfloat16", "float16"),
    "Dtype of the LoRA factors: float32 (default), bfloat16, float16, or auto (the modules' base dtype).",
)


@app.command("export-lora", cls=Rank1Command)
def export_lora(
    base: str = BASE_ARG,
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint θ_t whose rank-k update is exported."),
    out: str = out_option("Output folder: the adapter (adapter_model.safetensors, adapter_config.json)."),
    rank: str = typer.Option(..., "--rank", "-k", metavar="K", help="LoRA rank r (= lora_alpha): top-k triplets."),
    no_norm_match: bool = typer.Option(
        False, "--no-norm-match", help="Export ΔW_k as is, without rescaling to ‖ΔW‖ (as reconstruct's option)."
    ),
    modules_to_save: bool = typer.Option(
        False, "--modules-to-save", help="Save the modules of changed tensors outside the targets in full."
    ),
    dtype: str = ADAPTER_DTYPE_OPT,
    include: list[str] | None = include_option(
        "Glob of tensor names (repeatable); replaces the default matrix-module set."
    ),
    exclude: list[str] | None = EXCLUDE_OPT,
    all_2d: bool = typer.Option(False, "--all-2d", help="Also lm_head and other 2-D tensors (not embeddings)."),
    exact: bool = typer.Option(False, "--exact", help="Full SVD (torch.linalg.svd) instead of randomized."),
    factors: str | None = typer.Option(
        None, "--factors", metavar="FACTORS_DIR", help="A decompose --out folder: take σ, u, v and ‖ΔW‖ from it."
    ),
    device: str = DEVICE_OPT,
    hub_cache_policy: str | None = HUB_CACHE_OPT,
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Write the top-k part of a checkpoint's update as a PEFT LoRA adapter of rank k.

    B A = (‖ΔW‖/‖ΔW_k‖)·ΔW_k per selected module, r = lora_alpha = k: merged on the base it gives
    reconstruct --rank k's weights. Loads with peft's PeftModel.from_pretrained and vLLM --enable-lora.
    """
    from ..options import parse_positive_int

    k = parse_positive_int(rank, "--rank")
    check_common_early(device)
    check_output_early(out, force, [base, checkpoint, factors])

    from ..commands.export_lora.plan import ExportLoraOptions

    set_hub_cache_policy(hub_cache_policy)
    opts = ExportLoraOptions(
        rank=k,
        norm_match=not no_norm_match,
        dtype=dtype,
        include=include or [],
        exclude=exclude or [],
        all_2d=all_2d,
        exact=exact,
        device=device,
        factors=factors,
        modules_to_save=modules_to_save,
    )
    run_and_render(base, checkpoint, out, opts, force, quiet, as_json, "export-lora")


def run_and_render(base: str, checkpoint: str, out: str, opts, force: bool, quiet: bool, as_json: bool, label: str):
    """Write the adapter and show it: export-lora, and reconstruct --format peft."""
    from ..commands.export_lora import export_lora as run_export

    bar, update = stderr_progress(not quiet, label)
    with interrupt_hint("nothing was written", out), bar:
        result = run_export(base, checkpoint, out, options=opts, force=force, progress=update)
    print_result_notes(result)
    if as_json:
        print_json(json_safe(result.to_dict()))
    else:
        _render(result)


def _render(result) -> None:
    from rich.markup import escape

    from .render import _column, _console, _table

    t = _table(
        f"LoRA adapter of rank {result.rank} for {result.modules} modules"
        + (" (from the factor store)" if result.used_factors else ""),
        show_header=False,
    )
    _column(t)
    _column(t)
    t.add_row("output", escape(result.out))
    t.add_row("target_modules", escape(", ".join(result.target_modules)))
    if result.modules_to_save:
        t.add_row("modules_to_save", f"{len(result.modules_to_save)} modules")
    t.add_row("dtype", result.dtype)
    t.add_row(
        "size",
        f"{_size(result.adapter_bytes)} ({result.size_ratio:.2%} of the checkpoint's {_size(result.checkpoint_bytes)})",
    )
    t.add_row("left out", f"{len(result.left_out)} changed tensors")
    _console().print(t)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""
