"""Reading the factor store that `rank1 decompose` writes (docs/formats.md, "Factor store")."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..jsonutil import read_json_file

FACTOR_FORMAT = "rank1tools.factors"
FACTOR_FORMAT_VERSION = 1


class FactorStore:
    """A decompose output folder: manifest plus per-module top-k factors over checkpoints."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        mf = self.folder / "manifest.json"
        if not mf.exists():
            raise InputError(f"{folder}: not a factor store (no manifest.json; make one with rank1 decompose)")
        self.manifest = read_json_file(mf, "manifest")
        if not isinstance(self.manifest, dict):
            raise InputError(f"{mf}: manifest is not a JSON object")
        if self.manifest.get("format") != FACTOR_FORMAT:
            raise InputError(f"{mf}: not a rank1tools factor store (format {self.manifest.get('format')!r})")
        if self.manifest.get("format_version") != FACTOR_FORMAT_VERSION:
            raise InputError(f"{mf}: factor store format_version {self.manifest.get('format_version')} "
                             f"is not supported (this rank1tools reads {FACTOR_FORMAT_VERSION})")
        self.modules = {m["name"]: m for m in self.manifest["modules"]}
        self.rank = int(self.manifest["parameters"]["rank"])
        self.steps = [c["step"] for c in self.manifest["checkpoints"]]

    def find_checkpoint(self, label: str, revision: str | None = None) -> int:
        """Index of the stored checkpoint that `label` names (same source string, same local
        path, or same Hub revision sha), or -1."""
        for i, c in enumerate(self.manifest["checkpoints"]):
            if _same_source(c["source"], c.get("revision"), label, revision):
                return i
        return -1

    def same_base(self, label: str, revision: str | None = None) -> bool:
        b = self.manifest["base"]
        return _same_source(b["source"], b.get("revision"), label, revision)

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """All tensors of one module's factor file (steps, S, U, V, fro, base_fro)."""
        from safetensors.torch import load_file

        if name not in self.modules:
            raise InputError(f"{self.folder}: factor store has no module {name!r}")
        path = self.folder / self.modules[name]["file"]
        try:
            return load_file(str(path))
        except (OSError, Exception) as e:  # safetensors raises its own error types
            raise InputError(f"{path}: unreadable factor file ({' '.join(str(e).split())})") from None


def _same_source(a: str, a_rev: str | None, b: str, b_rev: str | None) -> bool:
    if a == b:
        return True
    if a.startswith("hf://") or b.startswith("hf://"):
        return a_rev is not None and a_rev == b_rev and a.split("@")[0] == b.split("@")[0]
    return Path(a).resolve() == Path(b).resolve()
