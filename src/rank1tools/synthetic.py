"""Synthetic Llama-shaped checkpoints and RL runs, for tests, benchmarks and the demo.

Files are written with safetensors' and huggingface_hub's own savers (not rank1tools' writer),
so tests of our reader and writer check against an independent implementation.

An RL run plants the structure the papers describe: per matrix module the update is a rank-1
direction growing linearly with the step plus small dense noise,
    dW_t = (t / t_max) * s * ||W0||_F * u v^T + sqrt(t / t_max) * noise * N_t,
so decomposition, fits and extrapolation have a known answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .modules import parse_matrix_module, stable_hash


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 128
    hidden: int = 64
    intermediate: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    tie: bool = False

    def config(self, dtype: torch.dtype = torch.float32) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in the order transformers saves a Llama."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * (self.hidden // self.heads)
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out.update(
                {
                    p + "self_attn.q_proj.weight": (h, h),
                    p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h),
                    p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i),
                    p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                }
            )
        out["model.norm.weight"] = (h,)
        if not self.tie:
            out["lm_head.weight"] = (self.vocab, h)
        return out

    @property
    def parameter_count(self) -> int:
        total = 0
        for s in self.shapes().values():
            n = 1
            for d in s:
                n *= d
            total += n
        return total


# A 135M-parameter Llama shape (SmolLM-135M): 30 layers, hidden 576, MLP 1536, tied embeddings.
SHAPE_135M = LlamaShape(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, tie=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic base weight: N(0, 0.02) for matrices and embeddings, ~1 for norms."""
    g = _gen(seed * 1_000_003 + stable_hash(name))
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def update_tensor(
    name: str, base: torch.Tensor, step: int, t_max: int, seed: int, rank1_scale: float = 0.05, noise: float = 2e-5
) -> torch.Tensor:
    """The planted update dW_step of one tensor (float32)."""
    frac = step / t_max
    g = _gen(seed * 7919 + stable_hash(name))
    if base.dim() == 2:
        u = torch.randn(base.shape[0], generator=g)
        v = torch.randn(base.shape[1], generator=g)
        direction = torch.outer(u / u.norm(), v / v.norm()) * (rank1_scale * base.norm())
    else:
        direction = torch.randn(base.shape, generator=g) * (rank1_scale * base.norm() / base.numel() ** 0.5)
    gn = _gen(seed * 104729 + stable_hash(name) + 31 * step)
    return frac * direction + frac**0.5 * noise * torch.randn(base.shape, generator=gn)


def write_model(
    folder: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    max_shard_size: int | str | None = None,
    extras: bool = True,
) -> Path:
    """Write a HF model folder: `model.safetensors` or shards + index (huggingface_hub's saver)."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    from .io.outputs import follow_umask

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if max_shard_size is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_torch_state_dict(tensors, folder, max_shard_size=max_shard_size)
    for weights in folder.glob("*.safetensors"):  # safetensors creates its files 0600; the demos' outputs
        follow_umask(weights, directory=False)  # follow the umask like every output (docs/cli.md)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if extras:
        (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}) + "\n")
        (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}\n")
    return folder


def make_base(
    folder: str | Path,
    shape: LlamaShape = LlamaShape(),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: int | str | None = None,
) -> Path:
    """A random Llama-shaped base model folder."""
    tensors = {n: base_tensor(n, s, seed).to(dtype) for n, s in shape.shapes().items()}
    return write_model(folder, tensors, shape.config(dtype), max_shard_size)


def checkpoint_tensors(
    shape: LlamaShape, step: int, t_max: int, base_dtype: torch.dtype, dtype: torch.dtype, seed: int = 0, **update_kw
) -> dict[str, torch.Tensor]:
    """theta_step = theta_0 + dW_step, computed in float32 from the base as stored."""
    out = {}
    for n, s in shape.shapes().items():
        b = base_tensor(n, s, seed).to(base_dtype).float()
        out[n] = (b + update_tensor(n, b, step, t_max, seed, **update_kw)).to(dtype)
    return out


def make_run(
    run_dir: str | Path,
    steps: list[int],
    shape: LlamaShape = LlamaShape(),
    layout: str = "trl",
    base_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: int | str | None = None,
    **update_kw,
) -> Path:
    """A run directory of checkpoints in a trainer's layout: `trl`, `verl` or `openrlhf`."""
    run = Path(run_dir)
    t_max = max(steps)
    for step in steps:
        if layout == "trl":
            folder = run / f"checkpoint-{step}"
        elif layout == "verl":
            folder = run / f"global_step_{step}" / "actor" / "huggingface"
        elif layout == "openrlhf":
            folder = run / f"global_step{step}_hf"
        else:
            raise ValueError(f"unknown layout {layout!r}")
        tensors = checkpoint_tensors(shape, step, t_max, base_dtype, dtype, seed, **update_kw)
        write_model(folder, tensors, shape.config(dtype), max_shard_size)
        if layout == "trl":  # trainer state that sits beside the weights
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")
    return run


def matrix_module_names(shape: LlamaShape) -> list[str]:
    return [n for n, s in shape.shapes().items() if parse_matrix_module(n, s) is not None]


def write_factor_store(folder: str | Path, steps: list[int], modules: dict[str, dict]) -> Path:
    """A factor store as `rank1 decompose` writes it, from given rank-1 factors (for fit-pls tests
    and benchmarks: planted trajectories without decomposing anything).

    `modules[name]` = {"U": (T, m), "S": (T,), "V": (T, n), "layer": int | None, "type": str};
    U and V rows should be unit vectors. Writes k = 1.
    """
    from safetensors.torch import save_file

    from .io.factor_store import FACTOR_FORMAT, FACTOR_FORMAT_VERSION, factor_file

    folder = Path(folder)
    (folder / "factors").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, m in modules.items():
        U, S, V = (torch.as_tensor(m[k], dtype=torch.float32) for k in ("U", "S", "V"))
        T = len(steps)
        tensors = {
            "steps": torch.tensor(steps, dtype=torch.int64),
            "S": S.reshape(T, 1).contiguous(),
            "U": U.reshape(T, -1, 1).contiguous(),
            "V": V.reshape(T, -1, 1).contiguous(),
            "fro": S.double().abs().reshape(T).contiguous(),
            "base_fro": torch.ones(1, dtype=torch.float64),
        }
        meta = {
            "rank1tools": json.dumps({"module": name, "methods": ["exact"] * T, "residuals": [0.0] * T}, sort_keys=True)
        }
        save_file(tensors, str(folder / "factors" / factor_file(name)), metadata=meta)
        entries.append(
            {
                "name": name,
                "shape": [U.shape[-1], V.shape[-1]],
                "layer": m.get("layer"),
                "type": m.get("type"),
                "file": f"factors/{factor_file(name)}",
            }
        )
    manifest = {
        "format": FACTOR_FORMAT,
        "format_version": FACTOR_FORMAT_VERSION,
        "tool_version": "synthetic",
        "base": {"source": "synthetic-base", "revision": None},
        "checkpoints": [{"step": s, "source": f"synthetic/checkpoint-{s}", "revision": None} for s in steps],
        "step_source": "trainer",
        "parameters": {"rank": 1, "svd": "exact"},
        "modules": entries,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "rank1tools.json").write_text(json.dumps({"tool": "rank1tools", "command": "synthetic"}) + "\n")
    return folder
