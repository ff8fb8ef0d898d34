"""What a tensor name means (docs/concepts.md#words): matrix modules, layer index, module type.

Pure string logic, no torch: usable from the CLI and every layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A decoder block: `*.layers.N.*`, `*.h.N.*`, `*.blocks.N.*` (Llama/Qwen/Mistral, GPT-2/Falcon, others).
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

# Projection name -> short module type. Fused projections keep a fused name.
_MODULE_TYPES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "query": "q",
    "key": "k",
    "value": "v",
    "dense": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "c_attn": "qkv",
    "Wqkv": "qkv",
    "gate_up_proj": "gate_up",
    "c_fc": "up",
    "fc1": "up",
    "fc2": "down",
    "dense_h_to_4h": "up",
    "dense_4h_to_h": "down",
    "out_proj": "o",
}

EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
LM_HEAD_NAME = "lm_head.weight"


@dataclass(frozen=True)
class ModuleName:
    """A matrix module's place in the network."""

    layer: int
    type: str  # q, k, v, o, gate, up, down, qkv, gate_up, router, or the projection's own name
    expert: int | str | None = None  # a routed expert's index, "shared" for a shared expert, None if dense


def layer_index(name: str) -> int | None:
    """Decoder block index of a tensor name, or None outside the blocks."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def parse_matrix_module(name: str, shape: tuple[int, ...] | list[int]) -> ModuleName | None:
    """The module a 2-D `.weight` inside a decoder block is, or None if not a matrix module.
    One expert of a fused expert tensor (`NAME[e]`, see `expert_slices`) is one too."""
    sliced = split_expert_slice(name)
    if sliced is not None and len(shape) == 2:
        parent, index = sliced
        parent = parent if parent.endswith(".weight") else parent + ".weight"
        mod = parse_matrix_module(parent, shape)
        return None if mod is None else ModuleName(layer=mod.layer, type=mod.type, expert=index)
    if len(shape) != 2 or not name.endswith(".weight"):
        return None
    layer = layer_index(name)
    if layer is None:
        return None
    proj = name[: -len(".weight")].rsplit(".", 1)[-1]
    if proj in _ROUTER_NAMES and _MOE_BLOCK.search(name):
        return ModuleName(layer=layer, type="router")
    if proj == "c_proj":  # GPT-2 uses c_proj for both attention output and MLP down
        mtype = "down" if ".mlp." in name else "o"
    else:
        mtype = _MODULE_TYPES.get(proj, proj)
    return ModuleName(layer=layer, type=mtype, expert=expert_of(name))


# Mixture-of-experts (docs/formats.md#mixture-of-experts-tensors). The router is the `gate` /
# `router` linear of an MoE block (Qwen-MoE, DeepSeek: `mlp.gate`; Mixtral: `block_sparse_moe.gate`;
# gpt-oss: `mlp.router`); routed experts sit under `experts.N.` (one 2-D weight per expert) or are
# fused into one 3-D tensor `experts.<proj>` of shape [num_experts, out, in] (transformers 5.x in
# memory); shared experts under `shared_expert.` / `shared_experts.`.
_ROUTER_NAMES = ("gate", "router")
_MOE_BLOCK = re.compile(r"\.(?:mlp|block_sparse_moe|moe|feed_forward)\.(?:gate|router)\.weight$")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_SHARED_EXPERT = re.compile(r"\.shared_experts?\.")
# not gpt-oss's quantized `*_blocks` / `*_scales` (uint8) nor per-expert biases `*_bias`
_FUSED_EXPERTS = re.compile(r"\.experts\.(?![A-Za-z_]\w*_(?:blocks|scales|bias)$)[A-Za-z_]\w*(?:\.weight)?$")
_SLICE = re.compile(r"^(.+)\[(\d+)\]$")


def expert_of(name: str) -> int | str | None:
    """The expert a tensor belongs to: its index, "shared" for a shared expert, None for a dense one."""
    if _SHARED_EXPERT.search(name):
        return "shared"
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


def is_fused_experts(name: str, shape: tuple[int, ...] | list[int]) -> bool:
    """A 3-D [num_experts, out, in] tensor holding every routed expert's matrix of one projection."""
    return len(shape) == 3 and layer_index(name) is not None and _FUSED_EXPERTS.search(name) is not None


def expert_slice_name(name: str, expert: int) -> str:
    """The name of one expert's matrix inside a fused expert tensor: `NAME[e]`."""
    return f"{name}[{expert}]"


def split_expert_slice(name: str) -> tuple[str, int] | None:
    """(fused tensor name, expert index) of a `NAME[e]` slice name, else None."""
    m = _SLICE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def expert_slices(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`shapes` with each fused expert tensor replaced, in place, by its experts' matrices
    (`NAME[e]`, shape [out, in]): a command selecting matrix modules then sees one matrix per expert."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if is_fused_experts(name, shape):
            out.update({expert_slice_name(name, e): tuple(shape[1:]) for e in range(shape[0])})
        else:
            out[name] = shape
    return out


# The module holding a normalisation layer's parameters: input_layernorm, post_attention_layernorm,
# model.norm, q_norm, ... and GPT-2 / NeoX style ln_1, ln_f, ln1.
_NORM_MODULE = re.compile(r".*norm.*|ln(_\w+|\d+)?", re.IGNORECASE)


def is_norm_parameter(name: str, shape: tuple[int, ...] | list[int]) -> bool:
    """A 1-D parameter (weight or bias) of a normalisation layer, judged by its module's name."""
    owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    return len(shape) == 1 and _NORM_MODULE.fullmatch(owner) is not None


def is_embedding(name: str) -> bool:
    return name.endswith(EMBEDDING_NAMES)


def select_tensors(
    shapes: dict[str, tuple[int, ...]],
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    all_2d: bool = False,
) -> list[str]:
    """Names of the 2-D tensors a command works on, in the given order.

    Default: matrix modules. `all_2d` adds every other 2-D tensor (embeddings, lm_head).
    `include` globs replace the default set (any 2-D tensor may be named); `exclude` globs remove.
    """
    from fnmatch import fnmatchcase

    out = []
    for name, shape in shapes.items():
        if len(shape) != 2:
            continue
        if include:
            chosen = any(fnmatchcase(name, g) for g in include)
        else:
            chosen = all_2d or parse_matrix_module(name, shape) is not None
        if chosen and not any(fnmatchcase(name, g) for g in (exclude or [])):
            out.append(name)
    return out


def stable_hash(name: str) -> int:
    """A hash of a tensor name that is the same in every process and Python version (hash() is
    salted per process): seeds per-tensor random draws (linearity's --sample, the synthetic runs)."""
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % 2_147_483_647
    return h
