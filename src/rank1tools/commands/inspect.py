"""`rank1 inspect`: what a model folder or a training run holds, from headers only."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import Rank1Error
from ..io.runs import discover_run, lookalike_note, lookalikes, looks_like_run, select_steps
from ..io.sources import discover_checkpoints, is_hub_source, open_source
from ..modules import expert_slices, parse_matrix_module
from ..values import StepSelection


@dataclass
class ModelReport:
    source: str
    tensors: int
    parameters: int
    bytes: int
    dtypes: dict[str, int]
    shards: int
    matrix_modules: int
    matrix_parameters: int
    module_types: dict[str, int]
    layers: int
    lm_head_tied: bool
    revision: str | None = None
    kind: str = "model"
    adapter: dict | None = None  # a PEFT adapter folder: its config's summary (only then in JSON)

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["adapter"] is None:
            del out["adapter"]
        return out


@dataclass
class RunCheckpointReport:
    step: int | None  # None: named like a step folder without a usable step number
    path: str
    layout: str
    weights: str | None
    status: str  # "ok" or "unusable"
    problem: str | None = None
    dtypes: dict[str, int] = field(default_factory=dict)
    tensors: int = 0
    parameters: int = 0


@dataclass
class RunReport:
    source: str
    checkpoints: list[RunCheckpointReport]
    kind: str = "run"
    notes: list[str] = field(default_factory=list)  # e.g. folders that look like checkpoints but are not

    @property
    def problems(self) -> list[RunCheckpointReport]:
        return [c for c in self.checkpoints if c.status != "ok"]

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_model(source: str) -> ModelReport:
    ckpt = open_source(source)
    types: dict[str, int] = {}
    layers: set[int] = set()
    matrix_params = 0
    shapes = expert_slices({name: e.shape for name, e in ckpt.entries.items()})  # one module per fused expert
    for name, shape in shapes.items():
        mod = parse_matrix_module(name, shape)
        if mod is not None:
            types[mod.type] = types.get(mod.type, 0) + 1
            layers.add(mod.layer)
            matrix_params += math.prod(shape)
    return ModelReport(
        source=source,
        tensors=len(ckpt.entries),
        parameters=ckpt.parameter_count,
        bytes=ckpt.nbytes,
        dtypes=ckpt.dtypes(),
        shards=len(ckpt.shards),
        matrix_modules=sum(types.values()),
        matrix_parameters=matrix_params,
        module_types=dict(sorted(types.items())),
        layers=len(layers),
        lm_head_tied=ckpt.lm_head_tied,
        revision=ckpt.revision,
        **_adapter_summary(ckpt.adapter_config),
    )


def _adapter_summary(config: dict | None) -> dict:
    """The `adapter` field of a PEFT adapter folder (its tensors are listed as stored; commands
    read it on a BASE: docs/formats.md#peft-lora-adapters)."""
    if config is None:
        return {}
    keys = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "base_model_name_or_path", "modules_to_save")
    return {"adapter": {k: config.get(k) for k in keys}}


def inspect_run(source: str, steps: StepSelection | str | None = None, checkpoints: list | None = None) -> RunReport:
    """`checkpoints`: already discovered (e.g. on the Hub); default: discover the local run directory."""
    rows = []
    for rc in select_steps(discover_run(source) if checkpoints is None else checkpoints, steps):
        row = RunCheckpointReport(
            step=rc.step,
            path=rc.path,
            layout=rc.layout,
            weights=rc.weights,
            status="ok" if rc.problem is None else "unusable",
            problem=rc.problem,
        )
        if rc.weights is not None:
            try:
                ckpt = open_source(rc.weights)
                row.dtypes, row.tensors, row.parameters = ckpt.dtypes(), len(ckpt.entries), ckpt.parameter_count
            except Rank1Error as e:
                row.status, row.problem = "unusable", str(e)
        rows.append(row)
    skipped = lookalikes(source) if checkpoints is None else []
    return RunReport(source=source, checkpoints=rows, notes=[lookalike_note(source, skipped)] if skipped else [])


def inspect_source(
    source: str,
    steps: StepSelection | str | None = None,
    *,
    revisions: str | None = None,
    subfolders: bool = False,
    commits: bool = False,
) -> ModelReport | RunReport:
    """A model report for weights, a run report for a directory of step folders or a Hub run
    (`revisions` glob over branches, `subfolders` step folders, or `commits` with "step N")."""
    if revisions is not None or subfolders or commits:
        found = discover_checkpoints(source, revisions=revisions, subfolders=subfolders, commits=commits)
        return inspect_run(source, steps, found)
    p = Path(source)
    if not is_hub_source(source) and p.is_dir() and not _has_weights(p) and looks_like_run(p):
        return inspect_run(source, steps)
    return inspect_model(source)


def _has_weights(p: Path) -> bool:
    return any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
