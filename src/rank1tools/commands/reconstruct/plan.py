"""What `rank1 reconstruct` takes, decides and returns: its options (ReconstructOptions), the frozen
plan of one pass (ReconstructPlan, the same object locally and in every Ray task) and the result
(docs/concepts.md#rank-k-reconstruction-reconstruct). The pass itself: reconstruct.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.checkpoint_outputs import DTYPE_CHOICES
from ...engine.executor_options import ExecutorOptions
from ...engine.tensor_units import TensorGroup
from ...io.checkpoint import Checkpoint
from ...io.factor_store import FactorStore
from ...io.writer import TensorSpec
from ...options import RankSpec, check_choice, check_finite, parse_ranks
from ...values import shard_size

REST_CHOICES = ("base", "checkpoint")


@dataclass
class ReconstructOptions:
    """What `rank1 reconstruct` takes. The CLI passes parsed values; text (`rank="1,1%"`,
    `max_shard_size="5GB"`) from a library caller is parsed here once, and every value checked."""

    rank: str | list[RankSpec] = "1"  # held as a list of RankSpec
    alpha: float = 1.0
    norm_match: bool = True
    rest: str = "base"  # base | checkpoint
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    all_2d: bool = False
    exact: bool = False
    device: str = "auto"
    factors: str | None = None
    max_shard_size: str | int = "5GB"  # text like 5GB, or bytes; held in bytes

    def __post_init__(self) -> None:
        if isinstance(self.rank, str):
            self.rank = parse_ranks(self.rank)
        self.max_shard_size = shard_size(self.max_shard_size)
        self.check()

    def check(self) -> None:
        check_choice(self.rest, "--rest", REST_CHOICES)
        check_choice(self.dtype, "--dtype", DTYPE_CHOICES)
        check_finite(self.alpha, "--alpha")


@dataclass
class RankOutput:
    rank: str
    path: str
    lost_fraction: float
    rel_error: float
    updated_elements: int
    warning: str | None
    tensors: list[dict]


@dataclass
class ReconstructResult:
    out: str
    modules: int
    used_factors: bool
    outputs: list[RankOutput]
    untied_lm_head: bool = False  # the output stores lm_head.weight and says tie_word_embeddings: false
    notes: list[str] = field(default_factory=list)  # for the user (the CLI prints them on stderr)

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "modules": self.modules,
            "used_factors": self.used_factors,
            "untied_lm_head": self.untied_lm_head,
            "notes": self.notes,
            "outputs": [
                {
                    "rank": o.rank,
                    "path": o.path,
                    "lost_fraction": o.lost_fraction,
                    "rel_error": o.rel_error,
                    "updated_elements": o.updated_elements,
                    "warning": o.warning,
                }
                for o in self.outputs
            ],
        }


@dataclass(frozen=True)
class ReconstructPlan:
    """One reconstruct pass, decided before any output exists: what is read, computed and written.
    Picklable: the local path and every Ray task receive this same object."""

    base: Checkpoint
    checkpoint: Checkpoint
    store: FactorStore | None  # --factors: the factors and ||dW|| come from it (the checkpoint's modules are not read)
    step_index: int  # the checkpoint's position in the store (-1 without one)
    ranks: tuple[RankSpec, ...]
    kmax: dict[str, int]  # per selected module: the largest rank asked for
    modules: tuple[str, ...]  # the selected matrix modules; every other tensor is copied (--rest)
    options: ReconstructOptions
    device: str
    specs: tuple[TensorSpec, ...]  # every tensor written, in order (the base's, then an untied lm_head)
    untie: bool  # the output stores lm_head.weight and its config says tie_word_embeddings: false
    out: str  # the output as the user named it
    force: bool
    executor: ExecutorOptions
    groups: list[TensorGroup] | None  # with Ray: the units of work
