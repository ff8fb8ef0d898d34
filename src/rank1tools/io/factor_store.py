"""Reading the factor store that `rank1 decompose` writes (docs/formats.md, "Factor store")."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..errors import InputError
from ..jsonutil import read_json_file
from .checkpoint import Checkpoint
from .fingerprint import check_base, matches, same_source  # noqa: F401 (same_source: importable from here)

FACTOR_FORMAT = "rank1tools.factors"
FACTOR_FORMAT_VERSION = 1


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,150}(?:\[\d{1,6}\])?")  # [e]: one expert of a fused tensor


def factor_file(name: str) -> str:
    """File name (inside factors/) of a module's factors. A tensor name never becomes a path as
    is: ordinary names (letters, digits, `_ . -`) are kept readable, anything else (`/`, `..`,
    NUL, non-ASCII, very long) is replaced by a hash of the name."""
    if _PLAIN_NAME.fullmatch(name) and ".." not in name:
        return f"{name}.safetensors"
    return f"~{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:40]}.safetensors"


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
            raise InputError(
                f"{mf}: factor store format_version {self.manifest.get('format_version')} "
                f"is not supported (this rank1tools reads {FACTOR_FORMAT_VERSION})"
            )
        try:
            self.modules = {m["name"]: m for m in self.manifest["modules"]}
            self.rank = self.manifest["parameters"]["rank"]
            self.steps = [c["step"] for c in self.manifest["checkpoints"]]
            sources = [c["source"] for c in [self.manifest["base"], *self.manifest["checkpoints"]]]
            ok = (
                isinstance(self.rank, int)
                and not isinstance(self.rank, bool)
                and self.rank >= 1
                and all(
                    isinstance(n, str) and isinstance(m.get("file"), str) and is_shape(m.get("shape"))
                    for n, m in self.modules.items()
                )
                and all(isinstance(s, int) and not isinstance(s, bool) for s in self.steps)
                and all(isinstance(s, str) for s in sources)
            )
        except (KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise InputError(
                f"{mf}: malformed factor store manifest (modules, parameters.rank, base or checkpoints "
                "missing or of the wrong type)"
            )
        self._factors_dir = Path(os.path.realpath(self.folder / "factors"))

    def find_checkpoint(self, ck: Checkpoint) -> int:
        """Index of the stored checkpoint that `ck` is (by content when the store recorded its
        fingerprint, else same source string, local path or Hub revision sha), or -1."""
        for i, c in enumerate(self.manifest["checkpoints"]):
            if matches(c, ck)[0]:
                return i
        return -1

    def check_base(self, ck: Checkpoint, notes: list[str]) -> None:
        """Refuse a base other than the one decomposed (io.fingerprint.check_base)."""
        check_base(self.manifest["base"], ck, str(self.folder), "factor store", notes)

    def factor_path(self, name: str) -> Path:
        """The file of module `name`, confined to the store's factors/ folder (a manifest string
        never reaches outside it, symlinks included)."""
        if name not in self.modules:
            raise InputError(f"{self.folder}: factor store has no module {name!r}")
        rel = self.modules[name]["file"]
        parts = rel.split("/")
        path = Path(os.path.realpath(self.folder / rel)) if "\x00" not in rel else None
        if (
            len(parts) != 2
            or parts[0] != "factors"
            or parts[1] in ("", ".", "..")
            or path is None
            or path.parent != self._factors_dir
        ):
            raise InputError(
                f"{self.folder / 'manifest.json'}: module {name!r} names file {rel!r}, "
                "which is not a file in the store's factors/ folder"
            )
        return path

    def load(self, name: str) -> dict[str, torch.Tensor]:
        """All tensors of one module's factor file (steps, S, U, V, fro, base_fro and, in stores
        written since issue #25, S_bound), checked to be that module's (the file records its module
        name) and of the manifest's shapes. A store without S_bound loads without it: its bounds
        are unknown."""

        path = self.factor_path(name)
        data = read_module_file(path, name, "factor file")
        m, n = self.modules[name]["shape"]
        T, k = len(self.steps), min(self.rank, m, n)
        want = {"steps": (T,), "fro": (T,), "base_fro": (1,), "S": (T, k), "U": (T, m, k), "V": (T, n, k)}
        if "S_bound" in data:
            want["S_bound"] = (T, k)
        for key, dims in want.items():
            if key not in data or tuple(data[key].shape) != dims:
                got = list(data[key].shape) if key in data else "missing"
                raise InputError(f"{path}: factor tensor {key!r} is {got}, expected {list(dims)} (corrupt store)")
        if data["steps"].tolist() != self.steps:
            raise InputError(
                f"{path}: factor file steps {data['steps'].tolist()} differ from the manifest's {self.steps}"
            )
        check_factors(path, data, self.steps)
        return data


# Relative slack of the consistency checks below: the factors are float32, the norms float64.
NORM_SLACK = 1e-3


def _bad(path: Path, key: str, what: str) -> InputError:
    return InputError(f"{path}: factor tensor {key!r} {what} (corrupt or edited factor store)")


def check_factors(path: Path, data: dict[str, torch.Tensor], steps: list[int]) -> None:
    """What decompose writes and reconstruct / fit-pls rely on (docs/formats.md, "Factor store"):
    every tensor finite; norms ||dW_t||_F (`fro`, `base_fro`) >= 0; each step's singular values
    S >= 0, non-increasing, and at most `fro` in total energy (sqrt(sum S^2) <= fro); U and V
    columns of unit norm where S > 0; `S_bound`, where present, >= 0. A negative `fro` would flip
    the sign of a norm-matched update; a NaN would reach the written weights."""
    for key in ("S", "U", "V", "fro", "base_fro", *(("S_bound",) if "S_bound" in data else ())):
        t = data[key]
        if not t.is_floating_point():
            raise _bad(path, key, f"is {str(t.dtype).removeprefix('torch.')}, not floating point")
        if not bool(torch.isfinite(t).all()):
            raise _bad(path, key, "has non-finite values (NaN or Inf)")
    fro, S = data["fro"].double(), data["S"].double()
    norms = [("fro", fro), ("base_fro", data["base_fro"].double())]
    if "S_bound" in data:
        norms.append(("S_bound", data["S_bound"].double().reshape(-1)))
    for key, t in norms:
        if bool((t < 0).any()):
            i = int((t < 0).nonzero()[0, 0])
            where = f" at step {steps[i]}" if key == "fro" else ""
            what = "a bound" if key == "S_bound" else "a norm"
            raise _bad(path, key, f"is negative{where} ({float(t[i]):.4g}); {what} is >= 0")
    for i, step in enumerate(steps):
        row = S[i]
        if bool((row < 0).any()):
            raise _bad(path, "S", f"has a negative singular value at step {step} ({float(row.min()):.4g})")
        if bool((row[1:] > row[:-1] * (1 + 1e-6)).any()):
            raise _bad(path, "S", f"is not in non-increasing order at step {step}")
        energy = float(row.square().sum().sqrt())
        if energy > float(fro[i]) * (1 + NORM_SLACK) + 1e-30:
            raise _bad(
                path,
                "S",
                f"holds more than ||dW||_F at step {step} (sqrt(sum S^2) = {energy:.4g} > fro = {float(fro[i]):.4g})",
            )
        for key in ("U", "V"):
            norms = data[key][i].double().norm(dim=0)
            off = ((norms - 1).abs() > NORM_SLACK) & (row > 0)
            if bool(off.any()):
                j = int(off.nonzero()[0, 0])
                raise _bad(path, key, f"column {j} at step {step} has norm {float(norms[j]):.4g}, not 1")


def is_shape(shape) -> bool:
    return (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    )


def read_module_file(path: Path, name: str, kind: str) -> dict[str, torch.Tensor]:
    """Every tensor of a per-module store file (a factor or fit file), which must record module
    `name` in its metadata; one-line InputError naming the `kind` of file otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
            recorded = json.loads((f.metadata() or {}).get("rank1tools", "{}")).get("module")
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
        raise InputError(f"{path}: unreadable {kind} ({' '.join(str(e).split())})") from None
    if recorded != name:
        raise InputError(f"{path}: {kind} holds module {recorded!r}, not {name!r} (manifest and files disagree)")
    return data
