"""A PEFT LoRA adapter read on its base as a full checkpoint (docs/formats.md#peft-lora-adapters).

A checkpoint folder with `adapter_config.json` + `adapter_model.safetensors` (what `peft` and
TRL's trainers save when training with a `peft_config`) opens as its adapter tensors
(io/checkpoint.py, io/hub_open.py); `on_base(adapter, base)` makes it the checkpoint theta_t it
stands for: for each target module W = W_base + scale * B A (transposed where the base stores
the weight fan-in first, GPT-2's Conv1D with `fan_in_fan_out`, and for embeddings), the full
tensors the adapter saves (`modules_to_save`, saved embedding layers) in place of the base's, and
the base's tensors elsewhere. scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`;
`rank_pattern` / `alpha_pattern` are matched against the module name as peft matches them.

Tensors are formed one at a time when read (rows or element ranges of one tensor at a time), so
every command reads an adapter as it reads a checkpoint; `lora_factors(name)` offers the factors
themselves to a command that can use them (decompose's exact factored SVD). Refused, each with a
one-line InputError: other PEFT types (LoHa, LoKr, IA3, AdaLoRA, ...), DoRA, LoRA biases,
`target_parameters`, trainable tokens, and tensors whose names or shapes do not fit the base.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..modules import LM_HEAD_NAME
from .checkpoint import ADAPTER_CONFIG, ADAPTER_FILE, Checkpoint
from .hub_spec import is_hub_source, parse_hub_spec
from .safetensors_file import TensorEntry

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
# adapter_config.json keys that change what the update is; any of them set is refused
_UNSUPPORTED = (
    ("use_dora", "a DoRA adapter (use_dora): its update is not scale * B A"),
    ("lora_bias", "a LoRA bias (lora_bias) is not supported"),
    ("target_parameters", "LoRA on parameters (target_parameters) is not supported"),
    ("trainable_token_indices", "trainable tokens (trainable_token_indices) are not supported"),
    ("layer_replication", "layer_replication is not supported"),
    ("use_qalora", "a QA-LoRA adapter (use_qalora) is not supported"),
)


@dataclass(frozen=True)
class LoraModule:
    """One target module: dW (as the base stores the weight) = scale * B A, or its transpose."""

    name: str  # the base tensor, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str  # adapter tensors
    b_key: str
    rank: int
    scale: float
    transpose: bool  # fan_in_fan_out (GPT-2 Conv1D) and embeddings: dW = scale * (B A)^T


def _config_value(config: dict, key: str, kind, where: str):
    value = config.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(f"{where}: {key} must be a number, found {json.dumps(value)[:60]}")
    return value


def _pattern_value(patterns: object, module: str, default, where: str, key: str):
    """peft's `get_pattern_key`: the first pattern matching the end of the module name."""
    if not patterns:
        return default
    if not isinstance(patterns, dict):
        raise InputError(f"{where}: {key} must be an object")
    for pattern, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", module)
        except re.error:
            raise InputError(f"{where}: {key} pattern {pattern!r} is not a regular expression") from None
        if hit:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InputError(f"{where}: {key}[{pattern!r}] must be a number")
            return value
    return default


def check_config(config: dict, where: str) -> None:
    """Refuse what rank1tools does not read as scale * B A, naming it in one line."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(
            f"{where}: peft_type {peft_type!r} is not supported (rank1tools reads LoRA adapters, peft_type LORA)"
        )
    for key, why in _UNSUPPORTED:
        if config.get(key):
            raise InputError(f"{where}: {why}")


def base_mismatch(named: object, base: Checkpoint) -> str | None:
    """A note when the adapter's `base_model_name_or_path` names another model than BASE; None when
    it matches or names nothing. A Hub id against a local BASE matches when the folder (or the Hub
    cache folder `models--ORG--NAME` it lies in) carries the model's name; else the note says it
    cannot be told."""
    if not isinstance(named, str) or not named.strip("/"):
        return None
    named = named.rstrip("/")
    path = Path(named)
    if path.is_absolute() or path.exists():  # the local folder the adapter was trained from
        if is_hub_source(base.label) or not path.exists():
            return None
        return None if path.resolve() == Path(base.label).resolve() else _mismatch(named, base)
    if is_hub_source(base.label):
        return None if named == parse_hub_spec(base.label).repo_id else _mismatch(named, base)
    parts = Path(base.label).resolve().parts
    if named.split("/")[-1] in parts or "models--" + named.replace("/", "--") in parts:
        return None
    return _mismatch(named, base, checked=False)


def _mismatch(named: str, base: Checkpoint, checked: bool = True) -> str:
    verb = "is not" if checked else "may not be"
    return (
        f"{base.label} {verb} the model the adapter was trained on (its adapter_config.json names "
        f"base_model_name_or_path {named!r}): check that BASE is that model"
    )


def _orientation(a: tuple, b: tuple, want: tuple, stored_in_out: bool) -> bool | None:
    """Whether dW = scale * (B A)^T (the base stores the weight [in, out]: GPT-2's Conv1D, embeddings)
    for A (r, in), B (out, r) and the base's shape; None when they do not fit. Read from the shapes,
    since peft rewrites the config's `fan_in_fan_out` per layer type (a model with both Conv1D and
    Linear targets saves one value); the flag (or embedding) decides only for a square weight."""
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or len(want) != 2:
        return None
    out_in, in_out = want == (b[0], a[1]), want == (a[1], b[0])
    if out_in and in_out:
        return stored_in_out
    return in_out if out_in or in_out else None


def plan_modules(adapter: Checkpoint, base: Checkpoint) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """(base name -> LoraModule, base name -> adapter key of a full tensor) from the adapter's
    tensors, checked against the base's names and shapes."""
    config = adapter.adapter_config or {}
    where = f"{adapter.label}: {ADAPTER_CONFIG}"
    check_config(config, where)
    r_default = _config_value(config, "r", int, where)
    alpha_default = _config_value(config, "lora_alpha", (int, float), where)
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    file = f"{adapter.label} ({ADAPTER_FILE})"
    parts: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    full: dict[str, str] = {}
    for key in adapter.entries:
        if not key.startswith(PREFIX):
            raise InputError(f"{file}: tensor {key!r} is not a PEFT adapter tensor (no {PREFIX!r} prefix)")
        rest = key[len(PREFIX) :]
        suffix = next((s for s in _FACTOR_SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            if ".lora_" in rest or "lora_magnitude_vector" in rest:
                raise InputError(f"{file}: tensor {key!r} is not a LoRA A or B factor (not supported)")
            # modules_to_save, or the weight under a LoRA target that peft saves with it (a resized
            # embedding: `<module>.base_layer.weight`): the tensor itself, in place of the base's
            full[rest.replace(".base_layer.", ".")] = key
            continue
        module = rest[: -len(suffix)]
        which, is_embedding = _FACTOR_SUFFIXES[suffix]
        parts.setdefault(module, {})[which] = key
        embedding[module] = is_embedding
    for name, key in full.items():
        if name not in base:
            raise InputError(f"{file}: tensor {key!r} replaces {name!r}, which base {base.label} lacks")
        got, want = adapter.entries[key].shape, base.entry(name).shape
        if got != want:
            raise InputError(f"{file}: tensor {key!r} has shape {list(got)} but base {name!r} has {list(want)}")
    modules: dict[str, LoraModule] = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise InputError(f"{file}: tensor {next(iter(ab.values()))!r} has no lora_{missing} beside it")
        name = module + ".weight"
        if name not in base:
            raise InputError(f"{file}: tensor {ab['A']!r} targets {name!r}, which base {base.label} lacks")
        if name in full and ".base_layer." not in full[name]:
            raise InputError(f"{file}: {name!r} is both a LoRA target and a saved full tensor")
        a, b = adapter.entries[ab["A"]].shape, adapter.entries[ab["B"]].shape
        want = base.entry(name).shape
        transpose = _orientation(a, b, want, embedding[module] or fan_in_fan_out)
        if transpose is None:
            raise InputError(
                f"{file}: tensors {ab['A']!r} {list(a)} and {ab['B']!r} {list(b)} do not fit base {name!r} {list(want)}"
            )
        mod_key = module
        r = _pattern_value(config.get("rank_pattern"), mod_key, r_default, where, "rank_pattern")
        alpha = _pattern_value(config.get("alpha_pattern"), mod_key, alpha_default, where, "alpha_pattern")
        if a[0] != r:
            raise InputError(f"{file}: tensor {ab['A']!r} has rank {a[0]} but {ADAPTER_CONFIG} gives r = {r}")
        if r < 1:
            raise InputError(f"{where}: r = {r} for {module!r}")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[name] = LoraModule(name, ab["A"], ab["B"], int(r), float(scale), transpose)
    if not modules and not full:
        raise InputError(f"{file}: holds no LoRA tensors")
    return modules, full


class AdapterCheckpoint(Checkpoint):
    """theta_t of a PEFT LoRA adapter on its base: the base's tensor names and shapes, each read as
    the base's tensor plus the adapter's update (see the module doc).

    Attributes beyond Checkpoint's: `adapter` (the adapter's own tensors), `base`, `modules`
    (LoRA targets), `full` (tensors the adapter replaces), `notes` (for the user: a base that
    may not be the adapter's). Target tensors are listed as float32 (they are formed in float32);
    the others keep their stored dtype.
    """

    def __init__(self, adapter: Checkpoint, base: Checkpoint):
        modules, full = plan_modules(adapter, base)
        self.adapter = adapter
        self.base = base
        self.lora_config = adapter.adapter_config  # kept here: a Hub source's pickled copy drops it
        self.modules = modules
        self.full = full
        note = base_mismatch((adapter.adapter_config or {}).get("base_model_name_or_path"), base)
        self.notes = [f"{adapter.label}: {note}"] if note else []
        entries: dict[str, TensorEntry] = {}
        # a tied lm_head the adapter trains (LoRA or modules_to_save) is a tensor of its own here
        names = list(base.entries) + [n for n in (*modules, *full) if n not in base.entries]
        for name in names:
            if name in modules:
                e = base.entry(name)  # a tied lm_head: the embedding's shape
                entries[name] = TensorEntry(name, "F32", e.shape, ADAPTER_FILE, -1, e.numel * 4)
            elif name in full:
                entries[name] = replace(adapter.entries[full[name]], name=name)  # read through `full`
            else:
                entries[name] = base.entries[name]
        super().__init__(adapter.label, adapter.weight_dir, entries, base.config, None, revision=adapter.revision)
        self._factor_lock = threading.Lock()
        self._last: tuple[str, str, object] | None = None  # (name, device, (A, B)) of the last read

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({self.label!r} on {self.base.label!r}, {len(self.modules)} LoRA modules)"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_factor_lock", None)
        state["_last"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._factor_lock = threading.Lock()

    # config and tokenizer files are the base's (an adapter folder has no config.json)
    @property
    def root(self) -> Path | None:
        return self.base.root

    @root.setter
    def root(self, value: Path | None) -> None:
        pass

    @property
    def shards(self) -> list[str]:
        return self.adapter.shards

    def expect(self, names) -> None:
        names = list(names)
        self.base.expect([n for n in names if n not in self.full])
        keys = [self.full[n] for n in names if n in self.full]
        for n in names:
            if n in self.modules:
                keys += [self.modules[n].a_key, self.modules[n].b_key]
        self.adapter.expect(keys)

    def fingerprint_parts(self) -> tuple[list[Checkpoint], bytes]:
        """What identifies this checkpoint's content (io/fingerprint.py): the adapter's tensors and
        its config (scale, patterns); the base is recorded on its own."""
        config = json.dumps(self.lora_config, sort_keys=True).encode()
        return [self.adapter], hashlib.sha256(config).digest()

    # ---- the update's factors
    def lora_factors(self, name: str, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L, R), float32 on `device`, with theta_t - theta_base = L @ R as the base stores `name`
        (scale in L); None when `name` is not a LoRA target, or when the adapter saves the weight
        under it (`base_layer`: its update over BASE is then formed as W_t - W_base)."""
        if name not in self.modules or name in self.full:
            return None
        return self._factors(name, device)

    def _factors(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.modules[name]
        A, B = self._ab(name, device)
        L, R = (A.T, B.T) if m.transpose else (B, A)
        return (L * m.scale).contiguous(), R.contiguous()

    def _ab(self, name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored A and B of a LoRA target, float32 on `device` (the last module's are kept:
        a streamed reader asks for the same module chunk after chunk)."""
        with self._factor_lock:
            if self._last is not None and self._last[:2] == (name, str(device)):
                return self._last[2]
        m = self.modules[name]
        ab = (self.adapter.read(m.a_key, device=device), self.adapter.read(m.b_key, device=device))
        with self._factor_lock:
            self._last = (name, str(device), ab)
        return ab

    def delta(self, name: str, *, rows: tuple[int, int] | None = None, device="cpu") -> torch.Tensor:
        """dW of a LoRA target (rows [a, b) of it), float32, in peft's order: (B A) or (B A)^T, times scale."""
        m = self.modules[name]
        A, B = self._ab(name, device)
        if m.transpose:
            prod = (B @ (A if rows is None else A[:, rows[0] : rows[1]])).T
        else:
            prod = (B if rows is None else B[rows[0] : rows[1]]) @ A
        return prod * m.scale

    # ---- reads
    def _stored_name(self, name: str) -> str:
        """The tensor behind `name`: a tied lm_head reads as the embedding, as the adapter changes it."""
        if name == LM_HEAD_NAME and name not in self.entries and self.lm_head_tied:
            return self._embedding_name()
        return name

    def read_raw(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        name = self._stored_name(name)
        if name in self.modules:  # formed W + scale B A: a new tensor, `out` unused
            return self._merged(name, None, "cpu")
        if name in self.full:
            return self.adapter.read_raw(self.full[name], out)
        return self.base.read_raw(name, out)

    def read(self, name: str, *, device="cpu", dtype=None, rows=None) -> torch.Tensor:
        import torch

        name = self._stored_name(name)
        if name in self.modules:
            return self._merged(name, rows, device).to(torch.float32 if dtype is None else dtype)
        if name in self.full:
            return self.adapter.read(self.full[name], device=device, dtype=dtype, rows=rows)
        return self.base.read(name, device=device, dtype=dtype, rows=rows)

    def read_flat(self, name: str, start: int, stop: int, *, device="cpu", dtype=None) -> torch.Tensor:
        import torch

        name = self._stored_name(name)
        if name in self.modules:
            cols = self.entry(name).shape[1]
            a, b = start // cols, -(-stop // cols)
            flat = self._merged(name, (a, b), device).reshape(-1)[start - a * cols : stop - a * cols]
            return flat.to(torch.float32 if dtype is None else dtype)
        if name in self.full:
            return self.adapter.read_flat(self.full[name], start, stop, device=device, dtype=dtype)
        return self.base.read_flat(name, start, stop, device=device, dtype=dtype)

    def locate(self, name: str):
        if name in self.modules:
            raise InputError(f"{self.label}: tensor {name!r} is formed from the adapter, not stored")
        if name in self.full:
            return self.adapter.locate(self.full[name])
        return self.base.locate(name)

    def _merged(self, name: str, rows: tuple[int, int] | None, device) -> torch.Tensor:
        """W_base + dW (rows [a, b) of it) in float32, as peft's merge computes it; W_base is the
        adapter's own `base_layer` tensor where it saves one."""
        if name in self.full:
            w = self.adapter.read(self.full[name], device=device, rows=rows)
        else:
            w = self.base.read(name, device=device, rows=rows)
        return w.add_(self.delta(name, rows=rows, device=device))


def on_base(checkpoint: Checkpoint, base: Checkpoint) -> Checkpoint:
    """`checkpoint` as a full checkpoint on `base`: an AdapterCheckpoint for a PEFT adapter, else
    itself."""
    if checkpoint.adapter_config is None:
        return checkpoint
    if base.adapter_config is not None:
        raise InputError(f"{base.label}: BASE is a PEFT adapter; give the model it was trained on")
    return AdapterCheckpoint(checkpoint, base)
