"""A tiny Llama in plain torch whose weights, names and numerics are Hugging Face's LlamaForCausalLM.

`TinyLlama.state_dict()` has exactly HF's tensor names (model.embed_tokens.weight,
model.layers.{i}.self_attn.{q,k,v,o}_proj.weight, model.layers.{i}.mlp.{gate,up,down}_proj.weight,
the two per-layer RMSNorms, model.norm.weight, lm_head.weight tied to the embedding), and the
forward pass follows HF's: RMSNorm computed in float32, rotary embeddings with rotate_half on the
two halves of each head, grouped-query attention, a SiLU-gated MLP, no biases.
Saved checkpoints omit the tied lm_head, as `save_pretrained` does.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..io.checkpoint import open_checkpoint

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class TinyLlamaConfig:
    vocab_size: int = 16
    hidden_size: int = 160
    intermediate_size: int = 432
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def hf_config(self) -> dict:
        """config.json as transformers writes it for a LlamaForCausalLM (float32 weights)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **asdict(self),
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "tie_word_embeddings": True,
            "use_cache": True,
            # float32: the GRPO updates are small against the weights; bfloat16 (8-bit mantissa)
            # would round many of them away and drown the run's signal in rounding noise
            "torch_dtype": "float32",
        }


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        causal = True
        if cache is not None:  # [k, v] of the earlier positions, extended in place
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
                causal = False  # one new token (see TinyLlama.forward) attends to every position
            cache[:] = [k, v]
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    """HF's `LlamaModel` (the `model.` prefix of the tensor names)."""

    def __init__(self, c: TinyLlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TinyLlama(nn.Module):
    def __init__(self, config: TinyLlamaConfig):
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tie_word_embeddings
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        freqs = torch.arange(config.max_position_embeddings, dtype=torch.float)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """N(0, std) matrices and embedding (HF's initializer_range), unit norms; from `generator`."""
        with torch.no_grad():
            for _name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

    def forward(self, ids: torch.Tensor, cache: list[list] | None = None) -> torch.Tensor:
        """Logits (batch, time, vocab) of token ids (batch, time), causal.

        `cache` (for sampling): one list per layer, empty at first, that keeps the keys and values
        of the positions seen; with a non-empty cache, `ids` is the one next token (time 1)."""
        start = cache[0][0].shape[2] if cache and cache[0] else 0
        t = ids.shape[1]
        if start and t != 1:
            raise ValueError("with a filled cache, pass one token at a time")
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, None if cache is None else cache[i])
        return self.lm_head(self.model.norm(x))

    def new_cache(self) -> list[list]:
        return [[] for _ in self.model.layers]


def parameter_count(model: TinyLlama) -> int:
    """Distinct parameters (the tied head counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_tensors(model: TinyLlama) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: HF names, float32, contiguous, without the tied lm_head."""
    return {n: t.detach().to(torch.float32).contiguous().clone() for n, t in model.state_dict().items() if n != LM_HEAD}


def save_model(folder: Path, model: TinyLlama) -> None:
    """config.json + model.safetensors (float32; see TinyLlamaConfig.hf_config) into `folder`."""
    from ..synthetic import write_model

    write_model(folder, model_tensors(model), model.config.hf_config(), extras=False)
    c = model.config
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": c.bos_token_id,
                "eos_token_id": c.eos_token_id,
                "pad_token_id": c.pad_token_id,
                "do_sample": False,
            },
            indent=2,
        )
        + "\n"
    )


def load_weights(model: TinyLlama, folder: str | Path) -> None:
    """Copy a checkpoint's tensors (any HF Llama folder or .safetensors file rank1tools reads:
    single or sharded, any float dtype, lm_head stored or tied) into `model`, upcast to float32.
    A stored lm_head that differs from the embedding unties the model's head (an untied output)."""
    ck = open_checkpoint(folder)
    state = model.state_dict()
    with torch.no_grad():
        for name, target in state.items():
            if name == LM_HEAD:
                continue
            if name not in ck:
                raise InputError(f"{folder}: has no tensor {name!r}")
            if tuple(ck.entry(name).shape) != tuple(target.shape):
                raise InputError(
                    f"{folder}: tensor {name!r} has shape {tuple(ck.entry(name).shape)}, "
                    f"the demo model expects {tuple(target.shape)}"
                )
            target.copy_(ck.read(name))
        if LM_HEAD in ck.entries:
            head = ck.read(LM_HEAD)
            if tuple(head.shape) != tuple(state[EMBEDDING].shape):
                raise InputError(
                    f"{folder}: tensor {LM_HEAD!r} has shape {tuple(head.shape)}, "
                    f"the demo model expects {tuple(state[EMBEDDING].shape)}"
                )
            if not torch.equal(head, state[EMBEDDING]):
                model.lm_head.weight = nn.Parameter(head)
                return
        model.lm_head.weight = model.model.embed_tokens.weight
