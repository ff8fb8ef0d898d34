"""`rank1 export-lora`: the rank-k update of one checkpoint as a PEFT LoRA adapter
(docs/commands/export-lora.md).

Per selected matrix module, with dW_k = U_k diag(S_k) V_k^T the top-k part of dW = theta_t - theta_0
and c the factor `reconstruct` scales it by (||dW|| / ||dW_k|| with norm matching, else 1):
B = U_k diag(sqrt(S_k)) sqrt(c), A = diag(sqrt(S_k)) V_k^T sqrt(c), so that W + B A (PEFT's merge,
r = lora_alpha = k: scale 1) is `reconstruct --rank k`'s W (docs/concepts.md#rank-k-reconstruction-reconstruct).
The factors come from a `decompose` factor store (`--factors`) or from the top-k SVD of each
module's update. Tensors outside the targets whose values changed are left out and reported, or
saved in full (`--modules-to-save`). Written into a staging folder, published when complete.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ...engine.checkpoint_outputs import output_dtype
from ...engine.executor_options import ExecutorOptions, task_device
from ...engine.factor_source import factors_for, update_topk
from ...engine.lora_targets import adapter_dtype, check_targets, is_conv1d, lora_target, peft_config
from ...errors import InputError, UsageError
from ...io.compat import check_compatible, tensor_shapes
from ...io.lora_adapter import AdapterWriter
from ...io.output_lock import locked_output
from ...io.outputs import staged_output
from ...io.sources import is_hub_source, open_source
from ...io.writer import TensorSpec, provenance, write_provenance
from ...math.finite import all_finite
from ...math.lora import lora_factors
from ...math.reconstruct import rank_k_scale
from ...math.svd import MIN_SKETCH
from ...modules import LM_HEAD_NAME, is_embedding, select_tensors
from ...resources import check_largest_tensor, svd_bytes
from .plan import ExportLoraOptions, ExportLoraResult, LeftOut


def export_lora(
    base: str,
    checkpoint: str,
    out: str,
    *,
    options: ExportLoraOptions = ExportLoraOptions(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ExportLoraResult:
    """Write the adapter folder `out`; see the module doc."""
    options.check()
    k = options.rank
    base_ck = open_source(base)
    ck = open_source(checkpoint, base=base_ck)  # a PEFT adapter: read on the base (io/peft_adapter.py)
    notes: list[str] = []
    shapes = tensor_shapes(base_ck, [ck])
    modules = select_tensors(shapes, include=options.include, exclude=options.exclude, all_2d=options.all_2d)
    if options.all_2d and not options.include:  # every other 2-D tensor but the embeddings (not a LoRA of ours)
        modules = [n for n in modules if not is_embedding(n)]
    if not modules:
        raise UsageError("no tensors selected (check --include/--exclude)")
    check_targets(base_ck, modules)
    for name in modules:
        if k > min(shapes[name]):
            raise UsageError(f"--rank {k} exceeds min(m, n) = {min(shapes[name])} of {name} {list(shapes[name])}")
    store, step_index = None, -1
    if options.factors:
        store, step_index = factors_for(options.factors, base_ck, ck, checkpoint, dict.fromkeys(modules, k), notes)
    check_compatible(base_ck, ck)  # the rest is compared too: what the adapter leaves out
    device = task_device(options.device, ExecutorOptions())
    lora_dtype = adapter_dtype(base_ck, modules, options.dtype, "selected")
    selected = set(modules)
    _check_memory(base_ck, ck, shapes, selected, k, exact=options.exact, from_store=store is not None)
    targets = [lora_target(base_ck, n, shapes[n]) for n in modules]
    changed = _changed_rest(base_ck, ck, [n for n in shapes if n not in selected])
    saved, left_out = _split_rest(base_ck, changed, shapes, selected, options.modules_to_save)
    saved_specs = [TensorSpec(n, shapes[n], output_dtype(options.dtype, ck.entry(n).torch_dtype)) for n in saved]
    saved_modules = sorted({n.rsplit(".", 1)[0] for n in saved})
    config = peft_config(base_ck, shapes, modules, k, saved_modules)
    fan_in_fan_out = config["fan_in_fan_out"]
    params = {
        "rank": k,
        "norm_match": options.norm_match,
        "dtype": options.dtype,
        "include": options.include,
        "exclude": options.exclude,
        "all_2d": options.all_2d,
        "modules_to_save": options.modules_to_save,
        "svd": "factor-store" if store else ("exact" if options.exact else "randomized"),
        "factors": options.factors,
        "device": device.type,
    }
    local = [Path(c.label) for c in (base_ck, ck) if not is_hub_source(c.label)]
    if options.factors:
        local.append(Path(options.factors))
    total = len(modules) + len(saved)
    with (
        locked_output(out, force=force, inputs=local) as target,
        staged_output(target, force=force, label=out) as staging,
    ):
        writer = AdapterWriter(staging, targets, k, lora_dtype, saved_specs)
        for i, (name, t) in enumerate(zip(modules, targets)):
            U, S, V, fro = update_topk(name, base_ck, ck, store, step_index, k, exact=options.exact, device=device)
            scale = rank_k_scale(U, S, V, k, fro, alpha=1.0, norm_match=options.norm_match)
            if is_conv1d(base_ck, name):  # stored (in, out): B A is the stored update's transpose
                U, V = V, U
            B, A = lora_factors(U, S, V, k, scale)
            if not (all_finite(B) and all_finite(A)):
                raise InputError(f"{ck.label}: the LoRA factors of {name!r} are not finite (||dW||_F = {fro:.3g})")
            Bc, Ac = B.to(lora_dtype), A.to(lora_dtype)  # cast once: checked, then written
            if not (all_finite(Bc) and all_finite(Ac)):
                raise InputError(f"{name}: the LoRA factors overflow {str(lora_dtype).removeprefix('torch.')}")
            writer.write_pair(t.module, Bc, Ac)
            if progress:
                progress(i + 1, total)
        for j, name in enumerate(saved):
            writer.write_saved(name, ck.read_raw(name))
            if progress:
                progress(len(modules) + j + 1, total)
        adapter_bytes = writer.finish(config)
        inputs = [base_ck, ck, *([options.factors] if options.factors else [])]
        write_provenance(staging, provenance("export-lora", inputs, params))
    if left_out:
        first = left_out[0]
        notes.append(
            f"{len(left_out)} tensors that changed are not in the adapter (e.g. {first.name}: {first.reason})"
            + ("; --modules-to-save saves their modules in full" if not options.modules_to_save else "")
        )
    return ExportLoraResult(
        out=out,
        rank=k,
        modules=len(modules),
        target_modules=config["target_modules"],
        modules_to_save=saved_modules,
        used_factors=store is not None,
        fan_in_fan_out=fan_in_fan_out,
        dtype=str(lora_dtype).removeprefix("torch."),
        adapter_bytes=adapter_bytes,
        checkpoint_bytes=ck.nbytes,
        left_out=left_out,
        notes=notes,
    )


def _check_memory(base_ck, ck, shapes, selected, k: int, *, exact: bool, from_store: bool) -> None:
    """Refuse before any work when the largest tensor's working set exceeds the available memory:
    a target's base and checkpoint in float32, its update and the SVD's working memory (a store's
    factors, T (m + n) k numbers, are not counted); any other tensor's two raw reads and their
    float32 copies (the comparison with the base)."""

    def need(name: str) -> int:
        n = 1
        for d in shapes[name]:
            n *= d
        raw = base_ck.entry(name).nbytes + (ck.entry(name).nbytes if name in ck else 0)
        if name not in selected:
            return raw + 8 * n
        if from_store:  # only the module's factors are read: T x (m + n) x k
            return 0
        sketch = max(k + 10, MIN_SKETCH)
        return 12 * n + svd_bytes(shapes[name], exact or min(shapes[name]) <= 2 * sketch, sketch)

    check_largest_tensor(list(shapes), need, lambda name: shapes[name])


def _changed_rest(base_ck, ck, names: list[str]) -> list[str]:
    """The tensors among `names` whose checkpoint values differ from the base's (float32
    comparison for floating tensors, bit-exact otherwise), one tensor at a time."""
    out = []
    for name in names:
        if name not in ck or name not in base_ck:
            continue
        theirs, ours = ck.read_raw(name), base_ck.read_raw(name)
        if theirs.is_floating_point():
            same = torch.equal(theirs.to(torch.float32), ours.to(torch.float32))
        else:
            same = torch.equal(theirs, ours)
        if not same:
            out.append(name)
    return out


def _split_rest(base_ck, changed, shapes, selected, save) -> tuple[list[str], list[LeftOut]]:
    """Which changed tensors are saved in full (with `save`: every tensor of their module) and which
    are left out, with the reason."""
    targets = {n.removesuffix(".weight") for n in selected}
    saved, left = [], []
    for name in changed:
        owner = name.rsplit(".", 1)[0]
        if not save:
            reason = "not a LoRA target"
        elif owner in targets:
            reason = f"belongs to LoRA target {owner}, which PEFT cannot also save in full"
        elif base_ck.lm_head_tied and (name == LM_HEAD_NAME or is_embedding(name)):
            reason = "tied embedding / lm_head: saving one in full would untie them"
        else:
            saved.append(owner)
            continue
        left.append(LeftOut(name, tuple(shapes[name]), reason))
    owners = set(saved)
    return [n for n in shapes if n not in selected and n.rsplit(".", 1)[0] in owners], left
