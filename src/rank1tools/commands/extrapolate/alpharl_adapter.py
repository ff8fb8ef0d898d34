"""`rank1 extrapolate alpharl --format peft` (docs/commands/extrapolate.md#alpharl-as-a-peft-adapter):
AlphaRL's update of each extrapolated module, ΔŴ = x̂ v̂ᵀ, is rank 1, so it is written as a PEFT
LoRA adapter of rank 1 (lora_B = x̂, lora_A = v̂ᵀ, r = lora_alpha = 1) instead of a checkpoint:
merged on the base it gives the checkpoint `--format checkpoint` writes (container base). One
adapter folder per target, named as the checkpoints are. Modules kept at the base (below
--min-r2, flat, not selected) are not targets; what an adapter cannot carry (an embedding, a tied
lm_head, one expert of a fused tensor) is refused with one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ...engine.lora_targets import adapter_dtype as lora_adapter_dtype
from ...engine.lora_targets import check_targets, is_conv1d, lora_target, peft_config
from ...errors import InputError, UsageError
from ...io.lora_adapter import AdapterWriter
from ...io.output_lock import locked_output
from ...io.outputs import staged_output
from ...io.writer import provenance, write_provenance
from ...math.finite import all_finite
from .base import REPORT_FILE, TargetOutput, target_folder


def factors(x: torch.Tensor, v: torch.Tensor, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A = x vᵀ in the layer's (out x in) orientation: a Conv1D stores (in, out), so
    its update's B A is the stored update's transpose."""
    x32, v32 = x.to(torch.float32), v.to(torch.float32)
    return (v32[:, None], x32[None, :]) if conv1d else (x32[:, None], v32[None, :])


def rounding_error_sq(
    x: torch.Tensor, v: torch.Tensor, B: torch.Tensor, A: torch.Tensor, conv1d: bool
) -> tuple[float, float]:
    """(‖B_c A_c − x vᵀ‖², ‖x vᵀ‖²) of the factors B, A as stored (cast; `factors`' orientation),
    in float64 from the vectors alone: ‖a bᵀ − c dᵀ‖² = ‖a‖²‖b‖² + ‖c‖²‖d‖² − 2 (a·c)(b·d)."""
    a, b = x.double().flatten(), v.double().flatten()
    c, d = B.double().flatten(), A.double().flatten()
    if conv1d:  # B A = v xᵀ: compare x with A and v with B
        c, d = d, c
    want = float(a.dot(a) * b.dot(b))
    err = want + float(c.dot(c) * d.dot(d)) - 2.0 * float(a.dot(c) * b.dot(d))
    return max(err, 0.0), want


def write_adapters(
    out: str,
    *,
    force: bool,
    base_ck,
    shapes: dict,
    plans: dict,
    targets: list[float],
    kind: str,
    reports: list[dict],
    params: dict,
    inputs: list,
    local: list[Path],
    dtype: str,
    progress=None,
) -> list[TargetOutput]:
    """Write one adapter per target into `out` (one target: `out` is the adapter); the outputs."""
    moved = [n for n, p in plans.items() if p.extrapolated]
    if not moved:
        raise UsageError(
            "--format peft: no module is extrapolated (see --min-r2 and --include): the adapter would be empty"
        )
    check_targets(base_ck, moved)  # one expert of a fused tensor included
    adapter_dtype = lora_adapter_dtype(base_ck, moved, dtype, "extrapolated")
    lora = [lora_target(base_ck, n, shapes[n]) for n in moved]
    config = peft_config(base_ck, shapes, moved, 1)
    folders = [target_folder(kind, t) for t in targets] if len(targets) > 1 else [""]
    outputs = []
    with (
        locked_output(out, force=force, inputs=local) as target_path,
        staged_output(target_path, force=force, label=out) as staging,
    ):
        for i, (t, folder) in enumerate(zip(targets, folders)):
            where = staging / folder if folder else staging
            where.mkdir(exist_ok=True)
            writer = AdapterWriter(where, lora, 1, adapter_dtype)
            err_sq = norm_sq = 0.0
            for name, lt in zip(moved, lora):
                plan = plans[name]
                conv1d = is_conv1d(base_ck, name)
                B, A = factors(plan.x_hat[i], plan.v, conv1d)
                Bc, Ac = B.to(adapter_dtype), A.to(adapter_dtype)
                if not (all_finite(Bc) and all_finite(Ac)):
                    raise InputError(
                        f"{name}: the extrapolated update at --target-{kind} {t:g} overflows "
                        f"{str(adapter_dtype).removeprefix('torch.')} (norm ratio {plan.ratios[i]:.3g})"
                    )
                writer.write_pair(lt.module, Bc, Ac)
                e, w = rounding_error_sq(plan.x_hat[i], plan.v, Bc, Ac, conv1d)
                err_sq, norm_sq = err_sq + e, norm_sq + w
            writer.finish(config)
            (where / REPORT_FILE).write_text(json.dumps(reports[i], indent=2, sort_keys=True) + "\n")
            write_provenance(where, provenance("extrapolate", inputs, {**params, "target": t, "format": "peft"}))
            rep = reports[i]
            outputs.append(
                TargetOutput(
                    target=t,
                    kind=kind,
                    path=str(Path(out) / folder) if folder else out,
                    lost_fraction=0.0,
                    rel_error=math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0,
                    updated_elements=sum(lt.out_features * lt.in_features for lt in lora),
                    warning=None,
                    flagged=rep["flagged"],
                    norm_ratio_median=rep["norm_ratio_median"],
                    norm_ratio_max=rep["norm_ratio_max"],
                )
            )
            if progress:
                progress(i + 1, len(targets))
        if len(targets) > 1:  # the parent folder of several adapters says what wrote it
            write_provenance(staging, provenance("extrapolate", inputs, {**params, "format": "peft"}))
    return outputs
