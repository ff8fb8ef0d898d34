"""What `rank1 export-lora` takes and returns: its options and result
(docs/commands/export-lora.md). Which modules become LoRA targets and what is left out: engine/lora_targets.py;
the pass: __init__.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.checkpoint_outputs import DTYPE_CHOICES
from ...errors import UsageError
from ...options import check_choice


@dataclass
class ExportLoraOptions:
    """What `rank1 export-lora` takes (docs/commands/export-lora.md#options)."""

    rank: int = 1
    norm_match: bool = True
    dtype: str = "float32"  # auto (each module's base dtype) | float32 | bfloat16 | float16
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    all_2d: bool = False
    exact: bool = False
    device: str = "auto"
    factors: str | None = None
    modules_to_save: bool = False  # changed tensors outside the targets, saved in full

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UsageError(f"--rank {self.rank!r}: expected a positive integer")
        check_choice(self.dtype, "--dtype", DTYPE_CHOICES)


def from_reconstruct(options) -> ExportLoraOptions:
    """`rank1 reconstruct --format peft` (docs/commands/reconstruct.md#as-a-peft-adapter): the
    adapter of reconstruct's options (a commands/reconstruct ReconstructOptions). One integer rank
    (an adapter has one r); --alpha 1 (the adapter's scale is lora_alpha / r = 1); `--rest
    checkpoint` saves the changed tensors outside the targets in full (modules_to_save), `--rest
    base` leaves them at the base's, as the merged checkpoint would."""
    ranks = options.rank
    if len(ranks) != 1 or ranks[0].count is None:
        shown = ",".join(r.text for r in ranks)
        raise UsageError(f"--format peft: one integer --rank (an adapter has one rank r), got {shown!r}")
    if options.alpha != 1.0:
        raise UsageError(
            f"--format peft: --alpha {options.alpha:g} applies to merged checkpoints (an adapter's scale is "
            "lora_alpha / r = 1; scale it when loading)"
        )
    return ExportLoraOptions(
        rank=ranks[0].count,
        norm_match=options.norm_match,
        dtype=options.dtype,
        include=list(options.include),
        exclude=list(options.exclude),
        all_2d=options.all_2d,
        exact=options.exact,
        device=options.device,
        factors=options.factors,
        modules_to_save=options.rest == "checkpoint",
    )


@dataclass
class LeftOut:
    """A tensor whose update the adapter does not carry, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class ExportLoraResult:
    out: str
    rank: int
    modules: int  # LoRA target modules written
    target_modules: list[str]  # adapter_config.json's target_modules
    modules_to_save: list[str]  # modules saved in full
    used_factors: bool
    fan_in_fan_out: bool
    dtype: str
    adapter_bytes: int  # adapter_model.safetensors
    checkpoint_bytes: int  # the checkpoint's tensors
    left_out: list[LeftOut] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the user (the CLI prints them on stderr)

    @property
    def size_ratio(self) -> float:
        return self.adapter_bytes / self.checkpoint_bytes if self.checkpoint_bytes else 0.0

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "rank": self.rank,
            "modules": self.modules,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
            "used_factors": self.used_factors,
            "fan_in_fan_out": self.fan_in_fan_out,
            "dtype": self.dtype,
            "adapter_bytes": self.adapter_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "size_ratio": self.size_ratio,
            "left_out": [{"name": x.name, "shape": list(x.shape), "reason": x.reason} for x in self.left_out],
            "notes": self.notes,
        }
