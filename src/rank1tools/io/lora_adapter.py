"""Writing a PEFT LoRA adapter folder (docs/formats.md#lora-adapters-export-lora): the two files
`peft`'s `save_pretrained` writes, in its naming, so `PeftModel.from_pretrained` and vLLM load them.

- `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` (r x in) and
  `.lora_B.weight` (out x r) per target module; `base_model.model.<tensor>` for each tensor of a
  module saved in full (`modules_to_save`). Laid out as safetensors' own `save_file` lays it out
  (header sorted by name, larger dtypes first, 8-byte aligned), but written tensor by tensor: the
  header is planned from names, shapes and dtypes, each tensor is `pwrite` at its offset, so memory
  stays at one module's factors.
- `adapter_config.json`: every field peft 0.21's `LoraConfig` writes, sorted, indent 2, no
  trailing newline, as its `save_pretrained` writes it.

Knows nothing of SVD: it stores the factors it is given, into a folder the caller stages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import ADAPTER_CONFIG, ADAPTER_FILE
from .outputs import output_errors
from .peft_adapter import PREFIX
from .writer import ShardPlacement, TensorSpec, plan_safetensors

# the file names and key prefix a PEFT adapter is read with (io/checkpoint.py, io/peft_adapter.py)
ADAPTER_WEIGHTS, PEFT_PREFIX = ADAPTER_FILE, PREFIX
PEFT_FORMAT_VERSION = "0.21.2"  # the peft whose save_pretrained this layout matches (tests check)


@dataclass(frozen=True)
class LoraTarget:
    """A module that gets a LoRA pair: its path in the model (`model.layers.0.self_attn.q_proj`)
    and the shape of the update B A (out x in, as `torch.nn.Linear` holds its weight)."""

    module: str
    out_features: int
    in_features: int


def lora_names(module: str) -> tuple[str, str]:
    """The adapter's tensor names of a target module's A and B."""
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def saved_name(tensor: str) -> str:
    """The adapter's name of a tensor of a module saved in full."""
    return PEFT_PREFIX + tensor


def adapter_config(
    *,
    rank: int,
    lora_alpha: float,
    target_modules: list[str],
    modules_to_save: list[str] | None,
    base_model_name_or_path: str | None,
    revision: str | None,
    task_type: str | None,
    fan_in_fan_out: bool,
) -> dict:
    """adapter_config.json: peft 0.21's LoraConfig fields, its defaults but for those given."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save or None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": rank,
        "rank_pattern": {},
        "revision": revision,
        "target_modules": target_modules,
        "target_parameters": None,
        "task_type": task_type,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


def _layout(specs: list[TensorSpec]) -> list[TensorSpec]:
    """safetensors' order: larger element size first, then by name."""
    return sorted(specs, key=lambda s: (-torch.empty((), dtype=s.dtype).element_size(), s.name))


class AdapterWriter:
    """Write one adapter into `folder` (an existing staging folder the caller publishes).

    Usage::

        w = AdapterWriter(folder, targets, rank, torch.float32, saved_specs)
        for t in targets:
            w.write_pair(t.module, B, A)
        for s in saved_specs:
            w.write_saved(s.name, tensor)
        w.finish(config)

    `saved_specs`: the model's own names of the tensors saved in full (`model.norm.weight`).
    """

    def __init__(
        self, folder: Path, targets: list[LoraTarget], rank: int, dtype: torch.dtype, saved: list[TensorSpec] = ()
    ):
        self.folder = Path(folder)
        specs = []
        for t in targets:
            a, b = lora_names(t.module)
            specs += [TensorSpec(a, (rank, t.in_features), dtype), TensorSpec(b, (t.out_features, rank), dtype)]
        specs += [TensorSpec(saved_name(s.name), s.shape, s.dtype) for s in saved]
        by_name = {s.name: s for s in specs}
        if len(by_name) != len(specs):
            raise ValueError("duplicate tensor names in the adapter")
        self.path = self.folder / ADAPTER_WEIGHTS
        prefix, offsets, size = plan_safetensors(_layout(specs))
        with output_errors(self.path):
            with open(self.path, "wb") as f:
                f.write(prefix)
                f.truncate(size)  # sparse until written
        self.placement = ShardPlacement(by_name, {n: (str(self.path), at) for n, at in offsets.items()})
        self.pending = set(by_name)
        self.nbytes = size

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        self.placement.write(name, tensor)
        self.pending.discard(name)

    def write_pair(self, module: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """Store a target module's factors: B (out x r) and A (r x in), cast to the adapter's dtype."""
        a, b = lora_names(module)
        self._write(a, A)
        self._write(b, B)

    def write_saved(self, name: str, tensor: torch.Tensor) -> None:
        """Store a tensor of a module saved in full, under its model name."""
        self._write(saved_name(name), tensor)

    def finish(self, config: dict) -> int:
        """Write adapter_config.json once every tensor is stored; returns the weight file's size."""
        if self.pending:
            raise RuntimeError(f"adapter: {len(self.pending)} tensors never written, e.g. {sorted(self.pending)[0]!r}")
        with output_errors(self.folder / ADAPTER_CONFIG):
            (self.folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        return self.nbytes
