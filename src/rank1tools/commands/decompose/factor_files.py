"""One module's factor file of `rank1 decompose` (docs/formats.md#factor-store): written atomically
when the module is done, read back for the tables (so a resumed run builds them as an uninterrupted
one does), and recognised as finished work when a run resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...io.outputs import follow_umask, output_errors


def stored_module(path: Path) -> str | None:
    """The module name a finished factor file records, or None if unreadable (then it is redone)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["rank1tools"])["module"]
    except Exception:  # noqa: BLE001 (any damage means: not finished work)
        return None


def save_module(final: Path, name: str, steps: list[int], acc: dict, base_fro: float) -> None:
    """Write one module's factor file atomically (tmp + rename)."""
    from safetensors.torch import save_file

    tensors = {
        "steps": torch.tensor(steps, dtype=torch.int64),
        "S": torch.stack(acc["S"]),
        "S_bound": torch.stack(acc["S_bound"]),
        "U": torch.stack(acc["U"]),
        "V": torch.stack(acc["V"]),
        "fro": torch.tensor(acc["fro"], dtype=torch.float64),
        "base_fro": torch.tensor([base_fro], dtype=torch.float64),
    }
    # one metadata key: safetensors writes __metadata__ from a hash map, so several keys
    # would come out in a different order from run to run (outputs must be byte-identical)
    meta = {
        "rank1tools": json.dumps(
            {"module": name, "methods": acc["method"], "residuals": acc["residual"], "iterations": acc["iterations"]},
            sort_keys=True,
        )
    }
    tmp = final.with_suffix(".tmp")
    with output_errors(final):
        save_file(tensors, str(tmp), metadata=meta)
        follow_umask(tmp, directory=False)  # safetensors creates files 0600
        os.replace(tmp, final)


def stored_figures(path: Path) -> tuple[dict, dict]:
    """What the tables need from a finished factor file: steps, S, S_bound, fro, base_fro and the
    metadata (U and V are not read)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = ("steps", "S", "S_bound", "fro", "base_fro")
        return ({k: f.get_tensor(k) for k in keys if k in f.keys()}, json.loads(f.metadata()["rank1tools"]))
