"""Which tensors of a model become LoRA targets of an adapter (`rank1 export-lora`, and
`reconstruct`/`extrapolate alpharl --format peft`), how PEFT names them, and which changed tensors
the adapter leaves out (docs/commands/export-lora.md#what-the-adapter-holds).

Pure name and config logic, no tensors.
"""

from __future__ import annotations

from ..errors import UsageError
from ..io.checkpoint import Checkpoint
from ..io.hub_spec import is_hub_source, parse_hub_spec
from ..io.lora_adapter import LoraTarget, adapter_config
from ..modules import LM_HEAD_NAME, is_embedding, split_expert_slice

# transformers models whose projections are GPT-2's Conv1D, which stores its weight in x out
# (PEFT's fan_in_fan_out): their update's B A is the transpose of the stored tensor's
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_PROJECTIONS = ("c_attn", "c_proj", "c_fc", "q_attn")


def module_path(tensor: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj`."""
    return tensor.removesuffix(".weight")


def is_conv1d(base: Checkpoint, tensor: str) -> bool:
    model_type = (base.config or {}).get("model_type")
    return model_type in CONV1D_MODEL_TYPES and module_path(tensor).rsplit(".", 1)[-1] in CONV1D_PROJECTIONS


def check_targets(base: Checkpoint, names: list[str]) -> None:
    """Refuse, with one line naming the tensor, a selected tensor PEFT cannot carry as a LoRA of a
    linear layer: not a `.weight`, an embedding (PEFT's embedding LoRA is another layout), or
    an lm_head tied to the embedding (merging would change the embedding too)."""
    for name in names:
        if split_expert_slice(name) is not None:
            raise UsageError(
                f"{name}: one expert of a fused tensor, which a LoRA adapter cannot target; "
                "write a checkpoint instead (--format checkpoint)"
            )
        if not name.endswith(".weight"):
            raise UsageError(f"{name}: not a module's .weight, so not a LoRA target; leave it out (--exclude)")
        if is_embedding(name):
            raise UsageError(
                f"{name}: an embedding; export-lora writes LoRA pairs of linear layers only "
                f"(leave it out: --exclude '{name}')"
            )
        if name == LM_HEAD_NAME and base.lm_head_tied:
            raise UsageError(
                f"{name}: tied to the embedding in base {base.label}; a LoRA on it would change the "
                f"embedding too once merged (leave it out: --exclude '{name}')"
            )


def adapter_dtype(base: Checkpoint, names: list[str], dtype_choice: str, what: str):
    """The one dtype of an adapter over the modules `names`: `--dtype`, or for `auto` the base's,
    which must then be the same for all of them (`what` names them in the usage error)."""
    from .checkpoint_outputs import output_dtype  # torch: not at import

    dtypes = {output_dtype(dtype_choice, base.entry(n).torch_dtype) for n in names}
    if len(dtypes) > 1:
        raise UsageError(
            f"--dtype auto: the {what} modules are stored in several dtypes in the base; "
            "an adapter has one: choose --dtype float32, bfloat16 or float16"
        )
    return dtypes.pop()


def peft_config(
    base: Checkpoint, shapes: dict[str, tuple[int, ...]], names: list[str], rank: int, modules_to_save=()
) -> dict:
    """The adapter_config.json of a rank-`rank` LoRA (lora_alpha = rank) on the modules `names`."""
    name_or_path, revision = base_reference(base)
    return adapter_config(
        rank=rank,
        lora_alpha=rank,
        target_modules=target_modules(shapes, names),
        modules_to_save=list(modules_to_save),
        base_model_name_or_path=name_or_path,
        revision=revision,
        task_type=task_type(base),
        fan_in_fan_out=any(is_conv1d(base, n) for n in names),
    )


def lora_target(base: Checkpoint, tensor: str, shape: tuple[int, ...]) -> LoraTarget:
    """The target of a selected tensor; a Conv1D's stored (in, out) weight is an (out, in) update."""
    out_f, in_f = (shape[1], shape[0]) if is_conv1d(base, tensor) else (shape[0], shape[1])
    return LoraTarget(module_path(tensor), out_f, in_f)


def target_modules(shapes: dict[str, tuple[int, ...]], selected: list[str]) -> list[str]:
    """adapter_config.json's target_modules, sorted: a projection's short name (`q_proj`) when
    every 2-D weight of that name is selected (PEFT matches a name by its last components), else the
    full paths of those selected."""
    chosen = set(selected)
    by_short: dict[str, list[str]] = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and name.endswith(".weight"):
            by_short.setdefault(module_path(name).rsplit(".", 1)[-1], []).append(name)
    out = set()
    for short, names in by_short.items():
        picked = [n for n in names if n in chosen]
        if picked and len(picked) == len(names):
            out.add(short)
        else:
            out.update(module_path(n) for n in picked)
    return sorted(out)


def task_type(base: Checkpoint) -> str | None:
    """PEFT's task type from the base's architectures: CAUSAL_LM for a causal LM, else none."""
    archs = (base.config or {}).get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else None


def base_reference(base: Checkpoint) -> tuple[str, str | None]:
    """base_model_name_or_path and revision: a Hub base's repo id and resolved revision (a
    subfolder is not recorded: peft has no field for it), or a local base's path as given."""
    if is_hub_source(base.label):
        return parse_hub_spec(base.label).repo_id, base.revision
    return base.label, None
